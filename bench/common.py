"""Shared pieces of the benchmarks: machine facts, the matmul peak, timing helpers, the table."""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable, Sequence

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    from loratune.runtime import available_cpus, cpu_has_bf16

    mem = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) // 1024
    except (OSError, StopIteration):
        pass
    import transformers
    return {"cpu": cpu_model(), "cpus": available_cpus(), "mem_mib": mem, "bf16_native": cpu_has_bf16(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of an n×n×n matmul in ``dtype`` with the current torch threads (best of a few timed runs)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best = max(best, 2 * n ** 3 / dt / 1e9)
    return best


def non_embedding_params(model: torch.nn.Module) -> int:
    """Weights a token's forward touches (all but the embedding tables): 4 FLOPs each per token for LoRA training
    (2 forward + 2 for the activation gradients; the frozen weights get no weight gradients)."""
    return sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and ".adapters." not in n
               and "lora_" not in n)


def best_of(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[c if isinstance(c, str) else f"{c:,.4g}" if isinstance(c, float) else str(c)
                                           for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def quiet() -> None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("loratune").setLevel(logging.WARNING)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
