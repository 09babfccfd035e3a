"""Classification metrics: the numbers in ``results.json``, ``metrics.jsonl`` and the report.

Every metrics object of the contract has ``loss``, ``accuracy``, ``f1`` (weighted by support, as the
seed project), ``f1_macro``, ``precision`` and ``recall`` (weighted), and ``roc_auc``. Predictions are
the arg-max of the class probabilities. The definitions are scikit-learn's (``f1_score``,
``precision_score``, ``recall_score`` with ``zero_division=0``: a class never predicted counts as
precision 0 instead of a warning and NaN; ``roc_auc_score``), computed here from the confusion matrix
and from ranks in numpy; tests/test_metrics.py pins them against scikit-learn. scikit-learn is not
imported: it cost every process that evaluates (a search's trials, a server) about 0.7 s and 100 MiB.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["binary_auc", "compute_metrics", "confusion", "f1_weighted", "per_class", "roc_auc", "roc_curve"]


def _confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows the true class, columns the predicted one."""
    cells = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return cells.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (scikit-learn's ``zero_division=0``)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def f1_weighted(confusion: Any) -> np.ndarray:
    """The support-weighted F1 of confusion matrices ``(..., C, C)`` (rows: true class, columns: predicted),
    as scikit-learn's ``f1_score(average="weighted", zero_division=0)`` on the examples they count:

        F1 = Σ_c (s_c / n) · 2 tp_c / (s_c + p_c)

    with ``s_c`` the row sums (support), ``p_c`` the column sums (predicted), ``tp_c`` the diagonal; a class
    with ``s_c + p_c = 0`` scores 0 (it weighs 0 anyway). Returns the leading shape ``(...)``.
    """
    m = np.asarray(confusion, dtype=np.float64)
    support, predicted = m.sum(axis=-1), m.sum(axis=-2)             # (..., C) each
    per_class = _ratio(2 * np.diagonal(m, axis1=-2, axis2=-1), support + predicted)
    return (support * per_class).sum(axis=-1) / support.sum(axis=-1)


def compute_metrics(labels: np.ndarray, probs: np.ndarray, loss: float | None = None) -> dict[str, float]:
    """Metrics of one evaluation.

    Args:
        labels: (N,) true class ids in ``[0, C)``.
        probs: (N, C) class probabilities (or any scores whose arg-max is the prediction).
        loss: the mean loss over the same examples; reported as ``loss`` when given.

    Returns:
        ``{"loss"?, "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"}`` as plain floats.
        ``f1``, ``precision`` and ``recall`` are averaged over classes weighted by support;
        ``f1_macro`` is the unweighted mean over the classes that occur in ``labels`` or in the
        predictions (scikit-learn's default class set). ``roc_auc`` is described in :func:`roc_auc`
        and may be NaN.

    Raises:
        ValueError: the shapes do not match, N is 0, or a label is outside ``[0, C)`` (a caller bug, not
        user input).
    """
    labels, probs = _check(labels, probs)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    m = _confusion(labels, probs.argmax(axis=1), probs.shape[1])
    support, predicted, tp = m.sum(axis=1), m.sum(axis=0), np.diagonal(m)
    seen = (support + predicted) > 0                                 # scikit-learn's labels: y_true ∪ y_pred
    f1 = _ratio(2 * tp, support + predicted)
    out: dict[str, float] = {}
    if loss is not None:
        out["loss"] = float(loss)
    out["accuracy"] = float(tp.sum() / len(labels))
    out["f1"] = float(f1_weighted(m))
    out["f1_macro"] = float(f1[seen].mean())
    out["precision"] = float(np.average(_ratio(tp, predicted), weights=support))
    out["recall"] = float(np.average(_ratio(tp, support), weights=support))
    out["roc_auc"] = roc_auc(labels, probs)
    return out


def binary_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """The area under the ROC curve of ``score`` for the boolean ``truth`` (both classes present): the
    Mann-Whitney statistic, P(a positive scores above a negative) + ½ P(tie), from midranks."""
    truth = np.asarray(truth, dtype=bool)
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inverse.ravel()]       # 1-based average rank of each score
    n_pos = int(truth.sum())
    n_neg = len(truth) - n_pos
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Area under the ROC curve; NaN where it is undefined.

    Two classes: the AUC of the class-1 probability. More classes: one-vs-rest, the unweighted mean
    over the classes that occur in ``labels`` of the AUC of that class's probability (computed per
    class, so the rows need not sum to 1 and a class absent from a small split does not raise).

    Returns ``float("nan")`` when fewer than two classes occur in ``labels`` (every example has the
    same class: the ranking is undefined) or when ``probs`` holds a non-finite value (a diverged
    model); JSON writers should turn NaN into ``null``.
    """
    labels, probs = _check(labels, probs)
    present = np.unique(labels)
    if present.size < 2 or not np.isfinite(probs).all():
        return math.nan
    if probs.shape[1] == 2:
        return binary_auc(labels == 1, probs[:, 1])
    return float(np.mean([binary_auc(labels == c, probs[:, c]) for c in present]))


def roc_curve(truth: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of ``score`` for the boolean ``truth`` at every distinct
    threshold, from (0, 0) to (1, 1): scikit-learn's ``roc_curve`` without ``drop_intermediate`` (the same
    curve, with its collinear points). Both classes must be present."""
    truth = np.asarray(truth, dtype=bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(score, dtype=np.float64)[order], truth[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]            # the last example of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> list[list[int]]:
    """The confusion matrix as nested lists: ``m[true][predicted]`` = count, shape (C, C)."""
    m = _confusion(np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64), num_classes)
    return [[int(v) for v in row] for row in m]


def per_class(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, list[float]]:
    """Per-class scores for the report.

    Returns ``{"precision": [...], "recall": [...], "f1": [...], "support": [...]}``, each a list of
    length ``num_classes`` indexed by class id (zip it with the label names); ``support`` is the
    number of true examples of the class (an int). Classes never
    predicted or never present score 0 (``zero_division=0``).
    """
    m = _confusion(np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64), num_classes)
    support, predicted, tp = m.sum(axis=1), m.sum(axis=0), np.diagonal(m)
    return {"precision": [float(v) for v in _ratio(tp, predicted)], "recall": [float(v) for v in _ratio(tp, support)],
            "f1": [float(v) for v in _ratio(2 * tp, support + predicted)], "support": [int(v) for v in support]}


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected labels (N,) and probs (N, C), got {labels.shape} and {probs.shape}")
    if labels.shape[0] == 0:
        raise ValueError("cannot compute metrics of zero examples")
    return labels.astype(np.int64), probs
