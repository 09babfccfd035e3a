"""Causal-LM training speed and memory on the built-in LLM: ``python -m bench.causal [--steps N]``.

Trains LoRA with the default causal-LM options (SmolLM2-135M-Instruct, q,v r 8, batch 16) on the built-in
instruct data for a few steps, the longest batches first (so the peak memory is the run's worst case), and
prints real tokens/s, the share of this CPU's matmul peak (counting 4 FLOPs per non-embedding weight per
token: forward, and the backward pass's input gradients, as the causal-LM issue counts them) and the peak
RSS of the process, with each speed lever on, then with the lean MLP off (its memory effect), then with every
lever and ``--compile`` (its compile is in the warm-up step, which is not timed). The
[llm-bench] issue's `make bench-llm` compares against TRL; this is the measurement behind the causal-LM
issue's note.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from pathlib import Path
from loratune import runtime
from loratune.training import loop
from loratune.training.levers import Levers
from loratune.training.options import TrainConfig
from loratune.training.state import Optim, TrainState

steps, lean, compile = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1"
cfg = TrainConfig(data="rotten-tomatoes-4k-instruct", compile=compile)
data = loop.prepare_data(cfg)
device = torch.device("cpu")
run = loop.setup(cfg, data, Path("/tmp/bench-causal"), device=device, precision=runtime.resolve_precision("auto", device),
                 threads=runtime.set_threads(None), levers=Levers(lean_mlp=lean), emit=lambda e: None)
run.model.train()                                                     # as fit() does: dropout on
optim = Optim.create(run.model, cfg, total=run.total, device=device, precision=run.precision)
state = TrainState()
order = sorted(loop._epoch_batches(run, 0), key=lambda b: -int(data.train.lengths[b].max()))
loop.optimizer_step(run, optim, state, order[-1:])                     # warm-up (a short batch)
t0, tok0 = state.seconds, state.tokens
for k in range(steps):
    loop.optimizer_step(run, optim, state, order[k:k + 1])
emb = sum(p.numel() for n, p in run.model.named_parameters() if "embed" in n)
weights = sum(p.numel() for n, p in run.model.named_parameters() if ".adapters." not in n) - emb
print(json.dumps({"tokens_per_s": (state.tokens - tok0) / (state.seconds - t0), "precision": run.precision,
                  "threads": run.threads, "non_embedding_weights": weights, "train_mode": run.model.training,
                  "widest_batch": int(data.train.lengths[order[0]].max()), "batch_size": cfg.batch_size,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.causal", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps, longest batches first")
    args = ap.parse_args(argv)
    import torch

    from bench.common import machine, matmul_peak

    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    for lean, compile in ((True, False), (False, False), (True, True)):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.steps), str(int(lean)), str(int(compile))],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["lean_mlp"], r["compile"] = lean, compile
        r["gflops"] = 4 * r["non_embedding_weights"] * r["tokens_per_s"] / 1e9
        r.update({f"share_{k}_peak": r["gflops"] / v for k, v in peaks.items()})
        rows.append(r)
    doc = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "peaks_gflops": peaks, "runs": rows}
    print(json.dumps(doc, indent=2))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path(f"bench/results/causal-{time.strftime('%Y-%m-%d-%H%M')}.json").write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
