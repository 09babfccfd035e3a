"""The model a server holds: one frozen base, many classification adapters, rows routed per adapter.

:class:`ServedModel` is used from one thread at a time (the server's worker thread: loads, unloads and
forward passes never overlap). Each adapter keeps its own label names and max length; they share the base's
tokenizer. With ``merge=True`` the one adapter is folded into W0 (:func:`merge_and_unload`): a plain model,
no routing, no added latency, and no loading or unloading while it serves.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from loratune.core.adapters import (
    file_size,
    num_labels_of,
    read_adapter_config,
    read_meta,
    read_weights,
)
from loratune.core.inject import merge_and_unload, routed
from loratune.core.routing import add_routed_adapter, remove_routed_adapter
from loratune.errors import InputError
from loratune.runtime import autocast, resolve_device, resolve_precision
from loratune.training.models import (
    is_model_folder,
    load_model,
    load_tokenizer,
    pad_id_of,
    resolve_model_path,
    within_positions,
)

log = logging.getLogger(__name__)


@dataclass
class ServedAdapter:
    """What a request needs of one adapter: its classes (in head order) and its max length in tokens."""

    name: str
    path: str
    labels: list[str]
    max_length: int
    bytes: int
    created: int = field(default_factory=lambda: int(time.time()))
    task: str = "classification"
    system_prompt: str | None = None
    """A causal-LM adapter's system turn, put before a chat without one (as ``loratune generate``)."""


def base_of(adapter_dir: str | os.PathLike) -> str:
    """The base model an adapter names (loratune.json's ``model``, else peft's ``base_model_name_or_path``)."""
    spec, raw = read_adapter_config(adapter_dir)
    base = read_meta(adapter_dir).get("model") or raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InputError(f"{Path(adapter_dir) / 'adapter_config.json'}: names no base model; give --base MODEL")
    return base


