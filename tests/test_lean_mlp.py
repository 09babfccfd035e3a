"""The lean-MLP lever (training/fastops.silu_mul): the same values and gradients as the model's own MLP."""

from __future__ import annotations

import torch

from loratune.core.inject import LoraSpec, inject
from loratune.training.fastops import SiluMul, silu_mul, use_lean_mlp


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_silu_mul_gradients_are_torch_s() -> None:
    g = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (g, u))
    out = silu_mul(g, u)
    ref = torch.nn.functional.silu(g) * u
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (g, u), grad)
    theirs = torch.autograd.grad(ref, (g, u), grad)
    assert torch.equal(out, ref)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():                                   # no autograd: the plain expression
        assert torch.equal(silu_mul(g, u), ref)


def test_a_lean_llama_trains_like_the_plain_one() -> None:
    """Same loss and the same LoRA gradients (fp32, to rounding) with the MLPs switched, which keep fewer tensors."""
    ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    grads, losses, saved = [], [], []
    for lean in (False, True):
        model = _llama()
        inject(model, LoraSpec(targets=("q_proj", "v_proj", "gate_proj", "up_proj"), rank=4, alpha=8, dropout=0.0))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(hash(n) % 1000))
        if lean:
            assert use_lean_mlp(model) == 2
        count = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            count[0] += t.numel() if t.shape[-1:] == (88,) else 0
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        saved.append(count[0])
    assert losses[0] == losses[1]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
    assert saved[0] - saved[1] == 2 * ids.numel() * 88                # one (tokens, 88) tensor less per MLP


def test_frozen_bf16_leaves_a_tied_lm_head_and_its_embedding_in_fp32() -> None:
    """bf16 training casts frozen linear weights once; a tied LM head is the embedding, which stays fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loratune.runtime import cast_frozen_linears

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.requires_grad_(False)
    assert cast_frozen_linears(model, "bf16") == 7                       # q, k, v, o, gate, up, down
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_frozen_bf16_lets_go_of_the_checkpoint_s_memory_map(tmp_path) -> None:
    """A model loaded from safetensors points into the file's memory map. After the frozen linears are cast, what
    was not cast (the tied embedding, the norms) is copied into the process's memory, with the same values, so the
    map and the file pages the cast read are released; without a cast (fp32) nothing is copied."""
    import gc
    import os

    from transformers import LlamaConfig, LlamaForCausalLM

    from loratune.runtime import cast_frozen_linears

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")

    def mapped() -> bool:
        gc.collect()
        with open(f"/proc/{os.getpid()}/maps") as f:
            return any(line.rstrip().endswith(weights) for line in f)

    model = LlamaForCausalLM.from_pretrained(tmp_path).requires_grad_(False)
    assert mapped() and not model.model.norm.weight.untyped_storage().resizable()   # the loader maps the file
    assert cast_frozen_linears(model, "fp32") == 0 and mapped()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert cast_frozen_linears(model, "bf16") == 7
    assert all(p.untyped_storage().resizable() for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for n, p in model.named_parameters():
        assert torch.equal(p.float(), before[n].to(p.dtype).float())
    assert not mapped()
