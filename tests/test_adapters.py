"""PEFT-format adapter files: interop with peft both ways, merge-export, and every bad folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from loratune.core.adapters import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_state,
    load_adapter,
    read_meta,
    save_adapter,
)
from loratune.core.inject import (
    LoraSpec,
    expand_targets,
    head_names,
    inject,
    lora_layers,
    set_active,
)
from loratune.errors import InputError


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random non-zero B and a different head, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _saved(tmp_path: Path, arch: str, spec: LoraSpec, *, num_labels: int = 2) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(arch, num_labels=num_labels).eval()
    inject(model, spec)
    _perturb(model)
    out = save_adapter(model, tmp_path / "adapter", spec, expand_targets(model, spec.targets),
                       meta={"id2label": [f"c{i}" for i in range(num_labels)]})
    return out, model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_loads_ours_with_the_same_logits(tmp_path, arch, batch) -> None:
    spec = LoraSpec(targets=("qv",), rank=4, alpha=8, dropout=0.1, bias="none")
    out, ours = _saved(tmp_path, arch, spec)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["fan_in_fan_out"] == (arch == "gpt2")
    ref = PeftModel.from_pretrained(tiny_model(arch).eval(), str(out)).eval()
    assert _rel(ref(**batch).logits, ours(**batch).logits) <= 1e-5
    assert read_meta(out)["id2label"] == ["c0", "c1"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("r,alpha,dropout,rslora,which", [
    (2, 4, 0.0, False, "qv"), (8, 32, 0.05, False, "attention"), (4, 4, 0.3, True, "qv")])
def test_we_load_peft_s_with_the_same_logits(tmp_path, arch, r, alpha, dropout, rslora, which, batch) -> None:
    probe = tiny_model(arch)
    targets = expand_targets(probe, (which,))
    pm = get_peft_model(tiny_model(arch), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora,
                                                     target_modules=targets, task_type="SEQ_CLS"))
    _perturb(pm, seed=5)
    pm.save_pretrained(str(tmp_path / "p"))
    pm.eval()
    ours = tiny_model(arch).eval()
    spec = load_adapter(ours, tmp_path / "p")
    assert (spec.rank, spec.alpha, spec.rslora) == (r, alpha, rslora)
    assert _rel(ours(**batch).logits, pm(**batch).logits) <= 1e-5


def test_bias_modes_round_trip_through_peft(tmp_path, batch) -> None:
    for bias in ("all", "lora_only"):
        spec = LoraSpec(targets=("qv",), rank=4, alpha=8, bias=bias)
        out, ours = _saved(tmp_path / bias, "bert", spec)
        ref = PeftModel.from_pretrained(tiny_model("bert").eval(), str(out)).eval()
        assert _rel(ref(**batch).logits, ours(**batch).logits) <= 1e-5
        back = tiny_model("bert").eval()
        load_adapter(back, out)
        assert _rel(back(**batch).logits, ours(**batch).logits) <= 1e-6


def test_keys_are_peft_s(tmp_path) -> None:
    spec = LoraSpec(targets=("q_lin", "v_lin"), rank=2, alpha=4)
    out, _ = _saved(tmp_path, "distilbert", spec)
    keys = set(load_file(str(out / WEIGHTS_NAME)))
    pm = get_peft_model(tiny_model("distilbert"), LoraConfig(r=2, lora_alpha=4, target_modules=["q_lin", "v_lin"],
                                                             task_type="SEQ_CLS"))
    pm.save_pretrained(str(tmp_path / "p"))
    assert keys == set(load_file(str(tmp_path / "p" / WEIGHTS_NAME)))


def test_several_named_adapters_load_side_by_side(tmp_path, batch) -> None:
    a, ma = _saved(tmp_path / "a", "bert", LoraSpec(targets=("qv",), rank=2, alpha=2))
    model = tiny_model("bert").eval()
    load_adapter(model, a, "first")
    out_first = model(**batch).logits
    _perturb(model, seed=9)                          # changes "first" and the head
    torch.testing.assert_close(out_first, ma(**batch).logits)
    assert set(lora_layers(model)["bert.encoder.layer.0.attention.self.query"].adapters) == {"first"}
    set_active(model, None)
    assert head_names(model) == ["classifier"]


# --- bad folders: one clear InputError each -----------------------------------------------------

def _corrupt(tmp_path: Path, how: str) -> Path:
    out, _ = _saved(tmp_path, "bert", LoraSpec(targets=("qv",), rank=4, alpha=8))
    cfg_path, w_path = out / CONFIG_NAME, out / WEIGHTS_NAME
    cfg = json.loads(cfg_path.read_text())
    if how == "no config":
        cfg_path.unlink()
    elif how == "no weights":
        w_path.unlink()
    elif how == "corrupt weights":
        w_path.write_bytes(w_path.read_bytes()[:100])
    elif how == "bad json":
        cfg_path.write_text("{not json")
    elif how == "unknown peft_type":
        cfg["peft_type"] = "IA3"
    elif how == "r <= 0":
        cfg["r"] = 0
    elif how == "r wrong type":
        cfg["r"] = "8"
    elif how == "dropout out of range":
        cfg["lora_dropout"] = 1.5
    elif how == "dora":
        cfg["use_dora"] = True
    elif how == "missing tensor":
        w = load_file(str(w_path))
        w.pop(next(k for k in w if "lora_B" in k))
        save_file(w, str(w_path))
    elif how == "nan":
        w = load_file(str(w_path))
        k = next(k for k in w if "lora_A" in k)
        w[k][0, 0] = float("nan")
        save_file(w, str(w_path))
    if how not in ("no config", "bad json"):
        if cfg_path.exists():
            cfg_path.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("how,fragment", [
    ("no config", "adapter_config.json: missing"),
    ("no weights", "adapter_model.safetensors: missing"),
    ("corrupt weights", "not a valid safetensors file"),
    ("bad json", "not valid JSON"),
    ("unknown peft_type", "peft_type 'IA3' is not supported"),
    ("r <= 0", "'r' must be >= 1"),
    ("r wrong type", "'r' has the wrong type"),
    ("dropout out of range", "lora_dropout"),
    ("dora", "lora_magnitude_vector' is missing"),
    ("missing tensor", "is missing"),
    ("nan", "NaN"),
])
def test_bad_adapter_folder(tmp_path, how, fragment) -> None:
    out = _corrupt(tmp_path, how)
    with pytest.raises(InputError, match=fragment.replace("(", r"\(")):
        load_adapter(tiny_model("bert"), out)


def test_adapter_for_another_base_model(tmp_path) -> None:
    out, _ = _saved(tmp_path, "bert", LoraSpec(targets=("qv",), rank=4, alpha=8))
    import transformers as tf

    wider = tf.BertForSequenceClassification(tf.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                           intermediate_size=64, vocab_size=120, num_labels=2))
    with pytest.raises(InputError, match=r"shape \[4, 32\] but the model's is \[4, 48\]"):
        load_adapter(wider, out)
    with pytest.raises(InputError, match="does not fit DistilBertForSequenceClassification"):
        load_adapter(tiny_model("distilbert"), out)
    with pytest.raises(InputError, match="does not exist"):
        load_adapter(tiny_model("bert"), tmp_path / "nope")


def test_save_is_atomic_and_replaces(tmp_path) -> None:
    out, model = _saved(tmp_path, "bert", LoraSpec(targets=("qv",), rank=4, alpha=8))
    save_adapter(model, out, LoraSpec(targets=("qv",), rank=4, alpha=8), ["query", "value"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]          # no temp folders left
    shutil.rmtree(out)


@pytest.mark.parametrize("arch", ["distilbert", "gpt2"])
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_the_file_holds_exactly_what_trains(arch, bias) -> None:
    """adapter_state and mark_trainable share one rule (inject.trains): the saved tensors are the trainable
    parameters, the LoRA ones of the named adapter only, under peft's names."""
    model = tiny_model(arch)
    inject(model, LoraSpec(targets=("qv",), rank=2, bias=bias))
    inject(model, LoraSpec(targets=("qv",), rank=3, bias=bias), name="other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("default", "other"):
        state = adapter_state(model, name, bias)
        expected = {PREFIX + (n.replace(f".adapters.{name}.", ".") + ".weight" if ".adapters." in n else n)
                    for n in trainable if ".adapters." not in n or f".adapters.{name}." in n}
        assert set(state) == expected
        assert all(v.device.type == "cpu" and v.is_contiguous() for v in state.values())


def test_mixed_regex_and_name_targets_load_in_peft_as_trained(tmp_path, batch) -> None:
    # A YAML list may mix a re: pattern with names; peft takes a regex only as the whole target_modules string.
    spec = LoraSpec(targets=("re:.*self\\.query", "value"), rank=4, alpha=8)
    out, ours = _saved(tmp_path, "bert", spec)
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["target_modules"] == r"(?:.*self\.query)|(?:(?:.*\.)?value)"
    ref = PeftModel.from_pretrained(tiny_model("bert").eval(), str(out)).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")
               and hasattr(m, "base_layer")}
    assert adapted == set(lora_layers(ours)) and len(adapted) == 4
    assert _rel(ref(**batch).logits, ours(**batch).logits) <= 1e-5
    back = tiny_model("bert").eval()
    load_adapter(back, out)
    assert set(lora_layers(back)) == adapted and _rel(back(**batch).logits, ours(**batch).logits) <= 1e-5


