"""``python -m bench.quality`` (``make bench-quality``): accuracy, not speed, of configurations on the built-in
model and data, over several split seeds.

For each configuration and seed S it runs the command users run::

    loratune train --split-seed S --seed S --threads 1 --out OUT/<config>/seed-S --overwrite <config flags>

``--jobs`` runs at a time (default 2: two one-thread runs get more done on two cores than one two-thread
run), then prints a markdown table (mean ± sample sd over seeds of validation accuracy, test accuracy and
their mean, and the paired gap of each configuration to ``full`` and to ``default``) and writes the figures
to ``bench/results/quality-<UTC time>.json``.

    python -m bench.quality                                   # default,full,old-default,lr2e-3+pooler × seeds 0,1,2
    python -m bench.quality --configs default,lr2e-3 --seeds 0,1,2,3,4
    python -m bench.quality --dry-run                         # the commands only
    python -m bench.quality --extra "--max-steps 3 --sample-pct 0.05" --out /tmp/q   # a smoke run

Resumable: a run whose ``results.json`` exists and whose ``config.yaml`` holds the options this run would
be given (resolved now, ``auto`` included, so a changed default is a different run) is not run again; a
run killed half-way goes on with ``loratune train --resume`` where it has a checkpoint, else it starts
again. Two configurations that resolve to the same options (today ``default`` and ``old-default``) share
their runs: they are trained once. Each run's own output goes to ``OUT/<config>/seed-S.log`` and its
command, wall time and code version to ``OUT/<config>/seed-S/bench.json``.
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
from typing import Any, Sequence

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
}
"""name -> (flags of ``loratune train``, description). The seed, split seed, threads and --out are added per run."""

DEFAULT_CONFIGS = "default,full,old-default,lr2e-3+pooler"
VARIANT_CONFIGS = "default,dora,loraplus,pissa,olora"
"""``make bench-variants``: each LoRA variant beside the untuned default, on the same splits."""
SHOWN_OPTIONS = ("method", "lr", "targets", "rank", "alpha", "modules_to_save", "dropout", "epochs", "max_length",
                 "batch_size", "warmup", "weight_decay", "sample_pct", "max_steps")
"""The resolved options each configuration's JSON entry lists (all of them are in each run's config.yaml)."""


# --- the runs -----------------------------------------------------------------------------------

@dataclass
class Job:
    """One training run: the first configuration (in ``--configs`` order) that resolves to its options owns it."""
    config: str
    seed: int
    flags: list[str]                    # the training flags (config flags + --extra), seed and threads included
    raw: dict[str, Any]                 # their options as TrainConfig.to_dict gives them (config.yaml's)
    resolved: dict[str, Any]            # the same, every auto resolved
    dir: Path
    shared_by: list[str] = field(default_factory=list)   # other configurations with the same options
    action: str = "run"                 # done | resume | run
    status: str = "pending"             # done | reused | failed | timeout | interrupted
    wall_s: float | None = None
    returncode: int | None = None
    results: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return f"{self.config} seed {self.seed}"


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
    or ``auto`` where this loratune's config.yaml keeps ``auto``)."""
    cfg = read_yaml(run_dir / "config.yaml")
    return cfg is not None and all(_stored(cfg, k) in (v, job.raw.get(k)) for k, v in job.resolved.items())


def _stored(options: dict[str, Any], key: str) -> Any:
    """``options[key]``; an option newer than the run (absent) at its declared default, which is what the run
    trained with (an option added later at its default changes nothing: such runs are reused)."""
    if key in options:
        return _norm(options[key])
    from loratune.training.options import DEFAULTS

    return _norm(DEFAULTS.get(key))


def finished_with(run_dir: Path, job: Job) -> bool:
    """The run in ``run_dir`` finished with the job's options: results.json, and the options resolved by this
    program when it ran (bench.json: written after a run that ended well), else its config.yaml's."""
    if read_json(run_dir / "results.json") is None:
        return False
    bench = read_json(run_dir / "bench.json")
    if bench is None:
        return started_with(run_dir, job)
    stored = bench.get("options")
    return isinstance(stored, dict) and all(_stored(stored, k) == v for k, v in job.resolved.items())


def plan(job: Job, out: Path) -> str:
    """What a run needs: ``done`` (its directory, or another configuration's under ``out``, finished with these
    options: ``job.dir`` then names it), ``resume`` (started with them and has a checkpoint) or ``run`` (missing,
    other options, or nothing to resume from: started again)."""
    d = job.dir
    if finished_with(d, job):
        return "done"
    if read_json(d / "results.json") is None and any((d / "checkpoints").glob("*.pt")) and started_with(d, job):
        return "resume"
    for other in sorted(out.glob(f"*/{d.name}")):
        if other != d and finished_with(other, job):
            job.dir = other
            return "done"
    return "run"


