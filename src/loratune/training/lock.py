"""One live process per run or search directory: an advisory lock that the OS releases on any exit.

``loratune train --out D`` started twice at once used to let both processes write into D (the config
of one, the metrics lines of both, the adapter of whichever wrote last). Now the first to start holds
``D/.lock`` (``fcntl.flock``, exclusive, non-blocking) for as long as it runs; a second start, an
``--overwrite`` or a ``--resume`` of D meanwhile fails at once with exit 2, naming the other process.
The OS drops the lock when the holder exits in any way, SIGKILL included, so a crash never leaves a
stale lock behind: the file may stay, the lock does not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from loratune.errors import InputError

log = logging.getLogger(__name__)
NAME = ".lock"
"""The lock file inside the directory; the run-directory code ignores it when it lists or empties a folder."""
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)   # e.g. Lustre without -o flock
_HELD: set[Path] = set()                               # folders this process holds (never reported as "in use")


@contextlib.contextmanager
def hold(folder: Path, *, flag: str = "--out") -> Iterator[None]:
    """Hold the directory's lock while the block runs; InputError naming the holder if another process has it.

    ``folder`` is created if missing (a lock needs a file to live in).
    """
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / NAME, os.O_RDWR | os.O_CREAT, 0o644)
    key = folder.resolve()
    try:
        if _lock(fd, folder, flag):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode("utf-8", "replace"))
            _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)                                   # closing the last descriptor releases the lock


def _lock(fd: int, folder: Path, flag: str) -> bool:
    """Take the lock on ``fd``: True; False (with a warning) where the filesystem has no locks; InputError
    naming the holder where another process has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            log.warning("%s: this filesystem has no file locks (%s); nothing stops a second process from writing "
                        "here", folder, e.strerror)
            return False
        if e.errno not in _BUSY:
            raise
    raise InputError(f"{flag}: {folder} is in use by another loratune process ({_read(fd)}); wait for it to end, "
                     f"or give another {flag}")


def holder(folder: Path) -> str | None:
    """Who holds ``folder``'s lock ("pid N: command"), or None when no other process does."""
    path = folder / NAME
    if folder.resolve() in _HELD or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)   # free: we get it (and drop it when fd closes)
        return None
    except OSError as e:
        return _read(fd) if e.errno in _BUSY else None
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    """What the holder wrote into the lock file: its pid and command line."""
    try:
        text = os.pread(fd, 400, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"
