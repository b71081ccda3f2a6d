"""Checkpoints and every other file a run writes: written by one process, atomically, never lost to a crash.

One story for the runner (``capaboost train``) and for your own DDP script (``capaboost.distributed``):

* :func:`on_main_process` runs a write on rank 0 only; a failure there raises on every rank (the
  all-reduce of the failure flag is also the barrier after the write, so no rank waits for ever).
* :func:`atomic_replace` writes into a hidden temporary beside the target and renames it into place; a
  folder is swapped through ``NAME.old``, which :func:`resolve_dir` falls back to, so a crash at any
  point leaves the previous copy or the new one, never neither and never a torn one.
* A checkpoint is a folder of parts (:func:`save_checkpoint`): one ``torch.save`` file per part, the
  counters in ``progress.json`` and the SHA-256 of every part in ``sha256.json``, checked before a part
  is loaded (a torn or damaged file is named instead of loading wrong values).

No RNG state is saved: the runner reseeds from (seed, step, rank) before every step and draws each
epoch's order from (seed, epoch), so resuming at a step boundary replays what an uninterrupted run does.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .ranks import all_ok, rank_and_world

CHECKSUMS = "sha256.json"  # in a checkpoint folder: digests of its part files, checked before they are loaded
PROGRESS = "progress.json"


class RunFileError(ValueError):
    """A file of a run is missing, truncated, corrupt or unwritable; the message names it and the fix."""


# ---------------------------------------------------------------- the rank-0 guard


def on_main_process(write: Callable[[], Any], what: str, group: Optional[Any] = None) -> None:
    """Run ``write`` on rank 0 only (call it on every rank); if it fails, every rank raises.

    Without a process group this is just ``write()``.
    """
    error: Optional[BaseException] = None
    if rank_and_world(group)[0] == 0:
        try:
            write()
        except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
            error = err
    if not all_ok(error is None, group):
        if error is not None:
            raise error
        raise RuntimeError(f"the main process failed to write {what}; the previous copy is kept (see its log).")


# ---------------------------------------------------------------- atomic files and folders


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in blocks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    """Flush a file, or every file under a folder (and the folders' entries), to disk before it is renamed."""
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_replace(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` creates a file or a folder at the fresh path ``tmp`` beside ``path``; it then replaces ``path``.

    A folder cannot be renamed over a non-empty one, so the old copy is moved aside to ``path.old`` first;
    a crash between the two renames leaves ``path.old``, which :func:`resolve_dir` falls back to. Whenever
    ``path`` is missing, ``path.old`` is the current copy and is kept until the new one is in place. A
    failed ``write`` leaves ``path`` as it was and no temporary (``remove_stale_temps`` clears a killed one's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    old = path.with_name(path.name + ".old")
    try:
        write(tmp)
        _fsync(tmp)
        if path.is_dir():
            if old.exists():  # stale: a crash after the last swap, before its clean-up
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        _remove(tmp)
        raise
    return path


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """:func:`atomic_replace` for a folder: ``write(tmp)`` fills a fresh, empty temporary folder."""

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        write(tmp)

    return atomic_replace(path, fill)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_replace(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def resolve_dir(path: str | Path) -> Optional[Path]:
    """``path`` if complete, else the ``.old`` copy a crash mid-swap left behind, else None."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.with_name(path.name + ".old")
    return old if old.is_dir() else None


def remove_stale_temps(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files/folders the atomic writers of a killed process left in ``folder``.

    Only safe while no other process writes there (the runner holds the folder's lock): a live writer's
    temporary has the same shape.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            _remove(tmp)
            removed.append(tmp)
    return removed


# ---------------------------------------------------------------- reading back


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


# ---------------------------------------------------------------- the checkpoint folder


def save_checkpoint(path: str | Path, parts: Callable[[], dict[str, Any]], progress: dict[str, Any],
                    group: Optional[Any] = None) -> Path:
    """Write the checkpoint folder ``path`` from rank 0, atomically (call it on every rank).

    ``parts()``, called on rank 0 only: name -> anything ``torch.save`` takes (a part that is None is left
    out); ``progress``: the JSON counters.
    """

    def write(tmp: Path) -> None:
        for name, value in parts().items():
            if value is not None:
                torch.save(value, tmp / f"{name}.pt")
        (tmp / PROGRESS).write_text(json.dumps(progress, indent=2))
        sums = {p.name: file_sha256(p) for p in sorted(tmp.glob("*.pt"))}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=2))

    on_main_process(lambda: atomic_write_dir(path, write), Path(path).name, group)
    return Path(path)


def load_checkpoint(path: str | Path, fix: str, required: tuple[str, ...] = ()) -> Optional[dict[str, Any]]:
    """The checkpoint folder ``path`` (or the ``.old`` copy a crash left) as ``{part: value, "progress": {...}}``;
    None when neither exists. Parts in ``required`` must be there; a missing optional part is None.

    ``fix`` is what an error message tells the user to do.
    """
    folder = resolve_dir(path)
    if folder is None:
        return None
    if (folder / CHECKSUMS).exists():  # checkpoints written before the checksums load unchecked
        verify_checksums(folder, read_json(folder / CHECKSUMS, fix), fix)

    def load(name: str) -> Any:
        file = folder / f"{name}.pt"
        if name not in required and not file.exists():
            return None
        try:
            return torch.load(file, map_location="cpu", weights_only=False)  # own files
        except FileNotFoundError:
            raise RunFileError(f"{file} is missing; {fix}") from None
        except Exception as err:  # noqa: BLE001 - torch reports a torn file as RuntimeError, EOFError, pickle errors
            raise RunFileError(f"{file} is truncated or corrupt ({type(err).__name__}); {fix}") from None

    names = set(required) | {p.stem for p in folder.glob("*.pt")}
    return {**{name: load(name) for name in sorted(names)}, "progress": read_json(folder / PROGRESS, fix)}
