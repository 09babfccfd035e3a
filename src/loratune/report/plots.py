"""The report's figures as ``data:image/png;base64,...`` URIs.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas), never ``pyplot``: no global
backend switch, no window, nothing left open, safe in a user's notebook or a worker thread.
Every figure function takes plain numbers (lists, dicts, numpy arrays) and returns one data URI;
the HTML around them is :mod:`loratune.report.html`. Strings from the user's data (class names, option values,
module names, run labels) go through :func:`plain`, or :func:`legend_label` for a legend: matplotlib would
otherwise read a pair of ``$`` as mathtext (``$10-$20`` drawn as maths, ``a$^$b`` an error that loses the
figure) and drop a legend entry starting with ``_``.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from loratune.report.html import STATUS_COLORS, count, finite, human_bytes, is_number

DPI = 100
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def png(fig: Figure) -> str:
    """The figure as a PNG data URI. Its size is the figure's: the constrained layout already fits labels and
    legends inside it (``bbox_inches="tight"`` drew every figure twice: a search's report took 3.4-4.1 s, 2.7-3.4
    without)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def plain(text: Any) -> str:
    """``text`` drawn literally: every ``$`` escaped, so matplotlib never parses it as mathtext."""
    return str(text).replace("$", r"\$")


def legend_label(text: Any) -> str:
    """:func:`plain`, with a zero-width space before a leading ``_`` (a legend skips labels starting with ``_``)."""
    out = plain(text)
    return "\u200b" + out if out.startswith("_") else out


def _fig(width: float, height: float, cols: int = 1, rows: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


# --- a training run ------------------------------------------------------------------------------

def learning_curves(train: Sequence[tuple[int, float]], evals: Sequence[dict[str, Any]],
                    best_epoch: int | None = None) -> str:
    """Left: train loss per logged step, validation loss at each epoch's last step (``evals``: the
    trainer's ``{"epoch", "step", "loss", ...}``; non-finite values are left out). Right: validation
    accuracy and F1 per epoch, ``best_epoch`` (the run directory's best, if any) marked."""
    fig, (left, right) = _fig(10, 3.4, cols=2)
    if train:
        steps, losses = zip(*train)
        left.plot(steps, losses, color=PALETTE[0], lw=1.2, label="train loss")
    ev = [e for e in evals if finite(e.get("loss")) and finite(e.get("step"))]
    if ev:
        left.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", color=PALETTE[1], label="validation loss")
    left.set(xlabel="step", ylabel="cross-entropy", title="Loss")
    _legend(left, loc="upper right")
    for key, color in (("accuracy", PALETTE[2]), ("f1", PALETTE[4])):
        pts = [(e["epoch"], e[key]) for e in evals if finite(e.get(key))]
        if pts:
            right.plot(*zip(*pts), "o-", color=color, label=f"validation {key}")
    if best_epoch is not None:
        right.axvline(best_epoch, color="#999", ls="--", lw=1, label=f"best epoch ({best_epoch})")
    right.set(xlabel="epoch", ylabel="score", title="Validation")
    right.xaxis.get_major_locator().set_params(integer=True)
    _legend(right, loc="lower right")
    return png(fig)


def confusion_plot(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    """Counts, true class down, predicted class across; the diagonal is right."""
    m = np.asarray(matrix, dtype=float)
    n = len(names)
    fig, (ax,) = _fig(max(3.2, 0.6 * n + 2), max(2.8, 0.6 * n + 1.6))
    ax.grid(False)
    ax.imshow(m, cmap="Blues", vmin=0)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="Confusion (test)")
    ax.set_xticklabels([plain(x) for x in names], rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticklabels([plain(x) for x in names])
    top = m.max() if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if m[i, j] > top / 2 else "black")
    return png(fig)


def roc_plot(labels: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> str:
    """ROC curve of the positive class (two classes) or one-vs-rest per class, with each AUC."""
    from loratune.tasks.metrics import binary_auc, roc_curve

    fig, (ax,) = _fig(4.2, 3.6)
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for c in classes:
        truth = labels == c
        if truth.all() or not truth.any():
            continue
        fpr, tpr = roc_curve(truth, probs[:, c])
        ax.plot(fpr, tpr, color=PALETTE[c % len(PALETTE)], lw=1.5,
                label=legend_label(f"{names[c]} (AUC {binary_auc(truth, probs[:, c]):.3f})"))
    ax.plot([0, 1], [0, 1], color="#aaa", ls=":", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)


def size_plot(trainable: int | None, all_params: int | None, adapter_bytes: int | None,
              model_bytes: int | None) -> str:
    """Two log-scale bars each: trained vs all parameters, adapter file vs model weights."""
    fig, axes = _fig(10, 1.9, cols=2)
    panels = [("parameters", [("trained", trainable), ("whole model", all_params)], count),
              ("bytes on disk", [("adapter", adapter_bytes), ("model", model_bytes)], human_bytes)]
    for ax, (title, bars, fmt) in zip(axes, panels):
        bars = [(k, v) for k, v in bars if v]
        ax.grid(True, axis="x", alpha=0.3)
        ax.grid(False, axis="y")
        if not bars:
            ax.set_axis_off()
            continue
        names, values = zip(*bars)
        ax.barh(names, values, color=[PALETTE[0], "#bbb"][:len(values)])
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 3, max(values) * 12)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v * 1.15, i, fmt(v), va="center", fontsize=9)
        if len(values) == 2 and values[0]:
            title += f": {values[1] / values[0]:,.0f}× fewer" if title == "parameters" else \
                f": {values[1] / values[0]:,.0f}× smaller"
        ax.set_title(title, fontsize=10)
    return png(fig)


