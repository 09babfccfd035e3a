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
import os
import sys
from pathlib import Path
from typing import Iterator

from loratune.errors import InputError

NAME = ".lock"
"""The lock file inside the directory; the run-directory code ignores it when it lists or empties a folder."""


@contextlib.contextmanager
def hold(folder: Path, *, flag: str = "--out") -> Iterator[None]:
    """Hold the directory's lock while the block runs; InputError naming the holder if another process has it.

    ``folder`` is created if missing (a lock needs a file to live in).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise InputError(f"{flag}: {folder} is in use by another loratune process ({_holder(fd)}); wait for "
                             f"it to end, or give another {flag}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode("utf-8", "replace"))
        yield
    finally:
        os.close(fd)                                   # closing the last descriptor releases the lock


def _holder(fd: int) -> str:
    """What the holder wrote into the lock file: its pid and command line."""
    try:
        text = os.pread(fd, 400, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"
