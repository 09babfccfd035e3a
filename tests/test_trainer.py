"""The training loop end to end on a tiny local model: files, learning, resume after SIGKILL, API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import synthetic_rows, write_csv
from safetensors.torch import load_file

import loratune
from loratune.errors import InputError
from loratune.training.loop import _schedule

CLI = [sys.executable, "-m", "loratune"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _opts(model: str, data: str, **kw) -> dict:
    return {"model": model, "data": data, "epochs": 2, "batch_size": 8, "lr": 3e-3, "max_length": 32, "rank": 4,
            "alpha": 8, "log_every": 5, "threads": 1, **kw}


def _flags(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_train_writes_the_contract_files_and_learns(tmp_path, tiny_model_dir, tiny_data) -> None:
    r = loratune.train(out=tmp_path / "run", **_opts(tiny_model_dir, tiny_data, epochs=4))
    run = tmp_path / "run"
    assert {"config.yaml", "adapter", "metrics.jsonl", "results.json", "tb", "checkpoints"} <= {p.name for p in run.iterdir()}
    res = json.loads((run / "results.json").read_text())
    for split in ("validation", "test"):
        assert set(res[split]) == {"loss", "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"}
    assert res["validation"]["accuracy"] >= 0.9, res        # the sentiment word decides the label
    assert res["best_epoch"] == r.best_epoch and 1 <= r.best_epoch <= 4
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["type"] == "eval"] == [1, 2, 3, 4]
    assert sum(x["type"] == "train" for x in lines) == 4 * 40 // 5  # 320 rows / 8 = 40 steps an epoch
    assert res["train"]["tokens_per_s"] > 0 and res["train"]["trainable_params"] > 0
    assert json.loads((run / "adapter" / "loratune.json").read_text())["id2label"] == ["neg", "pos"]
    # the best epoch's validation metrics are the ones kept
    best = next(x for x in lines if x["type"] == "eval" and x["epoch"] == r.best_epoch)
    assert best["loss"] == pytest.approx(res["validation"]["loss"]) == min(x["loss"] for x in lines if x["type"] == "eval")


def test_schedule_is_linear_warmup_then_decay() -> None:
    f = _schedule(total=100, warmup=10)
    assert [f(0), f(5), f(10), f(55), f(100)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_same_seed_same_adapter_and_max_steps(tmp_path, tiny_model_dir, tiny_data) -> None:
    a = loratune.train(out=tmp_path / "a", **_opts(tiny_model_dir, tiny_data, epochs=1))
    b = loratune.train(out=tmp_path / "b", **_opts(tiny_model_dir, tiny_data, epochs=1))
    wa, wb = (load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = loratune.train(out=tmp_path / "c", **_opts(tiny_model_dir, tiny_data, epochs=5, max_steps=50))
    assert c.train["steps"] == 50 and c.train["epochs_run"] == 2


def test_grad_accum_and_balanced_weights_run(tmp_path, tiny_model_dir) -> None:
    data = write_csv(tmp_path / "skewed.csv", synthetic_rows(300)[:200] + [r for r in synthetic_rows(300)[200:] if r[1] == "pos"])
    r = loratune.train(out=tmp_path / "r", **_opts(tiny_model_dir, data, epochs=1, grad_accum=3,
                                                  class_weights="balanced", bucket=False, precision="fp32"))
    # 250 rows -> 200 train; 25 batches of 8 -> 9 optimizer steps of up to 3 batches
    assert r.train["steps"] == 9 and r.validation["accuracy"] > 0


def _kill_after_checkpoint(cmd: list[str], run: Path, min_step: int) -> None:
    """Start ``cmd``, SIGKILL it as soon as a checkpoint at or past ``min_step`` exists."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.stem[5:]) for p in (run / "checkpoints").glob("step-*.pt")] if (run / "checkpoints").is_dir() else []
        if steps and max(steps) >= min_step:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists(), "the run finished before it could be killed"


