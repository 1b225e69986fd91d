"""Writing files so that nothing a user ran is lost: atomic replacement and an exclusive lock.

:func:`atomic_write` writes a temp file next to the target, flushes it to disk and renames it over
the target, so a reader (or a run killed mid-write) sees the old file or the new one, never half
of one. Its temp files are named ``.NAME.*.tmp``; :func:`remove_stale_temp_files` clears those a
killed process left behind. :class:`Lock` keeps two processes from writing one run directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import LLSError

TEMP_SUFFIX = ".tmp"
# What a run directory holds (training/rundir.py names its files from here): an output elsewhere
# never replaces one of them. A folder holding CONFIG_FILE and one of the others is a run directory.
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILES = ("metrics.jsonl", "metrics.csv")
CURVES_FILE = "curves.png"
LOCK_FILE = ".lock"
TENSORBOARD_FOLDER = "tensorboard"
RUN_FILES = (CONFIG_FILE, CHECKPOINT_FILE, *METRICS_FILES, CURVES_FILE, LOCK_FILE, TENSORBOARD_FOLDER)


def _file_mode() -> int:
    """What a plain ``open(path, "w")`` would give: 0o666 less the umask (mkstemp gives 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


NAME_MAX = 255  # bytes in one file or folder name (ext4, xfs, btrfs, tmpfs)


def name_too_long(path: Path | str) -> str | None:
    """What is wrong with ``path`` when one of its names is longer than a filesystem allows."""
    for name in Path(path).parts:
        if len(os.fsencode(name)) > NAME_MAX:
            shown = name if len(name) <= 40 else f"{name[:20]}...{name[-12:]}"
            return (
                f"the name {shown!r} in {what_path(path)} is too long ({len(os.fsencode(name))} bytes; "
                f"a name may have at most {NAME_MAX}); choose a shorter one"
            )
    return None


def what_path(path: Path | str) -> str:
    """``path`` shortened for a message when it is very long."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]}"


def check_folder(path: Path | str, what: str, missing: str = "") -> Path:
    """``path`` if it is an existing folder; otherwise an error naming why: a name too long, a file
    where a folder is expected, or nothing there (``missing`` adds what to do)."""
    if not str(path).strip():  # Path("") would be ".", the current folder
        raise LLSError(f"{what} is an empty path; name a folder")
    path = Path(path)
    problem = name_too_long(path)
    if problem is not None:
        raise LLSError(f"{what}: {problem}")
    if path.exists() and not path.is_dir():
        raise LLSError(f"{what} {path} is a file, not a folder")
    if not path.is_dir():
        raise LLSError(f"{what} {path} does not exist{missing}")
    return path


def describe_os_error(error: OSError, path: Path | str) -> str:
    """One line for a filesystem failure: what happened to which path, and what to do."""
    if error.errno == errno.ENAMETOOLONG:
        return name_too_long(path) or f"a name in {what_path(path)} is too long; choose a shorter one"
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        fix = "free disk space and resume the run"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a writable location"
    elif error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        fix = "choose another path"
    else:
        fix = "check the path and the disk"
    return f"cannot write {path}: {reason}; {fix}"


def is_run_directory(folder: Path) -> bool:
    """Whether ``folder`` is an lls run directory: its config.json and a file only a run writes."""
    return (folder / CONFIG_FILE).is_file() and any(
        (folder / name).exists() for name in (CHECKPOINT_FILE, LOCK_FILE, *METRICS_FILES)
    )


def _kind(mode: int) -> str | None:
    """What a file of ``mode`` is, when it is not a regular file or a folder."""
    kinds = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device"}
    kinds |= {stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), None)


def check_output(path: Path | str, what: str = "--out", inputs: Iterable[Path | str] = ()) -> Path:
    """``path`` if a command may write its output there; otherwise one line saying why not.

    Refused: a symbolic link (renaming a new file over it would replace the link, and writing
    through it could reach anything: give the real path), anything that is not a regular file (a
    FIFO, a device such as /dev/null, a socket: replacing it would break whatever uses it), a file
    of a run directory (its checkpoint, config.json, metrics, curves: the run would be lost), and
    any of the command's ``inputs`` (the same file, by inode or by its real path)."""
    path = Path(path)
    problem = name_too_long(path)
    if problem is not None:
        raise LLSError(f"{what}: {problem}")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise LLSError(describe_os_error(error, path)) from None
    if mode is not None and stat.S_ISLNK(mode):
        raise LLSError(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); give the real path of the file "
            "to write (lls never writes through a link)"
        )
    if mode is not None and stat.S_ISDIR(mode):
        raise LLSError(f"{what} {path} is a folder; give the file to write")
    kind = None if mode is None else _kind(mode)
    if kind is not None:
        raise LLSError(
            f"{what} {path} is {kind}, not a file; lls writes only regular files: give a file path"
        )
    real = Path(os.path.realpath(path))
    for folder in (real.parent, real.parent.parent):
        relative = real.relative_to(folder).parts
        if relative[0] in RUN_FILES and is_run_directory(folder):
            raise LLSError(
                f"{what} {path} is a file of the run directory {folder}; writing it would destroy the "
                "run: choose another file name"
            )
    for given in inputs:
        given = Path(given)
        same = os.path.realpath(given) == str(real)
        with contextlib.suppress(OSError):
            same = same or (mode is not None and os.path.samefile(given, path))
        if same:
            raise LLSError(f"{what} {path} is one of the command's inputs ({given}); write to another file")
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (temp file, fsync, rename); raises LLSError naming
    the path on a filesystem failure (a full disk, a read-only mount), leaving the old file."""
    atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)`` beside ``path``, fsync, then the rename over ``path``: readers see
    the old file or the whole new one; a filesystem failure raises LLSError naming the path and
    leaves nothing behind (for writers that want a path of their own, such as an exporter)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _check_replaceable(path)
        os.replace(tmp, path)
    except OSError as error:
        raise LLSError(describe_os_error(error, path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _check_replaceable(path: Path) -> None:
    """Refuse, at the last moment, to rename a file over something that is not a regular file or
    a link (a FIFO or a device put there since the command was checked)."""
    try:
        kind = _kind(path.lstat().st_mode)
    except FileNotFoundError:
        return
    if kind is not None:
        raise LLSError(f"{path} is {kind}, not a file; lls writes only regular files: give a file path")


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files :func:`atomic_write` leaves when its process is killed mid-write.
    Call it only while holding the folder's :class:`Lock`."""
    removed = []
    for path in folder.glob(f".*{TEMP_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class Lock:
    """An exclusive lock on a folder: ``.lock`` holds the holder's pid and host.

    The lock is an ``flock`` on that file, so the kernel drops it when its holder dies, however it
    dies: a lock file left by a killed process is stale and simply taken over.
    """

    NAME = LOCK_FILE

    def __init__(self, folder: Path) -> None:
        self.path = folder / self.NAME
        self._fd: int | None = None

    def acquire(self) -> Lock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise LLSError(describe_os_error(error, self.path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LLSError(
                f"{self.path.parent} is being written by {holder}; wait for it to finish or stop it, "
                "then resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmless once unlocked
            self._fd = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
