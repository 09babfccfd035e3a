"""``loratune tune``: the search command (flags -> :func:`loratune.search.driver.tune`, events -> lines).

cli/main.py's build_parser calls :func:`register`; importing this module does nothing (no Ray, no torch).
Every training flag fixes that option for all trials (the default space leaves it out; a space of the user's own that
searches it takes the flag as the untuned default trial's value); ``--config`` is a YAML file with training
options and the search's own keys (``search:``, ``samples:``, ``max_epochs:``, ...). Flags override it.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from loratune.cli.common import (
    add_train_options,
    given_training_flags,
    read_yaml,
    train_options,
)
from loratune.cli.progress import Renderer
from loratune.errors import InputError
from loratune.search.space import (
    CAUSAL_METRICS,
    CLASSIFICATION_METRICS,
    LAST_EPOCH_RUNG,
    REDUCTION_FACTOR,
    RUNGS_PER_EPOCH,
)

# Keys of the --config YAML that belong to the search, not to training (CLI flag = key with dashes).
SEARCH_KEYS = {"search": None, "samples": 8, "max_epochs": 3, "rungs_per_epoch": None, "reduction_factor": None,
               "last_epoch_rung": None,
               "cpus_per_trial": 1, "max_concurrent": None,
               "search_alg": "random", "metric": "val_loss", "mode": None, "max_failures": 2, "address": None,
               "storage": None}


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``tune`` subcommand to cli/main.py's subparsers."""
    s = sub.add_parser("tune", parents=[common], help="search LoRA hyperparameters on Ray Tune (ASHA)",
                       description="Search LoRA hyperparameters on Ray Tune with ASHA early stopping. Training flags "
                                   "fix an option for every trial (the default space then leaves it out); the space "
                                   "is the YAML key `search:` of --config or --space. An option both given and "
                                   "searched in a space of yours is the untuned default trial's value.")
    add_train_options(s)
    g = s.add_argument_group("search options (also YAML keys of --config)")
    kw = {"default": argparse.SUPPRESS}
    g.add_argument("--samples", type=int, metavar="N", **kw,
                   help="trials to sample, the default config included; grid values multiply the others (default: 8)")
    g.add_argument("--max-epochs", type=int, metavar="N", help="epochs per trial, ASHA's max_t (default: 3)", **kw)
    g.add_argument("--rungs-per-epoch", type=int, metavar="N", **kw,
                   help="ASHA's rungs per epoch: each trial validates every 1/N epoch and ASHA may stop it there "
                        "(grace period one rung; max_t = max epochs x N; 1: once an epoch) (default: "
                        f"{RUNGS_PER_EPOCH})")
    g.add_argument("--reduction-factor", type=int, metavar="ETA", **kw,
                   help="ASHA's reduction factor: past each rung only the best 1/ETA of the trials that reached it "
                        f"go on (2: the seed's, stops fewer) (default: {REDUCTION_FACTOR})")
    g.add_argument("--last-epoch-rung", action=argparse.BooleanOptionalAction, **kw,
                   help="one more rung a whole epoch before the end, where that lies past ASHA's rungs (grace x ETA^k): "
                        "only the best 1/ETA of the trials that got there train the last epoch (default: "
                        f"{'on' if LAST_EPOCH_RUNG else 'off'})")
    g.add_argument("--cpus-per-trial", type=int, metavar="C", **kw,
                   help="CPUs (and torch threads) per trial (default: 1)")
    g.add_argument("--max-concurrent", type=int, metavar="K", **kw,
                   help="trials at a time (default: CPUs / CPUs per trial)")
    g.add_argument("--search-alg", choices=["random", "optuna"], help="random or optuna (TPE) (default: random)", **kw)
    g.add_argument("--metric", metavar="M", **kw,
                   help=f"validation metric that picks the best trial: {', '.join(CLASSIFICATION_METRICS)} "
                        f"(classification); {', '.join(CAUSAL_METRICS)} (causal-lm; accuracy where the completions "
                        "are a label set) (default: val_loss)")
    g.add_argument("--mode", choices=["min", "max"], **kw,
                   help="min or max (default: min for val_loss and val_perplexity, max for the others)")
    g.add_argument("--max-failures", type=int, metavar="F", help="retries of a failed trial (default: 2)", **kw)
    g.add_argument("--address", metavar="A", **kw,
                   help="join a running Ray cluster (default: a local one on 127.0.0.1)")
    g.add_argument("--storage", metavar="PATH", **kw,
                   help="shared folder for Ray's results (default: the run directory)")
    s.add_argument("--space", metavar="NAME|FILE",
                   help="the space to search: a shipped one (seed: the seed project's) or a YAML file of "
                        "option: distribution (instead of --config's search:)")
    s.add_argument("--show-space", action="store_true",
                   help="print the space this search would sample (checked, as YAML), and exit")
    s.add_argument("--out", type=Path, metavar="DIR", help="search directory (default: runs/tune-<timestamp>)")
    s.add_argument("--resume", type=Path, metavar="DIR", help="continue the search in DIR (with its own options)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the run or search in --out (a folder of other files is refused)")
    s.add_argument("--baseline", type=Path, metavar="FULL_RUN_DIR",
                   help="a finished `loratune train --method full` run on the same data and split (checked before "
                        "the search starts): the report puts the best trial's accuracy, parameters and file size "
                        "beside it")
    s.set_defaults(func=cmd_tune)


