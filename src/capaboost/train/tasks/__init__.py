"""The runner's task classes: task name -> :class:`~capaboost.train.tasks.base.Task` subclass.

Every fact about a task name (its family, metrics, options, help) is a row of the task table,
``capaboost.data.task_specs.TASK_SPECS``; here each family gets its runner class. Adding a task of an
existing family is one row there; a new family is one row there plus one Task subclass here.
"""

from __future__ import annotations

from ...data.task_specs import TASK_SPECS
from .causal_lm import CausalLMTask
from .base import Task
from .image import ImageClassificationTask
from .qa import QuestionAnsweringTask
from .text import GenericTextTask, RottenTomatoesTask, TextClassificationTask

# TaskSpec.family -> the runner class that loads, encodes and scores that family's tasks.
TASK_CLASSES: dict[str, type[Task]] = {
    "glue": TextClassificationTask,
    "text": GenericTextTask,
    "rotten_tomatoes": RottenTomatoesTask,
    "squad": QuestionAnsweringTask,
    "image": ImageClassificationTask,
    "causal_lm": CausalLMTask,
}

# Every task name of the table, in its order (the CLI's --task choices).
TASKS: dict[str, type[Task]] = {name: TASK_CLASSES[spec.family] for name, spec in TASK_SPECS.items()}
