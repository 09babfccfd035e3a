"""Using a trained adapter: run it over a split, predict with it, export it merged, report parameter counts.

Everything that takes an adapter folder also takes a full fine-tuning run's ``model/`` (a transformers
folder with loratune's ``loratune.json``): it is loaded as it is, with no adapter (``Loaded.spec`` is None).

An adapter is for one of two tasks (:func:`task_of`): ``classification`` (a sequence classifier's head and
LoRA matrices: ``predict``) or ``causal-lm`` (LoRA matrices on a decoder LM: ``generate``, in
:mod:`loratune.infer.generate`). ``eval`` and ``merge`` take both.

Each function here is what one CLI command calls (``eval``, ``predict``, ``merge``, ``info``);
:func:`run_split` is also how the report and the search run a classification adapter over a labelled split.
The base model comes from the adapter's own ``loratune.json`` (the ``--model`` it was trained
with), else from ``base_model_name_or_path`` in ``adapter_config.json`` (as a hint only: a local
folder, a built-in, or a cached hub id; never remote code), else from ``base=`` when given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from loratune.core.adapters import (
    load_adapter,
    num_labels_of,
    publish_folder,
    read_adapter_config,
    read_meta,
    read_weights,
)
from loratune.core.inject import (
    LoraSpec,
    count_parameters,
    inject,
    merge_and_unload,
    report_line,
)
from loratune.errors import InputError
from loratune.runtime import resolve_device, resolve_precision, set_threads
from loratune.tasks.batches import Encoded
from loratune.tasks.classification import Split, evaluate, predict_probs, tokenize
from loratune.training import rundir
from loratune.training.data import load_splits
from loratune.training.models import (
    is_model_folder,
    load_causal_lm,
    load_model,
    load_tokenizer,
    pad_id_of,
    within_positions,
)
from loratune.training.models import modules_to_save as saved_for
from loratune.training.options import TrainConfig

log = logging.getLogger(__name__)

TASKS = ("classification", "causal-lm")
"""What :func:`task_of` returns: the value of ``"task"`` in an adapter's ``loratune.json``."""


@dataclass
class Loaded:
    """A base model with the adapter loaded (active, unmerged), its tokenizer and label names; or a fully
    fine-tuned model (``spec`` None).

    ``task`` is ``classification`` (``label_names`` the classes) or ``causal-lm`` (a decoder LM with its LM
    head; ``label_names`` the candidate completions of multiple-choice data, often none, and
    ``system_prompt`` the system turn the adapter was trained with, or None)."""

    model: nn.Module
    tokenizer: Any
    label_names: list[str]
    spec: LoraSpec | None
    base: str
    max_length: int
    pad_id: int
    task: str = "classification"
    system_prompt: str | None = None


_USE = {"classification": ("a classification adapter (it picks one of its labels; it writes no text)", "predict"),
        "causal-lm": ("a causal-LM adapter (it writes text; it has no classes to pick)", "generate")}


def require_task(adapter: str | os.PathLike | Loaded, task: str) -> None:
    """InputError unless ``adapter`` (a folder, checked from its JSON files before any model loads, or a
    :class:`Loaded`) is for ``task``; the message names the command for the task it is for."""
    have = adapter.task if isinstance(adapter, Loaded) else task_of(adapter)
    if have != task:
        what, command = _USE[have]
        name = "the adapter" if isinstance(adapter, Loaded) else str(adapter)
        raise InputError(f"--adapter: {name} is {what}; use `loratune {command}`")


def task_of(adapter: str | os.PathLike) -> str:
    """``classification`` or ``causal-lm``: ``"task"`` in ``loratune.json``, else (an adapter peft wrote) its
    ``adapter_config.json`` ``task_type`` (``CAUSAL_LM``: causal-lm). Reads the two small JSON files only, so a
    command meant for the other task is refused before any model is loaded."""
    if is_model_folder(adapter):
        raw: dict[str, Any] = {}
    else:
        raw = read_adapter_config(adapter)[1]
    task = read_meta(adapter).get("task")
    if task is None:
        return "causal-lm" if raw.get("task_type") == "CAUSAL_LM" else "classification"
    if task not in TASKS:
        raise InputError(f"{Path(adapter) / 'loratune.json'}: field 'task' must be one of {', '.join(TASKS)}, "
                         f"got {task!r}")
    return str(task)


