"""Forward passes without gradients: class probabilities for evaluation and prediction."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import Encoded, batch_order, collate
from .runtime import autocast


@torch.no_grad()
def predict_probs(model: nn.Module, enc: Encoded, device: torch.device, precision: str, *, pad_id: int = 0,
                  labels: np.ndarray | None = None, batch_size: int = 64) -> tuple[np.ndarray, float | None]:
    """Softmax probabilities (N, C) in input order, and the mean cross-entropy when ``labels`` are given.

    Batches are sorted by length (least padding); the model is put in eval mode and back.
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
