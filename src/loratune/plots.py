"""The report's building blocks: figures as ``data:image/png;base64,...`` URIs, and the HTML around them.

Figures are built with ``matplotlib.figure.Figure`` (the Agg canvas), never ``pyplot``: no global
backend switch, no window, nothing left open, safe in a user's notebook or a worker thread.
Every figure function takes plain numbers (lists, dicts, numpy arrays) and returns one data URI.
The HTML pieces (tables, cards, the page shell with its inline CSS, sorting script and a
Content-Security-Policy that forbids every request) take strings and numbers; :mod:`loratune.report`
decides what goes on the page.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

DPI = 100
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
STATUS_COLORS = {"completed": "#2ca02c", "stopped_early": "#ff7f0e", "diverged": "#d62728", "failed": "#7f7f7f"}


def png(fig: Figure) -> str:
    """The figure as a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fig(width: float, height: float, cols: int = 1, rows: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


# --- a training run ------------------------------------------------------------------------------

def learning_curves(train: Sequence[tuple[int, float]], evals: Sequence[dict[str, Any]]) -> str:
    """Left: train loss per logged step, validation loss at each epoch's last step. Right: validation
    accuracy and F1 per epoch, the best epoch (lowest validation loss) marked."""
    fig, (left, right) = _fig(10, 3.4, cols=2)
    if train:
        steps, losses = zip(*train)
        left.plot(steps, losses, color=PALETTE[0], lw=1.2, label="train loss")
    ev = [e for e in evals if _finite(e.get("loss"))]
    if ev:
        left.plot([e["step"] for e in ev], [e["loss"] for e in ev], "o-", color=PALETTE[1], label="validation loss")
    left.set(xlabel="step", ylabel="cross-entropy", title="Loss")
    _legend(left, loc="upper right")
    for key, color in (("accuracy", PALETTE[2]), ("f1", PALETTE[4])):
        pts = [(e["epoch"], e[key]) for e in evals if _finite(e.get(key))]
        if pts:
            right.plot(*zip(*pts), "o-", color=color, label=f"validation {key}")
    if ev:
        best = min(ev, key=lambda e: e["loss"])
        right.axvline(best["epoch"], color="#999", ls="--", lw=1, label=f"best epoch ({best['epoch']})")
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
    ax.set_xticklabels(names, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticklabels(names)
    top = m.max() if m.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", color="white" if m[i, j] > top / 2 else "black")
    return png(fig)


def roc_plot(labels: np.ndarray, probs: np.ndarray, names: Sequence[str]) -> str:
    """ROC curve of the positive class (two classes) or one-vs-rest per class, with each AUC."""
    from sklearn.metrics import auc, roc_curve

    fig, (ax,) = _fig(4.2, 3.6)
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    for c in classes:
        truth = labels == c
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        ax.plot(fpr, tpr, color=PALETTE[c % len(PALETTE)], lw=1.5, label=f"{names[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="#aaa", ls=":", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    return png(fig)


def size_plot(trainable: int | None, all_params: int | None, adapter_bytes: int | None,
              model_bytes: int | None) -> str:
    """Two log-scale bars each: trained vs all parameters, adapter file vs model weights."""
    fig, axes = _fig(10, 1.9, cols=2)
    panels = [("parameters", [("trained", trainable), ("whole model", all_params)], _count),
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
        kw = dict(color=PALETTE[n % len(PALETTE)], lw=1, alpha=0.8, label=None if many else name)
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
        ax.set_title(label[key], fontsize=8)
        ax.set_xlabel(f"j: {r2}", fontsize=8)
        ax.set_ylabel(f"i: {r1}", fontsize=8)
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
    """One panel per option (rank, lr on a log axis, dropout, ...): the metric of each trial, one colour
    per value of ``series`` (the target set); for a numeric discrete option, the series' best per value is joined."""
    fig, axes = _fig(4.0 * len(options), 3.4, cols=len(options))
    groups = sorted({str(r.get(series, "")) for r in rows}) if series else [""]
    colors = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    for ax, opt in zip(axes, options):
        for g in groups:
            pts = sorted((float(r[opt]), float(r[metric])) for r in rows
                         if (not series or str(r.get(series, "")) == g) and _finite(r.get(metric)) and _num(r.get(opt)))
            if not pts:
                continue
            x, y = zip(*pts)
            name = f"{series} = {g}" if series else None
            ax.scatter(x, y, color=colors[g], s=28, alpha=0.85, label=name, zorder=3)
            if opt == "rank":                             # the Table 6 question: a line through the best per rank
                by = {}
                for xi, yi in pts:
                    by[xi] = min(by.get(xi, yi), yi) if metric.endswith("loss") else max(by.get(xi, yi), yi)
                ax.plot(list(by), list(by.values()), color=colors[g], lw=1, alpha=0.6)
        for r in rows:
            if best is not None and r.get("trial") == best and _finite(r.get(metric)) and _num(r.get(opt)):
                ax.scatter([float(r[opt])], [float(r[metric])], marker="*", s=260, facecolor="none",
                           edgecolor="black", lw=1.2, zorder=4, label="best")
        if opt == "lr":
            ax.set_xscale("log")
        _log_if_wide(ax, [float(r[metric]) for r in rows if _finite(r.get(metric))])
        ax.set(xlabel=opt, ylabel=metric, title=f"{metric} vs {opt}")
        if opt == "rank":
            ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(axes[0])
    return png(fig)


def trial_curves(evals: dict[str, list[dict[str, Any]]], statuses: dict[str, str], metrics: Sequence[str],
                 max_epochs: int | None, best: str | None) -> str:
    """One panel per validation metric (``accuracy``, ``loss``): every trial's value per epoch, the
    best trial in black; the end of each curve is marked by how the trial ended (× ASHA stopped it,
    ● completed, ▲ diverged): ASHA's cuts are the curves that stop before the last epoch."""
    fig, axes = _fig(5.0 * len(metrics), 3.6, cols=len(metrics))
    marks = {"completed": "o", "stopped_early": "X", "diverged": "^", "failed": "s"}
    for ax, metric in zip(axes, metrics):
        seen: set[str] = set()
        for n, (trial, ev) in enumerate(evals.items()):
            pts = [(e["epoch"], e[metric]) for e in ev if _finite(e.get(metric))]
            if not pts:
                continue
            x, y = zip(*pts)
            status, is_best = statuses.get(trial, ""), trial == best
            ax.plot(x, y, color="black" if is_best else PALETTE[n % len(PALETTE)], lw=2.4 if is_best else 1,
                    alpha=1 if is_best else 0.6, zorder=3 if is_best else 2, label="best trial" if is_best else None)
            ax.scatter([x[-1]], [y[-1]], marker=marks.get(status, "o"), s=70, color=STATUS_COLORS.get(status, "#555"),
                       edgecolor="black", lw=0.5, zorder=4, label=None if status in seen else status.replace("_", " "))
            seen.add(status)
        if max_epochs:
            ax.set_xlim(0.8, max_epochs + 0.2)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set(xlabel="epoch", ylabel=f"validation {metric}", title=f"validation {metric} per epoch")
        _log_if_wide(ax, [e[metric] for ev in evals.values() for e in ev if _finite(e.get(metric))])
        _legend(ax)
    return png(fig)


# --- the page around the figures -----------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:18px 20px 60px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-bottom:14px}.glance{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:12px 16px;flex:1 1 230px}
.card .k{color:#667;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:24px;font-weight:650;margin:2px 0}.card .d{color:#555;font-size:13px}
.card.win{border:2px solid #2ca02c;background:#f3fbf3}
table{border-collapse:collapse;background:#fff;margin:6px 0;font-size:13px}.scroll{overflow-x:auto;max-width:100%}
th,td{border:1px solid #dde;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#eef1f5}
td.t,th.t{text-align:left}tr.best td{background:#eaf7ea;font-weight:600}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#aab}
.status-completed{color:#2a7d2a}.status-stopped_early{color:#b35900}.status-diverged,.status-failed{color:#c0392b}
img{max-width:100%;display:block;margin:6px 0;background:#fff}.note{color:#777;font-style:italic}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}details{margin:8px 0}pre{background:#fff;padding:8px}
"""
SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
    var b=t.tBodies[0],rows=Array.from(b.rows),up=th.dataset.dir!=='asc';th.dataset.dir=up?'asc':'desc';
    function v(r){var c=r.cells[i],x=c.dataset.v!==undefined?c.dataset.v:c.textContent,n=parseFloat(x);
      return x!==''&&!isNaN(n)&&isFinite(x)?n:x;}
    rows.sort(function(a,c){var x=v(a),y=v(c);if(typeof x!==typeof y){x=String(x);y=String(y);}
      return (x<y?-1:x>y?1:0)*(up?1:-1);});rows.forEach(function(r){b.appendChild(r);});});});});
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; form-action 'none'"


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any, option: bool = False) -> str:
    """A cell: floats with 4 decimals (small ones in e-notation), None as '-'. An ``option`` value
    (alpha 16.0, lr 5e-4, dropout 0.1) is shown as written: whole numbers without decimals, 3 digits."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and option:
        return str(int(v)) if v.is_integer() and abs(v) < 1e6 else f"{v:.3g}"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.4f}" if abs(v) < 1e3 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def table(headers: list[str], rows: list[list[Any]], *, sortable: bool = False, text_cols: int = 1,
          row_class: list[str] | None = None, options: tuple[str, ...] = ()) -> str:
    """An HTML table; the first ``text_cols`` columns are left-aligned; numbers sort by value; the
    columns named in ``options`` hold option values (:func:`fmt`)."""
    th = "".join(f'<th class="t">{esc(h)}</th>' if i < text_cols else f"<th>{esc(h)}</th>" for i, h in enumerate(headers))
    body = []
    for n, row in enumerate(rows):
        cells = []
        for i, v in enumerate(row):
            attrs = ' class="t"' if i < text_cols else ""
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                attrs += f' data-v="{v!r}"'
            if isinstance(v, str) and v in STATUS_COLORS:
                attrs = f' class="t status-{v}"'
            cells.append(f"<td{attrs}>{esc(fmt(v, headers[i] in options))}</td>")
        cls = f' class="{row_class[n]}"' if row_class and row_class[n] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return (f'<table{" class=sortable" if sortable else ""}><thead><tr>{th}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{esc(alt)}">'


def card(key: str, value: str, detail: str = "", win: bool = False) -> str:
    return (f'<div class="card{" win" if win else ""}"><div class="k">{esc(key)}</div><div class="v">{esc(value)}</div>'
            f'<div class="d">{esc(detail)}</div></div>')


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def page(title: str, glance: list[str], body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name=viewport content="width=device-width,initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body><main>{''.join(glance)}{''.join(body)}</main>"
            f"<script>{SORT_JS}</script></body></html>\n")


# --- numbers ------------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _log_if_wide(ax: Any, values: list[float]) -> None:
    """A log y axis when positive values span more than 20× (losses of diverging and converged trials)."""
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")


def _legend(ax: Any, **kw: Any) -> None:
    """A legend only where something is labelled (matplotlib warns otherwise)."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=8, **{"loc": "best", **kw})


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
