"""``python -m bench.quality`` (``make bench-quality``): accuracy, not speed, of configurations on the built-in
model and data, over several split seeds.

For each configuration and seed S it runs the command users run::

    loratune train --split-seed S --seed S --threads 1 --out OUT/<config>/seed-S --overwrite <config flags>

``--jobs`` runs at a time (default 2: two one-thread runs get more done on two cores than one two-thread
run), then prints a markdown table (mean ± sample sd over seeds of validation accuracy, test accuracy and
their mean, and the paired gap of each configuration to ``full`` and to ``default``) and writes the figures
to ``bench/results/quality-<UTC time>.json``.

A search configuration (``search``: the default search, the very command ``make demo`` runs) runs, per seed::

    loratune tune --split-seed S --seed S <config flags> --out OUT/search/seed-S --overwrite

(no ``--threads``: each trial gets ``--cpus-per-trial`` CPUs), one search at a time and never beside another
run, after the training runs. Its row is the chosen trial's (validation accuracy at its best epoch, test
accuracy), read from the search's ``search.json``; the figures also keep, per seed, the search's own untuned
default trial's test accuracy, its McNemar comparison with the chosen trial, the chosen config and the
search's wall time, and the table says whether the chosen adapter is, on test and averaged over the splits,
at least as good as the untuned default.

    python -m bench.quality                                   # default,full,old-default,lr2e-3+pooler,search × seeds 0,1,2
    python -m bench.quality --configs default,lr2e-3 --seeds 0,1,2,3,4
    python -m bench.quality --configs default,search          # the default search against the untuned default
    python -m bench.quality --dry-run                         # the commands only
    python -m bench.quality --extra "--max-steps 3 --sample-pct 0.05" --out /tmp/q   # a smoke run
    python -m bench.quality --configs search --seeds 0 --extra "--sample-pct 0.05" \
        --search-extra "--samples 2 --max-epochs 1" --out /tmp/q                      # a search's smoke run

Resumable: a run whose ``results.json`` exists and whose ``config.yaml`` holds the options this run would
be given (resolved now, ``auto`` included, so a changed default is a different run) is not run again; a
run killed half-way goes on with ``loratune train --resume`` where it has a checkpoint, else it starts
again. Two configurations that resolve to the same options (today ``default`` and ``old-default``) share
their runs: they are trained once. Each run's own output goes to ``OUT/<config>/seed-S.log`` and its
command, wall time and code version to ``OUT/<config>/seed-S/bench.json``. A search is reused when its
``search.json`` exists and its ``bench.json`` (else its ``search.yaml``) holds the options and the space (as
``loratune tune`` resolves them now: a changed default space is a different search) this run would give it;
a search killed half-way (``search.yaml``, no ``search.json``) goes on with ``loratune tune --resume``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

CONFIGS: dict[str, tuple[list[str], str]] = {
    "default": ([], "the untuned default, as it is when the bench runs"),
    "full": (["--method", "full"], "full fine-tuning (every weight trains), its own auto lr"),
    "old-default": (["--lr", "5e-4", "--modules-to-save", "none", "--targets", "qv", "--alpha", "16"],
                    "the LoRA defaults before the [quality] change, pinned"),
    "lr2e-3": (["--lr", "2e-3"], "candidate: lr 2e-3"),
    "lr2e-3+pooler": (["--lr", "2e-3", "--modules-to-save", "pooler"], "candidate: lr 2e-3, the pooler trains in full"),
    "lr1e-3+pooler": (["--lr", "1e-3", "--modules-to-save", "pooler"], "candidate: lr 1e-3, the pooler trains in full"),
    "dora": (["--variant", "dora"], "variant: DoRA (a learned magnitude per output row), otherwise the default"),
    "loraplus": (["--loraplus-ratio", "16"], "variant: LoRA+ (B and 1-D tensors at 16x lr, the paper's ratio)"),
    "pissa": (["--init", "pissa"], "variant: PiSSA (A, B from W0's principal singular vectors)"),
    "olora": (["--init", "olora"], "variant: OLoRA (A, B from W0's QR)"),
    "search": ([], ("the default search, as `make demo` runs it (loratune tune: the default space, 8 trials, <= 3 "
                    "epochs, ASHA); its row is the chosen trial's")),
}
"""name -> (flags of ``loratune train``, description). The seed, split seed, threads and --out are added per run.
For a search (a name in :data:`SEARCHES`) the flags are the training options it fixes for every trial."""

SEARCHES: dict[str, list[str]] = {"search": []}
"""The configurations that are searches: name -> the flags of ``loratune tune`` alone (none: the default search,
``make demo``'s). Each runs ``loratune tune --split-seed S --seed S <training flags> <these>``, without
``--threads`` (a trial's threads are its ``--cpus-per-trial``)."""

DEFAULT_CONFIGS = "default,full,old-default,lr2e-3+pooler,search"
VARIANT_CONFIGS = "default,dora,loraplus,pissa,olora"
"""``make bench-variants``: each LoRA variant beside the untuned default, on the same splits."""
SHOWN_OPTIONS = ("method", "lr", "targets", "rank", "alpha", "modules_to_save", "dropout", "epochs", "max_length",
                 "batch_size", "warmup", "weight_decay", "sample_pct", "max_steps")
"""The resolved options each configuration's JSON entry lists (all of them are in each run's config.yaml)."""
SEARCH_SHOWN = ("samples", "max_epochs", "rungs_per_epoch", "reduction_factor", "last_epoch_rung", "cpus_per_trial",
                "max_concurrent", "search_alg", "metric", "mode", "search")
"""The resolved search options a search configuration's JSON entry lists (``search``: the space it samples)."""


# --- the runs -----------------------------------------------------------------------------------

@dataclass
class Job:
    """One training run, or one search: the first configuration (in ``--configs`` order) that resolves to its
    options owns it."""
    config: str
    seed: int
    flags: list[str]                    # the training flags (config flags + --extra), seed and threads included
    raw: dict[str, Any]                 # their options as TrainConfig.to_dict gives them (config.yaml's)
    resolved: dict[str, Any]            # the same, every auto resolved
    dir: Path
    shared_by: list[str] = field(default_factory=list)   # other configurations with the same options
    search: dict[str, Any] | None = None   # a search: what `loratune tune` would write to search.yaml (space included)
    action: str = "run"                 # done | resume | run
    status: str = "pending"             # done | reused | failed | timeout | interrupted
    wall_s: float | None = None
    returncode: int | None = None
    results: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.config} seed {self.seed}"

    @property
    def is_search(self) -> bool:
        return self.search is not None

    @property
    def result_file(self) -> str:
        """What a finished run leaves: a training run's results.json, a search's search.json."""
        return "search.json" if self.is_search else "results.json"


def loratune_cmd(override: str | None) -> list[str]:
    """The ``loratune`` program next to this Python (the console script users run), else ``python -m loratune``."""
    if override:
        return shlex.split(override)
    script = Path(sys.executable).parent / "loratune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "loratune"]


def resolve(flags: Sequence[str]) -> dict[str, Any]:
    """The options ``loratune train FLAGS`` trains with, ``auto`` resolved (see :func:`resolve_both`)."""
    return resolve_both(flags)[1]


def resolve_both(flags: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options of ``loratune train FLAGS``, parsed by loratune's own parser in this process (no torch), as
    plain JSON values: (as ``TrainConfig.to_dict`` gives them, the same with every ``auto`` resolved).

    ``to_dict`` leaves ``auto`` where the model decides (``modules_to_save``); the second dict has the value of
    loratune's table there, which is what MiniLM gets (it has every module the table names)."""
    from loratune.cli.common import train_options
    from loratune.cli.main import build_parser
    from loratune.errors import InputError
    from loratune.training.options import AUTO, OPTIONS, TrainConfig, resolve_auto

    try:
        args = build_parser().parse_args(["train", *flags])
    except SystemExit:
        raise ValueError(f"loratune train does not take these flags: {shlex.join(flags)}") from None
    try:
        config = TrainConfig.from_dict(train_options(args))
        raw = config.to_dict()
        resolved = {name: OPTIONS[name].check(name, resolve_auto(name, *config.auto_key()))
                    if value == AUTO and OPTIONS[name].auto else value for name, value in raw.items()}
    except InputError as e:
        raise ValueError(f"{shlex.join(flags)}: {e}") from None
    return _norm(raw), _norm(resolved)


def _norm(v: Any) -> Any:
    """Plain JSON values (tuples as lists), as read back from YAML or JSON."""
    return json.loads(json.dumps(v))


SEARCH_IDENTITY = ("options", "search", "samples", "max_epochs", "rungs_per_epoch", "reduction_factor",
                   "last_epoch_rung", "cpus_per_trial", "max_concurrent", "search_alg", "metric", "mode", "max_failures")
"""The keys of search.yaml that make two searches the same search (not where Ray keeps its state)."""


def resolve_search(flags: Sequence[str]) -> dict[str, Any]:
    """What ``loratune tune FLAGS`` would write to its search.yaml (its training options, the space it samples,
    resolved: the default space when none is given, and its own options at their defaults), from loratune's own
    parser and :func:`loratune.search.trials.new_search` in this process (no Ray; it imports torch), as plain
    JSON values. ValueError for flags ``loratune tune`` refuses."""
    import inspect

    from loratune.cli.main import build_parser
    from loratune.cli.tune import SEARCH_KEYS, _space, search_options
    from loratune.errors import InputError
    from loratune.search.trials import new_search

    try:
        args = build_parser().parse_args(["tune", *flags])
    except SystemExit:
        raise ValueError(f"loratune tune does not take these flags: {shlex.join(flags)}") from None
    if args.resume is not None or args.out is not None or args.show_space:
        raise ValueError(f"{shlex.join(flags)}: a search configuration gives neither --resume, --out nor --show-space")
    try:
        training, search = search_options(args)
        space = _space(args, search)
        takes = inspect.signature(new_search).parameters
        kw = {k: search.get(k, default) for k, default in SEARCH_KEYS.items() if k in takes}
        doc = new_search(None, training, space, **kw)
    except InputError as e:
        raise ValueError(f"loratune tune {shlex.join(flags)}: {e}") from None
    return _norm({k: doc.get(k) for k in SEARCH_IDENTITY})


def read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def started_with(run_dir: Path, job: Job) -> bool:
    """The run in ``run_dir`` was started with the job's options: its config.yaml holds each of them (resolved,
    or ``auto`` where this loratune's config.yaml keeps ``auto``); a search: its search.yaml is this search
    (:func:`same_search`)."""
    if job.is_search:
        return same_search(read_yaml(run_dir / "search.yaml"), job)
    cfg = read_yaml(run_dir / "config.yaml")
    return cfg is not None and all(_stored(cfg, k) in (v, job.raw.get(k)) for k, v in job.resolved.items())


def _stored(options: dict[str, Any], key: str) -> Any:
    """``options[key]``; an option newer than the run (absent) at its declared default, which is what the run
    trained with (an option added later at its default changes nothing: such runs are reused)."""
    if key in options:
        return _norm(options[key])
    from loratune.training.options import DEFAULTS

    return _norm(DEFAULTS.get(key))


def same_search(stored: Any, job: Job) -> bool:
    """``stored`` (a search.yaml, or the ``search`` bench.json recorded) is the job's search: the same space and
    search options, and each training option the job resolves to (``auto`` where search.yaml keeps it; a local
    path as tune stores it, absolute)."""
    ours = job.search
    if ours is None or not isinstance(stored, dict) or not isinstance(stored.get("options"), dict):
        return False
    if any(_norm(stored.get(k)) != v for k, v in ours.items() if k != "options"):
        return False
    opts = stored["options"]
    return all(_stored(opts, k) in (v, job.raw.get(k), ours["options"].get(k)) for k, v in job.resolved.items())


def finished_with(run_dir: Path, job: Job) -> bool:
    """The run in ``run_dir`` finished with the job's options: results.json (a search: search.json), and the
    options resolved by this program when it ran (bench.json: written after a run that ended well), else its
    config.yaml's (search.yaml's)."""
    if read_json(run_dir / job.result_file) is None:
        return False
    bench = read_json(run_dir / "bench.json")
    if bench is None:
        return started_with(run_dir, job)
    stored = bench.get("options")
    if job.is_search and not same_search(bench.get("search"), job):
        return False
    return isinstance(stored, dict) and all(_stored(stored, k) == v for k, v in job.resolved.items())


def plan(job: Job, out: Path) -> str:
    """What a run needs: ``done`` (its directory, or another configuration's under ``out``, finished with these
    options: ``job.dir`` then names it), ``resume`` (started with them and has a checkpoint) or ``run`` (missing,
    other options, or nothing to resume from: started again)."""
    d = job.dir
    if finished_with(d, job):
        return "done"
    if job.is_search:                           # search.yaml is all `tune --resume` needs (Ray's state, if any)
        if read_json(d / "search.json") is None and "experiment" in (read_yaml(d / "search.yaml") or {}) \
                and started_with(d, job):
            return "resume"
    elif read_json(d / "results.json") is None and any((d / "checkpoints").glob("*.pt")) and started_with(d, job):
        return "resume"
    for other in sorted(out.glob(f"*/{d.name}")):
        if other != d and finished_with(other, job):
            job.dir = other
            return "done"
    return "run"


def command(prog: list[str], job: Job, action: str) -> list[str]:
    if job.is_search:
        if action == "resume":
            return [*prog, "tune", "--resume", str(job.dir)]
        return [*prog, "tune", *job.flags, "--out", str(job.dir), "--overwrite"]
    if action == "resume":
        return [*prog, "train", "--resume", "--out", str(job.dir)]
    return [*prog, "train", *job.flags, "--out", str(job.dir), "--overwrite"]


def schedule(todo: Sequence[Job], jobs: int) -> list[tuple[list[Job], int]]:
    """The phases the runs go in, one after the other, each (its runs, how many at a time): the training runs,
    ``jobs`` at a time, then each search alone (its trials take every CPU: beside another run both would be
    slowed and its wall time would be wrong)."""
    train = [j for j in todo if not j.is_search]
    phases = [(train, max(1, min(jobs, len(train))))] if train else []
    return phases + [([j], 1) for j in todo if j.is_search]


def code_version() -> str:
    """``git describe``-like: the commit of the working tree, ``+dirty`` when src/ has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


class Runner:
    """Runs jobs as subprocesses, each in its own session (so only this program signals it), with a time limit."""

    def __init__(self, prog: list[str], timeout: float, version: str, search_timeout: float | None = None) -> None:
        self.prog, self.timeout, self.version = prog, timeout, version
        self.search_timeout = timeout if search_timeout is None else search_timeout
        self.live: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()
        self.stopping = False

    def run(self, job: Job) -> Job:
        action = job.action
        for _ in (1, 2):                        # a failed --resume starts the run again, once
            if self.stopping:
                job.status = "interrupted"
                return job
            cmd = command(self.prog, job, action)
            log = job.dir.parent / f"{job.dir.name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            with open(log, "ab") as out:
                out.write(f"\n$ {shlex.join(cmd)}\n".encode())
                out.flush()
                p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
                with self.lock:
                    self.live.add(p)
                    if self.stopping:           # stop_all ran while this one started
                        stop(p, wait=False)
                try:
                    rc = p.wait(timeout=self.search_timeout if job.is_search else self.timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    stop(p)
                    rc, timed_out = p.returncode, True
                finally:
                    with self.lock:
                        self.live.discard(p)
            job.wall_s, job.returncode = time.monotonic() - t0, rc
            if timed_out:
                job.status = "timeout"
                return job
            if rc == 0 and (res := read_json(job.dir / job.result_file)) is not None:
                job.results, job.status = res, "done"
                write_bench_json(job, cmd, action, self.version)
                return job
            if self.stopping or rc == 130:
                job.status = "interrupted"
                return job
            if action != "resume":
                break
            action = "run"
        job.status = "failed"
        return job

    def stop_all(self) -> None:
        self.stopping = True
        with self.lock:
            procs = list(self.live)
        for p in procs:
            stop(p, wait=False)
        for p in procs:
            stop(p)


def stop(p: subprocess.Popen[bytes], wait: bool = True) -> None:
    """SIGTERM (loratune finishes the step, checkpoints and exits 130; a search saves its state and exits 130),
    then SIGKILL to its process group (its own session) after 2 minutes."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    if not wait:
        return
    try:
        p.wait(timeout=120)
    except subprocess.TimeoutExpired:
        try:                            # its whole session (a search's Ray workers too); it is not reaped yet
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            p.kill()
        p.wait()


def write_bench_json(job: Job, cmd: list[str], action: str, version: str) -> None:
    kind = "tune" if job.is_search else "train"
    doc = {"config": job.config, "shared_by": job.shared_by, "seed": job.seed, "command": shlex.join(cmd),
           f"{kind}_command": shlex.join(command(["loratune"], job, "run")), "action": action,
           "wall_s": job.wall_s, "code": version, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "options": job.resolved}
    if job.is_search:
        doc["search"] = job.search
    (job.dir / "bench.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


# --- the numbers --------------------------------------------------------------------------------

def mean_sd(xs: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None}
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": m, "sd": sd}


def per_seed(job: Job) -> dict[str, Any]:
    if job.is_search:
        return search_seed(job)
    r = job.results or {}
    v, t = (r.get("validation") or {}).get("accuracy"), (r.get("test") or {}).get("accuracy")
    both = (v + t) / 2 if v is not None and t is not None else None
    bench = read_json(job.dir / "bench.json") or {}
    return {"seed": job.seed, "status": job.status, "dir": str(job.dir), "validation_accuracy": v,
            "test_accuracy": t, "mean_accuracy": both, "best_epoch": r.get("best_epoch"),
            "epochs_run": (r.get("train") or {}).get("epochs_run"), "train_s": (r.get("train") or {}).get("seconds"),
            "wall_s": job.wall_s if job.wall_s is not None else bench.get("wall_s"), "code": bench.get("code")}


def _accuracy(metrics: Any) -> float | None:
    v = metrics.get("accuracy") if isinstance(metrics, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def search_seed(job: Job) -> dict[str, Any]:
    """A search's numbers for one seed, from its directory: the chosen (best) trial's validation accuracy at its
    best epoch and test accuracy (search.json's ``best``, else best/results.json's), and under ``search`` the
    chosen trial and config, the search's own untuned default trial's accuracies, search.json's ``comparison``
    (McNemar on test, where the search has it), its statuses and its own wall time (``seconds``)."""
    doc = job.results if job.results is not None else read_json(job.dir / "search.json")
    doc = doc or {}
    best, default = doc.get("best") or {}, doc.get("default") or {}
    kept = (read_json(job.dir / "best" / "results.json") or {}) if best else {}
    v = _accuracy(best.get("validation")) if best.get("validation") else _accuracy(kept.get("validation"))
    t = _accuracy(best.get("test")) if best.get("test") else _accuracy(kept.get("test"))
    both = (v + t) / 2 if v is not None and t is not None else None
    bench = read_json(job.dir / "bench.json") or {}
    history = kept.get("history") if isinstance(kept.get("history"), list) else []
    epochs = [e["epoch"] for e in history if isinstance(e, dict) and isinstance(e.get("epoch"), (int, float))]
    dv, dt = _accuracy(default.get("validation")), _accuracy(default.get("test"))
    search = {"trial": best.get("trial"), "config": best.get("config") or kept.get("config"),
              "trial_status": best.get("status"), "default_trial": default.get("trial"),
              "default_validation_accuracy": dv, "default_test_accuracy": dt,
              "test_vs_own_default_points": 100 * (t - dt) if t is not None and dt is not None else None,
              "trials": doc.get("trials"), "statuses": doc.get("statuses"), "seconds": doc.get("seconds")}
    if "comparison" in doc:
        search["comparison"] = doc["comparison"]
    return {"seed": job.seed, "status": job.status, "dir": str(job.dir), "validation_accuracy": v,
            "test_accuracy": t, "mean_accuracy": both, "best_epoch": best.get("best_epoch", kept.get("best_epoch")),
            "epochs_run": max(epochs) if epochs else None, "train_s": (kept.get("train") or {}).get("seconds"),
            "wall_s": job.wall_s if job.wall_s is not None else bench.get("wall_s"), "code": bench.get("code"),
            "search": search}


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "mean_accuracy") -> dict[str, Any]:
    """Mean ± sd of the per-seed differences a − b of ``key`` (the mean accuracy), in points (seeds share their
    splits)."""
    bs = {r["seed"]: r[key] for r in b if r[key] is not None}
    d = [100 * (r[key] - bs[r["seed"]]) for r in a if r[key] is not None and r["seed"] in bs]
    return mean_sd(d)


def summarize(names: list[str], seeds: list[int], jobs: dict[tuple[str, int], Job]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        runs = [per_seed(jobs[name, s]) | {"status": jobs[name, s].status if jobs[name, s].config == name
                                          else "shared"} for s in seeds]
        ok = [r for r in runs if r["mean_accuracy"] is not None]
        walls = [r["wall_s"] for r in ok if r["wall_s"] is not None]
        first = jobs[name, seeds[0]]
        out[name] = {"flags": CONFIGS[name][0], "description": CONFIGS[name][1],
                     "options": {k: first.resolved.get(k) for k in SHOWN_OPTIONS},
                     "runs_of": first.config if first.config != name else None, "runs": runs,
                     "validation_accuracy": mean_sd([r["validation_accuracy"] for r in ok]),
                     "test_accuracy": mean_sd([r["test_accuracy"] for r in ok]),
                     "mean_accuracy": mean_sd([r["mean_accuracy"] for r in ok]),
                     "wall_s_mean": sum(walls) / len(walls) if walls else None}
        if first.is_search:
            own = [r["search"]["test_vs_own_default_points"] for r in ok
                   if r["search"]["test_vs_own_default_points"] is not None]
            secs = [r["search"]["seconds"] for r in ok if isinstance(r["search"]["seconds"], (int, float))]
            out[name]["search"] = {"tune_flags": SEARCHES[name], **{k: first.search.get(k) for k in SEARCH_SHOWN},
                                   "options": first.search["options"],
                                   "own_default_test_accuracy": mean_sd([r["search"]["default_test_accuracy"]
                                                                         for r in ok if r["search"][
                                                                             "default_test_accuracy"] is not None]),
                                   "test_vs_own_default_points": mean_sd(own),
                                   "seconds_mean": sum(secs) / len(secs) if secs else None}
    for name in names:
        for ref in ("full", "default"):
            if ref in out:
                out[name][f"vs_{ref}_points"] = paired(out[name]["runs"], out[ref]["runs"])
        if "default" in out:                    # the test split alone: what the chosen trial is judged on
            out[name]["vs_default_test_points"] = paired(out[name]["runs"], out["default"]["runs"], "test_accuracy")
    for name, c in out.items():
        if "search" in c:
            c["search"]["verdict"] = search_verdict(name, c, len(seeds))
    return out


def search_verdict(name: str, c: dict[str, Any], seeds: int) -> str:
    """In words: is the search's chosen adapter, on test and averaged over the splits, at least as good as the
    untuned default (the ``default`` configuration's run on the same split, and the search's own untuned trial)?"""
    def gap(s: dict[str, Any] | None, against: str) -> str | None:
        if not s or s["mean"] is None:
            return None
        word = "at least as good as" if s["mean"] >= 0 else "worse than"
        return f"{word} {against} ({points(s)} points, {s['n']} of {seeds} splits)"

    parts = [g for g in (gap(c.get("vs_default_test_points"), "the untuned default (`default`)"),
                         gap(c["search"]["test_vs_own_default_points"], "the search's own untuned trial")) if g]
    if not parts:
        return f"{name}: no split with both the chosen trial's and the untuned default's test accuracy"
    return f"{name}: the chosen adapter's test accuracy, averaged over the splits, is " + "; and ".join(parts)


# --- the table ----------------------------------------------------------------------------------

def pct(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        return "—"
    return f"{100 * s['mean']:.2f}" + (f" ± {100 * s['sd']:.2f}" if s["sd"] is not None else "")


def points(s: dict[str, Any] | None) -> str:
    if not s or s["mean"] is None:
        return "—"
    return f"{s['mean']:+.2f}" + (f" ± {s['sd']:.2f}" if s["sd"] is not None else "")


def short_options(o: dict[str, Any]) -> str:
    lr = f"lr {o['lr']:g}"
    if o.get("method") == "full":
        return f"full, {lr}"
    save = ",".join(o.get("modules_to_save") or []) or "head"
    return f"{lr}, {','.join(o['targets'])}, r {o['rank']}, α {o['alpha']:g}, save {save}"


def search_note(c: dict[str, Any]) -> str:
    """A search row's options cell: what its numbers are."""
    s = c["search"]
    flags = s.get("tune_flags") or []
    space = (f"space {flags[flags.index('--space') + 1]}" if "--space" in flags[:-1] else "the default space")
    rungs = s.get("rungs_per_epoch") or 1
    n = s["samples"]
    an = "an" if str(n).startswith("8") or n in (11, 18) else "a"
    return (f"the chosen trial of {an} {n}-trial search ({space}, ≤ {s['max_epochs']} epochs, ASHA, "
            f"{rungs} rung{'s' if rungs != 1 else ''}/epoch, chosen by {s['metric']} on validation)")


def describe(config: Any) -> str:
    """A trial's config, as ``loratune tune`` prints it."""
    if not isinstance(config, dict) or not config:
        return "—"
    def v(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}"
        return ",".join(map(str, x)) if isinstance(x, list) else str(x)
    return " ".join(f"{k}={v(x)}" for k, x in config.items())


def render(res: dict[str, Any]) -> str:
    from bench.common import table

    m, cfgs = res["machine"], res["configs"]
    extra = f"; extra flags `{res['extra']}`" if res["extra"] else ""
    searches = [name for name, c in cfgs.items() if "search" in c]
    alone = ("; each search alone, after them (its trials take every CPU)" if searches else "")
    head = [f"## Quality: {res['model']} on {res['data']}, seeds {','.join(map(str, res['seeds']))} "
            f"(split seed = training seed), {res['when']}", "",
            f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}; {res['jobs']} runs at a time, "
            f"1 thread each{alone}; code {res['code']}{extra}. Accuracy in %, mean ± sample sd over seeds; \"vs\": the "
            f"paired per-seed difference of the mean of validation and test accuracy, in points (mean ± sd); \"test vs "
            f"default\": the same of test accuracy alone. Total {res['seconds'] / 60:.1f} min.", ""]
    rows = []
    for name, c in cfgs.items():
        label = name + (f" (= {c['runs_of']})" if c["runs_of"] else "")
        rows.append([label, search_note(c) if "search" in c else short_options(c["options"]),
                     f"{c['mean_accuracy']['n']}/{len(res['seeds'])}",
                     pct(c["validation_accuracy"]), pct(c["test_accuracy"]), "**" + pct(c["mean_accuracy"]) + "**",
                     points(c.get("vs_full_points")) if name != "full" else "",
                     points(c.get("vs_default_points")) if name != "default" else "",
                     points(c.get("vs_default_test_points")) if name != "default" else "",
                     f"{c['wall_s_mean']:.0f}" if c["wall_s_mean"] is not None else "—"])
    parts = head + [table(rows, ["config", "options", "seeds", "validation", "test", "mean of val & test",
                                 "vs full", "vs default", "test vs default", "s per run"]), ""]
    parts += [c["search"]["verdict"] + "." for c in cfgs.values() if "search" in c]
    parts += [""] if searches else []
    seed_rows = []
    for name, c in cfgs.items():
        for r in c["runs"]:
            f = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
            seed_rows.append([name, r["seed"], f(r["validation_accuracy"]), f(r["test_accuracy"]),
                              f(r["mean_accuracy"]), r["best_epoch"] if r["best_epoch"] is not None else "—",
                              f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "—", r["status"]])
    parts += ["Per seed:", "", table(seed_rows, ["config", "seed", "validation", "test", "mean", "best epoch",
                                                 "wall s", "status"]), ""]
    search_rows = []
    for name in searches:
        for r in cfgs[name]["runs"]:
            f = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
            s = r.get("search") or {}
            cmp = s.get("comparison") or {}
            p = cmp.get("p_value")
            search_rows.append([name, r["seed"], s.get("trial") or "—", describe(s.get("config")),
                                f(r["validation_accuracy"]), f(r["test_accuracy"]), f(s.get("default_test_accuracy")),
                                "—" if s.get("test_vs_own_default_points") is None
                                else f"{s['test_vs_own_default_points']:+.2f}",
                                "—" if p is None else f"{p:.3g}" + (" *" if cmp.get("beyond_chance") else ""),
                                ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in (s.get("statuses") or {}).items())
                                or "—",
                                f"{s['seconds']:.0f}" if isinstance(s.get("seconds"), (int, float)) else "—",
                                f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "—"])
    if search_rows:
        parts += [("Searches per seed: the chosen trial (by validation) and its config; its test accuracy beside the "
                   "search's own untuned default trial's, their gap in points and McNemar's p on test (* below 0.05); "
                   "the trials' statuses; the search's own time and the bench's wall time:"), "",
                  table(search_rows, ["config", "seed", "chosen trial", "chosen config", "validation", "test",
                                      "untuned trial test", "gap", "McNemar p", "trials", "search s", "wall s"]), ""]
    codes = {r["code"] for c in cfgs.values() for r in c["runs"] if r.get("code")}
    if len(codes) > 1:
        parts.append(f"Note: the runs come from different code versions: {', '.join(sorted(codes))}.")
    return "\n".join(parts)


# --- main ---------------------------------------------------------------------------------------

def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt          # SIGTERM stops the bench as Ctrl-C does: the runs checkpoint, then exit

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="configurations:\n" + "\n".join(
                                     f"  {k:15} " + (f"loratune tune {shlex.join([*f, *SEARCHES[k]])}".rstrip()
                                                     if k in SEARCHES else shlex.join(f) or "(no flags)") + f": {d}"
                                     for k, (f, d) in CONFIGS.items()))
    ap.add_argument("--seeds", default="0,1,2", help="split seeds = training seeds (default: %(default)s)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="configurations, comma-separated (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-quality"),
                    help="folder of the run directories, OUT/<config>/seed-S (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="the figures (default: bench/results/quality-<UTC time>.json)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default: %(default)s)")
    ap.add_argument("--search-timeout", type=float, default=7200,
                    help="seconds one search may take (default: %(default)s)")
    ap.add_argument("--extra", default="", help="flags appended to every training command (a search's too: the "
                    "options it fixes), e.g. \"--max-steps 3 --sample-pct 0.05\" for a smoke run")
    ap.add_argument("--search-extra", default="", help="flags of `loratune tune` appended to every search's "
                    "command, e.g. \"--samples 2 --max-epochs 1\" for a smoke run")
    ap.add_argument("--fresh", action="store_true", help="run everything again (finished runs included)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--loratune", help=argparse.SUPPRESS)       # the program to run (tests: a stand-in)
    a = ap.parse_args(argv)
    return check_lists(ap, a, a.configs, "--configs", CONFIGS, "configuration")


def check_lists(ap: argparse.ArgumentParser, a: argparse.Namespace, names: str, flag: str, known: Mapping[str, Any],
                what: str) -> argparse.Namespace:
    """``a.seeds`` (from its comma-separated text) and ``a.configs`` (from ``names``, given as ``flag``: each
    one of ``known``) as lists, each non-empty and without repeats, and ``a.jobs`` >= 1; else ``ap.error``."""
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.configs = [c.strip() for c in names.split(",") if c.strip()]
    unknown = [c for c in a.configs if c not in known]
    if unknown:
        ap.error(f"{flag}: unknown {unknown[0]!r}; known: {', '.join(known)}")
    if not a.seeds or not a.configs or a.jobs < 1:
        ap.error(f"give at least one seed and one {what}, and --jobs >= 1")
    if len(set(a.seeds)) != len(a.seeds) or len(set(a.configs)) != len(a.configs):
        ap.error(f"--seeds and {flag}: each at most once")
    return a


def make_jobs(a: argparse.Namespace, configs: Mapping[str, tuple[list[str], str]] | None = None
              ) -> tuple[dict[tuple[str, int], Job], list[Job]]:
    """(config, seed) -> its job (shared where options coincide), and the distinct jobs. ``configs``: name ->
    (flags, description), :data:`CONFIGS` unless given (bench.llm's rows)."""
    configs = CONFIGS if configs is None else configs
    extra, search_extra = shlex.split(a.extra), shlex.split(getattr(a, "search_extra", "") or "")
    by_options: dict[str, Job] = {}
    jobs: dict[tuple[str, int], Job] = {}
    for name in a.configs:
        for seed in a.seeds:
            search = None
            if name in SEARCHES:                # the training options it fixes, resolved as for `loratune train`
                training = ["--split-seed", str(seed), "--seed", str(seed), *configs[name][0], *extra]
                flags = [*training, *SEARCHES[name], *search_extra]
                raw, resolved = resolve_both(training)
                search = resolve_search(flags)
                key = "search " + json.dumps([search, resolved], sort_keys=True)
            else:
                flags = ["--split-seed", str(seed), "--seed", str(seed), "--threads", "1", *configs[name][0], *extra]
                raw, resolved = resolve_both(flags)
                key = json.dumps(resolved, sort_keys=True)
            if key in by_options:
                by_options[key].shared_by.append(name)
            else:
                by_options[key] = Job(name, seed, flags, raw, resolved, a.out / name / f"seed-{seed}", search=search)
            jobs[name, seed] = by_options[key]
    return jobs, list(by_options.values())


def outcome(job: Job) -> str:
    """A finished job in a few words, for the progress log."""
    if job.status != "done":
        return f"{job.status.upper()} (exit {job.returncode}; see {job.dir.parent / job.dir.name}.log)"
    r = per_seed(job)
    v, t = r["validation_accuracy"], r["test_accuracy"]
    what = "no trial chosen" if v is None else f"validation {v:.4f}" + (f", test {t:.4f}" if t is not None else "")
    if job.is_search:
        s = r["search"]
        what += (f" (trial {s['trial']}: {describe(s['config'])}; untuned trial's test "
                 + ("—" if s["default_test_accuracy"] is None else f"{s['default_test_accuracy']:.4f}") + ")")
    return what


def run_all(phases: Sequence[tuple[list[Job], int]], runner: Runner, log: Callable[[str], None]) -> bool:
    """Runs the phases (:func:`schedule`) one after the other, each one's jobs ``width`` at a time in the order
    given, logging each as it ends; True when interrupted (Ctrl-C or SIGTERM: every run is stopped and writes a
    checkpoint, so the same command goes on later)."""
    total = sum(len(batch) for batch, _ in phases)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    pool: cf.ThreadPoolExecutor | None = None
    n = 0
    try:
        for batch, width in phases:             # a phase starts when the one before it has ended
            pool = cf.ThreadPoolExecutor(max_workers=width)
            futures = [pool.submit(runner.run, job) for job in batch]
            for fut in cf.as_completed(futures):
                n += 1
                job = fut.result()
                also = f" (= {', '.join(job.shared_by)})" if job.shared_by else ""
                log(f"{n}/{total} {job.name}{also}: {outcome(job)} in {job.wall_s or 0:.0f} s")
            pool.shutdown(wait=True)
    except KeyboardInterrupt:
        log("interrupted: stopping the runs (each writes a checkpoint; run the same command again to go on)")
        runner.stop_all()
        return True
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        jobs, distinct = make_jobs(a)
    except ValueError as e:
        print(f"bench.quality: {e}", file=sys.stderr)
        return 2
    prog = loratune_cmd(a.loratune)
    for job in distinct:
        job.action = "run" if a.fresh else plan(job, a.out)
    # longest first (full fine-tuning costs about twice a LoRA run), so the last runs to finish are short ones
    order = sorted(distinct, key=lambda j: (j.action != "done", -(2 if j.resolved["method"] == "full" else 1)))
    todo = [j for j in order if j.action != "done"]
    phases = schedule(todo, a.jobs)             # the training runs, then each search alone
    if a.dry_run:                               # in the order they would run, the finished ones first
        for job in [j for j in order if j.action == "done"] + [j for batch, _ in phases for j in batch]:
            note = f"   # also {', '.join(job.shared_by)}" if job.shared_by else ""
            what = "# done: " if job.action == "done" else ""
            print(f"{what}{shlex.join(command(prog, job, job.action))}{note}")
        return 0

    from bench.common import machine

    version = code_version()
    started = time.monotonic()
    log = lambda s: print(f"[{time.monotonic() - started:6.0f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    for job in distinct:
        if job.action == "done":
            job.results, job.status = read_json(job.dir / job.result_file), "reused"
    shared = [f"{j.config}={'='.join(j.shared_by)}" for j in distinct if j.shared_by and j.seed == a.seeds[0]]
    n_search = sum(j.is_search for j in distinct)
    log(f"{len(distinct)} runs ({len(distinct) - len(todo)} already done, "
        f"{sum(j.action == 'resume' for j in todo)} to resume), {a.jobs} at a time, 1 thread each"
        + (f"; {n_search} searches, each alone after them" if n_search else "") + f"; run dirs in {a.out}"
        + (f"; same options, run once: {', '.join(shared)}" if shared else ""))
    if run_all(phases, Runner(prog, a.timeout, version, a.search_timeout), log):
        return 130

    res: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                           "code": version, "model": distinct[0].resolved.get("model"),
                           "data": distinct[0].resolved.get("data"), "seeds": a.seeds, "jobs": a.jobs,
                           "extra": a.extra, "out": str(a.out), "seconds": time.monotonic() - started,
                           "loadavg_end": os.getloadavg(),
                           "configs": summarize(a.configs, a.seeds, jobs)}
    return finish(res, a.json, "quality", render, distinct, log)


def finish(res: dict[str, Any], path: Path | None, prefix: str, show: Callable[[dict[str, Any]], str],
           distinct: Sequence[Job], log: Callable[[str], None]) -> int:
    """Writes the figures (``path``, else bench/results/<prefix>-<UTC time>.json), prints ``show(res)``, names the
    runs that did not finish; the exit status: 1 if any did not, else 0."""
    path = path or Path("bench/results") / f"{prefix}-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    print(show(res))
    log(f"figures: {path}")
    failed = [j.name for j in distinct if j.status not in ("done", "reused")]
    if failed:
        log(f"{len(failed)} runs did not finish: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
