"""The run's checkpoint: ``OUTPUT_DIR/checkpoint``, in the one format of :mod:`capaboost.checkpoint`.

Parts: the trainable tensors, optimizer and scheduler states, the best model so far (``best``) and
the method's own state (``extra``, e.g. AdaLoRA's importance scores); ``progress.json`` holds the
counters (epoch, batches consumed, global step, validation history) and the options of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from ... import checkpoint
from ...checkpoint import RunFileError

CHECKPOINT_DIR = "checkpoint"
REQUIRED = ("trainable", "optimizer", "scheduler")


def save_checkpoint(out_dir: Path, parts: Callable[[], dict[str, Any]], progress: dict[str, Any]) -> None:
    """Write ``out_dir/checkpoint`` from the main process, atomically (call it on every process); ``parts()``
    runs on the main process only."""
    checkpoint.save_checkpoint(Path(out_dir) / CHECKPOINT_DIR, parts, progress)


def load_checkpoint(out_dir: Path) -> Optional[dict[str, Any]]:
    """The last checkpoint of a run as a dict of its parts (``extra`` {} when absent), or None if it never saved one."""
    fix = (
        f"the checkpoint of {str(out_dir)!r} cannot be resumed: drop --resume and pass --overwrite to train the "
        "run again, or choose another --output-dir."
    )
    parts = checkpoint.load_checkpoint(Path(out_dir) / CHECKPOINT_DIR, fix, REQUIRED)
    if parts is None:
        return None
    if not {"config", "global_step", "epoch"} <= set(parts["progress"]):
        raise RunFileError(f"{Path(out_dir) / CHECKPOINT_DIR / 'progress.json'} lacks the run's counters (it was "
                           f"edited); {fix}")
    return {"best": None, **parts, "extra": parts.get("extra") or {}}
