"""``python -m bench.variants`` (the speed half of ``make bench-variants``): what each LoRA variant costs in
training time against plain LoRA, and loratune's DoRA against peft's DoRA, all in one process and one run.

Every side trains MiniLM on the built-in data with the default options (q,v r 8 α 16, batch 16, length-bucketed
batches, the precision ``auto`` picks) for ``warmup + steps`` optimizer steps; the last ``steps`` are timed.
loratune: plain LoRA, ``--variant dora``, ``--init pissa``, ``--init olora``, ``--loraplus-ratio 16``
(bench/train.py's ``ours``: loratune.train itself). peft: ``get_peft_model`` with and without ``use_dora``, trained
by a plain loop with the same batches, precision and clipping (what ``peft_tricks`` in bench/train.py does), so the
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
from typing import Any

import torch

from bench.common import machine, matmul_peak, quiet, table

OURS = {"lora": {}, "dora": {"variant": "dora"}, "pissa": {"init": "pissa"}, "olora": {"init": "olora"},
        "loraplus": {"loraplus_ratio": 16.0}}
PEFT = {"peft-lora": False, "peft-dora": True}


def peft_loop(prepared: Any, steps: int, warmup: int, dora: bool, precision: str) -> dict[str, float]:
    """peft's LoRA or DoRA (use_dora) with loratune's defaults, trained by a plain loop: the same bucketed batches,
    AdamW lr 5e-4, clipping 1.0, autocast where loratune uses it."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from loratune.runtime import autocast
    from loratune.tasks.batches import batch_order, collate
    from loratune.training.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model("minilm-l6", prepared.label_names, seed=0),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1,
                                      use_dora=dora, task_type="SEQ_CLS")).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    tr = prepared.train
    order = batch_order(tr.lengths, 16, bucket=True, shuffle=True, seed=0, epoch=0)
    real, t0 = 0, 0.0
    device = torch.device("cpu")
    for i, idx in enumerate(order[:warmup + steps]):
        if i == warmup:
            t0 = time.perf_counter()
        b = collate(tr, idx, prepared.pad_id, 1)
        with autocast(device, precision):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        F.cross_entropy(logits.float(), b["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            real += int(tr.lengths[idx].sum())
    wall = time.perf_counter() - t0
    return {"tokens_per_s": real / wall, "seconds": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps per side and round")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="turns over all sides")
    ap.add_argument("--json", type=Path, help="the figures (default: bench/results/variants-<UTC time>.json)")
    args = ap.parse_args(argv)
    quiet()
    from bench.train import ours
    from loratune.runtime import resolve_precision, set_threads
    from loratune.training.loop import prepare_data
    from loratune.training.options import TrainConfig

    threads = set_threads(None)
    precision = resolve_precision("auto", torch.device("cpu"))
    prepared = prepare_data(TrainConfig())
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    results: dict[str, list[float]] = {name: [] for name in [*OURS, *PEFT]}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as root:
        for r in range(args.rounds):
            for name, options in OURS.items():
                res = ours("minilm-l6", prepared, args.steps, args.warmup, Path(root) / name, **options)
                results[name].append(res["tokens_per_s"])
                print(f"round {r + 1} {name:10} {res['tokens_per_s']:8,.0f} tokens/s", flush=True)
            for name, dora in PEFT.items():
                res = peft_loop(prepared, args.steps, args.warmup, dora, precision)
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
