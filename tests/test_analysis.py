"""ΔW analysis: numbers on constructed adapters with known answers, base weights (Linear and Conv1D), the CLI."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run, tiny_model
from safetensors.torch import load_file, save_file

from loratune.cli import main as cli
from loratune.core.adapters import save_adapter
from loratune.core.inject import LoraSpec, expand_targets, inject, lora_layers
from loratune.errors import InputError
from loratune.report.analysis import (
    LoraPair,
    amplification,
    analyze,
    analyze_adapter,
    effective_rank,
    format_table,
    lora_pairs,
    short_names,
    subspace_similarity,
    svd_lowrank_product,
)


def _orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    """(n, m) with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]


def write_adapter(folder: Path, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float = 8.0,
                  rslora: bool = False, base: str | None = None) -> Path:
    """A PEFT-format folder holding the given (A (r, k), B (d, r)) per module."""
    folder.mkdir(parents=True, exist_ok=True)
    r = next(iter(pairs.values()))[0].shape[0]
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
           "target_modules": sorted({n.rsplit(".", 1)[-1] for n in pairs}), "base_model_name_or_path": base}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.float32).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.float32).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _pair(d: int, k: int, r: int, seed: int, scaling: float = 2.0) -> LoraPair:
    g = torch.Generator().manual_seed(seed)
    return LoraPair("m", torch.randn(r, k, generator=g, dtype=torch.float64),
                    torch.randn(d, r, generator=g, dtype=torch.float64), scaling)