def search_options(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training options, search options) from --config, then flags on top."""
    doc = read_yaml(args.config) if getattr(args, "config", None) else {}
    search = {k: doc[k] for k in SEARCH_KEYS if k in doc}
    training = {k: v for k, v in doc.items() if k not in SEARCH_KEYS}
    flags = argparse.Namespace(**{**vars(args), "config": None})
    training.update(train_options(flags))
    search.update({k: v for k, v in vars(args).items() if k in SEARCH_KEYS})
    if "search" in search and not isinstance(search["search"], dict):
        raise InputError(f"--config: {args.config}: `search:` must map training options to distributions")
    return training, search


def cmd_tune(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.search.driver import tune

    view = TrialLines(ui)
    baseline = getattr(args, "baseline", None)
    if args.resume is not None and args.space is not None:
        raise InputError("--resume: a search continues with the space it was started with; drop --space")
    if args.show_space:
        return show_space(args, ui)
    if args.resume is not None:
        given = given_training_flags(args) + (["--out"] if args.out else [])
        given += ["--" + k.replace("_", "-") for k in vars(args) if k in SEARCH_KEYS and k != "address"]
        if given:
            raise InputError(f"--resume: a search continues with the options it was started with; drop {given[0]}")
        if baseline is not None:
            check_baseline(baseline, _resumed_options(args.resume), f"the search in {args.resume}")
        tune(resume=args.resume, address=getattr(args, "address", None), progress=_progress(view, baseline),
             on_done=lambda result: show_search(ui, result, baseline))
    else:
        training, search = search_options(args)
        space = _space(args, search)
        if baseline is not None:
            from loratune.training.options import TrainConfig

            check_baseline(baseline, TrainConfig.from_dict(training).to_dict(), "this search")
        tune(space=space, out=args.out, overwrite=args.overwrite, progress=_progress(view, baseline),
             on_done=lambda result: show_search(ui, result, baseline), **search, **training)
    return 0


def _space(args: argparse.Namespace, search: dict[str, Any]) -> dict[str, Any] | None:
    """The space: --space (a shipped one or a file), else --config's ``search:``, else None (the default)."""
    space = search.pop("search", None)
    if args.space is None:
        return space
    if space is not None:
        raise InputError(f"--space: the space is given twice (--config {args.config} has a `search:` key too)")
    from loratune.search.space import load_space

    return load_space(args.space)


