"""loratune.search.stats against closed-form values and independent references: Wilson intervals worked by
hand and by scipy, McNemar's exact p-value by hand and by scipy's binomial test, the confusion-matrix F1 by
scikit-learn, and the multinomial bootstrap against resampling the examples themselves."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import confusion_matrix, f1_score

from loratune.search.stats import (
    Z95,
    bootstrap_f1,
    f1_weighted,
    mcnemar,
    mcnemar_chi2,
    p_text,
    paired,
    wilson,
)


def test_wilson_closed_form() -> None:
    # k = 0: (0, z² / (n + z²)); k = n: (n / (n + z²), 1): the centre ± half meet 0 and 1 exactly
    z2 = Z95 ** 2
    assert wilson(0, 10) == (0.0, pytest.approx(z2 / (10 + z2), abs=1e-15))
    assert wilson(10, 10) == (pytest.approx(10 / (10 + z2), abs=1e-15), 1.0)
    # k = 81, n = 100 by hand: centre (81 + z²/2) / (100 + z²), half z / (100 + z²) · sqrt(81·19/100 + z²/4)
    centre, half = (81 + z2 / 2) / (100 + z2), Z95 / (100 + z2) * math.sqrt(81 * 19 / 100 + z2 / 4)
    lo, hi = wilson(81, 100)
    assert (lo, hi) == (pytest.approx(centre - half, abs=1e-15), pytest.approx(centre + half, abs=1e-15))
    assert (round(lo, 4), round(hi, 4)) == (0.7222, 0.8749)              # the textbook's four decimals
    assert wilson(5, 10) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))   # symmetric at ½
    assert wilson(1, 1, z=1.0) == (pytest.approx(0.5), 1.0)              # z = 1: (1 + ½) / 2 − ½ / 2 · 1
    for bad in ((0, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError, match="wilson"):
            wilson(*bad)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (40, 400), (323, 400), (399, 400)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))


def test_mcnemar_closed_form() -> None:
    assert mcnemar(0, 0) == 1.0                                            # nothing tells them apart
    assert mcnemar(0, 5) == mcnemar(5, 0) == 2 / 32                       # 2 · (½)⁵
    assert mcnemar(1, 5) == 2 * (1 + 6) / 64                              # 2 · (C(6,0) + C(6,1)) / 2⁶
    assert mcnemar(3, 3) == 1.0 and mcnemar(4, 5) == 1.0                  # capped at 1
    assert mcnemar(2, 10) == 2 * (1 + 12 + 66) / 4096
    assert mcnemar_chi2(0, 0) == 0.0 and mcnemar_chi2(2, 10) == 49 / 12 and mcnemar_chi2(5, 5) == 0.0
    with pytest.raises(ValueError, match="mcnemar"):
        mcnemar(-1, 3)
    assert (p_text(0.2026), p_text(1.0), p_text(0.001), p_text(0.00099)) == (
        "p = 0.203", "p = 1.000", "p = 0.001", "p < 0.001")
    # Three decimals would show 0.0498 as "0.050" beside a verdict of "beyond chance": more where they flip it.
    assert mcnemar(42, 25) == pytest.approx(0.0498, abs=5e-5)
    assert (p_text(mcnemar(42, 25)), p_text(0.04999), p_text(0.05), p_text(0.0504), p_text(0.00996, alpha=0.01)) == (
        "p = 0.0498", "p = 0.04999", "p = 0.050", "p = 0.050", "p = 0.00996")


@pytest.mark.parametrize("b,c", [(0, 1), (1, 9), (12, 30), (40, 41), (7, 0), (150, 210), (600, 1000)])
def test_mcnemar_matches_scipys_binomial_test(b: int, c: int) -> None:
    assert mcnemar(b, c) == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-9, abs=1e-300)


def test_paired_counts_the_discordant_examples() -> None:
    first = np.array([1, 1, 1, 0, 0, 1, 1, 0], bool)
    second = np.array([1, 0, 0, 0, 1, 1, 0, 0], bool)
    out = paired(first, second)
    assert out == {"n": 8, "first_accuracy": 5 / 8, "second_accuracy": 3 / 8, "first_only": 3, "second_only": 1,
                   "p_value": mcnemar(3, 1), "chi2": 1 / 4}
    with pytest.raises(ValueError, match="same non-zero length"):
        paired(first, second[:-1])


def test_f1_of_a_confusion_matrix_is_sklearns_weighted_f1() -> None:
    """Including a class never predicted and one never true (zero_division=0), with three classes."""
    rng = np.random.default_rng(1)
    for case in range(20):
        labels = rng.integers(0, 3, 60)
        preds = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 3 if case % 2 else 2, 60))
        if case % 5 == 0:
            preds[:] = 0                                                   # a collapsed classifier
        m = confusion_matrix(labels, preds, labels=[0, 1, 2])
        assert f1_weighted(m) == pytest.approx(f1_score(labels, preds, average="weighted", zero_division=0),
                                               abs=1e-12)
    assert f1_weighted(np.array([[[3, 1], [0, 4]], [[4, 0], [0, 4]]])).shape == (2,)


def test_bootstrap_f1_agrees_with_resampling_the_examples() -> None:
    """n = 400 two-class examples at ~80% accuracy: the multinomial draw and resampling the examples with
    replacement (scored by scikit-learn) give the same interval up to the bootstrap's own noise."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 400)
    preds = np.where(rng.random(400) < 0.8, labels, 1 - labels)
    m = confusion_matrix(labels, preds)
    lo, hi = bootstrap_f1(m, seed=3, rounds=4000)
    idx = rng.integers(0, 400, size=(4000, 400))                        # resampled examples, (rounds, n)
    y, p = labels[idx], preds[idx]
    ref = sum((y == c).sum(1) / 400 * 2 * ((y == c) & (p == c)).sum(1) / ((y == c).sum(1) + (p == c).sum(1))
              for c in (0, 1))                                           # F1 from the examples, each resample
    assert all(ref[i] == pytest.approx(f1_score(y[i], p[i], average="weighted"), abs=1e-12) for i in range(20))
    ref_lo, ref_hi = np.quantile(ref, [0.025, 0.975])
    assert lo < f1_weighted(m) < hi
    assert lo == pytest.approx(ref_lo, abs=0.01) and hi == pytest.approx(ref_hi, abs=0.01)
    assert hi - lo == pytest.approx(ref_hi - ref_lo, abs=0.012)          # ≈ 0.078 wide


def test_bootstrap_f1_is_deterministic_for_a_seed_and_checks_its_input() -> None:
    m = [[30, 5, 1], [4, 20, 6], [0, 3, 31]]
    assert bootstrap_f1(m, seed=0) == bootstrap_f1(m, seed=0)
    assert bootstrap_f1(m, seed=0) != bootstrap_f1(m, seed=1)
    assert bootstrap_f1([[10, 0], [0, 10]]) == (1.0, 1.0)                 # every resample is perfect
    wide, narrow = bootstrap_f1(m, level=0.99), bootstrap_f1(m, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    for bad, match in (([[1, 2, 3]], "square"), ([[1, -1], [0, 2]], "non-negative"), ([[0.5, 1], [1, 1]],
                       "integer"), ([[0, 0], [0, 0]], "no example")):
        with pytest.raises(ValueError, match=match):
            bootstrap_f1(bad)