# --- the math ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,k,r", [(20, 30, 4), (48, 16, 8), (16, 16, 16), (7, 40, 3)])
def test_singular_values_equal_those_of_the_explicit_delta(d: int, k: int, r: int) -> None:
    pair = _pair(d, k, r, seed=d + k)
    u, s, v = svd_lowrank_product(pair)
    full = torch.linalg.svdvals(pair.delta())
    assert torch.allclose(s, full[:r], rtol=1e-10, atol=1e-12)
    assert full[r:].abs().max().item() < 1e-10 * full[0].item() if d > r and k > r else True
    assert torch.allclose(u @ torch.diag(s) @ v.T, pair.delta(), atol=1e-10)      # a true SVD of ΔW
    assert torch.allclose(u.T @ u, torch.eye(r, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(v.T @ v, torch.eye(r, dtype=torch.float64), atol=1e-10)


def test_scaling_alpha_over_r_and_rslora(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    plain = lora_pairs(write_adapter(tmp_path / "plain", {"l.q": (a, b)}, alpha=8))["l.q"]
    rs = lora_pairs(write_adapter(tmp_path / "rs", {"l.q": (a, b)}, alpha=8, rslora=True))["l.q"]
    assert plain.scaling == 2.0 and rs.scaling == 4.0
    explicit = 2.0 * b.double() @ a.double()
    got = analyze(tmp_path / "plain")["matrices"][0]["singular_values"]
    assert np.allclose(got, torch.linalg.svdvals(explicit)[:4].numpy(), rtol=1e-6)


def test_effective_rank() -> None:
    assert effective_rank([3.0, 1.0]) == 1                 # 9 / 10 = 90% exactly: one direction suffices
    assert effective_rank([1.0, 1.0, 1.0, 1.0]) == 4       # 3 of 4 equal directions hold only 75%
    assert effective_rank([1.0, 0.0, 0.0]) == 1
    assert effective_rank([0.0, 0.0]) == 0                 # ΔW = 0 (a fresh adapter)
    assert effective_rank(torch.tensor([2.0, 2.0, 1.0])) == 3


def test_a_rank_two_delta_has_effective_rank_at_most_two(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    b = torch.randn(24, 2, generator=g) @ torch.randn(2, 8, generator=g)       # B of rank 2: ΔW has rank ≤ 2
    a = torch.randn(8, 40, generator=g)
    result = analyze(write_adapter(tmp_path / "a", {"enc.0.query": (a, b)}, alpha=8))
    m = result["matrices"][0]
    assert m["rank"] == 8 and m["effective_rank"] <= 2
    s = np.asarray(m["singular_values"])
    assert s[2:].max() < 1e-5 * s[0]


def test_frobenius_norm(tmp_path: Path) -> None:
    pair = _pair(12, 9, 3, seed=5, scaling=8 / 3)
    folder = write_adapter(tmp_path / "a", {"x.v": (pair.A, pair.B)})
    m = analyze(folder)["matrices"][0]
    assert m["frobenius_norm"] == pytest.approx(torch.linalg.matrix_norm(lora_pairs(folder)["x.v"].delta()).item(),
                                                rel=1e-9)


def test_phi_identical_rotated_and_orthogonal_subspaces() -> None:
    q = _orthonormal(32, 8, seed=1)                          # 8 orthonormal directions in R^32
    g = torch.Generator().manual_seed(2)
    a1 = torch.diag(torch.tensor([5.0, 4, 3, 2], dtype=torch.float64)) @ q[:, :4].T        # (4, 32)
    phi = subspace_similarity(a1, a1)
    assert phi.shape == (4, 4)
    assert np.allclose(np.diag(phi), 1.0)
    a2 = q[:, 4:].T * 3.0                                    # orthogonal rows
    assert np.allclose(subspace_similarity(a1, a2), 0.0, atol=1e-12)
    mixed = torch.randn(4, 4, generator=g, dtype=torch.float64) @ a1    # same row space, other basis
    assert subspace_similarity(a1, mixed)[-1, -1] == pytest.approx(1.0)
    wide = torch.cat([a1 * 10, q[:, 4:6].T]) @ torch.eye(32, dtype=torch.float64)  # r=6 ⊇ a1's span on top
    phi = subspace_similarity(a1, wide)
    assert phi.shape == (4, 6) and phi[3, 3] == pytest.approx(1.0) and phi[3, 5] == pytest.approx(1.0)
    rand = subspace_similarity(a1, torch.randn(6, 32, generator=g, dtype=torch.float64))
    assert ((rand >= 0) & (rand <= 1)).all() and rand[0, 0] < 0.9


def test_amplification_known_answers() -> None:
    """W0 = P·diag(σ)·Qᵀ: a ΔW along W0's top-r directions sees ‖Uᵀ·W0·V‖ = ‖σ_1..r‖ (W0 already uses
    them: the factor is small), along its bottom-r directions ‖σ_{k-r+1..k}‖ (large), a random one in between."""
    d = k = 40
    r = 4
    p, q = _orthonormal(d, d, 10), _orthonormal(k, k, 11)
    sigma = torch.logspace(1, -2, k, dtype=torch.float64)                # 10 … 0.01
    w0 = p @ torch.diag(sigma) @ q.T

    def amp(b: torch.Tensor, a: torch.Tensor) -> float:
        pair = LoraPair("m", a, b, 1.0)
        u, s, v = svd_lowrank_product(pair)
        return amplification(u, v, w0, torch.linalg.vector_norm(s).item())

    top = amp(p[:, :r] * 0.5, q[:, :r].T)
    bottom = amp(p[:, -r:] * 0.5, q[:, -r:].T)
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(d, r, generator=g, dtype=torch.float64), torch.randn(r, k, generator=g, dtype=torch.float64)
    rand = amp(b / torch.linalg.matrix_norm(b @ a), a)            # the factor scales with ‖ΔW‖: compare at ‖ΔW‖ = 1
    assert top == pytest.approx(1.0 / torch.linalg.vector_norm(sigma[:r]).item(), rel=1e-9)   # ‖ΔW‖ = 0.5·2 = 1
    assert bottom == pytest.approx(1.0 / torch.linalg.vector_norm(sigma[-r:]).item(), rel=1e-9)
    assert top < rand < bottom


# --- real adapters on real (tiny) base models ---------------------------------------------------------

def _trained_like(tmp_path: Path, arch: str, targets: tuple[str, ...], rank: int, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A tiny model saved as a folder and an adapter on it with random non-zero A and B."""
    base = tiny_model(arch)
    base_dir = tmp_path / f"{arch}-base"
    base.save_pretrained(str(base_dir))
    model = tiny_model(arch)
    spec = LoraSpec(targets=targets, rank=rank, alpha=2.0 * rank)
    inject(model, spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.adapters["default"].lora_B.copy_(torch.randn(layer.adapters["default"].lora_B.shape, generator=g))
    out = save_adapter(model, tmp_path / f"{arch}-r{rank}", spec, expand_targets(model, targets),
                       base_model=str(base_dir), meta={"id2label": ["a", "b"], "model": str(base_dir)})
    return out, model


@pytest.mark.parametrize("arch,targets", [("bert", ("query", "value")), ("gpt2", ("c_attn", "attn.c_proj"))])
def test_amplification_against_the_base_weights(tmp_path: Path, arch: str, targets: tuple[str, ...]) -> None:
    """GPT-2's Conv1D stores W0 as (k, d): it is transposed to ΔW's (d, k) (c_proj is square: a wrong
    orientation would still fit and give another number)."""
    folder, model = _trained_like(tmp_path, arch, targets, rank=4)
    result = analyze(folder)
    layers = lora_layers(model)
    assert [m["name"] for m in result["matrices"]] == list(layers)
    for m in result["matrices"]:
        layer = layers[m["name"]]
        delta = layer.adapters["default"].delta_weight().double().detach()
        w0 = layer.base_layer.weight.double().detach()
        w0 = w0.T if layer.fan_in_fan_out else w0
        assert m["shape"] == list(delta.shape)
        u, s, vh = torch.linalg.svd(delta)
        expected = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(u[:, :4].T @ w0 @ vh[:4].T)
        assert m["amplification"] == pytest.approx(expected.item(), rel=1e-4)


def _peft_unconverted(tmp_path: Path, init: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A peft adapter started with ``init`` (pissa / olora), A and B nudged, saved as peft saves it by default
    (init_lora_weights kept, not converted); and the true ΔW of each matrix: peft's merged weight minus W0."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    tiny_model("bert").save_pretrained(str(base_dir))
    model = tf.BertForSequenceClassification.from_pretrained(str(base_dir))
    w0 = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if n.endswith(("query", "value"))}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                          init_lora_weights=init, task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"] == init
    merged = dict(pm.merge_and_unload().named_modules())
    return tmp_path / "adapter", {n: merged[n].weight.detach().double() - w for n, w in w0.items()}


@pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_pissa_and_olora_analyse_the_learned_delta(tmp_path: Path, init: str) -> None:
    """ΔW relative to the original W0 is s·(B·A − B0·A0), A0 and B0 recomputed from W0 as the loader does:
    its singular values (rank ≤ 2r) and norm equal those of peft's merged weight minus W0."""
    folder, truth = _peft_unconverted(tmp_path, init)
    result = analyze(folder)
    assert [m["name"] for m in result["matrices"]] == list(truth)
    for m in result["matrices"]:
        true = torch.linalg.svdvals(truth[m["name"]])
        assert m["rank"] == 4 and m["delta"] == "s*(B*A-B0*A0)"
        assert len(m["singular_values"]) == 8
        assert np.allclose(m["singular_values"], true[:8].numpy(), rtol=0, atol=1e-6)
        assert true[8:].max().item() < 1e-6                      # nothing left out: ΔW has rank ≤ 2r
        assert m["frobenius_norm"] == pytest.approx(torch.linalg.matrix_norm(truth[m["name"]]).item(), abs=1e-6)
        assert m["amplification"] is not None


@pytest.mark.filterwarnings("ignore:(PiSSA|OLoRA) changes the base weights:UserWarning")
def test_unconverted_pissa_without_its_base_is_labelled(tmp_path: Path) -> None:
    folder, _ = _peft_unconverted(tmp_path, "pissa")
    shutil.rmtree(tmp_path / "base")
    res = analyze_adapter(folder)
    pairs = lora_pairs(folder)
    for m in res.matrices:
        assert m.delta == "s*B*A (PiSSA, no base)"
        assert np.allclose(m.singular_values, torch.linalg.svdvals(pairs[m.name].delta())[:4].numpy(), rtol=1e-9)
    assert res.note is not None and "not what was learned" in res.note and "PiSSA" in res.note


def test_json_shape_and_compare(tmp_path: Path) -> None:
    first, _ = _trained_like(tmp_path / "a", "bert", ("query", "value"), rank=4, seed=1)
    second, _ = _trained_like(tmp_path / "b", "bert", ("query",), rank=8, seed=2)
    result = analyze(first, compare=second)
    assert set(result) == {"adapter", "matrices", "compare"}
    assert result["adapter"] == str(first)
    for m in result["matrices"]:
        assert set(m) == {"name", "shape", "rank", "singular_values", "effective_rank", "frobenius_norm", "amplification", "delta"}
        assert m["rank"] == 4 and len(m["singular_values"]) == 4 and isinstance(m["effective_rank"], int)
        assert m["singular_values"] == sorted(m["singular_values"], reverse=True)
    cmp = result["compare"]
    assert set(cmp) == {"adapter", "matrices"} and cmp["adapter"] == str(second)
    assert [c["name"] for c in cmp["matrices"]] == [m["name"] for m in result["matrices"] if m["name"].endswith("query")]
    for c in cmp["matrices"]:
        phi = np.asarray(c["phi"])
        assert phi.shape == (4, 8) and ((phi >= 0) & (phi <= 1 + 1e-12)).all()
    self_cmp = analyze(first, compare=first)["compare"]["matrices"]
    assert all(np.allclose(np.diag(np.asarray(c["phi"])), 1.0) for c in self_cmp)
    json.dumps(result, allow_nan=False)                   # plain JSON, no NaN
    assert analyze(first)["compare"] is None


def test_missing_base_gives_null_amplification_and_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = _trained_like(tmp_path, "bert", ("query",), rank=2)
    shutil.rmtree(tmp_path / "bert-base")
    with caplog.at_level(logging.WARNING, logger="loratune.report.analysis"):
        result = analyze(folder)
    assert all(m["amplification"] is None for m in result["matrices"])
    assert any("amplification not computed" in r.getMessage() and "bert-base" in r.getMessage() for r in caplog.records)
    assert all(m["singular_values"] for m in result["matrices"])    # the rest still works
    no_base = write_adapter(tmp_path / "nobase", {"l.q": (torch.randn(2, 5), torch.randn(4, 2))})
    assert analyze(no_base)["matrices"][0]["amplification"] is None
    with pytest.raises(InputError, match="--base"):
        analyze(folder, base=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_a_base_named_by_the_adapter_is_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         task: str) -> None:
    """As ``loratune infer``: only a base the user names (--base) may be fetched from the hub."""
    import loratune.training.models as models

    calls: list[tuple[str, bool]] = []

    def stub(loader, spec, what, *, download=True, **kw):
        calls.append((spec, download))
        raise InputError("stub: not loading")

    monkeypatch.setattr(models, "_from_pretrained", stub)
    folder = write_adapter(tmp_path / "a", {"l.q": (torch.randn(2, 5), torch.randn(4, 2))}, base="some-org/some-model")
    (folder / "loratune.json").write_text(json.dumps({"task": task}))
    analyze(folder)
    assert calls and all(c == ("some-org/some-model", False) for c in calls)
    calls.clear()
    with pytest.raises(InputError, match="--base"):
        analyze(folder, base="other-org/other-model")
    assert calls and all(c == ("other-org/other-model", True) for c in calls)


def test_the_table_says_when_a_matrix_is_not_the_learned_delta(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A DoRA adapter without its base shows s·B·A alone: the text table says so (the JSON has it in ``delta``),
    and the note is logged; a PiSSA / OLoRA matrix with its base says which ΔW it is."""
    g = torch.Generator().manual_seed(0)
    folder = write_adapter(tmp_path / "dora", {"l.q": (torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g))},
                           base=str(tmp_path / "gone"))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.l.q.lora_magnitude_vector"] = torch.ones(4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="loratune.report.analysis"):
        code = cli.main(["analyze", str(folder)])
    out = capsys.readouterr().out
    assert code == 0
    assert "DoRA without its base model" in out and "s·B·A alone" in out
    assert any("DoRA's ΔW" in r.getMessage() for r in caplog.records)
    lines = format_table({"matrices": [
        {"name": "a.q", "shape": [4, 5], "rank": 2, "singular_values": [1.0], "effective_rank": 1,
         "frobenius_norm": 1.0, "amplification": None, "delta": "s*B*A (PiSSA, no base)"}]})
    assert any("PiSSA" in line and "not what was learned" in line for line in lines)
    lines = format_table({"matrices": [
        {"name": "a.q", "shape": [4, 5], "rank": 2, "singular_values": [1.0], "effective_rank": 1,
         "frobenius_norm": 1.0, "amplification": 1.0, "delta": "s*(B*A-B0*A0)"}]})
    assert any("B0" in line and "A0" in line for line in lines)


@pytest.mark.parametrize("rslora,scaling", [(False, "(α/r)"), (True, "(α/√r)")])
def test_the_report_heading_follows_the_adapters_scaling(tmp_path: Path, rslora: bool, scaling: str) -> None:
    """rsLoRA scales by α/√r: the report's ΔW heading says so (from the adapter's use_rslora)."""
    from loratune.report.sections import analysis_section

    folder = write_adapter(tmp_path / "a", {"l.q": (torch.randn(2, 5), torch.randn(4, 2))}, rslora=rslora)
    heading = analysis_section(folder)[0]
    assert heading == f"<h2>What the adapter learned: ΔW = {scaling}·B·A</h2>"


def test_bad_adapters(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        analyze(tmp_path / "missing")
    good = write_adapter(tmp_path / "g", {"l.q": (torch.randn(2, 5), torch.randn(4, 2))})
    with pytest.raises(InputError, match=r"^--compare: .*missing does not exist"):   # its own flag, not --adapter's
        analyze(good, compare=tmp_path / "missing")
    folder = write_adapter(tmp_path / "a", {"l.q": (torch.randn(2, 5), torch.randn(4, 2))})
    save_file({"base_model.model.l.q.lora_A.weight": torch.randn(2, 5)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="lora_B"):
        analyze(folder)
    save_file({"base_model.model.classifier.weight": torch.randn(2, 5)}, str(folder / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="no LoRA tensors"):
        analyze(folder)


def test_short_names() -> None:
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    assert short_names(names) == ["layer.0.attention.self.query", "layer.1.attention.self.value"]
    assert short_names(["a.b"]) == ["a.b"]


# --- the command --------------------------------------------------------------------------------------

@pytest.fixture
def loratune_cli(monkeypatch: pytest.MonkeyPatch):
    return cli.main


def test_cli_analyze(tmp_path: Path, loratune_cli, capsys: pytest.CaptureFixture) -> None:
    first, _ = _trained_like(tmp_path / "a", "bert", ("query", "value"), rank=4, seed=1)
    second, _ = _trained_like(tmp_path / "b", "bert", ("query", "value"), rank=2, seed=2)
    assert loratune_cli(["analyze", str(first), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(analyze(first)))
    assert loratune_cli(["analyze", str(first), "--compare", str(second)]) == 0
    text = capsys.readouterr().out
    assert "eff. rank" in text and "layer.0.attention.self.query" in text and "φ(1,1)" in text
    lines = format_table(analyze(first))
    assert len(lines) == 1 + 4 and all(not math.isnan(float(line.split()[4])) for line in lines[1:])
    assert loratune_cli(["analyze", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert loratune_cli(["analyze", str(first), "--base", str(tmp_path / "nope")]) == 2
    assert "--base" in capsys.readouterr().err


def test_cli_errors_name_the_argument(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ADAPTER is positional: its error names it so, not a flag analyze does not have; a --base that does not
    load says so once, without the loader's own --model prefix."""
    nope = tmp_path / "nope"
    for extra in ([], ["--json"]):
        assert_one_line_error(*run(capsys, "analyze", str(nope), *extra)[::2], f"ADAPTER: {nope} does not exist")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(*run(capsys, "analyze", str(tmp_path / "file"))[::2], "ADAPTER: ")
    folder, _ = _trained_like(tmp_path, "bert", ("query",), rank=2)
    capsys.readouterr()                                  # transformers' progress bars while saving the base
    code, _, err = run(capsys, "analyze", str(folder), "--base", str(nope))
    assert_one_line_error(code, err, f"--base: cannot load '{nope}': {nope} does not exist")
    assert "--model" not in err and "--adapter" not in err
