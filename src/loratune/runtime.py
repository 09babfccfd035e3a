"""Device, precision and threads: the few facts about the machine a run depends on."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import sys
from functools import lru_cache
from typing import Any, ContextManager

import torch

from loratune.errors import InputError


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask, which Ray and taskset set), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                                     # macOS, Windows
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim             # glibc; musl, macOS and Windows have none
    except (OSError, AttributeError):
        return None


def release_memory(*, full: bool = True) -> bool:
    """Collect garbage and hand the heap's free pages back to the OS; True if glibc's ``malloc_trim`` ran.

    Training allocates activations of many shapes (length buckets, evaluation batches); glibc keeps what
    was freed in its heap, so a process that trains again (a Ray worker reused for the next trial) grew
    by about 0.9 GB a trial here. ``full`` (between trials, at a run's end) collects every generation, which
    walks every object of torch, transformers and Ray: 0.3-0.4 s in a trial's process. Between validation
    passes (``full=False``) the freed activations are freed by reference counting already, so only the young
    generations are collected (microseconds) before the trim (≈ 0.02 s); a search's trial did this four
    times an epoch, ≈ 4% of its time (BENCHMARKS.md).
    """
    gc.collect(2 if full else 1)
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def set_threads(threads: int | None) -> int:
    """torch threads = the CPUs given: more threads than cores runs ~5x slower here."""
    n = threads or available_cpus()
    torch.set_num_threads(n)
    return n


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
    except OSError:
        return platform.machine() == "arm64" and sys.platform == "darwin"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 where native (these CPUs; CUDA with bf16), fp16 on older GPUs, else fp32."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(f"--precision: expected one of auto, fp32, bf16, fp16, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise InputError("--precision: fp16 is for CUDA devices; use bf16 or fp32 on a CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> ContextManager[Any]:
    """Mixed precision for forward passes; weights stay fp32 (the optimizer updates fp32 masters)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cast_frozen_linears(model: torch.nn.Module, precision: str) -> int:
    """Store the frozen weights and biases of linear layers in bf16 once, for bf16 training.

    Under bf16 autocast every matmul casts its fp32 weight to bf16 again at every forward pass
    (autocast caches casts only of weights that require grad). Casting the frozen ones once gives
    the very same bf16 values (round to nearest even either way), so the same numbers, without
    re-reading and re-writing every frozen weight each step. Trainable tensors (adapters, the
    head, trained biases), LayerNorms and embeddings stay fp32. Only for a training model: the
    rounding cannot be undone, so a model to be merged or exported must not go through this.
    Returns the number of tensors cast.
    """
    from loratune.core.lora import is_conv1d

    if precision != "bf16":
        return 0
    n = 0
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}   # a tied LM head: the
    for m in model.modules():                                                            # embedding stays fp32
        if isinstance(m, torch.nn.Linear) or is_conv1d(m):
            for p in (m.weight, m.bias):
                if p is not None and not p.requires_grad and p.dtype == torch.float32 and id(p) not in tied:
                    p.data = p.data.to(torch.bfloat16)
                    n += 1
    if n:
        release_file_maps(model)
    return n


def release_file_maps(model: torch.nn.Module) -> int:
    """Copy the parameters and buffers that still live in the checkpoint file's memory map (safetensors loads
    them there, in non-resizable storages) into the process's own memory, so the map is let go.

    After :func:`cast_frozen_linears` the map holds only what was not cast (embeddings, norms), but every
    page of it that the cast read stays resident while anything points into it: for SmolLM2-135M 405 MiB of
    fp32 file pages kept for the 113 MiB embedding. Returns the number of tensors copied.
    """
    n = 0
    for p in model.parameters():                                        # unique: a tied weight once
        if not p.untyped_storage().resizable():
            p.data = p.data.clone()
            n += 1
    for m in model.modules():
        for k, b in m._buffers.items():
            if b is not None and not b.untyped_storage().resizable():
                m._buffers[k] = b.clone()
                n += 1
    return n


def versions() -> dict[str, str]:
    """Versions recorded in every run's config.yaml."""
    import transformers

    from loratune import __version__

    return {"loratune": __version__, "torch": str(torch.__version__), "transformers": str(transformers.__version__),
            "python": platform.python_version()}


@lru_cache(maxsize=None)
def require(dist: str) -> None:
    """Fail with a clear message when the installed ``dist`` is outside the range loratune declares for it.

    The range is the one in loratune's own package metadata (pyproject.toml: the floors are the versions
    whose APIs we import and test, private ones included), so there is one source for it. Without that
    metadata (source on ``sys.path``, not installed) nothing is checked.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        declared = [Requirement(r) for r in metadata.requires("loratune") or []]
        installed = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return
    for req in declared:
        if req.name == dist and req.specifier and not req.specifier.contains(Version(installed), prereleases=True):
            wanted = ",".join(sorted(map(str, req.specifier), key=lambda s: not s.startswith(">")))   # floor first
            raise ImportError(f"loratune needs {dist}{wanted} (it uses APIs of those versions), but {dist} "
                              f"{installed} is installed: pip install '{dist}{wanted}'")
