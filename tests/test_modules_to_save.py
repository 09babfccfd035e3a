"""``--modules-to-save`` (peft's ``modules_to_save``): modules that train in full and travel in the adapter."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from loratune.core.adapters import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_state,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from loratune.core.inject import (
    LoraSpec,
    count_parameters,
    expand_targets,
    full_modules,
    inject,
    lora_layers,
    resolve_targets,
    saved_modules,
    trains,
)
from loratune.errors import InputError

POOLER = ("bert.pooler.dense.weight", "bert.pooler.dense.bias")


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random changes to every trainable tensor (B, head, saved modules), so nothing is at its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _peft_trainable(pm) -> set[str]:
    out = set()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            n = n.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            out.add(re.sub(r"\.lora_([AB])\.default\.weight$", r".adapters.default.lora_\1", n))
    return out


def test_peft_loads_ours_with_the_saved_pooler(tmp_path, batch) -> None:
    spec = LoraSpec(targets=("qv",), rank=4, alpha=8, modules_to_save=("pooler",))
    ours = tiny_model("bert").eval()
    base = {n: p.detach().clone() for n, p in ours.named_parameters()}
    inject(ours, spec)
    _perturb(ours)
    out = save_adapter(ours, tmp_path / "a", spec, expand_targets(ours, spec.targets, spec.modules_to_save))

    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["pooler", "classifier", "score"] and cfg["task_type"] == "SEQ_CLS"
    keys = set(load_file(str(out / WEIGHTS_NAME)))
    assert {PREFIX + k for k in POOLER} <= keys and PREFIX + "classifier.weight" in keys

    ref = PeftModel.from_pretrained(tiny_model("bert").eval(), str(out)).eval()
    _close(ref(**batch).logits, ours(**batch).logits)
    # the pooler really changed and really travelled: peft's copy holds our values, not the base's
    peft_pooler = ref.base_model.model.bert.pooler.modules_to_save["default"].dense.weight
    assert not torch.allclose(peft_pooler, base["bert.pooler.dense.weight"])
    torch.testing.assert_close(peft_pooler, ours.bert.pooler.dense.weight)

    back = tiny_model("bert").eval()
    got = load_adapter(back, out)
    assert got.modules_to_save == ("pooler",)
    _close(back(**batch).logits, ours(**batch).logits)


def test_we_load_peft_s_with_the_saved_pooler(tmp_path, batch) -> None:
    pm = get_peft_model(tiny_model("bert"), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                       modules_to_save=["pooler"], task_type="SEQ_CLS"))
    _perturb(pm, seed=3)
    pm.save_pretrained(str(tmp_path / "p"))
    pm.eval()
    assert json.loads((tmp_path / "p" / CONFIG_NAME).read_text())["modules_to_save"] == ["pooler", "classifier", "score"]

    ours = tiny_model("bert").eval()
    base = ours.bert.pooler.dense.weight.detach().clone()
    spec = load_adapter(ours, tmp_path / "p")
    assert spec.modules_to_save == ("pooler",)
    assert not torch.allclose(ours.bert.pooler.dense.weight, base)
    _close(ours(**batch).logits, pm(**batch).logits)
    assert all(ours.get_parameter(k).requires_grad for k in POOLER)


def test_the_trainable_set_is_peft_s() -> None:
    spec = LoraSpec(targets=("qv",), rank=4, alpha=8, modules_to_save=("pooler",))
    ours = tiny_model("bert")
    inject(ours, spec)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".adapters.default.lora_" in n} | {
        *POOLER, "classifier.weight", "classifier.bias"}
    assert len([n for n in trainable if ".lora_" in n]) == 2 * 2 * 2          # 2 layers x (q, v) x (A, B)
    pm = get_peft_model(tiny_model("bert"), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       modules_to_save=["pooler"], task_type="SEQ_CLS"))
    assert count_parameters(ours)[0] == pm.get_nb_trainable_parameters()[0]
    assert trainable == _peft_trainable(pm)
    # one rule: trains() with the head and the saved modules is what mark_trainable applied ...
    full = full_modules(ours, spec.modules_to_save)
    assert full == ["classifier", "bert.pooler"]
    assert all(p.requires_grad == trains(n, full, "none") for n, p in ours.named_parameters())
    # ... and what the file holds
    state = adapter_state(ours, "default", "none", spec.modules_to_save)
    assert set(state) == {PREFIX + (n.replace(".adapters.default.", ".") + ".weight" if ".adapters." in n else n)
                          for n in trainable}


def test_targets_inside_a_saved_module_are_not_adapted() -> None:
    model = tiny_model("bert")
    assert "bert.pooler.dense" in resolve_targets(model, ["dense"])
    names = inject(model, LoraSpec(targets=("dense",), rank=2, modules_to_save=("pooler",)))
    assert "bert.pooler.dense" not in names and len(names) == 6                # attention.output, intermediate, output
    pm = get_peft_model(tiny_model("bert"), LoraConfig(r=2, target_modules=["dense"], modules_to_save=["pooler"],
                                                       task_type="SEQ_CLS"))
    assert set(names) == {n.removeprefix(PREFIX) for n, m in pm.named_modules()
                          if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert set(lora_layers(model)) == set(names)
    assert model.bert.pooler.dense.weight.requires_grad
    # a target that then matches nothing says why
    with pytest.raises(InputError, match=r"target 'pooler.dense' matches no linear layer of BertForSequenceClassification "
                                         r"that LoRA may adapt: bert.pooler.dense lies in bert.pooler"):
        resolve_targets(tiny_model("bert"), ["pooler.dense"], modules_to_save=["pooler"])
    # all-linear leaves out the saved module's layers, as it leaves out the head's
    distil = tiny_model("distilbert")
    assert "lin2" not in expand_targets(distil, ("all-linear",), ("lin2",))
    # a module that already holds LoRA (an earlier adapter) cannot become a saved module
    with pytest.raises(InputError, match="already holds LoRA"):
        inject(model, LoraSpec(targets=("query",), rank=2, modules_to_save=("intermediate",)), name="other")


def test_saved_module_names() -> None:
    model = tiny_model("bert")
    assert saved_modules(model, ["pooler"]) == ["bert.pooler"]
    assert saved_modules(model, ["bert.pooler", "pooler", "dense"]) == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.1.output.dense", "bert.pooler"]
    assert saved_modules(model, ["encoder", "layer"]) == ["bert.encoder"]   # outermost only
    assert saved_modules(model, ["classifier"]) == []                       # the head trains anyway
    assert saved_modules(model, []) == []


def test_unknown_module_name() -> None:
    with pytest.raises(InputError) as e:
        inject(tiny_model("bert"), LoraSpec(targets=("qv",), rank=2, modules_to_save=("poolr",)))
    assert str(e.value) == ("--modules-to-save: 'poolr' matches no module of BertForSequenceClassification; its main "
                            "modules are embeddings, encoder, pooler; the task head classifier trains in full anyway")
    with pytest.raises(InputError, match="--modules-to-save: 'pooler' matches no module of "
                                         "DistilBertForSequenceClassification; its main modules are embeddings, transformer"):
        inject(tiny_model("distilbert"), LoraSpec(targets=("qv",), rank=2, modules_to_save=("pooler",)))
    with pytest.raises(InputError, match="'ooler' matches no module"):        # whole names only
        saved_modules(tiny_model("bert"), ["ooler"])


@pytest.mark.parametrize("value,fragment", [
    ("pooler", "'modules_to_save' has the wrong type"),
    ([1], "'modules_to_save' must be a list of module names"),
    ([""], "'modules_to_save' must be a list of module names"),
    ({"pooler": 1}, "'modules_to_save' has the wrong type"),
])
def test_bad_modules_to_save_in_the_config(tmp_path, value, fragment) -> None:
    spec = LoraSpec(targets=("qv",), rank=2, modules_to_save=("pooler",))
    model = tiny_model("bert")
    inject(model, spec)
    out = save_adapter(model, tmp_path / "a", spec, ["query", "value"])
    cfg = json.loads((out / CONFIG_NAME).read_text())
    cfg["modules_to_save"] = value
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=fragment):
        read_adapter_config(out)


def test_null_or_head_only_modules_to_save_and_a_missing_saved_tensor(tmp_path) -> None:
    spec = LoraSpec(targets=("qv",), rank=2, modules_to_save=("pooler",))
    model = tiny_model("bert")
    inject(model, spec)
    out = save_adapter(model, tmp_path / "a", spec, ["query", "value"])
    cfg = json.loads((out / CONFIG_NAME).read_text())
    for value in (None, ["classifier", "score"]):
        cfg["modules_to_save"] = value
        (out / CONFIG_NAME).write_text(json.dumps(cfg))
        assert read_adapter_config(out)[0].modules_to_save == ()
    # the config names the pooler but the file lacks its bias: refused, not silently left at the base's value
    cfg["modules_to_save"] = ["pooler", "classifier", "score"]
    (out / CONFIG_NAME).write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    w = load_file(str(out / WEIGHTS_NAME))
    del w[PREFIX + "bert.pooler.dense.bias"]
    save_file(w, str(out / WEIGHTS_NAME))
    with pytest.raises(InputError, match=r"'base_model.model.bert.pooler.dense.bias' is missing \(1 tensors of "
                                         r"modules_to_save bert.pooler missing"):
        load_adapter(tiny_model("bert"), out)


class _Net(torch.nn.Module):
    """No transformers head: a linear layer, a BatchNorm (persistent buffers) and an output layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.bn, self.out = torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.bn(self.lin(x)))


