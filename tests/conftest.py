"""Shared fixtures: tiny random-init models of each architecture family (seconds, CPU)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
logging.getLogger("transformers").setLevel(logging.ERROR)


def tiny_model(arch: str, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    """A random-init sequence classifier of family ``arch`` with 2 layers, width 32."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=num_labels)
        return tf.DistilBertForSequenceClassification(cfg)
    common = dict(vocab_size=120, num_labels=num_labels)
    if arch in ("bert", "roberta"):
        cls, conf = {"bert": (tf.BertForSequenceClassification, tf.BertConfig),
                     "roberta": (tf.RobertaForSequenceClassification, tf.RobertaConfig)}[arch]
        return cls(conf(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, **common))
    if arch == "gpt2":
        return tf.GPT2ForSequenceClassification(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                              pad_token_id=0, bos_token_id=1, eos_token_id=1, **common))
    if arch == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                                 num_key_value_heads=2, intermediate_size=64,
                                                                 pad_token_id=0, bos_token_id=1, eos_token_id=1, **common))
    raise ValueError(arch)


ARCHS = ["distilbert", "bert", "roberta", "gpt2"]


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Four rows of token ids (no padding), for forward-pass comparisons."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (4, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
