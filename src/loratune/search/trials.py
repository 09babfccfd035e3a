"""A search's own files: ``search.yaml`` (its options, all a resume needs), and after it the trials table
(``trials.csv`` / ``trials.json``), the best trial, ``best/``.

:func:`finish` builds each trial's row from its own run directory (read by :mod:`loratune.training.rundir`,
which also says which epoch is a trial's best), picks the best trial by the validation metric alone (never
a diverged or failed one), copies it to ``best/`` and evaluates it, and the untuned default trial, on the
test split once. No Ray here.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from loratune.errors import InputError
from loratune.search.space import (
    METRICS,
    OK_STATUSES,
    Space,
    columns,
    default_space,
    option_kind,
)
from loratune.training import rundir
from loratune.training.options import TrainConfig

ALGORITHMS = ("random", "optuna")

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
    --early-stop), diverged, failed (an error after its retries)."""
    if error:
        return "failed"
    if last.get("diverged"):
        return "diverged"
    return "completed" if last.get("epoch", 0) >= last.get("epochs_planned", math.inf) else "stopped_early"


def trial_record(space: Space, trial: str, status: str | None, config: Mapping[str, Any], run: Path) -> dict[str, Any]:
    """One trial: its contract row and what stands behind it, from its run directory's evaluations.

    Its best epoch is :func:`rundir.best_evaluation`'s (the lowest finite validation loss: the epoch whose
    adapter the trainer kept). A trial that evaluated but never to a finite loss has no best (``val_*``
    empty) and ends ``diverged``, unless it failed or has not ended (``status`` None).
    """
    hist = rundir.evaluations(run)
    best = rundir.best_evaluation(hist) or {}
    if hist and not best and status not in (None, "failed"):
        status = "diverged"
    values = {k: _typed(k, v) for k, v in space.resolve(config).items() if k in space.keys}
    row = {"trial": trial, "status": status, "epochs_run": len(hist), **values,
           "val_loss": best.get("loss"), "val_accuracy": best.get("accuracy"), "val_f1": best.get("f1")}
    return {"row": row, "trial": trial, "status": status, "config": values, "best": best, "history": hist,
            "run_dir": run}


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


def finish(out: Path, doc: Mapping[str, Any], space: Space, trials: list[dict[str, Any]], seconds: float,
           test: Callable[[Path], dict[str, float]], emit: Callable[[dict[str, Any]], None]) -> SearchResult:
    """Write trials.csv/json, copy the best trial to ``best/`` and test it (``test(adapter_dir)``), test
    the default (first) trial too, and write search.json."""
    cols, rows = columns(space), [t["row"] for t in trials]
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    rundir.write_json(out / "trials.json", rows)
    best = choose_best(trials, doc["metric"], doc["mode"])
    summary: dict[str, Any] = {"metric": doc["metric"], "mode": doc["mode"], "trials": len(trials),
                               "statuses": dict(Counter(t["status"] for t in trials)), "seconds": seconds,
                               "experiment": doc["experiment"], "best": None, "default": None}
    if best is not None:
        emit({"kind": "message", "text": f"testing the best trial {best['trial']} on the test split"})
        dest = out / "best"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(best["run_dir"], dest, ignore=shutil.ignore_patterns(".tune-checkpoint", ".lock"))
        summary["best"] = _brief(best, test(artifact(dest)), dest)
        old = rundir.read_results(dest) or {}                          # the trainer's, if the trial ran to its end
        rundir.write_json(dest / "results.json", {
            "validation": summary["best"]["validation"], "test": summary["best"]["test"],
            "best_epoch": best["best"]["epoch"], "train": old.get("train", {}), "history": best["history"],
            "trial": best["trial"], "config": best["config"]})
    if trials:
        first = trials[0]
        if best is not None and first["trial"] == best["trial"]:
            summary["default"] = dict(summary["best"])
        else:
            tested = first["best"] and artifact(first["run_dir"]).is_dir()
            summary["default"] = _brief(first, test(artifact(first["run_dir"])) if tested else None, first["run_dir"])
    rundir.write_json(out / "search.json", summary)
    return SearchResult(out, cols, rows, summary["best"], summary["default"], doc["metric"], doc["mode"], seconds,
                        summary=summary)


def artifact(run_dir: Path) -> Path:
    """A trial's ``adapter/``, or ``model/`` where it fine-tuned every weight (``--method full``)."""
    return run_dir / "model" if (run_dir / "model").is_dir() else run_dir / "adapter"


def _brief(trial: dict[str, Any], test: dict[str, float] | None, run_dir: Path) -> dict[str, Any]:
    """A trial as search.json lists it: config, best-epoch validation metrics, test metrics, run directory."""
    return {"trial": trial["trial"], "status": trial["status"], "config": trial["config"],
            "validation": {k: v for k, v in trial["best"].items() if k not in ("epoch", "step")} or None,
            "best_epoch": trial["best"].get("epoch"), "test": test, "run_dir": str(run_dir)}


def load_result(out: Path, doc: Mapping[str, Any]) -> SearchResult:
    """A finished search, read back (``--resume`` of a search that is done)."""
    summary = json.loads((out / "search.json").read_text(encoding="utf-8"))
    rows = json.loads((out / "trials.json").read_text(encoding="utf-8"))
    return SearchResult(out, list(rows[0]) if rows else [], rows, summary.get("best"), summary.get("default"),
                        doc["metric"], doc["mode"], summary.get("seconds", 0.0), already_done=True, summary=summary)


# --- search.yaml ------------------------------------------------------------------------------------

def new_search(config: TrainConfig | None, options: dict[str, Any], space: dict[str, Any] | None, samples: int,
                max_epochs: int, cpus_per_trial: int, max_concurrent: int | None, search_alg: str, metric: str,
                mode: str, max_failures: int, address: str | None, storage: Any) -> dict[str, Any]:
    """Check the search's own options; the document saved as search.yaml (all a resume needs)."""
    for name, value, lo in (("samples", samples, 1), ("max_epochs", max_epochs, 1),
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
    base = config.replace(**options) if config is not None else TrainConfig.from_dict(options)
    if base.threads not in (None, cpus_per_trial):
        raise InputError(f"--threads: a trial's torch threads equal its CPUs; set --cpus-per-trial {base.threads}")
    base = _absolute_paths(base)
    try:
        raw = json.loads(json.dumps(default_space(base) if space is None else space))     # plain values, as in YAML
    except (TypeError, ValueError) as e:
        raise InputError(f"search: expected plain YAML values (numbers, strings, lists, mappings): {e}") from None
    if storage is not None and Path(storage).expanduser().resolve() == Path.home().resolve():
        raise InputError(f"--storage: {storage} is the home directory; give a folder for the search's results")
    return {"options": base.to_dict(), "search": raw, "samples": samples, "max_epochs": max_epochs,
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
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not isinstance(doc, dict) or "experiment" not in doc:
        raise InputError(f"{path}: not a loratune search file")
    return doc