def test_saved_buffers_travel_both_ways_without_a_head(tmp_path) -> None:
    """peft stores a saved module's state dict (BatchNorm's running statistics too); so do we, and we load them."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    pm = get_peft_model(_Net(), LoraConfig(r=2, target_modules=["lin"], modules_to_save=["bn"]))
    _perturb(pm, seed=4)
    pm.train()
    pm(x)                                                  # moves bn's running statistics off their start
    pm.save_pretrained(str(tmp_path / "p"))
    pm.eval()
    ours = _Net().eval()
    spec = load_adapter(ours, tmp_path / "p")
    assert spec.modules_to_save == ("bn",)
    assert not torch.equal(ours.bn.running_mean, torch.zeros(8))
    _close(ours(x), pm(x))

    out = save_adapter(ours, tmp_path / "a", spec, ["lin"])
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["bn"] and cfg["task_type"] is None
    assert set(load_file(str(out / WEIGHTS_NAME))) == set(load_file(str(tmp_path / "p" / WEIGHTS_NAME)))
    ref = PeftModel.from_pretrained(_Net().eval(), str(out)).eval()
    _close(ref(x), ours(x))


# --- the default (``auto``): names from the table that a model lacks are dropped; given names must exist ----------

def test_default_modules_to_save_fit_each_model_and_config_yaml_records_them(tmp_path, tiny_model_dir,
                                                                            monkeypatch) -> None:
    import yaml

    from loratune.training.loop import build_model
    from loratune.training.options import AUTO_DEFAULTS, TrainConfig

    row = ("classification", "lora")
    monkeypatch.setitem(AUTO_DEFAULTS, row, {**AUTO_DEFAULTS[row], "modules_to_save": ("pooler",)})
    model, spec, _ = build_model(TrainConfig(model=tiny_model_dir), ["neg", "pos"])
    assert spec.modules_to_save == ("pooler",)
    pooler = [p for n, p in model.named_parameters() if ".pooler." in n]
    assert pooler and all(p.requires_grad for p in pooler)
    distil = tmp_path / "distil"
    tiny_model("distilbert").save_pretrained(str(distil))
    model, spec, _ = build_model(TrainConfig(model=str(distil)), ["neg", "pos"])      # no pooler: dropped
    assert spec.modules_to_save == ()
    with pytest.raises(InputError, match="--modules-to-save: 'pooler' matches no module"):
        build_model(TrainConfig(model=str(distil), modules_to_save="pooler"), ["neg", "pos"])

    from conftest import synthetic_rows, write_csv

    import loratune
    data = write_csv(tmp_path / "d.csv", synthetic_rows(80))
    out = tmp_path / "run"
    loratune.train(model=tiny_model_dir, data=data, out=out, max_steps=2, batch_size=8, max_length=32, threads=1)
    assert yaml.safe_load((out / "config.yaml").read_text())["modules_to_save"] == ["pooler"]   # resolved
    assert "pooler" in json.loads((out / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    assert any(".pooler." in k for k in load_file(str(out / "adapter" / "adapter_model.safetensors")))
