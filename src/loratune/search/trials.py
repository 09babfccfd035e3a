"""A search's own files: ``search.yaml`` (its options, all a resume needs), ``base_model.json`` (a causal-LM
search's epoch 0: the base model evaluated once for all trials), and after it the trials table
(``trials.csv`` / ``trials.json``), the best trial, ``best/``.

:func:`finish` builds each trial's row from its own run directory (read by :mod:`loratune.training.rundir`,
which also says which epoch is a trial's best), picks the best trial by the validation metric alone (never
a diverged or failed one), copies it to ``best/`` and evaluates it, and the untuned default trial, on the
test split once, with McNemar's test of the two there (:func:`comparison`). Each row's validation accuracy
and F1 carry 95% intervals (:func:`intervals`, from :mod:`loratune.search.stats`). A causal-LM search's rows
carry its metrics instead (:func:`table_columns`), without intervals: no confusion matrix stands behind them.
No Ray here.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from loratune import yamltext
from loratune.errors import InputError
from loratune.search import stats
from loratune.search.space import (
    INTERVAL_COLUMNS,
    LAST_EPOCH_RUNG,
    METRICS,
    OK_STATUSES,
    REDUCTION_FACTOR,
    RUNGS_PER_EPOCH,
    Space,
    check_metric,
    columns,
    default_mode,
    default_space,
    option_kind,
)
from loratune.training import rundir
from loratune.training.models import fit_max_length
from loratune.training.options import TrainConfig

log = logging.getLogger(__name__)

ALGORITHMS = ("random", "optuna")
ALPHA = 0.05                                     # McNemar's level: "beyond chance" means p < ALPHA
F1_SEED = 0                                      # the F1 bootstrap's seed: a trial's interval is reproducible
BASE_MODEL = "base_model.json"                   # a causal-LM search's base-model metrics (driver.base_model)

@dataclass
class SearchResult:
    """What a search leaves: the table, the best and the default trial (config, validation, test)."""

    out: Path
    columns: list[str]
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    default: dict[str, Any] | None
    metric: str
    mode: str
    seconds: float = 0.0
    already_done: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


def status_of(last: Mapping[str, Any], *, error: bool) -> str:
    """From a trial's last report: completed (ran its planned epochs), stopped_early (ASHA or
    --early-stop), collapsed (training/loop.collapsed stopped it), diverged, failed (an error after its retries)."""
    if error:
        return "failed"
    if last.get("diverged"):
        return "diverged"
    if last.get("collapsed"):
        return "collapsed"
    return "completed" if last.get("epoch", 0) >= last.get("epochs_planned", math.inf) else "stopped_early"


def trial_record(space: Space, trial: str, status: str | None, config: Mapping[str, Any], run: Path,
                 metrics: Sequence[str] | None = None) -> dict[str, Any]:
    """One trial: its contract row and what stands behind it, from its run directory's evaluations.

    Its best epoch is :func:`rundir.best_evaluation`'s (the lowest finite validation loss: the epoch whose
    adapter the trainer kept); its accuracy and F1 intervals come from that epoch's confusion matrix
    (:func:`intervals`). A trial that evaluated but never to a finite loss has no best (``val_*``
    empty) and ends ``diverged``, unless it failed or has not ended (``status`` None). ``metrics``: a causal-LM
    search's columns (:func:`loratune.search.space.task_metrics`), each the best epoch's value, no intervals;
    None: a classifier's. A causal LM's epoch 0 (the base model, before any step) is not one of its epochs.
    """
    hist = [e for e in rundir.evaluations(run) if e["epoch"] > 0]
    best = rundir.best_evaluation(hist) or {}
    if hist and not best and status not in (None, "failed"):
        status = "diverged"
    values = {k: _typed(k, v) for k, v in space.resolve(config).items() if k in space.keys}
    run_to = max((e["epoch"] for e in hist), default=0)                  # 0.25: one rung of four
    row = {"trial": trial, "status": status, "epochs_run": run_to, **values}
    if metrics is not None:
        row.update({m: best.get(m.removeprefix("val_")) for m in metrics})
    else:
        row.update({"val_loss": best.get("loss"), "val_accuracy": best.get("accuracy"), "val_f1": best.get("f1")})
        row = _beside(row, intervals(best))
    return {"row": row, "trial": trial, "status": status, "config": values, "best": best, "history": hist,
            "run_dir": run}


def intervals(best: Mapping[str, Any]) -> dict[str, float | None]:
    """The 95% intervals of a best epoch's validation accuracy (Wilson: ``k`` = the confusion matrix's
    trace, ``n`` = its sum) and F1 (:func:`stats.bootstrap_f1`, seed :data:`F1_SEED`), as trials.csv's
    ``val_accuracy_lo/hi`` and ``val_f1_lo/hi``; all None where the evaluation has no usable ``confusion``
    (a run from before it was logged, or no best epoch)."""
    m = _confusion(best.get("confusion"))
    if m is None:
        return dict.fromkeys(INTERVAL_COLUMNS)
    acc, f1 = stats.wilson(int(np.trace(m)), int(m.sum())), stats.bootstrap_f1(m, seed=F1_SEED)
    return dict(zip(INTERVAL_COLUMNS, (*acc, *f1)))


def _beside(row: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` with each ``<key>_lo``/``<key>_hi`` of ``extra`` right after ``<key>``: trials.json's key order is
    trials.csv's column order (:func:`columns`)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        out[key] = value
        out.update({k: extra[k] for k in (f"{key}_lo", f"{key}_hi") if k in extra})
    return out


def _confusion(value: Any) -> np.ndarray | None:
    """A logged confusion matrix as a (C, C) integer array, or None (logged) when it is missing or malformed."""
    if value is None:
        return None
    try:
        m = np.asarray(value)
        ok = (m.ndim == 2 and m.shape[0] == m.shape[1] > 0 and m.dtype.kind in "iu" and bool((m >= 0).all())
              and m.sum() > 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        log.warning("a validation record's confusion matrix is malformed (%r): no intervals", value)
        return None
    return m.astype(np.int64)


def _typed(key: str, value: Any) -> Any:
    """A float option shows as a float (alpha tied to an integer rank: 8.0, as TrainConfig holds it)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return float(value) if is_int and option_kind(key) == "float" else value


