"""Many adapters on one frozen base, each row of a batch through its own (a server's model).

:func:`add_routed_adapter` loads an adapter folder beside the others: its LoRA matrices go into the wrapped
layers under its name (:class:`loratune.core.lora.LoraLinear` routes them per row), and what it trains in
full — the task head and its ``modules_to_save`` — becomes that adapter's copy in a
:class:`loratune.core.lora.RoutedModule` wrapped around the shared module, instead of overwriting the one
module every adapter shares (what :func:`loratune.core.adapters.load_adapter` does). Heads may differ in
width: each adapter keeps its own label set. :func:`loratune.core.inject.routed` then says which row goes
where. Adapters that cannot be routed per row are refused here, with the reason: one that trains biases
(``bias`` other than ``none``; a bias is one shared tensor of the base) and one whose LoRA would sit inside a
module another adapter saves whole (or the reverse).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from loratune.core.adapters import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    _model_param_name,
    lora_tensors,
    read_adapter_config,
    read_weights,
)
from loratune.core.inject import (
    LoraSpec,
    head_names,
    inject,
    lora_layers,
    resolve_targets,
    routed_modules,
    saved_modules,
    set_active,
    within,
)
from loratune.core.lora import RoutedModule
from loratune.errors import InputError


@torch.no_grad()
def add_routed_adapter(model: nn.Module, adapter_dir: str | os.PathLike, name: str) -> LoraSpec:
    """Load adapter ``name`` from ``adapter_dir`` beside the model's other adapters, for per-row routing.

    Checks everything before changing the model (a refused adapter leaves it as it was): the config
    (:func:`read_adapter_config`), that every LoRA target lies outside the modules other adapters save whole
    and none of its saved modules holds another adapter's LoRA, and that the file holds exactly the LoRA
    matrices, the head and the saved modules, with the model's shapes (a head may differ in its class count).
    """
    cfg_path, wpath = Path(adapter_dir) / CONFIG_NAME, Path(adapter_dir) / WEIGHTS_NAME
    spec, raw = read_adapter_config(adapter_dir)
    if raw.get("task_type") == "CAUSAL_LM" and head_names(model):
        raise InputError(f"{cfg_path}: a CAUSAL_LM adapter (it writes text) cannot go on "
                         f"{type(model).__name__}, a classifier")
    if spec.bias != "none":
        raise InputError(f"{cfg_path}: bias={spec.bias!r}: this adapter trained biases of the base model, which "
                         "every adapter on it shares, so it cannot be routed per row; serve it alone, merged (--merge)")
    if spec.init in ("pissa", "olora"):
        raise InputError(f"{cfg_path}: init_lora_weights={spec.init!r}: this adapter applies to a residual of W0 "
                         "that its loader computes by changing the shared base; save it converted (peft's "
                         "path_initial_model_for_weight_conversion, as loratune saves its own) or serve it alone, "
                         "merged (--merge)")
    if any(name in layer.adapters for layer in lora_layers(model).values()) or \
            any(name in m.copies for m in routed_modules(model).values()):
        raise InputError(f"an adapter named {name!r} is already loaded")
    weights = read_weights(adapter_dir)
    copied = routed_modules(model)
    try:
        targets = resolve_targets(model, spec.targets, spec.layers, spec.modules_to_save)
    except InputError as e:
        raise InputError(f"{cfg_path}: does not fit {type(model).__name__}: {e}") from None
    inside = [t for t in targets if within(t, list(copied))]
    if inside:
        owner = next(n for n in copied if within(inside[0], [n]))
        raise InputError(f"{cfg_path}: puts LoRA on {inside[0]}, inside {owner}, which adapter "
                         f"{next(iter(copied[owner].copies), '?')} trains in full; they cannot share one base")
    heads = head_names(model)
    saved = saved_modules(model, spec.modules_to_save)
    for n, layer in lora_layers(model).items():
        if within(n, saved) and layer.adapters:
            raise InputError(f"{cfg_path}: saves {n.rpartition('.')[0] or n} whole, where adapter "
                             f"{next(iter(layer.adapters))} has LoRA; they cannot share one base")
    copies = _module_tensors(model, weights, targets, heads + saved, wpath)
    grads = {id(p): p.requires_grad for p in model.parameters()}
    active = {n: layer.active for n, layer in lora_layers(model).items()}
    inject(model, spec, name, strict=False)               # peft's rules for a file, as load_adapter
    try:
        for path in targets:
            layer = lora_layers(model)[path]
            for key, param in lora_tensors(path, layer.adapters[name]).items():
                if key not in weights:
                    raise InputError(f"{wpath}: tensor {key!r} is missing")
                if tuple(weights[key].shape) != tuple(param.shape):
                    raise InputError(f"{wpath}: {key} has shape {list(weights[key].shape)} but the model's is "
                                     f"{list(param.shape)} (an adapter for another base model?)")
                if not torch.isfinite(weights[key]).all():
                    raise InputError(f"{wpath}: {key} holds NaN or infinite values")
                param.copy_(weights[key])
                param.requires_grad_(False)
    except Exception:
        remove_routed_adapter(model, name)          # unwraps the layers inject wrapped for it alone
        for p in model.parameters():                # inject marked the head and every adapter trainable
            p.requires_grad_(grads.get(id(p), False))
        for n, layer in lora_layers(model).items():
            layer.active = active.get(n)
        raise
    for path, tensors in copies.items():
        module = model.get_submodule(path)
        if not isinstance(module, RoutedModule):
            module = RoutedModule(module)
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        device = next(module.inner.parameters()).device
        # Own copies: the file's tensors are views of its memory map, which would stay resident whole.
        module.copies[name] = {k: v.to(device, copy=True) for k, v in tensors.items()}
    set_active(model, None)                       # rows go where ``routed`` says, never to a default adapter
    for p in model.parameters():
        p.requires_grad_(False)
    return spec


def _module_tensors(model: nn.Module, weights: dict[str, torch.Tensor], targets: list[str], modules: list[str],
                    wpath: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors of each module that trains in full, by the inner module's own names
    (``bert.pooler.dense.weight`` -> ``{"bert.pooler": {"dense.weight": ...}}``); each module whole, each
    shape the model's but a head's class count."""
    lora = {f"{PREFIX}{t}.lora_{p}.weight" for t in targets for p in "AB"} | \
        {f"{PREFIX}{t}.lora_magnitude_vector" for t in targets}
    heads = set(head_names(model))
    out: dict[str, dict[str, torch.Tensor]] = {m: {} for m in modules}
    for key, tensor in weights.items():
        if key in lora:
            continue
        pname = _model_param_name(key)
        owner = next((m for m in modules if pname.startswith(m + ".")), None)
        if owner is None:
            raise InputError(f"{wpath}: tensor {key!r} is neither a LoRA matrix of a target nor part of the head "
                             f"or modules_to_save ({', '.join(modules)}); an adapter for another model?")
        if not torch.isfinite(tensor).all():
            raise InputError(f"{wpath}: {key} holds NaN or infinite values")
        out[owner][pname[len(owner) + 1:]] = tensor
    for owner, tensors in out.items():
        module = model.get_submodule(owner)
        inner = module.inner if isinstance(module, RoutedModule) else module
        own = dict(inner.state_dict(keep_vars=True))
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            what = f"{owner}.{(missing or extra)[0]}"
            raise InputError(f"{wpath}: {'missing' if missing else 'unexpected'} tensor {PREFIX}{what} "
                             f"({owner} is stored whole: {', '.join(sorted(own))})")
        for k, v in tensors.items():
            want = tuple(own[k].shape)
            # A head's tensors may differ only in the class count: the rows of its output layer.
            ok = tuple(v.shape) == want or (owner in heads and v.dim() == len(want) and tuple(v.shape[1:]) == want[1:])
            if not ok:
                raise InputError(f"{wpath}: {PREFIX}{owner}.{k} has shape {list(v.shape)} but the model's is "
                                 f"{list(want)} (an adapter for another base model?)")
            if v.dtype != own[k].dtype and v.is_floating_point():
                tensors[k] = v.to(own[k].dtype)
    return {m: t for m, t in out.items() if t}


@torch.no_grad()
def remove_routed_adapter(model: nn.Module, name: str) -> None:
    """Drop adapter ``name``'s LoRA matrices and module copies; a wrapper left empty is replaced by the module
    it wrapped, so the model is as it was without the adapter (an empty wrapper would rename what it holds,
    ``bert.pooler`` -> ``bert.pooler.inner``, and make a later adapter's LoRA there, or its saved copy of a
    layer that had LoRA, a refused clash with no adapter left)."""
    for path, layer in lora_layers(model).items():
        if name in layer.adapters:
            del layer.adapters[name]
            if layer.active == name:
                layer.active = None
        if not layer.adapters and not layer.merged:
            _replace(model, path, layer.base_layer)
    for path, module in routed_modules(model).items():
        module.copies.pop(name, None)
        if not module.copies:
            _replace(model, path, module.inner)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
