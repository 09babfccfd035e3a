"""Data: the built-in set, user files and Hugging Face datasets; splits; tokenization; batches.

Sources of ``--data``: the built-in ``rotten-tomatoes-4k`` (fetched once into :func:`data_dir`), a
CSV / TSV / JSONL / Parquet file, a ``datasets.save_to_disk`` folder, or a Hugging Face dataset name
(``datasets`` is imported only for the last two). A file has a header (CSV) or keys (JSONL) naming
the text and label columns; labels are strings or integers.

Splits: a dataset's own ``train`` / ``validation`` (``valid``, ``dev``, ``val``) / ``test`` splits and
``--validation-file`` / ``--test-file`` are used as given; a missing validation or test split is cut
from the training data, stratified, 10% each with seed 0 (80/10/10 when both are missing), whatever
``--seed`` is, so every run and trial sees the same split. Label names are the sorted distinct labels
of the training data (numerically when they are all integers); label ids index into them.

Everything that can be wrong with user data raises :class:`InputError` naming the flag, the file, the
line or row, and the problem.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError
from .sources import (BUILTIN_FILE, BUILTIN_NAME, _SOURCE_MEMBER, Rows, _load_data, builtin_data_path,  # noqa: F401
                      data_dir, fetch_builtin_data, main, read_file)

if TYPE_CHECKING:
    import torch

    from .config import TrainConfig

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1
"""Share of the data cut out for a missing validation or test split."""
SPLIT_SEED = 0
"""Seed of the stratified split and of the ``sample_pct`` subsample (fixed, as in the seed project)."""



@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``texts[i]`` has class id ``labels[i]`` (int64, an index into the label names)."""

    texts: list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        assert self.labels.dtype == np.int64 and self.labels.shape == (len(self.texts),)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test and the label names that class ids index (they travel with the adapter)."""

    train: Split
    validation: Split
    test: Split
    label_names: list[str]


@dataclass(frozen=True, eq=False)
class Encoded:
    """A tokenized split, unpadded: ``input_ids[i]`` (int32) has ``lengths[i]`` tokens. Picklable."""

    input_ids: list[np.ndarray]
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


# --------------------------------------------------------------------------- splits

def sort_label_names(names: set[str] | Sequence[str]) -> list[str]:
    """Distinct label names, sorted numerically when they are all integers, else as strings."""
    names = set(names)
    if all(_is_int(n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


def load_splits(cfg: TrainConfig, label_names: Sequence[str] | None = None) -> Splits:
    """Load ``cfg.data`` (+ ``validation_file`` / ``test_file``) into train / validation / test.

    Missing validation / test splits are cut from the training data (module docstring), then
    ``cfg.sample_pct`` < 1 keeps a stratified subsample of the training split only (seed 0).
    ``label_names`` (an adapter's) fixes the classes instead of taking the training labels.
    Raises InputError for unusable data: fewer than two classes, validation or test labels not in
    training, or too few rows to split.
    """
    parts = _load_data(cfg.data, cfg.text_column, cfg.label_column)
    for name, file, fld in (("validation", cfg.validation_file, "--validation-file"),
                            ("test", cfg.test_file, "--test-file")):
        if file is not None:
            parts[name] = (read_file(file, cfg.text_column, cfg.label_column, field=fld), f"{fld}: {file}")
    (texts, labels), where = parts.pop("train", None) or parts.pop("all")
    names = list(label_names) if label_names is not None else sort_label_names(labels)
    if len(names) < 2:
        raise InputError(f"{where}: the training data has a single class {names[0]!r}; need at least 2 classes")
    index = {n: i for i, n in enumerate(names)}
    known = "adapter's labels" if label_names is not None else "training labels"
    y = _ids(labels, index, where, "training", known)
    missing = [n for n in ("validation", "test") if n not in parts]
    held = max(1, int(HELD_OUT_FRACTION * len(y) + 0.5))  # round half up
    if missing and len(y) < len(missing) * held + len(set(y.tolist())):
        raise InputError(f"{where}: {len(y)} rows are too few to cut out {' and '.join(missing)} splits; "
                         f"give --validation-file and --test-file")
    cut = stratified_parts(y, [held] * len(missing), SPLIT_SEED)
    out = {"train": Split([texts[i] for i in cut[0]], y[cut[0]])}
    for name, idx in zip(missing, cut[1:]):
        out[name] = Split([texts[i] for i in idx], y[idx])
    for name, ((t, lab), w) in parts.items():
        if name in ("validation", "test"):
            out[name] = Split(t, _ids(lab, index, w, name, known))
    if cfg.sample_pct < 1.0:
        train = out["train"]
        keep = max(1, int(cfg.sample_pct * len(train) + 0.5))
        rest = stratified_parts(train.labels, [len(train) - keep], SPLIT_SEED)[0]
        out["train"] = Split([train.texts[i] for i in rest], train.labels[rest])
    log.info("data %s: train %d, validation %d, test %d; classes %s", cfg.data, len(out["train"]),
             len(out["validation"]), len(out["test"]), ", ".join(names))
    return Splits(out["train"], out["validation"], out["test"], names)


def stratified_parts(y: np.ndarray, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Split ``range(len(y))`` into ``[rest, part_1, ...]`` with ``len(part_k) == sizes[k]``, stratified.

    Each part's class counts follow the class proportions of ``y`` (largest remainder, so the total is
    exact), while ``rest`` keeps at least one example of every class (a part may then come out
    smaller). The rows of a class are drawn with ``default_rng(seed)``; each part is in input order.
    """
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    avail = counts - 1
    takes = []
    for size in sizes:
        exact = size * counts / counts.sum()
        take = np.minimum(np.floor(exact).astype(np.int64), avail)
        order = np.argsort(-(exact - take), kind="stable")
        short = size - int(take.sum())
        while short > 0 and (avail - take).sum() > 0:
            for c in order:
                if short > 0 and take[c] < avail[c]:
                    take[c] += 1
                    short -= 1
        avail = avail - take
        takes.append(take)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(sizes) + 1)]
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(inverse == c))
        start = 0
        for k, take in enumerate(takes):
            parts[k + 1].append(idx[start:start + take[c]])
            start += int(take[c])
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _ids(labels: list[str], index: dict[str, int], where: str, what: str, known: str) -> np.ndarray:
    unseen = sorted(set(labels) - set(index))
    if unseen:
        shown = ", ".join(repr(u) for u in unseen[:10]) + (", ..." if len(unseen) > 10 else "")
        raise InputError(f"{where}: label(s) {shown} in the {what} data are not among the {known} "
                         f"({', '.join(index)})")
    return np.fromiter((index[lab] for lab in labels), dtype=np.int64, count=len(labels))


