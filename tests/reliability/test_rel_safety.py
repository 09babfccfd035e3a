"""Safe files: nothing is unpickled, adapter files are validated, names can't reach outside the
folder, and a base model named by a file is never fetched. Random bytes and JSON give clean errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratune.core.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter_config,
)
from loratune.errors import InputError
from loratune.infer import inference
from loratune.training import models

SRC = Path(__file__).resolve().parents[2] / "src" / "loratune"


def test_nothing_in_the_source_unpickles() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b(pickle|cPickle|dill|joblib)\.loads?\(", code) or \
                    (re.search(r"torch\.load\(", code) and "weights_only=True" not in code) or \
                    "trust_remote_code=True" in code or re.search(r"\bnp\.load\(.*allow_pickle=True", code):
                offenders.append(f"{path.name}:{no}: {line.strip()}")
    assert not offenders, offenders
    assert any("weights_only=True" in p.read_text() for p in SRC.rglob("*.py"))   # the one torch.load there is


def _fresh(tmp_path: Path, finished_run: Path) -> Path:
    adapter = tmp_path / "adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    shutil.copytree(finished_run / "adapter", adapter)
    return adapter


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=20), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules", "peft_type",
                                                "bias", "use_rslora", "layers_to_transform", "modules_to_save",
                                                "init_lora_weights", "fan_in_fan_out", "rank_pattern", "x"]),
                               json_values, min_size=1, max_size=4))
def test_random_adapter_config_values_give_clean_errors(changes, tmp_path, finished_run) -> None:
    adapter = _fresh(tmp_path, finished_run)
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    cfg.update(changes)
    (adapter / CONFIG_NAME).write_text(json.dumps(cfg))
    try:
        load_adapter(tiny_model("bert"), adapter)
    except InputError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=400), keep_header=st.booleans())
def test_random_bytes_as_adapter_files_give_clean_errors(blob, keep_header, tmp_path, finished_run) -> None:
    adapter = _fresh(tmp_path, finished_run)
    weights = (adapter / WEIGHTS_NAME).read_bytes()
    (adapter / WEIGHTS_NAME).write_bytes((weights[:64] if keep_header else b"") + blob)
    with pytest.raises(InputError):
        load_adapter(tiny_model("bert"), adapter)
    (adapter / CONFIG_NAME).write_bytes(blob)
    with pytest.raises(InputError):
        read_adapter_config(adapter)


def test_a_base_named_by_a_file_is_never_fetched(tmp_path, finished_run, monkeypatch) -> None:
    adapter = _fresh(tmp_path, finished_run)
    (adapter / "loratune.json").unlink()
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    cfg["base_model_name_or_path"] = "someone/evil-model"
    (adapter / CONFIG_NAME).write_text(json.dumps(cfg))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls: list[dict] = []

    class Spy:
        @staticmethod
        def from_pretrained(spec, **kwargs):
            calls.append({"spec": spec, **kwargs})
            raise OSError("not cached")

    import transformers

    monkeypatch.setattr(transformers, "AutoConfig", Spy)
    monkeypatch.setattr(transformers, "AutoTokenizer", Spy)      # loaded first (its pad id goes into the config)
    with pytest.raises(InputError, match="never downloads what a file names"):
        inference.load(adapter)
    assert calls and all(c["local_files_only"] and c["trust_remote_code"] is False for c in calls)


def test_remote_code_is_never_enabled(monkeypatch, tiny_model_dir) -> None:
    seen: list[bool] = []
    import transformers

    real = transformers.AutoConfig.from_pretrained

    def spy(spec, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(spec, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    models.load_model(tiny_model_dir, ["a", "b"])
    assert seen == [False]
