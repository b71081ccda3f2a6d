"""Task loaders for the fine-tuning runner: one entry point, one reader per format.

``load_task`` is the only function the runner needs; the per-format modules
stay importable for custom layouts. Every loader applies a split protocol
(``capaboost.data.protocols``) so that all tasks come back as
train/validation/test with a documented selection rule. Which reader a task
name uses, and which metrics it reports, is the task table's
(``capaboost.data.task_specs``). Nothing here imports ``capaboost.train``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capaboost.data.base import Example, TaskData
from capaboost.data.errors import DataError
from capaboost.data.glue import load_glue
from capaboost.data.image import ImageTaskData, load_image_task
from capaboost.data.squad import SquadData, SquadExample, load_squad
from capaboost.data.task_specs import TASK_SPECS
from capaboost.data.text import load_rotten_tomatoes, load_text_task

# The task families load_task reads (rotten_tomatoes and causal-lm have loaders of their own signature:
# load_rotten_tomatoes, capaboost.data.causal_lm.load_causal_lm).
LOAD_TASK_FAMILIES = ("glue", "text", "squad", "image")

__all__ = [
    "DataError",
    "Example",
    "ImageTaskData",
    "SquadData",
    "SquadExample",
    "TaskData",
    "load_rotten_tomatoes",
    "load_task",
]


def load_task(
    task: str,
    data_dir: str | Path,
    protocol: str = "dev",
    seed: int = 0,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    **reader_kwargs: Any,
) -> TaskData | SquadData | ImageTaskData:
    """Load ``task`` from ``data_dir`` and split it by ``protocol`` ("dev" or "propetl").

    ``reader_kwargs`` go to the format's loader: ``skip_malformed`` for GLUE;
    the column/label options of ``load_text_task`` for ``text``;
    ``train_size``/``val_size``/``image_size`` for ``image`` (which always
    uses the VTAB-1k split and ignores ``protocol``).
    """
    key = task.lower()
    spec = TASK_SPECS.get(key)
    if spec is None or spec.family not in LOAD_TASK_FAMILIES:
        allowed = [name for name, s in TASK_SPECS.items() if s.family in LOAD_TASK_FAMILIES]
        raise ValueError(f"unknown task {task!r}; allowed tasks: {allowed}")
    common = dict(seed=seed, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
    if spec.family == "glue":
        return load_glue(key, data_dir, protocol=protocol, **common, **reader_kwargs)
    if spec.family == "text":
        return load_text_task(data_dir, protocol=protocol, **common, **reader_kwargs)
    if spec.family == "squad":
        return load_squad(data_dir, version_2=key == "squad_v2", protocol=protocol, **common, **reader_kwargs)
    return load_image_task(data_dir, **common, **reader_kwargs)