def _is_int(s: str) -> bool:
    try:
        return str(int(s)) == s
    except ValueError:
        return False


# --------------------------------------------------------------------------- tokens and batches

def tokenize(split: Split, tokenizer: Any, max_length: int) -> Encoded:
    """Tokenize once, unpadded, in one batched call of a (fast) Hugging Face tokenizer.

    Texts are truncated to ``max_length`` tokens (special tokens included); padding happens per
    batch in :func:`collate`.
    """
    enc = tokenizer(split.texts, truncation=True, max_length=max_length, padding=False,
                    return_attention_mask=False, return_token_type_ids=False)
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return Encoded(ids, lengths, split.labels.copy())


def batch_order(lengths: np.ndarray, batch_size: int, *, bucket: bool, shuffle: bool, seed: int,
                epoch: int) -> list[np.ndarray]:
    """The batches of one pass as arrays of example indices; every index exactly once.

    - ``shuffle=False`` (evaluation): sorted by length, longest first, ties in input order;
      deterministic, and the indices put predictions back in input order.
    - ``shuffle=True, bucket=False``: a random permutation cut into batches.
    - ``shuffle=True, bucket=True``: the permutation is cut into mega-batches of ``100 * batch_size``
      examples, each sorted by length and cut into batches, and the batches are shuffled: batches of
      similar lengths (little padding) in random order.
    The randomness is ``default_rng([seed, epoch])``: the same (seed, epoch) gives the same batches.
    """
    lengths = np.asarray(lengths)
    n = len(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    if not bucket:
        return [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    mega = 100 * batch_size
    batches: list[np.ndarray] = []
    for m in range(0, n, mega):
        chunk = perm[m:m + mega]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(enc: Encoded, idx: np.ndarray, pad_id: int, pad_to: int = 1) -> dict[str, torch.Tensor]:
    """One batch, right-padded to its longest sequence: ``input_ids``, ``attention_mask`` (B, T), ``labels`` (B,).

    ``pad_to`` > 1 rounds the width T up to a multiple of it (fewer distinct shapes; masked positions).
    """
    import torch

    lens = enc.lengths[idx]
    width = -(-int(lens.max()) // pad_to) * pad_to
    ids = np.full((len(idx), width), pad_id, dtype=np.int64)
    for row, i in enumerate(idx):
        ids[row, :lens[row]] = enc.input_ids[i]
    mask = (np.arange(width)[None, :] < lens[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(enc.labels[idx].astype(np.int64))}


def padding_fraction(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Share of the padded token slots of these batches that are padding (0 = none)."""
    lengths = np.asarray(lengths)
    slots = sum(len(b) * int(lengths[b].max()) for b in batches if len(b))
    real = sum(int(lengths[b].sum()) for b in batches)
    return 0.0 if slots == 0 else 1.0 - real / slots


# --------------------------------------------------------------------------- python -m loratune.data

if __name__ == "__main__":
    sys.exit(main())
