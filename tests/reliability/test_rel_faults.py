"""Faults: SIGKILL at random moments, a full disk mid-checkpoint, an interrupted adapter save, SIGTERM.
Nothing is lost beyond the last checkpoint, and resuming lands on the uninterrupted run's adapter."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_at_logged_step, synthetic_rows, tiny_model, write_csv
from safetensors.torch import load_file

import loratune
from loratune.core.adapters import load_adapter, save_adapter
from loratune.training.checkpoint import list_checkpoints, load_latest

CLI = [sys.executable, "-m", "loratune"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _opts(model: str, data: str) -> dict:
    return {"model": model, "data": data, "epochs": 3, "batch_size": 8, "lr": 3e-3, "max_length": 32, "rank": 4,
            "alpha": 8, "log_every": 5, "threads": 1, "checkpoint_every": 20, "dropout": 0.1}


def _flags(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> tuple[dict, Path, float]:
    """An uninterrupted run that every faulty run must end equal to."""
    tmp = tmp_path_factory.mktemp("faults")
    data = write_csv(tmp / "d.csv", synthetic_rows(1000, seed=5))          # 800 train rows: 100 steps an epoch
    opts = _opts(tiny_model_dir, data)
    t = time.time()
    out = subprocess.run(CLI + ["train", "--out", str(tmp / "ref"), *_flags(opts)], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return opts, tmp / "ref", time.time() - t


def _same_adapter(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-6, k


@pytest.mark.parametrize("seed", range(3))     # three random moments; test_trainer pins fixed kill points too
def test_sigkill_at_a_random_moment_then_resume(seed, reference, tmp_path) -> None:
    opts, ref, _ = reference
    run = tmp_path / "run"
    rng = random.Random(seed)
    target = rng.randrange(5, 280, 5)                # a random logged step of the 300, then a random extra delay
    extra = rng.uniform(0.0, 0.1)
    proc = subprocess.Popen(CLI + ["train", "--out", str(run), *_flags(opts)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_logged_step(proc, run, target, extra)
    assert not (run / "results.json").exists(), f"the run finished before the kill at step {target}"
    out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _same_adapter(ref / "adapter", run / "adapter")
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in (ref / "metrics.jsonl").read_text().splitlines()]


def _limit_file_size(nbytes: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # get EFBIG from write() instead of dying
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return preexec


def test_full_disk_while_checkpointing(reference, tmp_path) -> None:
    opts, ref, _ = reference
    run = tmp_path / "run"
    # A mid-epoch checkpoint has no best-epoch copy yet; the end-of-epoch one has: a limit between the
    # two lets the first checkpoints through and makes the adapter save and the epoch checkpoint fail.
    from loratune.training import loop as trainer

    sizes: dict[int, int] = {}
    real = trainer.save_checkpoint

    def recording(folder, step, state):
        path = real(folder, step, state)
        sizes[step] = path.stat().st_size
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "save_checkpoint", recording)
        loratune.train(out=tmp_path / "probe", **{**opts, "epochs": 1})
    small, big = sizes[20], sizes[100]                               # mid-epoch, end of epoch 1
    assert big > small
    limit = (small + big) // 2
    proc = subprocess.run(CLI + ["train", "--out", str(run), *_flags(opts)], env=ENV, capture_output=True, text=True,
                          preexec_fn=_limit_file_size(limit))
    assert proc.returncode == 1, proc.stderr
    assert "disk full" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (run / "results.json").exists()
    state = load_latest(run / "checkpoints")                       # the last good checkpoint still loads
    assert state is not None and state["step"] == 80                # the last mid-epoch one
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
    if (run / "adapter").exists():                                  # saved before the failing checkpoint:
        load_adapter(tiny_model("bert"), run / "adapter")              # whole, never truncated
    out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _same_adapter(ref / "adapter", run / "adapter")


def test_an_interrupted_adapter_save_leaves_the_old_adapter(tmp_path, monkeypatch) -> None:
    from loratune.core import adapters
    from loratune.core.inject import LoraSpec, inject

    model = tiny_model("bert").eval()
    spec = LoraSpec(targets=("qv",), rank=2, alpha=4)
    inject(model, spec)
    out = save_adapter(model, tmp_path / "adapter", spec, ["query", "value"])
    before = (out / "adapter_model.safetensors").read_bytes()

    def half_then_crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapters, "save_file", half_then_crash)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    with pytest.raises(OSError):
        save_adapter(model, out, spec, ["query", "value"])
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    load_adapter(tiny_model("bert"), out)


def test_sigterm_checkpoints_exits_130_and_resumes(reference, tmp_path) -> None:
    opts, ref, _ = reference
    run = tmp_path / "run"
    proc = subprocess.Popen(CLI + ["train", "--out", str(run), *_flags(opts)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(run / "checkpoints"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _same_adapter(ref / "adapter", run / "adapter")
