"""Adapter files in PEFT's format: save, load (validated, never unpickled), merge-and-export.

A folder holds ``adapter_config.json`` (peft's LoraConfig fields), ``adapter_model.safetensors``
(peft's key names: ``base_model.model.<module>.lora_A.weight``, the task head as
``base_model.model.classifier.weight``, a module of ``modules_to_save`` whole under its own names, e.g.
``base_model.model.bert.pooler.dense.weight``) and, from loratune, ``loratune.json`` with the label
names and the base model we trained on. peft loads the first two as its own; we load peft's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loratune import __version__
from loratune.core.inject import (
    HEAD_SUFFIXES,
    LoraSpec,
    _unwrapped,
    full_modules,
    head_names,
    inject,
    is_causal_lm,
    lora_layers,
    mark_trainable,
    resolve_targets,
    saved_modules,
    trains,
    within,
)
from loratune.errors import InputError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "loratune.json"
PREFIX = "base_model.model."
# adapter_config.json fields we read, and peft's other fields with the values that leave plain LoRA
# unchanged (peft 0.21 defaults). Any other value of these is refused, not silently dropped; a field
# we have never heard of is accepted only at an empty value (a newer peft's default).
_READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "bias", "target_modules", "layers_to_transform",
         "init_lora_weights", "use_rslora", "use_dora", "lora_bias", "rank_pattern", "alpha_pattern",
         "base_model_name_or_path", "modules_to_save", "fan_in_fan_out"}
_FREE = {"auto_mapping", "inference_mode", "peft_version", "revision", "task_type", "megatron_core", "qalora_group_size",
         "eva_config"}                                    # how EVA chose A's start: nothing a loader needs
_NEUTRAL: dict[str, Any] = {
    "alora_invocation_tokens": None, "arrow_config": None, "corda_config": None, "ensure_weight_tying": False,
    "exclude_modules": None, "kasa_config": None, "layer_replication": None,
    "layers_pattern": None, "loftq_config": {}, "lora_ga_config": None, "megatron_config": None,
    "monteclora_config": None, "target_parameters": None, "trainable_token_indices": None, "use_bdlora": None,
    "use_qalora": False, "velora_config": None}


KEEPS_W0 = ("orthogonal", "eva")
"""peft initialisations that leave the base weights as they are (only A and B's start differs): their trained
adapters load as any other. pissa_niter_*, corda and loftq change W0 from a random SVD, data or quantisation."""


def peft_targets(targets: Sequence[str]) -> str | list[str]:
    """``target_modules`` as peft reads it: a list of names (each matching a module named so or ending in
    ``"." + name``), or, when any target is a ``re:`` pattern, one regex that peft matches against whole module
    names: the patterns and the names (as ``(?:.*\\.)?name``) joined by ``|``, so peft adapts what loratune did."""
    patterns = [t[3:] for t in targets if t.startswith("re:")]
    if not patterns:
        return list(targets)
    if len(targets) == 1:
        return patterns[0]
    return "|".join(f"(?:{t[3:]})" if t.startswith("re:") else rf"(?:(?:.*\.)?{re.escape(t)})" for t in targets)


def peft_config(spec: LoraSpec, targets: list[str], *, base_model: str | None, fan_in_fan_out: bool,
                has_head: bool, causal: bool = False) -> dict[str, Any]:
    """The ``adapter_config.json`` peft 0.21 writes for the same LoraConfig (fields we don't use at defaults).

    ``task_type``: ``SEQ_CLS`` with a classification head, else ``CAUSAL_LM`` for a decoder LM (``causal``, so
    peft loads it as a PeftModelForCausalLM), else null. ``modules_to_save`` as peft's SEQ_CLS writes it: the
    user's names, then ``classifier`` and ``score``; without a head, the user's names or null."""
    # PiSSA / OLoRA changed W0; the file is converted to apply to the original W0 (adapter_state): rank 2r, and α
    # doubled (×√2 with rsLoRA) so that the scaling stays — peft's path_initial_model_for_weight_conversion.
    converted = spec.init in ("pissa", "olora")
    grow = (math.sqrt(2) if spec.rslora else 2) if converted else 1
    rank_x = 2 if converted else 1
    return {
        "alpha_pattern": {k.removeprefix("re:"): v * grow for k, v in spec.alpha_pattern},
        "auto_mapping": None, "base_model_name_or_path": base_model,
        "bias": spec.bias, "exclude_modules": None, "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
        "init_lora_weights": "gaussian" if spec.init == "gaussian" else True,
        "layer_replication": None, "layers_pattern": None,
        "layers_to_transform": list(spec.layers) if spec.layers is not None else None,
        "loftq_config": {}, "lora_alpha": spec.alpha * grow, "lora_bias": False, "lora_dropout": spec.dropout,
        "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": ([*spec.modules_to_save, *HEAD_SUFFIXES] if has_head
                            else list(spec.modules_to_save) or None),
        "peft_type": "LORA", "r": spec.rank * rank_x,
        "rank_pattern": {k.removeprefix("re:"): v * rank_x for k, v in spec.rank_pattern}, "revision": None,
        "target_modules": peft_targets(targets),
        "task_type": "SEQ_CLS" if has_head else "CAUSAL_LM" if causal else None,
        "use_dora": spec.variant == "dora", "use_rslora": spec.rslora,
    }


def adapter_state(model: nn.Module, name: str = "default", bias: str = "none",
                  modules_to_save: tuple[str, ...] | list[str] = ()) -> dict[str, torch.Tensor]:
    """peft-named CPU tensors of what trains (:func:`loratune.core.inject.trains`): LoRA A/B of adapter
    ``name`` (``<module>.adapters.<name>.lora_A`` -> ``base_model.model.<module>.lora_A.weight``), the task
    head, the modules ``modules_to_save`` and the trained biases (``base_model.model.<parameter name>``),
    plus the persistent buffers of the head and saved modules (a BatchNorm's running statistics), as peft."""
    full = full_modules(model, modules_to_save)
    out: dict[str, torch.Tensor] = {}
    for bname, b in _buffers(model, full).items():
        out[PREFIX + bname] = b
    for pname, p in model.named_parameters():
        if not trains(pname, full, bias):
            continue
        module, lora, rest = pname.partition(".adapters.")
        if not lora:
            out[PREFIX + pname] = p
        elif rest == f"{name}.lora_magnitude":              # DoRA's m: peft's key has no ".weight"
            out[f"{PREFIX}{module}.lora_magnitude_vector"] = p
        elif rest.startswith(name + "."):                  # rest: "<adapter name>.lora_A"
            out[f"{PREFIX}{module}.{rest.removeprefix(name + '.')}.weight"] = p
    for module, layer in lora_layers(model).items():
        start = layer.adapters[name].initial_delta() if name in layer.adapters else None
        if start is not None:
            # W0 was replaced by W0 − s·B0·A0: [A; A0] and [B, −B0] (rank 2r, same scaling) give
            # s·(B·A − B0·A0), which on the original W0 is what the trained layer computes.
            a0, b0 = start
            key = f"{PREFIX}{module}.lora_"
            out[key + "A.weight"] = torch.cat([out[key + "A.weight"].detach(), a0], dim=0)
            out[key + "B.weight"] = torch.cat([out[key + "B.weight"].detach(), -b0], dim=1)
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _buffers(model: nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """The persistent buffers (those in a state dict) of ``modules`` and everything inside them, by full name."""
    out: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        if mname and within(mname, modules):
            for bname, b in m._buffers.items():
                if b is not None and bname not in m._non_persistent_buffers_set:
                    out[f"{mname}.{bname}"] = b
    return out


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, spec: LoraSpec, targets: list[str], *,
                 name: str = "default", base_model: str | None = None,
                 meta: dict[str, Any] | None = None) -> Path:
    """Write the adapter folder atomically: a temp folder beside it, renamed into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    layers = [m for m in lora_layers(model).values() if name in m.adapters]
    if not layers:
        raise ValueError(f"model has no adapter named {name!r}")
    cfg = peft_config(spec, targets, base_model=base_model, fan_in_fan_out=layers[0].fan_in_fan_out,
                      has_head=bool(head_names(model)), causal=is_causal_lm(model))
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(adapter_state(model, name, spec.bias, spec.modules_to_save), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / META_NAME).write_text(json.dumps({"loratune_version": __version__, **(meta or {})}, indent=2) + "\n")
        publish_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def publish_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` (a ``mkdtemp`` beside ``out``) in place of ``out``: the umask's usual
    permissions (mkdtemp and safetensors make things private), then renames, so a reader or a crash sees the
    old folder or the new one, never half of either. Every folder loratune writes whole goes through here."""
    mask = os.umask(0)
    os.umask(mask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~mask)
    tmp.chmod(0o777 & ~mask)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --- loading ------------------------------------------------------------------------------------

def _inside(adapter_dir: str | os.PathLike, name: str) -> Path:
    """``adapter_dir/name`` as a regular file that really lies in the folder (no link out of it)."""
    d = Path(adapter_dir)
    path = d / name
    if path.is_symlink() and path.resolve().parent != d.resolve():
        raise InputError(f"{path}: a link that leads out of the adapter folder; refusing to read it")
    if path.exists() and not path.is_file():
        raise InputError(f"{path}: not a file")
    return path


def _json_object(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_adapter_config(adapter_dir: str | os.PathLike) -> tuple[LoraSpec, dict[str, Any]]:
    """Validate ``adapter_config.json`` field by field; return the spec and the raw dict."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise InputError(f"--adapter: {d} is not a folder" if d.exists() else f"--adapter: {d} does not exist")
    path = _inside(d, CONFIG_NAME)
    if not path.is_file():
        raise InputError(f"{path}: missing (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    raw = _json_object(path)

    def field(key: str, types: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in raw or raw[key] is None:
            if required:
                raise InputError(f"{path}: field {key!r} is missing")
            return default
        v = raw[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
            raise InputError(f"{path}: field {key!r} has the wrong type: {v!r}")
        return v

    for key, value in raw.items():
        if key in _READ or key in _FREE:
            continue
        if key in _NEUTRAL and value != _NEUTRAL[key] and value not in (None, False, {}, []):
            raise InputError(f"{path}: field {key!r} = {json.dumps(value)[:60]} is not supported by loratune")
        if key not in _NEUTRAL and value not in (None, False, {}, [], ""):
            raise InputError(f"{path}: unknown field {key!r} = {json.dumps(value)[:60]}")
    peft_type = field("peft_type", str, required=True)
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type {peft_type!r} is not supported (only LORA)")
    r = field("r", int, required=True)
    if r < 1:
        raise InputError(f"{path}: field 'r' must be >= 1, got {r}")
    alpha = field("lora_alpha", (int, float), default=8)
    if not math.isfinite(alpha) or alpha <= 0:
        raise InputError(f"{path}: field 'lora_alpha' must be > 0, got {alpha}")
    dropout = field("lora_dropout", (int, float), default=0.0)
    if not 0 <= dropout < 1:
        raise InputError(f"{path}: field 'lora_dropout' must be in [0, 1), got {dropout}")
    bias = field("bias", str, default="none")
    if bias not in ("none", "all", "lora_only"):
        raise InputError(f"{path}: field 'bias' must be none, all or lora_only, got {bias!r}")
    if field("lora_bias", bool, default=False):
        raise InputError(f"{path}: lora_bias=true is not supported by loratune")
    dora = field("use_dora", bool, default=False)
    patterns = {key: _pattern(path, key, field(key, dict, default={})) for key in ("rank_pattern", "alpha_pattern")}
    targets = field("target_modules", (list, str), required=True)
    if isinstance(targets, str):
        targets = ["re:" + targets]
    elif not targets or not all(isinstance(t, str) and t for t in targets):
        raise InputError(f"{path}: field 'target_modules' must be a non-empty list of names")
    layers = field("layers_to_transform", (list, int), default=None)
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
        raise InputError(f"{path}: field 'layers_to_transform' must be a list of layer indices >= 0")
    init = field("init_lora_weights", (bool, str), default=True)
    if init is False or init in KEEPS_W0:          # A and B's start only: the trained tensors are what loads
        init = True
    if isinstance(init, str) and init not in ("gaussian", "pissa", "olora"):
        raise InputError(f"{path}: init_lora_weights={json.dumps(init)} is not supported by loratune (true, false, "
                         f"gaussian, {', '.join(KEEPS_W0)}, pissa or olora: {json.dumps(init)} changes the base "
                         "weights in a way a loader cannot recompute)")
    rslora = field("use_rslora", bool, default=False)
    field("base_model_name_or_path", str)
    saved = field("modules_to_save", list, default=[])
    if not all(isinstance(m, str) and m for m in saved):
        raise InputError(f"{path}: field 'modules_to_save' must be a list of module names or null, got "
                         f"{json.dumps(saved)[:60]}")
    spec = LoraSpec(targets=tuple(targets), rank=r, alpha=float(alpha), dropout=float(dropout), rslora=rslora,
                    init=init if isinstance(init, str) else "kaiming",
                    layers=tuple(layers) if layers is not None else None, bias=bias,
                    modules_to_save=tuple(dict.fromkeys(m for m in saved if m not in HEAD_SUFFIXES)),
                    variant="dora" if dora else "lora", rank_pattern=tuple((k, int(v)) for k, v in patterns["rank_pattern"]),
                    alpha_pattern=tuple((k, float(v)) for k, v in patterns["alpha_pattern"]))
    return spec, raw


def _pattern(path: Path, key: str, value: dict[str, Any]) -> list[tuple[str, float]]:
    """A ``rank_pattern`` / ``alpha_pattern`` object: regex keys (peft's), positive numbers (ranks whole)."""
    out: list[tuple[str, float]] = []
    for k, v in value.items():
        try:
            re.compile(k)
        except re.error as e:
            raise InputError(f"{path}: {key} key {k!r} is not a valid regex ({e})") from None
        whole = key == "rank_pattern"
        if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or not v > 0 \
                or not math.isfinite(v):
            raise InputError(f"{path}: {key}[{k!r}] must be a positive {'whole number' if whole else 'number'}, "
                             f"got {json.dumps(v)[:40]}")
        out.append((k, v))
    return out


def read_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """loratune's side file (label names, base model); ``{}`` for an adapter peft wrote."""
    path = _inside(adapter_dir, META_NAME)
    if not path.is_file():
        return {}
    meta = _json_object(path)
    labels = meta.get("id2label")
    causal = meta.get("task") == "causal-lm"           # id2label: the choice candidates, none without a label set
    if labels is not None and (not isinstance(labels, list) or len(labels) < (0 if causal else 2)
                               or not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels)):
        raise InputError(f"{path}: field 'id2label' must be a list of " + ("distinct completions" if causal else
                                                                           "two or more distinct label names"))
    if meta.get("task", "classification") not in ("classification", "causal-lm"):
        raise InputError(f"{path}: field 'task' must be classification or causal-lm, got {meta['task']!r}")
    if meta.get("system_prompt") is not None and not isinstance(meta["system_prompt"], str):
        raise InputError(f"{path}: field 'system_prompt' must be text or null, got {meta['system_prompt']!r}")
    for key, kind in (("model", str), ("max_length", int)):
        if key in meta and (not isinstance(meta[key], kind) or isinstance(meta[key], bool)):
            raise InputError(f"{path}: field {key!r} has the wrong type: {meta[key]!r}")
    if "max_length" in meta and not 2 <= meta["max_length"] <= 1_000_000:
        raise InputError(f"{path}: field 'max_length' out of range: {meta['max_length']}")
    return meta


def read_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The safetensors file, loaded without pickle; a corrupt or missing file is an InputError."""
    path = _inside(adapter_dir, WEIGHTS_NAME)
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").exists():
            raise InputError(f"{path}: missing; adapter_model.bin (pickle) is never loaded, convert it to safetensors")
        raise InputError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"{path}: not a valid safetensors file ({e})") from None


def num_labels_of(weights: dict[str, torch.Tensor]) -> int | None:
    """Number of classes from the head's last layer (``*classifier.weight``, ``*out_proj.weight``, ``*score.weight``)."""
    for suffix in ("classifier.out_proj.weight", "classifier.weight", "score.weight"):
        hits = [v for k, v in weights.items() if k.endswith(suffix)]
        if hits:
            return int(hits[0].shape[0])
    return None


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, name: str = "default") -> LoraSpec:
    """Inject adapter ``name`` as the folder describes and load its tensors; shapes must match exactly.

    The modules of ``modules_to_save`` must be in the file whole; they are loaded into the model's own
    modules and train. Like the head, they are shared by every adapter of the model: a second adapter
    with the same modules overwrites them (peft keeps one copy per adapter; loratune does not).
    """
    spec, raw = read_adapter_config(adapter_dir)
    if raw.get("task_type") == "CAUSAL_LM" and head_names(model):
        raise InputError(f"{Path(adapter_dir) / CONFIG_NAME}: a CAUSAL_LM adapter (for a decoder LM) does not fit "
                         f"{type(model).__name__}, a classifier; load it on the model's *ForCausalLM class")
    weights = read_weights(adapter_dir)
    # A file refused below leaves the model as it was: the adapter's layers unwrapped again, the active adapters
    # and what trains restored, and nothing copied (every tensor is checked before the first copy).
    # (PiSSA and OLoRA replace W0 by a residual at injection: the targeted weights are kept to put back.)
    active = {path: layer.active for path, layer in lora_layers(model).items()}
    grads = {pname: p.requires_grad for pname, p in model.named_parameters()}
    try:
        kept = {n: _unwrapped(model.get_submodule(n)).weight.detach().clone()
                for n in resolve_targets(model, spec.targets, spec.layers, spec.modules_to_save)
                } if spec.init in ("pissa", "olora") else {}
        inject(model, spec, name, strict=False)              # peft's rules for a file (see inject)
    except InputError as e:
        raise InputError(f"{Path(adapter_dir) / CONFIG_NAME}: does not fit {type(model).__name__}: {e}") from None
    try:
        _load_tensors(model, weights, spec, raw, name, Path(adapter_dir) / WEIGHTS_NAME)
    except BaseException:
        _take_out(model, name, active, grads)
        for n, w in kept.items():
            _unwrapped(model.get_submodule(n)).weight.copy_(w)
        raise
    mark_trainable(model, spec.bias, spec.modules_to_save)
    hint = raw.get("base_model_name_or_path")
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    if hint and base and Path(str(hint)).name != Path(str(base)).name:
        log.info("adapter was trained on %s; loading it on %s (shapes match)", hint, base)
    return spec


def _take_out(model: nn.Module, name: str, active: dict[str, str | None], grads: dict[str, bool]) -> None:
    """Undo :func:`inject` of adapter ``name`` (a load that failed): drop it, unwrap the layers it alone held, put
    back each layer's active adapter and every parameter's requires_grad."""
    for path, layer in lora_layers(model).items():
        if name in layer.adapters:
            del layer.adapters[name]
        if path not in active and not layer.adapters and not layer.merged:
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
        else:
            layer.active = active.get(path)
    for pname, p in model.named_parameters():
        if pname in grads:
            p.requires_grad_(grads[pname])


def _load_tensors(model: nn.Module, weights: dict[str, torch.Tensor], spec: LoraSpec, raw: dict[str, Any], name: str,
                  wpath: Path) -> None:
    """Copy the file's tensors into adapter ``name`` (just injected), the head and ``modules_to_save``; every one
    is checked (a parameter for each, none missing, shapes, finite values) before the first is copied."""
    params = model.state_dict(keep_vars=True)          # parameters and persistent buffers by name
    expected: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model).items():
        if name in layer.adapters:
            expected.update(lora_tensors(path, layer.adapters[name]))
    for key in weights:
        if key not in expected:
            pname = _model_param_name(key)
            if pname not in params:
                raise InputError(f"{wpath}: tensor {key!r} matches no parameter of {type(model).__name__} "
                                 "(an adapter for another model?)")
            expected[key] = params[pname]
    missing = [k for k in expected if k not in weights and ".lora_" in k]
    if missing:
        raise InputError(f"{wpath}: tensor {missing[0]!r} is missing ({len(missing)} LoRA tensors missing)")
    saved = saved_modules(model, spec.modules_to_save)
    # A head the config lists (peft's SEQ_CLS: classifier, score; peft's str.endswith) must be in the file too,
    # or it would stay at its random init: peft's PiSSA/OLoRA conversion (path_initial_model_for_weight_conversion)
    # keeps only lora_A/lora_B and drops it.
    listed = tuple(raw.get("modules_to_save") or ())
    saved += [h for h in head_names(model) if listed and h.endswith(listed)]
    have = {_model_param_name(k) for k in weights}
    missing = [PREFIX + k for k in params if within(k.rpartition(".")[0], saved) and k not in have]
    if missing:
        lacking = [m for m in saved if any(within(k.removeprefix(PREFIX).rpartition(".")[0], [m]) for k in missing)]
        raise InputError(f"{wpath}: tensor {missing[0]!r} is missing ({len(missing)} tensors of modules_to_save "
                         f"{', '.join(lacking)} missing; a saved module is stored whole)")
    for key, tensor in weights.items():
        target = expected[key]
        if tuple(tensor.shape) != tuple(target.shape):
            raise InputError(f"{wpath}: {key} has shape {list(tensor.shape)} but the model's is {list(target.shape)} "
                             "(an adapter for another base model?)")
        if not torch.isfinite(tensor).all():
            raise InputError(f"{wpath}: {key} holds NaN or infinite values")
    with torch.no_grad():
        for key, tensor in weights.items():
            expected[key].copy_(tensor.to(expected[key].dtype))


def lora_tensors(path: str, adapter: nn.Module) -> dict[str, torch.Tensor]:
    """An adapter's tensors in layer ``path`` by their peft key: lora_A, lora_B and DoRA's magnitude."""
    out = {f"{PREFIX}{path}.lora_A.weight": adapter.lora_A, f"{PREFIX}{path}.lora_B.weight": adapter.lora_B}
    if adapter.lora_magnitude is not None:
        out[f"{PREFIX}{path}.lora_magnitude_vector"] = adapter.lora_magnitude
    return out


def _model_param_name(key: str) -> str:
    """peft key -> our parameter name (peft's ``modules_to_save`` copies are saved without the wrapper)."""
    key = key.removeprefix(PREFIX)
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)


def adapter_targets(adapter_dir: str | os.PathLike) -> list[str]:
    """The target spec as written (suffix names, or a ``re:`` regex)."""
    return list(read_adapter_config(adapter_dir)[0].targets)


def file_size(adapter_dir: str | os.PathLike) -> int:
    """Bytes of the adapter's tensors file."""
    return (Path(adapter_dir) / WEIGHTS_NAME).stat().st_size
