"""Metrics against independent hand computations, edge cases and the majority baseline."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import rankdata

from landscape.core.errors import DataError
from landscape.data.metrics import compute_metrics, majority_baseline
from landscape.data.tasks import get_task

RNG = np.random.default_rng(0)
GOLD2 = RNG.integers(0, 2, size=200)
PRED2 = np.where(RNG.random(200) < 0.7, GOLD2, 1 - GOLD2)


def counts(pred: np.ndarray, gold: np.ndarray, positive: int = 1) -> tuple[int, int, int, int]:
    tp = int(np.sum((pred == positive) & (gold == positive)))
    tn = int(np.sum((pred != positive) & (gold != positive)))
    fp = int(np.sum((pred == positive) & (gold != positive)))
    fn = int(np.sum((pred != positive) & (gold == positive)))
    return tp, tn, fp, fn


def hand_f1(pred: np.ndarray, gold: np.ndarray, positive: int) -> float:
    tp, _, fp, fn = counts(pred, gold, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def test_mcc_matches_confusion_matrix_formula():
    tp, tn, fp, fn = counts(PRED2, GOLD2)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    result = compute_metrics(get_task("cola"), PRED2, GOLD2)
    assert list(result) == ["mcc"]
    assert result["mcc"] == pytest.approx(expected, abs=1e-12)
    assert type(result["mcc"]) is float


def test_accuracy_and_positive_class_f1():
    tp, tn, fp, fn = counts(PRED2, GOLD2)
    for task in ("mrpc", "qqp"):
        result = compute_metrics(get_task(task), PRED2, GOLD2)
        assert result["accuracy"] == pytest.approx((tp + tn) / len(GOLD2), abs=1e-12)
        precision, recall = tp / (tp + fp), tp / (tp + fn)
        assert result["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)
        assert all(type(v) is float and 0.0 <= v <= 1.0 for v in result.values())


def test_f1_uses_class_one_as_positive():
    gold = np.array([1, 1, 0, 0, 0])
    pred = np.array([1, 0, 0, 0, 1])
    f1 = compute_metrics(get_task("mrpc"), pred, gold)["f1"]
    assert f1 == pytest.approx(hand_f1(pred, gold, positive=1)) == pytest.approx(0.5)  # tp=1 fp=1 fn=1
    # Class 0 as positive would give tp=2 fp=1 fn=1 -> 2/3.
    assert f1 != pytest.approx(hand_f1(pred, gold, positive=0))


def test_cb_macro_f1_is_mean_of_per_class_f1():
    gold = RNG.integers(0, 3, size=150)
    pred = np.where(RNG.random(150) < 0.6, gold, RNG.integers(0, 3, size=150))
    result = compute_metrics(get_task("cb"), pred, gold)
    assert result["accuracy"] == pytest.approx(np.mean(pred == gold), abs=1e-12)
    expected = np.mean([hand_f1(pred, gold, c) for c in range(3)])
    assert result["macro_f1"] == pytest.approx(expected, abs=1e-12)


def test_pearson_and_spearman_against_numpy():
    gold = np.round(RNG.uniform(0, 5, size=300), 1)  # rounding creates ties for the ranks
    pred = gold + RNG.normal(0, 1.0, size=300)
    result = compute_metrics(get_task("stsb"), pred, gold)
    assert result["pearson"] == pytest.approx(np.corrcoef(pred, gold)[0, 1], abs=1e-10)
    spearman = np.corrcoef(rankdata(pred), rankdata(gold))[0, 1]
    assert result["spearman"] == pytest.approx(spearman, abs=1e-10)
    assert list(result) == ["pearson", "spearman"]


def test_perfect_predictions_score_one():
    gold = np.array([0, 1, 1, 0, 1])
    for task in ("cola", "mrpc", "sst2", "rte"):
        assert all(v == pytest.approx(1.0) for v in compute_metrics(get_task(task), gold, gold).values())
    scores = np.array([0.0, 1.5, 2.0, 4.5])
    assert compute_metrics(get_task("stsb"), scores * 2, scores) == pytest.approx({"pearson": 1.0, "spearman": 1.0})


def test_constant_predictions_are_quiet():
    gold = np.array([0.5, 1.0, 4.0, 2.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = compute_metrics(get_task("stsb"), np.full(4, 2.0), gold)
        mcc = compute_metrics(get_task("cola"), np.ones(4, dtype=int), np.array([0, 1, 1, 0]))["mcc"]
        f1 = compute_metrics(get_task("mrpc"), np.zeros(3, dtype=int), np.zeros(3, dtype=int))["f1"]
    assert math.isnan(result["pearson"]) and math.isnan(result["spearman"])
    assert mcc == 0.0
    assert f1 == 0.0


def test_float_class_indices_are_accepted():
    gold = np.array([0, 1, 2])
    result = compute_metrics(get_task("cb"), np.array([0.0, 1.0, 1.0]), gold)
    assert result["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("pred", "gold", "message"),
    [
        (np.array([0, 1]), np.array([0, 1, 1]), "2 predictions for 3 labels"),
        (np.zeros((3, 2)), np.array([0, 1, 1]), "1-D"),
        (np.array([0, 2]), np.array([0, 1]), "class index 2"),
        (np.array([0.5, 1.0]), np.array([0, 1]), "non-integer"),
        (np.array([], dtype=int), np.array([], dtype=int), "no examples"),
    ],
)
def test_bad_inputs(pred, gold, message):
    with pytest.raises(DataError, match=message):
        compute_metrics(get_task("mrpc"), pred, gold)


def test_majority_baseline_classification():
    train = np.array([2, 2, 0, 2, 1, 0])
    dev = np.array([2, 0, 1, 2, 2])
    result = majority_baseline(get_task("cb"), train, dev)
    assert result["accuracy"] == pytest.approx(3 / 5)  # always predicts class 2
    assert result["macro_f1"] == pytest.approx(hand_f1(np.full(5, 2), dev, 2) / 3)


def test_majority_baseline_tie_and_mcc():
    result = majority_baseline(get_task("sst2"), np.array([1, 0, 1, 0]), np.array([0, 0, 1]))
    assert result == {"accuracy": pytest.approx(2 / 3)}  # tie broken towards class 0
    assert majority_baseline(get_task("cola"), np.array([1, 1, 0]), np.array([0, 1, 1])) == {"mcc": 0.0}


def test_majority_baseline_regression_constant_gives_quiet_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = majority_baseline(get_task("stsb"), np.array([1.0, 2.0, 4.5]), np.array([0.0, 5.0, 2.0]))
    assert set(result) == {"pearson", "spearman"}
    assert all(math.isnan(v) for v in result.values())


def test_majority_baseline_needs_train_labels():
    with pytest.raises(DataError, match="no train labels"):
        majority_baseline(get_task("rte"), np.array([], dtype=int), np.array([0, 1]))