def test_resume_after_sigkill_gives_the_same_adapter(tmp_path, tiny_model_dir) -> None:
    data = write_csv(tmp_path / "more.csv", synthetic_rows(1500, seed=3))      # 1,200 train rows: 150 steps/epoch
    opts = _opts(tiny_model_dir, data, epochs=3, checkpoint_every=20, dropout=0.1)
    ref = loratune.train(out=tmp_path / "ref", **opts)
    w_ref = load_file(str(ref.run_dir / "adapter" / "adapter_model.safetensors"))
    for n, kill_at in enumerate((40, 200)):                 # mid-epoch 1; mid-epoch 2 (after an evaluation)
        run = tmp_path / f"killed-{n}"
        _kill_after_checkpoint(CLI + ["train", "--out", str(run), *_flags(opts)], run, kill_at)
        out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        w_res = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        assert w_ref.keys() == w_res.keys()
        for k in w_ref:
            assert (w_ref[k] - w_res[k]).abs().max().item() <= 1e-6, k
        res_ref = json.loads((ref.run_dir / "results.json").read_text())
        res = json.loads((run / "results.json").read_text())
        assert res["validation"] == pytest.approx(res_ref["validation"], abs=1e-6)
        assert res["best_epoch"] == res_ref["best_epoch"]
        ref_lines = (ref.run_dir / "metrics.jsonl").read_text().splitlines()
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [json.loads(x)["step"] for x in ref_lines]  # none twice
    again = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_sigint_checkpoints_exits_130_and_resumes(tmp_path, tiny_model_dir, tiny_data) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(CLI + ["train", "--out", str(run), *_flags(_opts(tiny_model_dir, tiny_data, epochs=3))],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert list((run / "checkpoints").glob("step-*.pt"))
    out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (run / "results.json").exists()


def test_library_rejects_bad_options(tmp_path, tiny_model_dir, tiny_data) -> None:
    with pytest.raises(InputError, match="--lr"):
        loratune.train(out=tmp_path / "x", **_opts(tiny_model_dir, tiny_data, lr=0))
    with pytest.raises(InputError, match="unknown training option 'rnak'"):
        loratune.train(out=tmp_path / "x", rnak=3)
    assert not (tmp_path / "x").exists()


def test_early_stop_after_epochs_without_improvement(tmp_path, tiny_model_dir, tiny_data, monkeypatch) -> None:
    """--early-stop 2: validation losses 0.5, 0.4, 0.45, 0.46 stop the run after epoch 4 (two epochs without a
    new best), keep epoch 2 as the best, and leave epoch 2's adapter (not epoch 4's) in the run directory."""
    from loratune.training import loop as trainer

    scripted = iter([0.5, 0.4, 0.45, 0.46, 0.3, 0.2])          # 0.3 and later: never reached by validation
    snapshots: list[dict[str, torch.Tensor]] = []              # LoRA weights at each evaluation, in call order
    real = trainer.evaluate

    def scripted_evaluate(model, enc, *a, **kw):
        metrics, probs = real(model, enc, *a, **kw)
        snapshots.append({n.replace(".adapters.default", ""): p.detach().clone()
                          for n, p in model.named_parameters() if "lora_" in n})
        return {**metrics, "loss": next(scripted)}, probs

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    r = loratune.train(out=tmp_path / "run", **_opts(tiny_model_dir, tiny_data, epochs=6, early_stop=2))
    assert r.train["stopped_early"] is True and r.train["epochs_run"] == 4 and r.best_epoch == 2
    assert r.validation["loss"] == pytest.approx(0.4)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["type"] == "eval"] == [1, 2, 3, 4]
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    lora = {k.removeprefix("base_model.model.").removesuffix(".weight"): v for k, v in saved.items() if "lora_" in k}
    epoch2, epoch4 = snapshots[1], snapshots[3]
    assert lora and set(lora) == set(epoch2)
    assert all(torch.equal(v, epoch2[k]) for k, v in lora.items())
    assert not all(torch.equal(v, epoch4[k]) for k, v in lora.items())   # it did train on after epoch 2


RELEASE = """
import psutil, torch
from loratune.runtime import release_memory
me = psutil.Process()
big = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del big                                       # glibc raises its mmap threshold to 16 MB (it does so up to 32 MB)
keep, freed = [], []
for _ in range(400):
    freed.append(torch.empty(1 << 20, dtype=torch.uint8).fill_(1))   # 1 MB each, now from the heap, touched
    keep.append(torch.ones(16))                                       # small blocks pin the heap between them
del freed
before = me.memory_full_info().uss
ran = release_memory()
print(ran, (before - me.memory_full_info().uss) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_release_memory_hands_a_fragmented_heap_back() -> None:
    """Without it a reused Ray worker grew by ~0.9 GB a trial (freed activations stay in glibc's heap)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}   # glibc's defaults
    ran, returned_mib = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=env,
                                       check=True).stdout.split()
    assert ran == "True" and int(returned_mib) >= 350       # of the 400 MB freed
