"""Metrics against hand-computed values on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loratune.tasks.metrics import (
    compute_metrics,
    confusion,
    per_class,
    roc_auc,
    roc_curve,
)


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


@pytest.mark.parametrize("seed", range(40))
def test_every_metric_is_scikit_learns(seed) -> None:
    """numpy's confusion matrix and midranks against scikit-learn itself, on random splits: 2-5 classes, a few
    to a few hundred examples, scores rounded so that ties are common, classes that are never predicted or
    never occur, and an always-one-class model."""
    from sklearn import metrics as sk

    rng = np.random.default_rng(seed)
    c, n = int(rng.integers(2, 6)), int(rng.integers(3, 300))
    labels = rng.integers(0, c - (seed % 3 == 1), n)                 # every third: the last class never occurs
    labels[:2] = [0, 1]                                              # (at least two classes do)
    probs = np.round(rng.dirichlet(np.ones(c), n), 1 + seed % 3)
    if seed % 5 == 0:
        probs[:, 0] += 2.0                                           # always predicts class 0
    preds = probs.argmax(axis=1)
    m = compute_metrics(labels, probs)
    exact = {"accuracy": sk.accuracy_score(labels, preds),
             "f1": sk.f1_score(labels, preds, average="weighted", zero_division=0),
             "f1_macro": sk.f1_score(labels, preds, average="macro", zero_division=0),
             "precision": sk.precision_score(labels, preds, average="weighted", zero_division=0),
             "recall": sk.recall_score(labels, preds, average="weighted", zero_division=0),
             "roc_auc": (sk.roc_auc_score(labels, probs[:, 1]) if c == 2 else
                         np.mean([sk.roc_auc_score(labels == k, probs[:, k]) for k in np.unique(labels)]))}
    assert m == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert confusion(labels, preds, c) == sk.confusion_matrix(labels, preds, labels=list(range(c))).tolist()
    p, r, f, s = sk.precision_recall_fscore_support(labels, preds, labels=list(range(c)), zero_division=0)
    pc = per_class(labels, preds, c)
    assert pc["support"] == s.tolist()
    assert (pc["precision"], pc["recall"], pc["f1"]) == (pytest.approx(p.tolist(), abs=1e-12),
                                                         pytest.approx(r.tolist(), abs=1e-12),
                                                         pytest.approx(f.tolist(), abs=1e-12))
    fpr, tpr = roc_curve(labels == 1, probs[:, 1])
    sk_fpr, sk_tpr, _ = sk.roc_curve(labels == 1, probs[:, 1], drop_intermediate=False)
    assert fpr == pytest.approx(sk_fpr, abs=1e-12) and tpr == pytest.approx(sk_tpr, abs=1e-12)


def test_labels_outside_the_classes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        compute_metrics(np.array([0, 2]), _probs1([0.1, 0.9]))


def test_evaluating_imports_no_scikit_learn() -> None:
    """scikit-learn cost each trial's process about 0.7 s to import and 100 MiB (2 trials and the driver in a
    search); the metrics and the report's ROC curve need none of it. Checked in a fresh process."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from loratune.tasks.metrics import compute_metrics, per_class, roc_curve\n"
            "compute_metrics(np.array([0, 1, 1]), np.array([[.6, .4], [.3, .7], [.8, .2]]))\n"
            "per_class(np.array([0, 1]), np.array([1, 1]), 2); roc_curve(np.array([0, 1]), np.array([.2, .9]))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
