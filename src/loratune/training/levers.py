"""The trainer's speed levers: one frozen value, passed to ``train(..., levers=Levers())``.

Each lever changes what a training step costs, not what it computes (to rounding): tests/test_levers.py
pins the fast dropout and attention against torch's, and the first-token layer against the full one.
The defaults are what ``loratune train`` uses; ``bench/`` switches each off alone to measure what it
gives (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:                                        # importing the levers needs no torch
    from torch import nn


@dataclass(frozen=True)
class Levers:
    """Which speed levers a training run uses (all on by default)."""

    frozen_bf16: bool = True
    """bf16 training: keep the frozen linear weights in bf16 once (runtime.cast_frozen_linears) instead of
    autocast re-casting them at every forward pass; the same bf16 values, without re-reading each weight."""
    fast_dropout: bool = True
    """CPU training: dropout masks from 16-bit slices of 64-bit draws (fastops.keep_mask), ~4x cheaper than
    ``bernoulli_``, in the model's and the adapters' dropouts. Same distribution; not the same draws."""
    fast_attention: bool = True
    """CPU training: attention written out (fastops.fast_attention) where sdpa is slow: under dropout (its math
    path; written out with those masks, 6-10% a step) and in a bf16 backward pass (its fused kernel's bf16
    backward; a SmolLM2 step 1.4x faster). fp32 without dropout and evaluation keep sdpa."""
    first_token: bool = True
    """Classifiers that read token 0 only: the last layer computes token 0 only (firsttoken.py); exact, and
    1/7 less matmul work for a 6-layer model."""
    lean_mlp: bool = True
    """Decoders with a gated SiLU MLP (Llama, SmolLM2): keep two of the MLP's three wide activations for the
    backward pass and recompute the third (fastops.silu_mul); same values, a sixth less activation memory."""
    pad_to: int = 1
    """Round each training batch's width up to a multiple of this. 1 (none): 8 measured slower here, since
    the extra padding costs more than the fewer distinct shapes save."""

    def __post_init__(self) -> None:
        if isinstance(self.pad_to, bool) or not isinstance(self.pad_to, int) or self.pad_to < 1:
            raise ValueError(f"Levers.pad_to: expected an integer >= 1, got {self.pad_to!r}")

    def apply(self, model: nn.Module, precision: str) -> None:
        """Switch the model-side levers on in a training model, after the adapters are injected (they must
        take the fp32 dtype before the frozen weights go to bf16). ``pad_to`` is the collator's (not here).
        Each is a no-op where it does not apply (fp32, CUDA, a model it does not recognise)."""
        from loratune.runtime import cast_frozen_linears
        from loratune.training.fastops import (
            use_fast_attention,
            use_fast_dropout,
            use_lean_mlp,
        )
        from loratune.training.firsttoken import first_token_last_layer

        if self.frozen_bf16:
            cast_frozen_linears(model, precision)
        if self.fast_dropout:                             # the model's and the adapters' dropouts
            use_fast_dropout(model)
        if self.fast_attention:                           # the attention probabilities' dropout
            use_fast_attention(model)
        if self.first_token:
            first_token_last_layer(model)
        if self.lean_mlp:
            use_lean_mlp(model)
