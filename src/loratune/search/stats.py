"""How sure a search may be of its numbers: intervals on one trial's validation scores and a paired test of
two adapters on the same test examples. Pure numpy and the standard library; no scipy.

- :func:`wilson`: the 95% Wilson score interval of an accuracy ``k / n`` (right where the normal
  approximation is not: near 0 and 1, and for small ``n``).
- :func:`bootstrap_f1`: a seeded percentile-bootstrap interval of the support-weighted F1 that loratune
  reports as ``f1`` (:func:`loratune.tasks.metrics.compute_metrics`). F1 depends on the examples only through
  their confusion matrix, so resampling ``n`` examples with replacement is drawing the matrix's cells from a
  multinomial with the observed cell frequencies: the bootstrap needs the matrix, not the examples.
- :func:`mcnemar`: McNemar's exact test of two classifiers scored on the same examples. Only the discordant
  examples (one right, the other wrong) carry evidence; under "no difference" each is equally likely to
  favour either, so ``b ~ Binomial(b + c, 1/2)``. Exact rather than the chi-square approximation, because a
  search's test split is small and its discordant counts smaller still.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# the F1 of confusion matrices, as compute_metrics reports it
from loratune.tasks.metrics import f1_weighted

__all__ = ["Z95", "bootstrap_f1", "f1_weighted", "mcnemar", "mcnemar_chi2", "p_text", "paired", "wilson"]

Z95 = 1.959963984540054                          # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``k / n``:

        centre = (k + z²/2) / (n + z²),   half = z / (n + z²) · sqrt(k (n − k) / n + z²/4)

    ``(centre − half, centre + half)``; exactly 0 at ``k = 0`` and exactly 1 at ``k = n`` (the formula's
    limits, which rounding would otherwise miss by an ulp).

    Raises:
        ValueError: ``n < 1`` or ``k`` outside ``[0, n]`` (a caller bug, not user input).
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"wilson: expected 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def bootstrap_f1(confusion: Any, *, seed: int = 0, rounds: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """A percentile-bootstrap interval of :func:`f1_weighted` at ``level``: ``rounds`` resamples of the ``n``
    examples, each drawn as ``rng.multinomial(n, cells / n)`` over the matrix's C² cells (the same law as
    drawing examples with replacement), with ``numpy.random.default_rng(seed)``: the same matrix and seed
    give the same interval.

    Raises:
        ValueError: the matrix is not square, has a negative or fractional count, or counts nothing.
    """
    m = np.asarray(confusion)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.size == 0:
        raise ValueError(f"bootstrap_f1: expected a square C×C confusion matrix, got shape {m.shape}")
    if not (np.isfinite(m).all() and (m >= 0).all() and (m == np.round(m)).all()):
        raise ValueError("bootstrap_f1: expected non-negative integer counts")
    if rounds < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_f1: expected rounds >= 1 and 0 < level < 1, got {rounds}, {level}")
    cells = m.astype(np.int64).ravel()
    n = int(cells.sum())
    if n == 0:
        raise ValueError("bootstrap_f1: the confusion matrix counts no example")
    draws = np.random.default_rng(seed).multinomial(n, cells / n, size=rounds)          # (rounds, C²)
    scores = f1_weighted(draws.reshape(rounds, *m.shape))                                # (rounds,)
    tail = (1 - level) / 2
    lo, hi = np.quantile(scores, [tail, 1 - tail])
    return float(lo), float(hi)


def mcnemar(b: int, c: int) -> float:
    """McNemar's exact two-sided p-value for discordant counts ``b`` (only the first classifier right) and
    ``c`` (only the second right): ``min(1, 2 · P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``;
    1.0 when ``b + c = 0`` (no example tells them apart). Exact in integers, then one division.

    Raises:
        ValueError: a negative count.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar: expected non-negative counts, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def mcnemar_chi2(b: int, c: int) -> float:
    """The continuity-corrected McNemar statistic ``(|b − c| − 1)² / (b + c)`` (χ² with 1 degree of freedom
    for large ``b + c``), for reference beside :func:`mcnemar`'s exact p-value; 0.0 when ``b + c = 0``."""
    return 0.0 if b + c == 0 else max(abs(b - c) - 1, 0) ** 2 / (b + c)


def p_text(p: float, alpha: float = 0.05) -> str:
    """A p-value as people read it: ``"p = 0.203"``, or ``"p < 0.001"`` below what three decimals show; more
    decimals where three would round it onto ``alpha`` or past it (0.0498 is below 0.05: "p = 0.0498", not
    "p = 0.050" beside a verdict of "beyond chance")."""
    if p < 0.001:
        return "p < 0.001"
    for digits in range(3, 10):
        shown = round(p, digits)
        if (shown < alpha) == (p < alpha):
            return f"p = {p:.{digits}f}"
    return f"p = {p:.10f}"


def paired(first: Any, second: Any) -> dict[str, Any]:
    """Two classifiers' per-example correctness on the same examples, ``(N,)`` booleans in the same order:
    ``{"n", "first_accuracy", "second_accuracy", "first_only", "second_only", "p_value", "chi2"}``, with
    ``first_only`` (McNemar's b) the examples only the first got right and ``p_value`` :func:`mcnemar`'s.

    Raises:
        ValueError: the arrays are not 1-D of the same, non-zero length.
    """
    a, b = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired: expected two 1-D arrays of the same non-zero length, got {a.shape}, {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    return {"n": int(a.size), "first_accuracy": float(a.mean()), "second_accuracy": float(b.mean()),
            "first_only": only_a, "second_only": only_b, "p_value": mcnemar(only_a, only_b),
            "chi2": mcnemar_chi2(only_a, only_b)}
