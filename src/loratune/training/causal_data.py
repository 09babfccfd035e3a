"""Causal-LM data: ``--data`` as conversations, split train / validation / test, and the task ``auto`` picks.

Rows come from the same sources as classification data (sources.py): CSV / TSV / JSONL / JSON /
Parquet files, ``--validation-file`` / ``--test-file``, a ``datasets.save_to_disk`` folder or a hub
dataset, in one of the formats of tasks/causal.py (prompt-completion, messages, Alpaca). Each row
becomes a conversation (:func:`loratune.tasks.causal.to_messages`); its *reference* is the text of
its last assistant turn.

The built-in ``rotten-tomatoes-4k-instruct`` is the built-in classification data asked as a question
(:data:`INSTRUCT_PROMPT`) and answered "negative" or "positive": it is cut by the very same stratified
split as ``rotten-tomatoes-4k`` (data.load_splits), so both tasks see the same sentences in each split.

A missing validation or test split is cut as for classification (10% each, by ``--split-seed``),
stratified by reference when the references take at most :data:`MAX_CHOICES` distinct values (a
label set), else uniformly at random. Those references are also the candidates of choice scoring.
"""

from __future__ import annotations

import json
import logging
import types
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loratune.errors import InputError
from loratune.tasks.causal import detect_format, to_messages
from loratune.training import sources
from loratune.training.detect import INSTRUCT_NAME

if TYPE_CHECKING:
    from loratune.training.options import TrainConfig

log = logging.getLogger(__name__)

INSTRUCT_PROMPT = "Is this movie review positive or negative? Answer with one word.\n\n{text}"
"""The built-in instruct data's user turn; the answer is the label, ``negative`` or ``positive``."""
MAX_CHOICES = 20
"""References with at most this many distinct values are a label set: accuracy by choice scoring, stratified cuts."""

Conversation = list[dict[str, Any]]


@dataclass(frozen=True, eq=False)
class CausalSplits:
    """Conversations of each split, where each row came from (for messages), and the choice candidates
    (sorted distinct references of all splits; empty when there are more than :data:`MAX_CHOICES`)."""

    train: list[Conversation]
    validation: list[Conversation]
    test: list[Conversation]
    wheres: dict[str, list[str]]
    choices: list[str]
    formats: tuple[str, ...] = ("prompt-completion",)
    """The row formats found (tasks/causal.FORMATS): without a chat template only prompt-completion can be written."""


def reference(conv: Conversation) -> str:
    """The text of a conversation's last assistant turn (what exact match and choice scoring compare)."""
    return next(m["content"] for m in reversed(conv) if m["role"] == "assistant")


# --------------------------------------------------------------------------- splits

