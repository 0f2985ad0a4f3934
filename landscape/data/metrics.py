"""Task metrics (GLUE / SuperGLUE conventions) and the majority-class baseline.

All values are plain floats on a 0..1 scale (correlations in -1..1), never percentages.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from landscape.core.errors import DataError
from landscape.data.tasks import TaskSpec


def _mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(matthews_corrcoef(gold, pred))


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(accuracy_score(gold, pred))


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    # MRPC / QQP report F1 of the positive class (label "1" = paraphrase / duplicate).
    return float(f1_score(gold, pred, pos_label=1, average="binary", zero_division=0))


def _macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    # Unweighted mean over the classes present in gold or predictions (the usual CB convention).
    return float(f1_score(gold, pred, average="macro", zero_division=0))


def _constant(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


def _pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    # Undefined for a constant input; return NaN quietly instead of scipy's ConstantInputWarning.
    if len(pred) < 2 or _constant(pred) or _constant(gold):
        return math.nan
    return float(pearsonr(pred, gold).statistic)


def _spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    if len(pred) < 2 or _constant(pred) or _constant(gold):
        return math.nan
    return float(spearmanr(pred, gold).statistic)


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mcc": _mcc,
    "accuracy": _accuracy,
    "f1": _f1,
    "macro_f1": _macro_f1,
    "pearson": _pearson,
    "spearman": _spearman,
}


def compute_metrics(task: TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score ``predictions`` (class indices, or float scores for regression) against ``labels``.

    Returns ``{metric name: value}`` for every name in ``task.metric_names``.
    """
    pred = np.asarray(predictions)
    gold = np.asarray(labels)
    if pred.ndim != 1 or gold.ndim != 1:
        raise DataError(
            f"{task.name}: predictions and labels must be 1-D (take argmax of logits first), "
            f"got shapes {pred.shape} and {gold.shape}"
        )
    if len(pred) != len(gold):
        raise DataError(f"{task.name}: {len(pred)} predictions for {len(gold)} labels; expected equal counts")
    if len(gold) == 0:
        raise DataError(f"{task.name}: no examples to score; expected at least one prediction")
    if task.is_regression:
        pred, gold = pred.astype(np.float64), gold.astype(np.float64)
    else:
        pred, gold = _as_classes(task, pred, "predictions"), _as_classes(task, gold, "labels")
    return {name: _METRICS[name](pred, gold) for name in task.metric_names}


def _as_classes(task: TaskSpec, values: np.ndarray, what: str) -> np.ndarray:
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise DataError(f"{task.name}: {what} must be class indices, got non-integer values")
    elif values.dtype.kind not in "iub":
        raise DataError(f"{task.name}: {what} must be class indices, got dtype {values.dtype}")
    classes = values.astype(np.int64)
    bad = classes[(classes < 0) | (classes >= task.num_labels)]
    if bad.size:
        raise DataError(
            f"{task.name}: {what} hold class index {int(bad[0])}; expected 0..{task.num_labels - 1} "
            f"({', '.join(task.label_names)})"
        )
    return classes


def majority_baseline(task: TaskSpec, train_labels: np.ndarray, dev_labels: np.ndarray) -> dict[str, float]:
    """Metrics of predicting the most frequent train class (ties: lowest index), or the train mean score.

    Correlations of the constant regression prediction are NaN.
    """
    train = np.asarray(train_labels)
    dev = np.asarray(dev_labels)
    if train.size == 0:
        raise DataError(f"{task.name}: no train labels; the majority baseline needs at least one")
    if task.is_regression:
        constant: float | int = float(np.mean(train.astype(np.float64)))
    else:
        constant = int(np.argmax(np.bincount(_as_classes(task, train, "train labels"), minlength=task.num_labels)))
    predictions = np.full(len(dev), constant, dtype=np.float64 if task.is_regression else np.int64)
    return compute_metrics(task, predictions, dev)