def show_space(args: argparse.Namespace, ui: Renderer) -> int:
    """``--show-space``: the space a search would sample (a resumed one's: its search.yaml), checked against
    the fixed options, as YAML on stdout; nothing starts."""
    import yaml

    from loratune.search.space import parse_space
    from loratune.training.options import TrainConfig

    if args.resume is not None:
        options, raw = _resumed_options(args.resume), None
        from loratune.training import rundir

        raw = rundir.read_yaml(args.resume / "search.yaml").get("search")
        if not options or not isinstance(raw, dict):
            raise InputError(f"--resume: {args.resume} holds no search (no readable search.yaml)")
        base = TrainConfig.from_stored(options)                 # as the search itself reads it (driver.tune)
        space = parse_space(raw, base)
    else:                                   # checked as the search checks it before Ray starts (driver.tune)
        from loratune.search.space import validate
        from loratune.search.trials import new_search

        training, search = search_options(args)
        raw = _space(args, search)
        doc = new_search(None, training, raw, **{**{k: v for k, v in SEARCH_KEYS.items() if k != "search"}, **search})
        raw = doc["search"]
        space = validate(raw, TrainConfig.from_stored(doc["options"]), search_alg=doc["search_alg"], load_model=True)
    ui.out(yaml.safe_dump({"search": {d.key: raw[d.key] for d in space.dims}}, sort_keys=False,
                          default_flow_style=None).rstrip())
    return 0


def check_baseline(baseline: Path, options: dict[str, Any], against: str) -> None:
    """``--baseline`` checked before the search starts: a finished --method full run on the search's data and
    split (:func:`loratune.report.baseline.load_baseline`; InputError otherwise)."""
    from loratune.report.baseline import load_baseline

    load_baseline(baseline, options, against)


def _resumed_options(search_dir: Path) -> dict[str, Any]:
    """The training options a search was started with (its search.yaml; {} where unreadable: tune says why)."""
    from loratune.training import rundir

    options = rundir.read_yaml(search_dir / "search.yaml").get("options")
    return options if isinstance(options, dict) else {}


def _progress(view: "TrialLines", baseline: Path | None) -> Any:
    """The search's events to lines; with --baseline, the search directory remembers it as soon as it exists (a
    report of an interrupted search, or of its --resume, compares with it too)."""
    if baseline is None:
        return view.event

    def event(ev: dict[str, Any]) -> None:
        if ev.get("kind") == "search_start":
            from loratune.report.baseline import remember

            remember(Path(ev["out"]), baseline)
        view.event(ev)

    return event


def show_search(ui: Renderer, result: Any, baseline: Path | None = None) -> None:
    """The trials table and the winner, then report.html (called by ``tune`` while it still holds the lock);
    ``baseline`` is recorded in the search directory, where the report finds it (RUN_DIR/baseline.json)."""
    from loratune.cli.common import write_report_safely

    if result.already_done:
        ui.line(f"search {result.out} already finished; nothing to resume")
    print_results(ui, result)
    if baseline is not None:
        from loratune.report.baseline import remember

        remember(result.out, baseline)
    if not result.already_done or baseline is not None or not (result.out / "report.html").exists():
        write_report_safely(result.out, ui)


class TrialLines:
    """One line per trial event: start (its config), each epoch's metrics, how it ended."""

    def __init__(self, ui: Renderer) -> None:
        self.ui = ui

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev["kind"]
        if kind == "search_start":
            what = "resuming the search" if ev["resumed"] else "searching"
            rungs = ev.get("rungs_per_epoch") or 1
            every = f", validated every 1/{rungs} epoch" if rungs > 1 else ""
            stops = [f"{r / rungs:g}" for r in ev.get("stop_rungs") or () if r < ev["max_epochs"] * rungs]
            where = (f"; ASHA may stop a trial at {', '.join(stops[:-1]) + ' and ' if len(stops) > 1 else ''}"
                     f"{stops[-1]} epoch{'s' if len(stops) > 1 or stops[-1] != '1' else ''}") if stops else ""
            self.ui.event({"kind": "message", "text": f"{what}: {ev['trials']} trials of up to {ev['max_epochs']} "
                                                      f"epochs{every}{where}; results in {ev['out']}"})
        elif kind == "trial":
            self.ui.event({"kind": "message", "text": self.line(ev)})
        elif kind == "message":
            self.ui.event(ev)

    @staticmethod
    def line(ev: dict[str, Any]) -> str:
        head = f"trial {ev['trial']}"
        config = describe(ev.get("config") or {})
        what = ev["event"]
        if what == "start":
            return f"{head} started: {config}"
        if what == "resume":
            return f"{head} resumed after epoch {ev.get('epoch') or 0}: {config}"
        if what == "retry":
            return f"{head} failed; retrying from its last checkpoint"
        if what == "diverged":
            return f"{head} diverged (non-finite loss) after {ev.get('epoch') or 0} epochs"
        if what == "epoch":
            m = ev["metrics"]
            shown = (("val_loss", "val_accuracy") if "val_exact_match" not in m else     # a causal LM's: its accuracy
                     [k for k in ("val_loss", "val_accuracy", "val_exact_match") if k in m])  # where it has one
            return (f"{head} epoch {ev['epoch']}/{ev['epochs']}: " + " ".join(f"{k} {_num(m.get(k))}" for k in shown)
                    + (f" [{ev['node']}]" if ev.get("node") else ""))
        status = ev.get("status", what)
        if status == "collapsed":
            status = "collapsed (one class predicted, loss no better than the label frequencies)"
        return f"{head} {status.replace('_', ' ')}: {config}" + (f" (see {ev['error']})" if ev.get("error") else "")


