"""bench/phases.py: where a search trial's epoch goes. The wrappers time every call of the trainer's phases and
put the trainer back as it was; one eager epoch in a child process accounts for its steps and passes."""

from __future__ import annotations

import json
import math
import subprocess
import types
from pathlib import Path

import pytest

from bench import phases


def test_timed_records_each_call_and_restores_the_functions_even_on_an_error() -> None:
    def step(x: int) -> int:
        return x + 1

    def boom() -> None:
        raise ValueError("boom")

    mod = types.SimpleNamespace(step=step, boom=boom)
    with pytest.raises(ValueError, match="boom"), phases._timed(mod, {"s": "step", "b": "boom"}) as calls:
        assert mod.step(1) == 2 and mod.step(2) == 3
        assert mod.step is not step
        mod.boom()
    assert len(calls["s"]) == 2 and len(calls["b"]) == 1 and all(t >= 0 for t in calls["s"] + calls["b"])
    assert mod.step is step and mod.boom is boom


def test_one_eager_epoch_accounts_for_every_step_and_pass(tmp_path, capsys) -> None:
    from loratune.training.loop import prepare_data
    from loratune.training.options import TrainConfig

    out = tmp_path / "phases.json"
    assert phases.main(["--no-compile", "--rounds", "1", "--sample-pct", "0.05", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    (run,) = res["runs"]
    cfg = TrainConfig.from_dict({"split_seed": 1, "sample_pct": 0.05})
    assert run["compile"] is False and run["steps"] == math.ceil(len(prepare_data(cfg).train) / cfg.batch_size)
    assert run["validation_passes"] == 4                                # a trial's 4 rungs an epoch
    assert run["steps_s"] == pytest.approx(run["first_steps_s"] + run["later_steps_s"])
    phases_s = run["steps_s"] + run["validation_s"] + run["adapter_s"] + run["checkpoint_s"]
    assert 0 < phases_s <= run["wall_s"] and run["other_s"] == pytest.approx(run["wall_s"] - phases_s)
    assert run["adapter_s"] > 0 and run["checkpoint_s"] > 0     # a new best saves the adapter; each pass checkpoints
    repo = Path(phases.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    assert res["git"]["commit"] == head and res["machine"]["lscpu"]["CPU family"].isdigit()
    assert res["split_seed"] == 1 and res["threads"] == 1
    assert "| 1: eager |" in capsys.readouterr().out
