"""The run folder's lock: one run per ``--output-dir`` at a time."""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ...checkpoint import RunFileError
from ..errors import ConfigError

LOCK_FILE = ".capaboost.lock"


class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock; the message names the folder and its pid."""


@contextmanager
def folder_lock(folder: str | Path, flag: str = "--output-dir") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``folder/.capaboost.lock`` (created, with the folder) for the block.

    Two runs writing one folder would interleave their checkpoints and logs; the second one fails at
    once instead, naming the holder's pid. The kernel drops a flock when its process dies, so a lock
    file left by a killed run never blocks. ``flag`` names the option the error messages point at.
    """
    folder = Path(folder)
    path = folder / LOCK_FILE
    if folder.exists() and not folder.is_dir():
        raise RunFileError(f"{flag} {str(folder)!r} is a file, not a folder; choose another {flag}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFileError(f"cannot create {flag} {str(folder)!r} ({err.strerror}); choose another {flag}.") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFileError(
                f"{flag} {str(folder)!r} is not writable ({err.strerror}); fix its permissions or choose another "
                f"{flag}."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFileError(f"cannot lock {path} ({err.strerror}); choose another {flag}.") from None
            raise RunLockedError(
                f"{flag} {str(folder)!r} is in use by another capaboost run (pid {holder}, lock file {path}); "
                f"wait for it to finish or choose another {flag}."
            ) from None
        try:  # the previous holder unlinks the file on release: make sure we locked the live one
            live = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            live = False
        if live:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # still under the lock, so no other holder can lose it
        os.close(fd)
