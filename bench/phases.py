"""Where a search trial's time goes, and whether compiling pays for it: ``python -m bench.phases``.

One epoch of the untuned default as a search trial trains it (built-in model and data, 4 validation passes an
epoch as at 4 rungs an epoch, no test split, 1 thread), each in a fresh process, eager and with ``--compile``
interleaved ``--rounds`` times. Each phase is timed by wrapping the trainer's function for it: the optimizer
steps (each one: the first 5 hold a compile, the rest is the steady speed), the validation passes, the adapter
file, the checkpoints; ``other`` is the rest of ``train()`` (the data, the model, logs: a search's trial gets the
data prepared and its worker has the imports done). A compile is paid once per process, so the first-5-steps
figure is what each new training process pays.

    python -m bench.phases                      # split seed 1, 2 rounds (about 5 minutes on a Zen 4)
    python -m bench.phases --no-compile         # the eager phases only
    python -m bench.phases --threads 2 --split-seed 0

Writes its figures as JSON (``--out``, default ``bench/results/phases-<YYYY-MM-DD-HHMM>.json``: the machine, lscpu's
family and model, the commit, each run) and prints a table. Inductor's kernel cache is its own (under /tmp): the
first compiled run after a new torch or a wiped cache compiles cold (about a minute), later ones warm.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FIRST = 5                                   # steps counted as the compile's (the first compiles, then shapes settle)
PHASES = {"steps": "optimizer_step", "validation": "_evaluate_validation", "adapter": "save_artifact",
          "checkpoint": "checkpoint"}
"""Phase name -> the function of ``loratune.training.loop`` whose calls it times."""


@contextlib.contextmanager
def _timed(module: Any, names: dict[str, str]) -> Iterator[dict[str, list[float]]]:
    """Replace ``module.<function>`` for each phase by a wrapper that records each call's seconds."""
    calls: dict[str, list[float]] = {phase: [] for phase in names}
    saved = {phase: getattr(module, fn) for phase, fn in names.items()}

    def wrap(phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                calls[phase].append(time.perf_counter() - t)
        return timed

    for phase, fn in saved.items():
        setattr(module, names[phase], wrap(phase, fn))
    try:
        yield calls
    finally:
        for phase, fn in saved.items():
            setattr(module, names[phase], fn)


def epoch(*, compile: bool, split_seed: int, threads: int, sample_pct: float = 1.0) -> dict[str, Any]:
    """One epoch of the untuned default as a search trial trains it, in this process; its phases' seconds."""
    from loratune.training import loop

    with tempfile.TemporaryDirectory(prefix="bench-phases-") as out, _timed(loop, PHASES) as calls:
        t0 = time.perf_counter()
        loop.train(None, out=Path(out) / "run", epochs=1, evals_per_epoch=4, threads=threads, split_seed=split_seed,
                   sample_pct=sample_pct, compile=compile, evaluate_test=False)
        wall = time.perf_counter() - t0
    steps = calls["steps"]
    rest = steps[FIRST:]
    row = {"compile": compile, "wall_s": wall, "steps": len(steps), "steps_s": sum(steps),
           "first_steps_s": sum(steps[:FIRST]), "later_steps_s": sum(rest),
           "later_step_median_ms": 1000 * statistics.median(rest) if rest else None,
           "validation_passes": len(calls["validation"])}
    row.update({f"{phase}_s": sum(calls[phase]) for phase in ("validation", "adapter", "checkpoint")})
    row["other_s"] = wall - sum(sum(c) for c in calls.values())
    return row


def _run_child(args: list[str]) -> dict[str, Any]:
    """``epoch()`` in a fresh process (its own compile, its own allocator): the JSON line it prints."""
    paths = [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}     # no empty entry: that would add the cwd
    proc = subprocess.run([sys.executable, "-m", "bench.phases", "--child", *args], capture_output=True, text=True,
                          env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench.phases child {' '.join(args)} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def compiler_missing() -> str | None:
    """Why ``--compile`` cannot run here (no C++ compiler), or None."""
    import torch

    from loratune.errors import InputError
    from loratune.training.compiled import check_compiler

    try:
        check_compiler(torch.device("cpu"))
    except InputError as e:
        return str(e)
    return None


HEADER = ["run", "later steps s", "median step ms", "first 5 steps s", "validation s (passes)", "adapter + ckpt s",
          "other s", "wall s"]


def rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    out = []
    for i, r in enumerate(runs):
        out.append([f"{i + 1}: {'compiled' if r['compile'] else 'eager'}", round(r["later_steps_s"], 2),
                    round(r["later_step_median_ms"] or 0, 1), round(r["first_steps_s"], 2),
                    f"{r['validation_s']:.2f} ({r['validation_passes']})", round(r["adapter_s"] + r["checkpoint_s"], 2),
                    round(r["other_s"], 2), round(r["wall_s"], 2)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__.split("\n")[0])
    p.add_argument("--split-seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="a search trial's CPUs (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="eager, compiled pairs, interleaved (default 2)")
    p.add_argument("--no-compile", action="store_true", help="the eager runs only")
    p.add_argument("--sample-pct", type=float, default=1.0, help="a share of the data (tests)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/phases-<YYYY-MM-DD-HHMM>.json)")
    p.add_argument("--child", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    opts = ["--split-seed", str(a.split_seed), "--threads", str(a.threads), "--sample-pct", str(a.sample_pct)]
    if a.child:
        print(json.dumps(epoch(compile=a.child == "compiled", split_seed=a.split_seed, threads=a.threads,
                               sample_pct=a.sample_pct)))
        return 0
    from bench.common import machine, table
    from bench.serve import _git, _lscpu

    missing = None if a.no_compile else compiler_missing()
    kinds = ["eager"] if a.no_compile or missing else ["eager", "compiled"]
    if missing:
        print(f"--compile not measured: {missing}", file=sys.stderr)
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), list(os.getloadavg())
    runs = []
    for _ in range(a.rounds):
        for kind in kinds:
            runs.append(_run_child([kind, *opts]))
            print(f"{kind}: {runs[-1]['later_steps_s']:.2f} s for steps {FIRST + 1}-{runs[-1]['steps']}, "
                  f"first {FIRST} {runs[-1]['first_steps_s']:.2f} s", flush=True)
    stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / f"phases-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"machine": {**machine(), "lscpu": _lscpu()}, "git": _git(), "started": started, "split_seed": a.split_seed,
           "threads": a.threads, "sample_pct": a.sample_pct, "compile_not_measured": missing, "runs": runs,
           "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())}
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(rows(runs), HEADER))
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