def _head_labels(base: str) -> list[str] | None:
    """The label names of a base that is itself a trained classifier (its config's architectures name a
    ``*ForSequenceClassification``), else None: its head would be a fresh random one."""
    try:
        cfg = json.loads((Path(resolve_model_path(base)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return None
    id2label = cfg.get("id2label") or {}
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)] or None
    except (ValueError, TypeError):
        return None


class ServedModel:
    """One base model and its adapters; :meth:`classify` runs one batch of (adapter, token ids) rows."""

    task = "classification"

    def __init__(self, base: str, *, device: str = "auto", precision: str = "auto", max_length: int = 128,
                 download: bool = False) -> None:
        self.base = base
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.base_labels = _head_labels(base)
        """The base's own classes when it is a trained classifier (served under its name), else None."""
        self.tokenizer = load_tokenizer(base, download=download)
        tok = self.tokenizer
        self.pad_id = pad_id_of(tok)
        self.model = load_model(base, self.base_labels or ["LABEL_0", "LABEL_1"], download=download,
                                pad_id=self.pad_id)
        self.model.to(self.device).eval()
        self.base_max_length = within_positions(max_length, self.model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._probe = list(tok("probe")["input_ids"])    # tokenized here: the tokenizer is the event loop's after
        self.merged = False
        self.adapters: dict[str, ServedAdapter] = {}

    @classmethod
    def merged_from(cls, name: str, adapter_dir: str | os.PathLike, *, base: str | None = None,
                    device: str = "auto", precision: str = "auto") -> "ServedModel":
        """One adapter folded into its base (``--merge``): the forward pass of a plain transformers model."""
        from loratune.infer.inference import load

        _check_classifier(adapter_dir)
        loaded = load(adapter_dir, base=base, device=device)
        self = cls.__new__(cls)
        self.base, self.device = loaded.base, next(loaded.model.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self.base_labels = None
        self.base_max_length = loaded.max_length
        self.model = merge_and_unload(loaded.model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer, self.pad_id, self.merged = loaded.tokenizer, loaded.pad_id, True
        self.adapters = {name: ServedAdapter(name, str(adapter_dir), loaded.label_names, loaded.max_length,
                                             file_size(adapter_dir))}
        return self

    # --- adapters --------------------------------------------------------------------------------

    def check_base(self, adapter_dir: str | os.PathLike) -> None:
        """InputError when a loratune adapter was trained on another model than this server's base (a peft
        adapter only names a hint: a mismatch is logged, and the shapes decide)."""
        meta_model = read_meta(adapter_dir).get("model")
        hint = meta_model or read_adapter_config(adapter_dir)[1].get("base_model_name_or_path")
        if not hint or _same_model(hint, self.base):
            return
        if meta_model:
            raise InputError(f"{adapter_dir}: trained on {hint}, but this server's base is {self.base}")
        log.info("adapter %s names %s as its base; serving it on %s (shapes match)", adapter_dir, hint, self.base)

    def add(self, name: str, adapter_dir: str | os.PathLike) -> ServedAdapter:
        """Load an adapter for per-row routing (:func:`add_routed_adapter`), then run one row through it, so a
        bad adapter is refused here and never fails a batch of others."""
        if self.merged:
            raise InputError("this server serves one merged adapter (--merge); it loads no others")
        _check_classifier(adapter_dir)
        self.check_base(adapter_dir)
        meta = read_meta(adapter_dir)
        labels = meta.get("id2label")
        head = num_labels_of(read_weights(adapter_dir))
        if labels is None:
            labels = [f"LABEL_{i}" for i in range(head or 2)]
        elif head is not None and head != len(labels):
            # checked here: the probe below cannot see it (classify cuts each row's scores to its label count)
            raise InputError(f"{adapter_dir}: loratune.json names {len(labels)} labels, but the head gives "
                             f"{head} scores")
        max_length = within_positions(meta.get("max_length", self.base_max_length), self.model)
        add_routed_adapter(self.model, adapter_dir, name)
        adapter = ServedAdapter(name, str(adapter_dir), list(labels), max_length, file_size(adapter_dir))
        self.adapters[name] = adapter
        try:
            probe = self.classify([(name, self._probe[:max_length])])
            if probe[0].shape != (len(labels),):
                raise InputError(f"{adapter_dir}: loratune.json names {len(labels)} labels, but the head gives "
                                 f"{probe[0].shape[0]} scores")
        except Exception:
            self.remove(name)
            raise
        return adapter

    def remove(self, name: str) -> None:
        remove_routed_adapter(self.model, name)
        self.adapters.pop(name, None)

    # --- inference -------------------------------------------------------------------------------

    @torch.no_grad()
    def classify(self, rows: Sequence[tuple[str | None, Sequence[int]]]) -> list[np.ndarray]:
        """Class probabilities of each row (its adapter's classes, in head order), one forward pass over the
        batch: row i through adapter ``rows[i][0]`` (None: the base's own head). Right-padded with the pad id,
        as training (GPT-2 style heads find the last token by it)."""
        lens = np.array([len(ids) for _, ids in rows], dtype=np.int64)
        ids = np.full((len(rows), int(lens.max())), self.pad_id, dtype=np.int64)
        for i, (_, toks) in enumerate(rows):
            ids[i, :lens[i]] = toks
        mask = (np.arange(ids.shape[1])[None, :] < lens[:, None]).astype(np.int64)
        input_ids = torch.from_numpy(ids).to(self.device)
        attention = torch.from_numpy(mask).to(self.device)
        width = [len(self.adapters[n].labels) if n is not None and n in self.adapters
                 else len(self.base_labels or ()) for n, _ in rows]
        with autocast(self.device, self.precision):
            if self.merged:
                logits = self.model(input_ids=input_ids, attention_mask=attention).logits
            else:
                with routed(self.model, [n for n, _ in rows]):
                    logits = self.model(input_ids=input_ids, attention_mask=attention).logits
        logits = logits.float()
        return [torch.softmax(logits[i, :w], dim=-1).cpu().numpy() for i, w in enumerate(width)]

    def memory_bytes(self) -> dict[str, Any]:
        """Bytes of the base's parameters and of the adapters' files (for /metrics)."""
        return {"base": sum(p.numel() * p.element_size() for p in self.model.parameters()),
                "adapters_on_disk": sum(a.bytes for a in self.adapters.values())}


def _check_classifier(adapter_dir: str | os.PathLike) -> None:
    """InputError for what is not a classification adapter: a full fine-tuning model, a causal-LM adapter."""
    if is_model_folder(adapter_dir):
        raise InputError(f"{adapter_dir}: a fully fine-tuned model, not an adapter; serve it as the base (--base)")
    from loratune.infer.inference import task_of

    if task_of(adapter_dir) != "classification":
        raise InputError(f"{adapter_dir}: a causal-LM adapter (it writes text); this server's base is a "
                         "classifier: serve causal-LM adapters on their own server (/v1/completions)")


def _same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same model (a built-in name and its folder are the same)."""
    if a == b:
        return True
    try:
        return Path(resolve_model_path(a)).resolve() == Path(resolve_model_path(b)).resolve()
    except (OSError, InputError, ValueError):
        return Path(a).name == Path(b).name
