"""The search end to end on the tiny model: table and files, the default trial first, best on validation,
divergence, lr = 0.1, Optuna, Ray on loopback only, the CLI, and resume after SIGKILL of the driver."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import synthetic_rows, write_csv

from loratune.search.driver import tune

FIXED = {"batch_size": 8, "max_length": 32, "log_every": 5}
COLUMNS = ["trial", "status", "epochs_run"]
METRICS = ["val_loss", "val_accuracy", "val_accuracy_lo", "val_accuracy_hi", "val_f1", "val_f1_lo", "val_f1_hi"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
CLI = [sys.executable, "-m", "loratune"]


@pytest.fixture
def cli_main():
    import loratune.cli.main as cli

    return cli.main


def _listening(pid: int) -> list[str]:
    """Listening TCP addresses of ``pid``'s descendants (the Ray processes this test started)."""
    pids = {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_search_writes_the_table_tests_the_best_and_stays_on_loopback(tmp_path, tiny_model_dir, tiny_data) -> None:
    events, addresses = [], []

    def progress(ev: dict) -> None:
        events.append(ev)
        if ev.get("event") == "epoch" and not addresses:          # Ray is up: who listens where?
            addresses.extend(_listening(os.getpid()))

    space = {"lr": {"loguniform": [1e-3, 1e-2]}, "rank": {"choice": [2, 4]},
             "targets": {"choice": [["q"], ["v"], ["q", "v"]]}, "alpha": "=rank"}
    r = tune(space=space, samples=4, max_epochs=2, out=tmp_path / "s", progress=progress, model=tiny_model_dir,
             data=tiny_data, **FIXED)
    out = tmp_path / "s"

    assert addresses and all(a in ("127.0.0.1", "::ffff:127.0.0.1") for a in addresses), addresses
    cols = COLUMNS + ["lr", "rank", "targets", "alpha"] + METRICS
    header, rows = _read_csv(out / "trials.csv")
    table = json.loads((out / "trials.json").read_text())
    assert header == cols and r.columns == cols and [list(t) for t in table] == [cols] * 4
    assert [t["trial"] for t in table] == [row["trial"] for row in rows] == [t["trial"] for t in r.rows]
    first = table[0]                                                  # the untuned default config, first
    assert (first["lr"], first["rank"], first["targets"], first["alpha"]) == (5e-4, 8, "q,v", 16.0)
    for t in table[1:]:
        assert 1e-3 <= t["lr"] <= 1e-2 and t["rank"] in (2, 4) and t["alpha"] == t["rank"]
        assert t["targets"] in ("q", "v", "q,v")
    for t in table:
        assert t["status"] in ("completed", "stopped_early") and t["epochs_run"] in (0.25, 0.5, 0.75, 1, 1.25, 1.5,
                                                                                     1.75, 2)   # 4 rungs an epoch
        assert (t["status"] == "completed") == (t["epochs_run"] == 2)
        assert math.isfinite(t["val_loss"]) and 0 <= t["val_accuracy"] <= 1
        assert t["val_accuracy_lo"] <= t["val_accuracy"] <= t["val_accuracy_hi"]   # from the logged confusion
        assert t["val_f1_lo"] <= t["val_f1_hi"]
    best = min(table, key=lambda t: t["val_loss"])                    # chosen on validation loss alone
    assert r.best["trial"] == best["trial"] and r.best["validation"]["loss"] == best["val_loss"]

    # best/ is the best trial's run directory, tested once; its adapter is PEFT's format
    res = json.loads((out / "best" / "results.json").read_text())
    keys = {"loss", "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"}
    assert set(res["validation"]) == set(res["test"]) == keys and res["validation"]["loss"] == best["val_loss"]
    assert res["trial"] == best["trial"] and res["config"]["rank"] == best["rank"]
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(out / "best" / "adapter"))
    assert peft_model.peft_config["default"].r == best["rank"]
    summary = json.loads((out / "search.json").read_text())
    assert summary["best"]["test"]["accuracy"] == res["test"]["accuracy"] == r.best["test"]["accuracy"]
    assert summary["default"]["trial"] == first["trial"] and 0 <= summary["default"]["test"]["accuracy"] <= 1
    cmp = summary["comparison"]                                      # McNemar on test: best vs default
    if best["trial"] == first["trial"]:
        assert cmp["same_trial"] and "nothing to compare" in cmp["verdict"]
    else:
        assert cmp["best_accuracy"] == summary["best"]["test"]["accuracy"] and 0 <= cmp["p_value"] <= 1
        assert cmp["default_accuracy"] == summary["default"]["test"]["accuracy"] and "McNemar p =" in cmp["verdict"]

    # each trial: its own run directory, max_epochs long, threads = CPUs per trial; Ray's results in OUT/ray
    for t in table:
        cfg = (out / "trials" / t["trial"] / "config.yaml").read_text()
        assert "epochs: 2\n" in cfg and "threads: 1\n" in cfg
    assert (out / "ray" / "tuner.pkl").is_file() and (out / "search.yaml").is_file()
    kinds = {(e["kind"], e.get("event")) for e in events}
    assert {("search_start", None), ("trial", "start"), ("trial", "epoch"), ("trial", "end")} <= kinds


