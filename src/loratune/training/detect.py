"""What ``--task auto`` reads: the columns of ``--data`` (without loading it) and, failing those, the model.

Kept apart from causal_data.py (which loads data) so that training/options.py can ask it without an import cycle.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from loratune.errors import InputError
from loratune.tasks.causal import detect_format
from loratune.training import sources

INSTRUCT_NAME = "rotten-tomatoes-4k-instruct"
"""The built-in causal-LM data: rotten-tomatoes-4k asked as a question (training/causal_data.py)."""


def detect_task(cfg: Any) -> str:
    """``--task auto`` for ``cfg`` (a TrainConfig being built): causal-lm for data with prompt/completion,
    messages or Alpaca columns; classification for data with the text and label columns; otherwise by the model
    (a decoder LLM: causal-lm). The data decides first, so a decoder LLM on text/label data trains a classifier
    (its ``ForSequenceClassification``)."""
    if cfg.data == INSTRUCT_NAME:
        return "causal-lm"
    if cfg.data == sources.BUILTIN_NAME:
        return "classification"
    columns = peek_columns(cfg.data)
    if columns is not None:
        try:
            detect_format(columns, prompt_column=cfg.prompt_column, completion_column=cfg.completion_column,
                          messages_column=cfg.messages_column)
            return "causal-lm"
        except InputError:
            pass
        if cfg.text_column in columns and cfg.label_column in columns:
            return "classification"
    from loratune.training.models import model_is_causal

    return "causal-lm" if cfg.model != "auto" and model_is_causal(cfg.model) else "classification"


@lru_cache(maxsize=64)
def peek_columns(spec: str) -> tuple[str, ...] | None:
    """The column names of a data file, read from its header (CSV), first record (JSONL, JSON) or schema
    (Parquet); None for anything else or a file that cannot be read (loading it later says why)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder_columns(path)
    kind = sources._FILE_TYPES.get(path.suffix.lower())
    if not path.is_file() or kind is None:
        return None
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return tuple(pq.ParquetFile(path).schema_arrow.names)
        with open(path, encoding="utf-8-sig", newline="\n") as f:    # lines end at "\n" only, as the loaders split
            if kind == "csv":                        # the header: the first row with a non-blank field
                delim = "\t" if path.suffix.lower() == ".tsv" else ","
                return tuple(next(sources.csv_rows(f.read(1 << 20), delim, str(path)))[1])
            line = next(ln for ln in f if ln.strip())    # the whole first record, however long
        if line.lstrip().startswith("["):            # a .json file holding one array of objects
            first = json.loads(path.read_text(encoding="utf-8-sig"))[0]
        else:
            first = json.loads(line)
        return tuple(first) if isinstance(first, dict) else None
    except Exception:  # noqa: BLE001 - any unreadable file: no guess (the loader reports it properly)
        return None


def _folder_columns(path: Path) -> tuple[str, ...] | None:
    """The columns of a ``save_to_disk`` folder from its ``dataset_info.json`` features (a DatasetDict: its first
    split's); None when there are none to read."""
    infos = [path / "dataset_info.json"]
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits") or []
        infos += [path / str(s) / "dataset_info.json" for s in splits]
    except (OSError, ValueError, AttributeError):
        pass
    for info in infos:
        try:
            features = json.loads(info.read_text(encoding="utf-8")).get("features")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(features, dict) and features:
            return tuple(features)
    return None


