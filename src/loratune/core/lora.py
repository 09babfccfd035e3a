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


INITS = ("kaiming", "gaussian", "pissa", "olora")
"""How A and B start: kaiming / gaussian (A random, B zero: a no-op), or pissa / olora (A and B from W0's
principal singular vectors / its QR, and W0 replaced by the residual, so the output at step 0 is unchanged)."""


@torch.no_grad()
def initial_factors(w: torch.Tensor, init: str, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 (r, k), B0 (d, r)), float32: where a PiSSA / OLoRA adapter starts on W0 = ``w`` (d, k).

    PiSSA: W0 = U·S·Vᵀ, B0 = U_r·√(S_r/s), A0 = √(S_r/s)·V_rᵀ (s the scaling); OLoRA: W0 = Q·R, B0 = Q_r,
    A0 = R_r. Both as peft computes them (torch.linalg on W0 in float32), OLoRA here on W0 as (d, k) for a
    Conv1D too."""
    w = w.float()
    if init == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)          # (d, m), (m,), (m, k)
        root = torch.sqrt(sv[:r] / scaling)
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    if init == "olora":
        q, rr = torch.linalg.qr(w)                                    # (d, m), (m, k)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    raise ValueError(f"no initial factors for init {init!r} (pissa or olora)")


class LoraAdapter(nn.Module):
    """One low-rank update ΔW = scaling·B·A, with the dropout on its input.

    With ``dora`` (DoRA, weight-decomposed LoRA) it also holds a magnitude m (d,), and the layer's weight is
    W = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ with the norm of each output row (peft's ``lora_magnitude_vector``);
    :class:`LoraLinear` applies it. ``init_A`` / ``init_B``: where A and B started when that was not a no-op
    (pissa, olora), to save the adapter against the original W0 (:meth:`initial_delta`)."""

    def __init__(self, d: int, k: int, r: int, alpha: float, dropout: float = 0.0, *,
                 rslora: bool = False, init: str = "kaiming", dora: bool = False, bounded: bool = True) -> None:
        super().__init__()
        # ``bounded``: r <= min(d, k), as a user's --rank must be; an adapter read from a file may exceed it (peft
        # has no bound, and a converted PiSSA / OLoRA adapter has rank 2r), but not a PiSSA / OLoRA start (r vectors).
        if r < 1 or (r > min(d, k) and (bounded or init in ("pissa", "olora"))):
            raise InputError(f"--rank: must be between 1 and min(d, k) = {min(d, k)} for a {d}x{k} matrix, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"--dropout: must be in [0, 1), got {dropout}")
        if init not in INITS:
            raise InputError(f"--init: expected one of {', '.join(INITS)}, got {init!r}")
        self.r, self.alpha, self.rslora, self.init, self.dora = r, float(alpha), rslora, init, dora
        self.scaling = self.alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, k))      # (r, k)
        self.lora_B = nn.Parameter(torch.zeros(d, r))      # (d, r): zeros, so ΔW = 0 at start
        self.lora_magnitude = nn.Parameter(torch.ones(d)) if dora else None   # (d,): set from W0 by LoraLinear
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:                                            # pissa / olora: LoraLinear.add_adapter sets A, B from W0
            nn.init.zeros_(self.lora_A)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling·B·A, shape (d, k), in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def initial_delta(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A0, B0), where A and B started, when that was not a no-op (pissa, olora); else None."""
        return None if self.init_A is None else (self.init_A, self.init_B)

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
        self.route: list[tuple[str, torch.Tensor | None]] | None = None
        """Per-row routing: (adapter name, row indices) pairs; rows in none get the base output."""
        self.merged: list[str] = []
        """Adapters folded into the base weight (applied once, by the weight itself)."""
        self._dora_scale: dict[str, torch.Tensor] = {}
        """g = m / ‖W0 + ΔW‖ of each merged DoRA adapter, as it was at merge time (to unmerge exactly)."""
        self.train(base_layer.training)
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, *,
                    rslora: bool = False, init: str = "kaiming", dora: bool = False,
                    bounded: bool = True) -> LoraAdapter:
        if name in self.adapters:
            raise InputError(f"adapter {name!r} already exists")
        w = self.base_layer.weight
        adapter = LoraAdapter(self.d, self.k, r, alpha, dropout, rslora=rslora, init=init, dora=dora, bounded=bounded)
        self.adapters[name] = adapter.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None)
        adapter.train(self.training)                 # a model in eval mode stays in eval mode
        if init in ("pissa", "olora"):
            self._init_from_weight(adapter, init)
        if dora:
            with torch.no_grad():                    # m starts at ‖W0 + ΔW‖, so W = W0 + ΔW at step 0 (peft)
                adapter.lora_magnitude.copy_(self._weight_norm(adapter))
        return adapter

    def weight(self) -> torch.Tensor:
        """W0 as (d, k), whatever the layer stores (Conv1D keeps (k, d))."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    @torch.no_grad()
    def _init_from_weight(self, adapter: LoraAdapter, init: str) -> None:
        """A and B from W0 (:func:`initial_factors`); W0 becomes W0 − s·B·A, so the layer's output is unchanged.
        Deterministic: a resumed run and a loader recompute the same residual."""
        w = self.weight().float()                                        # (d, k)
        s = adapter.scaling
        a, b = initial_factors(w, init, adapter.r, s)
        adapter.lora_A.copy_(a)
        adapter.lora_B.copy_(b)
        adapter.init_A, adapter.init_B = a.clone().to(adapter.lora_A.dtype), b.clone().to(adapter.lora_B.dtype)
        residual = w - s * (b @ a)
        self.base_layer.weight.copy_((residual.T if self.fan_in_fan_out else residual).to(self.base_layer.weight.dtype))

    def _weight_norm(self, adapter: LoraAdapter) -> torch.Tensor:
        """‖W0 + ΔW‖ of each output row, (d,), detached (DoRA treats it as a constant, as peft: paper §4.3)."""
        with torch.no_grad():
            w = self.weight().to(adapter.lora_A.dtype) + adapter.delta_weight()
            return torch.linalg.norm(w, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        if self.route is not None:
            for name, rows in self.route:                       # rows: (n,) indices into the batch; None: all
                if name in self.adapters and name not in self.merged:   # out of place, so autograd sees it
                    adapter = self.adapters[name]       # DoRA reads the base output; LoRA needs no copy of it
                    if rows is None:
                        h = h + self._update(adapter, x, h).to(h.dtype)
                        continue
                    part = self._update(adapter, x[rows], h[rows] if adapter.dora else h)
                    h = h.index_add(0, rows, part.to(h.dtype))
            return h
        if self.active is not None and self.active not in self.merged:
            h = h + self._update(self.adapters[self.active], x, h).to(h.dtype)
        return h

    def _update(self, adapter: LoraAdapter, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output ``h`` = W0·x + b.

        LoRA: s·B·A·dropout(x). DoRA (peft's formula, with g = m / ‖W0 + ΔW‖ detached, per output row):
        (g − 1)·W0·x' + g·s·B·A·x', where x' = dropout(x) and W0·x = h − b when there is no dropout."""
        if not adapter.dora:
            return adapter(x)
        g = adapter.lora_magnitude / self._weight_norm(adapter)             # (d,)
        if isinstance(adapter.dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = h if bias is None else h - bias
        else:
            x = adapter.dropout(x)
            base = F.linear(x, self.weight().to(x.dtype))
        lora = F.linear(F.linear(x, adapter.lora_A), adapter.lora_B) * adapter.scaling
        return (g - 1) * base + g * lora

    # --- merge / unmerge: fold ΔW into W0 so inference costs nothing extra ------------------------

    def _weight_delta(self, name: str) -> torch.Tensor:
        delta = self.adapters[name].delta_weight().detach()
        delta = delta.T if self.fan_in_fan_out else delta          # Conv1D stores W as (k, d)
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """W0 += ΔW of ``name`` (default: the active adapter); DoRA: W0 = g ⊙ (W0 + ΔW), g = m / ‖W0 + ΔW‖ per
        output row (kept for unmerge). Merging a merged adapter does nothing."""
        name = name or self.active
        if name is None or name in self.merged:
            return
        adapter = self.adapters[name]
        if adapter.dora:
            g = (adapter.lora_magnitude / self._weight_norm(adapter)).detach()
            self._dora_scale[name] = g
            w = self.base_layer.weight
            scale = g[None, :] if self.fan_in_fan_out else g[:, None]
            w.copy_(((w + self._weight_delta(name)) * scale.to(w.dtype)))
        else:
            self.base_layer.weight.add_(self._weight_delta(name))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, name: str | None = None) -> None:
        """W0 -= ΔW of ``name`` (default: every merged adapter, last first); DoRA: W0 = W / g − ΔW."""
        names = [name] if name else list(reversed(self.merged))
        for n in names:
            if n in self.merged:
                w = self.base_layer.weight
                if n in self._dora_scale:
                    g = self._dora_scale.pop(n)
                    scale = g[None, :] if self.fan_in_fan_out else g[:, None]
                    w.div_(scale.to(w.dtype))
                w.sub_(self._weight_delta(n))
                self.merged.remove(n)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={a.r}{', dora' if a.dora else ''}" for n, a in self.adapters.items())
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