def load_causal_splits(cfg: TrainConfig) -> CausalSplits:
    """``cfg.data`` (+ ``--validation-file`` / ``--test-file``) as conversations in train / validation / test.

    InputError for unusable data: a missing column, an empty completion, a bad turn (to_messages), too
    few rows to cut the missing splits.
    """
    from loratune.training.data import (
        HELD_OUT_FRACTION,
        sort_label_names,
        stratified_parts,
    )

    if cfg.data == INSTRUCT_NAME:
        return _builtin_instruct(cfg)
    if cfg.data == sources.BUILTIN_NAME:
        raise InputError(f"--data: {sources.BUILTIN_NAME} is text/label data for classification; the causal-lm "
                         f"task needs prompt/completion, messages or Alpaca rows (the built-in: --data {INSTRUCT_NAME})")
    names = {"prompt_column": cfg.prompt_column, "completion_column": cfg.completion_column,
             "messages_column": cfg.messages_column}
    replaced = [n for n, file in (("validation", cfg.validation_file), ("test", cfg.test_file)) if file is not None]
    parts = _records(cfg.data, replaced)                            # the splits files replace: not read
    for name, file, fld in (("validation", cfg.validation_file, "--validation-file"),
                            ("test", cfg.test_file, "--test-file")):
        if file is not None:
            parts[name] = _file_records(file, fld)
    convs: dict[str, tuple[list[Conversation], list[str]]] = {}
    formats: list[str] = []
    for name, (rows, wheres) in parts.items():                     # never empty (_some)
        fmt = detect_format(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r), **names,
                            where=wheres[0].rsplit(": ", 1)[0])
        formats.append(fmt)
        convs[name] = ([to_messages(r, **names, system_prompt=cfg.system_prompt, fmt=fmt, where=w)
                        for r, w in zip(rows, wheres)], wheres)
    (train, twhere) = convs.pop("train", None) or convs.pop("all")
    refs = [reference(c) for c in train]
    distinct = sort_label_names({r.strip() for r in refs})
    strata = len(distinct) <= MAX_CHOICES
    index = {n: i for i, n in enumerate(distinct)}
    y = np.asarray([index[r.strip()] for r in refs] if strata else [0] * len(refs), dtype=np.int64)
    missing = [n for n in ("validation", "test") if n not in convs]
    held = max(1, int(HELD_OUT_FRACTION * len(y) + 0.5))
    if missing and len(y) < len(missing) * held + len(set(y.tolist())):
        raise InputError(f"--data: {cfg.data}: {len(y)} rows are too few to cut out {' and '.join(missing)} "
                         f"splits; give --validation-file and --test-file")
    if not missing and cfg.split_seed and cfg.sample_pct == 1.0:
        raise InputError(f"--split-seed: {cfg.data} has its own validation and test splits, so nothing is cut "
                         "(and no --sample-pct subsample drawn); leave --split-seed at 0")
    cut = stratified_parts(y, [held] * len(missing), cfg.split_seed)
    out = {"train": ([train[i] for i in cut[0]], [twhere[i] for i in cut[0]], y[cut[0]])}
    for name, idx in zip(missing, cut[1:]):
        out[name] = ([train[i] for i in idx], [twhere[i] for i in idx], y[idx])
    for name, (c, w) in convs.items():
        out[name] = (c, w, np.zeros(len(c), dtype=np.int64))
    if cfg.sample_pct < 1.0:
        tc, tw, ty = out["train"]
        keep = max(1, int(cfg.sample_pct * len(tc) + 0.5))
        rest = stratified_parts(ty, [len(tc) - keep], cfg.split_seed)[0]
        out["train"] = ([tc[i] for i in rest], [tw[i] for i in rest], ty[rest])
    every = {reference(c) for part in out.values() for c in part[0]}             # candidates as written
    choices = sort_label_names(every) if len(every) <= MAX_CHOICES else []
    log.info("data %s: train %d, validation %d, test %d conversations%s", cfg.data, len(out["train"][0]),
             len(out["validation"][0]), len(out["test"][0]),
             f"; completions {', '.join(choices)}" if choices else "")
    return CausalSplits(out["train"][0], out["validation"][0], out["test"][0],
                        {k: v[1] for k, v in out.items()}, choices, tuple(dict.fromkeys(formats)))


