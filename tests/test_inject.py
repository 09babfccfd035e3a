"""Target resolution against peft's own matching, the trainable set, and the parameter report."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_model
from peft import LoraConfig, get_peft_model

from loratune.core.inject import (
    LoraSpec,
    count_parameters,
    expand_targets,
    head_names,
    inject,
    lora_layers,
    report_line,
    resolve_targets,
    trains,
)
from loratune.errors import InputError

# (our targets, peft's target_modules) per architecture; the short names resolve to these.
PEFT_QV = {"distilbert": ["q_lin", "v_lin"], "bert": ["query", "value"], "roberta": ["query", "value"],
           "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}


def _peft_targets(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def test_distilbert_base_count_is_the_seeds_739586() -> None:
    import transformers as tf

    model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(num_labels=2))
    inject(model, LoraSpec(targets=("q_lin", "v_lin"), rank=8, alpha=16))
    assert count_parameters(model)[0] == 739_586
    assert report_line(model).startswith("trainable params: 739,586 || all params: 67,102,466 || trainable%: 1.10")


@pytest.mark.parametrize("arch", ARCHS + ["llama"])
@pytest.mark.parametrize("targets,peft_targets,bias", [
    (("qv",), None, "none"),
    (("attention",), "attn", "all"),
    (("all-linear",), "all-linear", "lora_only"),
])
def test_same_matrices_and_counts_as_peft(arch, targets, peft_targets, bias) -> None:
    ours, ref = tiny_model(arch, num_labels=3), tiny_model(arch, num_labels=3)
    names = inject(ours, LoraSpec(targets=targets, rank=4, alpha=8, bias=bias))
    if peft_targets is None:
        peft_targets = PEFT_QV[arch]
    elif peft_targets == "attn" or (peft_targets == "all-linear" and arch == "distilbert"):
        # peft's own "all-linear" also wraps DistilBERT's pre_classifier, then refuses to train it fully
        # (modules_to_save on a LoRA layer: TypeError); we leave the head out of the targets.
        peft_targets = expand_targets(ours, targets)
    pm = get_peft_model(ref, LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets, bias=bias,
                                        task_type="SEQ_CLS"))
    assert set(names) == _peft_targets(pm)
    assert count_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == _peft_trainable(pm)


def _peft_trainable(peft_model) -> set[str]:
    """peft's trainable parameters under our names (``query.lora_A.default.weight`` -> ``query.adapters.default.lora_A``,
    ``classifier.modules_to_save.default.weight`` -> ``classifier.weight``)."""
    import re

    out = set()
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            out.add(re.sub(r"\.lora_([AB])\.default\.weight$", r".adapters.default.lora_\1", n))
    return out


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trains_is_the_rule_mark_trainable_applies(bias) -> None:
    model = tiny_model("distilbert")
    inject(model, LoraSpec(targets=("qv",), rank=2, bias=bias))
    heads = head_names(model)
    assert heads == ["pre_classifier", "classifier"]
    for n, p in model.named_parameters():
        assert p.requires_grad == trains(n, heads, bias), n
    assert trains("distilbert.transformer.layer.0.attention.q_lin.adapters.default.lora_B", heads, "none")
    assert trains("pre_classifier.weight", heads, "none") and trains("classifier.bias", heads, "none")
    assert not trains("distilbert.transformer.layer.0.ffn.lin1.bias", heads, "lora_only")
    assert trains("distilbert.transformer.layer.0.attention.q_lin.base_layer.bias", heads, "lora_only")
    assert trains("distilbert.transformer.layer.0.ffn.lin1.bias", heads, "all")
    assert not trains("distilbert.transformer.layer.0.attention.q_lin.base_layer.weight", heads, "all")


def test_suffix_matching_is_peft_s() -> None:
    model = tiny_model("bert")
    # "dense" is a suffix of pooler.dense, attention.output.dense, intermediate.dense, output.dense
    ours = set(resolve_targets(model, ["dense"]))
    pm = get_peft_model(tiny_model("bert"), LoraConfig(r=2, target_modules=["dense"], task_type="SEQ_CLS"))
    assert ours == _peft_targets(pm) and "bert.pooler.dense" in ours
    assert resolve_targets(model, ["re:.*layer\\.1\\..*query"]) == ["bert.encoder.layer.1.attention.self.query"]


def test_layers_filter_matches_peft() -> None:
    model = tiny_model("distilbert")
    ours = resolve_targets(model, ["q_lin", "v_lin"], layers=[1])
    pm = get_peft_model(tiny_model("distilbert"), LoraConfig(r=2, target_modules=["q_lin", "v_lin"],
                                                             layers_to_transform=[1], task_type="SEQ_CLS"))
    assert set(ours) == _peft_targets(pm) and len(ours) == 2


def test_unmatched_target_names_model_and_its_layers() -> None:
    import transformers as tf

    model = tf.DistilBertForSequenceClassification(tf.DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(InputError) as e:
        resolve_targets(model, ["q_proj"])
    assert str(e.value) == ("target 'q_proj' matches no linear layer of DistilBertForSequenceClassification; its "
                            "linear layers are q_lin, k_lin, v_lin, out_lin, lin1, lin2, pre_classifier, classifier")


def test_bad_targets() -> None:
    model = tiny_model("bert")
    with pytest.raises(InputError, match="not a linear layer"):
        resolve_targets(model, ["attention.self"])
    with pytest.raises(InputError, match="bad regex"):
        resolve_targets(model, ["re:(("])
    with pytest.raises(InputError, match="--layers"):
        resolve_targets(model, ["qv"], layers=[7])
    with pytest.raises(InputError, match=r"query \(32x32\)"):
        inject(model, LoraSpec(targets=("q",), rank=33))


def test_gradients_reach_only_the_trainable_set_and_base_is_unchanged(batch) -> None:
    model = tiny_model("distilbert")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(model, LoraSpec(targets=("qv",), rank=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".adapters." in n or n.startswith(("pre_classifier", "classifier"))}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for layer in lora_layers(model).values():            # make B non-zero so A gets gradients too
        torch.nn.init.normal_(layer.adapters["default"].lora_B)
    loss = model(**batch, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    opt.step()
    for n, p in model.named_parameters():
        key = n.replace(".base_layer", "")
        if n not in trainable:
            assert torch.equal(p, frozen[key]), n


class _Expert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(8, 8)


class _MoeLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList([_Expert(), _Expert()])


class _Moe(torch.nn.Module):
    """model.layers.N.experts.M.w: two numbered segments, the layer's first (a mixture of experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_MoeLayer(), _MoeLayer()])


