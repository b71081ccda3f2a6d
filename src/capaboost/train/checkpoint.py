"""Atomic files and training checkpoints: an interrupted run leaves either the old or the new state.

A checkpoint holds the trainable tensors, optimizer and scheduler states, method-specific state and
the progress counters (epoch, batches consumed, global step, validation history). No RNG state is
needed: the runner reseeds from (seed, step, rank) before every step and draws each epoch's order
from (seed, epoch), so resuming at a step boundary replays exactly what an uninterrupted run does.

Also the run folder's integrity: its lock (one run per folder), SHA-256 checksums of the tensor files
(a torn or damaged file is named instead of loading wrong values or failing with a traceback), the data
fingerprint a resume is checked against, and the clean-up of a killed writer's temporaries.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import ConfigError

CHECKPOINT_DIR = "checkpoint"
CHECKSUMS = "sha256.json"  # in checkpoint/: digests of its tensor files, checked before they are loaded
LOCK_FILE = ".capaboost.lock"


class RunFileError(ConfigError):
    """A file of a run is missing, truncated, corrupt or unwritable; the message names it and the fix."""


class RunLockedError(ConfigError):
    """Another live process holds the run folder's lock; the message names the folder and its pid."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | Path, fix: str, kind: type = dict) -> Any:
    """The parsed JSON file ``path``, or a :class:`RunFileError` naming it and ``fix`` (missing, torn, wrong type)."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RunFileError(f"{path} cannot be read ({err}); {fix}") from None
    if not isinstance(value, kind):
        raise RunFileError(f"{path} does not hold a JSON {kind.__name__} (it is truncated or was edited); {fix}")
    return value


def verify_checksums(folder: Path, digests: dict[str, str], fix: str) -> None:
    """Refuse a listed file that is missing or whose bytes changed since it was written (torn copy, bit rot)."""
    for name, expected in digests.items():
        path = folder / name
        if not path.is_file():
            raise RunFileError(f"{path} is missing; {fix}")
        if file_sha256(path) != expected:
            raise RunFileError(f"{path} is damaged (its SHA-256 differs from the one saved with it); {fix}")


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


def remove_stale_temps(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files/folders the atomic writers of a killed process left in ``folder``.

    Only safe while holding the folder's lock: a live writer's temporary has the same shape.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (and the folders' entries) to disk before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a fresh temporary directory with ``write(tmp)``, then swap it in for ``path``.

    A directory cannot be renamed over a non-empty one, so the old copy is moved aside first; a
    crash between the two renames leaves ``path.old``, which :func:`resolve_dir` falls back to.
    Whenever ``path`` is missing, ``path.old`` is the current copy and is kept until the new one is
    in place, so no crash point leaves neither.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    old = path.with_name(path.name + ".old")
    try:
        write(tmp)
        _fsync_tree(tmp)
        if path.exists():
            if old.exists():  # stale: a crash after the last swap, before its clean-up
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_dir(path: str | Path) -> Optional[Path]:
    """``path`` if complete, else the ``.old`` copy a crash mid-swap left behind, else None."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    return old if old.is_dir() else None


def save_checkpoint(
    out_dir: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    progress: dict[str, Any],
    best: Optional[dict[str, torch.Tensor]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> None:
    """Write ``out_dir/checkpoint`` atomically (main process only: the caller checks)."""

    def write(tmp: Path) -> None:
        torch.save({k: v.detach().cpu().clone() for k, v in trainable.items()}, tmp / "trainable.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if best is not None:
            torch.save(best, tmp / "best.pt")
        if extra:
            torch.save(extra, tmp / "extra.pt")
        (tmp / "progress.json").write_text(json.dumps(progress, indent=2))
        sums = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.pt"))}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))

    atomic_write_dir(out_dir / CHECKPOINT_DIR, write)


def load_checkpoint(out_dir: Path) -> Optional[dict[str, Any]]:
    """The last checkpoint of a run as a dict of its parts, or None if the run never saved one."""
    path = resolve_dir(Path(out_dir) / CHECKPOINT_DIR)
    if path is None:
        return None
    fix = (
        f"the checkpoint of {str(out_dir)!r} cannot be resumed: drop --resume and pass --overwrite to train the "
        "run again, or choose another --output-dir."
    )
    if (path / CHECKSUMS).exists():  # checkpoints written before the checksums load unchecked
        verify_checksums(path, read_json(path / CHECKSUMS, fix), fix)

    def load(name: str) -> Any:
        try:
            return torch.load(path / name, map_location="cpu", weights_only=False)  # own files
        except FileNotFoundError:
            raise RunFileError(f"{path / name} is missing; {fix}") from None
        except Exception as err:  # noqa: BLE001 - torch reports a torn file as RuntimeError, EOFError, pickle errors
            raise RunFileError(f"{path / name} is truncated or corrupt ({type(err).__name__}); {fix}") from None

    progress = read_json(path / "progress.json", fix)
    if not {"config", "global_step", "epoch"} <= set(progress):
        raise RunFileError(f"{path / 'progress.json'} lacks the run's counters (it was edited); {fix}")
    return {
        "trainable": load("trainable.pt"),
        "optimizer": load("optimizer.pt"),
        "scheduler": load("scheduler.pt"),
        "best": load("best.pt") if (path / "best.pt").exists() else None,
        "extra": load("extra.pt") if (path / "extra.pt").exists() else {},
        "progress": progress,
    }


MAX_DATA_FILES = 500  # as the tokenization cache's key (task_base.files_fingerprint)


def _data_files(data_dir: Optional[str], exclude: tuple[Path, ...]) -> dict[str, Path]:
    """The files under ``data_dir`` (or the file itself) by name relative to it, none inside ``exclude``."""
    if not data_dir:
        return {}
    root = Path(data_dir)
    if root.is_file():
        return {root.name: root}
    skip = [Path(e).resolve() for e in exclude]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(p.resolve().is_relative_to(e) for e in skip))
    return {str(p.relative_to(root)): p for p in files[:MAX_DATA_FILES]}


def data_fingerprint(data_dir: Optional[str], exclude: tuple[Path, ...] = ()) -> dict[str, dict[str, Any]]:
    """{file: size, mtime, SHA-256} of a run's data files, stored in the run folder to check a resume against."""
    result = {}
    for name, path in _data_files(data_dir, exclude).items():
        stat = path.stat()
        result[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(path)}
    return result


def data_changes(
    saved: dict[str, dict[str, Any]], data_dir: Optional[str], exclude: tuple[Path, ...] = ()
) -> list[str]:
    """What differs between ``saved`` (a :func:`data_fingerprint`) and the files now: ``["train.tsv (changed)", ...]``.

    Size and mtime unchanged counts as unchanged (no re-hashing); a new mtime is only a change if the
    bytes differ, so copying or touching the data does not block a resume.
    """
    now = _data_files(data_dir, exclude)
    changes = []
    for name in sorted(set(saved) | set(now)):
        if name not in now:
            changes.append(f"{name} (missing)")
        elif name not in saved:
            changes.append(f"{name} (new)")
        else:
            stat, old = now[name].stat(), saved[name]
            if stat.st_size != old.get("size"):
                changes.append(f"{name} (changed)")
            elif stat.st_mtime_ns != old.get("mtime_ns") and file_sha256(now[name]) != old.get("sha256"):
                changes.append(f"{name} (changed)")
    return changes
