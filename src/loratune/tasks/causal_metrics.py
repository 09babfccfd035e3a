"""Causal-LM metrics: completion loss and perplexity, multiple-choice accuracy, greedy exact match.

All run without gradients, in eval mode (restored afterwards), over batches sorted by length
(:func:`batch_order`) under :func:`autocast`:

- :func:`completion_loss`: the mean negative log-likelihood of every trained label token of a
  :class:`CausalEncoded` split (token-weighted, as Hugging Face's ``model(..., labels=...)`` over
  the whole split at once would give), and its exponential, the perplexity.
- :func:`choice_accuracy`: lm-eval-harness's multiple-choice scoring: each candidate completion is
  scored by the sum of its tokens' log-probabilities after the prompt, and the best one is picked.
- :func:`greedy_exact_match`: greedy generation after each prompt, compared with a reference text
  case- and whitespace-insensitively.

The LM head is computed only where it is needed (as TRL does): the model's backbone gives the hidden
states, and the head (a vocabulary-wide projection, 49,152 rows for SmolLM2) runs only on the
positions whose *next* token has a label. Models whose logits are more than ``lm_head(hidden)``
(a logit soft-cap or scale in their config) go through their full forward instead.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from loratune.errors import InputError
from loratune.runtime import autocast
from loratune.tasks.batches import batch_order
from loratune.tasks.causal import (
    IGNORE_INDEX,
    CausalEncoded,
    collate_causal,
    encode_conversation,
)

_LOGIT_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
"""Config fields of models whose logits are not just ``lm_head(hidden)`` (Gemma 2, Cohere, Granite)."""


class _EvalMode:
    """``with _EvalMode(model):`` eval mode inside, the previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


class only_given_settings:
    """``with only_given_settings(model): model.generate(...)`` decodes with the settings the call passes and
    transformers' own defaults, nothing else. transformers fills every setting a call leaves unset from the
    model's ``generation_config.json``: a ``repetition_penalty``, ``no_repeat_ngram_size`` or ``min_p`` there
    made a greedy call not greedy (and ``generate`` differ from ``serve``, which decodes by itself)."""

    _lock = threading.Lock()
    _held: dict[int, list[Any]] = {}      # id(model) -> [contexts inside, the model's own config]: threads share it

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        from transformers import GenerationConfig

        with self._lock:                  # the first in keeps the model's config; the last out puts it back
            held = self._held.setdefault(id(self.model), [0, getattr(self.model, "generation_config", None)])
            held[0] += 1
            if held[0] == 1:
                self.model.generation_config = GenerationConfig()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            held = self._held[id(self.model)]
            held[0] -= 1
            if held[0] == 0:
                self.model.generation_config = held[1]
                del self._held[id(self.model)]


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, LM head) of a Hugging Face causal LM whose logits are ``head(backbone(...)[0])``, else None."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_EXTRAS):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else None
    if backbone is None or backbone is model:
        backbone = getattr(model, "base_model", None)
    if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module) or backbone is model:
        return None
    return backbone, head


def label_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                   precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of every label token of a :func:`collate_causal` batch, and its row.

    Labels are unshifted (``labels[b, t]`` is predicted by the logits at ``t - 1``), so the head runs
    on the hidden states at ``t - 1`` for each ``t >= 1`` with a label. Returns two 1-D tensors on
    ``device``: float32 log-probabilities and int64 row numbers, in row-major order of the labels.
    """
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)
    target = labels[:, 1:]
    rows, cols = torch.nonzero(target != IGNORE_INDEX, as_tuple=True)
    tokens = target[rows, cols]
    parts = _split_head(model)
    with autocast(device, precision):
        if parts is not None:
            backbone, head = parts
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False)[0]
            logits = head(hidden[rows, cols]).float()
        else:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][rows, cols].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return logp, rows


@torch.no_grad()
def sequence_logprobs(model: nn.Module, enc: CausalEncoded, device: torch.device, precision: str, pad_id: int,
                      batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence of ``enc``: the summed log-probability of its label tokens (float64) and their number (int64)."""
    sums = np.zeros(len(enc), dtype=np.float64)
    counts = np.zeros(len(enc), dtype=np.int64)
    with _EvalMode(model):
        for idx in batch_order(enc.lengths, batch_size, bucket=True, shuffle=False, seed=0, epoch=0):
            logp, rows = label_logprobs(model, collate_causal(enc, idx, pad_id), device, precision)
            n = len(idx)
            sums[idx] = torch.zeros(n, dtype=torch.float64, device=logp.device).index_add_(
                0, rows, logp.double()).cpu().numpy()
            counts[idx] = torch.bincount(rows, minlength=n).cpu().numpy()
    return sums, counts