def test_diverged_trial_is_never_chosen_and_lr_point_one_is_not_diverged(tmp_path, tiny_model_dir, tiny_data) -> None:
    """lr 1e30 blows AdamW's weights up -> NaN loss -> "diverged", never chosen; lr 0.1 is large but finite: it
    trains to a finite loss, and either is judged on it like any trial or, where it collapsed to one class (as on
    the real data, DESIGN.md), ends "collapsed" and is never chosen either. The best is the lowest finite val_loss
    of the others."""
    r = tune(space={"lr": {"grid": [3e-3, 0.1, 1e30]}}, samples=2, max_epochs=2, out=tmp_path / "s",
             model=tiny_model_dir, data=tiny_data, rank=4, **FIXED)
    by_lr = {t["lr"]: t for t in r.rows}
    assert sorted(by_lr) == [5e-4, 3e-3, 0.1, 1e30]                  # the default + one sample x the grid
    assert by_lr[1e30]["status"] == "diverged" and by_lr[1e30]["epochs_run"] == 0
    assert by_lr[1e30]["val_loss"] is None
    assert by_lr[0.1]["status"] in ("completed", "stopped_early", "collapsed") and math.isfinite(by_lr[0.1]["val_loss"])
    finite = {lr: t["val_loss"] for lr, t in by_lr.items() if t["val_loss"] is not None and t["status"] != "collapsed"}
    assert r.best["config"]["lr"] == min(finite, key=finite.get) != 1e30
    assert r.best["validation"]["loss"] == pytest.approx(min(finite.values()))
    summary = json.loads((tmp_path / "s" / "search.json").read_text())
    assert summary["statuses"]["diverged"] == 1 and summary["trials"] == 4
    assert by_lr[5e-4]["status"] == "completed" and by_lr[5e-4]["epochs_run"] == 2   # the default runs its course


def test_optuna_search_starts_with_the_default(tmp_path, tiny_model_dir, tiny_data) -> None:
    space = {"lr": {"loguniform": [1e-3, 1e-2]}, "rank": {"choice": [2, 4]}, "alpha": "=rank"}
    r = tune(space=space, samples=3, max_epochs=1, search_alg="optuna", metric="val_accuracy", mode="max",
             out=tmp_path / "s", model=tiny_model_dir, data=tiny_data, **FIXED)
    assert len(r.rows) == 3
    assert (r.rows[0]["lr"], r.rows[0]["rank"], r.rows[0]["alpha"]) == (5e-4, 8, 16.0)   # rank 8: not in the choice
    assert all(t["alpha"] == t["rank"] in (2, 4) and 1e-3 <= t["lr"] <= 1e-2 for t in r.rows[1:])
    assert r.best["validation"]["accuracy"] == max(t["val_accuracy"] for t in r.rows)


