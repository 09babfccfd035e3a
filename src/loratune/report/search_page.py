"""The search page of the report: the winner at a glance, the trials table, what each option did, and the best
trial beside full fine-tuning where there is a baseline (:mod:`loratune.report.baseline`).

Reads ``trials.json`` (else ``trials.csv``), ``search.json``, ``search.yaml``, ``trials/<id>/`` and
``best/``; every missing piece becomes one line saying so (:func:`loratune.report.sections.guarded`).

A ``--method full`` search (``method: full`` under search.yaml's ``options:``; a search from before ``--method``
has no key and is LoRA, :func:`loratune.report.baseline.method_of`) has no adapters: its page names the
searched options that won (the learning rate by default) instead of rank and targets, says how many
parameters trained, runs ``best/model`` on the test split and has no adapter sizes or ΔW.

A causal-LM search (``task: causal-lm``) shows the base model's metrics (``best/results.json``'s ``baseline``, from
``base_model.json``) beside the best trial's, and the best trial's learning curves and sample generations
(``best/generations.json``) where a classifier's page has its test split's predictions.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratune.report import baseline as bl
from loratune.report import plots
from loratune.report.html import card, esc, finite, fmt, img, note, table
from loratune.report.sections import (
    NO_FINITE_LOSS,
    analysis_section,
    describe_targets,
    generations_section,
    guarded,
    learning_curves_section,
    ratio,
    size_facts,
    size_section,
    test_section,
    trained,
)
from loratune.search.space import INTERVAL_COLUMNS, METRICS
from loratune.search.stats import p_text
from loratune.training import rundir
from loratune.training.options import LORA_ONLY

STANDARD = ("trial", "status", "epochs_run", *METRICS, *INTERVAL_COLUMNS)   # the rest of a row: searched options
OPTION_PLOTS = ("rank", "lr", "dropout")


def read_trials(run: Path) -> list[dict[str, Any]]:
    """Rows of ``trials.json``, else of ``trials.csv`` (numbers parsed, empty cells None)."""
    rows = rundir.read_json(run / "trials.json")
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


def _adapter_config(adapter: Path) -> tuple[int | None, set[str]]:
    """(rank, target modules) from an adapter's ``adapter_config.json`` ((None, set()) if unreadable)."""
    cfg = rundir.read_json(adapter / "adapter_config.json") or {}
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


@dataclass
class _Search:
    """What the search page shows, gathered once from the search directory's files."""

    run: Path
    title: str
    doc: dict[str, Any]                          # search.yaml
    rows: list[dict[str, Any]]                   # the trials table
    evals: dict[str, list[dict[str, Any]]]       # trial -> its per-epoch validation metrics
    metric: str
    mode: str
    keys: list[str]                              # the searched options
    ok: list[dict[str, Any]]                     # rows that finished with a finite metric
    best: str | None                             # the best trial's id
    cfg: dict[str, Any]                          # the best trial's options
    stats: dict[str, Any]                        # the best trial's results.json "train"
    val: dict[str, Any]
    test: dict[str, Any]
    default: dict[str, Any]                      # search.json's untuned default trial
    statuses: dict[str, str]
    seconds: float | None
    full: bool = False                           # a --method full search: no adapters, trials keep model/
    cmp: bl.Comparison | None = None             # the best trial against full fine-tuning (--baseline)
    baseline_note: str | None = None             # why a remembered baseline is not shown
    comparison: dict[str, Any] = field(default_factory=dict)   # search.json's: best vs default on test (McNemar)
    causal: bool = False                         # a causal-LM search: base-model metrics, sample generations
    base: dict[str, Any] = field(default_factory=dict)         # causal LM: the base model's metrics per split

    @property
    def mname(self) -> str:
        """The metric without its ``val_`` prefix: the key in a metrics object."""
        return self.metric.removeprefix("val_")

    def shown_options(self, keys: list[str]) -> list[str]:
        """``keys`` without the adapter's options where there is no adapter (a full search)."""
        return [k for k in keys if not (self.full and k in LORA_ONLY)]


def search_page(run: Path, baseline: bl.Baseline | None = None, baseline_note: str | None = None
                ) -> tuple[str, list[str], list[str]]:
    """(title, glance, body) of a search directory's page; ``baseline``: a checked full fine-tuning run to
    compare the best trial with (``baseline_note``: why a remembered one is not shown)."""
    s = _gather(run)
    if baseline is not None and s.best is not None:
        s.cmp = bl.compare({"validation": s.val, "test": s.test, "train": s.stats}, baseline)
    s.baseline_note = baseline_note
    return s.title, _glance(s), _body(s)


