"""Search faults: a trial's worker killed (the trial is retried, the search completes); SIGINT or
SIGTERM to the driver (exit 130, no Ray process left behind, --resume completes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import synthetic_rows, write_csv

CLI = [sys.executable, "-m", "loratune"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(tmp_path: Path, model: str, samples: int = 3) -> tuple[subprocess.Popen, Path, Path]:
    data = write_csv(tmp_path / "reviews.csv", synthetic_rows(800, seed=2))     # an epoch takes seconds
    config = tmp_path / "space.yaml"
    config.write_text(f"samples: {samples}\nmax_epochs: 2\nrungs_per_epoch: 1\n"       # a report, a rung: an epoch
                      "search:\n  lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    out = tmp_path / "s"
    log = tmp_path / "driver.log"
    argv = ["tune", "--config", str(config), "--model", model, "--data", data, "--out", str(out),
            "--batch-size", "8", "--max-length", "32", "--max-failures", "2"]
    with open(log, "w") as f:
        proc = subprocess.Popen([*CLI, *argv], env=ENV, stdout=f, stderr=subprocess.STDOUT)
    return proc, out, log


def _epochs_reported(out: Path) -> int:
    n = 0
    for path in (out / "ray").glob("*/result.json"):
        n += sum(1 for line in path.read_text().splitlines() if line.strip().endswith("}"))
    return n


def _trial_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    found = []
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any("ImplicitFunc" in part or "_trial" in part for part in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _wait(cond, proc: subprocess.Popen, log: Path, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"the search ended before {what}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _first_report(out: Path) -> dict | None:
    """Of the epoch-1 reports so far, the one with the lowest validation loss: ASHA lets it go on whether it
    was recorded at the rung first (no cutoff yet) or second (better than the cutoff)."""
    reports = []
    for path in (out / "ray").glob("*/result.json"):
        lines = [line for line in path.read_text().splitlines() if line.strip().endswith("}")]
        reports += [json.loads(lines[0])] if lines else []
    return min(reports, key=lambda r: r["val_loss"], default=None)


def test_a_killed_trial_worker_is_retried_and_the_search_completes(tmp_path, tiny_model_dir) -> None:
    """The victim is the worker of a trial that ASHA let go on after epoch 1, so it is mid-way through
    epoch 2. (A kill that lands while Ray resets a reused worker for a new trial is counted twice by
    Ray 2.60 and can use up both retries; that trial then ends failed, without a result: test_search's
    test_a_trial_whose_worker_died_before_its_first_report_is_a_failed_row.)"""
    proc, out, log = _start(tmp_path, tiny_model_dir)
    try:
        _wait(lambda: _first_report(out) is not None, proc, log, "a trial's first epoch")
        first = _first_report(out)
        victim = psutil.Process(first["pid"])
        assert victim in _trial_workers(proc)
        victim.send_signal(signal.SIGKILL)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert f"trial {first['trial_id']} failed; retrying from its last checkpoint" in text, text[-3000:]
    assert f"trial {first['trial_id']} resumed after epoch 1" in text, text[-3000:]
    table = json.loads((out / "trials.json").read_text())
    assert len(table) == 3 and all(t["status"] in ("completed", "stopped_early") for t in table), table
    assert (out / "best" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_the_driver_exits_130_leaves_nothing_and_resumes(sig, tmp_path, tiny_model_dir) -> None:
    proc, out, log = _start(tmp_path, tiny_model_dir, samples=4)
    try:
        _wait(lambda: _epochs_reported(out) >= 1, proc, log, "a trial's first epoch")
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "no Ray processes under the driver"
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 130, text[-3000:]
    assert "Traceback" not in text and "--resume" in text, text[-3000:]
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.pid for p in alive]                      # Ray shut down: no process left behind
    assert not (out / "search.json").exists()
    if sig == signal.SIGINT:
        return      # the resume after it is the same code as after SIGTERM's (the same checkpoints): run once, below
    done = subprocess.run([*CLI, "tune", "--resume", str(out)], env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = json.loads((out / "trials.json").read_text())
    assert len(table) == 4 and all(t["status"] in ("completed", "stopped_early") for t in table), table
