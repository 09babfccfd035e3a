"""Which matrices get adapters, wrapping them, and which parameters train.

Targets are matched exactly as peft's ``target_modules``: a name matches a module whose full
name equals it or ends with ``"." + name`` (so ``dense`` also takes BERT's ``pooler.dense``);
``re:<regex>`` must match the whole module name (peft's string form). Short names q/k/v/o and the
presets ``qv``, ``attention``, ``all-linear`` are resolved from the model's own layer names, so they
work on DistilBERT, BERT/RoBERTa, GPT-2, Llama-style and any model that uses one of those namings.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from loratune.core.lora import LoraLinear, is_conv1d, linear_shape
from loratune.errors import InputError

# Attention projection names by naming family: (q, k, v, o). The first family whose q and v
# names occur among the model's linear layers wins.
FAMILIES: list[tuple[str, str, str, str]] = [
    ("q_lin", "k_lin", "v_lin", "out_lin"),                          # DistilBERT
    ("query", "key", "value", "attention.output.dense"),             # BERT, RoBERTa, ELECTRA, ...
    ("query_proj", "key_proj", "value_proj", "attention.output.dense"),  # DeBERTa-v2
    ("q_proj", "k_proj", "v_proj", "o_proj"),                        # Llama, Mistral, Qwen, ...
    ("q_proj", "k_proj", "v_proj", "out_proj"),                      # BART, OPT
    ("c_attn", "c_attn", "c_attn", "attn.c_proj"),                   # GPT-2 (fused q,k,v)
]
PRESETS = {"qv": ("q", "v"), "attention": ("q", "k", "v", "o")}
HEAD_SUFFIXES = ("classifier", "score")   # peft's SEQ_CLS modules_to_save, matched by str.endswith
_LAYER_INDEX = re.compile(r".*\.[^.]*\.(\d+)\.")  # peft's layers_to_transform rule (no layers_pattern)


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how: the LoRA part of a training config."""

    targets: tuple[str, ...] = ("qv",)
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    layers: tuple[int, ...] | None = None
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    """Modules besides the task head that train in full (peft's ``modules_to_save``, head names excluded)."""


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or GPT-2's ``Conv1D``: the layers LoRA can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_names(model: nn.Module) -> list[str]:
    """Full names of all linear layers (``nn.Linear``, ``Conv1D``, or one already wrapped), in model order."""
    names: list[str] = []
    wrapped: list[str] = []
    for n, m in model.named_modules():
        if isinstance(m, LoraLinear):
            wrapped.append(n + ".")
            names.append(n)
        elif n and is_linear(m) and not n.startswith(tuple(wrapped)):
            names.append(n)
    return names


def short_names(names: Sequence[str]) -> list[str]:
    """Distinct last components, in first-seen order: the names a user would type."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))


def head_names(model: nn.Module) -> list[str]:
    """The task head peft's SEQ_CLS trains fully: outermost modules named ``*classifier`` / ``*score``."""
    heads: list[str] = []
    for name, _ in model.named_modules():
        if name and name.endswith(HEAD_SUFFIXES) and not any(name.startswith(h + ".") for h in heads):
            heads.append(name)
    return heads