@pytest.mark.parametrize("init", [False, "orthogonal"])
def test_peft_inits_that_keep_w0_load(tmp_path, init, batch) -> None:
    # Only A and B's start differs; the trained tensors are what loads (peft reloads them exactly too).
    pm = get_peft_model(tiny_model("bert"), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       task_type="SEQ_CLS", init_lora_weights=init))
    _perturb(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "p"))
    ours = tiny_model("bert").eval()
    load_adapter(ours, tmp_path / "p")
    assert _rel(ours(**batch).logits, pm.eval()(**batch).logits) <= 1e-5


def test_an_eva_adapter_loads(tmp_path, batch) -> None:
    # EVA picks A's start from activations (its eva_config says how); W0 is untouched, the file loads as it is.
    out, ours = _saved(tmp_path, "bert", LoraSpec(targets=("qv",), rank=4, alpha=8))
    cfg = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**cfg, "init_lora_weights": "eva",
                                               "eva_config": {"rho": 2.0, "tau": 0.99, "whiten": False}}))
    back = tiny_model("bert").eval()
    load_adapter(back, out)
    assert _rel(back(**batch).logits, ours(**batch).logits) <= 1e-5


@pytest.mark.parametrize("init", ["loftq", "corda", "pissa_niter_4"])
def test_peft_inits_that_change_w0_are_refused(tmp_path, init) -> None:
    out, _ = _saved(tmp_path, "bert", LoraSpec(targets=("qv",), rank=4, alpha=8))
    cfg = json.loads((out / CONFIG_NAME).read_text())
    (out / CONFIG_NAME).write_text(json.dumps({**cfg, "init_lora_weights": init}))
    with pytest.raises(InputError, match=f'init_lora_weights="{init}" is not supported'):
        load_adapter(tiny_model("bert"), out)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_a_refused_file_leaves_the_model_as_it_was(tmp_path, init, batch) -> None:
    # A peft adapter for 3 classes on a 2-class model: its LoRA tensors fit, its head does not. The load is
    # refused before anything is copied; the adapter is taken out again (PiSSA's residual too), and a good
    # file loads under the same name afterwards.
    pm = get_peft_model(tiny_model("bert", num_labels=3), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                                     task_type="SEQ_CLS", init_lora_weights=init))
    _perturb(pm, seed=4)
    pm.save_pretrained(str(tmp_path / "three"))
    model = tiny_model("bert").eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    logits = model(**batch).logits
    with pytest.raises(InputError, match="classifier.bias has shape"):
        load_adapter(model, tmp_path / "three")
    assert not lora_layers(model) and dict(model.named_parameters()).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert torch.equal(model(**batch).logits, logits)
    good, ours = _saved(tmp_path, "bert", LoraSpec(targets=("qv",), rank=4, alpha=8))
    load_adapter(model, good)
    assert _rel(model(**batch).logits, ours(**batch).logits) <= 1e-5


