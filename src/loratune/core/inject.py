"""Which matrices get adapters, wrapping them, and which parameters train.

Targets are matched exactly as peft's ``target_modules``: a name matches a module whose full
name equals it or ends with ``"." + name`` (so ``dense`` also takes BERT's ``pooler.dense``);
``re:<regex>`` must match the whole module name (peft's string form). Short names q/k/v/o and the
presets ``qv``, ``attention``, ``all-linear`` are resolved from the model's own layer names, so they
work on DistilBERT, BERT/RoBERTa, GPT-2, Llama-style and any model that uses one of those namings (a model
whose linear layers are named q, k, v, o, as T5's, takes those names as they are).

Besides LoRA's A and B, whole modules train: the task head (:func:`head_names`) always, and the modules
the user names in ``--modules-to-save`` (peft's ``modules_to_save``, :func:`saved_modules`), e.g. BERT's
``pooler``. LoRA never goes inside a module that trains in full (as peft), and the adapter file holds
these modules whole.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from loratune.core.lora import LoraLinear, RoutedModule, is_conv1d, linear_shape
from loratune.errors import InputError

log = logging.getLogger(__name__)

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
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")   # transformers' decoder-LM class names
# peft's layers_to_transform rule (no layers_pattern): the first numbered segment after a named one, lazily, so
# T5's "block.1.layer.0" and a mixture of experts' "layers.1.experts.0" are in layer 1, not 0.
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


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
    """Modules besides the task head that train in full (peft's ``modules_to_save``, head names excluded);
    names as targets: a module whose full name equals one or ends with ``"." + name`` (:func:`saved_modules`)."""
    variant: str = "lora"
    """``lora``, or ``dora``: a learned magnitude per output row times the normalised W0 + ΔW."""
    rank_pattern: tuple[tuple[str, int], ...] = ()
    r"""Per-module ranks, peft's ``rank_pattern``: (key, r) pairs; the first key K whose regex
    ``(.*\.)?(K)$`` matches a module's full name gives its rank (:func:`pattern_value`)."""
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    """Per-module alphas, peft's ``alpha_pattern``, matched as ``rank_pattern``."""


def pattern_value(pattern: Sequence[tuple[str, float]], name: str, default: float) -> float:
    r"""peft's ``get_pattern_key``: the value of the first key K for which ``re.match(rf"(.*\.)?({K})$", name)``
    (a plain name matches itself and every module ending in ``"." + name``; a regex, the whole name or a
    dotted tail of it), else ``default``. A leading ``re:`` on a key is loratune's marker, not part of it."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key.removeprefix('re:')})$", name):
            return value
    return default


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


def output_layer_name(model: nn.Module) -> str | None:
    """Full name of the model's output layer (transformers' ``get_output_embeddings()``, e.g. ``lm_head``), or
    None. peft's ``all-linear`` leaves it out, and LoRA never adapts it unless named: it is often tied to the
    input embedding."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if not isinstance(out, nn.Module):
        return None
    return next((n for n, m in model.named_modules() if m is out and n), None)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model is a decoder LM (peft's task_type ``CAUSAL_LM``): no classification head, and a
    ``*ForCausalLM`` / ``*LMHeadModel`` class or an output layer on a generating, decoder-only model (so a
    masked LM or an encoder-decoder is not one)."""
    if head_names(model):
        return False
    if type(model).__name__.endswith(CAUSAL_SUFFIXES):
        return True
    from transformers import GenerationMixin

    return (output_layer_name(model) is not None and isinstance(model, GenerationMixin)
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def within(name: str, modules: Sequence[str]) -> bool:
    """Whether module ``name`` is one of ``modules`` (full names) or lies inside one."""
    return any(name == h or name.startswith(h + ".") for h in modules)


def _module_names(model: nn.Module) -> list[str]:
    """Full names of every module but the root and the insides of LoRA layers, in model order."""
    names: list[str] = []
    wrapped: tuple[str, ...] = ()
    for n, m in model.named_modules():
        if not n or n.startswith(wrapped):
            continue
        names.append(n)
        if isinstance(m, LoraLinear):
            wrapped += (n + ".",)
    return names


def _main_modules(model: nn.Module) -> list[str]:
    """The names a user would pick from: the base model's children and the model's own (the head), with weights."""
    base = getattr(model, "base_model", None)
    base = base if isinstance(base, nn.Module) and base is not model else None
    has_weights = lambda m: next(m.parameters(), None) is not None  # noqa: E731
    names = [n for n, c in base.named_children() if has_weights(c)] if base is not None else []
    return names + [n for n, c in model.named_children() if c is not base and has_weights(c)]


def saved_modules(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Full names of the modules ``names`` (``--modules-to-save``, peft's ``modules_to_save``) in model order.

    A name takes every module whose full name equals it or ends with ``"." + name`` (the rule of
    targets; peft's own test is a plain ``str.endswith``, the same for whole names), the outermost
    ones only. A name of the task head or of a module inside it adds nothing: the head trains in full
    anyway (peft's SEQ_CLS config lists ``classifier`` and ``score`` itself). A name that matches no
    module is an :class:`InputError` that lists the model's main modules.
    """
    heads = head_names(model)
    modules = _module_names(model)
    chosen: set[str] = set()
    for name in names:
        hits = [n for n in modules if _suffix_match(n, name)]
        if not hits:
            main = _main_modules(model)
            listed = ", ".join(n for n in main if n not in heads)
            head = (f"; the task head {' and '.join(heads)} train{'s' if len(heads) == 1 else ''} in full anyway"
                    if heads else "")
            raise InputError(f"--modules-to-save: {name!r} matches no module of {type(model).__name__}; "
                             f"its main modules are {listed}{head}")
        chosen.update(n for n in hits if not within(n, heads))
    out: list[str] = []
    for n in modules:                                     # parents come before their children
        if n in chosen and not within(n, out):
            out.append(n)
    return out


def full_modules(model: nn.Module, modules_to_save: Sequence[str] = ()) -> list[str]:
    """The modules that train in full: the task head (:func:`head_names`) and the saved modules
    (:func:`saved_modules` of ``modules_to_save``); the ``heads`` argument of :func:`trains`."""
    return head_names(model) + saved_modules(model, modules_to_save)


def expand_targets(model: nn.Module, targets: Sequence[str], modules_to_save: Sequence[str] = ()) -> list[str]:
    """Presets and short names -> peft-style target specs (suffixes or one ``re:`` regex).

    ``all-linear`` takes the short names of the linear layers outside the modules that train in full
    (the head and ``modules_to_save``) and other than the output layer (:func:`output_layer_name`), as peft's
    ``all-linear``; a layer whose short name is also the output layer's goes by its full name instead."""
    linears = linear_names(model)
    out: list[str] = []
    for t in targets:
        if t == "all-linear":
            full = full_modules(model, modules_to_save)
            head = output_layer_name(model)
            kept = [n for n in linears if not within(n, full) and n != head]
            clash = set(short_names([head])) if head else set()
            out.extend(n if n.rsplit(".", 1)[-1] in clash else n.rsplit(".", 1)[-1] for n in kept)
            continue
        for short in PRESETS.get(t, (t,)):
            # q/k/v/o name a family's projections, unless the model's linear layers are named so (T5: peft's
            # default targets for it are "q" and "v"): then the name is taken as it is, as peft would.
            if short in ("q", "k", "v", "o") and not any(_suffix_match(n, short) for n in linears):
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


def resolve_targets(model: nn.Module, targets: Sequence[str], layers: Sequence[int] | None = None,
                    modules_to_save: Sequence[str] = ()) -> list[str]:
    """Full names of the linear layers to adapt. Every target must match at least one.

    Layers inside a module that trains in full (the head, ``modules_to_save``) are never adapted, as in peft."""
    model_cls = type(model).__name__
    linears = linear_names(model)
    full = full_modules(model, modules_to_save)
    candidates = [n for n in linears if not within(n, full)]   # these train fully anyway
    chosen: list[str] = []
    for t in expand_targets(model, targets, modules_to_save):
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
            inside = [n for n in linears if within(n, full)
                      and (rx.fullmatch(n) if t.startswith("re:") else _suffix_match(n, t))]
            why = ""
            if inside:
                owner = next(f for f in full if within(inside[0], [f]))
                why = (f" that LoRA may adapt: {inside[0]} lies in {owner}, which trains in full "
                       "(the task head or --modules-to-save)")
            raise InputError(f"target {t.removeprefix('re:')!r} matches no linear layer of {model_cls}{why}; "
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


def inject(model: nn.Module, spec: LoraSpec, name: str = "default", *, strict: bool = True) -> list[str]:
    """Add adapter ``name`` to every targeted layer (wrapping it once), make it active, set trainables.

    Returns the adapted module names. Rank must fit every targeted matrix: r <= min(d, k). The modules
    ``spec.modules_to_save`` train in full and get no LoRA; like the head, they are shared by every
    adapter of the model (one copy, no per-adapter copies as peft keeps), and the trainable set is the
    one of the last adapter injected or loaded.

    ``strict`` (the spec is the user's options): a rank/alpha pattern key that matches no adapted matrix
    is an InputError (a mistyped flag), and so is a rank above min(d, k). A loader passes False, for peft's
    rules on a file, which has neither check: a pattern written for a deeper model, and a converted PiSSA /
    OLoRA adapter, whose rank 2r may exceed min(d, k), load as in peft.
    """
    saved = saved_modules(model, spec.modules_to_save)
    for n, layer in lora_layers(model).items():
        if within(n, saved):
            raise InputError(f"--modules-to-save: {n} already holds LoRA adapters {list(layer.adapters)}; a module "
                             "cannot both train in full and hold LoRA")
    names = resolve_targets(model, spec.targets, spec.layers, spec.modules_to_save)
    for flag, pattern in (("--rank-pattern", spec.rank_pattern), ("--alpha-pattern", spec.alpha_pattern)):
        for key, _ in pattern if strict else ():
            if not any(pattern_value([(key, 1)], n, 0) for n in names):
                raise InputError(f"{flag}: {key!r} matches none of the adapted matrices ({', '.join(short_names(names))})")
    ranks = {n: int(pattern_value(spec.rank_pattern, n, spec.rank)) for n in names}
    for n in names:
        d, k = linear_shape(_unwrapped(model.get_submodule(n)))
        if ranks[n] > min(d, k) and (strict or spec.init in ("pissa", "olora")):   # those take r singular vectors
            flag = "--rank" if ranks[n] == spec.rank else "--rank-pattern"
            raise InputError(f"{flag}: {ranks[n]} is larger than min(d, k) = {min(d, k)} of {n} ({d}x{k})")
    for n in names:
        layer = model.get_submodule(n)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer)
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        layer.add_adapter(name, ranks[n], pattern_value(spec.alpha_pattern, n, spec.alpha), spec.dropout,
                          rslora=spec.rslora, init=spec.init, dora=spec.variant == "dora", bounded=strict)
    set_active(model, name)
    mark_trainable(model, spec.bias, spec.modules_to_save)
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
    """Apply adapter ``name`` to every row (None: the base model alone). Another adapter merged into the base
    weights is unmerged first, with a warning (as peft's ``set_adapter``): else it would stay applied."""
    if name is not None and name not in adapter_names(model):
        raise InputError(f"no adapter named {name!r}; this model has {adapter_names(model)}")
    others = sorted({n for layer in lora_layers(model).values() for n in layer.merged if n != name})
    if others:
        log.warning("adapter %s was merged into the base weights; unmerging it to switch to %s",
                    ", ".join(map(repr, others)), "the base model" if name is None else repr(name))
        for other in others:
            unmerge(model, other)
    for layer in lora_layers(model).values():
        layer.active = name if name in layer.adapters else None
        layer.route = None


def routed_modules(model: nn.Module) -> dict[str, RoutedModule]:
    """Every module with per-adapter copies (:class:`RoutedModule`) by its full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, RoutedModule)}


@contextmanager
def routed(model: nn.Module, per_row: Sequence[str | None]) -> Iterator[None]:
    """Within the block, row i of every batch goes through adapter ``per_row[i]`` (None: no adapter): its LoRA
    matrices and, where it has them, its own copies of the head and saved modules (:class:`RoutedModule`)."""
    layers, copies = lora_layers(model), routed_modules(model)
    known = set(adapter_names(model)).union(*(m.copies for m in copies.values()))
    unknown = {n for n in per_row if n is not None and n not in known}
    if unknown:
        raise InputError(f"no adapter named {sorted(unknown)[0]!r}; this model has {sorted(known)}")
    device = next(model.parameters()).device
    groups = {n: torch.tensor([i for i, m in enumerate(per_row) if m == n], dtype=torch.long, device=device)
              for n in dict.fromkeys(per_row) if n is not None}
    try:
        whole = {n for n in groups if all(m == n for m in per_row)}     # one adapter for every row: no gather
        for layer in layers.values():
            layer.route = [(n, None if n in whole else rows) for n, rows in groups.items() if n in layer.adapters]
        for module in copies.values():
            module.route = [(n, rows) for n, rows in groups.items() if n in module.copies]
        yield
    finally:
        for layer in layers.values():
            layer.route = None
        for module in copies.values():
            module.route = None


def trains(param_name: str, heads: Sequence[str], bias: str = "none") -> bool:
    """The one rule for which parameters train (and so which an adapter file holds): LoRA's A and B of
    every adapter, the modules ``heads`` whole — the task head and the saved modules, :func:`full_modules`
    (:func:`head_names` alone without ``modules_to_save``) — and biases per ``bias`` — ``all``: every bias,
    ``lora_only``: the biases of adapted layers, ``none``: no other. As peft's SEQ_CLS."""
    module = param_name.rpartition(".")[0]
    return (".adapters." in param_name
            or within(module, heads)
            or (bias == "all" and param_name.endswith("bias"))
            or (bias == "lora_only" and param_name.endswith(".base_layer.bias")))


def mark_trainable(model: nn.Module, bias: str = "none", modules_to_save: Sequence[str] = ()) -> None:
    """Unfreeze exactly the parameters :func:`trains` names (the head and ``modules_to_save`` whole); freeze the rest."""
    full = full_modules(model, modules_to_save)
    for pname, p in model.named_parameters():
        p.requires_grad_(trains(pname, full, bias))


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
    """Fold adapter ``name`` (default: each layer's active one) into the base weights.

    A layer whose weight is tied to another module's (an ``lm_head`` named in the targets, tied to the input
    embedding) is an InputError before anything changes: merging would change the embedding too."""
    layers = {n: layer for n, layer in lora_layers(model).items() if name is None or name in layer.adapters}
    weights = {id(layer.base_layer.weight): n for n, layer in layers.items()}
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied = weights.get(id(p))
        if tied is not None and not pname.startswith(tied + "."):
            raise InputError(f"cannot merge the adapter of {tied}: its weight is tied to "
                             f"{pname.removesuffix('.weight')}, which merging would change too; keep the adapter unmerged")
    for layer in layers.values():
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
