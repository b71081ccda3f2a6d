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
