"""What each speed lever gives: loratune's default training with one lever switched off (or on) at a time,
plus micro-benchmarks for the levers that are not a training option (packing trials, per-step Python costs,
backward below the lowest adapted layer)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import train as tb


def variants(root: Path, model: str, prepared: Any, steps: int, warmup: int) -> list[tuple[str, float]]:
    """(lever, real tokens/s) of the default training and of each variant, in one process, interleaved twice."""
    from loratune.training.levers import Levers

    cases: list[tuple[str, dict[str, Any], Levers]] = [
        ("default (bf16 + buckets + frozen bf16 + fast dropout + fast attention + first-token last layer)", {},
         Levers()),
        ("dropout masks by bernoulli_ (torch's nn.Dropout)", {}, Levers(fast_dropout=False)),
        ("attention by sdpa (its math path under dropout)", {}, Levers(fast_attention=False)),
        ("last layer computed for every token", {}, Levers(first_token=False)),
        ("frozen weights re-cast by autocast each step", {}, Levers(frozen_bf16=False)),
        ("+ widths padded to a multiple of 8", {}, Levers(pad_to=8)),
        ("no length buckets (random batches)", {"bucket": False}, Levers()),
        ("fp32 (no autocast), buckets", {"precision": "fp32"}, Levers()),
        ("fp32, random batches", {"precision": "fp32", "bucket": False}, Levers()),
        ("1 torch thread (of 2 CPUs)", {"threads": 1}, Levers()),
    ]
    got: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(2):
        for name, opts, levers in cases:
            r = tb.ours(model, prepared, steps, warmup, root / "lever", levers=levers, **opts)
            got[name].append(r["tokens_per_s"])
    torch.set_num_threads(tb_threads())
    return [(name, max(v)) for name, v in got.items()]


def tb_threads() -> int:
    from loratune.runtime import available_cpus
    return available_cpus()


def _two_adapter_model(model: str, label_names: list[str]) -> torch.nn.Module:
    from loratune.core.inject import LoraSpec, inject, mark_trainable
    from loratune.runtime import cast_frozen_linears
    from loratune.training.models import load_model

    m = load_model(model, label_names)
    torch.manual_seed(0)
    inject(m, LoraSpec(rank=8, alpha=16, dropout=0.1), "a")
    inject(m, LoraSpec(rank=8, alpha=16, dropout=0.1), "b")
    mark_trainable(m)
    cast_frozen_linears(m, "bf16")
    return m.train()


def packing(model: str, label_names: list[str], length: int = 32, iters: int = 10) -> dict[str, float]:
    """ms per forward+backward (bf16, frozen bf16): 2 adapters × batch 16 routed in one pass of 32 vs two
    passes of 16 (each its own adapter), and one adapter on a batch of 32 (the ceiling of what packing saves)."""
    from loratune.core.inject import routed, set_active

    m = _two_adapter_model(model, label_names)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (32, length), generator=g)
    mask = torch.ones_like(ids)
    y = torch.randint(0, 2, (32,), generator=g)

    def step(i: torch.Tensor, msk: torch.Tensor, lab: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(input_ids=i, attention_mask=msk).logits
        torch.nn.functional.cross_entropy(logits.float(), lab).backward()

    def two_passes() -> None:
        for name, sl in (("a", slice(0, 16)), ("b", slice(16, 32))):
            set_active(m, name)
            step(ids[sl], mask[sl], y[sl])

    def packed() -> None:
        set_active(m, "a")
        with routed(m, ["a"] * 16 + ["b"] * 16):
            step(ids, mask, y)

    def one_adapter_32() -> None:
        set_active(m, "a")
        step(ids, mask, y)

    out = {}
    for name, fn in (("two passes of 16", two_passes), ("one routed pass of 32", packed),
                     ("one adapter, batch 32", one_adapter_32)):
        for _ in range(2):
            fn()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            m.zero_grad(set_to_none=True)
            ts.append(time.perf_counter() - t0)
        out[name] = 1000 * float(np.median(ts))
    return out


def python_costs(prepared: Any) -> dict[str, float]:
    """µs per step of the host-side work: batch order (per epoch, amortised) and collate."""
    from loratune.tasks.batches import batch_order, collate

    tr = prepared.train
    t0 = time.perf_counter()
    for e in range(10):
        order = batch_order(tr.lengths, 16, bucket=True, shuffle=True, seed=0, epoch=e)
    order_us = (time.perf_counter() - t0) / 10 / len(order) * 1e6
    t0 = time.perf_counter()
    for idx in order:
        collate(tr, idx, prepared.pad_id)
    collate_us = (time.perf_counter() - t0) / len(order) * 1e6
    x = torch.tensor(1.0)
    t0 = time.perf_counter()
    for _ in range(10000):
        x.item()
    item_us = (time.perf_counter() - t0) / 10000 * 1e6
    return {"batch_order_us_per_step": order_us, "collate_us_per_step": collate_us, "item_us": item_us}


def grads_below_first_layer(model: str, label_names: list[str]) -> dict[str, Any]:
    """Does autograd compute anything below the lowest adapted layer? (embeddings output requires_grad?)"""
    from loratune.core.inject import LoraSpec, inject
    from loratune.training.models import load_model

    m = load_model(model, label_names)
    inject(m, LoraSpec())
    seen: dict[str, bool] = {}
    emb = next(mod for n, mod in m.named_modules() if n.endswith("embeddings"))
    emb.register_forward_hook(lambda mod, i, o: seen.__setitem__("embeddings_out_requires_grad", bool(o.requires_grad)))
    ids = torch.randint(1000, 5000, (2, 8))
    m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    seen["embedding_weight_grad"] = emb.word_embeddings.weight.grad is not None
    return seen
