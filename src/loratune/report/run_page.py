"""The report page of one training run: the numbers at a glance, curves, metrics, the comparison with full
fine-tuning (``--baseline``), test split, sizes, ΔW. A causal-LM run's metrics have the base model's beside the
trained ones, and its sample generations (generations.json) stand in for the classifier's test split.

A full fine-tuning run (``method: full`` in config.yaml) has no adapter: its page says how many parameters
trained instead of the adapter's rank and targets, runs its ``model/`` on the test split and has no ΔW.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratune.report import baseline as bl
from loratune.report.html import card, esc, fmt, human_bytes, note
from loratune.report.sections import (
    analysis_section,
    config_section,
    describe_targets,
    generations_section,
    guarded,
    learning_curves_section,
    metrics_table,
    ratio,
    size_facts,
    size_section,
    test_section,
)
from loratune.training import rundir
from loratune.training.options import LORA_ONLY


def run_page(run: Path, baseline: bl.Baseline | None = None, baseline_note: str | None = None
             ) -> tuple[str, list[str], list[str]]:
    """(title, glance, body) of a run directory's page; what the run has not written yet is left out or
    said to be missing. ``baseline``: a checked full fine-tuning run to compare with (``baseline_note``: why a
    remembered one is not shown)."""
    results = rundir.read_results(run) or {}
    cfg = rundir.read_config_doc(run)
    full = bl.method_of(cfg) == "full"
    weights = bl.weights_dir(run, cfg)
    title = f"loratune run {run.resolve().name}"
    cmp = bl.compare(results, baseline) if baseline is not None else None
    body = learning_curves_section(run)
    if results:
        body += ["<h2>Metrics</h2>", metrics_table(results)]
    if cmp is not None:
        body += bl.section(cmp)
    elif baseline_note:
        body.append(note(baseline_note))
    causal = cfg.get("task") == "causal-lm"
    if causal:
        body += guarded("sample generations", generations_section, run)
    if weights.is_dir() and (run / "config.yaml").is_file() and not causal:     # no classes to draw for an LLM
        body += guarded("test-split predictions", test_section, run)
    body += size_section(results.get("train") or {}, full=full)
    if not full and weights.is_dir():
        body += guarded("ΔW analysis", analysis_section, weights)
    body += config_section(run)
    return title, _glance(run, title, results, cfg, cmp), body


def _glance(run: Path, title: str, results: dict[str, Any], cfg: dict[str, Any], cmp: bl.Comparison | None
            ) -> list[str]:
    """The top of the page: the main metric, the adapter's rank and targets (full fine-tuning: the parameters
    trained), its size, the comparison with full fine-tuning, the training time."""
    train_stats = results.get("train") or {}
    test, val = results.get("test") or {}, results.get("validation") or {}
    full = bl.method_of(cfg) == "full"
    keys = [k for k in ("model", "data", "rank", "alpha", "lr", "dropout", "epochs") if k in cfg
            and not (full and k in LORA_ONLY)]
    sub = ("full fine-tuning · " if full else "") + " · ".join(f"{k} {fmt(cfg[k], True)}" for k in keys)
    glance = []
    if cmp is not None:
        glance.append(f"<h1>{esc(title)}</h1><div class=sub>{esc(sub)}</div>"
                      f"<p style='font-size:16px'><b>{esc(cmp.sentence)}.</b></p><div class=glance>")
    else:
        glance.append(f"<h1>{esc(title)}</h1><div class=sub>{esc(sub)}</div><div class=glance>")
    if results and cfg.get("task") == "causal-lm":
        main, split = (test, "test") if test else (val, "validation")
        before = ((results.get("baseline") or {}).get(split) or {})
        key = "accuracy" if "accuracy" in main else "exact_match"
        glance.append(card(f"{split} {key.replace('_', ' ')}", fmt(main.get(key)),
                           f"base model {fmt(before.get(key))} · exact match {fmt(main.get('exact_match'))} · "
                           f"loss {fmt(main.get('loss'))} (base {fmt(before.get('loss'))})", win=True))
    elif results:
        main = test or val
        glance.append(card("test accuracy" if test else "validation accuracy", fmt(main.get("accuracy")),
                           f"F1 {fmt(main.get('f1'))} · ROC-AUC {fmt(main.get('roc_auc'))} · best epoch "
                           f"{fmt(results.get('best_epoch'))}", win=True))
    else:
        glance.append(card("status", "not finished", "no results.json yet: curves so far"))
    if cmp is not None:
        glance.append(bl.glance_card(cmp))
    if full:
        t, a = train_stats.get("trainable_params"), train_stats.get("all_params")
        glance.append(card("full fine-tuning", f"{t:,} parameters trained" if t else "every weight trains",
                           ("every weight of the model · " if t and t == a else f"{100 * t / a:.3g}% of {a:,} · "
                            if t and a else "") + "no adapter: model/ is the whole fine-tuned model"))
        if train_stats.get("adapter_bytes"):
            glance.append(card("model file", human_bytes(train_stats["adapter_bytes"]), "every weight saved"))
    else:
        glance.append(card("adapter", f"rank {fmt(cfg.get('rank'))}",
                           " · ".join([f"targets {describe_targets(run)}", *variant_facts(cfg)])))
        r = ratio(train_stats)
        if r:
            glance.append(card("adapter size", f"{r:,.0f}× smaller", size_facts(train_stats)))
    if train_stats.get("seconds"):
        glance.append(card("training time", f"{train_stats['seconds']:.1f} s",
                           f"{train_stats.get('tokens_per_s', 0):,.0f} tokens/s"))
    glance.append("</div>")
    return glance


def variant_facts(cfg: dict[str, Any]) -> list[str]:
    """What a LoRA variant changes about the adapter, in words: DoRA's magnitudes; PiSSA/OLoRA's saved rank."""
    facts = []
    if cfg.get("variant") == "dora":
        facts.append("DoRA: a learned magnitude per output row")
    init = cfg.get("init")
    if init in ("pissa", "olora") and isinstance(cfg.get("rank"), int):
        facts.append(f"{'PiSSA' if init == 'pissa' else 'OLoRA'} init: adapter/ is saved converted for the original "
                     f"W0 (peft's rule), at rank 2r = {2 * cfg['rank']}")
    return facts