def command(prog: list[str], job: Job, action: str) -> list[str]:
    if action == "resume":
        return [*prog, "train", "--resume", "--out", str(job.dir)]
    return [*prog, "train", *job.flags, "--out", str(job.dir), "--overwrite"]


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

    def __init__(self, prog: list[str], timeout: float, version: str) -> None:
        self.prog, self.timeout, self.version = prog, timeout, version
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
                    rc = p.wait(timeout=self.timeout)
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
            if rc == 0 and (res := read_json(job.dir / "results.json")) is not None:
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
    """SIGTERM (loratune finishes the step, checkpoints and exits 130), then SIGKILL after 2 minutes."""
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
        p.kill()
        p.wait()


def write_bench_json(job: Job, cmd: list[str], action: str, version: str) -> None:
    doc = {"config": job.config, "shared_by": job.shared_by, "seed": job.seed, "command": shlex.join(cmd),
           "train_command": shlex.join(command(["loratune"], job, "run")), "action": action,
           "wall_s": job.wall_s, "code": version, "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "options": job.resolved}
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
    r = job.results or {}
    v, t = (r.get("validation") or {}).get("accuracy"), (r.get("test") or {}).get("accuracy")
    both = (v + t) / 2 if v is not None and t is not None else None
    bench = read_json(job.dir / "bench.json") or {}
    return {"seed": job.seed, "status": job.status, "dir": str(job.dir), "validation_accuracy": v,
            "test_accuracy": t, "mean_accuracy": both, "best_epoch": r.get("best_epoch"),
            "epochs_run": (r.get("train") or {}).get("epochs_run"), "train_s": (r.get("train") or {}).get("seconds"),
            "wall_s": job.wall_s if job.wall_s is not None else bench.get("wall_s"), "code": bench.get("code")}


def paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± sd of the per-seed differences a − b of the mean accuracy, in points (seeds share their splits)."""
    bs = {r["seed"]: r["mean_accuracy"] for r in b if r["mean_accuracy"] is not None}
    d = [100 * (r["mean_accuracy"] - bs[r["seed"]]) for r in a if r["mean_accuracy"] is not None and r["seed"] in bs]
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
    for name in names:
        for ref in ("full", "default"):
            if ref in out:
                out[name][f"vs_{ref}_points"] = paired(out[name]["runs"], out[ref]["runs"])
    return out


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


def render(res: dict[str, Any]) -> str:
    from bench.common import table

    m, cfgs = res["machine"], res["configs"]
    extra = f"; extra flags `{res['extra']}`" if res["extra"] else ""
    head = [f"## Quality: {res['model']} on {res['data']}, seeds {','.join(map(str, res['seeds']))} "
            f"(split seed = training seed), {res['when']}", "",
            f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}; {res['jobs']} runs at a time, "
            f"1 thread each; code {res['code']}{extra}. Accuracy in %, mean ± sample sd over seeds; \"vs\": the paired "
            f"per-seed difference of the mean of validation and test accuracy, in points (mean ± sd). Total "
            f"{res['seconds'] / 60:.1f} min.", ""]
    rows = []
    for name, c in cfgs.items():
        label = name + (f" (= {c['runs_of']})" if c["runs_of"] else "")
        rows.append([label, short_options(c["options"]), f"{c['mean_accuracy']['n']}/{len(res['seeds'])}",
                     pct(c["validation_accuracy"]), pct(c["test_accuracy"]), "**" + pct(c["mean_accuracy"]) + "**",
                     points(c.get("vs_full_points")) if name != "full" else "",
                     points(c.get("vs_default_points")) if name != "default" else "",
                     f"{c['wall_s_mean']:.0f}" if c["wall_s_mean"] is not None else "—"])
    parts = head + [table(rows, ["config", "options", "seeds", "validation", "test", "mean of val & test",
                                 "vs full", "vs default", "s per run"]), ""]
    seed_rows = []
    for name, c in cfgs.items():
        for r in c["runs"]:
            f = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
            seed_rows.append([name, r["seed"], f(r["validation_accuracy"]), f(r["test_accuracy"]),
                              f(r["mean_accuracy"]), r["best_epoch"] if r["best_epoch"] is not None else "—",
                              f"{r['wall_s']:.0f}" if r["wall_s"] is not None else "—", r["status"]])
    parts += ["Per seed:", "", table(seed_rows, ["config", "seed", "validation", "test", "mean", "best epoch",
                                                 "wall s", "status"]), ""]
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
                                     f"  {k:15} {shlex.join(f) or '(no flags)'}: {d}" for k, (f, d) in CONFIGS.items()))
    ap.add_argument("--seeds", default="0,1,2", help="split seeds = training seeds (default: %(default)s)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="configurations, comma-separated (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-quality"),
                    help="folder of the run directories, OUT/<config>/seed-S (default: %(default)s)")
    ap.add_argument("--json", type=Path, help="the figures (default: bench/results/quality-<UTC time>.json)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default: %(default)s)")
    ap.add_argument("--extra", default="", help="flags appended to every training command, e.g. "
                    "\"--max-steps 3 --sample-pct 0.05\" for a smoke run")
    ap.add_argument("--fresh", action="store_true", help="run everything again (finished runs included)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--loratune", help=argparse.SUPPRESS)       # the program to run (tests: a stand-in)
    a = ap.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = [c for c in a.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown[0]!r}; known: {', '.join(CONFIGS)}")
    if not a.seeds or not a.configs or a.jobs < 1:
        ap.error("give at least one seed and one configuration, and --jobs >= 1")
    if len(set(a.seeds)) != len(a.seeds) or len(set(a.configs)) != len(a.configs):
        ap.error("--seeds and --configs: each at most once")
    return a


def make_jobs(a: argparse.Namespace) -> tuple[dict[tuple[str, int], Job], list[Job]]:
    """(config, seed) -> its job (shared where options coincide), and the distinct jobs."""
    extra = shlex.split(a.extra)
    by_options: dict[str, Job] = {}
    jobs: dict[tuple[str, int], Job] = {}
    for name in a.configs:
        for seed in a.seeds:
            flags = ["--split-seed", str(seed), "--seed", str(seed), "--threads", "1", *CONFIGS[name][0], *extra]
            raw, resolved = resolve_both(flags)
            key = json.dumps(resolved, sort_keys=True)
            if key in by_options:
                by_options[key].shared_by.append(name)
            else:
                by_options[key] = Job(name, seed, flags, raw, resolved, a.out / name / f"seed-{seed}")
            jobs[name, seed] = by_options[key]
    return jobs, list(by_options.values())


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
    if a.dry_run:                               # in the order they would run, the finished ones first
        for job in order:
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
            job.results, job.status = read_json(job.dir / "results.json"), "reused"
    shared = [f"{j.config}={'='.join(j.shared_by)}" for j in distinct if j.shared_by and j.seed == a.seeds[0]]
    log(f"{len(distinct)} runs ({len(distinct) - len(todo)} already done, "
        f"{sum(j.action == 'resume' for j in todo)} to resume), {a.jobs} at a time, 1 thread each; run dirs in {a.out}"
        + (f"; same options, run once: {', '.join(shared)}" if shared else ""))
    runner = Runner(prog, a.timeout, version)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    interrupted = False
    pool = cf.ThreadPoolExecutor(max_workers=a.jobs)
    try:
        futures = [pool.submit(runner.run, job) for job in todo]
        for n, fut in enumerate(cf.as_completed(futures), 1):
            job = fut.result()
            if job.status == "done":
                v, t = job.results["validation"]["accuracy"], (job.results.get("test") or {}).get("accuracy")
                what = f"validation {v:.4f}, test {t:.4f}" if t is not None else f"validation {v:.4f}"
            else:
                what = f"{job.status.upper()} (exit {job.returncode}; see {job.dir.parent / job.dir.name}.log)"
            also = f" (= {', '.join(job.shared_by)})" if job.shared_by else ""
            log(f"{n}/{len(todo)} {job.name}{also}: {what} in {job.wall_s or 0:.0f} s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping the runs (each writes a checkpoint; run the same command again to go on)")
        runner.stop_all()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)
    if interrupted:
        return 130

    res: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                           "code": version, "model": distinct[0].resolved.get("model"),
                           "data": distinct[0].resolved.get("data"), "seeds": a.seeds, "jobs": a.jobs,
                           "extra": a.extra, "out": str(a.out), "seconds": time.monotonic() - started,
                           "loadavg_end": os.getloadavg(),
                           "configs": summarize(a.configs, a.seeds, jobs)}
    path = a.json or Path("bench/results") / f"quality-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    print(render(res))
    log(f"figures: {path}")
    failed = [j.name for j in distinct if j.status not in ("done", "reused")]
    if failed:
        log(f"{len(failed)} runs did not finish: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
