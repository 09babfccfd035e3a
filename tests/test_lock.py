"""One live process per run or search directory (training/lock.py): real processes, a real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loratune.cli.main import main
from loratune.errors import InputError
from loratune.training import lock

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "32", "--rank", "4", "--threads", "1"]
HOLDER = """
import sys, time
from pathlib import Path
from loratune.training import lock
with lock.hold(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_elsewhere(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_directory_is_refused_naming_the_holder_and_freed_by_kill_9(tmp_path: Path) -> None:
    holder = hold_elsewhere(tmp_path / "run")
    try:
        with pytest.raises(InputError, match=rf"--out: .*run is in use by another loratune process \(pid {holder.pid}"):
            with lock.hold(tmp_path / "run"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    with lock.hold(tmp_path / "run"):            # the OS released it: no stale lock after a crash
        assert (tmp_path / "run" / lock.NAME).read_text().startswith(f"pid {os.getpid()}:")


def test_train_tune_resume_and_overwrite_on_a_busy_directory_exit_2(tmp_path: Path, tiny_model_dir: str,
                                                                    tiny_data: str, capsys) -> None:
    out = tmp_path / "run"
    base = ["train", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out), *FAST]
    assert main(base) == 0
    (out / "results.json").unlink()               # as if killed before its end: a --resume would continue it
    finished = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != lock.NAME}
    holder = hold_elsewhere(out)
    try:
        capsys.readouterr()
        for argv in (base + ["--overwrite"], ["train", "--out", str(out), "--resume"],
                     ["tune", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out), "--overwrite",
                      "--max-length", "32"]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"in use by another loratune process (pid {holder.pid}" in err[0], err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != lock.NAME} == finished   # untouched
    assert main(base + ["--overwrite"]) == 0                                        # free again


def test_two_trains_started_at_once_one_runs_one_is_refused(tmp_path: Path, tiny_model_dir: str) -> None:
    """As a user would: the same command twice at once. Exactly one writes the run; the other exits 2.

    Reading a large data file (300,000 rows, 0.2% of them trained on) keeps each process a few seconds
    between its first check of ``--out`` and its first write there: without the lock both passed the check
    and both wrote into the folder (the issue's finding), which this test catches."""
    from conftest import synthetic_rows, write_csv

    write_csv(tmp_path / "big.csv", synthetic_rows(300) * 1000)
    write_csv(tmp_path / "val.csv", synthetic_rows(40, seed=1))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "loratune", "train", "--model", tiny_model_dir, "--data", str(tmp_path / "big.csv"),
            "--validation-file", str(tmp_path / "val.csv"), "--test-file", str(tmp_path / "val.csv"),
            "--sample-pct", "0.002", "--out", str(out), *FAST, "--epochs", "2"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    deadline = time.monotonic() + 300
    results = [p.communicate(timeout=max(1, deadline - time.monotonic())) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], results
    refused = results[[p.returncode for p in procs].index(2)][1]
    assert "in use by another loratune process (pid " in refused, refused
    evals = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"type": "eval"' in line]
    assert len(evals) == 2                        # one run's two evaluations, not two runs interleaved


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="loratune.training.lock"), lock.hold(tmp_path / "run"):
        ran = True
    assert ran and "has no file locks" in caplog.text
    assert lock.holder(tmp_path / "run") is None
