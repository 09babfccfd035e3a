"""What an adapter learned: the spectrum of ΔW, its effective rank, amplification, subspace similarity.

For every adapted matrix (LoRA paper, Hu et al. 2021, §7):

    ΔW = s·B·A                    B: (d, r)  A: (r, k)  s = α/r (α/√r with rsLoRA); reported as (d, k)

- **Singular values** of ΔW, exactly and cheaply, without forming the d×k product: with thin QR
  factorisations B = Q_B·R_B and Aᵀ = Q_A·R_A (Q orthonormal columns, R r×r),
  ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ, so the SVD of the small core s·R_B·R_Aᵀ = U_c·Σ·V_cᵀ gives
  ΔW = (Q_B·U_c)·Σ·(Q_A·V_c)ᵀ: the same singular values, and U = Q_B·U_c, V = Q_A·V_c.
- **Effective rank**: the fewest n with σ_1² + … + σ_n² ≥ 0.9·‖ΔW‖²_F (0 for ΔW = 0).
- **Amplification** (Table 7): ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F with U (d, r), V (k, r) ΔW's singular vectors:
  how much ΔW amplifies directions that W0 (the frozen weight, as (d, k)) barely uses. Needs the
  base model; ``None`` when it cannot be loaded (a log line says why).
- **Subspace similarity** (Figure 3) of two adapters' A matrices, with V_1 (k, r1), V_2 (k, r2) their
  right-singular vectors in order: φ(A1, A2, i, j) = ‖V_1[:, :i]ᵀ·V_2[:, :j]‖²_F / min(i, j) ∈ [0, 1].

DoRA (``use_dora``): the merged weight is W = g ⊙ (W0 + s·B·A), g = m / ‖W0 + s·B·A‖ per output row, so ΔW is
defined as W − W0 (full rank in general; every singular value is reported, and ``delta`` says which ΔW a matrix
has). It needs W0: without the base model a DoRA matrix is analysed as s·B·A alone, and the note says so.

PiSSA / OLoRA saved unconverted (``init_lora_weights`` "pissa" / "olora"): the loader recomputes A0, B0 from W0
(:func:`loratune.core.lora.initial_factors`) and replaces W0 by W0 − s·B0·A0, so the learned ΔW relative to the
original W0 is s·(B·A − B0·A0): the rank-2r pair A′ = [A; A0], B′ = [B, −B0] with the same s (the "rank" column
stays r). Without the base model such a matrix is analysed as s·B·A (mostly W0's own top directions), and the
note says that this is not what was learned.

GPT-2's ``Conv1D`` stores W0 as (k, d) (``fan_in_fan_out``); A and B are stored as for a Linear, so
ΔW is (d, k) either way and W0 is transposed before use.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loratune.core.adapters import (
    PREFIX,
    num_labels_of,
    read_adapter_config,
    read_meta,
    read_weights,
)
from loratune.errors import InputError

log = logging.getLogger(__name__)

ENERGY = 0.9
"""Share of ‖ΔW‖²_F the effective rank has to hold."""


@dataclass
class LoraPair:
    """One adapted matrix's factors (float64, CPU): A (r, k), B (d, r), and the scaling s."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None
    """DoRA's m (d,), float64; None for plain LoRA."""
    init: str = "kaiming"
    """How A and B started (the adapter config's init_lora_weights): pissa / olora start from W0."""

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self) -> torch.Tensor:
        """The explicit ΔW = s·B·A, (d, k). For tests and small matrices; the analysis never forms it."""
        return self.scaling * (self.B @ self.A)


@dataclass
class MatrixStats:
    """The analysis of one matrix; ``to_json`` gives the contract's object."""

    name: str
    shape: tuple[int, int]
    rank: int
    singular_values: list[float]
    effective_rank: int
    frobenius_norm: float
    amplification: float | None = None
    delta: str = "s*B*A"
    """Which ΔW: ``s*B*A`` (LoRA), ``merged-W0`` (DoRA with its base), ``s*(B*A-B0*A0)`` (PiSSA / OLoRA with its
    base), or ``s*B*A (DoRA, no base)`` / ``s*B*A (PiSSA, no base)`` / ``s*B*A (OLoRA, no base)`` (not the
    learned ΔW: the base model was not available)."""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "rank": self.rank,
                "singular_values": self.singular_values, "effective_rank": self.effective_rank,
                "frobenius_norm": self.frobenius_norm, "amplification": self.amplification, "delta": self.delta}


