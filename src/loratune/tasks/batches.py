"""Batches of a tokenized split: length buckets, dynamic padding, and how much of it is padding.

Task-independent: every task tokenizes into an :class:`Encoded` and batches through these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, eq=False)
class Encoded:
    """A tokenized split, unpadded: ``input_ids[i]`` (int32) has ``lengths[i]`` tokens. Picklable."""

    input_ids: list[np.ndarray]
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


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


