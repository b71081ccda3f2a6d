"""Computing evaluation metrics for GLUE, generic classification and SQuAD (which task reports which
metrics, and how reports scale them, is the task table's: ``capaboost.data.task_specs``).

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

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from capaboost.data.task_specs import metrics_for_task, task_spec

CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "matthews_correlation")
REGRESSION_METRICS = ("pearson", "spearman", "combined")


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
        names, _ = metrics_for_task(task_or_metric_names)  # the task table's names (capaboost.data.task_specs)
        if task_spec(task_or_metric_names).family == "squad":
            return squad_metrics(predictions, references)  # type: ignore[arg-type]
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