def test_a_refused_second_adapter_keeps_the_first_active(tmp_path, batch) -> None:
    good, ours = _saved(tmp_path, "bert", LoraSpec(targets=("qv",), rank=4, alpha=8))
    model = tiny_model("bert").eval()
    load_adapter(model, good, "a")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    w = load_file(str(bad / WEIGHTS_NAME))
    w[next(k for k in w if "lora_A" in k)][0, 0] = float("nan")
    save_file(w, str(bad / WEIGHTS_NAME))
    with pytest.raises(InputError, match="NaN"):
        load_adapter(model, bad, "b")
    assert set(next(iter(lora_layers(model).values())).adapters) == {"a"}
    assert _rel(model(**batch).logits, ours(**batch).logits) <= 1e-5


def test_a_decoder_classifier_reads_each_row_at_its_last_token_whatever_it_is_batched_with(tmp_path) -> None:
    """transformers' decoder classifiers read each row at its last token that is not ``config.pad_token_id``. A
    tokenizer that pads with another id than the config's EOS (as Llama-3-Instruct's: its config names three EOS
    ids, none the tokenizer's pad) had a short row read at a padding slot, so its probabilities changed with the
    rows it was batched with. The config now names the id the batches are padded with."""
    from test_causal_data import chat_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from loratune.infer.inference import load, predict
    from loratune.training.models import load_model, pad_id_of

    tok = chat_tokenizer(eos="<|endoftext|>")                 # pads with <|im_end|>; EOS <|endoftext|>
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(0)
    ref = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.3, num_labels=2, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=None))
    base = tmp_path / "base"
    ref.save_pretrained(base)
    tok.save_pretrained(base)
    model = load_model(str(base), ["neg", "pos"], pad_id=pad_id_of(tok))
    assert model.config.pad_token_id == tok.pad_token_id
    spec = LoraSpec(targets=("q_proj", "v_proj"), rank=2)
    inject(model, spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.3)
    adapter = save_adapter(model, tmp_path / "adapter", spec, ["q_proj", "v_proj"], base_model=str(base),
                           meta={"model": str(base), "id2label": ["neg", "pos"], "max_length": 64})
    loaded = load(adapter, device="cpu")
    assert loaded.model.config.pad_token_id == loaded.pad_id == tok.pad_token_id
    short, long = "Paris.", "What is the capital of France? The capital of France is Paris. Name three colours."
    alone = list(predict(loaded, [short], precision="fp32"))[0]["probabilities"]
    batched = list(predict(loaded, [short, long], precision="fp32"))[0]["probabilities"]
    with torch.no_grad():                                      # the reference: the short row alone, unpadded
        ids = torch.tensor([tok(short)["input_ids"]])
        want = torch.softmax(loaded.model(input_ids=ids).logits.float(), -1)[0].tolist()
    assert list(alone.values()) == pytest.approx(want, abs=1e-5)
    assert list(batched.values()) == pytest.approx(want, abs=1e-5), (alone, batched)


