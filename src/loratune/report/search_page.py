"""The search page of the report: the winner at a glance, the trials table, what each option did.

Reads ``trials.json`` (else ``trials.csv``), ``search.json``, ``search.yaml``, ``trials/<id>/`` and
``best/``; every missing piece becomes one line saying so (:func:`loratune.report.guarded`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml

from loratune.report import plots
from loratune.report.html import card, esc, finite, fmt, img, table
from loratune.report.sections import (
    analysis_section,
    curves,
    describe_targets,
    guarded,
    ratio,
    read_json,
    read_yaml,
    size_facts,
    size_section,
    test_section,
)

STANDARD = ("trial", "status", "epochs_run", "val_loss", "val_accuracy", "val_f1")
OPTION_PLOTS = ("rank", "lr", "dropout")


def read_trials(run: Path) -> list[dict[str, Any]]:
    """Rows of ``trials.json``, else of ``trials.csv`` (numbers parsed, empty cells None)."""
    rows = read_json(run / "trials.json")
    if isinstance(rows, list):
        return [r for r in rows if isinstance(r, dict)]
    if not (run / "trials.csv").is_file():
        return []
    with open(run / "trials.csv", newline="", encoding="utf-8") as f:
        return [{k: v if k in ("trial", "status", "targets") else _parse(v) for k, v in row.items() if k is not None}
                for row in csv.DictReader(f)]


def _parse(v: str | None) -> Any:
    """A CSV cell: '' -> None, numbers -> int / float (never '1_000': Python would read it), else the text."""
    if not v:
        return None
    for cast in (int, float):
        try:
            return cast(v) if "_" not in v else v
        except ValueError:
            pass
    return v


def _best_epoch(run: Path) -> dict[str, Any]:
    """The evaluation with the lowest validation loss in ``metrics.jsonl`` (the epoch whose adapter was kept)."""
    evals = [e for e in curves(run)[1] if finite(e.get("loss"))]
    return min(evals, key=lambda e: e["loss"]) if evals else {}


def _adapter_config(adapter: Path) -> tuple[int | None, set[str]]:
    """(rank, target modules) from an adapter's ``adapter_config.json`` ((None, set()) if unreadable)."""
    cfg = read_json(adapter / "adapter_config.json") or {}
    r, targets = cfg.get("r"), cfg.get("target_modules")
    return (r if isinstance(r, int) else None), set(targets) if isinstance(targets, list) else {str(targets)}


def _partner(run: Path, rows: list[dict[str, Any]], best: str, adapter: Path) -> tuple[Path, str] | None:
    """A trial adapter of another rank to compare the best one with, as the paper compares r = 8 with
    r = 64: the most target modules in common first, then the longest trained, then a larger rank, then
    the most different one."""
    rank, targets = _adapter_config(adapter)
    cands = []
    for n, row in enumerate(rows):
        other = run / "trials" / str(row.get("trial")) / "adapter"
        r, t = _adapter_config(other)
        if r and rank and r != rank and t & targets and str(row.get("trial")) != best:
            epochs = row.get("epochs_run") if isinstance(row.get("epochs_run"), int) else 0
            cands.append(((-len(t & targets), -epochs, r < rank, -abs(math.log(r / rank)), n), other,
                          f"trial {row.get('trial')} (r={r})"))
    return min(cands, key=lambda c: c[0])[1:] if cands else None