def load(adapter: str | os.PathLike, *, base: str | None = None, device: str = "auto") -> Loaded:
    """Load ``adapter`` onto its base model (``base`` overrides the one the adapter names); a full fine-tuning
    ``model/`` folder is loaded as it is (``base`` must then be None). A causal-LM adapter (:func:`task_of`)
    goes onto the base's ``AutoModelForCausalLM`` (fp32), a classification adapter onto its sequence
    classifier with the adapter's classes."""
    if is_model_folder(adapter):
        return _load_full(adapter, base=base, device=device)
    spec, raw = read_adapter_config(adapter)
    meta = read_meta(adapter)
    task = task_of(adapter)
    download = base is not None                       # only a base the user names may be fetched
    base = base or meta.get("model") or raw.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise InputError(f"{Path(adapter) / 'adapter_config.json'}: names no base model; give --base MODEL")
    system_prompt = meta.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InputError(f"{Path(adapter) / 'loratune.json'}: field 'system_prompt' must be text or null, "
                         f"got {system_prompt!r:.40}")
    labels = meta.get("id2label")
    tok = load_tokenizer(base, download=download)
    pad = pad_id_of(tok)
    if task == "causal-lm":
        labels = list(labels or [])
        model = load_causal_lm(base, download=download)
    else:
        if labels is None:
            n = num_labels_of(read_weights(adapter)) or 2
            labels = [f"LABEL_{i}" for i in range(n)]
        model = load_model(base, labels, download=download, pad_id=pad)
    load_adapter(model, adapter)
    model.to(resolve_device(device)).eval()
    return Loaded(model, tok, list(labels), spec, str(base), within_positions(meta.get("max_length", 128), model),
                  int(pad), task,
                  system_prompt if task == "causal-lm" else None)


