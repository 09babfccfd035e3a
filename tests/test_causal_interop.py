"""Causal-LM adapters (LlamaForCausalLM, GPT2LMHeadModel) in PEFT's format, task_type CAUSAL_LM: peft loads
ours and we load peft's with the same logits and greedy generations, merge-export loads without loratune,
``all-linear`` leaves the (tied) output layer out as peft does, and the tied embedding never trains."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from safetensors.torch import load_file

from loratune.core.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from loratune.core.inject import (
    LoraSpec,
    count_parameters,
    expand_targets,
    inject,
    is_causal_lm,
    lora_layers,
    merge_and_unload,
    output_layer_name,
)
from loratune.errors import InputError

CAUSAL = ["llama", "gpt2"]
# What the short names and all-linear resolve to (peft's all-linear: every linear layer but lm_head).
QV = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
ALL_LINEAR = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "gpt2": ["c_attn", "c_proj", "c_fc"]}


def causal_lm(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random-init decoder LM with tied input and output embeddings, 2 layers, width 32, vocabulary 128."""
    torch.manual_seed(seed)
    ids = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2,
                                                   tie_word_embeddings=True, **ids))
    else:
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **ids))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model.eval()


@pytest.fixture
def ids() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 128, (3, 9), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _randomise_b(model: torch.nn.Module, seed: int = 0) -> None:
    """Random non-zero lora_B (ours or peft's), as after training: the adapter is no longer a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _greedy(model: torch.nn.Module, ids: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=0)


def _peft_targets(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("targets", [("qv",), ("all-linear",)])
def test_peft_loads_ours_with_the_same_logits_and_generations(tmp_path, arch, targets, ids) -> None:
    ours = causal_lm(arch)
    base_logits = ours(**ids).logits
    spec = LoraSpec(targets=targets, rank=4, alpha=8, dropout=0.1)
    inject(ours, spec)
    _randomise_b(ours)
    logits = ours(**ids).logits
    assert _max_diff(logits, base_logits) > 1e-2                      # the adapter does something
    out = save_adapter(ours, tmp_path / "a", spec, expand_targets(ours, targets))
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] is None
    assert cfg["fan_in_fan_out"] == (arch == "gpt2") and "lm_head" not in cfg["target_modules"]
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(str(out / WEIGHTS_NAME)))
    ref = PeftModel.from_pretrained(causal_lm(arch), str(out)).eval()
    assert isinstance(ref, PeftModelForCausalLM)
    assert _max_diff(ref(**ids).logits, logits) <= 1e-4
    assert torch.equal(_greedy(ref, ids), _greedy(ours, ids))


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("target_modules,rslora", [("all-linear", False), ("qv", True)])
def test_we_load_peft_s_causal_adapter_with_the_same_logits(tmp_path, arch, target_modules, rslora, ids) -> None:
    target_modules = QV[arch] if target_modules == "qv" else target_modules
    pm = get_peft_model(causal_lm(arch), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, use_rslora=rslora,
                                                    target_modules=target_modules, task_type="CAUSAL_LM"))
    _randomise_b(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "p"))
    assert json.loads((tmp_path / "p" / CONFIG_NAME).read_text())["task_type"] == "CAUSAL_LM"
    pm.eval()
    ours = causal_lm(arch)
    base_logits = ours(**ids).logits
    spec = load_adapter(ours, tmp_path / "p")
    assert (spec.rank, spec.alpha, spec.rslora) == (4, 16, rslora)
    assert set(lora_layers(ours)) == _peft_targets(pm)
    logits = ours(**ids).logits
    assert _max_diff(logits, base_logits) > 1e-2
    assert _max_diff(logits, pm(**ids).logits) <= 1e-5
    assert torch.equal(_greedy(ours, ids), _greedy(pm, ids))


@pytest.mark.parametrize("arch", CAUSAL)
def test_merge_and_export_loads_without_loratune(tmp_path, arch, ids) -> None:
    model = causal_lm(arch)
    inject(model, LoraSpec(targets=("all-linear",), rank=4, alpha=8))
    _randomise_b(model, seed=7)
    logits, tokens = model(**ids).logits, _greedy(model, ids)
    embedding = model.get_input_embeddings().weight.detach().clone()
    merged = merge_and_unload(model)
    assert not lora_layers(merged)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight     # still tied
    torch.testing.assert_close(merged.get_input_embeddings().weight, embedding, rtol=0, atol=0)
    m_logits = merged(**ids).logits
    assert ((m_logits - logits).norm() / logits.norm()).item() <= 1e-5
    assert torch.equal(_greedy(merged, ids), tokens)
    merged.save_pretrained(str(tmp_path / "m"))
    back = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert type(back) is type(merged)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    assert _max_diff(back(**ids).logits, m_logits) <= 1e-6
    assert torch.equal(_greedy(back, ids), tokens)


@pytest.mark.parametrize("arch", CAUSAL)
@pytest.mark.parametrize("targets", [("all-linear",), ("q", "v")])
def test_targets_and_counts_match_peft_s(arch, targets) -> None:
    ours = causal_lm(arch)
    assert is_causal_lm(ours) and output_layer_name(ours) == "lm_head"
    assert expand_targets(ours, targets) == (ALL_LINEAR[arch] if targets == ("all-linear",) else QV[arch])
    names = inject(ours, LoraSpec(targets=targets, rank=4, alpha=8))
    peft_targets = "all-linear" if targets == ("all-linear",) else QV[arch]
    pm = get_peft_model(causal_lm(arch), LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets,
                                                    task_type="CAUSAL_LM"))
    assert set(names) == _peft_targets(pm) and "lm_head" not in names
    assert count_parameters(ours) == pm.get_nb_trainable_parameters()
    if arch == "gpt2":
        assert all(layer.fan_in_fan_out for layer in lora_layers(ours).values())


@pytest.mark.parametrize("arch", CAUSAL)
def test_a_training_step_leaves_the_tied_embedding_alone(tmp_path, arch, ids) -> None:
    """Inject, train, save, load, merge: the tied embedding / lm_head never trains, unties or goes in the file."""
    model = causal_lm(arch).train()
    embedding = model.get_input_embeddings().weight.detach().clone()
    spec = LoraSpec(targets=("all-linear",), rank=4, alpha=8)
    inject(model, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p is not model.get_input_embeddings().weight for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        model(**ids, labels=ids["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert model.get_input_embeddings().weight.grad is None
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(model.get_input_embeddings().weight, embedding, rtol=0, atol=0)
    out = save_adapter(model, tmp_path / "a", spec, expand_targets(model, spec.targets))
    keys = set(load_file(str(out / WEIGHTS_NAME)))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    back = causal_lm(arch)
    load_adapter(back, out)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    assert count_parameters(back) == count_parameters(model)
    assert _max_diff(back(**ids).logits, model(**ids).logits) <= 1e-6
    merge_and_unload(back)
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    torch.testing.assert_close(back.get_input_embeddings().weight, embedding, rtol=0, atol=0)


def test_a_causal_adapter_does_not_load_on_a_classifier(tmp_path) -> None:
    model = causal_lm("llama")
    spec = LoraSpec(targets=("qv",), rank=2, alpha=4)
    inject(model, spec)
    out = save_adapter(model, tmp_path / "a", spec, expand_targets(model, spec.targets))
    cls = tf.LlamaForSequenceClassification(tf.LlamaConfig(**{k: v for k, v in model.config.to_dict().items()
                                                              if k in ("hidden_size", "intermediate_size",
                                                                       "num_hidden_layers", "num_attention_heads",
                                                                       "num_key_value_heads", "vocab_size")},
                                                           num_labels=2, pad_token_id=0))
    assert not is_causal_lm(cls)
    with pytest.raises(InputError, match="a CAUSAL_LM adapter .* does not fit LlamaForSequenceClassification"):
        load_adapter(cls, out)


def test_a_masked_lm_is_not_causal() -> None:
    model = tf.BertForMaskedLM(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=120))
    assert output_layer_name(model) == "cls.predictions.decoder" and not is_causal_lm(model)


@pytest.mark.parametrize("arch", CAUSAL)
def test_an_adapter_on_the_tied_lm_head_works_but_does_not_merge(arch, ids) -> None:
    """lm_head named as a target: the adapter applies (as peft's), but merging would change the tied embedding."""
    model = causal_lm(arch)
    base = model(**ids).logits
    inject(model, LoraSpec(targets=("lm_head",), rank=4, alpha=8))
    _randomise_b(model)
    logits = model(**ids).logits
    assert _max_diff(logits, base) > 1e-2
    with pytest.raises(InputError, match="cannot merge the adapter of lm_head: its weight is tied to "):
        merge_and_unload(model)
    assert lora_layers(model)["lm_head"].merged == []
    assert _max_diff(model(**ids).logits, logits) == 0
