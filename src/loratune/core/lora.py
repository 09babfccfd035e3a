"""The LoRA layer: a frozen linear map plus low-rank updates.

    h = W0·x + b + Σ_adapters (α/r)·B·A·dropout(x)      W0: (d, k)  A: (r, k)  B: (d, r)

A starts Kaiming-uniform (a=√5, as nn.Linear and peft), B at zeros, so a fresh adapter is a no-op.
Scaling is α/r, or α/√r with rsLoRA. ``LoraLinear`` wraps the base layer (composition, not
inheritance) and can hold several named adapters: one active for the whole batch, or one per row
(``route``), which lets a search pack several trials into one forward pass over one frozen base.

What trains in full beside A and B (the task head, ``modules_to_save``) is routed per row by
``RoutedModule``: one module's code, one set of its tensors per adapter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from loratune.errors import InputError


def is_conv1d(layer: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored transposed, (k, d)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_out, k_in) of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if is_conv1d(layer):
        k, d = layer.weight.shape
        return d, k
    raise TypeError(f"not a linear layer: {type(layer).__name__}")


class LoraAdapter(nn.Module):
    """One low-rank update ΔW = scaling·B·A, with the dropout on its input."""

    def __init__(self, d: int, k: int, r: int, alpha: float, dropout: float = 0.0, *,
                 rslora: bool = False, init: str = "kaiming") -> None:
        super().__init__()
        if r < 1 or r > min(d, k):
            raise InputError(f"--rank: must be between 1 and min(d, k) = {min(d, k)} for a {d}x{k} matrix, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"--dropout: must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.rslora = r, float(alpha), rslora
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, k))      # (r, k)
        self.lora_B = nn.Parameter(torch.zeros(d, r))      # (d, r): zeros, so ΔW = 0 at start
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            raise InputError(f"--init: expected kaiming or gaussian, got {init!r}")

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling·B·A, shape (d, k), in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., k) -> (..., r) -> (..., d); two thin matmuls, never the d×k product.
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


class LoraLinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus named LoRA adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.d, self.k = linear_shape(base_layer)
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        """Adapter applied to every row, unless ``route`` is set."""
        self.route: list[tuple[str, torch.Tensor]] | None = None
        """Per-row routing: (adapter name, row indices) pairs; rows in none get the base output."""
        self.merged: list[str] = []
        """Adapters folded into the base weight (applied once, by the weight itself)."""
        self.train(base_layer.training)
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, *,
                    rslora: bool = False, init: str = "kaiming") -> LoraAdapter:
        if name in self.adapters:
            raise InputError(f"adapter {name!r} already exists")
        w = self.base_layer.weight
        adapter = LoraAdapter(self.d, self.k, r, alpha, dropout, rslora=rslora, init=init)
        self.adapters[name] = adapter.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)
        adapter.train(self.training)                 # a model in eval mode stays in eval mode
        return adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.route is not None:
            for name, rows in self.route:                       # rows: (n,) indices into the batch
                if name in self.adapters and name not in self.merged:   # out of place, so autograd sees it
                    h = h.index_add(0, rows, self.adapters[name](x[rows]).to(h.dtype))
            return h
        if self.active is not None and self.active not in self.merged:
            h = h + self.adapters[self.active](x).to(h.dtype)
        return h

    # --- merge / unmerge: fold ΔW into W0 so inference costs nothing extra ------------------------

    def _weight_delta(self, name: str) -> torch.Tensor:
        delta = self.adapters[name].delta_weight().detach()
        delta = delta.T if self.fan_in_fan_out else delta          # Conv1D stores W as (k, d)
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """W0 += ΔW of ``name`` (default: the active adapter). Merging a merged adapter does nothing."""
        name = name or self.active
        if name is None or name in self.merged:
            return
        self.base_layer.weight.add_(self._weight_delta(name))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        """W0 -= ΔW of ``name`` (default: every merged adapter, last first)."""
        names = [name] if name else list(reversed(self.merged))
        for n in names:
            if n in self.merged:
                self.base_layer.weight.sub_(self._weight_delta(n))
                self.merged.remove(n)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={a.r}" for n, a in self.adapters.items())
        return f"d={self.d}, k={self.k}, adapters=[{ranks}], active={self.active!r}, merged={self.merged}"


class RoutedModule(nn.Module):
    """A module that trains in full (a task head, a saved module such as BERT's pooler) with its own tensors
    per adapter, so one batch can run each row through its adapter's copy (a server holding many adapters).

    ``copies[name]`` maps the inner module's parameter and buffer names to that adapter's tensors (as read
    from its file: nothing is copied); the forward runs the inner module's own code on them
    (``torch.func.functional_call``). Rows in no route entry, or routed to an adapter without a copy here, go
    through the inner module as it is. Heads differ in width between adapters (2 classes beside 5): the output
    is as wide as the widest, each row's extra entries -inf, so a softmax over a row's first C is its own.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.copies: dict[str, dict[str, torch.Tensor]] = {}     # a plain dict: not the model's parameters
        self.route: list[tuple[str, torch.Tensor]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return self.inner(x)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        covered = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for name, rows in self.route:
            if name in self.copies:                               # (n, ..., H) -> (n, ..., C_name)
                parts.append((rows, functional_call(self.inner, self.copies[name], (x[rows],), strict=False)))
                covered[rows] = True
        rest = (~covered).nonzero().squeeze(1)
        if rest.numel():
            parts.append((rest, self.inner(x[rest])))
        width = max(y.shape[-1] for _, y in parts)
        first = parts[0][1]
        out = first.new_full((x.shape[0], *first.shape[1:-1], width), float("-inf"))
        for rows, y in parts:
            out[rows, ..., :y.shape[-1]] = y.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"copies={list(self.copies)}"
