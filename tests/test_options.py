"""Training options: one declaration per option drives the checks, ``auto`` defaults and the help text."""

from __future__ import annotations

import pytest

from loratune.errors import InputError
from loratune.training import options
from loratune.training.options import (
    AUTO_DEFAULTS,
    DEFAULTS,
    OPTIONS,
    TrainConfig,
    auto_text,
    declared_default,
    option_names,
    resolve_auto,
)

# The contract's defaults (DESIGN.md, TRAIN OPTIONS), with the quality issue's split_seed, method and
# modules_to_save and the causal-LM issue's task and columns: auto options appear resolved (the task
# of the built-in data is classification), except modules_to_save, which the model decides.
CONTRACT_DEFAULTS = {
    "model": "minilm-l6", "data": "rotten-tomatoes-4k", "task": "classification", "text_column": "text",
    "label_column": "label", "prompt_column": "prompt", "completion_column": "completion",
    "messages_column": "messages", "system_prompt": None, "validation_file": None, "test_file": None, "split_seed": 0, "sample_pct": 1.0, "max_length": 128,
    "method": "lora", "targets": ["qv"],
    "layers": None, "rank": 8, "alpha": 16.0, "dropout": 0.1, "bias": "none", "init": "kaiming", "variant": "lora",
    "rank_pattern": {}, "alpha_pattern": {}, "loraplus_ratio": None, "rslora": False,
    "modules_to_save": "auto", "lr": 5e-4, "weight_decay": 0.01, "warmup": 0.06, "epochs": 3, "max_steps": None, "batch_size": 16,
    "grad_accum": 1, "clip": 1.0, "early_stop": None, "evals_per_epoch": 1, "class_weights": "none",
    "precision": "auto",
    "device": "auto", "seed": 0, "log_every": 20, "bucket": True, "checkpoint_every": None, "threads": None,
    "compile": False,
}


def test_defaults_are_unchanged_and_exported() -> None:
    assert DEFAULTS == CONTRACT_DEFAULTS
    assert option_names() == list(CONTRACT_DEFAULTS) == list(OPTIONS)
    assert TrainConfig().to_dict() == DEFAULTS


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_declares_help_and_a_kind_that_matches_its_type(name) -> None:
    spec = OPTIONS[name]
    assert spec.help.strip() and not spec.help.startswith("(default")
    annotation = str(TrainConfig.__dataclass_fields__[name].type)
    expected = "list" if annotation.startswith("tuple") else annotation.split(" ")[0]
    assert spec.kind == expected, (annotation, spec.kind)
    assert spec.optional == annotation.endswith("| None")
    value = getattr(TrainConfig(), name)
    assert value is None or isinstance(value, {"str": str, "int": int, "float": float, "bool": bool,
                                                "list": tuple}[spec.kind])


@pytest.mark.parametrize("values, message", [
    ({"lr": 0}, "--lr: must be > 0, got 0"),
    ({"lr": "fast"}, "--lr: expected a number or auto, got 'fast'"),
    ({"lr": float("nan")}, "--lr: must be finite"),
    ({"max_length": 1}, "--max-length: must be >= 2, got 1"),
    ({"max_length": "long"}, "--max-length: expected an integer or auto"),
    ({"rank": 0}, "--rank: must be >= 1, got 0"),
    ({"rank": "auto"}, "--rank: expected an integer, got 'auto'"),
    ({"rank": 2.5}, "--rank: expected an integer, got 2.5"),
    ({"rank": True}, "--rank: expected an integer"),
    ({"dropout": 1.0}, "--dropout: must be < 1, got 1"),
    ({"sample_pct": 0}, "--sample-pct: must be > 0, got 0"),
    ({"sample_pct": 1.5}, "--sample-pct: must be <= 1, got 1.5"),
    ({"seed": 2**32}, "--seed: must be <= 4294967295, got 4294967296"),
    ({"clip": -1}, "--clip: must be >= 0, got -1"),
    ({"max_steps": 0}, "--max-steps: must be >= 1"),
    ({"bias": "some"}, "--bias: expected one of none, all, lora_only, got 'some'"),
    ({"precision": "fp8"}, "--precision: expected one of auto, fp32, bf16, fp16"),
    ({"rslora": "yes"}, "--rslora: expected true or false, got 'yes'"),
    ({"model": " "}, "--model: expected a non-empty string"),
    ({"validation_file": ""}, "--validation-file: expected a file path"),
    ({"targets": "q,,v"}, "--targets: empty target name"),
    ({"layers": "a-b"}, "--layers: expected indices like"),
    ({"targets": "re:.*query", "layers": "0"}, "--layers: cannot be combined with a re: target (peft refuses"),
    ({"targets": ["re:.*query", "value"], "layers": [1]}, "--layers: cannot be combined with a re: target"),
    ({"rnak": 4}, "unknown training option 'rnak'; known options: alpha, alpha_pattern, batch_size, bias"),
])
def test_bad_values_name_the_flag(values, message) -> None:
    with pytest.raises(InputError) as e:
        TrainConfig.from_dict(values)
    assert message in str(e.value), str(e.value)


