"""Causal-LM metrics (tasks/causal_metrics.py) on a tiny random Llama and a word-level ChatML tokenizer.

Each metric is pinned against a slow, plain computation: Hugging Face's own ``labels=`` loss,
an explicit log-softmax over full logits, and one-prompt-at-a-time generation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_causal_data import chat_tokenizer

from loratune.tasks.batches import batch_order
from loratune.tasks.causal import IGNORE_INDEX, collate_causal, encode_rows
from loratune.tasks.causal_metrics import (
    choice_accuracy,
    completion_loss,
    greedy_exact_match,
    sequence_logprobs,
    stop_ids,
)

CPU = torch.device("cpu")
ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."},
                  {"role": "user", "content": "And of Italy?"},
                  {"role": "assistant", "content": "Rome, of course."}]},
    {"messages": [{"role": "user", "content": "Name three primary colours."},
                  {"role": "assistant", "content": "Red, yellow and blue."}]},
    {"messages": [{"role": "system", "content": "You are a terse assistant. Answer in one word."},
                  {"role": "user", "content": "Translate to German: good morning."},
                  {"role": "assistant", "content": "Guten Morgen!"}]},
    {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
    {"messages": [{"role": "user", "content": "Give three tips for staying healthy."},
                  {"role": "assistant", "content": "1. Eat well."}]},
]
QUESTIONS = ["What is the capital of France?", "And of Italy?", "Name three primary colours.", "x y", "Good morning."]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("words")


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():                       # a sharper, less uniform next-token distribution
        m.lm_head.weight.mul_(20)
    return m.eval()


def ids(tok, text: str) -> np.ndarray:
    return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def prompt_ids(tok, question: str) -> np.ndarray:
    text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=False)
    return ids(tok, text)


def head_rows(model) -> tuple[list[int], object]:
    """Rows seen by the LM head per call (positions x batch), and the hook's handle."""
    seen: list[int] = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].reshape(
        -1, args[0].shape[-1]).shape[0]))
    return seen, handle


# --------------------------------------------------------------------------- completion loss

def test_completion_loss_is_the_token_mean_of_the_plain_loss(tok, model) -> None:
    enc = encode_rows(ROWS, tok, 64)
    assert len(set(enc.lengths.tolist())) == len(enc)          # unequal lengths: padded batches
    everything = collate_causal(enc, np.arange(len(enc)), tok.pad_token_id)
    with torch.no_grad():
        plain = model(**everything).loss.item()               # HF: token mean over the one padded batch
    tokens = int((everything["labels"][:, 1:] != IGNORE_INDEX).sum())
    seen, handle = head_rows(model)
    try:
        got = completion_loss(model, enc, CPU, "fp32", tok.pad_token_id, batch_size=2)
    finally:
        handle.remove()
    assert got["tokens"] == tokens
    assert abs(got["loss"] - plain) <= 1e-5
    assert math.isclose(got["perplexity"], math.exp(got["loss"]))
    assert sum(seen) == tokens                                 # the head ran on labelled positions only
    # batch-weighting would differ: the mean of per-batch means is not the token mean here
    with torch.no_grad():
        per_batch = [model(**collate_causal(enc, np.array(b), tok.pad_token_id)).loss.item()
                     for b in ([0, 1], [2, 3], [4])]
    assert abs(np.mean(per_batch) - plain) > 1e-3


def test_models_with_extra_logit_steps_take_the_full_forward(tok, model, monkeypatch) -> None:
    enc = encode_rows(ROWS, tok, 64)
    fast = completion_loss(model, enc, CPU, "fp32", tok.pad_token_id, batch_size=2)
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    seen, handle = head_rows(model)
    try:
        full = completion_loss(model, enc, CPU, "fp32", tok.pad_token_id, batch_size=2)
    finally:
        handle.remove()
    batches = batch_order(enc.lengths, 2, bucket=True, shuffle=False, seed=0, epoch=0)
    assert sum(seen) == sum(len(b) * int(enc.lengths[b].max()) for b in batches) > full["tokens"]
    assert full["tokens"] == fast["tokens"] and abs(full["loss"] - fast["loss"]) <= 1e-5


def test_other_architectures_and_bf16(tok, model) -> None:
    """GPT-2's backbone (``transformer``) is found as Llama's (``model``) is; bf16 autocast stays close."""
    from transformers import GPT2Config, GPT2LMHeadModel

    enc = encode_rows(ROWS, tok, 64)
    everything = collate_causal(enc, np.arange(len(enc)), tok.pad_token_id)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tok), bos_token_id=0,
                                      eos_token_id=0)).eval()
    with torch.no_grad():
        plain = gpt2(**everything).loss.item()
    assert abs(completion_loss(gpt2, enc, CPU, "fp32", tok.pad_token_id, batch_size=2)["loss"] - plain) <= 1e-5
    fp32 = completion_loss(model, enc, CPU, "fp32", tok.pad_token_id)["loss"]
    assert abs(completion_loss(model, enc, CPU, "bf16", tok.pad_token_id)["loss"] - fp32) <= 0.05 * fp32


