"""Causal-LM training speed against TRL, both sides in one run: ``python -m bench.llm_speed`` (``make bench-llm``'s
second half; ≈ 10 min on 2 cores).

The same work on every side: the first ``--steps`` × 16 conversations of the built-in instruct data's training
split (split seed 0), one pass in batches of 16, LoRA r 8, α 16 on q,v of SmolLM2-135M-Instruct (loratune's
causal-LM defaults, handed to TRL as a ``peft.LoraConfig``), the loss on the completion only, the machine's
CPUs as torch threads. Four sides, each in a fresh process (so its peak RSS is its own), one at a time:

- ``loratune``: its training step (``training/loop.py``) exactly as ``loratune train`` runs it, every lever on,
  ``--precision auto``, its own length-bucketed batch order.
- ``loratune-compile``: the same with ``--compile`` (each decoder layer's training pass through torch.compile);
  its compile happens in the warm-up step, reported apart as ``first_step_s``.
- ``trl-defaults``: TRL's ``SFTTrainer`` + PEFT with ``SFTConfig``'s defaults on this CPU (bf16 autocast,
  gradient checkpointing, random batches, fp32 weights as TRL loads them); only the batch size, the learning
  rate (loratune's, which costs nothing), the logging/saving switches and ``use_cpu=True`` are set (without
  it, TRL's default bf16 stops at "Your setup doesn't support bf16/gpu" on a machine with no GPU).
- ``trl-best``: the same, with what makes TRL fastest here: bf16, no gradient checkpointing, and
  ``train_sampling_strategy="group_by_length"`` (transformers 5's name for ``group_by_length``). TRL's
  padding-free and packing paths need CUDA's flash attention, so they are not used.

Each side's first step is a warm-up; tokens/s is real (non-pad) tokens of steps 2 … N over their wall time.
FLOPs count 4 per non-embedding weight per token (forward, and the backward pass's input gradients) for every
side, so the share of the bf16 matmul peak (2048², all threads, measured in the same run) compares useful
work. TRL runs from its own package folder ``.bench-trl/`` (``trl`` pinned to :data:`TRL_VERSION`, installed
there on first use with ``pip --target``; torch, transformers and peft are the ones loratune uses, so only
the trainer differs). Figures go to ``bench/results/llm-speed-<UTC>.json``.

After the sides, :func:`matmul_ceiling` times the frozen-weight matmuls of loratune's timed batches alone (no
other work), padded as loratune pads them and packed: the share of the bf16 peak that no implementation built on
torch's matmul could pass here (``--sides ''`` measures only that, ≈ 2 min); each side's ``share_of_ceiling`` is
its tokens/s over the padded ceiling's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRL_VERSION = "1.16.0"
TRL_DIR = Path(".bench-trl")
BATCH = 16

OURS = r"""
import json, resource, sys
import numpy as np
from pathlib import Path
import torch
from loratune import runtime
from loratune.tasks.batches import batch_order
from loratune.training import loop
from loratune.training.levers import Levers
from loratune.training.options import TrainConfig
from loratune.training.state import Optim, TrainState

n, threads, compile = int(sys.argv[1]), int(sys.argv[2]), sys.argv[4] == "1"
cfg = TrainConfig(data="rotten-tomatoes-4k-instruct", compile=compile)
data = loop.prepare_data(cfg)
device = torch.device("cpu")
run = loop.setup(cfg, data, Path(sys.argv[3]), device=device, precision=runtime.resolve_precision("auto", device),
                 threads=runtime.set_threads(threads), levers=Levers(), emit=lambda e: None)
run.model.train()                                                     # as fit() does: dropout on
optim = Optim.create(run.model, cfg, total=run.total, device=device, precision=run.precision)
state = TrainState()
lengths = np.asarray(data.train.lengths)[:n]
order = batch_order(lengths, cfg.batch_size, bucket=cfg.bucket, shuffle=True, seed=cfg.seed, epoch=0)
loop.optimizer_step(run, optim, state, order[:1])                     # warm-up (and --compile's compile)
t0, tok0 = state.seconds, state.tokens
first = state.seconds
for b in order[1:]:
    loop.optimizer_step(run, optim, state, [b])
