"""``python -m bench.variants`` (the speed half of ``make bench-variants``): what each LoRA variant costs in
training time against plain LoRA, and loratune's DoRA against peft's DoRA, all in one process and one run.

Every side trains MiniLM on the built-in data with the default options (q,v r 8 α 16, batch 16, length-bucketed
batches, the precision ``auto`` picks) for ``warmup + steps`` optimizer steps; the last ``steps`` are timed.
loratune: plain LoRA, ``--variant dora``, ``--init pissa``, ``--init olora``, ``--loraplus-ratio 16``
(bench/train.py's ``ours``: loratune.train itself). peft: ``get_peft_model`` with and without ``use_dora``, trained
by bench/train.py's ``peft_tricks`` plain loop with the same batches, precision and clipping, so the
ratio DoRA / LoRA is measured on each side alike. The sides run in turns, ``--rounds`` times, so that a noisy
machine hits all of them; the tables give each round and the median.

The accuracy half is ``python -m bench.quality --configs default,dora,loraplus,pissa,olora``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.common import machine, matmul_peak, quiet, table

OURS = {"lora": {}, "dora": {"variant": "dora"}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"},
        "loraplus": {"loraplus_ratio": 16.0}}
PEFT = {"peft-lora": False, "peft-dora": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per side and round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="turns over all sides")
    ap.add_argument("--json", type=Path, help="the figures (default: bench/results/variants-<UTC time>.json)")
    args = ap.parse_args(argv)
    quiet()
    from bench.train import ours, peft_tricks
    from loratune.runtime import resolve_precision, set_threads
    from loratune.training.loop import prepare_data
    from loratune.training.options import TrainConfig

    threads = set_threads(None)
    precision = resolve_precision("auto", torch.device("cpu"))
    prepared = prepare_data(TrainConfig())
    # the peak of the precision the sides train in only: bf16 matmuls without native bf16 (Zen 1-3) take minutes
    peaks = {precision: matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)}
    results: dict[str, list[float]] = {name: [] for name in [*OURS, *PEFT]}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as root:
        for r in range(args.rounds):
            for name, options in OURS.items():
                res = ours("minilm-l6", prepared, args.steps, args.warmup, Path(root) / name, **options)
                results[name].append(res["tokens_per_s"])
                print(f"round {r + 1} {name:10} {res['tokens_per_s']:8,.0f} tokens/s", flush=True)
            for name, dora in PEFT.items():
                res = peft_tricks("minilm-l6", prepared, args.steps, args.warmup, "minilm", dora=dora,
                                  precision=precision)
                results[name].append(res["tokens_per_s"])
                print(f"round {r + 1} {name:10} {res['tokens_per_s']:8,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    rows = []
    for name, values in results.items():
        base = results["peft-lora" if name.startswith("peft") else "lora"]
        ratios = [v / b for v, b in zip(values, base)]
        rows.append([name, f"{med[name]:,.0f}", " / ".join(f"{v:,.0f}" for v in values),
                     f"{statistics.median(ratios):.3f}", " / ".join(f"{x:.3f}" for x in ratios)])
    dora_cost = {"loratune": 1 / statistics.median([d / b for d, b in zip(results["dora"], results["lora"])]),
                 "peft": 1 / statistics.median([d / b for d, b in zip(results["peft-dora"], results["peft-lora"])])}
    print(table(rows, ["side", "tokens/s (median)", "per round", "÷ plain LoRA (median)", "per round"]))
    print(f"DoRA's time per step against plain LoRA: loratune ×{dora_cost['loratune']:.3f}, peft ×{dora_cost['peft']:.3f}; "
          f"loratune's DoRA {med['dora'] / med['peft-dora']:.2f}× peft's DoRA")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = args.json or Path("bench/results") / f"variants-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {**machine(), "threads": threads, "precision": precision,
                                           "matmul_peak_gflops": peaks},
                               "commit": commit, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                               "tokens_per_s": results, "median": med, "dora_time_ratio": dora_cost,
                               "wall_s": time.time() - t_start}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