def completion_loss(model: nn.Module, enc: CausalEncoded, device: torch.device, precision: str, pad_id: int,
                    batch_size: int = 16) -> dict[str, float]:
    """``loss`` (mean NLL per label token over the whole split), ``perplexity`` (exp of it), ``tokens`` (their count).

    A split without any label token has loss and perplexity NaN.
    """
    sums, counts = sequence_logprobs(model, enc, device, precision, pad_id, batch_size)
    n = int(counts.sum())
    loss = float(-sums.sum() / n) if n else float("nan")
    return {"loss": loss, "perplexity": float(np.exp(loss)), "tokens": n}


def _pairs(prompts_ids: Sequence[np.ndarray], choices_ids: Sequence[Any]) -> tuple[CausalEncoded, int]:
    """Every (prompt, candidate) as one sequence, labels on the candidate's tokens; example-major order."""
    per_example = len(choices_ids) > 0 and not isinstance(choices_ids[0], np.ndarray)
    if per_example and len(choices_ids) != len(prompts_ids):
        raise ValueError(f"{len(choices_ids)} candidate lists for {len(prompts_ids)} prompts")
    k = len(choices_ids[0]) if per_example else len(choices_ids)
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for i, prompt in enumerate(prompts_ids):
        cands = choices_ids[i] if per_example else choices_ids
        if len(cands) != k:
            raise ValueError(f"example {i} has {len(cands)} candidates; expected {k}")
        prompt = np.asarray(prompt, dtype=np.int64)
        if len(prompt) == 0:
            raise InputError(f"example {i}: an empty prompt; a candidate's first token needs one before it")
        for c in cands:
            c = np.asarray(c, dtype=np.int64)
            if len(c) == 0:
                raise InputError(f"example {i}: an empty candidate")
            ids.append(np.concatenate([prompt, c]).astype(np.int32))
            labels.append(np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), c]))
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return CausalEncoded(ids, lengths, labels, 0), k


def choice_accuracy(model: nn.Module, prompts_ids: Sequence[np.ndarray], choices_ids: Sequence[Any],
                    gold: np.ndarray, device: torch.device, precision: str, pad_id: int,
                    batch_size: int = 16) -> tuple[float, np.ndarray]:
    """Multiple-choice accuracy as lm-eval-harness's ``acc``, and the picked candidate of each example (int64).

    ``choices_ids`` is either one list of candidates (1-D token arrays, e.g. "positive<|im_end|>" and
    "negative<|im_end|>") shared by every example, or one such list per example (all of the same
    size). A candidate's score is the sum of its tokens' log-probabilities after the prompt; the
    highest wins (the first on a tie). ``gold[i]`` is the right candidate's index. All
    (example, candidate) pairs are batched together.
    """
    enc, k = _pairs(prompts_ids, choices_ids)
    gold = np.asarray(gold, dtype=np.int64)
    if gold.shape != (len(prompts_ids),):
        raise ValueError(f"gold has shape {gold.shape}; expected ({len(prompts_ids)},)")
    if not len(prompts_ids):
        return float("nan"), np.zeros(0, dtype=np.int64)
    if k == 0:
        raise ValueError("no candidates")
    sums, _ = sequence_logprobs(model, enc, device, precision, pad_id, batch_size)
    picks = np.argmax(sums.reshape(len(prompts_ids), k), axis=1).astype(np.int64)
    return float(np.mean(picks == gold)), picks