def _builtin_instruct(cfg: TrainConfig) -> CausalSplits:
    """The built-in snippets as prompt -> label, split exactly as ``rotten-tomatoes-4k`` (same options)."""
    from loratune.training.data import load_splits

    shim = types.SimpleNamespace(data=sources.BUILTIN_NAME, text_column="text", label_column="label",
                                 validation_file=cfg.validation_file, test_file=cfg.test_file,
                                 split_seed=cfg.split_seed, sample_pct=cfg.sample_pct)
    splits = load_splits(shim)                                           # type: ignore[arg-type]
    out: dict[str, list[Conversation]] = {}
    wheres: dict[str, list[str]] = {}
    for name in ("train", "validation", "test"):
        split = getattr(splits, name)
        out[name] = [([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else [])
                     + [{"role": "user", "content": INSTRUCT_PROMPT.format(text=t)},
                        {"role": "assistant", "content": splits.label_names[int(k)]}]
                     for t, k in zip(split.texts, split.labels)]
        wheres[name] = [f"--data: {INSTRUCT_NAME}: {name} row {i + 1}" for i in range(len(split))]
    return CausalSplits(out["train"], out["validation"], out["test"], wheres, list(splits.label_names))


def _records(spec: str, replaced: Collection[str] = ()) -> dict[str, tuple[list[Any], list[str]]]:
    """``--data`` -> {split name or "all": (records, where each came from)}; a dataset's splits named in
    ``replaced`` (by ``--validation-file`` / ``--test-file``) are not read."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not any((path / n).is_file() for n in ("dataset_dict.json", "state.json")):
            raise InputError(f"--data: {path} is a folder but not a Hugging Face save_to_disk folder "
                             f"(no dataset_dict.json or state.json in it)")
        return _hf_records(spec, path, replaced)
    if path.is_file():
        return {"all": _file_records(spec, "--data")}
    if path.suffix.lower() in sources._FILE_TYPES or spec.startswith((".", "/", "~")):
        raise InputError(f"--data: file {path} does not exist")
    return _hf_records(spec, None, replaced)


def _file_records(path_str: str, field: str) -> tuple[list[Any], list[str]]:
    """Every record of a CSV / TSV / JSONL / JSON / Parquet file (all columns) and its line or row.

    CSV / TSV text is read as the classifier's (sources.csv_rows: strict quoting, blank lines skipped). Raises
    InputError naming ``field`` and the file for a file that cannot be read or parsed, or that has no rows.
    """
    p = Path(path_str).expanduser()
    if p.is_dir():
        raise InputError(f"{field}: {p} is a folder; expected a CSV, JSONL or Parquet file")
    if not p.is_file():
        raise InputError(f"{field}: file {p} does not exist")
    kind = sources._FILE_TYPES.get(p.suffix.lower())
    if kind is None:
        raise InputError(f"{field}: {p} has an unsupported file type {p.suffix!r}; "
                         f"expected one of {', '.join(sources._FILE_TYPES)}")
    where = f"{field}: {p}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError, ValueError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise InputError(f"{where}: not a valid Parquet file (truncated or corrupt?): {why}") from None
        return _some(rows, [f"{where}: row {i + 1}" for i in range(len(rows))], where)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8") from None
    except OSError as e:
        raise InputError(f"{where}: cannot read the file ({e.strerror or e})") from None
    if not text.strip():
        raise InputError(f"{where}: the file is empty")
    if kind == "csv":
        lines = sources.csv_rows(text, "\t" if p.suffix.lower() == ".tsv" else ",", where)
        _, header = next(lines, (0, []))
        rows, wheres = [], []
        for n, row in lines:
            rows.append(dict(zip(header, row)))
            wheres.append(f"{where}: line {n}")
        return _some(rows, wheres, where)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InputError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise InputError(f"{where}: expected a JSON array of records")
        return _some(rows, [f"{where}: record {i + 1}" for i in range(len(rows))], where)
    rows, wheres = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (ValueError, RecursionError) as e:
                raise InputError(f"{where}: line {n} is not valid JSON ({e})") from None
            wheres.append(f"{where}: line {n}")
    return _some(rows, wheres, where)


def _some(rows: list[Any], wheres: list[str], where: str) -> tuple[list[Any], list[str]]:
    """``(rows, wheres)``, or InputError ``where: no rows`` when there are none (``where`` names the flag and
    the file, or the dataset and split)."""
    if not rows:
        raise InputError(f"{where}: no rows")
    return rows, wheres


def _hf_records(spec: str, folder: Path | None, replaced: Collection[str]) -> dict[str, tuple[list[Any], list[str]]]:
    """A ``save_to_disk`` folder or hub dataset: its train / validation / test splits as records, but for those
    named in ``replaced``."""
    out = {}
    for ours, (ds, theirs) in sources.hf_splits(spec, folder).items():
        if ours in replaced:
            continue
        rows, where = ds.to_list(), f"--data: {spec} (split {theirs!r})"
        out[ours] = _some(rows, [f"{where}: row {i + 1}" for i in range(len(rows))], where)
    return out
