"""``loratune report RUN_DIR``: one self-contained HTML page for a training run or a search.

The page is a single file: figures are PNG data URIs (:mod:`loratune.plots`), CSS and the table-
sorting script are inline, and a Content-Security-Policy forbids every request (``default-src
'none'``; images only from ``data:``), so it opens offline in any browser and sends nothing anywhere.

What it reads (missing optional pieces are skipped, with a line saying so):

- a run directory: ``results.json``, ``metrics.jsonl``, ``config.yaml``, ``adapter/``; the confusion
  matrix, per-class scores and ROC curve come from re-running the adapter on the test split, cut as
  in training (:func:`predict_test_split`).
- a search directory: ``trials.json`` (else ``trials.csv``), ``search.json``, ``search.yaml``,
  ``trials/<id>/`` (each trial's run directory), ``best/`` (the best trial's, test-evaluated).

The top of the page answers at a glance: which rank and targets won, the metrics, and how much
smaller the adapter is than the model.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import plots
from .errors import InputError
from .plots import card, esc, fmt, img, note, page, table

log = logging.getLogger(__name__)

SIZE_KEYS = ("trainable_params", "all_params", "adapter_bytes", "model_bytes")


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN_DIR/report.html`` (a run or a search directory) and return its path."""
    run = Path(run_dir)
    kind = directory_kind(run)
    title, glance, body = (search_page(run) if kind == "search" else run_page(run))
    out = run / "report.html"
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text(page(title, glance, body), encoding="utf-8")
    os.replace(tmp, out)
    log.info("report written to %s", out)
    return out


def directory_kind(run: Path) -> str:
    """``"search"`` or ``"run"``; InputError for anything else."""
    if not run.exists():
        raise InputError(f"RUN_DIR: {run} does not exist")
    if not run.is_dir():
        raise InputError(f"RUN_DIR: {run} is a file, not a run or search directory")
    if any((run / f).is_file() for f in ("trials.json", "trials.csv", "search.json")):
        return "search"
    if (run / "results.json").is_file() or (run / "metrics.jsonl").is_file():
        return "run"
    raise InputError(f"RUN_DIR: {run} is not a run directory (no results.json or metrics.jsonl) "
                     "nor a search directory (no trials.json, trials.csv or search.json)")


# --- reading ---------------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None (logged) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable, skipped (%s)", path, e)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file; broken lines (a run killed mid-write) are skipped."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        log.warning("%s: unreadable, skipped (%s)", path, e)
        doc = None
    return doc if isinstance(doc, dict) else {}


def curves(run: Path) -> tuple[list[tuple[int, float]], list[dict[str, Any]]]:
    """(train loss per logged step, validation evaluations) from ``metrics.jsonl``."""
    lines = read_jsonl(run / "metrics.jsonl")
    train = [(int(x["step"]), float(x["loss"])) for x in lines if x.get("type") == "train"
             and isinstance(x.get("step"), int) and plots._finite(x.get("loss"))]
    evals = [x for x in lines if x.get("type") == "eval" and isinstance(x.get("epoch"), int)]
    return train, evals


