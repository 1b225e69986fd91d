"""Resumable downloads with checksum verification before a file is put in place."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from ..errors import LLSError
from ..files import check_output
from .archive import extract

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 30


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, md5: str | None = None, sha256: str | None = None) -> None:
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected and file_digest(path, algorithm) != expected:
            raise LLSError(f"{path} fails its {algorithm} check; delete it and fetch it again")


def download(
    urls: Sequence[str], dest: Path, *, md5: str | None = None, sha256: str | None = None, quiet: bool = False
) -> Path:
    """Fetch ``dest`` from the first mirror that answers, resuming a partial ``.part`` file.

    The checksum is verified before the file is renamed into place, so ``dest`` either does not
    exist or is complete and correct.
    """
    part = dest.with_name(dest.name + ".part")
    for path in (dest, part):  # before any byte is fetched: a link, folder or device is not replaced
        check_output(path, "the download of")
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        try:
            _fetch(url, part, quiet)
        except (urllib.error.URLError, OSError) as error:
            errors.append(f"{url}: {getattr(error, 'reason', error)}")
            continue
        try:
            verify(part, md5, sha256)
        except LLSError:
            part.unlink()
            errors.append(f"{url}: checksum mismatch")
            continue
        part.replace(dest)
        return dest
    raise LLSError(
        f"could not download {dest.name} ({'; '.join(errors)}); check the network or use --data-dir"
    )


def _fetch(url: str, part: Path, quiet: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to fetch: the partial file is complete
            return
        raise
    with response:
        if have and getattr(response, "status", None) != 206:  # the range was ignored: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = int(length) + have if length is not None else None
        with (
            part.open("ab" if have else "wb") as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.stem, disable=quiet) as bar,
        ):
            for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                f.write(chunk)
                bar.update(len(chunk))


def fetch_archive(urls: Sequence[str], md5: str, root: Path, *, quiet: bool = False) -> None:
    """Download an archive into ``root`` (resumable, md5-checked), unpack it safely, delete it."""

    archive = root / urls[0].rsplit("/", 1)[-1]
    if not archive.exists():
        download(urls, archive, md5=md5, quiet=quiet)
    else:
        verify(archive, md5=md5)
    extract(archive, root)
    archive.unlink()