def test_cli_rejects_bad_input_before_ray_starts(tmp_path, cli_main, capsys, tiny_model_dir, tiny_data) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("samples: 2\nsearch:\n  lr: {normal: [0, 1]}\n")
    (tmp_path / "rung.yaml").write_text("last_epoch_rung: yes please\n")
    common = ["tune", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(tmp_path / "o")]
    cases = [(["--config", str(bad)], "search.lr: unknown distribution 'normal'"),
             (["--metric", "val_acc"], "--metric: expected one of val_loss"),
             (["--samples", "0"], "--samples: expected an integer >= 1"),
             (["--reduction-factor", "1"], "--reduction-factor: expected an integer >= 2"),
             (["--config", str(tmp_path / "rung.yaml")], "--last-epoch-rung: expected true or false, got 'yes please'"),
             (["--rank", "64"], "--rank: rank 64 is larger than min(d, k) = 32")]
    for extra, fragment in cases:
        assert cli_main([*common, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists()                             # nothing written, Ray never started
    assert cli_main(["tune", "--resume", str(tmp_path / "o"), "--rank", "4"]) == 2
    assert "drop --rank" in capsys.readouterr().err
    assert cli_main(["tune", "--resume", str(tmp_path)]) == 2
    assert "holds no search" in capsys.readouterr().err


# --- resume after the driver is killed --------------------------------------------------------------

def _reports(experiment: Path) -> dict[str, list[int]]:
    """trial id -> the epochs it reported, in order, from Ray's result.json files."""
    out: dict[str, list[int]] = {}
    for path in experiment.glob("*/result.json"):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:                          # a line being written
                    continue
                out.setdefault(row["trial_id"], []).append(row.get("epoch"))
    return out


def _temp_dirs(procs: list[psutil.Process]) -> set[str]:
    """The Ray temp folders (/tmp/lt-ray-*) named on these processes' command lines."""
    found = set()
    for p in procs:
        for part in _cmdline(p):
            path = part.split("=", 1)[-1]
            if path.startswith("/tmp/lt-ray-"):
                found.add("/".join(path.split("/")[:3]))
    return found


def _end_ray_processes(procs: list[psutil.Process], temp: set[str]) -> None:
    """The killed driver's Ray processes die with it (fate sharing); end any left, by pid; drop its temp dir."""
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    for d in temp:
        shutil.rmtree(d, ignore_errors=True)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def test_resume_after_sigkill_finishes_without_rerunning_trials(tmp_path, cli_main, capsys, tiny_model_dir) -> None:
    data = write_csv(tmp_path / "reviews.csv", synthetic_rows(1600))   # epochs of seconds: time to kill mid-search
    config = tmp_path / "search.yaml"
    config.write_text("samples: 4\nmax_epochs: 2\nsearch:\n  lr: {loguniform: [1.0e-3, 1.0e-2]}\n"
                      "  rank: {choice: [2, 4]}\n")
    out, experiment = tmp_path / "s", tmp_path / "s" / "ray"
    argv = ["tune", "--config", str(config), "--model", tiny_model_dir, "--data", data, "--out", str(out),
            "--batch-size", "8", "--max-length", "32"]
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([*CLI, *argv], env=ENV, stdout=log, stderr=subprocess.STDOUT)
    seen: dict[tuple[str, int], float] = {}                           # (trial, epoch) -> when we first saw it
    try:
        deadline = time.time() + 240
        while not any(e == 2 for _, e in seen):                       # one trial has completed
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.time() < deadline, "no trial completed in time"
            for tid, epochs in _reports(experiment).items():
                for e in epochs:
                    seen.setdefault((tid, e), time.time())
            time.sleep(0.1)
        time.sleep(1.0)                                               # its state snapshot is written by now
        before = _reports(experiment)
        assert proc.poll() is None, "the search ended before the kill; give the trials more data"
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        temp = _temp_dirs(ray_procs)
        kill_time = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    _end_ray_processes(ray_procs, temp)
    assert not (out / "search.json").exists()
    completed = {t for t, e in before.items() if 2 in e and seen.get((t, 2), kill_time) < kill_time - 0.9}
    assert completed

    done = subprocess.run([*CLI, "tune", "--resume", str(out)], env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming the search" in done.stderr
    after = _reports(experiment)
    for t in completed:                                               # finished trials did not run again
        assert after[t] == before[t], (t, before[t], after[t])
    for (t, e), when in seen.items():                                 # checkpointed trials went on, not over
        if e == 1 and when < kill_time - 1.0:
            assert after[t].count(1) == 1, (t, after[t])
    table = json.loads((out / "trials.json").read_text())
    assert len(table) == 4 and all(t["status"] in ("completed", "stopped_early") for t in table)
    assert (out / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert "best trial" in done.stdout and "test accuracy" in done.stdout

    assert cli_main(["tune", "--resume", str(out)]) == 0                # a finished search: says so, exit 0
    assert "already finished" in capsys.readouterr().out


def test_a_trial_whose_worker_died_before_its_first_report_is_a_failed_row(tmp_path) -> None:
    """Ray's Result for such a trial has metrics {trial_id} only and ``config`` None (seen in CI when a
    SIGKILL hit a reused worker during its reset): the row keeps the config the callback saw, status failed."""
    from types import SimpleNamespace

    from ray.tune import Result

    from loratune.search.driver import LiveView, trial_records
    from loratune.search.space import parse_space
    from loratune.training.options import TrainConfig

    base = TrainConfig()
    space = parse_space({"rank": {"choice": [2, 4]}, "lr": {"loguniform": [1e-4, 1e-2]}}, base)
    default = space.default_point(base)
    configs = {"x_00000": default, "x_00001": {"rank": 4, "lr": 0.002}, "x_00002": {"rank": 2, "lr": 0.004}}
    view = LiveView()
    for i, (tid, config) in enumerate(configs.items()):
        view.on_trial_start(0, [], SimpleNamespace(trial_id=tid, experiment_tag=f"{i}_x", config=config,
                                                   checkpoint=None, last_result={}))
    view.on_trial_error(0, [], SimpleNamespace(trial_id="x_00002", config=configs["x_00002"], path=str(tmp_path)))
    restored = LiveView()
    restored.set_state(view.get_state())                  # the callback's state survives --resume
    results = [Result(metrics={"trial_id": "x_00002"}, checkpoint=None, error=RuntimeError("actor died"),
                      path=str(tmp_path)),
               Result(metrics={"trial_id": "x_00001", "config": configs["x_00001"]}, checkpoint=None, error=None,
                      path=str(tmp_path)),
               Result(metrics={"trial_id": "x_00000", "config": default}, checkpoint=None, error=None,
                      path=str(tmp_path))]
    assert results[0].config is None                      # what Ray gives: the reason this test exists
    restored.ended.update({"x_00000": "completed", "x_00001": "stopped_early"})
    rows = [t["row"] for t in trial_records(results, restored, space, base, tmp_path)]
    assert [(r["trial"], r["status"], r["rank"], r["lr"], r["epochs_run"]) for r in rows] == [
        ("x_00000", "completed", default["rank"], default["lr"], 0), ("x_00001", "stopped_early", 4, 0.002, 0),
        ("x_00002", "failed", 2, 0.004, 0)]


def _trial_dir(root: Path, name: str, losses: list[float | None]) -> Path:
    """A trial's run directory as the trainer leaves it; a NaN or infinite loss is written as null."""
    run = root / "trials" / name
    (run / "adapter").mkdir(parents=True)
    lines = [{"type": "train", "step": 1, "epoch": 1, "loss": 0.7}]
    lines += [{"type": "eval", "split": "validation", "epoch": i + 1, "step": 10 * (i + 1), "loss": v,
               "accuracy": 0.5, "f1": 0.4} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_a_trial_without_a_finite_validation_loss_ends_diverged_not_in_a_crash(tmp_path) -> None:
    """Its evaluations' losses are null (NaN on the way in): a diverged row with empty val_* columns, never
    chosen, and the search still writes its table, best/ and search.json (it raised TypeError here once)."""
    from loratune.search.space import parse_space
    from loratune.search.trials import Tested, finish, trial_record
    from loratune.training.options import TrainConfig

    space = parse_space({"rank": {"choice": [2, 4]}}, TrainConfig())
    specs = [("t0", "completed", [0.6, 0.5]), ("t1", "completed", [None, None]), ("t2", "stopped_early", [None]),
             ("t3", "failed", [None]), ("t4", "completed", [None, 0.55]), ("t5", None, [None])]
    trials = [trial_record(space, name, status, {"rank": 2}, _trial_dir(tmp_path, name, losses))
              for name, status, losses in specs]
    rows = {t["trial"]: t["row"] for t in trials}
    assert [rows[t]["status"] for t in rows] == ["completed", "diverged", "diverged", "failed", "completed", None]
    for t in ("t1", "t2", "t3", "t5"):
        assert rows[t]["val_loss"] is rows[t]["val_accuracy"] is rows[t]["val_f1"] is None, t
    assert rows["t1"]["epochs_run"] == 2 and trials[1]["best"] == {}
    assert (rows["t4"]["val_loss"], trials[4]["best"]["epoch"]) == (0.55, 2)   # the finite epoch is its best
    done = [t for t in trials if t["status"] is not None]
    result = finish(tmp_path, {"metric": "val_loss", "mode": "min", "experiment": ""}, space, done, 1.0,
                    lambda a: Tested({"accuracy": 0.5}, np.array([True, False])), lambda e: None)
    assert result.best["trial"] == "t0" and result.best["validation"] == {"loss": 0.5, "accuracy": 0.5, "f1": 0.4}
    header, csv_rows = _read_csv(tmp_path / "trials.csv")
    assert [(r["trial"], r["status"], r["val_loss"]) for r in csv_rows] == [
        ("t0", "completed", "0.5"), ("t1", "diverged", ""), ("t2", "diverged", ""), ("t3", "failed", ""),
        ("t4", "completed", "0.55")]
    assert json.loads((tmp_path / "search.json").read_text())["statuses"] == {"completed": 2, "diverged": 2,
                                                                           "failed": 1}
    assert json.loads((tmp_path / "best" / "results.json").read_text())["best_epoch"] == 2


def test_intervals_and_the_comparison_on_test(tmp_path) -> None:
    """Each row's accuracy and F1 carry their 95% intervals from the best epoch's confusion matrix (none for a
    record without one); search.json's comparison pairs the best and the default on the same test examples
    (McNemar, exact), and says so in words; a default that is the best has nothing to compare."""
    from loratune.search.space import parse_space
    from loratune.search.stats import bootstrap_f1, mcnemar, wilson
    from loratune.search.trials import Tested, finish, trial_record
    from loratune.training.options import TrainConfig

    space = parse_space({"rank": {"choice": [2, 4]}}, TrainConfig())
    conf = {"t0": [[150, 50], [40, 160]], "t1": [[170, 30], [20, 180]]}       # 310 and 350 of 400 right
    trials = []
    for name, losses in (("t0", [0.6, 0.5]), ("t1", [0.45, 0.4]), ("t2", [0.7])):
        run = _trial_dir(tmp_path, name, losses)
        if name in conf:                                              # the best (last) epoch logged its matrix
            lines = (run / "metrics.jsonl").read_text().splitlines()
            last = {**json.loads(lines[-1]), "epoch": 1.5, "confusion": conf[name]}  # a sub-epoch rung
            (run / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
        trials.append(trial_record(space, name, "completed", {"rank": 2}, run))
    row = trials[1]["row"]
    assert (row["val_accuracy_lo"], row["val_accuracy_hi"]) == wilson(350, 400)
    assert (row["val_f1_lo"], row["val_f1_hi"]) == bootstrap_f1(conf["t1"], seed=0)
    assert row["val_accuracy_lo"] < 350 / 400 < row["val_accuracy_hi"] and row["val_f1_lo"] < row["val_f1_hi"]
    assert [trials[2]["row"][k] for k in ("val_accuracy_lo", "val_accuracy_hi", "val_f1_lo", "val_f1_hi")] == [None] * 4

    default_right = np.arange(400) < 316                                 # 0.790
    best_right = default_right.copy()
    best_right[316:346] = True                                           # b = 30 only the best got right
    best_right[:20] = False                                              # c = 20 only the default did: 0.815
    outcomes = {"best": best_right, "t0": default_right}
    tested = []

    def test(adapter: Path) -> Tested:
        tested.append(adapter.parent.name)
        right = outcomes[adapter.parent.name]
        return Tested({"accuracy": float(right.mean())}, right)

    result = finish(tmp_path, {"metric": "val_loss", "mode": "min", "experiment": ""}, space, trials, 1.0, test,
                    lambda e: None)
    assert tested == ["best", "t0"] and result.best["trial"] == "t1"
    header, csv_rows = _read_csv(tmp_path / "trials.csv")
    assert header == ["trial", "status", "epochs_run", "rank", *METRICS] == list(result.rows[0])
    assert float(csv_rows[1]["val_accuracy_lo"]) == row["val_accuracy_lo"] and csv_rows[2]["val_f1_lo"] == ""
    summary = json.loads((tmp_path / "search.json").read_text())
    assert "confusion" not in summary["best"]["validation"] and summary["best"]["test"] == {"accuracy": 0.815}
    cmp = summary["comparison"]
    assert {k: cmp[k] for k in ("n", "best_only", "default_only", "beyond_chance", "same_trial")} == {
        "n": 400, "best_only": 30, "default_only": 20, "beyond_chance": False, "same_trial": False}
    assert cmp["p_value"] == mcnemar(30, 20) == pytest.approx(0.2026, abs=1e-4)
    assert (cmp["best_accuracy"], cmp["default_accuracy"]) == (0.815, 0.79)
    assert cmp["verdict"] == ("best trial t1: test accuracy 0.815 vs untuned default 0.790 (+2.5 points); "
                              "McNemar p = 0.203: not beyond chance on 400 test examples")
    best_right[346:386] = True                                           # now b = 70, c = 20
    finish(tmp_path, {"metric": "val_loss", "mode": "min", "experiment": ""}, space, trials, 1.0, test,
           lambda e: None)
    cmp = json.loads((tmp_path / "search.json").read_text())["comparison"]
    assert cmp["beyond_chance"] and cmp["p_value"] < 1e-6
    assert "McNemar p < 0.001: better than the default beyond chance" in cmp["verdict"]

    alone = finish(tmp_path, {"metric": "val_loss", "mode": "min", "experiment": ""}, space, trials[1:2], 1.0,
                   test, lambda e: None)
    assert alone.summary["comparison"] == {"same_trial": True,
                                           "verdict": "best trial t1 is the untuned default itself: nothing to compare"}


def test_collapsed_trials_stop_at_their_first_pass_after_warm_up_and_are_never_chosen(tmp_path,
                                                                                      tiny_model_dir) -> None:
    """Every text the same, labels half and half: no model can tell the rows apart, so each trial predicts one class
    with a validation loss >= ln 2 (the labels' entropy). Warm-up is 6% of 40 steps (3), so each sampled trial is
    stopped as ``collapsed`` at its first pass, step 10 (epoch 0.25 of 4 rungs an epoch). The untuned default is
    neither collapse-checked nor stopped by ASHA (the reference the search is judged against trains its whole
    schedule), so it completes and, the only trial left, is chosen."""
    from loratune.search.trials import choose_best

    data = write_csv(tmp_path / "same.csv", [("the same words", "pos" if i % 2 else "neg") for i in range(400)])
    r = tune(space={"lr": {"loguniform": [1e-3, 1e-2]}}, samples=3, max_epochs=1, out=tmp_path / "s",
             model=tiny_model_dir, data=data, rank=4, **FIXED)
    assert [(t["status"], t["epochs_run"]) for t in r.rows] == [("completed", 1), ("collapsed", 0.25),
                                                                 ("collapsed", 0.25)]
    assert r.best["trial"] == r.rows[0]["trial"]
    assert json.loads((tmp_path / "s" / "search.json").read_text())["statuses"] == {"completed": 1, "collapsed": 2}
    for t in r.rows[1:]:
        lines = [json.loads(x) for x in (tmp_path / "s" / "trials" / t["trial"] / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines if x["type"] == "eval"] == [10] and t["val_loss"] >= math.log(2)
    good = {"trial": "a", "status": "stopped_early", "best": {"loss": 0.60}}
    flat = {"trial": "b", "status": "collapsed", "best": {"loss": 0.50}}          # lower, and still never chosen
    assert choose_best([flat, good], "val_loss", "min") is good


def test_reduction_factor_is_checked_and_recorded(tmp_path, tiny_model_dir, tiny_data) -> None:
    """search.yaml records ASHA's reduction factor (default 4); a search.yaml from before the option resumes with the
    seed's 2 (driver.reduction_of: what the scheduler is built with)."""
    from loratune.errors import InputError
    from loratune.search import driver
    from loratune.search.space import REDUCTION_FACTOR
    from loratune.search.trials import new_search

    def doc(rf):
        return new_search(None, {"model": tiny_model_dir, "data": tiny_data}, None, 2, 1, 1, None, "random",
                          "val_loss", None, 2, None, None, reduction_factor=rf)

    assert REDUCTION_FACTOR == 4 and doc(None)["reduction_factor"] == 4 and doc(3)["reduction_factor"] == 3
    assert doc(None)["last_epoch_rung"] is True
    assert new_search(None, {"model": tiny_model_dir, "data": tiny_data}, None, 2, 1, 1, None, "random", "val_loss",
                      None, 2, None, None, last_epoch_rung=False)["last_epoch_rung"] is False
    old = doc(None)
    del old["reduction_factor"]
    assert driver.reduction_of(old) == 2 and driver.reduction_of(doc(3)) == 3
    for bad in (1, 0, 2.5, True):
        with pytest.raises(InputError, match="--reduction-factor: expected an integer >= 2"):
            doc(bad)


def test_asha_never_stops_the_untuned_default() -> None:
    """Reduction 2, grace 1: at the first rung a loss of 0.9 beside 0.5 is in the bottom half and stopped, unless it
    is the untuned default's (its result still counts in the rung)."""
    from types import SimpleNamespace

    from loratune.search.driver import DefaultRunsOut, is_default

    default = {"lr": 5e-4, "rank": 8}
    asha = DefaultRunsOut(default, ["lr", "rank"], time_attr="t", metric="val_loss", mode="min", max_t=8,
                          grace_period=1, reduction_factor=2, stop_last_trials=False)
    trials = {name: SimpleNamespace(trial_id=name, config=config) for name, config in (
        ("a", {"lr": 1e-3, "rank": 4}), ("d", dict(default)), ("e", {"lr": 2e-3, "rank": 16}))}
    for t in trials.values():
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, trials["a"], {"t": 1, "val_loss": 0.5}) == asha.CONTINUE
    assert asha.on_trial_result(None, trials["d"], {"t": 1, "val_loss": 0.9}) == asha.CONTINUE
    assert asha.on_trial_result(None, trials["e"], {"t": 1, "val_loss": 0.9}) == asha.STOP
    assert is_default({"lr": 5e-4, "rank": 8, "alpha": "=rank"}, default, ["lr", "rank"])


@pytest.mark.parametrize(("epochs", "rungs", "eta", "on", "expected"), [
    (3, 4, 4, True, [1, 4, 8]),            # the default: 0.25, 1 and 2 epochs
    (3, 4, 4, False, [1, 4]),              # Ray's grace x eta^k below max_t = 12
    (4, 4, 4, True, [1, 4, 12, 16]),       # Ray's own rung at max_t is no check: 3 epochs is added
    (5, 4, 4, True, [1, 4, 16]),           # 4 epochs is one of Ray's
    (3, 4, 2, True, [1, 2, 4, 8]),         # ditto
    (2, 4, 4, True, [1, 4]),               # one epoch before the end is the 1-epoch rung
    (3, 1, 4, True, [1, 2]),               # the seed's once an epoch, eta 4: epoch 2 added
    (1, 1, 2, True, [1]),
])
def test_last_epoch_rung_is_one_epoch_before_the_end(epochs, rungs, eta, on, expected) -> None:
    """driver.stop_rungs (what the search prints) equals the rungs DefaultRunsOut is built with, which are Ray's
    (its _Bracket's grace x eta^k, max_t included) plus driver.last_rung_of where that lies past those before max_t."""
    from loratune.search.driver import DefaultRunsOut, last_rung_of, stop_rungs

    doc = {"max_epochs": epochs, "rungs_per_epoch": rungs, "reduction_factor": eta, "last_epoch_rung": on}
    asha = DefaultRunsOut({}, [], time_attr="t", metric="val_loss", mode="min", max_t=epochs * rungs, grace_period=1,
                          reduction_factor=eta, stop_last_trials=False, extra_rung=last_rung_of(doc))
    assert stop_rungs(doc) == asha.milestones() == expected
    plain = DefaultRunsOut({}, [], time_attr="t", metric="val_loss", mode="min", max_t=epochs * rungs, grace_period=1,
                           reduction_factor=eta, stop_last_trials=False)
    assert set(plain.milestones()) <= set(expected)               # Ray's rungs are all kept
    del doc["last_epoch_rung"]                                    # a search.yaml from before the option: Ray's alone
    assert last_rung_of(doc) is None and stop_rungs(doc) == plain.milestones()


def test_last_epoch_rung_stops_a_trial_that_would_train_its_last_epoch_unchecked() -> None:
    """Max 3 epochs, 4 rungs an epoch, eta 4: two trials that passed the 1-epoch rung reach 2 epochs (rung 8); the
    second, with the worse loss, is stopped there (below the best quarter of what is recorded), the untuned default
    never is. Without the rung both would train the third epoch."""
    from types import SimpleNamespace

    from loratune.search.driver import DefaultRunsOut, last_rung_of

    doc = {"max_epochs": 3, "rungs_per_epoch": 4, "reduction_factor": 4, "last_epoch_rung": True}
    default = {"lr": 5e-4}
    for extra, verdict in ((last_rung_of(doc), "STOP"), (None, "CONTINUE")):
        asha = DefaultRunsOut(default, ["lr"], time_attr="t", metric="val_loss", mode="min", max_t=12, grace_period=1,
                              reduction_factor=4, stop_last_trials=False, extra_rung=extra)
        a, b, d = (SimpleNamespace(trial_id=n, config=c) for n, c in (("a", {"lr": 1e-3}), ("b", {"lr": 2e-3}),
                                                                       ("d", dict(default))))
        for t in (a, b, d):
            asha.on_trial_add(None, t)
        for t, losses in ((a, [0.60, 0.50, 0.45]), (b, [0.55, 0.48, 0.47]), (d, [0.70, 0.60, 0.55])):
            for rung, loss in zip((1, 4, 8), losses):
                action = asha.on_trial_result(None, t, {"t": rung, "val_loss": loss})
                if t is b and rung == 8:
                    assert action == getattr(asha, verdict)
                else:                    # the first at a rung goes on; b's 0.48 at 1 epoch beats a's 0.50
                    assert action == asha.CONTINUE, (t.trial_id, rung)


@pytest.mark.parametrize("remote", ["empty", "stale", "new_driver"])
def test_a_retried_trial_keeps_the_rows_its_driver_logged(tmp_path: Path, remote: str) -> None:
    """A trial retried in the same search (its node was lost) restarts from a checkpoint, and Ray's loggers then
    copied result.json / progress.csv back from the experiment folder: a snapshot that Ray's background sync
    rewrites, so it can be behind the driver's file or empty mid-rewrite (CI lost the epoch-1 row so). Ours keep
    the driver's file; Ray's own, in the same state, lose the row. Where the driver has no file (a search resumed
    by a new driver), the experiment folder's copy is restored, as Ray does."""
    from types import SimpleNamespace

    import pyarrow.fs
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from loratune.search.driver import KeptCsv, KeptJson

    class Trial:                                    # what the loggers read of Ray's Trial (hashed by identity)
        def __init__(self, name: str) -> None:
            local, storage = tmp_path / name / "driver", tmp_path / name / "storage"
            local.mkdir(parents=True), storage.mkdir(parents=True)
            self.local_path, self.checkpoint, self.config = str(local), object(), {"rank": 4}
            self.storage = SimpleNamespace(trial_fs_path=str(storage), storage_filesystem=pyarrow.fs.LocalFileSystem())

        def init_local_path(self) -> None:
            pass

    def run(cls: type, name: str) -> list[int]:
        """Epoch 1 logged, then a retry (log_trial_start again, as Ray does when the trial restarts; by a new logger
        with no file of its own for ``new_driver``) and epoch 2; the epochs result.json / progress.csv hold after."""
        t, file = Trial(name), ("result.json" if issubclass(cls, JsonLoggerCallback) else "progress.csv")
        first = cls()
        first.log_trial_result(1, t, {"epoch": 1, "val_loss": 0.3, "trial_id": "x"})
        first.on_trial_error(1, [], t)              # the node is lost: Ray closes the trial's files
        local, snapshot = Path(t.local_path, file), Path(t.storage.trial_fs_path, file)
        if remote == "stale":                       # synced before epoch 1 was logged: the header alone, or nothing
            snapshot.write_text(local.read_text().splitlines(keepends=True)[0] if file == "progress.csv" else "")
        elif remote == "empty":                     # being rewritten by the sync
            snapshot.write_text("")
        else:                                       # new_driver: a full snapshot, and no driver file
            snapshot.write_text(local.read_text())
            local.unlink()
        again = cls() if remote == "new_driver" else first
        again.log_trial_start(t)
        again.log_trial_result(2, t, {"epoch": 2, "val_loss": 0.2, "trial_id": "x"})
        again.on_trial_complete(2, [], t)
        if file == "result.json":
            return [json.loads(line)["epoch"] for line in local.read_text().splitlines()]
        with open(local, newline="") as f:
            return [int(r["epoch"]) for r in csv.DictReader(f)]

    if remote == "new_driver":                      # the experiment folder's copy is brought back
        for ours in (KeptJson, KeptCsv):
            assert run(ours, f"new-{ours.__name__}") == [1, 2]
        return
    for ours, ray_own in ((KeptJson, JsonLoggerCallback), (KeptCsv, CSVLoggerCallback)):
        assert run(ours, f"ours-{ours.__name__}") == [1, 2]
        assert 1 not in run(ray_own, f"ray-{ray_own.__name__}")   # the race this guards against, in Ray's own


def test_lent_threads_shares_the_cpus_only_once_no_trial_is_to_come_or_waiting() -> None:
    from loratune.search.driver import lent_threads

    # running, waiting, created, total, cpus, per -> threads each running trial may use
    assert lent_threads(1, 0, 8, 8, 2, 1) == 2           # the last trial, alone: both CPUs
    assert lent_threads(2, 0, 8, 8, 2, 1) == 1           # two running: their own
    assert lent_threads(1, 0, 7, 8, 2, 1) == 1           # a trial still to come: it will need the CPU
    assert lent_threads(1, 1, 8, 8, 2, 1) == 1           # one waits (a retry)
    assert lent_threads(3, 0, 8, 8, 16, 2) == 5          # 16 CPUs, 3 trials of 2: 5 threads each
    assert lent_threads(1, 0, 8, 8, 3, 2) == 3           # alone on 3 CPUs
    assert lent_threads(2, 0, 8, 8, 3, 1) == 1           # whole CPUs only: 3 of 2 trials is 1 each
    assert lent_threads(2, 0, 8, 8, 2, 2) == 2           # never fewer than its own
    assert lent_threads(0, 0, 8, 8, 2, 1) == 1


def test_idle_cpus_are_lent_to_the_running_trials_and_taken_back(tmp_path: Path) -> None:
    """The driver's side (LendIdleCpus, fed Ray's callbacks with stand-in trials) and the trial's (take_lent_threads,
    every LEND_EVERY optimizer steps): the last trial gets the CPU the others freed, a retry takes it back, the file
    goes with the search."""
    import json
    from types import SimpleNamespace

    import torch

    from loratune.search.driver import LendIdleCpus, take_lent_threads

    path = tmp_path / ".threads.json"
    path.write_text('{"a": 2, "b": 2}')                              # left by a driver that died
    lend = LendIdleCpus(str(path), total=3, cpus=2, per=1)
    lend.setup()                                                     # the search starts (or resumes): gone
    assert not path.exists()
    a, b, c = (SimpleNamespace(trial_id=i, status="PENDING") for i in "abc")
    trials = [a, b]
    lend.on_trial_start(0, trials, a)
    a.status = "RUNNING"
    lend.on_trial_start(0, trials, b)
    b.status = "RUNNING"
    assert not path.exists()                                         # two running, one still to come
    lend.on_trial_complete(0, trials, a)                             # a ends: c is still to come
    a.status = "TERMINATED"
    assert not path.exists()
    trials.append(c)
    lend.on_trial_start(0, trials, c)
    c.status = "RUNNING"
    assert not path.exists()                                         # all created, two running
    lend.on_trial_complete(0, trials, b)                             # b ends: c alone gets both CPUs
    b.status = "TERMINATED"
    assert json.loads(path.read_text()) == {"c": 2}
    threads = torch.get_num_threads()
    try:
        assert take_lent_threads(str(path), "c", 1, 1) == 2 and torch.get_num_threads() == 2
        assert take_lent_threads(str(path), "x", 2, 1) == 1 and torch.get_num_threads() == 1   # none lent to x
        lend.on_trial_recover(0, trials, c)                          # c fails and waits for a retry
        c.status = "PENDING"
        assert json.loads(path.read_text()) == {}
        b.status = "RUNNING"                                         # (as if b still ran:) b does not get c's CPU
        lend.on_trial_recover(0, trials, c)
        assert json.loads(path.read_text()) == {}
        b.status = "TERMINATED"
        assert take_lent_threads(str(path), "c", 2, 1) == 1 and torch.get_num_threads() == 1
        lend.on_trial_start(0, trials, c)                            # retried, alone again
        assert json.loads(path.read_text()) == {"c": 2}
        path.write_text("{not json")
        assert take_lent_threads(str(path), "c", 1, 1) == 1          # unreadable: its own CPUs
        assert take_lent_threads(None, "c", 1, 1) == 1               # lending off (--address, a GPU, --max-concurrent)
    finally:
        torch.set_num_threads(threads)
    lend.on_experiment_end(trials)
    assert not path.exists()


@pytest.mark.parametrize("fail", [False, True])
def test_ray_session_shuts_down_behind_the_caller_unless_it_failed(tmp_path, monkeypatch, fail: bool) -> None:
    """With ``defer``, a session that ended well is shut down by a background thread, joined when ``defer`` closes;
    one that raised is shut down before the error leaves it. Either way Ray, its temp folder, its log handler and
    the environment are as before."""
    import contextlib
    import logging
    import threading

    import ray

    from loratune.search import driver

    threads: list[str] = []
    shutdown = ray.shutdown

    def spy() -> None:
        threads.append(threading.current_thread().name)
        shutdown()

    monkeypatch.setattr(ray, "shutdown", spy)
    env_before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_DEDUP_LOGS")}
    handlers_before = list(logging.getLogger("ray").handlers)
    with contextlib.ExitStack() as defer:
        try:
            with driver._ray_session(None, tmp_path / "ray.log", defer=defer) as cluster:
                temp = ray._private.worker._global_node.get_temp_dir_path()
                assert cluster["CPU"] >= 1 and ray.is_initialized()
                if fail:
                    raise RuntimeError("a trial went wrong")
        except RuntimeError:
            assert fail and threads == ["MainThread"] and not ray.is_initialized()
    assert threads == (["MainThread"] if fail else ["loratune-ray-shutdown"])
    assert not ray.is_initialized() and os.path.isdir(temp) == fail      # an internal error keeps Ray's logs
    assert {k: os.environ.get(k) for k in env_before} == env_before
    assert logging.getLogger("ray").handlers == handlers_before
    if fail:
        shutil.rmtree(temp.split("/session_")[0], ignore_errors=True)