def test_predict_takes_a_lone_string_as_one_text_and_refuses_a_text_with_no_tokens(tmp_path) -> None:
    """`predict(adapter, "a text")` classified each character (a str is an iterable of texts); an empty text that
    tokenizes to nothing (a tokenizer that adds no special tokens, as GPT-2's or this ChatML one) crashed the
    batch (exit 1) or, beside other texts, was read at a padding slot."""
    from test_causal_data import chat_tokenizer
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from loratune.infer.inference import predict
    from loratune.training.models import load_model

    tok = chat_tokenizer()
    assert tok("")["input_ids"] == []
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=2, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = load_model(str(tmp_path / "base"), ["neg", "pos"])
    spec = LoraSpec(targets=("q_proj", "v_proj"), rank=2)
    inject(model, spec)
    adapter = save_adapter(model, tmp_path / "adapter", spec, ["q_proj", "v_proj"], base_model=str(tmp_path / "base"),
                           meta={"model": str(tmp_path / "base"), "id2label": ["neg", "pos"], "max_length": 64})
    rows = list(predict(adapter, "a fine film", device="cpu", precision="fp32"))
    assert [r["text"] for r in rows] == ["a fine film"]
    with pytest.raises(InputError, match=r"^text 3 \(''\) has no tokens: nothing to classify$"):
        list(predict(adapter, ["a fine film", "dull", ""], device="cpu", precision="fp32", chunk=2))


def test_a_peft_adapter_without_a_stored_length_reads_at_most_the_models_positions(tmp_path, tiny_model_dir) -> None:
    """A peft-written adapter has no loratune.json, so its length defaulted to 128 tokens, past the 64 positions
    of this BERT: a long text crashed inside the embeddings (exit 1). It is cut at the table's size, as
    transformers' pipeline would cut it (truncation to the model's maximum)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loratune.infer.inference import load, predict
    from loratune.serve.model import ServedModel

    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2),
                        LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    pm.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "loratune.json").exists()
    assert load(tmp_path / "adapter", device="cpu").max_length == 64
    text = " ".join(["a great film and a dull plot"] * 20)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tok(text)["input_ids"]) > 64
    got = list(predict(tmp_path / "adapter", [text], device="cpu", precision="fp32"))[0]["probabilities"]
    with torch.no_grad():
        want = torch.softmax(pm.eval()(**tok(text, truncation=True, max_length=64, return_tensors="pt")).logits, -1)[0]
    assert list(got.values()) == pytest.approx(want.tolist(), abs=1e-5)
    served = ServedModel(tiny_model_dir, device="cpu", precision="fp32", max_length=128)   # serve --max-length 128
    assert served.base_max_length == 64 and served.add("peft", tmp_path / "adapter").max_length == 64
