"""bench/llm_speed.py (``make bench-llm``'s speed half): its flags, what each TRL side sets, and loratune's side run
for real on the built-in LLM for a few steps (the child script uses the trainer's internals, so a change there
must show up here, not only when someone runs the benchmark). The TRL sides need TRL installed and are not run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import llm_speed

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("argv, message", [(["--steps", "1"], "at least 2"), (["--sides", "loratune,trl"], "unknown")])
def test_bad_flags_are_refused(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        llm_speed.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_trl_sides_are_its_defaults_and_its_best() -> None:
    """TRL's defaults are SFTConfig's own (nothing set but the run's switches); its best is the issue's list."""
    assert llm_speed.SIDES["loratune"] is None and llm_speed.SIDES["loratune-compile"] is None
    assert llm_speed.SIDES["trl-defaults"] == {}
    assert llm_speed.SIDES["trl-best"] == {"bf16": True, "gradient_checkpointing": False,
                                           "train_sampling_strategy": "group_by_length"}
    assert "use_cpu=True" in llm_speed.TRL and "per_device_train_batch_size=conf[\"batch\"]" in llm_speed.TRL
    assert llm_speed.TRL_VERSION.count(".") == 2 and "==" not in llm_speed.TRL_VERSION


@pytest.mark.slow
def test_loratune_side_trains_the_first_conversations(tmp_path) -> None:
    """Three optimizer steps of 16 on the built-in LLM: the timed tokens are those of steps 2 and 3 (the first is a
    warm-up), real (non-pad) tokens of the first 48 training conversations."""
    from loratune.tasks.batches import batch_order
    from loratune.training import loop
    from loratune.training.options import TrainConfig

    out = subprocess.run([sys.executable, "-c", llm_speed.OURS, "48", "1", str(tmp_path / "run"), "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    data = loop.prepare_data(TrainConfig(data="rotten-tomatoes-4k-instruct"))
    lengths = data.train.lengths[:48]
    assert r["all_tokens"] == int(lengths.sum())
    order = batch_order(np.asarray(lengths), 16, bucket=True, shuffle=True, seed=0, epoch=0)
    assert r["steps"] == 2 and r["tokens"] == int(lengths.sum() - lengths[order[0]].sum())   # all but the warm-up's
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert r["threads"] == 1 and r["peak_rss_mib"] > 500 and r["compile"] is False
    assert r["train_mode"] is True                      # dropout on, as in fit(): not an evaluation-mode model
    assert r["shapes"] == llm_speed.batch_shapes(48)    # the ceiling is timed on exactly these batches
    assert [s[0] for s in r["shapes"]] == [16, 16] and sum(s[2] for s in r["shapes"]) == r["tokens"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    return mc, LlamaForCausalLM(mc)


def test_linear_shapes_are_the_decoder_layers_linears() -> None:
    """(out, in) of q, k, v, o, gate, up, down as a Llama layer holds them (grouped-query k/v narrower)."""
    mc, model = _tiny_llama()
    layer = model.model.layers[0]
    mods = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
            layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    assert llm_speed.linear_shapes(mc) == [tuple(m.weight.shape) for m in mods]
    assert llm_speed.linear_shapes(mc)[1] == (16, 32)


def test_matmul_ceiling_counts_the_sides_useful_flops() -> None:
    """Useful FLOPs are the sides' (4 per weight per real token), whatever the padding; the padding fraction is
    1 - real / padded tokens, 0 when packed."""
    mc, _ = _tiny_llama()
    shapes = [[4, 10, 31], [3, 6, 18]]                  # rows, padded width, real tokens
    weights = mc.num_hidden_layers * sum(o * i for o, i in llm_speed.linear_shapes(mc))
    for packed, padding in ((False, 1 - 49 / 58), (True, 0.0)):
        c = llm_speed.matmul_ceiling(mc, shapes, rounds=1, packed=packed)
        assert c["tokens_per_s"] == pytest.approx(49 / c["seconds"])
        assert c["gflops"] * 1e9 * c["seconds"] == pytest.approx(4 * weights * 49)
        assert c["share_bf16_peak"] == pytest.approx(c["gflops"] / c["peak_gflops"])
        assert c["padding_fraction"] == pytest.approx(padding) and c["packed"] is packed
