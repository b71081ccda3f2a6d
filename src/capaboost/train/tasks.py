"""The runner's task table: task name -> :class:`~capaboost.train.task_base.Task` subclass.

Adding a task is one entry here (plus its Task subclass); the CLI's ``--task`` choices come from it.
"""

from __future__ import annotations

from ..data.glue import GLUE_TASKS
from .causal_lm import CausalLMTask
from .task_base import Task
from .task_image import ImageClassificationTask
from .task_qa import QuestionAnsweringTask
from .task_text import GenericTextTask, RottenTomatoesTask, TextClassificationTask

TASKS: dict[str, type[Task]] = {
    **{name: TextClassificationTask for name in GLUE_TASKS},
    "text": GenericTextTask,
    "rotten_tomatoes": RottenTomatoesTask,
    "squad": QuestionAnsweringTask,
    "squad_v2": QuestionAnsweringTask,
    "image": ImageClassificationTask,
    "causal-lm": CausalLMTask,
}

_ALL = tuple(TASKS)
# Options only some tasks read: option -> those tasks. Given to another task they are refused
# (run_config.refuse_unused), so a flag never silently does nothing. Options not listed here are read by
# every task (tests/test_options.py keeps this table and RunConfig's fields in step).
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "data_dir": tuple(t for t in _ALL if TASKS[t].needs_data_dir),  # rotten_tomatoes ships its data
    "max_seq_len": tuple(t for t in _ALL if t != "image"),
    "doc_stride": ("squad", "squad_v2"),
    **{name: ("text",) for name in (
        "text_column", "label_column", "text_pair_column", "drop_labels", "deduplicate", "is_regression")},
    "test_fraction": ("text", "rotten_tomatoes"),
    **{name: ("image",) for name in ("image_size", "train_size", "val_size")},
    "reader_kwargs": (*GLUE_TASKS, "text", "image"),
}
