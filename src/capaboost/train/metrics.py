"""Evaluation metrics for GLUE, generic classification and SQuAD.

Scales follow the Hugging Face ``evaluate`` conventions, since the rest of
the stack is Hugging Face: GLUE-style metrics are fractions in [0, 1] (as
scikit-learn returns them), SQuAD ``exact_match``/``f1`` are percentages in
[0, 100] (as the official SQuAD scripts print them).
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


class TaskMetrics(NamedTuple):
    """A task's metric names, the one that selects and ranks, and the scale its scores come in."""

    names: list[str]
    main: str
    percent: bool = False  # the task's metrics come in [0, 100] already (the official SQuAD scripts' convention)


# metric_names, main_metric per task. MRPC/QQP report accuracy and F1 like the
# GLUE leaderboard; we select on accuracy, the number ProPETL/CapaBoost tables use.
TASK_METRICS: dict[str, TaskMetrics] = {
    "cola": TaskMetrics(["matthews_correlation"], "matthews_correlation"),
    "sst2": TaskMetrics(["accuracy"], "accuracy"),
    "mrpc": TaskMetrics(["accuracy", "f1"], "accuracy"),
    "qqp": TaskMetrics(["accuracy", "f1"], "accuracy"),
    "stsb": TaskMetrics(["pearson", "spearman", "combined"], "combined"),
    "mnli": TaskMetrics(["accuracy"], "accuracy"),
    "qnli": TaskMetrics(["accuracy"], "accuracy"),
    "rte": TaskMetrics(["accuracy"], "accuracy"),
    "text": TaskMetrics(["accuracy", "macro_f1"], "accuracy"),
    "image": TaskMetrics(["accuracy"], "accuracy"),
    "squad": TaskMetrics(["exact_match", "f1"], "f1", percent=True),
    "squad_v2": TaskMetrics(["exact_match", "f1"], "f1", percent=True),
}


@dataclass(frozen=True)
class MetricFacts:
    """What a report needs to know about a metric besides its value."""

    fraction: bool  # in [0, 1] (correlations [-1, 1]): reports show it x100 like the paper's tables
    greater_is_better: bool = True


# The one table of per-metric facts: reports (capaboost.train.sweep) read their scaling and direction here.
# A metric missing from it is shown as it is: never scaled on a guess.
METRIC_FACTS: dict[str, MetricFacts] = {
    **{name: MetricFacts(fraction=True) for name in (
        "accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearman", "combined", "exact_match")},
    "loss": MetricFacts(fraction=False, greater_is_better=False),  # causal-lm: mean token NLL
    "perplexity": MetricFacts(fraction=False, greater_is_better=False),
}


def report_scale(task: str, metric: str) -> float:
    """Factor a report multiplies ``metric`` of ``task`` by: 100 for fractions, 1 for everything else."""
    facts = METRIC_FACTS.get(metric)
    known = TASK_METRICS.get(task.lower())
    return 100.0 if facts is not None and facts.fraction and not (known and known.percent) else 1.0


def greater_is_better(metric: str) -> bool:
    """Direction of ``metric`` (unknown metrics: higher is better, as for scores)."""
    facts = METRIC_FACTS.get(metric)
    return True if facts is None else facts.greater_is_better


CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearman", "combined")
SQUAD_METRICS = ("exact_match", "f1")


def metrics_for_task(task: str) -> tuple[list[str], str]:
    """(metric_names, main_metric) for a task name."""
    try:
        names, main, _ = TASK_METRICS[task.lower()]
    except KeyError:
        raise ValueError(f"no metrics defined for task {task!r}; known: {sorted(TASK_METRICS)}") from None
    return list(names), main