def stop_ids(tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the tokenizer's EOS and its chat template's end-of-turn token.

    The end-of-turn token (``<|im_end|>`` in ChatML) is the last token :func:`encode_conversation`
    keeps of a one-turn conversation (sequences end at their last trained token); a tokenizer without
    a template, or whose template does not end turns with a special token, adds nothing.
    """
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        try:
            ids, _, _ = encode_conversation([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                            tokenizer, 1 << 16)
            out.append(int(ids[-1]))
        except InputError:
            pass
    return list(dict.fromkeys(int(i) for i in out))


def _cut(row: torch.Tensor, stops: set[int]) -> list[int]:
    """A generated row up to (without) its first stop token."""
    out: list[int] = []
    for t in row.tolist():
        if t in stops:
            break
        out.append(t)
    return out


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: Any, prompts_ids: Sequence[np.ndarray], device: torch.device,
                    max_new_tokens: int, *, precision: str = "fp32", batch_size: int = 16,
                    eos_ids: Sequence[int] | None = None) -> list[str]:
    """Greedy continuation of each prompt (in input order), decoded without special tokens.

    Batches are left-padded (generation appends on the right). A generation stops at any of
    ``eos_ids`` (default :func:`stop_ids`), which is left out of the text, or after ``max_new_tokens``.
    On a model with a learned position table (GPT-2's), prompt and answer fit in it: a longer prompt keeps its
    last (table - ``max_new_tokens``) tokens, as lm-evaluation-harness cuts a context. Only the settings
    passed here shape the answer (:class:`only_given_settings`), whatever the model's generation config says.
    """
    from loratune.training.models import position_limit

    stops = list(eos_ids) if eos_ids is not None else stop_ids(tokenizer)
    if not stops:
        raise InputError("the tokenizer has no EOS or end-of-turn token to stop generation on")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    limit = position_limit(model)                 # a learned position table (GPT-2's): prompt and answer fit in it
    if limit is not None and max((len(p) for p in prompts_ids), default=0) + max_new_tokens > limit:
        # lm-evaluation-harness's rule: a prompt keeps its last (limit - max_new_tokens) tokens
        max_new_tokens = min(max_new_tokens, limit - 1)
        prompts_ids = [p[len(p) - (limit - max_new_tokens):] if len(p) > limit - max_new_tokens else p
                       for p in prompts_ids]
    lengths = np.fromiter((len(p) for p in prompts_ids), dtype=np.int64, count=len(prompts_ids))
    texts = [""] * len(prompts_ids)
    with _EvalMode(model), only_given_settings(model):
        for idx in batch_order(lengths, batch_size, bucket=True, shuffle=False, seed=0, epoch=0):
            width = int(lengths[idx].max())
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = int(lengths[i])
                ids[row, width - n:] = torch.as_tensor(np.asarray(prompts_ids[i], dtype=np.int64))
                mask[row, width - n:] = 1
            with autocast(device, precision):
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                     num_beams=1)
            for row, i in enumerate(idx):
                texts[i] = tokenizer.decode(_cut(out[row, width:], set(stops)), skip_special_tokens=True)
    return texts


def greedy_exact_match(model: nn.Module, tokenizer: Any, prompts_ids: Sequence[np.ndarray], references: Sequence[str],
                       device: torch.device, max_new_tokens: int, *, precision: str = "fp32", batch_size: int = 16,
                       eos_ids: Sequence[int] | None = None) -> tuple[float, list[str]]:
    """The share of prompts whose greedy generation (:func:`greedy_generate`) equals its reference
    after ``.strip().lower()`` on both, and the generations (NaN for no prompts)."""
    if len(references) != len(prompts_ids):
        raise ValueError(f"{len(references)} references for {len(prompts_ids)} prompts")
    gens = greedy_generate(model, tokenizer, prompts_ids, device, max_new_tokens, precision=precision,
                           batch_size=batch_size, eos_ids=eos_ids)
    if not gens:
        return float("nan"), gens
    hits = [g.strip().lower() == r.strip().lower() for g, r in zip(gens, references)]
    return float(np.mean(hits)), gens