def _in_head(name: str, heads: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def expand_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Presets and short names -> peft-style target specs (suffixes or one ``re:`` regex)."""
    linears = linear_names(model)
    out: list[str] = []
    for t in targets:
        if t == "all-linear":
            heads = head_names(model)
            out.extend(short for short in short_names([n for n in linears if not _in_head(n, heads)]))
            continue
        for short in PRESETS.get(t, (t,)):
            if short in ("q", "k", "v", "o"):
                out.append(_family(model, linears)["qkvo".index(short)])
            else:
                out.append(short)
    return list(dict.fromkeys(out))


def _family(model: nn.Module, linears: list[str]) -> tuple[str, str, str, str]:
    for fam in FAMILIES:
        q, v, o = fam[0], fam[2], fam[3]
        if any(_suffix_match(n, q) for n in linears) and any(_suffix_match(n, v) for n in linears) \
                and any(_suffix_match(n, o) for n in linears):
            return fam
    raise InputError(
        f"--targets: short names q/k/v/o and the presets qv/attention need a known attention naming, and "
        f"{type(model).__name__} has none; name its linear layers instead: {', '.join(short_names(linears))}")


def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, targets: Sequence[str], layers: Sequence[int] | None = None) -> list[str]:
    """Full names of the linear layers to adapt. Every target must match at least one."""
    model_cls = type(model).__name__
    linears = linear_names(model)
    heads = head_names(model)
    candidates = [n for n in linears if not _in_head(n, heads)]   # the head trains fully anyway
    chosen: list[str] = []
    for t in expand_targets(model, targets):
        if t.startswith("re:"):
            try:
                rx = re.compile(t[3:])
            except re.error as e:
                raise InputError(f"--targets: bad regex {t[3:]!r}: {e}") from None
            hits = [n for n in candidates if rx.fullmatch(n)]
        else:
            hits = [n for n in candidates if _suffix_match(n, t)]
            bad = [n for n, m in model.named_modules() if n and _suffix_match(n, t) and not is_linear(m)]
            if bad and not hits:
                m = model.get_submodule(bad[0])
                raise InputError(f"--targets: {t!r} matches {bad[0]}, a {type(m).__name__}, not a linear layer "
                                 f"of {model_cls}; its linear layers are {', '.join(short_names(linears))}")
        if not hits:
            raise InputError(f"target {t.removeprefix('re:')!r} matches no linear layer of {model_cls}; "
                             f"its linear layers are {', '.join(short_names(linears))}")
        chosen.extend(hits)
    chosen = [n for n in linears if n in set(chosen)]                  # model order, no duplicates
    if layers is not None:
        def layer_of(n: str) -> int | None:
            m = _LAYER_INDEX.match(n)
            return int(m.group(1)) if m else None
        kept = [n for n in chosen if layer_of(n) in set(layers)]
        if not kept:
            found = sorted({i for i in map(layer_of, chosen) if i is not None})
            raise InputError(f"--layers: no targeted layer has index in {list(layers)}; "
                             f"the targeted layers of {model_cls} have indices {found}")
        chosen = kept
    return chosen


def inject(model: nn.Module, spec: LoraSpec, name: str = "default") -> list[str]:
    """Add adapter ``name`` to every targeted layer (wrapping it once), make it active, set trainables.

    Returns the adapted module names. Rank must fit every targeted matrix: r <= min(d, k).
    """
    names = resolve_targets(model, spec.targets, spec.layers)
    for n in names:
        d, k = linear_shape(_unwrapped(model.get_submodule(n)))
        if spec.rank > min(d, k):
            raise InputError(f"--rank: {spec.rank} is larger than min(d, k) = {min(d, k)} of {n} ({d}x{k})")
    for n in names:
        layer = model.get_submodule(n)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        layer.add_adapter(name, spec.rank, spec.alpha, spec.dropout, rslora=spec.rslora, init=spec.init)
    set_active(model, name)
    mark_trainable(model, spec.bias)
    return names


def _unwrapped(layer: nn.Module) -> nn.Module:
    return layer.base_layer if isinstance(layer, LoraLinear) else layer


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every wrapped layer by its full module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters any layer holds, in the order they were added."""
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def set_active(model: nn.Module, name: str | None) -> None:
    """Apply adapter ``name`` to every row (None: the base model alone)."""
    if name is not None and name not in adapter_names(model):
        raise InputError(f"no adapter named {name!r}; this model has {adapter_names(model)}")
    for layer in lora_layers(model).values():
        layer.active = name if name in layer.adapters else None
        layer.route = None


@contextmanager
def routed(model: nn.Module, per_row: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row i of every batch goes through adapter ``per_row[i]`` (None: no adapter)."""
    known = set(adapter_names(model))
    unknown = {n for n in per_row if n is not None and n not in known}
    if unknown:
        raise InputError(f"no adapter named {sorted(unknown)[0]!r}; this model has {sorted(known)}")
    layers = lora_layers(model)
    device = next(iter(layers.values())).base_layer.weight.device if layers else None
    groups = {n: torch.tensor([i for i, m in enumerate(per_row) if m == n], dtype=torch.long, device=device)
              for n in dict.fromkeys(per_row) if n is not None}
    try:
        for layer in layers.values():
            layer.route = [(n, rows) for n, rows in groups.items() if n in layer.adapters]
        yield
    finally:
        for layer in layers.values():
            layer.route = None


def trains(param_name: str, heads: Sequence[str], bias: str = "none") -> bool:
    """The one rule for which parameters train (and so which an adapter file holds): LoRA's A and B of
    every adapter, the task head ``heads`` (:func:`head_names`) whole, and biases per ``bias`` — ``all``:
    every bias, ``lora_only``: the biases of adapted layers, ``none``: no other. As peft's SEQ_CLS."""
    module = param_name.rpartition(".")[0]
    return (".adapters." in param_name
            or _in_head(module, heads)
            or (bias == "all" and param_name.endswith("bias"))
            or (bias == "lora_only" and param_name.endswith(".base_layer.bias")))


def mark_trainable(model: nn.Module, bias: str = "none") -> None:
    """Unfreeze exactly the parameters :func:`trains` names; freeze the rest."""
    heads = head_names(model)
    for pname, p in model.named_parameters():
        p.requires_grad_(trains(pname, heads, bias))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def report_line(model: nn.Module) -> str:
    """peft's ``print_trainable_parameters`` line."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


@torch.no_grad()
def merge(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter ``name`` (default: each layer's active one) into the base weights."""
    for layer in lora_layers(model).values():
        if name is None or name in layer.adapters:
            layer.merge(name)


@torch.no_grad()
def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Subtract what :func:`merge` folded in: adapter ``name``, or every merged adapter, last first."""
    for layer in lora_layers(model).values():
        layer.unmerge(name)


@torch.no_grad()
def merge_and_unload(model: nn.Module, name: str | None = None) -> nn.Module:
    """Merge, then put the plain base layers back: a model with no LoRA modules left (no added latency)."""
    merge(model, name)
    for n, layer in list(lora_layers(model).items()):
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return model
