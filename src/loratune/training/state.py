"""Where a training run is, as one value: what a checkpoint saves and ``--resume`` puts back.

:class:`TrainState` is the run's position and bookkeeping (plain numbers, lists and tensors); :class:`Optim`
is the live objects an optimizer step changes. A checkpoint is both, as a dict of plain containers and
tensors, so ``torch.load(weights_only=True)`` loads it and a checkpoint can't run code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch
from torch import nn

from loratune.training.options import TrainConfig


@dataclass
class Optim:
    """The live objects an optimizer step changes: the trainable tensors (by parameter name), AdamW, the
    learning-rate schedule and the fp16 loss scaler (disabled, and stateless, in other precisions)."""

    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, model: nn.Module, cfg: TrainConfig, *, total: int, device: torch.device, precision: str) -> Optim:
        """AdamW over ``model``'s trainable tensors (no weight decay on biases and norms, as transformers'
        Trainer), :func:`linear_schedule` over ``total`` steps with ``cfg.warmup`` of them warm-up, and a
        loss scaler that is on for fp16 only."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(param_groups(params, cfg, norm_parameters(model)), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, math.ceil(cfg.warmup * total)))
        return cls(params, opt, sched, torch.amp.GradScaler(device.type, enabled=precision == "fp16"))


def norm_parameters(model: nn.Module) -> set[str]:
    """The names of the parameters of ``model``'s normalisation layers, found by type as transformers' Trainer
    finds them (``nn.LayerNorm``) and by class name (``LlamaRMSNorm``, ``T5LayerNorm``): GPT-2 names its LayerNorms
    ``ln_1``, ``ln_2``, ``ln_f``, which a rule on parameter names alone misses."""
    out = set()
    for mname, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(m).__name__.lower():
            out.update(f"{mname}.{pname}" if mname else pname for pname, _ in m.named_parameters(recurse=False))
    return out


def param_groups(params: dict[str, torch.Tensor], cfg: TrainConfig, norms: set[str] = frozenset()
                 ) -> list[dict[str, Any]]:
    """AdamW's groups: weight decay on all but biases and norms (a name with "norm" in it, or one of ``norms``:
    :func:`norm_parameters`); with LoRA+ (``--loraplus-ratio R``) the B matrices and every other 1-D tensor (biases,
    DoRA's magnitudes: peft's ``create_loraplus_optimizer`` rule) at R × lr, the rest at lr. Empty groups are left
    out; the order is fixed (a checkpoint's groups match)."""
    def no_decay(n: str) -> bool:
        return n.endswith("bias") or "norm" in n.lower() or n in norms

    def fast(n: str, p: torch.Tensor) -> bool:
        return cfg.loraplus_ratio is not None and (".lora_B" in n or p.dim() == 1)

    groups = []
    for quick in (False, True):
        lr = cfg.lr * (cfg.loraplus_ratio or 1.0) if quick else cfg.lr
        for decay in (True, False):
            chosen = [p for n, p in params.items() if fast(n, p) == quick and no_decay(n) != decay]
            if chosen or not quick:                    # without LoRA+ the two groups of old, even if empty
                groups.append({"params": chosen, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": lr})
    return groups


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """The learning rate's factor at a step: linear warm-up from 0 to 1 over ``warmup`` steps, then linear
    decay to 0 at ``total`` (transformers' linear schedule)."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


@dataclass
class TrainState:
    """Everything besides :class:`Optim` that makes a resumed run equal an uninterrupted one."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Epochs finished (evaluated)."""
    next_batch: int = 0
    """The next batch of the current epoch's order (0 at an epoch's start)."""
    rung: int = 0
    """Validation passes done inside the current epoch (``--evals-per-epoch`` above 1; 0 at an epoch's start)."""
    best: float | None = None
    """The best (lowest finite) validation loss so far; None: no epoch evaluated yet."""
    best_epoch: float = 0
    """The epoch (1-based) of ``best``, a decimal when it was a pass inside an epoch (1.25); 0: none yet."""
    bad_epochs: int = 0
    """Validation passes in a row without a new best (early stopping counts these)."""
    stopped_early: bool = False
    """Early stopping fired: no more epochs, even after a resume."""
    collapsed: bool = False
    """The classifier collapsed (loop.collapsed) and the run stopped for it (``stopped_early`` is set too)."""
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The trainable tensors of the best epoch (CPU copies); the run ends on them."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Each epoch's validation metrics with its ``epoch`` and ``step``."""
    seconds: float = 0.0
    """Time spent in optimizer steps (evaluation and checkpoints excluded)."""
    tokens: int = 0
    """Real (non-padding) tokens trained on."""
    samples: int = 0
    """Examples trained on."""
    metrics_bytes: int = 0
    """The length of metrics.jsonl when this state was checkpointed: a resume cuts off lines logged later."""
    baseline: dict[str, dict[str, float]] | None = None
    """Causal LM: the base model's metrics per split before the first step (None: not evaluated yet)."""

    def progress(self, evals_per_epoch: int) -> float | int:
        """Epochs done, with the passes inside the current one as a fraction: 1, or 1.25 (one of four); the
        ``epoch`` of evaluation records, rounded to 4 digits."""
        if not self.rung:
            return self.epoch
        return round(self.epoch + self.rung / evals_per_epoch, 4)

    def to_checkpoint(self, optim: Optim) -> dict[str, Any]:
        """This state, ``optim``'s tensors and states and the torch RNG as one dict of plain containers and
        tensors. The keys are this class's field names plus ``params``, ``optimizer``, ``scheduler``,
        ``scaler`` and ``rng`` (and ``cuda_rng`` where CUDA is in use; the search reads ``epoch`` from a trial's
        checkpoint)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                "params": {n: p.detach().cpu() for n, p in optim.params.items()},
                "optimizer": optim.optimizer.state_dict(), "scheduler": optim.scheduler.state_dict(),
                "scaler": optim.scaler.state_dict(), "rng": torch.get_rng_state(),
                # CUDA's generators too (dropout draws there on a GPU), as transformers' Trainer saves them
                **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_initialized() else {})}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], optim: Optim) -> TrainState:
        """Put a checkpoint's tensors and states back into ``optim`` and the torch RNG; return its state.

        A field a checkpoint lacks (one written before the field existed) takes its default; a checkpoint's
        ``best`` of ``inf`` (older versions' "none yet") works as None does.
        """
        with torch.no_grad():
            for name, t in ckpt["params"].items():
                optim.params[name].copy_(t)
        optim.optimizer.load_state_dict(ckpt["optimizer"])
        optim.scheduler.load_state_dict(ckpt["scheduler"])
        optim.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available() \
                and len(ckpt["cuda_rng"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        return cls(**{f.name: ckpt[f.name] for f in fields(cls) if f.name in ckpt})