def _t5() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    return tf.T5ForSequenceClassification(tf.T5Config(vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                      num_decoder_layers=2, num_heads=2)).eval()


@pytest.mark.parametrize("make,targets,expected", [
    (_Moe, ["w"], {"model.layers.1.experts.0.w", "model.layers.1.experts.1.w"}),
    (_t5, ["wi", "SelfAttention.q"], {"transformer.encoder.block.1.layer.0.SelfAttention.q",
                                      "transformer.encoder.block.1.layer.1.DenseReluDense.wi",
                                      "transformer.decoder.block.1.layer.0.SelfAttention.q",
                                      "transformer.decoder.block.1.layer.2.DenseReluDense.wi"})])
def test_layers_is_the_first_numbered_segment_as_in_peft(make, targets, expected) -> None:
    # T5's encoder.block.1.layer.0.SelfAttention.q is in layer (block) 1; a greedy match took the last number, 0.
    ours = resolve_targets(make(), targets, layers=[1])
    pm = get_peft_model(make(), LoraConfig(r=2, target_modules=targets, layers_to_transform=[1]))
    assert set(ours) == _peft_targets(pm) == expected


def test_modules_named_q_and_v_are_taken_as_named() -> None:
    # T5 names its projections q, k, v, o (peft's default targets for it: q and v); DistilBERT has none so named.
    pm = get_peft_model(_t5(), LoraConfig(r=2, task_type="SEQ_CLS"))
    assert set(pm.peft_config["default"].target_modules) == {"q", "v"}
    assert set(resolve_targets(_t5(), ["q", "v"])) == _peft_targets(pm)
    assert expand_targets(tiny_model("distilbert"), ["q", "v"]) == ["q_lin", "v_lin"]
