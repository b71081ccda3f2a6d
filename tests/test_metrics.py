"""Metrics against known values (sklearn docs examples, hand-checked SQuAD cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from capaboost.data.metrics import compute_metrics, normalize_answer, squad_f1, squad_metrics
from capaboost.data.task_specs import metrics_for_task


def test_matthews_sklearn_example() -> None:
    # sklearn docs: matthews_corrcoef([+1, +1, +1, -1], [+1, -1, +1, +1]) == -0.33...
    out = compute_metrics(["matthews_correlation"], [1, 0, 1, 1], [1, 1, 1, 0])
    assert out == pytest.approx({"matthews_correlation": -1 / 3})


def test_cola_task_name_and_logits() -> None:
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0], [0.0, 1.0]])  # argmax 1, 0, 1, 1
    assert compute_metrics("cola", logits, [1, 1, 1, 0]) == pytest.approx({"matthews_correlation": -1 / 3})
    assert compute_metrics("CoLA", [0, 0, 0, 0], [1, 1, 0, 0]) == {"matthews_correlation": 0.0}


def test_accuracy_and_binary_f1() -> None:
    out = compute_metrics("mrpc", [1, 0, 1, 0, 1], [1, 1, 0, 0, 1])
    # acc 3/5; positives: tp=2, fp=1, fn=1 -> f1 = 2/3
    assert out == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})


def test_macro_f1_sklearn_example() -> None:
    # sklearn docs f1_score example: macro 0.2666...
    out = compute_metrics(["macro_f1", "accuracy"], [0, 2, 1, 0, 0, 1], [0, 1, 2, 0, 1, 2])
    assert out == pytest.approx({"macro_f1": 0.26666666, "accuracy": 1 / 3})


def test_stsb_correlations() -> None:
    pred = np.array([[1.0], [2.0], [3.0], [4.0]])  # (N, 1) regression head output
    ref = [1.0, 4.0, 9.0, 16.0]
    out = compute_metrics("stsb", pred, ref)
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] == pytest.approx(0.9843740386)
    assert out["combined"] == pytest.approx((out["pearson"] + 1.0) / 2)


def test_constant_regression_prediction_scores_zero_not_nan() -> None:
    out = compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert out == {"pearson": 0.0, "spearman": 0.0, "combined": 0.0}


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        compute_metrics("sst2", [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metrics(["bleu"], [1], [1])
    with pytest.raises(ValueError, match="no metrics defined"):
        metrics_for_task("wnli")
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics("sst2", [], [])


def test_squad_normalization() -> None:
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_squad_v1_hand_checked() -> None:
    preds = {"q1": "the Denver Broncos", "q2": "Denver Broncos won", "q3": "Carolina"}
    refs = {"q1": ["Denver Broncos", "Broncos"], "q2": ["Denver Broncos"], "q3": ["Denver"]}
    out = compute_metrics("squad", preds, refs)
    # q1 exact; q2 F1 = 2 * (2/3 * 1) / (2/3 + 1) = 0.8; q3 nothing
    assert out == pytest.approx({"exact_match": 100 / 3, "f1": 100 * 1.8 / 3})
    assert squad_f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)


def test_squad_max_over_gold_answers() -> None:
    out = squad_metrics({"q": "Broncos"}, {"q": ["Denver Broncos", "broncos."]})
    assert out == {"exact_match": 100.0, "f1": 100.0}


def test_squad_v2_no_answer_rules() -> None:
    preds = {"a": "", "b": "something", "c": "", "d": "Paris"}
    refs = {"a": [], "b": [], "c": ["Paris"], "d": ["Paris"]}
    out = compute_metrics("squad_v2", preds, refs)
    assert out["exact_match"] == 50.0 and out["f1"] == 50.0
    assert out["no_answer_exact_match"] == 50.0 and out["has_answer_exact_match"] == 50.0
    assert out["no_answer_total"] == 2.0


def test_squad_names_and_missing_prediction() -> None:
    out = compute_metrics(["exact_match"], {"q": "x"}, {"q": ["x"]})
    assert out == {"exact_match": 100.0}
    with pytest.raises(ValueError, match="no prediction"):
        squad_metrics({}, {"q": ["x"]})
    assert not math.isnan(squad_metrics({"q": ""}, {"q": [""]})["f1"])
