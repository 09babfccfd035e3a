"""``python -m bench`` (``make bench``): every benchmark in one run, one table with both sides and the ratios.

    python -m bench                 # the three benchmarks: training, inference, search (about 36 minutes)
    python -m bench --no-search     # training and inference only (about 7 minutes)
    python -m bench --levers-only   # each training lever switched off alone, and the micro-benchmarks (about 11 minutes)
    python -m bench --levers        # all of it (about 47 minutes)
    python -m bench --quick         # few steps, no search, no levers: a smoke run (about 3 minutes)

Results go to stdout (markdown) and to ``--out`` (default bench/results/latest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import infer, levers, search
from bench import train as tb
from bench.common import machine, matmul_peak, quiet, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="loratune benchmarks against the seed pipeline")
    ap.add_argument("--quick", action="store_true", help="few steps; no search, no levers")
    ap.add_argument("--no-search", action="store_true", help="skip the search benchmark (~30 min)")
    ap.add_argument("--levers", action="store_true", help="also each lever switched off alone (~11 min more)")
    ap.add_argument("--levers-only", action="store_true", help="only the levers and micro-benchmarks")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 100, quick 15)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, quick 2)")
    ap.add_argument("--out", default="bench/results/latest.json")
    a = ap.parse_args(argv)
    quiet()
    from loratune.runtime import set_threads

    threads = set_threads(None)
    steps = a.steps or (15 if a.quick else 100)
    warmup = a.warmup or (2 if a.quick else 5)
    started = time.monotonic()
    res: dict = {"machine": machine(), "threads": threads, "steps": steps, "warmup": warmup, "loadavg_start": os.getloadavg(),
                 "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    res["peak_gflops"] = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    log = lambda s: print(f"[{time.monotonic() - started:6.0f}s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"peak {res['peak_gflops']}")
    with tempfile.TemporaryDirectory(prefix="lt-bench-") as tmp:
        root = Path(tmp)
        if not a.levers_only:
            res["train"] = tb.run(root, steps=steps, warmup=warmup, peaks=res["peak_gflops"],
                                  models=("distilbert", "minilm"))
            log("training done")
        from loratune.training.loop import prepare_data
        from loratune.training.options import TrainConfig

        dpath = tb.distilbert_folder(root)
        dprep = prepare_data(TrainConfig(model=dpath))
        res["padding"] = tb.padding_stats(dprep)
        if not a.quick and (a.levers or a.levers_only):
            res["levers"] = levers.variants(root, dpath, dprep, max(30, steps // 2), warmup)
            log("levers done")
            res["packing"] = {"minilm": levers.packing("minilm-l6", dprep.label_names),
                              "distilbert": levers.packing(dpath, dprep.label_names)}
            res["python_costs"] = levers.python_costs(dprep)
            res["grads_below_first_layer"] = levers.grads_below_first_layer(dpath, dprep.label_names)
            log("micro-benchmarks done")
        if not a.levers_only:
            res["inference"] = infer.run(root / "ours-minilm" / "adapter", infer.texts_of_builtin(1 if a.quick else 2),
                                         repeats=2 if a.quick else 7)
            log("inference done")
    if not a.quick and not a.no_search and not a.levers_only:
        res["search"] = {side: search.measure(side, Path(tempfile.mkdtemp(prefix="lt-bs-"))) for side in ("reference", "ours")}
        log("search done")
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):    # shared machine: best of start and end
        res["peak_gflops"][name] = max(res["peak_gflops"][name], matmul_peak(dt))
    res["loadavg_end"] = os.getloadavg()
    res["seconds"] = time.monotonic() - started
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(render(res))
    return 0


def render(res: dict) -> str:
    m, pk = res["machine"], res["peak_gflops"]
    parts = [f"## loratune benchmarks, {res['when']}",
             f"{m['cpu']}, {m['cpus']} CPUs ({res['threads']} torch threads), {m['mem_mib']} MiB, torch {m['torch']}, "
             f"transformers {m['transformers']}; 2048² matmul peak: fp32 {pk['fp32']:.0f} GFLOP/s, "
             f"bf16 {pk['bf16']:.0f} GFLOP/s (best of start and end); {res['steps']} timed steps after {res['warmup']} "
             f"warm-up; load average at start {res['loadavg_start'][0]:.1f}, at end {res['loadavg_end'][0]:.1f}.", ""]
    rows = []
    for r in res.get("train", []):
        if r["side"].startswith("ratio"):
            label = "**ratio ours/seed**" if r["side"] == "ratio" else "ratio ours/(peft + bf16 + buckets)"
            rows.append([r["model"], label, f"{r['tokens_per_s']:.2f}x", f"{r['samples_per_s']:.2f}x",
                         "", "", "", "", ""])
        else:
            rows.append([r["model"], r["side"], r["tokens_per_s"], r["samples_per_s"], r["gflops"],
                         f"{r['pct_bf16_peak']:.0f}%", f"{r['pct_fp32_peak']:.0f}%", r["gflops_executed"],
                         f"{r['pct_bf16_peak_executed']:.0f}%"])
    parts += [] if not rows else ["### 1. Training throughput (batch 16)", "",
              table(rows, ["model", "side", "real tokens/s", "samples/s", "GFLOP/s", "% bf16 peak", "% fp32 peak",
                           "executed GFLOP/s", "executed % bf16 peak"]), "",
              "GFLOP/s: 4 × non-embedding weights × real tokens/s (the issue's measure). Executed: the same less the "
              "last-layer work loratune skips (all tokens but the first), i.e. what the CPU really computed.", ""]
    if "padding" in res:
        p = res["padding"]
        parts.append(f"Padding share of padded slots (distilbert data, batch 16): random {100 * p['random']:.0f}%, "
                     f"bucketed {100 * p['bucketed']:.1f}%; mean length {p['mean_len']:.1f} tokens.\n")
    if "search" in res:
        parts += ["### 2. Search (8 samples, ASHA grace 1 / reduction 2, ≤ 3 epochs, val_loss, MiniLM)", "",
                  table(search.rows(res["search"]), search.HEADER), ""]
    if "inference" in res:
        parts += ["### 3. Inference (`loratune predict`, MiniLM, texts/s)", "",
                  table(infer.rows(res["inference"]), ["model", "texts/s", "vs base", "time"]), ""]
    if "levers" in res:
        base = res["levers"][0][1]
        parts += ["### Levers (distilbert-size, loratune train, one change at a time)", "",
                  table([[n, t, f"{t / base:.2f}x"] for n, t in res["levers"]], ["variant", "real tokens/s", "vs default"]),
                  ""]
        pk_rows = [[mdl, k, v] for mdl, d in res["packing"].items() for k, v in d.items()]
        parts += ["Packing two trials into one pass (fwd+bwd, bf16, length 32, ms):", "",
                  table(pk_rows, ["model", "variant", "ms"]), "",
                  f"Host-side costs per step: {json.dumps({k: round(v, 1) for k, v in res['python_costs'].items()})}",
                  f"Autograd below the first adapted layer: {json.dumps(res['grads_below_first_layer'])}", ""]
    parts.append(f"Total benchmark time: {res['seconds']:.0f} s")
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