@dataclass
class Analysis:
    """An adapter's analysis (and optionally the comparison with a second one)."""

    adapter: str
    matrices: list[MatrixStats]
    compare: str | None = None
    phi: dict[str, np.ndarray] = field(default_factory=dict)
    base: str | None = None
    note: str | None = None
    """Why amplification is missing, and which matrices do not show the learned ΔW (no base model), when so."""

    def to_json(self) -> dict[str, Any]:
        """The contract's ``analyze --json`` object."""
        cmp = None
        if self.compare is not None:
            cmp = {"adapter": self.compare,
                   "matrices": [{"name": n, "phi": [[float(v) for v in row] for row in m]} for n, m in self.phi.items()]}
        return {"adapter": self.adapter, "matrices": [m.to_json() for m in self.matrices], "compare": cmp}


# --- reading an adapter ------------------------------------------------------------------------

def lora_pairs(adapter: str | os.PathLike) -> dict[str, LoraPair]:
    """The (A, B, s) of every adapted matrix in the folder, by module name (file order)."""
    from loratune.core.inject import pattern_value

    spec, _ = read_adapter_config(adapter)
    weights = read_weights(adapter)
    path = Path(adapter) / "adapter_model.safetensors"
    out: dict[str, LoraPair] = {}
    for key, a in weights.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = weights.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise InputError(f"{path}: {key} has no matching lora_B tensor")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise InputError(f"{path}: {name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                             "(expected (r, k) and (d, r))")
        A, B = a.to(torch.float64), b.to(torch.float64)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise InputError(f"{path}: {name} holds NaN or infinite values")
        r = int(a.shape[0])                              # the module's own rank (rank_pattern), as stored
        alpha = pattern_value(spec.alpha_pattern, name, spec.alpha)
        m = weights.get(f"{PREFIX}{name}.lora_magnitude_vector") if spec.variant == "dora" else None
        if spec.variant == "dora" and (m is None or tuple(m.shape) != (b.shape[0],)):
            raise InputError(f"{path}: {name}: a DoRA adapter needs lora_magnitude_vector of shape [{b.shape[0]}]")
        out[name] = LoraPair(name, A, B, alpha / (math.sqrt(r) if spec.rslora else r),
                             None if m is None else m.to(torch.float64), spec.init)
    if not out:
        raise InputError(f"{path}: holds no LoRA tensors (*.lora_A.weight)")
    return out


# --- the math ----------------------------------------------------------------------------------

INIT_NAMES = {"pissa": "PiSSA", "olora": "OLoRA"}


def relative_to_w0(pair: LoraPair, w0: torch.Tensor) -> LoraPair:
    """A PiSSA / OLoRA pair as the rank-2r pair of its ΔW relative to the original W0 (d, k):
    A′ = [A; A0] (2r, k), B′ = [B, −B0] (d, 2r), same s, so s·B′·A′ = s·(B·A − B0·A0); A0, B0 as the loader
    computes them (:func:`loratune.core.lora.initial_factors`, float32)."""
    from loratune.core.lora import initial_factors

    a0, b0 = initial_factors(w0, pair.init, int(pair.A.shape[0]), pair.scaling)
    return LoraPair(pair.name, torch.cat([pair.A, a0.to(torch.float64)]),
                    torch.cat([pair.B, -b0.to(torch.float64)], dim=1), pair.scaling, pair.magnitude, pair.init)


def svd_lowrank_product(pair: LoraPair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ΔW = s·B·A via QR of B and Aᵀ: (U (d, q), σ (q,), V (k, q)), σ descending, q = min(r, d, k)."""
    qb, rb = torch.linalg.qr(pair.B)                 # (d, q), (q, r)
    qa, ra = torch.linalg.qr(pair.A.T)               # (k, q'), (q', r)
    uc, s, vch = torch.linalg.svd(pair.scaling * (rb @ ra.T), full_matrices=False)   # the small core
    return qb @ uc, s, qa @ vch.T


def dora_svd(pair: LoraPair, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of DoRA's ΔW = g ⊙ (W0 + s·B·A) − W0 (g = m / ‖W0 + s·B·A‖ per output row, as the merge computes
    it), formed densely: (U (d, q), σ (q,), V (k, q)), q = min(d, k)."""
    assert pair.magnitude is not None
    w = w0.to(torch.float64) + pair.delta()
    g = pair.magnitude / torch.linalg.norm(w, dim=1)
    u, s, vh = torch.linalg.svd(g[:, None] * w - w0.to(torch.float64), full_matrices=False)
    return u, s, vh.T


def effective_rank(singular_values: torch.Tensor | np.ndarray | list[float], energy: float = ENERGY) -> int:
    """Fewest n with Σ_{i≤n} σ_i² ≥ energy·Σ σ_i² (σ sorted descending); 0 when every σ is 0."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64) ** 2)[::-1]
    total = s2.sum()
    if not total > 0:
        return 0
    cum = np.cumsum(s2)
    return int(np.searchsorted(cum, energy * total * (1 - 1e-12)) + 1)


def amplification(u: torch.Tensor, v: torch.Tensor, w0: torch.Tensor, delta_norm: float) -> float | None:
    """‖ΔW‖_F / ‖Uᵀ·W0·V‖_F (U (d, q), V (k, q), W0 (d, k)); None when the projection is 0."""
    proj = torch.linalg.matrix_norm(u.T @ w0.to(torch.float64) @ v).item()   # (q, q): W0 seen by ΔW's subspace
    return delta_norm / proj if proj > 0 else None


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """V (k, r) of A (r, k) = U_A·Σ·Vᵀ, columns ordered by singular value."""
    return torch.linalg.svd(a.to(torch.float64), full_matrices=False)[2].T


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> np.ndarray:
    """φ[i-1, j-1] = ‖V1[:, :i]ᵀ·V2[:, :j]‖²_F / min(i, j) for i ≤ r1, j ≤ r2 (A1 (r1, k), A2 (r2, k))."""
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A matrices of different widths: {tuple(a1.shape)} and {tuple(a2.shape)}")
    g2 = (right_singular_vectors(a1).T @ right_singular_vectors(a2)).numpy() ** 2   # (r1, r2) squared overlaps
    cum = g2.cumsum(axis=0).cumsum(axis=1)                                           # Σ_{a≤i, b≤j}
    i = np.arange(1, g2.shape[0] + 1)[:, None]
    j = np.arange(1, g2.shape[1] + 1)[None, :]
    return np.clip(cum / np.minimum(i, j), 0.0, 1.0)


# --- the base weights --------------------------------------------------------------------------

def base_weights(adapter: str | os.PathLike, names: list[str], base: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], str | None, str | None]:
    """W0 as (d, k) for each module in ``names``, the base model spec, and why not (when not).

    The base is ``base`` or the one the adapter names (its ``loratune.json``, else
    ``base_model_name_or_path``); only ``base`` may be downloaded, a name read from a file is loaded from a
    local folder or the cache. An explicit ``base`` that cannot be loaded is an InputError; the
    adapter's own base that cannot be loaded (moved, not cached offline) gives ``({}, spec, reason)``.
    """
    from loratune.core.lora import is_conv1d
    from loratune.training.models import load_causal_lm, load_model

    _, raw = read_adapter_config(adapter)
    meta = read_meta(adapter)
    spec = base or meta.get("model") or raw.get("base_model_name_or_path")
    if not spec:
        return {}, None, "the adapter names no base model (give --base MODEL)"
    labels = meta.get("id2label") or [f"LABEL_{i}" for i in range(num_labels_of(read_weights(adapter)) or 2)]
    download = base is not None                       # only a base the user names may be fetched (as infer)
    try:
        model = (load_causal_lm(str(spec), download=download) if meta.get("task") == "causal-lm"
                 else load_model(str(spec), labels, download=download))
    except (InputError, OSError, ValueError) as e:
        why = str(e).removeprefix("--model: ")          # the loader names its own flag; analyze's is --base
        if base is not None:
            raise InputError(f"--base: cannot load {base!r}: {why}") from None
        return {}, str(spec), f"the base model {spec!r} could not be loaded ({why})"
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name in names:
        m = modules.get(name)
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            out[name] = (w.T if is_conv1d(m) else w).detach().to(torch.float64)
    return out, str(spec), None


# --- the whole adapter -------------------------------------------------------------------------

def analyze_adapter(adapter: str | os.PathLike, compare: str | os.PathLike | None = None,
                    base: str | None = None, *, with_base: bool = True) -> Analysis:
    """Analyse every adapted matrix of ``adapter``; φ per matrix shared with ``compare``.

    ``with_base=False`` skips loading the base model (amplification ``None``).
    """
    if not Path(adapter).is_dir():                               # the positional argument, named as the CLI shows it
        raise InputError(f"ADAPTER: {adapter} " + ("is not a folder" if Path(adapter).exists() else "does not exist"))
    if compare is not None and not Path(compare).is_dir():      # named by its own flag, before any work
        raise InputError(f"--compare: {compare} " + ("is not a folder" if Path(compare).exists() else "does not exist"))
    pairs = lora_pairs(adapter)
    weights: dict[str, torch.Tensor] = {}
    spec = note = None
    if with_base:
        weights, spec, reason = base_weights(adapter, list(pairs), base)
        if reason:
            note = f"amplification not computed: {reason}"
            log.warning("%s", note)
    stats = []
    without_base: list[str] = []                     # DoRA / PiSSA / OLoRA matrices analysed as s·B·A alone
    for name, pair in pairs.items():
        w0 = weights.get(name)
        fits = w0 is not None and tuple(w0.shape) == pair.shape
        w0 = w0 if fits else None
        delta = "s*B*A"
        starts_from_w0 = pair.init in ("pissa", "olora")
        if starts_from_w0 and w0 is not None:
            pair = relative_to_w0(pair, w0)
            delta = "s*(B*A-B0*A0)"
        if pair.magnitude is not None and w0 is not None:
            u, s, v = dora_svd(pair, w0)
            delta = "merged-W0"
        else:
            u, s, v = svd_lowrank_product(pair)
            kinds = [k for k, on in (("DoRA", pair.magnitude is not None),
                                     (INIT_NAMES.get(pair.init, ""), starts_from_w0)) if on]
            if kinds and not fits:
                delta = f"s*B*A ({', '.join(kinds)}, no base)"
                without_base += [k for k in kinds if k not in without_base]
        norm = float(torch.linalg.vector_norm(s).item())          # ‖ΔW‖_F = ‖σ‖₂
        amp = None
        rank = int(pairs[name].A.shape[0])                         # the adapter's own r (A′ of PiSSA has 2r rows)
        if w0 is not None:                                         # ΔW's top r directions (DoRA's ΔW has more)
            amp = amplification(u[:, :rank], v[:, :rank], w0, norm)
        elif name in weights:
            log.warning("amplification of %s not computed: the base weight is %s, ΔW is %s",
                        name, list(weights[name].shape), list(pair.shape))
        elif with_base and not note:
            log.warning("amplification of %s not computed: the base model has no such matrix", name)
        stats.append(MatrixStats(name, pair.shape, rank, [float(x) for x in s], effective_rank(s), norm, amp, delta))
    notes = []
    if "DoRA" in without_base:
        notes.append("DoRA's ΔW (the merged weight minus W0) needs the base model: its matrices show s·B·A alone")
    starts = [k for k in without_base if k != "DoRA"]
    if starts:
        notes.append(f"{'/'.join(starts)}'s ΔW, s·(B·A − B0·A0) with A0 and B0 computed from W0, needs the base "
                     "model: its matrices show s·B·A, which is not what was learned")
    for line in notes:
        log.warning("%s", line)
    note = "; ".join(([note] if note else []) + notes) or None
    result = Analysis(str(adapter), stats, base=spec, note=note)
    if compare is not None:
        result.compare = str(compare)
        result.phi = compare_adapters(pairs, lora_pairs(compare))
    return result


def compare_adapters(first: dict[str, LoraPair], second: dict[str, LoraPair]) -> dict[str, np.ndarray]:
    """φ matrices (r1, r2) for the modules in both adapters (first's order); others are logged and skipped."""
    out: dict[str, np.ndarray] = {}
    skipped = [n for n in first if n not in second] + [n for n in second if n not in first]
    for name, p1 in first.items():
        p2 = second.get(name)
        if p2 is None:
            continue
        if p1.A.shape[1] != p2.A.shape[1]:
            log.warning("φ of %s not computed: A is %s in one adapter and %s in the other",
                        name, list(p1.A.shape), list(p2.A.shape))
            continue
        out[name] = subspace_similarity(p1.A, p2.A)
    if skipped:
        log.info("φ skips %d matrices adapted in only one of the adapters", len(skipped))
    if not out:
        log.warning("the two adapters share no adapted matrix: nothing to compare")
    return out


def analyze(adapter: str | os.PathLike, compare: str | os.PathLike | None = None,
            base: str | None = None) -> dict[str, Any]:
    """``loratune analyze``: the contract's JSON object (see :meth:`Analysis.to_json`)."""
    return analyze_adapter(adapter, compare, base).to_json()


# --- text --------------------------------------------------------------------------------------

def short_names(names: list[str]) -> list[str]:
    """Module names without their common dotted prefix (``layer.0.attention.self.query``)."""
    if len(names) < 2:
        return list(names)
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    if k and all(p[k].isdigit() for p in parts):        # keep "layer." before the layer index
        k -= 1
    return [".".join(p[k:]) for p in parts]


def format_table(result: dict[str, Any], top: int = 4) -> list[str]:
    """A readable table of an ``analyze`` result (and φ summaries with a comparison)."""
    rows = result["matrices"]
    names = short_names([m["name"] for m in rows])
    head = ["module", "shape", "r", "eff. rank", "‖ΔW‖_F", "amplif.", f"top {top} singular values"]
    cells = [head] + [[n, "×".join(map(str, m["shape"])), str(m["rank"]), str(m["effective_rank"]),
                       f"{m['frobenius_norm']:.4g}",
                       "-" if m["amplification"] is None else f"{m['amplification']:.2f}",
                       " ".join(f"{x:.3g}" for x in m["singular_values"][:top])] for n, m in zip(names, rows)]
    lines = _align(cells)
    deltas = [str(m.get("delta", "")) for m in rows]
    if "merged-W0" in deltas:
        lines += ["", "DoRA: ΔW is the merged weight minus W0 (m/‖W0 + s·B·A‖ ⊙ (W0 + s·B·A) − W0), full rank in general"]
    if "s*(B*A-B0*A0)" in deltas:
        lines += ["", "PiSSA / OLoRA: ΔW is s·(B·A − B0·A0) against the original W0 (A0, B0: where A and B started, "
                      "computed from W0), rank ≤ 2r"]
    if any("DoRA" in d and "no base" in d for d in deltas):
        lines += ["", "DoRA without its base model: its matrices show s·B·A alone, not the learned ΔW "
                      "(the merged weight minus W0); give --base MODEL"]
    starts = sorted({k for d in deltas if "no base" in d for k in INIT_NAMES.values() if k in d})
    if starts:
        lines += ["", f"{' / '.join(starts)} without its base model: its matrices show s·B·A, which is not what was "
                      "learned (s·(B·A − B0·A0), A0 and B0 computed from W0); give --base MODEL"]
    cmp = result.get("compare")
    if cmp:
        lines += ["", f"subspace similarity φ with {cmp['adapter']} (1 = same directions, 0 = orthogonal):"]
        cnames = short_names([m["name"] for m in cmp["matrices"]])
        ccells = [["module", "r1×r2", "φ(1,1)", "mean φ(i,i)", "φ(r1,r2)"]]
        for n, m in zip(cnames, cmp["matrices"]):
            phi = np.asarray(m["phi"])
            diag = np.diag(phi)
            ccells.append([n, f"{phi.shape[0]}×{phi.shape[1]}", f"{phi[0, 0]:.3f}", f"{diag.mean():.3f}",
                           f"{phi[-1, -1]:.3f}"])
        lines += _align(ccells) if len(ccells) > 1 else ["(no adapted matrix in common)"]
    return lines


def _align(cells: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