def compute_metrics(
    task_or_metric_names: str | Sequence[str],
    predictions: object,
    references: object,
) -> dict[str, float]:
    """Compute the named metrics (or a task's metrics) on predictions vs references.

    Classification predictions may be labels (N,) or logits (N, C) — logits
    are argmax-ed so the runner can pass model outputs directly. Regression
    predictions may be (N,) or (N, 1). For ``squad``/``squad_v2`` pass
    ``{id: predicted_text}`` and ``{id: [gold texts]}`` (an empty list means
    unanswerable).
    """
    if isinstance(task_or_metric_names, str):
        task = task_or_metric_names.lower()
        if task in ("squad", "squad_v2"):
            return squad_metrics(predictions, references)  # type: ignore[arg-type]
        names, _ = metrics_for_task(task)
    else:
        names = list(task_or_metric_names)
        if isinstance(predictions, Mapping):
            scores = squad_metrics(predictions, references)  # type: ignore[arg-type]
            bad = [n for n in names if n not in scores]
            if bad:
                raise ValueError(f"unknown SQuAD metric(s) {bad}; available: {sorted(scores)}")
            return {n: scores[n] for n in names}
    unknown = [n for n in names if n not in CLASSIFICATION_METRICS + REGRESSION_METRICS]
    if unknown:
        raise ValueError(
            f"unknown metric(s) {unknown}; expected from {list(CLASSIFICATION_METRICS + REGRESSION_METRICS)}"
            " (exact_match needs {id: text} predictions)"
        )
    regression = any(n in REGRESSION_METRICS for n in names)
    y_pred, y_true = _as_arrays(predictions, references, regression)
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(y_true, y_pred))
        elif name == "f1":
            # Binary F1 of the positive class (paraphrase / duplicate = 1), as GLUE reports.
            out[name] = float(f1_score(y_true, y_pred, average="binary", pos_label=1, zero_division=0))
        elif name == "macro_f1":
            out[name] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(y_true, y_pred))
        elif name == "pearson":
            out[name] = _correlation(pearsonr, y_pred, y_true)
        elif name == "spearman":
            out[name] = _correlation(spearmanr, y_pred, y_true)
        elif name == "combined":
            p = out.get("pearson", _correlation(pearsonr, y_pred, y_true))
            s = out.get("spearman", _correlation(spearmanr, y_pred, y_true))
            out[name] = (p + s) / 2.0
    return out


def _as_arrays(predictions: object, references: object, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    y_pred = np.asarray(predictions)
    y_true = np.asarray(references)
    if regression:
        y_pred = y_pred.astype(np.float64).reshape(len(y_pred), -1)
        if y_pred.shape[1] != 1:
            raise ValueError(f"regression predictions must be (N,) or (N, 1), got {np.asarray(predictions).shape}")
        y_pred = y_pred[:, 0]
        y_true = y_true.astype(np.float64)
    elif y_pred.ndim == 2:
        y_pred = y_pred.argmax(axis=-1)
    if y_pred.shape[0] != y_true.shape[0]:
        raise ValueError(f"{y_pred.shape[0]} predictions but {y_true.shape[0]} references")
    if y_true.shape[0] == 0:
        raise ValueError("cannot compute metrics on zero examples")
    return y_pred, y_true


def _correlation(fn, y_pred: np.ndarray, y_true: np.ndarray) -> float:
    # Constant predictions make the correlation undefined (NaN); report 0 so
    # "best checkpoint" comparisons stay well defined early in training.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(y_pred, y_true)[0])
    return 0.0 if np.isnan(value) else value


# ---------------------------------------------------------------- SQuAD
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Official SQuAD normalization: lower-case, drop punctuation and articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, gold: str) -> int:
    """1 if the normalized strings match exactly."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1; an empty side scores 1 only if both are empty (SQuAD v2 rule)."""
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD v1.1/v2.0 exact match and F1 in percent, max over gold answers.

    Gold answers that normalize to "" are dropped and an example with none
    left is unanswerable: only the empty prediction scores on it (v2 rule;
    v1.1 data never has such examples, so one function serves both). When
    unanswerable examples exist, ``has_answer_*``/``no_answer_*`` breakdowns
    are added as in the official v2 script.
    """
    missing = [qid for qid in references if qid not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} question ids have no prediction, e.g. {missing[:3]}")
    if not references:
        raise ValueError("cannot compute metrics on zero examples")
    em: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_ans: dict[str, bool] = {}
    for qid, golds in references.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        has_ans[qid] = golds != [""]
        pred = predictions[qid]
        em[qid] = max(squad_exact(pred, g) for g in golds)
        f1[qid] = max(squad_f1(pred, g) for g in golds)
    out = {"exact_match": 100.0 * np.mean(list(em.values())), "f1": 100.0 * np.mean(list(f1.values()))}
    if not all(has_ans.values()):
        for key, flag in (("has_answer", True), ("no_answer", False)):
            ids = [q for q, h in has_ans.items() if h == flag]
            if ids:
                out[f"{key}_exact_match"] = 100.0 * np.mean([em[q] for q in ids])
                out[f"{key}_f1"] = 100.0 * np.mean([f1[q] for q in ids])
                out[f"{key}_total"] = float(len(ids))
    return {k: float(v) for k, v in out.items()}