def test_values_are_normalised() -> None:
    cfg = TrainConfig.from_dict({"clip": 0, "layers": "0-3", "targets": "q,v", "alpha": 8, "max_length": 64.0,
                                 "rslora": True, "max_steps": 10})
    assert cfg.clip is None and cfg.layers == (0, 1, 2, 3) and cfg.targets == ("q", "v")
    assert cfg.alpha == 8.0 and isinstance(cfg.alpha, float)
    assert cfg.max_length == 64 and isinstance(cfg.max_length, int)
    assert TrainConfig(layers=[3, 1, 1]).layers == (1, 3) and TrainConfig(layers="all").layers is None
    assert TrainConfig(targets="re:.*query").targets == ("re:.*query",)


def test_auto_resolves_to_numbers_at_construction() -> None:
    cfg = TrainConfig()
    assert declared_default("lr") == declared_default("max_length") == "auto"
    assert cfg.lr == 5e-4 and isinstance(cfg.lr, float) and cfg.max_length == 128 and isinstance(cfg.max_length, int)
    assert cfg.auto_fields == {"model", "task", "lr", "max_length", "modules_to_save", "epochs"}
    assert TrainConfig.from_dict({"lr": "auto", "max_length": "auto"}) == cfg              # YAML `lr: auto`
    explicit = TrainConfig(lr=1e-3, max_length=64, modules_to_save="none")
    assert explicit.auto_fields == {"model", "task", "epochs"} and explicit.lr == 1e-3 and explicit.modules_to_save == ()
    assert cfg.to_dict()["lr"] == 5e-4 and cfg.to_dict()["max_length"] == 128             # config.yaml: numbers
    assert cfg.to_dict()["modules_to_save"] == "auto"                  # the model decides (training writes the list)
    again = TrainConfig.from_dict(cfg.to_dict())                                           # a resume: the same run
    assert again == cfg and again.auto_fields == {"modules_to_save"}


def test_replace_keeps_auto_options_auto() -> None:
    cfg = TrainConfig()
    # the task, detected once, stays as detected unless what decides it (data, model, columns) changes
    assert cfg.replace(rank=4).auto_fields == {"model", "lr", "max_length", "modules_to_save", "epochs"}
    assert "task" in cfg.replace(data="rotten-tomatoes-4k-instruct").auto_fields
    assert cfg.replace(lr=2e-3).auto_fields == cfg.auto_fields - {"lr", "task"} and cfg.replace(lr=2e-3).lr == 2e-3
    assert cfg.replace(lr=2e-3).replace(lr="auto").lr == 5e-4
    with pytest.raises(InputError, match="--lr: must be > 0"):
        cfg.replace(lr=0)


def test_replace_resolves_auto_again_for_another_task_or_method(monkeypatch) -> None:
    """What a later ``replace(method="full")`` does: auto options follow, explicit ones stay."""
    monkeypatch.setitem(AUTO_DEFAULTS, ("classification", "other"), {"model": "minilm-l6", "lr": 7e-5,
                                                                      "max_length": 64, "modules_to_save": (),
                                                                      "epochs": 3})
    monkeypatch.setattr(TrainConfig, "auto_key",
                        lambda self: ("classification", "other" if self.rank == 99 else "lora"))
    cfg = TrainConfig()
    assert cfg.replace(rank=99).lr == 7e-5 and cfg.replace(rank=99).replace(rank=8).lr == 5e-4
    assert TrainConfig(lr=1e-3).replace(rank=99).lr == 1e-3


def test_resolve_auto_is_a_table_keyed_by_task_and_method() -> None:
    assert resolve_auto("lr") == 5e-4 and resolve_auto("max_length", "classification", "lora") == 128
    assert auto_text("lr") == ("auto = 0.0005 for LoRA classification, 5e-05 for full fine-tuning classification, "
                               "0.0005 for LoRA causal-LM")
    assert resolve_auto("lr", "classification", "full") == 5e-5
    assert resolve_auto("epochs", "causal-lm", "lora") == 1 and resolve_auto("model", "causal-lm") == "smollm2-135m"
    with pytest.raises(InputError, match="--max-length: no automatic value for full fine-tuning causal-LM; give a "
                                         "value"):
        resolve_auto("max_length", "causal-lm", "full")
    assert {n for n, spec in OPTIONS.items() if spec.auto} == {"model", "lr", "max_length", "modules_to_save",
                                                               "epochs"}
    assert options.flag("batch_size") == "--batch-size"
