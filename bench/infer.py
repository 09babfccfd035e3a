"""Benchmark 3: ``loratune predict`` throughput with the adapter unmerged, merged, and the base model alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.common import quiet


def run(adapter: Path, texts: list[str], repeats: int = 3) -> dict[str, float]:
    """texts/s of :func:`loratune.infer.inference.predict` (tokenize + classify + rows), best of ``repeats``, interleaved."""
    from dataclasses import replace

    from loratune.core.inject import merge_and_unload
    from loratune.infer.inference import load, predict
    from loratune.training.models import load_model

    quiet()
    unmerged = load(adapter, device="cpu")
    merged = load(adapter, device="cpu")
    merge_and_unload(merged.model)
    base = replace(unmerged, model=load_model(unmerged.base, unmerged.label_names).eval())
    variants = {"base model": base, "adapter merged": merged, "adapter unmerged": unmerged}
    for v in variants.values():                                   # warm-up: oneDNN primitives per shape
        list(predict(v, texts[:256]))
    best: dict[str, float] = {k: 0.0 for k in variants}
    for _ in range(repeats):
        for name, v in variants.items():
            t0 = time.perf_counter()
            n = sum(1 for _ in predict(v, texts))
            best[name] = max(best[name], n / (time.perf_counter() - t0))
    return best


def texts_of_builtin(copies: int = 2) -> list[str]:
    from loratune.training.data import load_splits
    from loratune.training.options import TrainConfig

    s = load_splits(TrainConfig())
    return (s.validation.texts + s.test.texts) * copies


def rows(result: dict[str, float]) -> list[list[Any]]:
    b = result["base model"]
    return [[name, tps, tps / b, f"{100 * (b / tps - 1):+.1f}% time vs base"] for name, tps in result.items()]
