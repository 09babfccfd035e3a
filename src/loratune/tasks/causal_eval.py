"""A causal-LM split ready to evaluate, and the one way to evaluate a model on it.

:func:`prepare_split` tokenizes a split's conversations once (:class:`CausalSplit`): the sequences with
their loss masks (every trained turn), the prompt of each (everything before its last assistant
turn), its reference (that turn's text) and, where the data's references are a label set, every
(row, candidate) sequence with labels on the candidate's tokens only.

:func:`evaluate_causal` gives what results.json, metrics.jsonl and ``loratune eval`` show:

- ``loss`` and ``perplexity``: mean NLL of the trained tokens (completions and their end-of-turn token);
- ``exact_match``: greedy generation, up to the longest reference's tokens + 8, equal to the reference
  after ``.strip().lower()``;
- ``accuracy`` (label sets only): lm-eval-harness's multiple choice, the candidate whose tokens (with the
  end-of-turn token) have the highest summed log-likelihood after the prompt.

Where every row trains on its last turn only (prompt-completion data, the built-in), the gold
candidate's sequence *is* the row's sequence, so the loss comes from the choice pass at no extra cost.
:func:`score_causal` is the same evaluation that also says which rows choice scoring got right (a
search pairs them between its best and its untuned default in McNemar's test). A run keeps the generations exact
match made for the first :data:`SAMPLE_ROWS` validation rows, the base model's and the adapter's
(:func:`sample_rows`: generations.json), for the report: no generation of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from loratune.tasks.causal import IGNORE_INDEX, CausalEncoded, encode_conversations
from loratune.tasks.causal_metrics import greedy_generate, sequence_logprobs

EXTRA_NEW_TOKENS = 8
"""Greedy generation for exact match runs to the longest reference's length plus this many tokens."""
SAMPLE_ROWS = 16
"""A run keeps the generations of this many validation rows, its first (generations.json: :func:`sample_rows`)."""


@dataclass(frozen=True, eq=False)
class CausalSplit:
    """A tokenized evaluation split (picklable: a search ships it to its trials once).

    ``enc``: each row's sequence, labels on every trained turn (``enc.starts``: where its last turn
    begins, so ``input_ids[i][:starts[i]]`` is its prompt); ``references``: the last turn's text;
    ``choices``: ``k`` candidate sequences per row, row-major, labels on the candidate only (None
    without a label set); ``gold``: the reference's index among the candidates (-1: not among them);
    ``last_turn_only``: every row's labels are all in its last turn; ``questions``: the text of each row's last
    user turn before that (its decoded prompt where it has none), what a person reads as the row's prompt.
    """

    enc: CausalEncoded
    references: list[str]
    choices: CausalEncoded | None
    gold: np.ndarray | None
    last_turn_only: bool
    max_new_tokens: int
    questions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.enc)

    def prompts(self) -> list[np.ndarray]:
        """Each row's prompt tokens: its sequence up to its last assistant turn (the generation prompt)."""
        assert self.enc.starts is not None
        return [ids[:s] for ids, s in zip(self.enc.input_ids, self.enc.starts)]


def prepare_split(convs: Sequence[list[dict[str, Any]]], tokenizer: Any, max_length: int, wheres: Sequence[str],
                  candidates: Sequence[str] = ()) -> CausalSplit:
    """Tokenize an evaluation split once; ``candidates`` (a label set, or none) are scored as its choices."""
    from loratune.training.causal_data import reference

    enc = encode_conversations(convs, tokenizer, max_length, wheres)
    refs = [reference(c) for c in convs]
    assert enc.starts is not None
    last_only = all(not (lab[:s] != IGNORE_INDEX).any() for lab, s in zip(enc.labels, enc.starts))
    ref_tokens = max(int((lab[s:] != IGNORE_INDEX).sum()) for lab, s in zip(enc.labels, enc.starts))
    choices = gold = None
    if candidates:
        index = {c: i for i, c in enumerate(candidates)}       # as written: " positive" is not "positive"
        gold = np.asarray([index.get(r, -1) for r in refs], dtype=np.int64)
        pairs, pair_wheres = [], []
        for conv, where in zip(convs, wheres):
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            head = [dict(m, train=False) if m["role"] == "assistant" else m for m in conv[:last]]
            for cand in candidates:
                pairs.append(head + [{"role": "assistant", "content": cand}])
                pair_wheres.append(f"{where} (candidate {cand!r})")
        choices = encode_conversations(pairs, tokenizer, max_length, pair_wheres)
        ref_tokens = max(ref_tokens, max(int((lab != IGNORE_INDEX).sum()) for lab in choices.labels))
    questions = [_question(conv, ids[:s], tokenizer) for conv, ids, s in zip(convs, enc.input_ids, enc.starts)]
    return CausalSplit(enc, refs, choices, gold, last_only, ref_tokens + EXTRA_NEW_TOKENS, questions)


