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

import json
import logging
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
    if kind == "search":
        from .report_search import search_page

        title, glance, body = search_page(run)
    else:
        title, glance, body = run_page(run)
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
