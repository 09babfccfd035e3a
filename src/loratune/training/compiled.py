"""Training speed: ``torch.compile`` each transformer layer of a training model (``--compile``).

inductor fuses what a layer does besides its matmuls (RMSNorm or LayerNorm, rotary embeddings, SiLU, dropout
masks, LoRA's scaling, softmax, bf16 casts) into generated C++ loops; the matmuls stay oneDNN's. On SmolLM2 in
bf16 that elementwise work was most of a step (BENCHMARKS.md: a step's ``mm`` was 20% of its CPU time before,
54% after), so a compiled step was 1.53x faster and kept less for the backward pass (peak RSS 3,483 -> 2,616 MiB).
The compile is paid in the first step of each process: ≈ 90 s with inductor's kernel cache empty, 12-22 s once
it is warm (its cache folder, under /tmp by default, serves later processes).

Only the training pass is compiled. Under ``torch.no_grad`` (validation, generation, serving) or in eval mode
a layer runs its eager forward, so evaluation computes what it computed without ``--compile`` and never waits
for a second compile. The modules are not wrapped (their forward is), so state dicts, checkpoints and adapter
files keep their keys. Shapes are dynamic: one compile serves every batch width. A compiled training step is
the same computation to rounding, dropout masks included (drawn from torch's generator as in the eager pass,
so a seeded run repeats and a resumed one continues as it would have).
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn

from loratune.errors import InputError

COMPILED_ATTENTION = "loratune_sdpa_compiled"
"""The attention a compiled model with ``fastops.fast_attention`` uses: the same function, but its training
pass always gets a mask tensor (see :func:`_full_mask_when_training`)."""


def check_compiler(device: torch.device) -> None:
    """Refuse ``--compile`` where inductor cannot build its kernels: on a CPU it needs a C++ compiler."""
    if device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:                                   # inductor's InvalidCxxCompiler, or its search failing
        raise InputError("--compile: torch.compile needs a C++ compiler for the CPU and found none (it tries "
                         "$CXX, else g++); install one (Debian/Ubuntu: apt install g++) or train without "
                         "--compile") from None


def layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of transformer layers: each outermost ``nn.ModuleList`` whose items are all of one
    class and hold linear layers (``nn.Linear`` or GPT-2's ``Conv1D``): ``model.layers`` of Llama,
    ``encoder.layer`` of BERT, ``transformer.layer`` of DistilBERT, ``transformer.h`` of GPT-2; an
    encoder-decoder model has two."""
    from loratune.core.inject import is_linear

    found: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if len({type(c) for c in m}) == 1 and all(any(is_linear(s) for s in c.modules()) for c in m):
            found.append((name, m))
    return found


def compile_layers(model: nn.Module, **options: Any) -> int:
    """Compile the training pass of every layer :func:`layer_lists` finds (``options`` go to ``torch.compile``;
    default dynamic shapes, and random numbers from torch's generator: ``fastops.keep_mask``'s dropout masks are
    then the ones the eager pass draws, and cheaper than inductor's own). Returns how many layers; 0 (nothing
    changed) for a model without such a stack."""
    stacks = layer_lists(model)
    options = {"dynamic": True, "options": {"fallback_random": True}, **options}
    n = 0
    for _, stack in stacks:
        for layer in stack:
            layer.forward = _training_compiled(layer, layer.forward, options)
            n += 1
    if n:
        _route_attention(model)
    return n


def _training_compiled(layer: nn.Module, eager: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
    compiled = torch.compile(eager, **options)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    return types.MethodType(forward, layer)


def _route_attention(model: nn.Module) -> None:
    """A model on ``fastops.fast_attention`` gets :data:`COMPILED_ATTENTION`: without it, a training batch with
    no padding gets no mask (transformers' sdpa masks skip an all-causal one) and every layer compiles again for
    that case (≈ 15 s more; an encoder's all-ones mask likewise); with it, such a batch gets the mask as a tensor."""
    from transformers import AttentionInterface, AttentionMaskInterface

    from loratune.training.fastops import FAST_ATTENTION, fast_attention

    AttentionInterface.register(COMPILED_ATTENTION, fast_attention)
    AttentionMaskInterface.register(COMPILED_ATTENTION, _full_mask_when_training)
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == FAST_ATTENTION:
            c._attn_implementation = COMPILED_ATTENTION


def _full_mask_when_training(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' sdpa mask, never skipped under autograd (evaluation may skip it as before): neither a decoder's
    all-causal one nor an encoder's all-ones one."""
    from transformers.masking_utils import sdpa_mask

    if torch.is_grad_enabled():
        kwargs["allow_is_causal_skip"] = kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)  # type: ignore[no-any-return]