def test_eval_mode_is_restored(tok, model) -> None:
    enc = encode_rows(ROWS[:2], tok, 64)
    model.train()
    try:
        completion_loss(model, enc, CPU, "fp32", tok.pad_token_id)
        assert model.training
    finally:
        model.eval()


# --------------------------------------------------------------------------- multiple choice

def slow_score(model, prompt: np.ndarray, cand: np.ndarray) -> float:
    full = torch.as_tensor(np.concatenate([prompt, cand]))[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(full).logits[0].double(), dim=-1)
    return float(sum(logp[len(prompt) - 1 + j, int(t)] for j, t in enumerate(cand)))


def test_choice_accuracy_picks_the_likeliest_candidate(tok, model) -> None:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    cands = [np.r_[ids(tok, "Paris ."), end], np.r_[ids(tok, "Rome , of course ."), end]]   # 3 and 6 tokens
    assert len(cands[0]) != len(cands[1])
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    slow = np.array([[slow_score(model, p, c) for c in cands] for p in prompts])
    want = slow.argmax(axis=1)
    gold = want.copy()
    gold[0] = 1 - gold[0]                                      # one wrong on purpose
    acc, picks = choice_accuracy(model, prompts, cands, gold, CPU, "fp32", tok.pad_token_id, batch_size=3)
    assert picks.dtype == np.int64 and (picks == want).all()
    assert acc == pytest.approx((len(prompts) - 1) / len(prompts))
    # the scores themselves: the batched, head-limited sums equal the slow ones
    from loratune.tasks.causal_metrics import _pairs

    enc, k = _pairs(prompts, cands)
    sums, counts = sequence_logprobs(model, enc, CPU, "fp32", tok.pad_token_id, batch_size=4)
    assert k == 2 and counts.tolist() == [len(c) for c in cands] * len(prompts)
    np.testing.assert_allclose(sums.reshape(-1, 2), slow, rtol=0, atol=1e-4)
    # one candidate list per example gives the same (here: the same lists, one swapped in order)
    per = [cands if i % 2 else cands[::-1] for i in range(len(prompts))]
    acc2, picks2 = choice_accuracy(model, prompts, per, np.zeros(len(prompts)), CPU, "fp32", tok.pad_token_id)
    assert [int(p) if i % 2 else 1 - int(p) for i, p in enumerate(picks2)] == want.tolist()
    assert acc2 == pytest.approx(np.mean(picks2 == 0))


# --------------------------------------------------------------------------- greedy exact match

def test_stop_ids_are_eos_and_end_of_turn() -> None:
    tok = chat_tokenizer("words")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tok) == [end]
    other = chat_tokenizer("words", eos="<|endoftext|>")
    assert stop_ids(other) == [other.convert_tokens_to_ids("<|endoftext|>"), end]


def one_by_one(model, tok, prompts, n: int, stops: list[int]) -> list[str]:
    out = []
    for p in prompts:
        with torch.no_grad():
            g = model.generate(torch.as_tensor(p)[None], do_sample=False, max_new_tokens=n, eos_token_id=stops,
                               pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        cut = next((i for i, t in enumerate(g) if t in stops), len(g))
        out.append(tok.decode(g[:cut], skip_special_tokens=True))
    return out


def test_greedy_exact_match_against_one_prompt_at_a_time(tok, model) -> None:
    prompts = [prompt_ids(tok, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1                   # left padding in a batch
    stops = stop_ids(tok)
    alone = one_by_one(model, tok, prompts, 6, stops)
    assert any(a.strip() for a in alone)
    refs = [f"  {alone[0].upper()}\n", "certainly not this", alone[2], alone[3].title() + " ", "nor this"]
    em, gens = greedy_exact_match(model, tok, prompts, refs, CPU, 6, batch_size=4)
    assert gens == alone
    want = np.mean([g.strip().lower() == r.strip().lower() for g, r in zip(alone, refs)])
    assert em == pytest.approx(want) and em >= 0.6
    # a stop token ends a text: a word some generations have (after their start) and others lack
    word = next(w for g in alone for w in g.split()[1:] if sum(w in h.split() for h in alone) < len(alone))
    cut = [" ".join(g.split()[:g.split().index(word)]) if word in g.split() else g for g in alone]
    assert cut != alone and any(c == g for c, g in zip(cut, alone))     # mixed within one batch
    em2, gens2 = greedy_exact_match(model, tok, prompts, [cut[0]] * len(prompts), CPU, 6,
                                    eos_ids=[int(ids(tok, word)[0])] + stops)
    assert gens2 == cut == one_by_one(model, tok, prompts, 6, [int(ids(tok, word)[0])] + stops)
    assert em2 == pytest.approx(np.mean([c == cut[0] for c in cut]))