def choose_best(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best finished trial by ``metric`` at its best epoch; never a diverged or failed one; ties: the earlier."""
    def score(t: dict[str, Any]) -> float | None:
        v = t["best"].get(metric.removeprefix("val_"))
        return float(v) if v is not None and math.isfinite(v) else None

    ok = [t for t in trials if t["status"] in OK_STATUSES and score(t) is not None]
    return min(ok, key=lambda t: score(t) if mode == "min" else -score(t)) if ok else None  # type: ignore[operator]


def table_columns(space: Space, metrics: Sequence[str] | None = None) -> list[str]:
    """trials.csv's columns: a classifier's (:func:`loratune.search.space.columns`), or with ``metrics`` a causal
    LM's, ``trial, status, epochs_run``, the searched options, then each metric (no intervals)."""
    if metrics is None:
        return columns(space)
    return ["trial", "status", "epochs_run", *space.keys, *metrics]


@dataclass(frozen=True)
class Tested:
    """One adapter on the test split: its metrics (search.json's ``test``) and which examples it got right,
    ``(N,)`` booleans in the split's order (what :func:`comparison` pairs across two adapters): a classifier's
    arg-max, a causal LM's choice scoring; None where no example is right or wrong (causal-LM data without a
    label set: no choice accuracy)."""

    __test__ = False                      # not a pytest class, whatever its name

    metrics: dict[str, float]
    correct: np.ndarray | None


def finish(out: Path, doc: Mapping[str, Any], space: Space, trials: list[dict[str, Any]], seconds: float,
           test: Callable[[Path], Tested], emit: Callable[[dict[str, Any]], None],
           metrics: Sequence[str] | None = None) -> SearchResult:
    """Write trials.csv/json, copy the best trial to ``best/`` and test it (``test(adapter_dir)``), test
    the default (first) trial too, and write search.json, whose ``comparison`` (:func:`comparison`) says
    whether the two differ on test beyond chance: the best was chosen on validation, so only test can say.
    Where there is nothing to pair (no per-example correctness), ``comparison`` is None and
    ``comparison_note`` says why. ``metrics``: a causal-LM search's columns (:func:`table_columns`); its
    ``best/results.json`` gets the base model's ``baseline`` (:data:`BASE_MODEL`), as a ``train`` run's has."""
    cols, rows = table_columns(space, metrics), [t["row"] for t in trials]
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    rundir.write_json(out / "trials.json", rows)
    best = choose_best(trials, doc["metric"], doc["mode"])
    summary: dict[str, Any] = {"metric": doc["metric"], "mode": doc["mode"], "trials": len(trials),
                               "statuses": dict(Counter(t["status"] for t in trials)), "seconds": seconds,
                               "experiment": doc["experiment"], "best": None, "default": None, "comparison": None}
    if best is not None:
        emit({"kind": "message", "text": f"testing the best trial {best['trial']} on the test split"})
        dest = out / "best"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(best["run_dir"], dest, ignore=shutil.ignore_patterns(".tune-checkpoint", ".lock"))
        best_test = test(artifact(dest))
        summary["best"] = _brief(best, best_test.metrics, dest)
        old = rundir.read_results(dest) or {}                          # the trainer's, if the trial ran to its end
        base = baseline_for(read_base_model(out), best["config"], doc.get("options") or {})
        rundir.write_json(dest / "results.json", {
            "validation": summary["best"]["validation"], "test": summary["best"]["test"],
            "best_epoch": best["best"]["epoch"], "train": old.get("train", {}), "history": best["history"],
            "trial": best["trial"], "config": best["config"], **({"baseline": base} if base else {})})
    if trials:
        first, default_test = trials[0], None
        if best is not None and first["trial"] == best["trial"]:
            summary["default"] = dict(summary["best"])
        else:
            if first["best"] and artifact(first["run_dir"]).is_dir():
                emit({"kind": "message", "text": f"testing the untuned default trial {first['trial']} on test"})
                default_test = test(artifact(first["run_dir"]))
            summary["default"] = _brief(first, default_test.metrics if default_test else None, first["run_dir"])
        if best is not None:
            summary["comparison"] = comparison(best, first, best_test, default_test)
            if summary["comparison"] is None:
                summary["comparison_note"] = NO_PAIRS
    rundir.write_json(out / "search.json", summary)
    return SearchResult(out, cols, rows, summary["best"], summary["default"], doc["metric"], doc["mode"], seconds,
                        summary=summary)


def artifact(run_dir: Path) -> Path:
    """A trial's ``adapter/``, or ``model/`` where it fine-tuned every weight (``--method full``)."""
    return run_dir / "model" if (run_dir / "model").is_dir() else run_dir / "adapter"


NO_PAIRS = ("no test of the best trial against the untuned default: this causal-LM data's completions are not a "
            "label set, so no example is scored right or wrong (no choice accuracy) for McNemar's test to pair")
"""search.json's ``comparison_note`` where :func:`comparison` is None."""


def comparison(best: Mapping[str, Any], default: Mapping[str, Any], best_test: Tested,
               default_test: Tested | None) -> dict[str, Any] | None:
    """search.json's ``comparison``: the best trial against the untuned default on the test split, by
    McNemar's exact test (:func:`stats.paired`; both saw the same examples in the same order).

    ``{"split": "test", "method", "n", "best_accuracy", "default_accuracy", "best_only", "default_only",
    "p_value", "chi2", "alpha", "beyond_chance", "verdict"}``: ``best_only`` (McNemar's b) counts the examples
    only the best got right, ``default_only`` (c) those only the default did; ``beyond_chance`` is
    ``p_value < alpha``; ``verdict`` says it in words. Where the default is the best trial, or has no
    adapter to test, only ``verdict`` (and ``same_trial``) say so. None where the test split has no per-example
    correctness to pair (``best_test.correct`` None: :data:`NO_PAIRS`); no other test stands in for it.
    """
    if best_test.correct is None:
        return None
    who = f"best trial {best['trial']}"
    if best["trial"] == default["trial"]:
        return {"same_trial": True, "verdict": f"{who} is the untuned default itself: nothing to compare"}
    if default_test is None:
        return {"same_trial": False, "verdict": f"{who}: the untuned default (trial {default['trial']}, "
                f"{str(default['status']).replace('_', ' ')}) left no adapter to test: no comparison on test"}
    if default_test.correct is None:
        return None
    p = stats.paired(best_test.correct, default_test.correct)
    ours, theirs, pv = p["first_accuracy"], p["second_accuracy"], p["p_value"]
    beyond = pv < ALPHA
    words = (("better than" if ours > theirs else "worse than") + " the default beyond chance" if beyond
             else "not beyond chance")
    verdict = (f"{who}: test accuracy {ours:.3f} vs untuned default {theirs:.3f} ({100 * (ours - theirs):+.1f} "
               f"points); McNemar {stats.p_text(pv, ALPHA)}: {words} on {p['n']} test examples")
    return {"same_trial": False, "split": "test", "method": "McNemar exact (two-sided binomial on the discordant "
            "examples)", "n": p["n"], "best_accuracy": ours, "default_accuracy": theirs,
            "best_only": p["first_only"], "default_only": p["second_only"], "p_value": pv, "chi2": p["chi2"],
            "alpha": ALPHA, "beyond_chance": beyond, "verdict": verdict}


def _brief(trial: dict[str, Any], test: dict[str, float] | None, run_dir: Path) -> dict[str, Any]:
    """A trial as search.json lists it: config, best-epoch validation metrics (not its confusion matrix: that
    stays in the trial's metrics.jsonl, and its intervals are in trials.csv), test metrics, run directory."""
    return {"trial": trial["trial"], "status": trial["status"], "config": trial["config"],
            "validation": {k: v for k, v in trial["best"].items() if k not in ("epoch", "step", "confusion")} or None,
            "best_epoch": trial["best"].get("epoch"), "test": test, "run_dir": str(run_dir)}


def load_result(out: Path, doc: Mapping[str, Any]) -> SearchResult:
    """A finished search, read back (``--resume`` of a search that is done)."""
    summary = json.loads((out / "search.json").read_text(encoding="utf-8"))
    rows = json.loads((out / "trials.json").read_text(encoding="utf-8"))
    return SearchResult(out, list(rows[0]) if rows else [], rows, summary.get("best"), summary.get("default"),
                        doc["metric"], doc["mode"], summary.get("seconds", 0.0), already_done=True, summary=summary)


# --- base_model.json ----------------------------------------------------------------------------------

def read_base_model(out: Path, device: str | None = None) -> dict[str, Any] | None:
    """``out/base_model.json`` (``{"device", "threads", "by_precision": {precision: {"validation": {...}, "test":
    {...}}}, "generations": {precision: [the base model's greedy answers to the first validation rows]}}``; the
    last key only from searches since generations.json, read by the driver's ``base_answers_for``), with null metrics back as NaN (JSON has none); None where it is missing or unreadable, or (with
    ``device``) was computed on another device than the trials now run on."""
    doc = rundir.read_json(out / BASE_MODEL)
    if not isinstance(doc, dict) or not isinstance(doc.get("by_precision"), dict):
        return None
    if device is not None and doc.get("device") != device:
        return None
    nan = float("nan")
    doc["by_precision"] = {str(p): {split: {k: nan if v is None else v for k, v in m.items()}
                                    for split, m in splits.items() if isinstance(m, dict)}
                           for p, splits in doc["by_precision"].items() if isinstance(splits, dict)}
    return doc


def baseline_for(base_model: Mapping[str, Any] | None, config: Mapping[str, Any],
                 options: Mapping[str, Any]) -> dict[str, dict[str, float]] | None:
    """The base model's metrics a trial of ``config`` (its searched values; ``options``: the fixed ones) starts
    from: those computed at its ``--precision`` (the only option that changes a no-op adapter's outputs), or None."""
    if not base_model:
        return None
    precision = config.get("precision", options.get("precision"))
    return base_model["by_precision"].get(str(precision))


# --- search.yaml ------------------------------------------------------------------------------------

def new_search(config: TrainConfig | None, options: dict[str, Any], space: dict[str, Any] | None, samples: int,
                max_epochs: int, cpus_per_trial: int, max_concurrent: int | None, search_alg: str, metric: str,
                mode: str | None, max_failures: int, address: str | None, storage: Any,
                rungs_per_epoch: int | None = None, reduction_factor: int | None = None,
                last_epoch_rung: bool | None = None) -> dict[str, Any]:
    """Check the search's own options; the document saved as search.yaml (all a resume needs). ``mode`` None:
    the metric's own (:func:`loratune.search.space.default_mode`: min for a loss, max for a score)."""
    rungs_per_epoch = RUNGS_PER_EPOCH if rungs_per_epoch is None else rungs_per_epoch
    reduction_factor = REDUCTION_FACTOR if reduction_factor is None else reduction_factor
    last_epoch_rung = LAST_EPOCH_RUNG if last_epoch_rung is None else last_epoch_rung
    if not isinstance(last_epoch_rung, bool):
        raise InputError(f"--last-epoch-rung: expected true or false, got {last_epoch_rung!r}")
    mode = default_mode(metric) if mode is None and metric in METRICS else mode
    for name, value, lo in (("samples", samples, 1), ("max_epochs", max_epochs, 1), ("rungs_per_epoch", rungs_per_epoch, 1),
                            ("reduction_factor", reduction_factor, 2),
                            ("cpus_per_trial", cpus_per_trial, 1), ("max_failures", max_failures, 0),
                            ("max_concurrent", max_concurrent, 1)):
        if value is None and name == "max_concurrent":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise InputError(f"--{name.replace('_', '-')}: expected an integer >= {lo}, got {value!r}")
    for name, value, allowed in (("search_alg", search_alg, ALGORITHMS), ("metric", metric, METRICS),
                                 ("mode", mode, ("min", "max"))):
        if value not in allowed:
            raise InputError(f"--{name.replace('_', '-')}: expected one of {', '.join(allowed)}, got {value!r}")
    if search_alg == "optuna" and importlib.util.find_spec("optuna") is None:
        raise InputError("--search-alg optuna: optuna is not installed (pip install 'loratune[optuna]')")
    if "epochs" in options:
        raise InputError("--epochs: every trial trains --max-epochs epochs (ASHA's budget); set --max-epochs")
    if "evals_per_epoch" in options:
        raise InputError("--evals-per-epoch: a trial's validation passes are ASHA's rungs; set --rungs-per-epoch")
    base = config.replace(**options) if config is not None else TrainConfig.from_dict(options)
    if base.threads not in (None, cpus_per_trial):
        raise InputError(f"--threads: a trial's torch threads equal its CPUs; set --cpus-per-trial {base.threads}")
    base = _absolute_paths(base)
    if (fit := fit_max_length(base)) != base.max_length:   # auto, past the model's positions: search.yaml keeps
        base = base.replace(max_length=fit)                 # the fitted number (the trials read it as given)
    check_metric(metric, base.task)                    # val_accuracy of causal-LM data: once the data is read
    try:
        raw = json.loads(json.dumps(default_space(base, options) if space is None else space))  # plain, as in YAML
    except (TypeError, ValueError) as e:
        raise InputError(f"search: expected plain YAML values (numbers, strings, lists, mappings): {e}") from None
    if storage is not None and Path(storage).expanduser().resolve() == Path.home().resolve():
        raise InputError(f"--storage: {storage} is the home directory; give a folder for the search's results")
    return {"options": base.to_dict(), "search": raw, "samples": samples, "max_epochs": max_epochs,
            "rungs_per_epoch": rungs_per_epoch, "reduction_factor": reduction_factor, "last_epoch_rung": last_epoch_rung,
            "cpus_per_trial": cpus_per_trial, "max_concurrent": max_concurrent, "search_alg": search_alg,
            "metric": metric, "mode": mode, "max_failures": max_failures, "address": address,
            "storage": str(Path(storage).expanduser().resolve()) if storage is not None else None}


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Trials run in other working directories (and on other nodes): local paths become absolute."""
    changes = {}
    for name in ("model", "data", "validation_file", "test_file"):
        value = getattr(cfg, name)
        if value and Path(value).expanduser().exists():
            changes[name] = str(Path(value).expanduser().resolve())
    return cfg.replace(**changes)


def read_search_yaml(out: Path) -> dict[str, Any]:
    """``out/search.yaml`` for ``--resume``, strictly: InputError when it is missing or not a search's."""
    path = out / "search.yaml"
    if not path.is_file():
        raise InputError(f"--resume: {out} holds no search (no search.yaml)")
    try:
        doc = yamltext.load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not isinstance(doc, dict) or "experiment" not in doc:
        raise InputError(f"{path}: not a loratune search file")
    return doc