def search_method(run: Path) -> str:
    """``lora`` or ``full``: the method under search.yaml's ``options:`` (the best trial's config.yaml where
    search.yaml is missing); a search from before ``--method`` has no key: LoRA."""
    return bl.method_of(bl.lora_config(run, "search"))


def _gather(run: Path) -> _Search:
    """Read the search's files; a metric outside the table's columns comes from each trial's own log."""
    summary = rundir.read_json(run / "search.json") or {}
    doc = rundir.read_yaml(run / "search.yaml")
    rows = read_trials(run)
    evals = {str(row.get("trial")): rundir.evaluations(run / "trials" / str(row.get("trial"))) for row in rows}
    metric = summary.get("metric") or doc.get("metric") or "val_loss"
    mode = summary.get("mode") or doc.get("mode") or ("min" if metric.endswith("loss") else "max")
    for row in rows:
        if row.get(metric) is None:
            best_pass = rundir.best_evaluation(trained(evals[str(row.get("trial"))])) or {}
            row[metric] = best_pass.get(metric.removeprefix("val_"))
    keys = [k for k in (rows[0] if rows else {}) if k not in STANDARD and k != metric]
    ok = [r for r in rows if r.get("status") in ("completed", "stopped_early") and finite(r.get(metric))]
    best_res = rundir.read_results(run / "best") or {}
    info = summary.get("best") or {}
    best = info.get("trial") or best_res.get("trial") or (
        (min if mode == "min" else max)(ok, key=lambda r: r[metric])["trial"] if ok else None)
    best = str(best) if best is not None else None
    best_row = next((r for r in rows if str(r.get("trial")) == best), {})
    cfg = {**rundir.read_config_doc(run / "best"), **(info.get("config") or best_res.get("config") or {}),
           **{k: best_row[k] for k in keys if k in best_row}}
    causal = ((doc.get("options") or {}).get("task") or cfg.get("task")) == "causal-lm"
    return _Search(run, f"loratune search {run.resolve().name}", doc, rows, evals, metric, mode, keys, ok, best, cfg,
                   best_res.get("train") or {}, info.get("validation") or best_res.get("validation") or {},
                   info.get("test") or best_res.get("test") or {}, summary.get("default") or {},
                   {str(r.get("trial")): str(r.get("status")) for r in rows}, summary.get("seconds"),
                   full=search_method(run) == "full", comparison=summary.get("comparison") or {}, causal=causal,
                   base=_base_model(best_res, evals.get(best or "", [])) if causal else {})


