"""Sequence classification: a split's texts and labels, their tokens, and class probabilities without gradients.

:func:`evaluate` is the one way to run a model over a labelled split (training's per-epoch
validation, ``loratune eval``, the search's test of its best trial, the report's test section).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loratune.runtime import autocast
from loratune.tasks.batches import Encoded, batch_order, collate
from loratune.tasks.metrics import compute_metrics


@torch.no_grad()
def predict_probs(model: nn.Module, enc: Encoded, device: torch.device, precision: str, *, pad_id: int = 0,
                  labels: np.ndarray | None = None, batch_size: int = 32) -> tuple[np.ndarray, float | None]:
    """Softmax probabilities (N, C) in input order, and the mean cross-entropy when ``labels`` are given.

    Batches are sorted by length (least padding); the model is put in eval mode and back. 32 a batch: MiniLM on the
    400 validation sentences of the built-in data (bf16, 6 interleaved rounds) took 0.913 s at 1 thread and 0.703 s
    at 2 against 1.053 and 0.794 s in batches of 64 (16 and 24: no faster than 32); fewer padding tokens.
    """
    was_training = model.training
    model.eval()
    probs: np.ndarray | None = None
    loss_sum = 0.0
    try:
        for idx in batch_order(enc.lengths, batch_size, bucket=True, shuffle=False, seed=0, epoch=0):
            b = collate(enc, idx, pad_id)     # GPT-2 style heads find the last token by it
            ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
            with autocast(device, precision):
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            if labels is not None:
                loss_sum += F.cross_entropy(logits, torch.as_tensor(labels[idx], device=device),
                                            reduction="sum").item()
            p = torch.softmax(logits, dim=-1).cpu().numpy()
            if probs is None:
                probs = np.zeros((len(enc), p.shape[1]), dtype=np.float64)
            probs[idx] = p
    finally:
        model.train(was_training)
    if probs is None:
        probs = np.zeros((0, 0))
    return probs, (loss_sum / max(1, len(enc)) if labels is not None else None)


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``texts[i]`` has class id ``labels[i]`` (int64, an index into the label names)."""

    texts: list[str]
    labels: np.ndarray

    def __post_init__(self) -> None:
        assert self.labels.dtype == np.int64 and self.labels.shape == (len(self.texts),)

    def __len__(self) -> int:
        return len(self.texts)


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


def evaluate(model: nn.Module, enc: Encoded, device: torch.device, precision: str,
             pad_id: int) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of a labelled split and its class probabilities (N, C) in input order: the one way to run a
    model over a split (training's validation, ``eval``, the search's test, the report)."""
    probs, loss = predict_probs(model, enc, device, precision, pad_id=pad_id, labels=enc.labels)
    return compute_metrics(enc.labels, probs, loss=loss), probs
