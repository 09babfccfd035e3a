"""``--compile``: torch.compile of each transformer layer's training pass. Pinned against the same model run eagerly:
the training pass's output and gradients (fp32, to rounding), a whole tiny training run's losses and adapter, that
evaluation stays eager, that a batch without padding does not compile the layers again, and the one-line refusal
where no C++ compiler exists. (Its speed is a benchmark: BENCHMARKS.md, ``python -m bench.llm_speed``.)"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_causal_train import data, llama_dir, opts  # noqa: F401  (fixtures)
from torch import nn

from loratune.core.inject import LoraSpec, inject
from loratune.training.compiled import COMPILED_ATTENTION, compile_layers, layer_lists
from loratune.training.fastops import use_fast_attention, use_fast_dropout
from loratune.training.options import TrainConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and leaves no compiled code behind (dynamo's caches are per process)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0, attn_implementation="sdpa"))


def test_layer_lists_finds_each_family_s_stack() -> None:
    assert [n for n, _ in layer_lists(tiny_llama())] == ["model.layers"]
    assert [n for n, _ in layer_lists(tiny_model("bert"))] == ["bert.encoder.layer"]
    assert [n for n, _ in layer_lists(tiny_model("distilbert"))] == ["distilbert.transformer.layer"]
    assert [n for n, _ in layer_lists(tiny_model("gpt2"))] == ["transformer.h"]
    mixed = nn.Module()
    mixed.parts = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])      # not one class: not a layer stack
    mixed.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])             # no linear layer inside
    assert layer_lists(mixed) == [] and compile_layers(mixed) == 0


def _batch(width: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(width)
    ids = torch.randint(1, 64, (3, width), generator=g)
    mask = torch.ones(3, width, dtype=torch.long)
    if padded:
        mask[0, width // 2:] = 0
        ids[0, width // 2:] = 0
    return ids, mask


def test_the_compiled_training_pass_equals_the_eager_one_and_evaluation_stays_eager() -> None:
    """Dropout included: the compiled pass draws ``keep_mask``'s masks from torch's generator as the eager one does."""
    eager = tiny_llama()
    inject(eager, LoraSpec(targets=("q_proj", "v_proj"), rank=4, alpha=8.0, dropout=0.25))
    assert use_fast_dropout(eager) == 4
    with torch.no_grad():                                # B = 0 at the start: give the adapters a gradient path
        for n, p in eager.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model = copy.deepcopy(eager)
    keys = list(model.state_dict())
    assert compile_layers(model) == 2
    assert list(model.state_dict()) == keys              # nothing wrapped: checkpoints keep their keys
    seen: list[bool] = []
    model.model.layers[0].mlp.register_forward_hook(lambda *a: seen.append(torch.compiler.is_compiling()))
    ids, mask = _batch(12, padded=True)
    outs = []
    for m in (eager, model):
        m.train()
        m.zero_grad()
        torch.manual_seed(7)
        logits = m(input_ids=ids, attention_mask=mask).logits
        logits.float().pow(2).mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    assert seen == [True]                                # traced into the compiled graph
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys() and any("lora_A" in n for n in outs[0][1])
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    seen.clear()
    with torch.no_grad():                                # validation: the eager forward
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    model(input_ids=ids, attention_mask=mask)            # eval mode with autograd on: eager too
    assert seen == [False, False]


def test_a_batch_without_padding_does_not_compile_the_layers_again() -> None:
    """With fast attention (a training model's), a batch with no padding gets the causal mask as a tensor, not
    None, so the layers' compiled graphs serve it; so does another width (dynamic shapes)."""
    model = tiny_llama()
    inject(model, LoraSpec(targets=("q_proj", "v_proj"), rank=4, alpha=8.0, dropout=0.0))
    assert use_fast_attention(model)
    compile_layers(model)
    assert model.config._attn_implementation == COMPILED_ATTENTION
    model.train()

    def step(width: int, padded: bool) -> None:
        ids, mask = _batch(width, padded)
        model(input_ids=ids, attention_mask=mask).logits.float().mean().backward()

    step(10, padded=True)
    step(11, padded=True)                                # the first layer's input needs no grad: compiled once more
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(12, padded=False)
        step(17, padded=True)
        step(9, padded=False)
    with torch.no_grad():                                # evaluation keeps sdpa's own mask rule (None: is_causal)
        from transformers.masking_utils import create_causal_mask
        emb = model.model.embed_tokens(_batch(6, False)[0])
        assert create_causal_mask(config=model.config, inputs_embeds=emb, attention_mask=torch.ones(3, 6),
                                  cache=None, position_ids=torch.arange(6)[None]) is None


def test_a_compiled_run_trains_as_the_eager_run(tmp_path, llama_dir, data) -> None:  # noqa: F811
    """Through ``train()``: the same losses (fp32, LoRA dropout 0.1 drawn alike: the same computation, to rounding),
    the same adapter file (keys and values), and config.yaml records the option."""
    from loratune.training.loop import train

    runs, said = {}, []
    for on in (False, True):
        out = tmp_path / f"compile-{on}"
        train(TrainConfig(**opts(llama_dir, data, max_steps=6, dropout=0.1, compile=on)), out=out,
              progress=lambda e: said.append(e.get("text")) if e["kind"] == "message" else None)
        losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                  if r.get("type") == "train"]
        runs[on] = (losses, load_file(out / "adapter" / "adapter_model.safetensors"),
                    (out / "config.yaml").read_text())
    assert len(runs[True][0]) == 3 and runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    assert runs[True][1].keys() == runs[False][1].keys()
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-3, atol=1e-5, msg=k)
    assert "compile: true" in runs[True][2] and "compile: false" in runs[False][2]
    assert [t for t in said if "--compile" in t] == ["--compile: the first training step compiles 2 layers (1-2 "
                                                     "minutes the first time, seconds once inductor's cache is warm)"]


def test_compile_without_a_cxx_compiler_is_refused_in_one_line(tmp_path, llama_dir, data) -> None:  # noqa: F811
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "loratune", "train", "--model", llama_dir, "--data", data,
                           "--threads", "1", "--max-steps", "1", "--compile", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--compile: torch.compile needs a C++ compiler" in lines[0]
    assert not (out / "metrics.jsonl").exists()


def test_an_encoder_batch_without_padding_does_not_compile_the_layers_again() -> None:
    """BERT's all-ones mask (transformers' sdpa skips it: None) likewise, the first-token last layer included."""
    from loratune.training.firsttoken import first_token_last_layer

    model = tiny_model("bert")
    model.config._attn_implementation = "sdpa"
    inject(model, LoraSpec(targets=("query", "value"), rank=4, alpha=8.0, dropout=0.1))
    assert use_fast_attention(model) and first_token_last_layer(model)
    assert compile_layers(model) == 2
    model.train()

    def step(width: int, padded: bool) -> None:
        ids, mask = _batch(width, padded)
        model(input_ids=ids, attention_mask=mask).logits.float().mean().backward()

    step(10, padded=True)
    step(11, padded=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(12, padded=False)
        step(17, padded=True)
