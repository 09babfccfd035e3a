"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loratune.tasks.metrics import compute_metrics, confusion, per_class, roc_auc


def _probs1(p1: list[float]) -> np.ndarray:
    """Binary probabilities from P(class 1)."""
    p = np.asarray(p1)
    return np.stack([1 - p, p], axis=1)


def test_binary_known_values() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = _probs1([0.1, 0.4, 0.35, 0.8])  # preds 0, 0, 0, 1
    m = compute_metrics(labels, probs, loss=0.5)
    assert list(m) == ["loss", "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"]
    assert m["loss"] == 0.5
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["roc_auc"] == pytest.approx(0.75)
    # class 0: tp 2, fp 1, fn 0 -> p 2/3, r 1, f1 0.8; class 1: tp 1, fp 0, fn 1 -> p 1, r 1/2, f1 2/3
    assert m["precision"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["recall"] == pytest.approx((1 + 0.5) / 2)
    assert m["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert all(isinstance(v, float) for v in m.values())


def test_weighted_differs_from_macro() -> None:
    labels = np.array([0, 0, 0, 1])
    probs = _probs1([0.2, 0.3, 0.9, 0.1])  # preds 0, 0, 1, 0
    m = compute_metrics(labels, probs)
    assert "loss" not in m
    # class 0: tp 2, fp 1, fn 1 -> f1 2/3 (support 3); class 1: tp 0 -> f1 0 (support 1)
    assert m["f1"] == pytest.approx(3 / 4 * 2 / 3)
    assert m["f1_macro"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(0.5)
    # AUC: positives {0.1} vs negatives {0.2, 0.3, 0.9}: 0 of 3 pairs ranked right
    assert m["roc_auc"] == pytest.approx(0.0)


def test_zero_division_is_zero_not_nan() -> None:
    labels = np.array([0, 1, 0, 1])
    probs = _probs1([0.1, 0.2, 0.3, 0.4])  # always predicts 0
    m = compute_metrics(labels, probs)
    assert m["precision"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)
    assert m["roc_auc"] == pytest.approx(0.75)  # pos {.2, .4} vs neg {.1, .3}: 3 of 4 pairs


def test_multiclass() -> None:
    labels = np.array([0, 1, 2, 2, 1, 0])
    probs = np.array([[0.7, 0.2, 0.1],
                      [0.2, 0.5, 0.3],
                      [0.1, 0.3, 0.6],
                      [0.3, 0.4, 0.3],   # wrong: predicts 1
                      [0.1, 0.8, 0.1],
                      [0.5, 0.1, 0.4]])
    m = compute_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(5 / 6)
    # class 0: p 1, r 1; class 1: p 2/3, r 1, f1 0.8; class 2: p 1, r 1/2, f1 2/3; supports equal
    assert m["f1"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert m["f1_macro"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert m["precision"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert m["recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    # one-vs-rest AUCs by hand: class 0 -> 1.0; class 1: pos {0.5, 0.8} vs neg {0.2, 0.3, 0.4, 0.1} -> 1.0;
    # class 2: pos {0.6, 0.3} vs neg {0.1, 0.3, 0.1, 0.4}: 0.6 beats 4; 0.3 beats 2, ties 1 -> 6.5 / 8
    assert m["roc_auc"] == pytest.approx((1 + 1 + 6.5 / 8) / 3)
    from sklearn.metrics import roc_auc_score
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_multiclass_auc_with_a_class_missing_from_labels() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]])
    # class 0: pos {0.6, 0.3} vs neg {0.2, 0.1} -> 1; class 1: pos {0.7, 0.3} vs neg {0.2, 0.3} -> 3.5/4
    assert roc_auc(labels, probs) == pytest.approx((1 + 3.5 / 4) / 2)


def test_auc_nan_for_one_class_or_nonfinite() -> None:
    assert math.isnan(compute_metrics(np.array([1, 1, 1]), _probs1([0.2, 0.6, 0.9]))["roc_auc"])
    m = compute_metrics(np.array([0, 1]), np.array([[np.nan, np.nan], [0.5, 0.5]]))
    assert math.isnan(m["roc_auc"])


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="expected labels"):
        compute_metrics(np.array([0, 1]), np.array([0.1, 0.9]))
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(np.zeros(0, int), np.zeros((0, 2)))


def test_confusion_and_per_class() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    preds = np.array([0, 1, 1, 1, 0])
    assert confusion(labels, preds, 3) == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    pc = per_class(labels, preds, 3)
    assert pc["support"] == [2, 3, 0]
    assert pc["precision"] == pytest.approx([0.5, 2 / 3, 0.0])
    assert pc["recall"] == pytest.approx([0.5, 2 / 3, 0.0])
    assert pc["f1"] == pytest.approx([0.5, 2 / 3, 0.0])