def _load_full(folder: str | os.PathLike, *, base: str | None, device: str) -> Loaded:
    """A fully fine-tuned classifier (a run's ``model/``), its label names from config.json."""
    import json

    if base is not None:
        raise InputError(f"--base: {folder} is a fully fine-tuned model (no adapter), so it has no base to replace")
    meta = read_meta(folder)
    try:
        id2label = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
        labels = meta.get("id2label") or [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (ValueError, AttributeError, TypeError) as e:
        raise InputError(f"{Path(folder) / 'config.json'}: unreadable label names ({e})") from None
    if len(labels) < 2:
        raise InputError(f"{Path(folder) / 'config.json'}: a classifier needs id2label with two or more labels")
    tok = load_tokenizer(str(folder), download=False)
    pad = pad_id_of(tok)
    model = load_model(str(folder), labels, download=False, pad_id=pad)
    model.to(resolve_device(device)).eval()
    return Loaded(model, tok, list(labels), None, str(meta.get("model") or folder),
                  within_positions(meta.get("max_length", 128), model), int(pad))


@dataclass(frozen=True, eq=False)
class SplitRun:
    """An adapter run over one labelled split: its metrics (:func:`loratune.tasks.metrics.compute_metrics`),
    the true class ids (N,), the class probabilities (N, C) in input order, and the adapter's label names."""

    split: str
    metrics: dict[str, float]
    labels: np.ndarray
    probs: np.ndarray
    label_names: list[str]


def run_split(adapter: str | os.PathLike, *, split: str = "test", data: str | None = None,
              encoded: Encoded | None = None, text_column: str | None = None, label_column: str | None = None,
              precision: str = "auto", base: str | None = None, device: str = "auto",
              threads: int | None = None) -> SplitRun:
    """The one way to run an adapter over a labelled split (``loratune eval``, the report's test section,
    the search's test of its best trial); the model-level primitive is :func:`tasks.classification.evaluate`.

    The split is ``encoded`` when given (already tokenized, class ids in the adapter's label order, as a
    search prepares it), else ``split`` of ``data`` (default: the data of the run the adapter came from),
    cut exactly as in training (stratified 80/10/10 by the run's ``--split-seed``) with the adapter's classes. ``threads`` sets
    torch's threads (None: the CPUs available).
    """
    if split not in ("validation", "test", "train"):
        raise InputError(f"--split: expected validation or test, got {split!r}")
    if encoded is not None and (data, text_column, label_column) != (None, None, None):
        raise ValueError("run_split: give encoded= or data=/text_column=/label_column=, not both")
    set_threads(threads)
    loaded = load(adapter, base=base, device=device)  # a bad adapter is reported before anything else
    if loaded.task != "classification":
        raise InputError(f"--adapter: {adapter} is a {loaded.task} adapter; it has no classes to run over a "
                         "labelled split (evaluate_adapter scores it on its own data)")
    enc = encoded if encoded is not None else _encode(loaded, adapter, split, data, text_column, label_column)
    dev = next(loaded.model.parameters()).device
    metrics, probs = evaluate(loaded.model, enc, dev, resolve_precision(precision, dev), loaded.pad_id)
    return SplitRun(split, metrics, enc.labels, probs, loaded.label_names)


def _encode(loaded: Loaded, adapter: str | os.PathLike, split: str, data: str | None, text_column: str | None,
            label_column: str | None) -> Encoded:
    """``split`` of ``data`` (else of the adapter's run's data), tokenized for the loaded adapter."""
    cfg = _data_config(adapter, data, text_column=text_column, label_column=label_column)
    splits = load_splits(cfg, label_names=loaded.label_names)
    return tokenize(getattr(splits, split), loaded.tokenizer, loaded.max_length)


def _data_config(adapter: str | os.PathLike, data: str | None, **columns: str | None) -> TrainConfig:
    """The options of the adapter's run (its data, columns, split files and ``--split-seed``: the splits are cut
    as in training), with ``data`` and the given ``columns`` in their place; another data set is cut with
    none of the old one's files or seed."""
    run_cfg = rundir.adapter_run_config(adapter)
    opts: dict[str, Any] = run_cfg.to_dict() if run_cfg else {}
    for key, value in (("data", data), *columns.items()):
        if value is not None:
            opts[key] = value
    if data is not None and run_cfg is not None:        # another data set: no files or split seed of the old one
        opts.update(validation_file=None, test_file=None, sample_pct=1.0, split_seed=0)
    if "data" not in opts:
        raise InputError("--data: this adapter is not inside a run directory; say which data to evaluate on")
    return TrainConfig.from_stored(opts)


def evaluate_adapter(adapter: str | os.PathLike, *, data: str | None = None, split: str = "test",
                     text_column: str | None = None, label_column: str | None = None,
                     precision: str = "auto", base: str | None = None, device: str = "auto",
                     threads: int | None = None) -> dict[str, Any]:
    """``{"split", "examples", **metrics}`` of ``adapter`` on a split of ``data`` (``loratune eval``;
    :func:`run_split` with the same arguments; a causal-LM adapter: :func:`evaluate_causal_adapter`)."""
    if task_of(adapter) == "causal-lm":
        return evaluate_causal_adapter(adapter, data=data, split=split, text_column=text_column,
                                       label_column=label_column, precision=precision, base=base, device=device,
                                       threads=threads)
    res = run_split(adapter, split=split, data=data, text_column=text_column, label_column=label_column,
                    precision=precision, base=base, device=device, threads=threads)
    return {"split": split, "examples": len(res.labels), **res.metrics}


def evaluate_causal_adapter(adapter: str | os.PathLike, *, data: str | None = None, split: str = "test",
                            text_column: str | None = None, label_column: str | None = None, precision: str = "auto",
                            base: str | None = None, device: str = "auto",
                            threads: int | None = None) -> dict[str, Any]:
    """``{"split", "examples", loss, perplexity, exact_match[, accuracy]}`` of a causal-LM adapter on a split.

    The split is made as training made it (:func:`loratune.training.loop.prepare_data` on the run's options:
    its data, columns, system prompt, ``--max-length`` and ``--split-seed``; ``data`` replaces the run's data)
    and scored by :func:`loratune.tasks.causal_eval.evaluate_causal`, as training scores its epochs:
    accuracy only for data whose completions are a label set (multiple choice). ``--text-column`` and
    ``--label-column`` name a classifier's columns and are refused here.
    """
    from loratune.tasks.causal_eval import evaluate_causal
    from loratune.training.loop import prepare_data

    if split not in ("validation", "test"):
        raise InputError(f"--split: expected validation or test, got {split!r}")
    for name, value in (("--text-column", text_column), ("--label-column", label_column)):
        if value is not None:
            raise InputError(f"{name}: {adapter} is a causal-LM adapter; its data has prompt/completion, messages "
                             "or Alpaca columns, not text and label columns")
    set_threads(threads)
    loaded = load(adapter, base=base, device=device)
    cfg = _data_config(adapter, data)
    # Tokenized by the tokenizer of the model the adapter runs on, as the causal-LM task, with the adapter's own
    # max length and system prompt where no run directory says otherwise (a PEFT adapter, or one moved away).
    changes: dict[str, Any] = {"task": "causal-lm", "model": base or loaded.base}
    if rundir.adapter_run_config(adapter) is None:
        changes.update(max_length=loaded.max_length if read_meta(adapter).get("max_length") else cfg.max_length,
                       system_prompt=loaded.system_prompt)
    cfg = cfg.replace(**changes)
    prepared = prepare_data(cfg)
    part = getattr(prepared, split)
    dev = next(loaded.model.parameters()).device
    metrics, _ = evaluate_causal(loaded.model, loaded.tokenizer, part, dev, resolve_precision(precision, dev),
                                 prepared.pad_id)
    return {"split": split, "examples": len(part), **metrics}


def _count(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise InputError(f"{name}: expected an integer >= {lo}, got {value!r}")


def predict(adapter: str | os.PathLike | Loaded, texts: Iterable[str], *, precision: str = "auto",
            base: str | None = None, device: str = "auto", chunk: int = 256,
            threads: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"text", "label", "score", "probabilities"}`` per text, in input order, ``chunk`` at a time.

    Memory stays bounded by ``chunk``: texts are read, tokenized and classified a chunk at a time. A lone string
    is one text. A text that tokenizes to no tokens (an empty text, with a tokenizer that adds no special tokens,
    as GPT-2's) is an InputError: a decoder classifier would read it at a padding slot.
    """
    _count("--batch-size", chunk, 1)
    if isinstance(texts, str):
        texts = [texts]
    set_threads(threads)
    require_task(adapter, "classification")
    loaded = adapter if isinstance(adapter, Loaded) else load(adapter, base=base, device=device)
    dev = next(loaded.model.parameters()).device
    prec = resolve_precision(precision, dev)
    buf: list[str] = []
    done = 0
    for text in texts:
        if not isinstance(text, str):
            raise InputError(f"text {done + len(buf) + 1}: expected a string, got {type(text).__name__}")
        buf.append(text)
        if len(buf) >= chunk:
            yield from _classify(loaded, buf, dev, prec, done)
            done, buf = done + len(buf), []
    if buf:
        yield from _classify(loaded, buf, dev, prec, done)


def _classify(loaded: Loaded, texts: list[str], dev: torch.device, precision: str,
              before: int = 0) -> Iterator[dict[str, Any]]:
    """Classify ``texts``, the texts after the first ``before`` of the input (for the numbers in errors)."""
    enc = tokenize(Split(texts, np.zeros(len(texts), dtype=np.int64)), loaded.tokenizer, loaded.max_length)
    if (empty := np.flatnonzero(enc.lengths == 0)).size:
        k = int(empty[0])
        raise InputError(f"text {before + k + 1} ({texts[k]!r:.40}) has no tokens: nothing to classify")
    probs, _ = predict_probs(loaded.model, enc, dev, precision, pad_id=loaded.pad_id)
    for text, p in zip(texts, probs):
        k = int(np.argmax(p))
        yield {"text": text, "label": loaded.label_names[k], "score": float(p[k]),
               "probabilities": {name: float(q) for name, q in zip(loaded.label_names, p)}}


def merge_export(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str | None = None,
                 overwrite: bool = False) -> Path:
    """A plain transformers folder (safetensors weights with ΔW folded in, config, tokenizer files).

    A classification adapter: ``AutoModelForSequenceClassification.from_pretrained(out)`` gives its
    predictions (the config carries the label names). A causal-LM adapter: ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` give its generations, without loratune or peft installed: the tokenizer files keep the
    chat template, and the generation config stops at the same tokens ``loratune generate`` stops at (EOS
    and the template's end-of-turn token), so a plain greedy ``model.generate`` writes what it writes.
    Written to a temp folder beside ``out``, then swapped into place.
    """
    out = Path(out)
    if is_model_folder(adapter):
        raise InputError(f"--adapter: {adapter} is a fully fine-tuned model, already a transformers folder with "
                         "nothing to merge; load it with AutoModelForSequenceClassification.from_pretrained as it is")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InputError(f"--out: {out} exists and is not empty; use --overwrite to replace it")
        if not (out / "config.json").is_file():             # a model folder, never a folder of other files
            raise InputError(f"--overwrite: {out} is not a model folder (no config.json); it replaces only a merged "
                             "model: give a new or empty --out")
    loaded = load(adapter, base=base, device="cpu")
    model = merge_and_unload(loaded.model)
    if loaded.task == "causal-lm":
        from loratune.tasks.causal_metrics import stop_ids

        stops = stop_ids(loaded.tokenizer)
        if stops:
            model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = loaded.pad_id
    else:
        model.config.id2label = dict(enumerate(loaded.label_names))
        model.config.label2id = {n: i for i, n in enumerate(loaded.label_names)}
    model.config._name_or_path = loaded.base
    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        transformers.logging.disable_progress_bar()         # the CLI says what was written, not the writer
        model.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        publish_folder(tmp, out)
    finally:
        transformers.logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def info(model: str, *, targets: Sequence[str] | str = ("qv",), rank: int = 8, alpha: float = 16.0,
         layers: Sequence[int] | None = None, num_labels: int = 2, bias: str = "none",
         modules_to_save: Sequence[str] | str = "auto") -> dict[str, Any]:
    """The trainable-parameter report for a model and LoRA settings, without training (``modules_to_save``
    as ``train``'s: ``auto`` takes the default's names the model has)."""
    _count("--num-labels", num_labels, 2)                    # a classifier: two classes at least, as training
    cfg = TrainConfig(model=model, targets=targets, rank=rank, alpha=alpha, layers=layers, bias=bias,
                      modules_to_save=modules_to_save)
    base = load_model(cfg.model, [f"LABEL_{i}" for i in range(num_labels)])
    base_params = count_parameters(base)[1]
    spec = dataclasses.replace(cfg.lora_spec(), modules_to_save=saved_for(cfg, base))
    names = inject(base, spec)
    trainable, total = count_parameters(base)
    return {"model": type(base).__name__, "line": report_line(base), "trainable": trainable, "all": total,
            "base_params": base_params, "adapted": names, "modules_to_save": list(spec.modules_to_save), "adapter_bytes_fp32": trainable * 4,
            "model_bytes_fp32": base_params * 4}


def read_lines(path: str | os.PathLike | None,
               on_bad_line: Callable[[int, str], None] | None = None) -> Iterator[str]:
    """Texts of a UTF-8 file, one per line (stdin for ``-``/None), streamed.

    A line that is not UTF-8, or blank, is skipped and reported through ``on_bad_line(number, why)``:
    one bad line never stops a long prediction run.
    """
    import sys

    fh = sys.stdin.buffer if path in (None, "-") else _open(path)
    report = on_bad_line or (lambda no, why: log.warning("line %d: %s", no, why))
    try:
        for no, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                report(no, "not UTF-8, skipped")
                continue
            if no == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                report(no, "empty, skipped")
                continue
            yield text
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


def _open(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.exists():
        raise InputError(f"--file: {p} does not exist")
    if p.is_dir():
        raise InputError(f"--file: {p} is a folder, not a file")
    return open(p, "rb")