def describe(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"


def table(columns: list[str], rows: list[dict[str, Any]]) -> list[str]:
    """Aligned text table."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) >= 1e-2 or v == 0 else f"{v:.2e}"
        return str(v)

    cells = [columns] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]


def with_intervals(columns: list[str], rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The terminal's table: each ``<metric>_lo``/``_hi`` pair (trials.csv's 95% intervals) shown in its metric's
    cell, ``0.7900 [0.747, 0.828]``, instead of as two more columns."""
    paired = [c for c in columns if f"{c}_lo" in columns and f"{c}_hi" in columns]
    shown = [c for c in columns if not any(c in (f"{p}_lo", f"{p}_hi") for p in paired)]
    out = []
    for row in rows:
        row = dict(row)
        for c in paired:
            v, lo, hi = row.get(c), row.get(f"{c}_lo"), row.get(f"{c}_hi")
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v, lo, hi)):
                row[c] = f"{v:.4f} [{lo:.3f}, {hi:.3f}]"
        out.append(row)
    return shown, out


def print_results(ui: Renderer, result: Any) -> None:
    for line in table(*with_intervals(result.columns, result.rows)):
        ui.out(line)
    best, default = result.best, result.default
    if best is None:
        ui.line("no trial to choose: none finished with a finite validation metric (each diverged, failed or "
                "collapsed)")
        return
    metric = result.metric.removeprefix("val_")
    ui.line(f"best trial {best['trial']} by {result.metric} ({result.mode}): {describe(best['config'])}")
    for name, t in (("best", best), ("untuned default", default)):
        if not t:
            continue
        v, test = t.get("validation") or {}, t.get("test") or {}
        shown = [k for k in dict.fromkeys([metric, "loss", "accuracy", "exact_match"]) if k in v] or [
            metric, "loss", "accuracy"]
        if "exact_match" in test:          # a causal LM's: its metric, choice accuracy where it has one, exact match
            tested = "test " + ", ".join(f"{k} {_num(test[k])}" for k in dict.fromkeys([metric, "accuracy",
                                                                                       "exact_match"]) if k in test)
        else:
            tested = f"test accuracy {_num(test.get('accuracy'))}"
        ui.line(f"{name:>15} (trial {t['trial']}): validation " + ", ".join(f"{k} {_num(v.get(k))}" for k in shown)
                + f"; {tested}")
    verdict = (result.summary.get("comparison") or {}).get("verdict")   # search.json's, McNemar on test
    if verdict or result.summary.get("comparison_note"):
        ui.line(verdict or result.summary["comparison_note"])
    from loratune.report import (
        baseline as bl,  # a --method full search keeps model/, not adapter/
    )

    kept = "model" if bl.method_of(bl.lora_config(result.out, "search")) == "full" else "adapter"
    ui.line(f"best {kept}: {result.out / 'best' / kept}; table: {result.out / 'trials.csv'}")
