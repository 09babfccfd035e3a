"""Training speed on CPUs: cheaper dropout masks, and attention that uses them.

Both change cost, not results: the same distributions as torch's dropout and the same attention as
transformers' "sdpa" (tests/test_levers.py pins both). The trainer applies them to a training model on
a CPU (``use_fast_dropout``, ``use_fast_attention``); evaluation and inference never see them (dropout is
off there, and the attention falls back to sdpa without dropout).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# --- dropout masks from a cheaper draw ------------------------------------------------------------
#
# On these CPUs ``nn.Dropout`` spends ~6 ns an element in ``bernoulli_`` (one generator call and one
# float compare per element): 15% of a bf16 distilbert training step. One 64-bit draw gives four
# 16-bit uniforms instead, so the mask costs about a quarter as much. Keep probability is 1 - p
# rounded to a multiple of 1/65536 (|error| ≤ 7.7e-6); outputs are scaled by 1/(1 - p) as torch's.
# The draws come from torch's default generator, so torch.manual_seed and get/set_rng_state (the
# trainer's checkpoints) make runs repeat exactly, as with nn.Dropout.

def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of ``shape``, each element True with probability 1 - p (to 1/65536), independently."""
    n = math.prod(shape)
    # randint over the full int64 range: all 64 bits uniform (random_() without bounds leaves the sign bit 0). The
    # draws of ``empty().random_(from, to)``; out of place, so torch.compile traces it (--compile keeps it on
    # torch's generator: the same masks as eager, where inductor's own dropout drew 3x slower here).
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n].view(shape) >= -32768 + round(p * 65536)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask from ``keep_mask``: same distribution, ~4x cheaper mask."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    # The mask multiplies as uint8 (a view of the bool mask, no copy): ``x * bool`` converts the mask to x's dtype
    # element by element first, 96 of its 128 µs on 16 x 40 x 384 fp32 (217 of 257 in bf16) here, where uint8 is
    # converted vectorised (45 µs in all); in the backward pass too. The same values and gradients, bit for bit.
    return x * keep_mask(x.shape, p, x.device).view(torch.uint8) * (1.0 / (1.0 - p))


class FastDropout(nn.Dropout):
    """``nn.Dropout`` whose mask is drawn by ``keep_mask``; same parameters, same (empty) state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Turn every ``nn.Dropout`` of a training model into a ``FastDropout`` (CPU only: CUDA's bernoulli is
    already cheap). Returns how many were switched. Evaluation is unaffected: dropout is off there."""
    if next(model.parameters()).device.type != "cpu":
        return 0
    n = 0
    for m in model.modules():
        if type(m) is nn.Dropout:
            m.__class__ = FastDropout
            n += 1
    return n


# --- attention with those masks -------------------------------------------------------------------
#
# Two cases where the attention written out (scores, softmax in fp32, dropout, @ V) is faster on a CPU
# than torch's scaled_dot_product_attention, which is otherwise used unchanged (transformers' own sdpa
# function: evaluation, fp32 without dropout, CUDA):
# - dropout on the attention probabilities (training an encoder): sdpa cannot use its fused kernel and
#   runs its generic "math" path, which draws the mask by bernoulli_; written out with fast_dropout it
#   was 6-10% faster per training step (BENCHMARKS.md);
# - bf16 training without dropout (a decoder: SmolLM2, Llama): sdpa's fused CPU kernel is fast forward
#   (2.7 ms a layer at 16 x 72 tokens) but its bf16 backward took 27 ms a layer, 17% of a SmolLM2 step;
#   written out (the bf16 matmuls and softmax of transformers' "eager" attention) a whole step was 1.4x
#   faster (574 -> 794 tokens/s, 2 threads, Emerald Rapids). In fp32 the two were equally fast, so fp32
#   keeps sdpa's exact numbers.
# Grouped-query heads are broadcast and a causal mask is built where sdpa would have used is_causal.