def search_page(run: Path) -> tuple[str, list[str], list[str]]:
    summary = read_json(run / "search.json") or {}
    doc = read_yaml(run / "search.yaml")
    rows = read_trials(run)
    metric = summary.get("metric") or doc.get("metric") or "val_loss"
    mode = summary.get("mode") or doc.get("mode") or ("min" if metric.endswith("loss") else "max")
    mname = metric.removeprefix("val_")
    for row in rows:                                    # a metric outside the table's columns: from the trial's log
        if row.get(metric) is None:
            row[metric] = _best_epoch(run / "trials" / str(row.get("trial"))).get(mname)
    keys = [k for k in (rows[0] if rows else {}) if k not in STANDARD and k != metric]
    ok = [r for r in rows if r.get("status") in ("completed", "stopped_early") and finite(r.get(metric))]
    best_res = read_json(run / "best" / "results.json") or {}
    info = summary.get("best") or {}
    best = info.get("trial") or best_res.get("trial") or (
        (min if mode == "min" else max)(ok, key=lambda r: r[metric])["trial"] if ok else None)
    best = str(best) if best is not None else None
    best_row = next((r for r in rows if str(r.get("trial")) == best), {})
    cfg = {**read_yaml(run / "best" / "config.yaml"), **(info.get("config") or best_res.get("config") or {}),
           **{k: best_row[k] for k in keys if k in best_row}}
    stats = best_res.get("train") or {}
    val = info.get("validation") or best_res.get("validation") or {}
    test = info.get("test") or best_res.get("test") or {}
    default = summary.get("default") or {}
    statuses = {str(r.get("trial")): str(r.get("status")) for r in rows}
    seconds = summary.get("seconds")
    title = f"loratune search {run.resolve().name}"

    # -- at a glance: which rank and targets won, by how much, and how small the adapter is
    glance = [f"<h1>{esc(title)}</h1><div class=sub>{len(rows)} trials · best by {esc(metric)} ({esc(mode)}) · "
              f"model {esc(cfg.get('model', '-'))} · data {esc(cfg.get('data', '-'))}</div>"]
    r = ratio(stats)
    if best is not None:
        dval = (default.get("validation") or {}).get(mname)
        vs = ("the untuned default was already the best" if default.get("trial") == best else
              f"untuned default {fmt(dval)}" if dval is not None else "")
        glance.append("<p style='font-size:16px'><b>" + esc(
            f"Rank {fmt(cfg.get('rank'))} on {describe_targets(run / 'best', cfg.get('targets'))} won: validation "
            f"{mname} {fmt(val.get(mname))}" + (f" ({vs})" if vs else "")
            + (f", test accuracy {fmt(test.get('accuracy'))}" if test else "")
            + (f". Its adapter is {r:,.0f}× smaller than the model." if r else ".")) + "</b></p><div class=glance>")
        others = " · ".join(f"{k} {fmt(cfg[k], True)}" for k in keys if k not in ("rank", "targets") and k in cfg)
        glance.append(card("winner", f"rank {fmt(cfg.get('rank'))} · {fmt(cfg.get('targets'))}",
                           f"{others} — trial {best}", win=True))
        glance.append(card(f"validation {mname}", fmt(val.get(mname)), " · ".join(x for x in (
            f"test accuracy {fmt(test.get('accuracy'))}, F1 {fmt(test.get('f1'))}" if test else "", vs) if x)))
    else:
        glance.append("<div class=glance>" + card("winner", "none", "no trial finished with a finite metric"))
    if r:
        t, a = stats.get("trainable_params"), stats.get("all_params")
        glance.append(card("adapter size", f"{r:,.0f}× smaller", size_facts(stats)
                           + (f" · {100 * t / a:.2g}% of the parameters trained" if t and a else "")))
    ended = ", ".join(f"{n} {s.replace('_', ' ')}" + (" (ASHA)" if s == "stopped_early" else "") for s, n in
                      ((s, list(statuses.values()).count(s)) for s in plots.STATUS_COLORS) if n)
    glance.append(card("search", f"{len(rows)} trials" + (f" · {_duration(seconds)}" if seconds else ""), ended))
    glance.append("</div>")

    # -- the details
    body: list[str] = []
    if best is not None:
        shown = keys + [k for k in ("rank", "alpha", "targets", "lr", "dropout", "epochs", "batch_size") if k not in keys]
        mk = ["loss", "accuracy", "f1", "f1_macro", "roc_auc"]
        results = [(f"best (trial {best})", {"validation": val, "test": test})]
        if default and default.get("trial") != best:
            results.append((f"untuned default (trial {default.get('trial')})", default))
        body += ["<h2>Best configuration</h2><div class=row>",
                 table(["option", "value"], [[k, cfg[k]] for k in shown if k in cfg], options=("value",)),
                 table(["trial", "split"] + mk, [[name, split] + [(res.get(split) or {}).get(k) for k in mk]
                                                 for name, res in results for split in ("validation", "test")
                                                 if res.get(split)], text_cols=2), "</div>"]
    body += ["<h2>Trials</h2><p>Click a column header to sort.</p>"] + guarded(
        "trials table", _trials_table, run, rows, keys, best)
    options = [o for o in OPTION_PLOTS if o in keys]
    if options and ok:
        series = "targets" if "targets" in keys else None
        body.append(f"<h2>What mattered</h2><p>Each trial's best-epoch score against the searched options; "
                    f"{'one colour per target set; ' if series else ''}the star is the winner.</p>")
        for m in dict.fromkeys([metric, "val_accuracy" if metric != "val_accuracy" else "val_loss"]):
            if any(finite(row.get(m)) for row in ok):
                body += guarded(f"{m} plots", lambda m=m: [img(plots.metric_vs_options(ok, m, options, series, best),
                                                                 f"{m} against {', '.join(options)}")])
    shown_metrics = [mname, "accuracy" if mname != "accuracy" else "loss"]
    by_trial = {str(row.get("trial")): curves(run / "trials" / str(row.get("trial")))[1] for row in rows}
    if any(by_trial.values()):
        body += ["<h2>Learning curves: where ASHA stopped each trial</h2>"] + guarded(
            "trial curves", lambda: [img(plots.trial_curves(by_trial, statuses, shown_metrics, doc.get("max_epochs"),
                                                            best), "learning curves of all trials")])
    if best is not None:
        body += size_section(stats)
    if seconds:
        body.append(f"<h2>Wall time</h2><p>The search took {esc(_duration(seconds))} for "
                    f"{len(rows)} trials; the table shows each trial's training seconds where it finished.</p>")
    if best is not None and (run / "best" / "adapter").is_dir():
        body.append(f"<h2>The best adapter (trial {esc(best)})</h2>")
        if (run / "best" / "config.yaml").is_file():
            body += guarded("test-split predictions", test_section, run / "best")
        partner = _partner(run, rows, best, run / "best" / "adapter")
        body += guarded("ΔW analysis", analysis_section, run / "best" / "adapter", partner[0] if partner else None,
                        (f"best (r={_adapter_config(run / 'best' / 'adapter')[0]})", partner[1] if partner else ""))
    if doc:
        body.append(f"<details><summary>Search settings (search.yaml)</summary><pre>"
                    f"{esc(yaml.safe_dump(doc, sort_keys=False))}</pre></details>")
    return title, glance, body


def _trials_table(run: Path, rows: list[dict[str, Any]], keys: list[str], best: str | None) -> list[str]:
    """Every column of the rows, plus each trial's adapter size and training seconds (where it finished)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cells, classes = [], []
    for row in rows:
        tdir = run / "trials" / str(row.get("trial"))
        weights = tdir / "adapter" / "adapter_model.safetensors"
        secs = ((read_json(tdir / "results.json") or {}).get("train") or {}).get("seconds")
        cells.append([row.get(c) for c in cols] + [weights.stat().st_size if weights.is_file() else None,
                                                   round(secs, 1) if isinstance(secs, (int, float)) else None])
        classes.append("best" if str(row.get("trial")) == best else "")
    html_table = table(cols + ["adapter bytes", "train s"], cells, sortable=True, text_cols=2, row_class=classes,
                       options=tuple(keys))
    return [f"<div class=scroll>{html_table}</div>"]


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"
