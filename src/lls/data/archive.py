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

MAX_MEMBERS = 1_000_000  # TinyImageNet, the largest set fetched, has about 120,000 files
MAX_EXPANSION = 50  # unpacked bytes per archive byte (image sets hardly compress: about 1-2)
MIN_UNPACKED_LIMIT = 1 << 30  # small archives may still unpack to 1 GiB


def _check_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name)
    drive = bool(path.parts) and ":" in path.parts[0]
    if not name or path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or drive:
        raise LLSError(
            f"{archive} has an unsafe member {name!r} (outside the target folder); not unpacking it"
        )


def _check_size(archive: Path, sizes: list[int]) -> None:
    """Refuse archives that would unpack to far more than they weigh (a "zip bomb"), or to more
    files than any dataset has, whether or not a checksum vouched for them."""
    if len(sizes) > MAX_MEMBERS:
        raise LLSError(
            f"{archive} holds {len(sizes)} files, more than any dataset ({MAX_MEMBERS}); not unpacking it"
        )
    limit = max(MIN_UNPACKED_LIMIT, MAX_EXPANSION * archive.stat().st_size)
    if sum(sizes) > limit:
        raise LLSError(
            f"{archive} would unpack to {sum(sizes) / 2**30:.1f} GiB, over {MAX_EXPANSION}x its size; "
            "not unpacking it (delete it and fetch it again)"
        )


def safe_members(archive: Path) -> list[str]:
    """Names of the archive's members, after checking every one of them and their total size."""
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as z:
                infos = z.infolist()
        except (zipfile.BadZipFile, OSError) as error:
            raise LLSError(
                f"{archive} is not a readable archive ({error}); delete it and fetch it again"
            ) from None
        for info in infos:
            _check_name(archive, info.filename)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise LLSError(f"{archive} has a symbolic link {info.filename!r}; not unpacking it")
        # zipfile stops each member at its declared size (and checks its CRC), so these bound it
        _check_size(archive, [info.file_size for info in infos])
        return [info.filename for info in infos]
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
    _check_size(archive, [member.size for member in members])
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
