"""Splits: train / validation / test of ``--data`` (read by :mod:`loratune.training.sources`), and label names.

Splits: a dataset's own ``train`` / ``validation`` (``valid``, ``dev``, ``val``) / ``test`` splits and
``--validation-file`` / ``--test-file`` are used as given; a missing validation or test split is cut
from the training data, stratified, 10% each, drawn with ``--split-seed`` (default 0; 80/10/10 when both
are missing), whatever ``--seed`` is, so every run and trial with one split seed sees the same split. Label names are the sorted distinct labels
of the training data (numerically when they are all integers); label ids index into them.

Everything that can be wrong with user data raises :class:`InputError` naming the flag, the file, the
line or row, and the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loratune.errors import InputError
from loratune.tasks.classification import Split
from loratune.training.sources import _load_data, read_file

if TYPE_CHECKING:
    from loratune.training.options import TrainConfig

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.1
"""Share of the data cut out for a missing validation or test split."""



@dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test and the label names that class ids index (they travel with the adapter)."""

    train: Split
    validation: Split
    test: Split
    label_names: list[str]


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
    ``cfg.sample_pct`` < 1 keeps a stratified subsample of the training split only; both draw with
    ``cfg.split_seed`` (never ``cfg.seed``).
    ``label_names`` (an adapter's) fixes the classes instead of taking the training labels.
    Raises InputError for unusable data: fewer than two classes, validation or test labels not in
    training, or too few rows to split.
    """
    replaced = [n for n, file in (("validation", cfg.validation_file), ("test", cfg.test_file)) if file is not None]
    parts = _load_data(cfg.data, cfg.text_column, cfg.label_column, replaced)     # replaced splits: not read
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
    if not missing and cfg.split_seed and cfg.sample_pct == 1.0:
        raise InputError(f"--split-seed: {cfg.data} has its own validation and test splits, so nothing is cut "
                         "(and no --sample-pct subsample drawn); "
                         "leave --split-seed at 0")
    cut = stratified_parts(y, [held] * len(missing), cfg.split_seed)
    out = {"train": Split([texts[i] for i in cut[0]], y[cut[0]])}
    for name, idx in zip(missing, cut[1:]):
        out[name] = Split([texts[i] for i in idx], y[idx])
    for name, ((t, lab), w) in parts.items():
        if name in ("validation", "test"):
            out[name] = Split(t, _ids(lab, index, w, name, known))
    if cfg.sample_pct < 1.0:
        train = out["train"]
        keep = max(1, int(cfg.sample_pct * len(train) + 0.5))
        rest = stratified_parts(train.labels, [len(train) - keep], cfg.split_seed)[0]
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
