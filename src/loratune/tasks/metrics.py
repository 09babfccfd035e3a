"""Classification metrics: the numbers in ``results.json``, ``metrics.jsonl`` and the report.

Every metrics object of the contract has ``loss``, ``accuracy``, ``f1`` (weighted by support, as the
seed project), ``f1_macro``, ``precision`` and ``recall`` (weighted), and ``roc_auc``. Predictions are
the arg-max of the class probabilities. Precision, recall and F1 use scikit-learn with
``zero_division=0``: a class never predicted counts as precision 0 instead of a warning and NaN.
scikit-learn is imported on first use, not with this module: importing it costs about 100 MiB of memory,
which a server that only reads an adapter's task (``loratune serve``) should not pay.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["compute_metrics", "confusion", "per_class", "roc_auc"]


def _sk() -> Any:
    """``sklearn.metrics``, imported on first use."""
    import sklearn.metrics

    return sklearn.metrics


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
        ValueError: the shapes do not match or N is 0 (a caller bug, not user input).
    """
    labels, probs = _check(labels, probs)
    preds = probs.argmax(axis=1)
    out: dict[str, float] = {}
    if loss is not None:
        out["loss"] = float(loss)
    out["accuracy"] = float(_sk().accuracy_score(labels, preds))
    out["f1"] = float(_sk().f1_score(labels, preds, average="weighted", zero_division=0))
    out["f1_macro"] = float(_sk().f1_score(labels, preds, average="macro", zero_division=0))
    out["precision"] = float(_sk().precision_score(labels, preds, average="weighted", zero_division=0))
    out["recall"] = float(_sk().recall_score(labels, preds, average="weighted", zero_division=0))
    out["roc_auc"] = roc_auc(labels, probs)
    return out


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
        return float(_sk().roc_auc_score(labels, probs[:, 1]))
    aucs = [_sk().roc_auc_score(labels == c, probs[:, c]) for c in present]
    return float(np.mean(aucs))


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> list[list[int]]:
    """The confusion matrix as nested lists: ``m[true][predicted]`` = count, shape (C, C)."""
    m = _sk().confusion_matrix(np.asarray(labels), np.asarray(preds), labels=list(range(num_classes)))
    return [[int(v) for v in row] for row in m]


def per_class(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, list[float]]:
    """Per-class scores for the report.

    Returns ``{"precision": [...], "recall": [...], "f1": [...], "support": [...]}``, each a list of
    length ``num_classes`` indexed by class id (zip it with the label names); ``support`` is the
    number of true examples of the class (an int). Classes never
    predicted or never present score 0 (``zero_division=0``).
    """
    p, r, f, s = _sk().precision_recall_fscore_support(np.asarray(labels), np.asarray(preds),
                                                 labels=list(range(num_classes)), zero_division=0)
    return {"precision": [float(v) for v in p], "recall": [float(v) for v in r],
            "f1": [float(v) for v in f], "support": [int(v) for v in s]}


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1 or probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"expected labels (N,) and probs (N, C), got {labels.shape} and {probs.shape}")
    if labels.shape[0] == 0:
        raise ValueError("cannot compute metrics of zero examples")
    return labels.astype(np.int64), probs
