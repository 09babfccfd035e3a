"""``python -m bench.llm`` (``make bench-llm``): the built-in LLM against the built-in classifier on the same
sentences, over several split seeds: validation and test accuracy, trainable parameters and wall time.

For each row and seed S it runs, as bench.quality does (its machinery: resumable, finished runs reused, ``--jobs``
one-thread runs at a time, ``--dry-run``, ``--extra``)::

    loratune train --split-seed S --seed S --threads 1 <row flags> --out OUT/<row>/seed-S --overwrite

    minilm-lora        (no flags)                                  MiniLM-L6 + LoRA classifier, the default
    smollm2-cls        --model smollm2-135m --epochs 1             SmolLM2-135M + LoRA, a classifier head
    smollm2-instruct   --data rotten-tomatoes-4k-instruct --epochs 1
                                                                   SmolLM2-135M + LoRA instruction-tuned
    smollm2-zero-shot  no run of its own: the base model's metrics that each smollm2-instruct run evaluates
                       before its first step (results.json's ``baseline``)

``minilm-lora`` is bench.quality's ``default``: with the same ``--out`` (the default, runs/bench-quality) the runs
``make bench-quality`` left are reused, not trained again. The instruct data holds the classification data's
sentences, cut by the same split (tests/test_bench_llm.py checks it), so every row is scored on the same 400
validation and 400 test sentences per seed; the instruct rows' accuracy is choice scoring (the answer, "negative"
or "positive", with the higher log-likelihood), their exact match the greedy answer equal to the label.

Time (one thread a run, two runs side by side, bf16, the 2-core Xeon, 2026-12-01): smollm2-instruct ≈ 26 min a
run (its 3,200-conversation epoch ≈ 19 min: 222-240 tokens/s, ≈ 0.35 s a conversation of ≈ 76 tokens; four
evaluations of 400 conversations with their greedy answers ≈ 1.5 min each: the base model's validation and test,
then the trained adapter's), smollm2-cls ≈ 9 min with 1 epoch, minilm-lora ≈ 2.7 min (or reused). Loratune's own
default for the classifier rows is 3 epochs; that for smollm2-cls would take the 3 seeds to ≈ 80 min, so it
trains 1 epoch (``--cls-epochs``): all rows, 3 seeds, 2 at a time: ≈ 58 min (≈ 53 with bench-quality's MiniLM
runs reused). An earlier measurement put the instruct epoch at ≈ 0.5 s a conversation and an evaluation at 2-4
min (then ≈ 80 min); ``--instruct-sample-pct 0.5`` cuts ≈ 10 min a run. ``--dry-run`` prints the estimate for
the options given; the table says what each row trained.

    python -m bench.llm                                          # the four rows × seeds 0,1,2
    python -m bench.llm --rows smollm2-instruct --seeds 0        # one row, one split
    python -m bench.llm --instruct-sample-pct 0.5 --cls-epochs 2 # another time budget
    python -m bench.llm --dry-run                                # the commands and the time estimate
    python -m bench.llm --extra "--max-steps 2 --sample-pct 0.05" --out /tmp/l   # a smoke run (≈ 8 min: the
                                                 # instruct run still evaluates 4 × 400 conversations; add
                                                 # --validation-file/--test-file of a few rows for ≈ 1.5 min)

The table (markdown, printed) and the figures (bench/results/llm-<UTC time>.json) give per row the mean ± sample
sd over seeds of validation accuracy, test accuracy, their mean (the 800 sentences), exact match (the instruct
rows), trainable parameters, seconds per run and what it trained; then the two targets in words: instruct minus
zero-shot on the 800 sentences (≥ 15 points), and instruct against every MiniLM row (minilm-lora here, and
bench.quality's ``full`` from the newest bench/results/quality-*.json that has it, labelled with that file).
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bench import quality as q
from bench.quality import Job, mean_sd, pct, points, read_json

INSTRUCT_DATA = "rotten-tomatoes-4k-instruct"
ROWS: dict[str, tuple[list[str], str]] = {
    "minilm-lora": ([], "MiniLM-L6 + LoRA classifier: the default (bench.quality's `default`, the same runs)"),
    "smollm2-cls": (["--model", "smollm2-135m"], "SmolLM2-135M-Instruct + LoRA, a classifier head on its last token"),
    "smollm2-instruct": (["--data", INSTRUCT_DATA], "SmolLM2-135M-Instruct + LoRA instruction-tuned (causal LM): "
                         "choice scoring of the answer"),
}
"""name -> (flags of ``loratune train`` before the time budget's, description)."""
ZERO_SHOT, INSTRUCT, CLS = "smollm2-zero-shot", "smollm2-instruct", "smollm2-cls"
ZERO_SHOT_NOTE = "SmolLM2-135M-Instruct, the base model, no training: choice scoring (the instruct runs' `baseline`)"
MINILM_FILE_ROWS = ("full",)
"""bench.quality's MiniLM rows the instruct row is also held against, from the newest quality-*.json holding them."""
TARGET_POINTS = 15.0
TRAIN_ROWS = 3200           # the built-in data's training split, for the time estimate

SECONDS: dict[str, dict[str, float]] = {
    "minilm": {"load": 15, "epoch": 45, "eval": 3},
    "cls": {"load": 30, "epoch": 450, "eval": 20},
    "causal": {"load": 30, "epoch": 1150, "eval": 100},
}
"""Seconds of one one-thread run beside another (bf16, the 2-core Xeon, 2026-12-01), by kind: starting up, a
3,200-row epoch, one evaluation of 400 rows. minilm: bench-quality's default runs (134-170 s for 3 epochs); cls:
a SmolLM2 classifier smoke run (222 tokens/s, 7.8 sentences/s alone); causal: 24 steps alone at 222 tokens/s (5.5 s
a step of 16 conversations), the causal-LM search's trials of that day side by side at 240 tokens/s, an
evaluation with its greedy answers there ≈ 90 s."""


# --- the runs -----------------------------------------------------------------------------------

def row_flags(a: argparse.Namespace) -> dict[str, tuple[list[str], str]]:
    """Each row's flags with its time budget (the LLM rows' epochs and training sample)."""
    budget = {CLS: (a.cls_epochs, a.cls_sample_pct), INSTRUCT: (a.instruct_epochs, a.instruct_sample_pct)}
    out = {}
    for name, (flags, what) in ROWS.items():
        if name in budget:
            epochs, sample = budget[name]
            flags = [*flags, "--epochs", str(epochs), *(["--sample-pct", f"{sample:g}"] if sample != 1 else [])]
        out[name] = (flags, what)
    return out


def kind(options: dict[str, Any]) -> str:
    if options.get("task") == "causal-lm":
        return "causal"
    return "minilm" if options.get("model") == "minilm-l6" else "cls"


def estimate(job: Job) -> float:
    """Seconds the job should take here (:data:`SECONDS`; the built-in data's size): 0 when it is done."""
    if job.action == "done":
        return 0.0
    o, s = job.resolved, SECONDS[kind(job.resolved)]
    per_epoch = max(1, math.ceil(max(1, round(o["sample_pct"] * TRAIN_ROWS)) / o["batch_size"]))
    steps = o["epochs"] * per_epoch if o.get("max_steps") is None else min(o["max_steps"], o["epochs"] * per_epoch)
    evals = math.ceil(steps / per_epoch) * o.get("evals_per_epoch", 1) + 1 + (2 if kind(o) == "causal" else 0)
    return s["load"] + steps * o["batch_size"] / TRAIN_ROWS * s["epoch"] + evals * s["eval"]    # rows seen


def makespan(jobs: Sequence[Job], width: int) -> float:
    """Seconds until the last of ``jobs`` ends, run in this order ``width`` at a time (each starts when one ends)."""
    free = [0.0] * max(1, width)
    for job in jobs:
        heapq.heappush(free, heapq.heappop(free) + estimate(job))
    return max(free)


# --- the numbers --------------------------------------------------------------------------------

def _metric(doc: Any, split: str, key: str) -> float | None:
    v = (doc.get(split) or {}).get(key) if isinstance(doc, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _both(v: float | None, t: float | None) -> float | None:
    """The 800 sentences' figure: validation and test have 400 each, so their mean."""
    return (v + t) / 2 if v is not None and t is not None else None


def seed_row(job: Job, zero_shot: bool = False) -> dict[str, Any]:
    """One seed of a row from its run: bench.quality's numbers plus exact match and trainable parameters; with
    ``zero_shot``, the base model's figures from the instruct run's ``baseline`` (no training, no time of its own)."""
    r = q.per_seed(job)
    doc = job.results or read_json(job.dir / "results.json") or {}
    if zero_shot:
        doc = doc.get("baseline") or {}
        v, t = _metric(doc, "validation", "accuracy"), _metric(doc, "test", "accuracy")
        r.update(validation_accuracy=v, test_accuracy=t, mean_accuracy=_both(v, t), best_epoch=None,
                 epochs_run=0, train_s=None, wall_s=None)
    ev, et = _metric(doc, "validation", "exact_match"), _metric(doc, "test", "exact_match")
    r.update(validation_exact_match=ev, test_exact_match=et, exact_match=_both(ev, et),
             trainable_params=0 if zero_shot else (doc.get("train") or {}).get("trainable_params"))
    return r


def training_note(o: dict[str, Any], default_epochs: Any) -> str:
    """What a row trained, in words (its budget beside loratune's own default where they differ)."""
    s = f"{o['epochs']} epoch{'s' if o['epochs'] != 1 else ''}"
    if o["epochs"] != default_epochs:
        s += f" (default {default_epochs})"
    if o["sample_pct"] < 1:
        s += f", {o['sample_pct']:.0%} of the training split"
    if o.get("max_steps") is not None:
        s += f", ≤ {o['max_steps']} steps"
    return s


def summarize(rows: list[str], seeds: list[int], jobs: dict[tuple[str, int], Job],
              flags: dict[str, tuple[list[str], str]]) -> dict[str, Any]:
    """name -> the row's figures; the zero-shot row (after the instruct row's runs) when smollm2-instruct ran."""
    out: dict[str, Any] = {}
    names = [(n, n) for n in rows] + ([(ZERO_SHOT, INSTRUCT)] if INSTRUCT in rows else [])
    for name, source in names:
        runs = [seed_row(jobs[source, s], zero_shot=name == ZERO_SHOT)
                | {"status": jobs[source, s].status if jobs[source, s].config == source else "shared"} for s in seeds]
        ok = [r for r in runs if r["mean_accuracy"] is not None]
        walls = [r["wall_s"] for r in ok if r["wall_s"] is not None]
        params = sorted({r["trainable_params"] for r in ok if r["trainable_params"] is not None})
        first = jobs[source, seeds[0]]
        default_epochs = q.resolve(ROWS[source][0])["epochs"]
        out[name] = {"flags": [] if name == ZERO_SHOT else flags[name][0],
                     "description": ZERO_SHOT_NOTE if name == ZERO_SHOT else flags[name][1],
                     "options": {k: first.resolved.get(k) for k in q.SHOWN_OPTIONS + ("model", "data", "task")},
                     "training": "none (the base model)" if name == ZERO_SHOT
                     else training_note(first.resolved, default_epochs),
                     "runs_of": first.config if first.config != source else None, "runs": runs,
                     "validation_accuracy": mean_sd([r["validation_accuracy"] for r in ok]),
                     "test_accuracy": mean_sd([r["test_accuracy"] for r in ok]),
                     "mean_accuracy": mean_sd([r["mean_accuracy"] for r in ok]),
                     "exact_match": mean_sd([r["exact_match"] for r in ok if r["exact_match"] is not None]),
                     "trainable_params": params[0] if len(params) == 1 else params or None,
                     "wall_s_mean": sum(walls) / len(walls) if walls else None}
    return out


def quality_rows(path: Path, rows: Sequence[str] = MINILM_FILE_ROWS) -> dict[str, Any] | None:
    """bench.quality's figures in ``path`` for ``rows``, with the file's path, time and machine (None: the file
    lacks a figure for one of them)."""
    doc = read_json(path) or {}
    cfgs = doc.get("configs") or {}
    if not all(((cfgs.get(r) or {}).get("mean_accuracy") or {}).get("mean") is not None for r in rows):
        return None
    return {"file": str(path), "when": doc.get("when"), "cpu": (doc.get("machine") or {}).get("cpu"),
            "seeds": doc.get("seeds"), "rows": {r: cfgs[r] for r in rows}}


def newest_quality(folder: Path, rows: Sequence[str] = MINILM_FILE_ROWS) -> dict[str, Any] | None:
    """:func:`quality_rows` of the newest ``quality-*.json`` in ``folder`` that has each of ``rows``."""
    for path in sorted(folder.glob("quality-*.json"), reverse=True):       # the names sort by their UTC time
        if (found := quality_rows(path, rows)) is not None:
            return found
    return None


def targets(out: dict[str, Any], other: dict[str, Any] | None) -> dict[str, Any]:
    """The [llm-bench] targets on the 800 sentences: instruct minus zero-shot (≥ 15 points, per split and its
    mean) and instruct against each MiniLM row (paired per split where the seeds match), each with a sentence."""
    res: dict[str, Any] = {}
    if INSTRUCT not in out:
        return res
    inst = out[INSTRUCT]
    if ZERO_SHOT in out:
        gain = q.paired(inst["runs"], out[ZERO_SHOT]["runs"])
        zs = {r["seed"]: r["mean_accuracy"] for r in out[ZERO_SHOT]["runs"]}
        per = {r["seed"]: 100 * (r["mean_accuracy"] - zs[r["seed"]]) for r in inst["runs"]
               if r["mean_accuracy"] is not None and zs.get(r["seed"]) is not None}
        met = gain["mean"] is not None and gain["mean"] >= TARGET_POINTS
        each = ", ".join(f"seed {s} {d:+.2f}" for s, d in per.items())
        res["instruct_vs_zero_shot"] = {
            "points": gain, "per_seed": per, "met": met,
            "sentence": "no split with both figures" if gain["mean"] is None else
            f"instruct − zero-shot on validation + test (800 sentences): {points(gain)} points over {gain['n']} "
            f"split{'s' if gain['n'] != 1 else ''} ({each}): target ≥ {TARGET_POINTS:g} "
            f"{'met' if met else 'missed'} ({sum(d >= TARGET_POINTS for d in per.values())} of {len(per)} splits "
            f"reach it)"}
    against = [(name, f"`{name}` (this run)", out[name]) for name in out if name.startswith("minilm")]
    if other:
        against += [(name, f"`{name}` from {other['file']} ({other['when']}, {other['cpu']})", c)
                    for name, c in other["rows"].items()]
    vs = {}
    for name, label, c in against:
        d = q.paired(inst["runs"], c.get("runs") or [])
        m = inst["mean_accuracy"]["mean"]
        ref = c["mean_accuracy"]["mean"]
        diff = 100 * (m - ref) if m is not None and ref is not None else None
        beats = diff is not None and diff > 0
        vs[name] = {"label": label, "points_of_means": diff, "paired_points": d, "beats": beats,
                    "sentence": f"instruct vs {label}: " + ("—" if diff is None else
                                f"{100 * m:.2f} vs {100 * ref:.2f} % ({diff:+.2f} points; paired over "
                                f"{d['n']} shared split{'s' if d['n'] != 1 else ''}: {points(d)}): "
                                + ("beats it" if beats else "does not beat it"))}
    if vs:
        res["instruct_vs_minilm"] = {"rows": vs, "beats_all": all(v["beats"] for v in vs.values())}
    return res


# --- the table ----------------------------------------------------------------------------------

def render(res: dict[str, Any]) -> str:
    from bench.common import table

    m, rows = res["machine"], res["rows"]
    extra = f"; extra flags `{res['extra']}`" if res["extra"] else ""
    head = [f"## The built-in LLM vs the built-in classifier, seeds {','.join(map(str, res['seeds']))} (split seed = "
            f"training seed), {res['when']}", "",
            f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, torch {m.get('torch', '?')}; {res['jobs']} runs at a "
            f"time, 1 thread each; code {res['code']}{extra}. Every row on the same 400 validation and 400 test sentences "
            f"per seed. Accuracy in %, mean ± sample sd over seeds (the instruct rows: choice scoring); \"val+test\": "
            f"their mean, the 800 sentences; exact match: the greedy answer equal to the label, on the 800. "
            f"{ZERO_SHOT}: no run of its own, the base model as each {INSTRUCT} run evaluates it before training. "
            f"Total {res['seconds'] / 60:.1f} min (estimated {res['estimate_s'] / 60:.0f}).", ""]
    body = []
    for name, c in rows.items():
        em = pct(c["exact_match"])
        params = c["trainable_params"]
        body.append([name + (f" (= {c['runs_of']})" if c["runs_of"] else ""), c["description"],
                     f"{c['mean_accuracy']['n']}/{len(res['seeds'])}", pct(c["validation_accuracy"]),
                     pct(c["test_accuracy"]), "**" + pct(c["mean_accuracy"]) + "**", em,
                     f"{params:,}" if isinstance(params, int) else "—" if params is None else str(params),
                     "—" if name == ZERO_SHOT else "—" if c["wall_s_mean"] is None else f"{c['wall_s_mean']:.0f}",
                     c["training"]])
    parts = head + [table(body, ["row", "what", "seeds", "validation", "test", "val+test (800)", "exact match",
                                 "trainable params", "s per run", "training"]), ""]
    t = res["targets"]
    if "instruct_vs_zero_shot" in t:
        parts.append("- " + t["instruct_vs_zero_shot"]["sentence"] + ".")
    if "instruct_vs_minilm" in t:
        parts += ["- " + v["sentence"] + "." for v in t["instruct_vs_minilm"]["rows"].values()]
        parts.append(f"- instruct beats every MiniLM row: {'yes' if t['instruct_vs_minilm']['beats_all'] else 'no'}.")
    seed_rows = []
    f = lambda x: "—" if x is None else f"{100 * x:.2f}"  # noqa: E731
    for name, c in rows.items():
        for r in c["runs"]:
            seed_rows.append([name, r["seed"], f(r["validation_accuracy"]), f(r["test_accuracy"]),
                              f(r["mean_accuracy"]), f(r["exact_match"]),
                              "—" if r["wall_s"] is None else f"{r['wall_s']:.0f}", r["status"]])
    parts += ["", "Per seed:", "", table(seed_rows, ["row", "seed", "validation", "test", "val+test", "exact match",
                                                     "wall s", "status"]), ""]
    codes = {r["code"] for c in rows.values() for r in c["runs"] if r.get("code")}
    if len(codes) > 1:
        parts.append(f"Note: the runs come from different code versions: {', '.join(sorted(codes))}.")
    return "\n".join(parts)


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(prog="python -m bench.llm", description=doc.split("\n\n")[0] + "\n\n"
                                 + doc[doc.index("Time ("):doc.index("    python -m bench.llm  ")].strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="rows:\n" + "\n".join(f"  {k:18} {shlex.join(f) or '(no flags)'}: {d}"
                                                              for k, (f, d) in ROWS.items())
                                 + f"\n  {ZERO_SHOT:18} (from {INSTRUCT}'s runs): {ZERO_SHOT_NOTE}")
    ap.add_argument("--seeds", default="0,1,2", help="split seeds = training seeds (default: %(default)s, as "
                    "bench.quality)")
    ap.add_argument("--rows", default=",".join(ROWS), help="rows to run, comma-separated (default: %(default)s; "
                    f"{ZERO_SHOT} comes with {INSTRUCT})")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-quality"), help="folder of the run directories, "
                    "OUT/<row>/seed-S; bench-quality's by default, so minilm-lora reuses its `default` runs "
                    "(default: %(default)s)")
    ap.add_argument("--json", type=Path, help="the figures (default: bench/results/llm-<UTC time>.json)")
    ap.add_argument("--quality-json", type=Path, help="bench.quality's figures with the MiniLM `full` row "
                    "(default: the newest bench/results/quality-*.json that has it)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds one run may take (default: %(default)s)")
    ap.add_argument("--cls-epochs", type=int, default=1, help=f"{CLS}: epochs (default: %(default)s; "
                    "loratune's is 3, ≈ 24 min a run here)")
    ap.add_argument("--cls-sample-pct", type=float, default=1.0, help=f"{CLS}: fraction of the training split "
                    "(default: %(default)s)")
    ap.add_argument("--instruct-epochs", type=int, default=1, help=f"{INSTRUCT}: epochs (default: %(default)s, "
                    "loratune's own)")
    ap.add_argument("--instruct-sample-pct", type=float, default=1.0, help=f"{INSTRUCT}: fraction of the training "
                    "split (default: %(default)s)")
    ap.add_argument("--extra", default="", help="flags appended to every row's command, e.g. \"--max-steps 2 "
                    "--sample-pct 0.05\" for a smoke run")
    ap.add_argument("--fresh", action="store_true", help="run everything again (finished runs included)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and the time estimate only")
    ap.add_argument("--loratune", help=argparse.SUPPRESS)       # the program to run (tests: a stand-in)
    a = ap.parse_args(argv)
    return q.check_lists(ap, a, a.rows, "--rows", ROWS, "row")


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    flags = row_flags(a)
    try:
        jobs, distinct = q.make_jobs(a, flags)
    except ValueError as e:
        print(f"bench.llm: {e}", file=sys.stderr)
        return 2
    prog = q.loratune_cmd(a.loratune)
    for job in distinct:
        job.action = "run" if a.fresh else q.plan(job, a.out)
    todo = sorted((j for j in distinct if j.action != "done"), key=estimate, reverse=True)   # longest first
    phases = q.schedule(todo, a.jobs)
    expected = makespan(todo, a.jobs)
    if a.dry_run:
        for job in [j for j in distinct if j.action == "done"] + todo:
            note = f"   # also {', '.join(job.shared_by)}" if job.shared_by else ""
            what = f"# done ({job.config}): " if job.action == "done" else ""
            print(f"{what}{shlex.join(q.command(prog, job, job.action))}{note}")
        if INSTRUCT in a.configs:
            print(f"# {ZERO_SHOT}: read from the {INSTRUCT} runs' results.json (`baseline`), no run of its own")
        print(f"# expected wall time ≈ {expected / 60:.0f} min ({len(todo)} runs, {a.jobs} at a time)")
        return 0

    from bench.common import machine

    version = q.code_version()
    started = time.monotonic()
    log = lambda s: print(f"[{time.monotonic() - started:6.0f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    for job in distinct:
        if job.action == "done":
            job.results, job.status = read_json(job.dir / job.result_file), "reused"
    log(f"{len(distinct)} runs ({len(distinct) - len(todo)} already done, "
        f"{sum(j.action == 'resume' for j in todo)} to resume), {a.jobs} at a time, 1 thread each; expected "
        f"≈ {expected / 60:.0f} min; run dirs in {a.out}")
    if q.run_all(phases, q.Runner(prog, a.timeout, version), log):
        return 130

    rows = summarize(a.configs, a.seeds, jobs, flags)
    other = quality_rows(a.quality_json) if a.quality_json else newest_quality(Path("bench/results"))
    res: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
                           "code": version, "seeds": a.seeds, "jobs": a.jobs, "extra": a.extra,
                           "budget": {k: v for k, v in vars(a).items() if k.startswith(("cls_", "instruct_"))},
                           "out": str(a.out), "seconds": time.monotonic() - started, "estimate_s": expected,
                           "loadavg_end": os.getloadavg(), "rows": rows, "minilm_file": other,
                           "targets": targets(rows, other)}
    return q.finish(res, a.json, "llm", render, distinct, log)


if __name__ == "__main__":
    sys.exit(main())