def _question(conv: Sequence[dict[str, Any]], prompt: np.ndarray, tokenizer: Any) -> str:
    """The last user turn before a conversation's last assistant turn, or (no such turn) its prompt decoded."""
    last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
    users = [m["content"] for m in conv[:last] if m["role"] == "user"]
    return users[-1] if users else tokenizer.decode(prompt, skip_special_tokens=True)


def sample_rows(split: CausalSplit, base: Sequence[str] | None,
                adapter: Sequence[str] | None) -> list[dict[str, str | None]]:
    """generations.json's rows: the first :data:`SAMPLE_ROWS` rows of ``split`` (fewer in a smaller split), each
    ``{"prompt", "reference", "base", "adapter"}``: its question, its reference, and the greedy answers of the base
    model and of the adapter, in row order (``base`` / ``adapter`` None: not known, a null column)."""
    n = min(SAMPLE_ROWS, len(split))
    return [{"prompt": split.questions[i] if i < len(split.questions) else None, "reference": split.references[i],
             "base": base[i] if base is not None and i < len(base) else None,
             "adapter": adapter[i] if adapter is not None and i < len(adapter) else None} for i in range(n)]


@dataclass(frozen=True, eq=False)
class CausalScores:
    """:func:`score_causal`'s answer: the split's metrics, the greedy generations in row order (empty without
    ``generate``), and ``correct``, ``(N,)`` booleans in row order: whether choice scoring picked the row's
    reference (None without a label set). ``correct.mean()`` is ``metrics["accuracy"]``."""

    metrics: dict[str, float]
    generations: list[str]
    correct: np.ndarray | None


def evaluate_causal(model: nn.Module, tokenizer: Any, split: CausalSplit, device: torch.device, precision: str,
                    pad_id: int, *, batch_size: int = 16,
                    generate: bool = True) -> tuple[dict[str, float], list[str]]:
    """The split's metrics (module docstring) and the greedy generations in row order (empty when
    ``generate`` is False: no ``exact_match`` then)."""
    scores = score_causal(model, tokenizer, split, device, precision, pad_id, batch_size=batch_size,
                          generate=generate)
    return scores.metrics, scores.generations


def score_causal(model: nn.Module, tokenizer: Any, split: CausalSplit, device: torch.device, precision: str,
                 pad_id: int, *, batch_size: int = 16, generate: bool = True) -> CausalScores:
    """:func:`evaluate_causal`, with which rows choice scoring got right as well (what McNemar's test pairs
    between two adapters on the same split: a search's best against its untuned default)."""
    metrics: dict[str, float] = {}
    correct: np.ndarray | None = None
    loss_from_choices = False
    if split.choices is not None and split.gold is not None:
        k = len(split.choices) // max(1, len(split))
        sums, counts = sequence_logprobs(model, split.choices, device, precision, pad_id, batch_size)
        scores = sums.reshape(len(split), k)
        picks = np.argmax(scores, axis=1)
        correct = picks == split.gold
        metrics["accuracy"] = float(np.mean(correct))
        if split.last_turn_only and (split.gold >= 0).all():
            rows = np.arange(len(split)) * k + split.gold
            n = int(counts[rows].sum())
            metrics["loss"] = float(-sums[rows].sum() / n) if n else float("nan")
            loss_from_choices = True
    if not loss_from_choices:
        sums, counts = sequence_logprobs(model, split.enc, device, precision, pad_id, batch_size)
        n = int(counts.sum())
        metrics["loss"] = float(-sums.sum() / n) if n else float("nan")
    metrics["perplexity"] = float(np.exp(metrics["loss"])) if np.isfinite(metrics["loss"]) else float("nan")
    generations: list[str] = []
    if generate:
        prompts = split.prompts()             # a completion longer than --max-length alone leaves no prompt:
        keep = [i for i, p in enumerate(prompts) if len(p)]                  # nothing to answer, a miss
        generations = [""] * len(prompts)
        if keep:
            for i, g in zip(keep, greedy_generate(model, tokenizer, [prompts[i] for i in keep], device,
                                                  split.max_new_tokens, precision=precision, batch_size=batch_size)):
                generations[i] = g
        hits = [bool(len(p)) and g.strip().lower() == r.strip().lower()
                for p, g, r in zip(prompts, generations, split.references)]
        metrics["exact_match"] = float(np.mean(hits)) if hits else float("nan")
    order = ("loss", "perplexity", "accuracy", "exact_match")
    return CausalScores({key: metrics[key] for key in order if key in metrics}, generations, correct)