# --- ΔW -----------------------------------------------------------------------------------------

def singular_values_plot(matrices: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """Left: σ_i of each ΔW (log scale). Right: share of ‖ΔW‖²_F held by the top i directions, with 90%."""
    fig, (left, right) = _fig(10, 3.4, cols=2)
    many = len(matrices) > 10
    for n, (m, name) in enumerate(zip(matrices, names)):
        s = np.asarray(m["singular_values"], dtype=float)
        if not s.size or not s[0] > 0:
            continue
        x = np.arange(1, s.size + 1)
        kw = dict(color=PALETTE[n % len(PALETTE)], lw=1, alpha=0.8, label=None if many else legend_label(name))
        left.plot(x, np.maximum(s, s[0] * 1e-12), marker=".", **kw)
        right.plot(x, np.cumsum(s ** 2) / np.sum(s ** 2), marker=".", **kw)
    right.axhline(0.9, color="#d62728", ls="--", lw=1, label="90% (effective rank)")
    left.set(yscale="log", xlabel="i", ylabel="σ_i", title="Singular values of ΔW")
    right.set(xlabel="top i directions", ylabel="share of ‖ΔW‖²_F", title="Energy held", ylim=(0, 1.03))
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
    right.legend(loc="lower right", fontsize=7, ncol=2 if len(matrices) > 4 else 1)
    return png(fig)


def phi_heatmaps(phi: dict[str, np.ndarray], names: Sequence[str], r1: str, r2: str, limit: int = 8) -> str:
    """φ(A1, A2, i, j) per matrix (the LoRA paper's Figure 3): i down, j across, 0 dark, 1 bright;
    at most ``limit`` matrices, evenly picked from first to last."""
    keys = list(phi)
    if len(keys) > limit:
        keys = [keys[round(i * (len(keys) - 1) / (limit - 1))] for i in range(limit)]
    label = dict(zip(phi, names))
    cols = len(keys) if len(keys) <= 4 else math.ceil(len(keys) / 2)
    rows = math.ceil(len(keys) / cols)
    fig, axes = _fig(2.7 * cols + 0.8, 2.6 * rows, cols=cols, rows=rows)
    image = None
    for ax, key in zip(axes, keys):
        m = phi[key]
        ax.grid(False)
        image = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto",
                          extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
        ax.set_xticks(_ticks(m.shape[1]))
        ax.set_yticks(_ticks(m.shape[0]))
        ax.set_title(plain(label[key]), fontsize=8)
        ax.set_xlabel(plain(f"j: {r2}"), fontsize=8)
        ax.set_ylabel(plain(f"i: {r1}"), fontsize=8)
    for ax in axes[len(keys):]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    return png(fig)


def _ticks(n: int) -> list[int]:
    step = max(1, math.ceil(n / 8))
    return list(range(1, n + 1, step))


# --- a search -----------------------------------------------------------------------------------

def metric_vs_options(rows: Sequence[dict[str, Any]], metric: str, options: Sequence[str],
                      series: str | None, best: str | None) -> str:
    """One panel per option (rank, lr on a log axis, dropout, ...): the metric of each trial as a point, one
    colour per value of ``series`` (the target set), with its 95% interval as a whisker where the row has one
    (``<metric>_lo``/``_hi``, trials.csv's). Points only: trials that share an option value differ in the
    others, so no line joins them."""
    fig, axes = _fig(4.0 * len(options), 3.4, cols=len(options))
    groups = sorted({str(r.get(series, "")) for r in rows}) if series else [""]
    colors = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    for ax, opt in zip(axes, options):
        for g in groups:
            mine = [r for r in rows if (not series or str(r.get(series, "")) == g) and finite(r.get(metric))
                    and is_number(r.get(opt))]
            if not mine:
                continue
            x, y = [float(r[opt]) for r in mine], [float(r[metric]) for r in mine]
            name = legend_label(f"{series} = {g}") if series else None
            ax.scatter(x, y, color=colors[g], s=28, alpha=0.85, label=name, zorder=3)
            bars = [(float(r[opt]), float(r[metric]), float(r[f"{metric}_lo"]), float(r[f"{metric}_hi"]))
                    for r in mine if finite(r.get(f"{metric}_lo")) and finite(r.get(f"{metric}_hi"))]
            if bars:                                  # whiskers only: (2, k) distances below and above the point
                bx, by, lo, hi = (np.array(v) for v in zip(*bars))
                ax.errorbar(bx, by, yerr=np.stack([np.maximum(by - lo, 0), np.maximum(hi - by, 0)]), fmt="none",
                            ecolor=colors[g], elinewidth=1, capsize=2, alpha=0.6, zorder=2)
        for r in rows:
            if best is not None and r.get("trial") == best and finite(r.get(metric)) and is_number(r.get(opt)):
                ax.scatter([float(r[opt])], [float(r[metric])], marker="*", s=260, facecolor="none",
                           edgecolor="black", lw=1.2, zorder=4, label="best")
        if opt == "lr":
            ax.set_xscale("log")
        _log_if_wide(ax, [float(r[metric]) for r in rows if finite(r.get(metric))])
        ax.set(xlabel=plain(opt), ylabel=plain(metric), title=plain(f"{metric} vs {opt}"))
        if opt == "rank":
            ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(axes[0])
    return png(fig)


def trial_curves(evals: dict[str, list[dict[str, Any]]], statuses: dict[str, str], metrics: Sequence[str],
                 max_epochs: int | None, best: str | None) -> str:
    """One panel per validation metric (``accuracy``, ``loss``): every trial's value per epoch, the
    best trial in black; the end of each curve is marked by how the trial ended (× ASHA stopped it,
    ● completed, ▼ collapsed, ▲ diverged): ASHA's cuts are the curves that stop before the last epoch."""
    fig, axes = _fig(5.0 * len(metrics), 3.6, cols=len(metrics))
    marks = {"completed": "o", "stopped_early": "X", "collapsed": "v", "diverged": "^", "failed": "s"}
    for ax, metric in zip(axes, metrics):
        seen: set[str] = set()
        for n, (trial, ev) in enumerate(evals.items()):
            pts = [(e["epoch"], e[metric]) for e in ev if finite(e.get(metric))]
            if not pts:
                continue
            x, y = zip(*pts)
            status, is_best = statuses.get(trial, ""), trial == best
            ax.plot(x, y, color="black" if is_best else PALETTE[n % len(PALETTE)], lw=2.4 if is_best else 1,
                    alpha=1 if is_best else 0.6, zorder=3 if is_best else 2, label="best trial" if is_best else None)
            ax.scatter([x[-1]], [y[-1]], marker=marks.get(status, "o"), s=70, color=STATUS_COLORS.get(status, "#555"),
                       edgecolor="black", lw=0.5, zorder=4, label=None if status in seen else legend_label(status.replace("_", " ")))
            seen.add(status)
        if max_epochs:                                 # passes inside an epoch (0.25 …) and epoch 0 (a causal
            first = min((e["epoch"] for ev in evals.values() for e in ev if finite(e.get(metric))),  # LM's base
                        default=1)                                                                    # model) too
            pad = 0.04 * max_epochs
            ax.set_xlim(min(first, 1) - pad, max_epochs + pad)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="epoch", ylabel=plain(f"validation {metric}"), title=plain(f"validation {metric} per epoch"))
        _log_if_wide(ax, [e[metric] for ev in evals.values() for e in ev if finite(e.get(metric))])
        _legend(ax)
    return png(fig)


# --- the page around the figures -----------------------------------------------------------------------



# --- numbers ------------------------------------------------------------------------------------



def _log_if_wide(ax: Any, values: list[float]) -> None:
    """A log y axis when positive values span more than 20× (losses of diverging and converged trials)."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")


def _legend(ax: Any, **kw: Any) -> None:
    """A legend only where something is labelled (matplotlib warns otherwise)."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, **{"loc": "best", **kw})


