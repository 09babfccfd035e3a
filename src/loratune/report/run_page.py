"""The report page of one training run: the numbers at a glance, curves, metrics, test split, sizes, ΔW."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratune.report.html import card, esc, fmt
from loratune.report.sections import (
    analysis_section,
    config_section,
    describe_targets,
    guarded,
    learning_curves_section,
    metrics_table,
    ratio,
    size_facts,
    size_section,
    test_section,
)
from loratune.training import rundir


def run_page(run: Path) -> tuple[str, list[str], list[str]]:
    """(title, glance, body) of a run directory's page; what the run has not written yet is left out or
    said to be missing."""
    results = rundir.read_results(run) or {}
    cfg = rundir.read_config_doc(run)
    title = f"loratune run {run.resolve().name}"
    body = learning_curves_section(run)
    if results:
        body += ["<h2>Metrics</h2>", metrics_table(results)]
    if (run / "adapter").is_dir() and (run / "config.yaml").is_file():
        body += guarded("test-split predictions", test_section, run)
    body += size_section(results.get("train") or {})
    if (run / "adapter").is_dir():
        body += guarded("ΔW analysis", analysis_section, run / "adapter")
    body += config_section(run)
    return title, _glance(run, title, results, cfg), body


def _glance(run: Path, title: str, results: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The top of the page: the main metric, the adapter's rank and targets, its size, the training time."""
    train_stats = results.get("train") or {}
    test, val = results.get("test") or {}, results.get("validation") or {}
    sub = " · ".join(f"{k} {fmt(cfg[k], True)}" for k in ("model", "data", "rank", "alpha", "lr", "dropout", "epochs")
                     if k in cfg)
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
    return glance