def _base_model(best_res: dict[str, Any], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The base model's metrics the best trial started from: best/results.json's ``baseline`` (validation and test),
    else the trial's own epoch 0 in its metrics.jsonl (validation)."""
    base = best_res.get("baseline")
    if isinstance(base, dict) and base:
        return base
    zero = next((e for e in evals if e.get("epoch") == 0), None)
    return {"validation": {k: v for k, v in zero.items() if k not in ("epoch", "step")}} if zero else {}


def _glance(s: _Search) -> list[str]:
    """The answers above the first section: which rank and targets won (a full search: which learning rate),
    by how much, how small the adapter is (a full search: how many parameters trained)."""
    glance = [f"<h1>{esc(s.title)}</h1><div class=sub>{'full fine-tuning · ' if s.full else ''}{len(s.rows)} trials"
              f" · best by {esc(s.metric)} ({esc(s.mode)}) · model {esc(s.cfg.get('model', '-'))} · data "
              f"{esc(s.cfg.get('data', '-'))}</div>"]
    r = None if s.full else ratio(s.stats)
    glance += _winner(s, r) if s.best is not None else [
        "<div class=glance>" + card("winner", "none", "no trial finished with a finite metric")]
    if s.cmp is not None:
        glance.append(bl.glance_card(s.cmp))
    if s.full:
        t, a = s.stats.get("trainable_params"), s.stats.get("all_params")
        glance.append(card("full fine-tuning", f"{t:,} parameters trained" if t else "every weight trains",
                           ("every weight of the model · " if t and t == a else f"{100 * t / a:.3g}% of {a:,} · "
                            if t and a else "") + "each trial saves its whole fine-tuned model/"))
    elif r:
        t, a = s.stats.get("trainable_params"), s.stats.get("all_params")
        glance.append(card("adapter size", f"{r:,.0f}× smaller", size_facts(s.stats)
                           + (f" · {100 * t / a:.2g}% of the parameters trained" if t and a else "")))
    ended = ", ".join(f"{n} {_status_name(st)}" + (" (ASHA)" if st == "stopped_early" else "")
                      for st, n in _status_counts(s.statuses.values()))
    glance.append(card("search", f"{len(s.rows)} trials" + (f" · {_duration(s.seconds)}" if s.seconds else ""), ended))
    glance.append("</div>")
    return glance


def _status_counts(statuses: Iterable[str]) -> list[tuple[str, int]]:
    """(status, trials) for every status present: the known ones in :data:`STATUS_COLORS`'s order, then the
    others as they first appear."""
    counts = Counter(statuses)
    order = [st for st in plots.STATUS_COLORS if st in counts] + [st for st in counts if st not in plots.STATUS_COLORS]
    return [(st, counts[st]) for st in order]


def _status_name(status: str) -> str:
    """'stopped early'; a trial without a status (one that had not ended) 'not ended'."""
    return "not ended" if status in ("None", "") else status.replace("_", " ")


def _winner(s: _Search, r: float | None) -> list[str]:
    """The winner's sentence and its two cards (opens the cards' row)."""
    dval = (s.default.get("validation") or {}).get(s.mname)
    vs = ("the untuned default was already the best" if s.default.get("trial") == s.best else
          f"untuned default {fmt(dval)}" if dval is not None else "")
    test_acc = f", test accuracy {fmt(s.test.get('accuracy'))}" if s.test else ""
    second = (f"exact match {fmt(s.test.get('exact_match'))}" + (
        f" (base model: accuracy {fmt(s.base['test'].get('accuracy'))}, exact match "
        f"{fmt(s.base['test'].get('exact_match'))})" if s.base.get("test") else "")) if s.causal else \
        f"F1 {fmt(s.test.get('f1'))}"
    scores = " · ".join(x for x in (
        f"test accuracy {fmt(s.test.get('accuracy'))}, {second}" if s.test else "", vs) if x)
    result = (f"validation {s.mname} {fmt(s.val.get(s.mname))}" + (f" ({vs})" if vs else "") + test_acc)
    if s.full:
        won = _full_winner(s)
        sentence = (f"Full fine-tuning with {won or 'the fixed options'} won: " + result + "."
                    + (f" {s.cmp.sentence}." if s.cmp is not None else ""))
        winner = card("winner", won or "the fixed options", f"every weight trained — trial {s.best}", win=True)
    else:
        sentence = (f"Rank {fmt(s.cfg.get('rank'))} on {describe_targets(s.run / 'best', s.cfg.get('targets'))} "
                    "won: " + result + (f". Its adapter is {r:,.0f}× smaller than the model." if r else ".")
                    + (f" {s.cmp.sentence}." if s.cmp is not None else ""))
        others = " · ".join(f"{k} {fmt(s.cfg[k], True)}" for k in s.keys
                            if k not in ("rank", "targets") and k in s.cfg)
        winner = card("winner", f"rank {fmt(s.cfg.get('rank'))} · {fmt(s.cfg.get('targets'))}",
                      f"{others} — trial {s.best}", win=True)
    return (["<p style='font-size:16px'><b>" + esc(sentence) + "</b>" + _on_test(s.comparison) + "</p>"
             "<div class=glance>", winner, card(f"validation {s.mname}", fmt(s.val.get(s.mname)), scores)]
            + _comparison_card(s.comparison))


def _on_test(cmp: dict[str, Any]) -> str:
    """The headline's second sentence: whether the winner beats the untuned default on test beyond chance
    (search.json's ``comparison``; the winner was chosen on validation, so validation cannot judge it)."""
    if not cmp.get("verdict") or cmp.get("same_trial"):
        return ""                                # a search from before the comparison; the winner is the default
    if cmp.get("p_value") is None:
        return "<br>" + esc(cmp["verdict"][0].upper() + cmp["verdict"][1:] + ".")
    return "<br>" + esc(
        f"On test, against the untuned default: accuracy {cmp['best_accuracy']:.3f} vs {cmp['default_accuracy']:.3f}"
        f" ({100 * (cmp['best_accuracy'] - cmp['default_accuracy']):+.1f} points), McNemar {p_text(cmp['p_value'], cmp.get('alpha', 0.05))}: "
        + ("a difference beyond chance" if cmp.get("beyond_chance") else "not beyond chance")
        + f" on {cmp['n']} test examples (the winner was chosen on validation, so only test can judge it).")


def _comparison_card(cmp: dict[str, Any]) -> list[str]:
    """A card: the winner's test accuracy minus the default's, with McNemar's p and the discordant counts."""
    if cmp.get("p_value") is None:
        return []
    return [card("vs untuned default, test", f"{100 * (cmp['best_accuracy'] - cmp['default_accuracy']):+.1f} points",
                 f"McNemar {p_text(cmp['p_value'], cmp.get('alpha', 0.05))} ({'beyond' if cmp.get('beyond_chance') else 'not beyond'} "
                 f"chance) · {cmp['best_only']} examples only the winner got right, {cmp['default_only']} only the "
                 f"default · n = {cmp['n']}")]


def _full_winner(s: _Search) -> str:
    """'learning rate 5e-05 · batch_size 16': the best trial's searched options (the learning rate first, and
    always named) in a full search."""
    keys = ["lr"] + [k for k in s.shown_options(s.keys) if k != "lr"]
    return " · ".join(f"{'learning rate' if k == 'lr' else k} {fmt(s.cfg[k], True)}" for k in keys if k in s.cfg)


def _body(s: _Search) -> list[str]:
    """The sections below the glance, in page order."""
    body = _best_configuration(s) if s.best is not None else []
    if s.cmp is not None:
        body += bl.section(s.cmp, f"The best trial ({s.best}) vs full fine-tuning")
    elif s.baseline_note:
        body.append(note(s.baseline_note))
    body += ["<h2>Trials</h2><p>Click a column header to sort.</p>"] + guarded(
        "trials table", _trials_table, s.run, s.rows, s.keys, s.best, s.full)
    no_best = [t for t, ev in s.evals.items() if trained(ev) and rundir.best_evaluation(trained(ev)) is None]
    if no_best:
        body.append(note(f"{NO_FINITE_LOSS} in trial{'s' if len(no_best) > 1 else ''} {', '.join(no_best)}: "
                         "no best epoch, validation columns empty"))
    body += _what_mattered(s) + _trial_curves(s)
    if s.best is not None:
        body += size_section(s.stats, full=s.full)
    if s.seconds:
        body.append(f"<h2>Wall time</h2><p>The search took {esc(_duration(s.seconds))} for "
                    f"{len(s.rows)} trials; the table shows each trial's training seconds where it finished.</p>")
    if s.best is not None and s.full and (s.run / "best" / "model").is_dir():
        body += _best_model(s)
    elif s.best is not None and not s.full and (s.run / "best" / "adapter").is_dir():
        body += _best_adapter(s)
    if s.doc:
        body.append(f"<details><summary>Search settings (search.yaml)</summary><pre>"
                    f"{esc(yaml.safe_dump(s.doc, sort_keys=False))}</pre></details>")
    return body


def _best_configuration(s: _Search) -> list[str]:
    """The best trial's options, and its (and the untuned default's; a causal LM's base model's first) validation
    and test metrics."""
    shown = s.shown_options(s.keys + [k for k in ("rank", "alpha", "targets", "lr", "dropout", "epochs", "batch_size")
                                      if k not in s.keys])
    mk = ["loss", "perplexity", "accuracy", "exact_match"] if s.causal else ["loss", "accuracy", "f1", "f1_macro",
                                                                             "roc_auc"]
    results = [("base model (no adapter)", s.base)] if s.base else []
    results.append((f"best (trial {s.best})", {"validation": s.val, "test": s.test}))
    if s.default and s.default.get("trial") != s.best:
        results.append((f"untuned default (trial {s.default.get('trial')})", s.default))
    return ["<h2>Best configuration</h2><div class=row>",
            table(["option", "value"], [[k, s.cfg[k]] for k in shown if k in s.cfg], options=("value",)),
            table(["trial", "split"] + mk, [[name, split] + [(res.get(split) or {}).get(k) for k in mk]
                                            for name, res in results for split in ("validation", "test")
                                            if res.get(split)], text_cols=2), "</div>"]


def _what_mattered(s: _Search) -> list[str]:
    """Each finished trial's best-epoch score against the searched options (rank, lr, dropout)."""
    options = [o for o in OPTION_PLOTS if o in s.keys]
    if not (options and s.ok):
        return []
    series = "targets" if "targets" in s.keys else None
    out = [f"<h2>What mattered</h2><p>Each trial's best-epoch score against the searched options; "
           f"{'one colour per target set; ' if series else ''}the star is the winner; whiskers are "
           "95% intervals (Wilson for accuracy, bootstrap for F1) where the trial logged its confusion matrix.</p>"]
    for m in dict.fromkeys([s.metric, "val_accuracy" if s.metric != "val_accuracy" else "val_loss"]):
        if any(finite(row.get(m)) for row in s.ok):
            out += guarded(f"{m} plots", lambda m=m: [img(plots.metric_vs_options(s.ok, m, options, series, s.best),
                                                            f"{m} against {', '.join(options)}")])
    return out


def _trial_curves(s: _Search) -> list[str]:
    """Every trial's validation curves per epoch: where ASHA stopped each one."""
    if not any(s.evals.values()):
        return []
    shown = [s.mname, "accuracy" if s.mname != "accuracy" else "loss"]
    return ["<h2>Learning curves: where ASHA stopped each trial</h2>"] + guarded(
        "trial curves", lambda: [img(plots.trial_curves(s.evals, s.statuses, shown, s.doc.get("max_epochs"), s.best),
                                     "learning curves of all trials")])


def _best_adapter(s: _Search) -> list[str]:
    """The best adapter's test split (a causal LM's: its learning curves and sample generations instead) and ΔW,
    compared with another rank's adapter where there is one."""
    best_dir = s.run / "best"
    out = [f"<h2>The best adapter (trial {esc(s.best)})</h2>"]
    if s.causal:
        out += learning_curves_section(best_dir, "Its learning curves", 3)
        out += guarded("sample generations", generations_section, best_dir, "Its sample generations", 3)
    elif (best_dir / "config.yaml").is_file():
        out += guarded("test-split predictions", test_section, best_dir)
    partner = _partner(s.run, s.rows, str(s.best), best_dir / "adapter")
    out += guarded("ΔW analysis", analysis_section, best_dir / "adapter", partner[0] if partner else None,
                   (f"best (r={_adapter_config(best_dir / 'adapter')[0]})", partner[1] if partner else ""))
    return out


def _best_model(s: _Search) -> list[str]:
    """A full search's best model (best/model) on the test split; no ΔW: there is no adapter."""
    out = [f"<h2>The best model (trial {esc(s.best)})</h2>"]
    if (s.run / "best" / "config.yaml").is_file():
        out += guarded("test-split predictions", test_section, s.run / "best")
    return out


def _trials_table(run: Path, rows: list[dict[str, Any]], keys: list[str], best: str | None,
                  full: bool = False) -> list[str]:
    """Every column of the rows, plus each trial's adapter size (a full search: its model file's) and training
    seconds (where it finished)."""
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cells, classes = [], []
    for row in rows:
        tdir = run / "trials" / str(row.get("trial"))
        secs = ((rundir.read_results(tdir) or {}).get("train") or {}).get("seconds")
        cells.append([row.get(c) for c in cols] + [_weights_bytes(tdir, full),
                                                   round(secs, 1) if isinstance(secs, (int, float)) else None])
        classes.append("best" if str(row.get("trial")) == best else "")
    html_table = table(cols + ["model bytes" if full else "adapter bytes", "train s"], cells, sortable=True,
                       text_cols=2, row_class=classes, options=tuple(keys))
    return [f"<div class=scroll>{html_table}</div>"]


def _weights_bytes(tdir: Path, full: bool) -> int | None:
    """A trial's adapter file, or (full) its model/'s weights files, in bytes (None: not there)."""
    if not full:
        weights = tdir / "adapter" / "adapter_model.safetensors"
        return weights.stat().st_size if weights.is_file() else None
    files = list((tdir / "model").glob("*.safetensors"))
    return sum(p.stat().st_size for p in files) if files else None


def _duration(seconds: float) -> str:
    """'734 s', '12.2 min' or '2.5 h'."""
    seconds = float(seconds)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h"
