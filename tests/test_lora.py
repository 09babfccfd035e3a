"""The layer's math against closed form, merge/unmerge/switch tolerances, per-row routing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, tiny_model
from torch import nn

from loratune.core.inject import (
    LoraSpec,
    inject,
    lora_layers,
    merge,
    merge_and_unload,
    routed,
    set_active,
    unmerge,
)
from loratune.core.lora import LoraLinear
from loratune.errors import InputError


def _randomize_b(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.adapters:
                b = layer.adapters[name].lora_B
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_formula_matches_closed_form() -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoraLinear(base)
    ad = layer.add_adapter("a", r=3, alpha=6.0)
    with torch.no_grad():
        ad.lora_B.normal_()
    layer.active = "a"
    x = torch.randn(5, 12)
    expected = x @ base.weight.T + base.bias + (6.0 / 3) * x @ (ad.lora_B @ ad.lora_A).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert ad.lora_A.shape == (3, 12) and ad.lora_B.shape == (7, 3)


def test_rslora_scaling_and_init() -> None:
    layer = LoraLinear(nn.Linear(16, 16))
    assert layer.add_adapter("r", r=4, alpha=8, rslora=True).scaling == pytest.approx(8 / math.sqrt(4))
    assert layer.add_adapter("p", r=4, alpha=8).scaling == pytest.approx(2.0)
    ad = layer.add_adapter("k", r=4, alpha=8)
    bound = 1 / math.sqrt(16)                       # kaiming_uniform(a=√5) on fan_in 16
    assert ad.lora_A.abs().max() <= bound and torch.count_nonzero(ad.lora_B) == 0
    g = layer.add_adapter("g", r=4, alpha=8, init="gaussian")
    assert 0.1 < g.lora_A.std().item() < 0.45       # std 1/r = 0.25


def test_fresh_adapter_is_a_no_op(batch) -> None:
    for arch in ARCHS:
        ref, model = tiny_model(arch).eval(), tiny_model(arch).eval()
        inject(model, LoraSpec(targets=("qv",), rank=4, alpha=8))
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, rtol=0, atol=0)


def test_conv1d_weight_is_transposed() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(9, 5)                         # nf=9 outputs, nx=5 inputs; weight (5, 9)
    layer = LoraLinear(conv)
    ad = layer.add_adapter("a", r=2, alpha=2)
    with torch.no_grad():
        ad.lora_B.normal_()
    layer.active = "a"
    x = torch.randn(3, 5)
    expected = conv(x) + x @ (ad.lora_B @ ad.lora_A).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.merge()
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_rank_and_dropout() -> None:
    layer = LoraLinear(nn.Linear(4, 6))
    with pytest.raises(InputError, match="min"):
        layer.add_adapter("a", r=5, alpha=1)
    with pytest.raises(InputError, match="dropout"):
        layer.add_adapter("b", r=2, alpha=1, dropout=1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge(arch: str, batch) -> None:
    model = tiny_model(arch).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, LoraSpec(targets=("qv",), rank=4, alpha=8))
    _randomize_b(model)
    unmerged = model(**batch).logits
    merge(model)
    merged = model(**batch).logits
    assert _rel(merged, unmerged) <= 1e-5
    merge(model)                                              # merging twice == once
    assert _rel(model(**batch).logits, unmerged) <= 1e-5
    unmerge(model)
    for n, p in model.named_parameters():
        key = n.replace(".base_layer", "")
        if key in base:
            assert (p - base[key]).abs().max().item() <= 1e-6, n
    merge_and_unload(model)
    assert not lora_layers(model)                             # no added modules: no added latency
    assert _rel(model(**batch).logits, unmerged) <= 1e-5


def test_switching_100_times_keeps_w0() -> None:
    model = tiny_model("bert").eval()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if "query.weight" in n}
    inject(model, LoraSpec(targets=("q",), rank=4, alpha=8), "a")
    inject(model, LoraSpec(targets=("q",), rank=2, alpha=4), "b")
    _randomize_b(model, "a", seed=1)
    _randomize_b(model, "b", seed=2)
    for i in range(100):
        name, other = ("a", "b") if i % 2 == 0 else ("b", "a")
        unmerge(model, other)
        merge(model, name)
    unmerge(model)
    for n, p in model.named_parameters():
        if "query.base_layer.weight" in n:
            ref = w0[n.replace(".base_layer", "")]
            assert _rel(p, ref) <= 1e-5


def test_switching_away_from_a_merged_adapter_unmerges_it(batch, caplog) -> None:
    # As peft's set_adapter: a merged adapter would otherwise stay in the base weights.
    model = tiny_model("bert").eval()
    base = model(**batch).logits
    inject(model, LoraSpec(targets=("qv",), rank=4, alpha=8), "a")
    inject(model, LoraSpec(targets=("qv",), rank=2, alpha=4), "b")
    _randomize_b(model, "a", seed=1)
    _randomize_b(model, "b", seed=2)
    set_active(model, "b")
    only_b = model(**batch).logits
    merge(model, "a")
    assert _rel(model(**batch).logits, base) > 1e-3                       # a is in the weights now
    with caplog.at_level("WARNING", logger="loratune.core.inject"):
        set_active(model, None)
    assert "'a' was merged into the base weights; unmerging it" in caplog.text
    assert _rel(model(**batch).logits, base) <= 1e-5
    merge(model, "a")
    set_active(model, "a")                                                # merged and active: stays merged
    assert next(iter(lora_layers(model).values())).merged == ["a"]
    set_active(model, "b")
    assert _rel(model(**batch).logits, only_b) <= 1e-5
    assert all(not layer.merged for layer in lora_layers(model).values())


def test_routing_equals_separate_runs(batch) -> None:
    model = tiny_model("distilbert").eval()
    inject(model, LoraSpec(targets=("qv",), rank=4, alpha=8), "a")
    inject(model, LoraSpec(targets=("attention",), rank=2, alpha=2), "b")
    _randomize_b(model, "a", seed=1)
    _randomize_b(model, "b", seed=2)
    outs = {}
    for name in ("a", "b", None):
        set_active(model, name)
        outs[name] = model(**batch).logits
    per_row = ["a", None, "b", "a"]
    with routed(model, per_row):
        mixed = model(**batch).logits
    for i, name in enumerate(per_row):
        torch.testing.assert_close(mixed[i], outs[name][i], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(outs["a"], outs["b"])
    with pytest.raises(InputError, match="no adapter named 'c'"):
        with routed(model, ["c"] * 4):
            pass


def test_routing_gradients_stay_per_adapter(batch) -> None:
    model = tiny_model("bert")
    inject(model, LoraSpec(targets=("qv",), rank=2, alpha=2, dropout=0.0), "a")
    inject(model, LoraSpec(targets=("qv",), rank=2, alpha=2, dropout=0.0), "b")
    _randomize_b(model, "a")
    _randomize_b(model, "b", seed=3)
    with routed(model, ["a", "a", None, None]):
        model(**batch).logits.sum().backward()
    layer = next(iter(lora_layers(model).values()))
    assert layer.adapters["a"].lora_A.grad is not None and layer.adapters["a"].lora_A.grad.abs().sum() > 0
    assert layer.adapters["b"].lora_A.grad is None
