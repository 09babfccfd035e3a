"""Real data, real model: MiniLM on the built-in Rotten Tomatoes snippets (slow; run in CI too)."""

from __future__ import annotations

import json

import pytest

import loratune

pytestmark = pytest.mark.slow


def test_minilm_learns_sentiment_in_one_epoch(tmp_path) -> None:
    r = loratune.train(out=tmp_path / "run", epochs=1)            # every other option at its default
    assert r.validation["accuracy"] >= 0.75, r.validation
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["train"]["trainable_params"] == 74_498                # r=8 on query,value + the classifier
    assert res["train"]["padding_fraction"] < 0.05                   # length buckets: little padding
    print(f"MiniLM 1 epoch: validation accuracy {r.validation['accuracy']:.4f}, test {r.test['accuracy']:.4f}, "
          f"{r.train['tokens_per_s']:,.0f} tokens/s")
