"""Unpacking downloaded archives without trusting their member names.

Every member is checked before anything is written: no absolute paths, no ``..``, no links or
device files, nothing that would land outside the target folder. The archive is unpacked into a
temporary folder next to the target and renamed into place, so a half-unpacked dataset never
looks complete.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import LLSError


def _check_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name)
    drive = bool(path.parts) and ":" in path.parts[0]
    if not name or path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or drive:
        raise LLSError(
            f"{archive} has an unsafe member {name!r} (outside the target folder); not unpacking it"
        )


def safe_members(archive: Path) -> list[str]:
    """Names of the archive's members, after checking every one of them."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                _check_name(archive, info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise LLSError(f"{archive} has a symbolic link {info.filename!r}; not unpacking it")
            return z.namelist()
    try:
        with tarfile.open(archive) as t:
            members = t.getmembers()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise LLSError(
            f"{archive} is not a readable archive ({error}); delete it and fetch it again"
        ) from None
    for member in members:
        _check_name(archive, member.name)
        if not (member.isfile() or member.isdir()):
            raise LLSError(f"{archive} has a link or special file {member.name!r}; not unpacking it")
    return [m.name for m in members]


def extract(archive: Path, target: Path) -> None:
    """Unpack ``archive`` so that its top-level entries appear in ``target`` (atomically per entry)."""
    safe_members(archive)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".unpack-") as tmp:
        staging = Path(tmp)
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    z.extractall(staging)
            else:
                with tarfile.open(archive) as t:
                    t.extractall(staging, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
            raise LLSError(f"unpacking {archive} failed ({error}); delete it and fetch it again") from None
        for entry in staging.iterdir():
            final = target / entry.name
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            entry.rename(final)
