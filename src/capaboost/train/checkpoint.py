"""Atomic files and training checkpoints: an interrupted run leaves either the old or the new state.

A checkpoint holds the trainable tensors, optimizer and scheduler states, method-specific state and
the progress counters (epoch, batches consumed, global step, validation history). No RNG state is
needed: the runner reseeds from (seed, step, rank) before every step and draws each epoch's order
from (seed, epoch), so resuming at a step boundary replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

CHECKPOINT_DIR = "checkpoint"


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

    atomic_write_dir(out_dir / CHECKPOINT_DIR, write)


def load_checkpoint(out_dir: Path) -> Optional[dict[str, Any]]:
    """The last checkpoint of a run as a dict of its parts, or None if the run never saved one."""
    path = resolve_dir(Path(out_dir) / CHECKPOINT_DIR)
    if path is None:
        return None
    load = lambda name: torch.load(path / name, map_location="cpu", weights_only=False)  # noqa: E731  own files
    return {
        "trainable": load("trainable.pt"),
        "optimizer": load("optimizer.pt"),
        "scheduler": load("scheduler.pt"),
        "best": load("best.pt") if (path / "best.pt").exists() else None,
        "extra": load("extra.pt") if (path / "extra.pt").exists() else {},
        "progress": json.loads((path / "progress.json").read_text()),
    }
