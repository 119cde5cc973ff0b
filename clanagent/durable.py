"""Files that survive a crash whole, and files read from a path someone else named.

Owns: the one implementation of the atomic replace (a temp file in the same
directory, every byte written, mode and owner set on the open file, fsync,
rename over the target, fsync of the directory), the exclusive create of a
new file with the same care (for callers that rename in a protocol of their
own, like identity.py's pending keys), the fsync of a directory, and the
guarded read of a file whose path came from outside (no symlink followed,
never blocking on a FIFO or taking a terminal, a regular file only, its
owner and mode checked on the open descriptor, a size cap).

Must never: leave a reader a torn file (a failure before the rename leaves
the old file as it was and removes the temp file), write through a planted
symlink (temp files are created O_EXCL|O_NOFOLLOW), let the umask decide a
mode (modes are set with fchmod), or read a byte of a file it refused.
Blocking I/O throughout: trio callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "FileRefused",
    "atomic_open",
    "atomic_write",
    "fsync_dir",
    "read_file",
    "temp_pattern",
    "write_new",
]

Owner = tuple[int, int] | None  # (uid, gid) to chown to, or None to keep ours

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO put where a file should be opens at once instead of
# waiting for a writer; O_NOCTTY: a terminal never becomes ours.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a create, a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # os.write may be short
        view = view[os.write(fd, view) :]


def _finish(fd: int, mode: int, owner: Owner, sync: bool) -> None:
    os.fchmod(fd, mode)  # exact, whatever the umask said
    if owner is not None:
        os.fchown(fd, *owner)
    if sync:
        os.fsync(fd)


def write_new(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600, owner: Owner = None
) -> None:
    """Create `path` (it must not exist, and is never a symlink) holding `data`, fsynced.

    No rename and no directory fsync: for callers whose own protocol renames
    (or that fsync the directory once for several files).  A failure removes
    the partial file.
    """
    fd = os.open(path, _CREATE, 0o600)
    try:
        _write_all(fd, data)
        _finish(fd, mode, owner, True)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def temp_pattern(name: str) -> str:
    """The glob matching the temp files `atomic_write` makes for a file called `name`."""
    return f".{name}.*.tmp"


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str],
    *,
    mode: int = 0o600,
    owner: Owner = None,
    sync: bool = True,
    sync_dir: bool | None = None,
) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` when the block ends without an exception.

    Until then the data goes to a temp file next to `path` (same file system,
    so the rename is atomic); an exception removes it and leaves `path` as it
    was.  `sync` fsyncs the file before the rename; `sync_dir` (default: as
    `sync`) fsyncs the directory after it -- pass False when writing several
    files and call `fsync_dir` once.  `sync=False` keeps only the atomicity,
    for files whose loss at a power cut costs nothing (a pidfile, a console
    log copy).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, _CREATE, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            yield f
            f.flush()
        _finish(fd, mode, owner, sync)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync if sync_dir is None else sync_dir:
        fsync_dir(path.parent)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    owner: Owner = None,
    sync: bool = True,
    sync_dir: bool | None = None,
) -> None:
    """Replace `path` with `data` atomically and (by default) durably; see `atomic_open`."""
    with atomic_open(path, mode=mode, owner=owner, sync=sync, sync_dir=sync_dir) as f:
        f.write(data)


class FileRefused(ValueError):
    """`read_file` would not read this file; `reason` is one of REASONS, `st` its stat.

    Callers turn it into their own message (they know what the file is for
    and how the user fixes it).
    """

    REASONS = ("symlink", "not_regular", "owner", "mode", "too_large")

    def __init__(self, path: str | os.PathLike[str], reason: str, st: os.stat_result | None):
        assert reason in self.REASONS
        self.path = Path(path)
        self.reason = reason
        self.st = st
        super().__init__(f"{path}: refused ({reason.replace('_', ' ')})")


def read_file(
    path: str | os.PathLike[str],
    *,
    max_size: int,
    follow_symlinks: bool = False,
    owner: int | None = None,
    private: bool = False,
) -> bytes:
    """The content of a regular file of at most `max_size` bytes, read with care.

    Refused (FileRefused) before a byte is read: a symlink (unless
    `follow_symlinks`), anything but a regular file (a FIFO does not block
    the open), a file not owned by uid `owner` (when given), a file with any
    group or other permission bit (when `private`), a file over `max_size`
    (also when it grows while read).  OSError (FileNotFoundError included)
    passes through.
    """
    flags = _READ & ~os.O_NOFOLLOW if follow_symlinks else _READ
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise FileRefused(path, "symlink", None) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(path, "not_regular", st)
        if owner is not None and st.st_uid != owner:
            raise FileRefused(path, "owner", st)
        if private and st.st_mode & 0o077:
            raise FileRefused(path, "mode", st)
        if st.st_size > max_size:
            raise FileRefused(path, "too_large", st)
        chunks = []
        left = max_size + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_size:
        raise FileRefused(path, "too_large", st)
    return data