print(json.dumps({"tokens_per_s": (state.tokens - tok0) / (state.seconds - t0), "seconds": state.seconds - t0,
                  "tokens": state.tokens - tok0, "all_tokens": int(lengths.sum()), "steps": len(order) - 1,
                  "precision": run.precision, "threads": run.threads, "compile": compile, "first_step_s": first,
                  "train_mode": run.model.training,
                  "shapes": [[len(b), int(lengths[b].max()), int(lengths[b].sum())] for b in order[1:]],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

TRL = r"""
import json, resource, sys, time
import torch
conf = json.loads(sys.argv[1])
torch.set_num_threads(conf["threads"])
import transformers
from datasets import Dataset
from peft import LoraConfig
import trl
from trl import SFTConfig, SFTTrainer
from transformers import AutoTokenizer, TrainerCallback

rows = json.loads(open(conf["data"], encoding="utf-8").read())
ds = Dataset.from_list([{"prompt": c[:-1], "completion": [c[-1]]} for c in rows])
tok = AutoTokenizer.from_pretrained(conf["model"])
args = SFTConfig(output_dir=conf["out"], per_device_train_batch_size=conf["batch"], num_train_epochs=1,
                 learning_rate=conf["lr"], report_to="none", save_strategy="no", logging_steps=1000,
                 disable_tqdm=True, seed=0, use_cpu=True, **conf["extra"])
lora = LoraConfig(r=conf["rank"], lora_alpha=conf["alpha"], lora_dropout=conf["dropout"],
                  target_modules=conf["targets"], task_type="CAUSAL_LM")
trainer = SFTTrainer(model=conf["model"], args=args, train_dataset=ds, peft_config=lora, processing_class=tok)
counts, ends = [], []
inner = trainer.data_collator
def collate(features):
    b = inner(features)
    m = b.get("attention_mask")
    counts.append(int(m.sum()) if m is not None else int((b["input_ids"] != tok.pad_token_id).sum()))
    return b
trainer.data_collator = collate
class Clock(TrainerCallback):
    def on_step_end(self, a, s, c, **kw):
        ends.append(time.perf_counter())
trainer.add_callback(Clock())
trainer.train()
seconds = ends[-1] - ends[0]
print(json.dumps({"tokens_per_s": (sum(counts) - counts[0]) / seconds, "seconds": seconds,
                  "tokens": sum(counts) - counts[0], "all_tokens": sum(counts), "steps": len(ends) - 1,
                  "trl": trl.__version__, "transformers": transformers.__version__,
                  "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
                  "sampling": args.train_sampling_strategy, "dtype": str(next(trainer.model.parameters()).dtype),
                  "threads": torch.get_num_threads(),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

SIDES = {
    "loratune": None,
    "loratune-compile": None,
    "trl-defaults": {},
    "trl-best": {"bf16": True, "gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"},
}
"""side -> the ``SFTConfig`` options set beyond batch size, lr and logging (None: loratune itself; its
``-compile`` side with ``--compile``)."""


def ensure_trl() -> Path:
    """``.bench-trl/`` with trl==TRL_VERSION (its own dependencies are loratune's: checked by importing it)."""
    marker = TRL_DIR / f"trl-{TRL_VERSION}.dist-info"
    if not marker.is_dir():
        print(f"installing trl=={TRL_VERSION} into {TRL_DIR}/ (bench only)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                        str(TRL_DIR), f"trl=={TRL_VERSION}"], check=True)
    env = dict(os.environ, PYTHONPATH=str(TRL_DIR.resolve()))
    subprocess.run([sys.executable, "-c", "import trl; from trl import SFTTrainer"], check=True, env=env)
    return TRL_DIR.resolve()


def run_side(side: str, n: int, threads: int, tmp: Path, data_file: Path, opts: dict) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if SIDES[side] is None:
        cmd = [sys.executable, "-c", OURS, str(n), str(threads), str(tmp / side), str(int(side.endswith("-compile")))]
    else:
        env["PYTHONPATH"] = str(TRL_DIR.resolve())
        conf = dict(opts, threads=threads, data=str(data_file), out=str(tmp / side), batch=BATCH,
                    extra=SIDES[side])
        cmd = [sys.executable, "-c", TRL, json.dumps(conf)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"{side}: exit {out.returncode}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["process_s"] = time.perf_counter() - t0
    return r


def batch_shapes(n: int) -> list[list[int]]:
    """[rows, padded width, real tokens] of each timed batch (all but the warm-up) of loratune's side: its own
    length-bucketed order of the first ``n`` training conversations, as the ``OURS`` script trains them."""
    import numpy as np

    from loratune.tasks.batches import batch_order
    from loratune.training import loop
    from loratune.training.options import TrainConfig

    cfg = TrainConfig(data="rotten-tomatoes-4k-instruct")
    lengths = np.asarray(loop.prepare_data(cfg).train.lengths)[:n]
    order = batch_order(lengths, cfg.batch_size, bucket=cfg.bucket, shuffle=True, seed=cfg.seed, epoch=0)
    return [[len(b), int(lengths[b].max()), int(lengths[b].sum())] for b in order[1:]]


def linear_shapes(mc: object) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's frozen linear layers: q, k, v, o, gate, up, down (Llama's layout)."""
    h, heads, kv = mc.hidden_size, mc.num_attention_heads, mc.num_key_value_heads
    hd = getattr(mc, "head_dim", None) or h // heads
    i = mc.intermediate_size
    return [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (i, h), (i, h), (h, i)]


def matmul_ceiling(mc: object, shapes: list[list[int]], rounds: int = 3, packed: bool = False) -> dict:
    """What a training step that did nothing but its frozen-weight matmuls would reach at these batch shapes:
    for every batch (rows × padded width = M tokens) and every decoder layer, each linear layer's forward product
    (M × in by in × out) and its input-gradient product (M × out by out × in), bf16, the current torch threads;
    no attention, norms, activations, LoRA, loss or optimizer. Its time is a lower bound for any implementation
    that uses torch's matmul, so ``share_bf16_peak`` (the same useful-FLOP count as the sides: 4 per weight per
    real token) is the most any side could show here. Interleaved with the 2048² peak (the host's speed moves
    within minutes): best of ``rounds`` for each, the same rule as the peak's. ``packed``: M is each batch's real
    tokens (no padding at all, as a packed or padding-free batch would be)."""
    import torch
    import torch.nn.functional as F

    from bench.common import matmul_peak

    lin = linear_shapes(mc)
    layers = mc.num_hidden_layers
    weights = [[torch.randn(o, i, dtype=torch.bfloat16) for o, i in lin] for _ in range(layers)]   # as many as
    # the model's, so they stream from memory as its weights do rather than staying in cache
    ms = [t if packed else r * w for r, w, t in shapes]
    m_max = max(ms)
    xs = {d: torch.randn(m_max, d, dtype=torch.bfloat16) for d in {i for _, i in lin} | {o for o, _ in lin}}

    def one_pass() -> float:
        t0 = time.perf_counter()
        for m in ms:
            for layer in weights:
                for wt, (o, i) in zip(layer, lin):
                    F.linear(xs[i][:m], wt)           # forward: (M, in) · (in, out)
                    xs[o][:m] @ wt                    # input gradient: (M, out) · (out, in)
        return time.perf_counter() - t0

    one_pass()                                        # warm-up (oneDNN's kernels for each shape)
    best, peak = float("inf"), 0.0
    for _ in range(rounds):
        peak = max(peak, matmul_peak(torch.bfloat16))
        best = min(best, one_pass())
    real = sum(t for _, _, t in shapes)
    gflops = 4 * layers * sum(o * i for o, i in lin) * real / best / 1e9
    return {"seconds": best, "tokens_per_s": real / best, "gflops": gflops, "peak_gflops": peak,
            "share_bf16_peak": gflops / peak, "padding_fraction": 1 - real / sum(ms),
            "packed": packed, "batches": len(shapes), "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.llm_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps of 16 conversations per side (the "
                    "first is a warm-up); default 24")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)} (''"
                    ": only the matmul-only ceiling)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per side (default: the CPUs)")
    args = ap.parse_args(argv)
    sides = [s for s in args.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES]
    if bad or args.steps < 2:
        ap.error(f"unknown side(s) {bad}" if bad else "--steps: at least 2 (the first is a warm-up)")

    import torch

    from bench.common import machine, matmul_peak
    from loratune import runtime
    from loratune.training.causal_data import load_causal_splits
    from loratune.training.models import resolve_model_path
    from loratune.training.options import TrainConfig

    threads = args.threads or runtime.available_cpus()
    torch.set_num_threads(threads)
    if any(SIDES[s] is not None for s in sides):
        ensure_trl()
    cfg = TrainConfig(data="rotten-tomatoes-4k-instruct")
    n = args.steps * BATCH
    convs = load_causal_splits(cfg).train[:n]
    opts = {"model": resolve_model_path(cfg.model), "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
            "targets": ["q_proj", "v_proj"], "lr": float(cfg.lr)}
    if cfg.targets != ("qv",):
        raise SystemExit(f"the causal-LM default targets are now {cfg.targets}: update the TRL side's LoraConfig")
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    from transformers import AutoConfig
    mc = AutoConfig.from_pretrained(opts["model"])
    weights = mc.num_hidden_layers * sum(o * i for o, i in linear_shapes(mc))   # q, k, v, o, gate, up, down
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-llm-speed-") as d:
        tmp = Path(d)
        data_file = tmp / "train.json"
        data_file.write_text(json.dumps([list(c) for c in convs]), encoding="utf-8")
        for side in sides:
            print(f"{side}: {args.steps} steps of {BATCH} …", flush=True)
            r = run_side(side, n, threads, tmp, data_file, opts)
            r["gflops"] = 4 * weights * r["tokens_per_s"] / 1e9
            r["share_bf16_peak"] = r["gflops"] / peaks["bf16"]
            rows[side] = r
            print(f"  {r['tokens_per_s']:,.0f} tokens/s ({r['tokens']:,} tokens in {r['seconds']:.1f} s), "
                  f"{100 * r['share_bf16_peak']:.1f}% of the bf16 peak, peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)
    shapes = next((r["shapes"] for r in rows.values() if "shapes" in r), None) or batch_shapes(n)
    ceilings = {}
    for packed in (False, True):
        c = ceilings["packed" if packed else "padded"] = matmul_ceiling(mc, shapes, packed=packed)
        kind = "packed, no padding" if packed else "loratune's padded batches"
        print(f"matmul-only ceiling ({kind}): "
              f"{c['tokens_per_s']:,.0f} tokens/s, {100 * c['share_bf16_peak']:.1f}% of the bf16 peak "
              f"({c['peak_gflops']:,.0f} GFLOP/s in the same minutes; padding {100 * c['padding_fraction']:.1f}%)",
              flush=True)
    for r in rows.values():
        r["share_of_ceiling"] = r["tokens_per_s"] / ceilings["padded"]["tokens_per_s"]
    doc = {"when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": machine(), "threads": threads,
           "peaks_gflops": peaks, "non_embedding_weights": weights, "steps": args.steps, "batch": BATCH,
           "conversations": n, "trl_version": TRL_VERSION, "options": opts, "sides": rows,
           "matmul_ceiling": ceilings}
    ours = [s for s in rows if SIDES[s] is None]
    doc["ratios"] = {f"{o}/{s}": rows[o]["tokens_per_s"] / rows[s]["tokens_per_s"]
                     for o in ours for s in rows if s != o}
    print(f"\n| side | tokens/s | share of bf16 peak | share of the matmul-only ceiling | peak RSS (MiB) |"
          f"{''.join(' ' + o + ' ÷ side |' for o in ours)}\n|---|---|---|---|---|{'---|' * len(ours)}")
    for s, r in rows.items():
        ratios = [doc["ratios"].get(f"{o}/{s}") for o in ours]
        print(f"| {s} | {r['tokens_per_s']:,.0f} | {100 * r['share_bf16_peak']:.1f}% | "
              f"{100 * r['share_of_ceiling']:.1f}% | {r['peak_rss_mib']:,.0f} |"
              + "".join(f" {x:.2f}x |" if x else "  |" for x in ratios))
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    out = Path(f"bench/results/llm-speed-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"figures: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