def predict_test_split(run: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(true class ids (N,), probabilities (N, C), label names): the run's adapter on its test split,
    cut from its data exactly as in training (the run's ``config.yaml``, the adapter's classes)."""
    from .data import load_splits, tokenize
    from .forward import predict_probs
    from .inference import load
    from .rundir import read_config
    from .runtime import resolve_precision

    cfg, _ = read_config(run)
    loaded = load(run / "adapter", device=cfg.device)
    splits = load_splits(cfg, label_names=loaded.label_names)
    enc = tokenize(splits.test, loaded.tokenizer, loaded.max_length)
    device = next(loaded.model.parameters()).device
    probs, _ = predict_probs(loaded.model, enc, device, resolve_precision(cfg.precision, device), pad_id=loaded.pad_id)
    return enc.labels, probs, loaded.label_names


def guarded(what: str, fn: Any, *args: Any) -> list[str]:
    """A section, or one line saying why it is missing: a report is written even from a damaged run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one broken section must not cost the whole report
        log.warning("report: %s skipped: %s", what, e)
        return [note(f"{what}: not available ({type(e).__name__}: {e})")]


# --- sections shared by runs and searches ------------------------------------------------------------

def size_facts(train: dict[str, Any]) -> str:
    """'1.1 kB adapter vs 89.4 kB model: 16× smaller' (or '')."""
    a, m = train.get("adapter_bytes"), train.get("model_bytes")
    if not (a and m):
        return ""
    return f"{plots.human_bytes(a)} adapter vs {plots.human_bytes(m)} model"


def ratio(train: dict[str, Any]) -> float | None:
    a, m = train.get("adapter_bytes"), train.get("model_bytes")
    return m / a if a and m else None


def size_section(train: dict[str, Any]) -> list[str]:
    if not any(train.get(k) for k in SIZE_KEYS):
        return [note("sizes: not recorded (the run did not finish)")]
    t, a = train.get("trainable_params"), train.get("all_params")
    share = f"{t:,} of {a:,} parameters trained ({100 * t / a:.3g}%, the task head included)" if t and a else ""
    return ["<h2>Size</h2>", img(plots.size_plot(t, a, train.get("adapter_bytes"), train.get("model_bytes")), "sizes"),
            f"<p>{esc(share)}. {esc(size_facts(train))}.</p>"]


def test_section(run: Path) -> list[str]:
    from .metrics import confusion, per_class

    labels, probs, names = predict_test_split(run)
    preds = probs.argmax(axis=1)
    pc = per_class(labels, preds, len(names))
    rows = [[n, pc["precision"][i], pc["recall"][i], pc["f1"][i], pc["support"][i]] for i, n in enumerate(names)]
    return ["<h3>Test split: confusion, per class, ROC</h3><div class=row>",
            img(plots.confusion_plot(confusion(labels, preds, len(names)), names), "confusion matrix"),
            img(plots.roc_plot(labels, probs, names), "ROC curve"), "</div>",
            table(["class", "precision", "recall", "F1", "support"], rows)]


def metrics_table(results: dict[str, Any]) -> str:
    keys = ["loss", "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"]
    rows = [[split] + [(results.get(split) or {}).get(k) for k in keys] for split in ("validation", "test")
            if results.get(split)]
    return table(["split"] + keys, rows)


def analysis_section(adapter: Path, compare: Path | None = None, labels: tuple[str, str] = ("", "")) -> list[str]:
    """ΔW of ``adapter``: table and spectrum; with ``compare``, φ heatmaps (Figure 3 of the LoRA paper)."""
    from .analysis import analyze_adapter, short_names

    res = analyze_adapter(adapter, compare)
    mats = [m.to_json() for m in res.matrices]
    names = short_names([m["name"] for m in mats])
    rows = [[n, "×".join(map(str, m["shape"])), m["rank"], m["effective_rank"], m["frobenius_norm"],
             m["amplification"], " ".join(f"{x:.3g}" for x in m["singular_values"][:4])] for n, m in zip(names, mats)]
    out = ["<h2>What the adapter learned: ΔW = (α/r)·B·A</h2>",
           "<p>Per adapted matrix: the effective rank is the fewest directions holding 90% of ‖ΔW‖²<sub>F</sub>; "
           "the amplification ‖ΔW‖<sub>F</sub> / ‖Uᵀ·W0·V‖<sub>F</sub> says how strongly ΔW boosts directions the "
           "frozen weight W0 barely uses (LoRA paper §7).</p>",
           table(["matrix", "shape", "r", "effective rank", "‖ΔW‖_F", "amplification", "top singular values"], rows,
                 sortable=True),
           img(plots.singular_values_plot(mats, names), "singular values")]
    if res.note:
        out.append(note(f"amplification: {res.note}"))
    if compare is not None and res.phi:
        phi_names = short_names(list(res.phi))
        out += [f"<h3>Subspace similarity φ between {esc(labels[0])} and {esc(labels[1])}</h3>",
                "<p>φ(i, j) = ‖V₁[:, :i]ᵀ·V₂[:, :j]‖²<sub>F</sub> / min(i, j) over the right-singular vectors of the "
                "two A matrices: 1 where the top directions coincide, 0 where they are orthogonal.</p>",
                img(plots.phi_heatmaps(res.phi, phi_names, labels[0], labels[1]), "subspace similarity")]
    return out


def config_section(run: Path) -> list[str]:
    cfg = read_yaml(run / "config.yaml")
    if not cfg:
        return []
    text = yaml.safe_dump(cfg, sort_keys=False)
    return [f"<details><summary>Configuration (config.yaml)</summary><pre>{esc(text)}</pre></details>"]


def describe_targets(run: Path, given: Any = None) -> str:
    """'q,v (query, value)': the targets as given and the module names they expanded to."""
    given = given if given is not None else read_yaml(run / "config.yaml").get("targets")
    cfg = read_json(run / "adapter" / "adapter_config.json") or {}
    modules = cfg.get("target_modules")
    text = fmt(given) if given is not None else ""
    if isinstance(modules, list) and modules and ",".join(map(str, modules)) != text:
        text = f"{text} ({', '.join(map(str, modules))})" if text else ", ".join(map(str, modules))
    return text or "-"


# --- a training run ---------------------------------------------------------------------------------------

def run_page(run: Path) -> tuple[str, list[str], list[str]]:
    results = read_json(run / "results.json") or {}
    cfg = read_yaml(run / "config.yaml")
    train_stats = results.get("train") or {}
    test, val = results.get("test") or {}, results.get("validation") or {}
    title = f"loratune run {run.resolve().name}"
    sub = " · ".join(f"{k} {fmt(cfg[k], True)}" for k in ("model", "data", "rank", "alpha", "lr", "dropout", "epochs") if k in cfg)
    glance = [f"<h1>{esc(title)}</h1><div class=sub>{esc(sub)}</div><div class=glance>"]
    if results:
        main = test or val
        glance.append(card("test accuracy" if test else "validation accuracy", fmt(main.get("accuracy")),
                           f"F1 {fmt(main.get('f1'))} · ROC-AUC {fmt(main.get('roc_auc'))} · best epoch "
                           f"{fmt(results.get('best_epoch'))}", win=True))
    else:
        glance.append(card("status", "not finished", "no results.json yet: curves so far"))
    glance.append(card("adapter", f"rank {fmt(cfg.get('rank'))}", f"targets {describe_targets(run)}"))
    r = ratio(train_stats)
    if r:
        glance.append(card("adapter size", f"{r:,.0f}× smaller", size_facts(train_stats)))
    if train_stats.get("seconds"):
        glance.append(card("training time", f"{train_stats['seconds']:.1f} s",
                           f"{train_stats.get('tokens_per_s', 0):,.0f} tokens/s"))
    glance.append("</div>")
    body = ["<h2>Learning curves</h2>"] + guarded("learning curves", lambda: [img(plots.learning_curves(*curves(run)),
                                                                                  "learning curves")])
    if results:
        body += ["<h2>Metrics</h2>", metrics_table(results)]
    if (run / "adapter").is_dir() and (run / "config.yaml").is_file():
        body += guarded("test-split predictions", test_section, run)
    body += size_section(train_stats)
    if (run / "adapter").is_dir():
        body += guarded("ΔW analysis", analysis_section, run / "adapter")
    body += config_section(run)
    return title, glance, body


# --- a search ---------------------------------------------------------------------------------------------

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
    evals = [e for e in curves(run)[1] if plots._finite(e.get("loss"))]
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
    ok = [r for r in rows if r.get("status") in ("completed", "stopped_early") and plots._finite(r.get(metric))]
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
            if any(plots._finite(row.get(m)) for row in ok):
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