FAST_ATTENTION = "loratune_sdpa"


def fast_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (B, H, L, D) inputs → ((B, L, H, D) output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    written = (query.device.type == "cpu" and kwargs.get("position_bias") is None
               and (attention_mask is None or attention_mask.dtype == torch.bool))
    if written and dropout == 0.0:                     # only sdpa's slow case: a bf16 backward pass (rotary
        bf16 = query.dtype == torch.bfloat16 or (     # embeddings leave q, k in fp32 under autocast)
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        written = bf16 and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                        or value.requires_grad)
    if not written:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, length, dim = query.shape
    kv = key.shape[1]                                  # grouped-query attention: each KV head serves a group of
    rows = heads // kv * length                        # heads (h = kv·g + j), whose queries are stacked as rows, so
    q = query.reshape(b, kv, rows, dim)                # K and V are used as they are, never expanded (an expanded
    scale = scaling if scaling is not None else 1.0 / math.sqrt(dim)   # copy would be kept for the backward pass)
    scores = torch.matmul(q, key.transpose(-2, -1)).view(b, heads, length, -1) * scale
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and causal and length > 1:   # sdpa's is_causal (no padding in the batch)
        total = scores.shape[-1]
        attention_mask = torch.ones(length, total, dtype=torch.bool, device=scores.device).tril(total - length)
    if attention_mask is not None:                     # sdpa masks: True = attend; a finite fill keeps
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)   # empty rows finite
    if scores.dtype == torch.bfloat16:                 # softmax's float math inside, bf16 out: what it keeps for
        probs = torch.softmax(scores, dim=-1)          # the backward pass is half an fp32 copy
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = fast_dropout(probs, dropout).view(b, kv, rows, -1)
    out = torch.matmul(probs, value).view(b, heads, length, dim)
    return out.transpose(1, 2).contiguous(), None


def use_fast_attention(model: nn.Module) -> bool:
    """Route a CPU training model's "sdpa" attention through ``fast_attention``; other implementations (eager,
    flash, a user's choice) are left alone. Returns True if switched."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    AttentionInterface.register(FAST_ATTENTION, fast_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)
    for m in model.modules():                          # sub-configs (text/vision towers) share the choice
        c = getattr(m, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
            c._attn_implementation = FAST_ATTENTION
    return True


# --- gated MLPs that keep less for the backward pass ------------------------------------------------
#
# A Llama-style MLP computes down(silu(gate(x)) * up(x)). Autograd keeps three (tokens, intermediate)
# tensors of it for the backward pass: silu's input, silu's output and up's output. With the linear
# weights frozen (LoRA) those dominate a decoder's activations (the intermediate is 2.7x the width in
# SmolLM2). silu_mul keeps two and recomputes silu(gate) in the backward pass (elementwise, cheap):
# the same forward values, the same gradient formulas (torch's silu backward), a sixth less memory.

class SiluMul(torch.autograd.Function):
    """``F.silu(gate) * up`` keeping only ``gate`` and ``up`` for the backward pass."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig))) if ctx.needs_input_grad[0] else None
        grad_up = grad * (gate * sig) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``; under autograd, :class:`SiluMul` (two tensors kept instead of three)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)  # type: ignore[no-any-return]
    return torch.nn.functional.silu(gate) * up


def _lean_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def use_lean_mlp(model: nn.Module) -> int:
    """Route every gated SiLU MLP (``gate_proj``, ``up_proj``, ``down_proj``, a SiLU ``act_fn``: Llama, Mistral,
    Qwen2, SmolLM2) of a training model through :func:`silu_mul`. Returns how many were switched."""
    import types

    from transformers.activations import SiLUActivation

    n = 0
    for m in model.modules():
        act = getattr(m, "act_fn", None)
        if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")) and \
                type(act) in (nn.SiLU, SiLUActivation):
            m.forward = types.MethodType(_lean_mlp_forward, m)
            n += 1
    return n
