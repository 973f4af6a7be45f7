"""Atomic file writes: readers see the old file or the whole new one, never half of one."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from featcache import FeatcacheError

FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file size limit, quota
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)  # a read-only file system, no permission


def atomic_write(path: str | Path, data: bytes | memoryview | str) -> Path:
    """Write a sibling temporary file, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise_if_out_of_space(exc, f"writing {path}")
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def open_regular(path: str | Path):
    """``path`` opened for binary reading if it is a regular file; OSError for anything else (a FIFO
    swapped in after a scan must not block: it is opened without waiting for a writer, and refused)."""
    f = open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise OSError(f"{path} is not a regular file")
    return f


def fsync(path: Path) -> None:
    """Flush a file to disk before it is renamed into place (survives a power cut, not just a kill)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raise_if_out_of_space(exc: OSError, what: str) -> None:
    """Turn a write that failed because the disk (or a quota or size limit) is full into one line."""
    if exc.errno in FULL:
        raise FeatcacheError(
            f"{what}: {os.strerror(exc.errno)}; free space and run the same command again "
            "(everything finished before is kept, nothing half-written is visible)"
        ) from None


def link_or_copy(source: str | Path, target: str | Path) -> Path:
    """``target`` as a hard link to ``source`` (same file system), else a copy: a regular file inside
    the tree being built, which featcache reads (it skips symlinks that leave the data folder)."""
    import shutil

    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return Path(target)
