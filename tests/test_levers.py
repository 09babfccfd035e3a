"""The training speed levers change cost, not results: the dropout mask's distribution, and the first-token
last layer's logits and gradients, against torch's own dropout and the unmodified model. And the levers as
one value: ``Levers`` switches each on alone, the trainer uses the one it is given, bench switches each off."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_model

from loratune.core.inject import LoraSpec, inject, mark_trainable
from loratune.training.fastops import (
    FastDropout,
    fast_attention,
    fast_dropout,
    keep_mask,
    use_fast_attention,
    use_fast_dropout,
)
from loratune.training.firsttoken import first_token_last_layer
from loratune.training.levers import Levers


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_mask_probability(p: float) -> None:
    torch.manual_seed(0)
    n = 2_000_000
    m = keep_mask((n,), p)
    assert m.dtype == torch.bool and m.shape == (n,)
    exact = 1 - round(p * 65536) / 65536               # what the 16-bit threshold gives
    assert abs(exact - (1 - p)) <= 0.5 / 65536
    sigma = (exact * (1 - exact) / n) ** 0.5
    assert abs(m.double().mean().item() - exact) < 5 * sigma


def test_keep_mask_independent_positions() -> None:
    """Neighbours share a 64-bit draw (four 16-bit slices): their masks must still be uncorrelated, and
    every slice position (incl. the one holding the draw's sign bit) must keep at the same rate."""
    torch.manual_seed(1)
    m = keep_mask((1_000_000, 4), 0.5).double()
    rates = m.mean(0)
    assert torch.all((rates - 0.5).abs() < 5 * (0.25 / 1_000_000) ** 0.5), rates
    c = torch.corrcoef(m.T)
    off = c[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 0.01, c


def test_keep_mask_follows_the_torch_seed() -> None:
    torch.manual_seed(3)
    a = keep_mask((1000,), 0.3)
    torch.manual_seed(3)
    b = keep_mask((1000,), 0.3)
    c = keep_mask((1000,), 0.3)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_values_and_gradient(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 33, 48).to(dtype).requires_grad_(True)
    y = fast_dropout(x, 0.2)
    kept = y != 0
    ref = (x.detach().float() / 0.8).to(dtype)            # torch's scaling: x · 1/(1-p)
    assert torch.allclose(y[kept].float(), ref[kept].float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert 0.75 < kept.float().mean().item() < 0.85
    y.sum().backward()
    expect = kept.to(dtype) * (1 / 0.8)
    assert torch.allclose(x.grad.float(), expect.float(), rtol=1e-2, atol=0)
    assert fast_dropout(x, 0.2, training=False) is x and fast_dropout(x, 0.0) is x
    assert torch.count_nonzero(fast_dropout(x, 1.0)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_multiplies_the_mask_without_converting_a_bool_tensor(dtype: torch.dtype) -> None:
    """The values and gradients of ``x * mask * (1/(1-p))`` with the same draws, bit for bit, while no op of the
    forward or backward pass gets a bool tensor to convert (``x * bool`` converts the mask element by element,
    most of the multiply's time on these CPUs; the mask goes in as a uint8 view)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class BoolInputs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in [*args, *(kwargs or {}).values()]):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(16, 27, 384).to(dtype).requires_grad_(True)
    g = torch.randn(16, 27, 384).to(dtype)
    torch.manual_seed(3)
    with BoolInputs() as seen:
        y = fast_dropout(x, 0.1)
        (gx,) = torch.autograd.grad(y, x, g)
    torch.manual_seed(3)
    mask = keep_mask(x.shape, 0.1)
    ref = x * mask * (1.0 / 0.9)
    (gref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(y, ref) and torch.equal(gx, gref) and y.dtype == gx.dtype == dtype
    assert [op for op in seen.ops if "view" not in op] == []


def test_fast_dropout_mean_matches_torch() -> None:
    """Same expectation and variance as F.dropout on a large constant input."""
    torch.manual_seed(0)
    x = torch.full((500_000,), 2.0)
    ours, theirs = fast_dropout(x, 0.25), torch.nn.functional.dropout(x, 0.25)
    for t in (ours, theirs):
        assert abs(t.mean().item() - 2.0) < 0.01
    assert abs(ours.std().item() - theirs.std().item()) < 0.01


def test_use_fast_dropout_switches_every_dropout() -> None:
    model = tiny_model("bert")
    inject(model, LoraSpec(targets=("qv",), rank=4, alpha=8, dropout=0.1))
    keys = set(model.state_dict())
    n_dropouts = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert use_fast_dropout(model) == n_dropouts > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert sum(isinstance(m, FastDropout) for m in model.modules()) == n_dropouts
    assert set(model.state_dict()) == keys
    ids = torch.randint(3, 120, (4, 10))
    model.eval()
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, FastDropout):
            m.__class__ = torch.nn.Dropout
    assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def _batch(pad: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 120, (5, 12), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 7:] = 0
        mask[3, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pad", [False, True])
def test_first_token_last_layer_same_logits_and_gradients(arch: str, attn: str, pad: bool) -> None:
    full = tiny_model(arch)
    full.config._attn_implementation = attn
    inject(full, LoraSpec(targets=("all-linear",), rank=4, alpha=8))     # adapters in the last layer's FFN too
    mark_trainable(full)
    with torch.no_grad():                                                 # B ≠ 0, so the adapters matter
        for n, p in full.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    cut = copy.deepcopy(full)
    assert first_token_last_layer(cut)
    full.eval()
    cut.eval()
    b = _batch(pad)
    out_full = full(**b).logits
    out_cut = cut(**b).logits
    assert torch.allclose(out_full, out_cut, atol=1e-6, rtol=1e-5)
    hidden = cut.base_model(**b).last_hidden_state
    assert hidden.shape[1] == 1                                           # the work really was cut
    out_full.square().sum().backward()
    out_cut.square().sum().backward()
    grads = {n: p.grad for n, p in full.named_parameters() if p.requires_grad}
    for n, p in cut.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_first_token_last_layer_leaves_other_heads_alone(arch: str) -> None:
    """GPT-2 and Llama classifiers read the last real token: nothing is changed."""
    model = tiny_model(arch)
    ref = copy.deepcopy(model)
    assert not first_token_last_layer(model)
    b = _batch(True)
    b["input_ids"][:, 0] = 1
    model.eval()
    ref.eval()
    assert torch.equal(model(**b).logits, ref(**b).logits)


def _qkv(pad: bool):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 9, 8, generator=g) for _ in range(3))
    mask = None
    if pad:
        keep = torch.ones(3, 9, dtype=torch.bool)
        keep[1, 5:] = False
        keep[2, 2:] = False
        mask = keep[:, None, None, :].expand(3, 1, 9, 9)
    return q, k, v, mask


@pytest.mark.parametrize("pad", [False, True])
def test_fast_attention_equals_sdpa(pad: bool, monkeypatch) -> None:
    """With every element kept, the written-out attention is sdpa's output scaled by 1/(1-p); with p = 0 it is
    transformers' sdpa function itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from loratune.training import fastops

    module = torch.nn.Module()
    module.is_causal = False
    module.training = True
    q, k, v, mask = _qkv(pad)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    same, _ = fast_attention(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert torch.equal(same, ref)
    monkeypatch.setattr(fastops, "keep_mask", lambda shape, p, device="cpu": torch.ones(shape, dtype=torch.bool))
    out, _ = fast_attention(module, q, k, v, mask, dropout=0.2, scaling=0.3)
    assert out.shape == ref.shape == (3, 9, 2, 8)
    assert torch.allclose(out, ref / 0.8, atol=1e-6, rtol=1e-5)


def test_fast_attention_drops_probabilities() -> None:
    """p = 0.5 on the probabilities: each output is the average of kept values ×2, so E[out] = sdpa's output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v, _ = _qkv(False)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0)
    torch.manual_seed(0)
    draws = torch.stack([fast_attention(module, q, k, v, None, dropout=0.5)[0] for _ in range(3000)])
    stderr = draws.std(0) / 3000 ** 0.5
    assert torch.all((draws.mean(0) - ref).abs() < 5 * stderr + 1e-5)
    one, _ = fast_attention(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(one, ref, atol=1e-3)


def _gqa(pad: bool, seed: int = 5):
    """Causal grouped-query inputs (4 query heads, 2 KV heads), fp32, and sdpa's bool mask when padded."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 4, 7, 8, generator=g)
    k, v = (torch.randn(3, 2, 7, 8, generator=g) for _ in range(2))
    mask = None
    if pad:                                            # left padding, then causal: True = attend
        keep = torch.ones(3, 7, dtype=torch.bool)
        keep[1, :2] = False
        causal = torch.ones(7, 7, dtype=torch.bool).tril()
        mask = (causal[None] & keep[:, None, :])[:, None]
        mask[1, 0, :2] = causal[:2]                    # rows of padding attend to themselves (finite softmax)
    return q, k, v, mask


@pytest.mark.parametrize("pad", [False, True])
def test_fast_attention_bf16_backward_matches_sdpa(pad: bool) -> None:
    """A decoder's bf16 training step (causal, grouped-query heads, no dropout) is written out: its output and the
    gradients of q, k, v agree with sdpa's in fp32 to bf16's rounding, and with transformers' eager attention
    (the same bf16 computation) closely."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.training, module.num_key_value_groups = True, True, 2
    q, k, v, mask = _gqa(pad)
    grad = torch.randn(3, 7, 4, 8, generator=torch.Generator().manual_seed(6))

    def run(fn, dtype, m):
        leaves = [t.clone().to(dtype).requires_grad_() for t in (q, k, v)]
        out, _ = fn(module, *leaves, m, dropout=0.0, scaling=0.35)
        out.backward(grad.to(dtype))
        return [out.float()] + [t.grad.float() for t in leaves]

    ref = run(sdpa_attention_forward, torch.float32, mask)
    ours = run(fast_attention, torch.bfloat16, mask)
    additive = None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.bfloat16).min)
    if additive is None:
        additive = torch.zeros(7, 7).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -1e30)[None, None]
    eager = run(eager_attention_forward, torch.bfloat16, additive.to(torch.bfloat16))
    for a, r, e in zip(ours, ref, eager):
        assert a.shape == r.shape
        assert (a - r).abs().max() < 0.03 * r.abs().max()     # bf16 (8 bits) against fp32
        assert (a - e).abs().max() < 0.01 * r.abs().max()     # the same bf16 computation as eager's
    assert torch.allclose(ours[0], ref[0], atol=0.05)
    if mask is None:                                   # the causal mask was built: no attending ahead
        q2 = q.clone()
        q2[:, :, 4:] += 1.0
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 5:] += 3.0
        v2[:, :, 5:] -= 3.0
        a = fast_attention(module, q.to(torch.bfloat16).requires_grad_(), k2.to(torch.bfloat16),
                           v2.to(torch.bfloat16), None, scaling=0.35)[0]
        b = fast_attention(module, q.to(torch.bfloat16).requires_grad_(), k.to(torch.bfloat16),
                           v.to(torch.bfloat16), None, scaling=0.35)[0]
        assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a[:, 5:], b[:, 5:])


def test_fast_attention_keeps_grouped_kv_heads_unexpanded() -> None:
    """What the bf16 training pass keeps for its backward pass is q, k, v at their own sizes, the probabilities
    and the mask: a KV head shared by a group of query heads is never kept expanded to the group (8 query heads on
    2 KV heads here, where an expanded K and V would be 4x their size)."""
    module = torch.nn.Module()
    module.is_causal = True
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 8, 6, 4, generator=g).to(torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 2, 6, 4, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(2))
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = fast_attention(module, q, k, v, None, dropout=0.0, scaling=0.5)
    out.float().sum().backward()
    size = 2                                                            # bytes per bf16 element
    own = (q.numel() + k.numel() + v.numel() + 2 * 8 * 6 * 6) * size + 6 * 6   # q, k, v, probabilities, mask
    assert sum(kept.values()) <= own
    assert k.grad.shape == k.shape and v.grad.abs().sum() > 0


def test_fast_attention_leaves_sdpa_where_it_is_fast() -> None:
    """Without dropout: fp32 training, and any bf16 pass without gradients (evaluation), are sdpa's own output."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q, k, v, mask = _gqa(True)
    for dtype, grad in ((torch.float32, True), (torch.bfloat16, False)):
        qq, kk, vv = (t.detach().clone().to(dtype).requires_grad_(grad) for t in (q, k, v))
        with torch.set_grad_enabled(grad):
            ours = fast_attention(module, qq, kk, vv, mask, dropout=0.0, scaling=0.35)[0]
            ref = sdpa_attention_forward(module, qq, kk, vv, mask, dropout=0.0, scaling=0.35)[0]
        assert torch.equal(ours, ref)


def test_a_decoder_trains_through_the_written_out_attention_in_bf16() -> None:
    """A tiny Llama (grouped-query heads) in training mode under bf16 autocast: with the lever its logits and
    its gradients are transformers' eager attention's to bf16 rounding, and the written-out path is the one taken."""
    import transformers as tf

    from loratune.training import fastops

    torch.manual_seed(0)
    conf = tf.LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    base = tf.LlamaForCausalLM(conf)
    eager = copy.deepcopy(base)
    eager.config._attn_implementation = "eager"
    for m in eager.modules():
        if getattr(m, "config", None) is not None:
            m.config._attn_implementation = "eager"
    assert use_fast_attention(base)
    ids = torch.randint(2, 120, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                    # left padding in one row
    calls = []
    original = fastops.fast_dropout

    def spy(x, p, training=True):
        calls.append(tuple(x.shape))
        return original(x, p, training)

    out = {}
    for name, model in (("ours", base), ("eager", eager)):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "ours":
                fastops.fast_dropout = spy
            try:
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            finally:
                fastops.fast_dropout = original
        logits[mask.bool()].square().mean().backward()
        out[name] = (logits.detach(), model.model.layers[0].self_attn.k_proj.weight.grad.clone())
    assert calls == [(3, 4, 11, 11)] * 2              # each layer's probabilities: written out
    assert (out["ours"][0] - out["eager"][0])[mask.bool()].abs().max() < 0.05
    g, ge = out["ours"][1], out["eager"][1]
    assert (g - ge).abs().max() < 0.05 * ge.abs().max()
    assert fastops.FAST_ATTENTION == base.config._attn_implementation


def test_use_fast_attention_only_replaces_sdpa() -> None:
    model = tiny_model("bert")
    assert model.config._attn_implementation == "sdpa"
    ids = _batch(True)
    model.eval()
    ref = model(**ids).logits
    assert use_fast_attention(model)
    assert model.config._attn_implementation == "loratune_sdpa"
    assert torch.equal(model(**ids).logits, ref)          # evaluation: no dropout, sdpa itself
    model.train()
    torch.manual_seed(0)
    a = model(**ids).logits
    torch.manual_seed(0)
    assert torch.equal(model(**ids).logits, a)            # training: dropout follows the torch seed
    eager = tiny_model("bert")
    eager.config._attn_implementation = "eager"
    assert not use_fast_attention(eager) and eager.config._attn_implementation == "eager"


def test_levers_default_to_all_on_and_are_one_frozen_value() -> None:
    from loratune.training import loop as trainer

    lv = Levers()
    assert (lv.frozen_bf16, lv.fast_dropout, lv.fast_attention, lv.first_token, lv.pad_to) == (True, True, True, True, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lv.pad_to = 8  # type: ignore[misc]
    with pytest.raises(ValueError, match="pad_to"):
        Levers(pad_to=0)
    assert not any(hasattr(trainer, g) for g in ("FROZEN_BF16", "FAST_DROPOUT", "FAST_ATTENTION", "FIRST_TOKEN",
                                                 "PAD_TO"))       # no module globals left to flip


def _switched_on(model: torch.nn.Module) -> set[str]:
    """Which model-side levers are in effect on ``model``."""
    on = set()
    if any(isinstance(m, FastDropout) for m in model.modules()):
        on.add("fast_dropout")
    if model.config._attn_implementation == "loratune_sdpa":
        on.add("fast_attention")
    if "forward" in vars(model.bert.encoder.layer[-1]):        # the first-token forward, bound on the instance
        on.add("first_token")
    if model.bert.encoder.layer[0].intermediate.dense.weight.dtype == torch.bfloat16:
        on.add("frozen_bf16")
    return on


@pytest.mark.parametrize("lever", [None, "frozen_bf16", "fast_dropout", "fast_attention", "first_token"])
def test_levers_apply_switches_on_exactly_the_levers_asked_for(lever: str | None) -> None:
    model = tiny_model("bert")
    inject(model, LoraSpec(targets=("qv",), rank=4, alpha=8, dropout=0.1))
    names = ("frozen_bf16", "fast_dropout", "fast_attention", "first_token")
    Levers(**{n: n == lever for n in names}).apply(model, "bf16")
    assert _switched_on(model) == ({lever} if lever else set())
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)   # adapters stay fp32


def test_train_uses_the_levers_it_is_given(tmp_path, tiny_model_dir, tiny_data, monkeypatch) -> None:
    """pad_to reaches the collator, the model-side levers reach the model (all off: none in effect)."""
    import loratune
    from loratune.training import loop as trainer

    widths: list[int] = []
    seen: list[set[str]] = []
    real_collate, real_setup = trainer.collate, trainer.setup
    monkeypatch.setattr(trainer, "collate", lambda *a: widths.append(real_collate(*a)["input_ids"].shape[1])
                        or real_collate(*a))
    monkeypatch.setattr(trainer, "setup", lambda *a, **kw: seen.append(_switched_on((r := real_setup(*a, **kw)).model))
                        or r)
    opts = {"model": tiny_model_dir, "data": tiny_data, "max_steps": 6, "batch_size": 8, "max_length": 32,
            "rank": 4, "threads": 1, "precision": "bf16", "evaluate_test": False}
    loratune.train(out=tmp_path / "a", **opts)
    assert seen[-1] == {"frozen_bf16", "fast_dropout", "fast_attention", "first_token"}
    assert len(widths) == 6 and any(w % 8 for w in widths)
    widths.clear()
    loratune.train(out=tmp_path / "b", levers=Levers(frozen_bf16=False, fast_dropout=False, fast_attention=False,
                                                     first_token=False, pad_to=8), **opts)
    assert seen[-1] == set()
    assert len(widths) == 6 and all(w % 8 == 0 for w in widths)


def test_bench_switches_each_lever_off_alone(tmp_path, monkeypatch) -> None:
    """bench/levers.py passes one Levers per variant: the default, then each lever changed alone."""
    from bench import levers as bench_levers
    from bench import train as bench_train

    calls: list[tuple[Levers, dict]] = []

    def fake_ours(model, prepared, steps, warmup, out, levers=None, **options):
        calls.append((levers, options))
        return {"tokens_per_s": 1.0}

    monkeypatch.setattr(bench_train, "ours", fake_ours)
    threads = torch.get_num_threads()
    try:
        rows = bench_levers.variants(tmp_path, "m", None, 1, 1)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 2 * len(rows) and all(isinstance(lv, Levers) for lv, _ in calls)
    changed = [{f.name for f in dataclasses.fields(Levers) if getattr(lv, f.name) != getattr(Levers(), f.name)}
               for lv, _ in calls[:len(rows)]]
    assert [c for c in changed if c] == [{"fast_dropout"}, {"fast_attention"}, {"first_token"}, {"frozen_bf16"},
                                         {"pad_to"}]
    assert all(not opts for (lv, opts), c in zip(calls, changed) if c)        # a lever case changes nothing else
