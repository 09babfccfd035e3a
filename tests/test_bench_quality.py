"""bench/quality.py (``make bench-quality``): its statistics, resuming and shared runs, with a stand-in for
``loratune train`` and ``loratune tune`` (fast), then two real tiny runs of MiniLM (slow)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench import quality

ROOT = Path(__file__).resolve().parent.parent

FAKE = textwrap.dedent("""
    # A stand-in for `loratune train`: config.yaml as loratune would write it, a checkpoint, then results.json
    # with accuracies that depend on the seed and the options; FAKE_STOP=<config>/seed-<S> stops that run after
    # its checkpoint (exit 130, as an interrupted run), FAKE_LOG gets one line per call.
    # And for `loratune tune`: search.yaml (FAKE_SEARCHES: the JSON of flags -> what tune writes there), then, unless
    # FAKE_STOP names it (exit 130), search.json and best/results.json as a finished search leaves them.
    # FAKE_TIMES gets each call's argv, start and end (time.time()).
    import atexit, json, os, shutil, sys, time
    from pathlib import Path
    import yaml
    T0 = time.time()
    if os.environ.get("FAKE_TIMES"):
        def times():
            with open(os.environ["FAKE_TIMES"], "a") as f:
                f.write(json.dumps({"argv": sys.argv[1:], "start": T0, "end": time.time()}) + "\\n")
        atexit.register(times)
    argv = sys.argv[2:]                                   # after "train" / "tune"
    if sys.argv[1] == "tune":
        assert not any(a.startswith("--threads") for a in argv)
        resume = "--resume" in argv
        out = Path(argv[argv.index("--resume" if resume else "--out") + 1])
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({"out": str(out), "resume": resume, "tune": True}) + "\\n")
        if resume:
            assert argv == ["--resume", str(out)]
            doc = yaml.safe_load((out / "search.yaml").read_text())
            assert "experiment" in doc and not (out / "search.json").exists()
        else:
            assert argv[-3:] == ["--out", str(out), "--overwrite"]
            doc = json.loads(Path(os.environ["FAKE_SEARCHES"]).read_text())[" ".join(argv[:-3])]
            doc["experiment"] = str(out / "ray")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            (out / "search.yaml").write_text(yaml.safe_dump(doc))
            if os.environ.get("FAKE_STOP") == f"{out.parent.name}/{out.name}":
                sys.exit(130)
        time.sleep(0.3)                                   # long enough for another run beside it to show
        s = doc["options"]["seed"]
        val, test, untuned = round(0.80 + 0.01 * s, 4), round(0.79 + 0.02 * s, 4), round(0.78 + 0.01 * s, 4)
        config = {"lr": 0.001 * (s + 1), "rank": 8, "targets": "qv"}
        best = {"trial": f"t{s}b", "status": "completed", "config": config,
                "validation": {"loss": 0.4, "accuracy": val, "f1": val}, "best_epoch": 2.5,
                "test": {"accuracy": test, "f1": test}, "run_dir": str(out / "best")}
        default = {"trial": f"t{s}d", "status": "stopped_early", "config": {"lr": 0.0005, "rank": 8, "targets": "qv"},
                   "validation": {"loss": 0.5, "accuracy": 0.77}, "best_epoch": 1.0, "test": {"accuracy": untuned},
                   "run_dir": str(out / "trials" / f"t{s}d")}
        (out / "best").mkdir()
        (out / "best" / "results.json").write_text(json.dumps({
            "validation": best["validation"], "test": best["test"], "best_epoch": 2.5, "train": {"seconds": 5.0},
            "history": [{"epoch": e / 4, "loss": 0.4} for e in range(1, 13)], "trial": best["trial"],
            "config": config}))
        (out / "search.json").write_text(json.dumps({
            "metric": "val_loss", "mode": "min", "trials": 8, "statuses": {"completed": 3, "stopped_early": 5},
            "seconds": 100.0 + s, "experiment": doc["experiment"], "best": best, "default": default,
            "comparison": {"same_trial": False, "split": "test", "p_value": 0.25 + 0.1 * s, "beyond_chance": False,
                           "verdict": "not beyond chance"}}))
        sys.exit(0)
    from bench.quality import resolve
    out = Path(argv[argv.index("--out") + 1])
    resume = "--resume" in argv
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"out": str(out), "resume": resume}) + "\\n")
    if resume:
        cfg = yaml.safe_load((out / "config.yaml").read_text())
        assert any((out / "checkpoints").glob("*.pt"))
    else:
        flags = [a for i, a in enumerate(argv) if a not in ("--out", "--overwrite") and argv[i - 1] != "--out"]
        cfg = resolve(flags)
        out.mkdir(parents=True, exist_ok=True)
        for p in out.iterdir():
            if p.is_file():
                p.unlink()
        (out / "config.yaml").write_text(yaml.safe_dump(cfg))
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / "step-00000001.pt").write_bytes(b"x")
        if os.environ.get("FAKE_STOP") == f"{out.parent.name}/{out.name}":
            sys.exit(130)
    s, lr = cfg["seed"], cfg["lr"]
    full = cfg["method"] == "full"
    val = round(0.70 + 0.0125 * ((s * 7) % 5) + 20 * lr + (0.05 if full else 0), 4)
    test = round(0.71 + 0.01 * ((s * 3) % 4) + 10 * lr + (0.04 if full else 0), 4)
    (out / "results.json").write_text(json.dumps({"validation": {"accuracy": val}, "test": {"accuracy": test},
                                                  "best_epoch": 1 + s % 3, "train": {"seconds": 1.0}}))
""")


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def check_numbers(res: dict, seeds: list[int]) -> None:
    """Every configuration's means and sds are numpy's on the accuracies in its runs' results.json (a search's:
    its chosen trial's, in search.json and best/results.json)."""
    cfgs = res["configs"]
    per: dict[str, np.ndarray] = {}
    tests: dict[str, np.ndarray] = {}
    for name, c in cfgs.items():
        assert [r["seed"] for r in c["runs"]] == seeds
        val, test = [], []
        for r in c["runs"]:
            if name in quality.SEARCHES:
                best = json.loads((Path(r["dir"]) / "search.json").read_text())["best"]
                doc = json.loads((Path(r["dir"]) / "best" / "results.json").read_text())
                assert (best["validation"]["accuracy"], best["test"]["accuracy"]) == (
                    doc["validation"]["accuracy"], doc["test"]["accuracy"])
            else:
                doc = json.loads((Path(r["dir"]) / "results.json").read_text())
            val.append(doc["validation"]["accuracy"])
            test.append(doc["test"]["accuracy"])
            assert r["validation_accuracy"] == doc["validation"]["accuracy"]
        val_a, test_a = np.array(val), np.array(test)
        both = (val_a + test_a) / 2
        per[name], tests[name] = both, test_a
        for key, xs in (("validation_accuracy", val_a), ("test_accuracy", test_a), ("mean_accuracy", both)):
            assert c[key]["n"] == len(seeds)
            assert c[key]["mean"] == pytest.approx(xs.mean(), abs=1e-12)
            assert c[key]["sd"] == pytest.approx(xs.std(ddof=1), abs=1e-12)
    for name, c in cfgs.items():
        for ref in ("full", "default"):
            if ref in cfgs:
                d = 100 * (per[name] - per[ref])
                assert c[f"vs_{ref}_points"]["mean"] == pytest.approx(d.mean(), abs=1e-9)
                assert c[f"vs_{ref}_points"]["sd"] == pytest.approx(d.std(ddof=1), abs=1e-9)
        if "default" in cfgs:
            d = 100 * (tests[name] - tests["default"])
            assert c["vs_default_test_points"]["mean"] == pytest.approx(d.mean(), abs=1e-9)


def test_stats_resume_and_shared_runs(tmp_path, monkeypatch, capsys) -> None:
    fake = tmp_path / "fake_loratune.py"
    fake.write_text(FAKE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_STOP", "lr2e-3/seed-1")
    out, js = tmp_path / "runs", tmp_path / "q.json"
    argv = ["--configs", "default,full,old-default,lr2e-3", "--seeds", "0,1,2", "--out", str(out), "--json", str(js),
            "--loratune", f"{sys.executable} {fake}"]

    assert quality.main(argv) == 1                         # lr2e-3 seed 1 stopped after its checkpoint
    first = calls(log)
    # default and old-default resolve to the same options today: trained once, under default/
    same = quality.resolve([]) == quality.resolve(quality.CONFIGS["old-default"][0])
    assert len(first) == (9 if same else 12)
    assert not any(c["resume"] for c in first)
    res = json.loads(js.read_text())
    assert res["configs"]["lr2e-3"]["mean_accuracy"]["n"] == 2
    if same:
        assert res["configs"]["old-default"]["runs_of"] == "default"
        assert res["configs"]["old-default"]["mean_accuracy"] == res["configs"]["default"]["mean_accuracy"]

    monkeypatch.delenv("FAKE_STOP")
    assert quality.main(argv) == 0                         # only the stopped run, resumed from its checkpoint
    second = calls(log)[len(first):]
    assert second == [{"out": str(out / "lr2e-3" / "seed-1"), "resume": True}]
    check_numbers(json.loads(js.read_text()), [0, 1, 2])
    table = capsys.readouterr().out
    assert "| config" in table and "mean of val & test" in table and "lr2e-3" in table

    assert quality.main(argv) == 0                         # everything done: nothing runs
    assert len(calls(log)) == len(first) + 1
    check_numbers(json.loads(js.read_text()), [0, 1, 2])

    # another configuration with the options of finished runs reuses them, even from another invocation
    assert quality.main([*argv[:1], "old-default", *argv[2:]]) == 0
    assert len(calls(log)) == len(first) + 1 or not same

    monkeypatch.setitem(quality.CONFIGS, "lr2e-3", (["--lr", "3e-3"], "changed"))   # other options: run again
    assert quality.main(argv) == 0
    assert {c["out"] for c in calls(log)[-3:]} == {str(out / "lr2e-3" / f"seed-{s}") for s in (0, 1, 2)}


def test_dry_run_prints_the_commands(tmp_path, capsys) -> None:
    assert quality.main(["--dry-run", "--configs", "default,lr2e-3+pooler", "--seeds", "3", "--out", str(tmp_path),
                         "--extra", "--epochs 1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not list(tmp_path.iterdir())
    assert lines[1].endswith(f"train --split-seed 3 --seed 3 --threads 1 --lr 2e-3 --modules-to-save pooler "
                             f"--epochs 1 --out {tmp_path}/lr2e-3+pooler/seed-3 --overwrite")


def test_bad_flags_are_refused_before_any_run(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(quality.CONFIGS, "bad", (["--rank", "0"], "invalid"))
    assert quality.main(["--configs", "bad", "--out", str(tmp_path)]) == 2
    assert "--rank" in capsys.readouterr().err and not list(tmp_path.iterdir())


def search_docs(path: Path, seeds: list[int]) -> None:
    """FAKE_SEARCHES: for each seed's search command (its flags), what `loratune tune` writes to search.yaml."""
    docs = {}
    for s in seeds:
        flags = ["--split-seed", str(s), "--seed", str(s), *quality.CONFIGS["search"][0], *quality.SEARCHES["search"]]
        docs[" ".join(flags)] = quality.resolve_search(flags)
    path.write_text(json.dumps(docs))


def test_search_command(tmp_path, capsys) -> None:
    """A search runs `loratune tune` with the split seed and seed, no --threads, into OUT/search/seed-S, after the
    training runs; --search-extra goes to tune alone, --extra to both."""
    assert "search" in quality.DEFAULT_CONFIGS.split(",")
    assert quality.main(["--dry-run", "--configs", "search,default", "--seeds", "3", "--out", str(tmp_path),
                         "--extra", "--sample-pct 0.5", "--search-extra", "--samples 2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not list(tmp_path.iterdir())
    assert " train " in lines[0]                           # the training run first, though search is named first
    assert lines[1].endswith(f"tune --split-seed 3 --seed 3 --sample-pct 0.5 --samples 2 "
                             f"--out {tmp_path}/search/seed-3 --overwrite")
    assert "--threads" not in lines[1]
    job = quality.Job("search", 3, [], {}, {}, tmp_path / "search" / "seed-3", search={})
    assert quality.command(["lt"], job, "resume") == ["lt", "tune", "--resume", str(tmp_path / "search" / "seed-3")]


def test_search_identity_is_tunes() -> None:
    """What the bench compares a search directory with: the search.yaml `loratune tune` writes, the default space
    resolved in it; flags tune refuses are refused."""
    from loratune.search.space import default_space
    from loratune.training.options import TrainConfig

    doc = quality.resolve_search(["--split-seed", "1", "--seed", "1"])
    assert doc["search"] == json.loads(json.dumps(default_space(TrainConfig.from_dict({"seed": 1}))))
    assert (doc["samples"], doc["max_epochs"], doc["options"]["split_seed"], doc["options"]["threads"]) == (8, 3, 1, None)
    with pytest.raises(ValueError, match="--threads"):
        quality.resolve_search(["--threads", "2"])
    with pytest.raises(ValueError, match="--epochs"):
        quality.resolve_search(["--epochs", "1"])


def test_search_numbers_from_its_directory(tmp_path) -> None:
    """A search's row is its chosen trial's (search.json's best), with the untuned trial, the McNemar comparison,
    the chosen config and the search's own time beside it; best/results.json fills what search.json lacks."""
    d = tmp_path / "search" / "seed-2"
    (d / "best").mkdir(parents=True)
    best = {"trial": "b1", "status": "completed", "config": {"lr": 0.002, "rank": 16}, "best_epoch": 1.75,
            "validation": {"loss": 0.41, "accuracy": 0.81}, "test": {"accuracy": 0.8}}
    (d / "search.json").write_text(json.dumps({
        "best": best, "default": {"trial": "d0", "validation": {"accuracy": 0.77}, "test": {"accuracy": 0.78}},
        "seconds": 250.5, "trials": 8, "statuses": {"completed": 2, "stopped_early": 5, "collapsed": 1},
        "comparison": {"p_value": 0.03, "beyond_chance": True, "verdict": "better"}}))
    (d / "best" / "results.json").write_text(json.dumps({
        "validation": {"accuracy": 0.81}, "test": {"accuracy": 0.8}, "best_epoch": 1.75, "train": {"seconds": 12.0},
        "history": [{"epoch": 0.25}, {"epoch": 2.0}]}))
    job = quality.Job("search", 2, [], {}, {}, d, search={"samples": 8})
    r = quality.per_seed(job)
    assert (r["validation_accuracy"], r["test_accuracy"]) == (0.81, 0.8)
    assert r["mean_accuracy"] == pytest.approx(0.805)
    assert (r["best_epoch"], r["epochs_run"], r["train_s"]) == (1.75, 2.0, 12.0)
    s = r["search"]
    assert (s["trial"], s["config"], s["default_trial"], s["default_test_accuracy"]) == (
        "b1", {"lr": 0.002, "rank": 16}, "d0", 0.78)
    assert s["test_vs_own_default_points"] == pytest.approx(2.0)
    assert (s["seconds"], s["comparison"]["p_value"], s["statuses"]["collapsed"]) == (250.5, 0.03, 1)

    doc = json.loads((d / "search.json").read_text())      # no comparison (an older search): none recorded
    del doc["comparison"], doc["best"]["test"]
    (d / "search.json").write_text(json.dumps(doc))
    r = quality.per_seed(job)
    assert "comparison" not in r["search"] and r["test_accuracy"] == 0.8   # from best/results.json

    (d / "search.json").write_text(json.dumps({"best": None, "default": None, "seconds": 9.0}))   # nothing chosen
    r = quality.per_seed(job)
    assert r["validation_accuracy"] is None and r["mean_accuracy"] is None and r["search"]["trial"] is None


def test_schedule_runs_each_search_alone() -> None:
    def job(name: str, seed: int, search: bool) -> quality.Job:
        return quality.Job(name, seed, [], {}, {}, Path(name) / str(seed), search={} if search else None)

    todo = [job("search", 0, True), job("default", 0, False), job("full", 0, False), job("search", 1, True),
            job("default", 1, False)]
    phases = quality.schedule(todo, 2)
    assert sorted(id(j) for batch, _ in phases for j in batch) == sorted(map(id, todo))   # each once
    assert [(len(b), w) for b, w in phases] == [(3, 2), (1, 1), (1, 1)]
    assert not any(j.is_search for j in phases[0][0])
    for batch, width in phases:
        if any(j.is_search for j in batch):
            assert batch == [batch[0]] and width == 1
    assert quality.schedule(todo[:1], 4) == [([todo[0]], 1)]
    assert quality.schedule(todo[1:3], 8) == [(todo[1:3], 2)]


def overlaps(times: list[dict], cmd: str) -> list[tuple[list, list]]:
    """Pairs of calls that ran at the same time, one of them a ``cmd``."""
    return [(a["argv"], b["argv"]) for i, a in enumerate(times) for b in times[i + 1:]
            if cmd in (a["argv"][0], b["argv"][0]) and a["start"] < b["end"] and b["start"] < a["end"]]


def test_search_runs_alone_resumes_and_is_reused(tmp_path, monkeypatch, capsys) -> None:
    fake = tmp_path / "fake_loratune.py"
    fake.write_text(FAKE)
    log, times, docs = tmp_path / "calls.jsonl", tmp_path / "times.jsonl", tmp_path / "searches.json"
    search_docs(docs, [0, 1])
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_TIMES", str(times))
    monkeypatch.setenv("FAKE_SEARCHES", str(docs))
    monkeypatch.setenv("FAKE_STOP", "search/seed-1")
    out, js = tmp_path / "runs", tmp_path / "q.json"
    argv = ["--configs", "search,default,lr2e-3", "--seeds", "0,1", "--out", str(out), "--json", str(js),
            "--jobs", "2", "--loratune", f"{sys.executable} {fake}"]

    assert quality.main(argv) == 1                         # search seed 1 stopped after its search.yaml
    first = calls(log)
    assert [c.get("tune", False) for c in first] == [False] * 4 + [True] * 2   # the searches after the training
    assert not any(c["resume"] for c in first)
    timed = [json.loads(line) for line in times.read_text().splitlines()]
    assert len(timed) == 6 and overlaps(timed, "tune") == []
    assert overlaps(timed, "train")                         # the training runs did go two at a time
    res = json.loads(js.read_text())
    assert res["configs"]["search"]["mean_accuracy"]["n"] == 1

    monkeypatch.delenv("FAKE_STOP")
    assert quality.main(argv) == 0                         # only the stopped search, with tune --resume
    second = calls(log)[len(first):]
    assert second == [{"out": str(out / "search" / "seed-1"), "resume": True, "tune": True}]
    res = json.loads(js.read_text())
    check_numbers(res, [0, 1])
    c = res["configs"]["search"]
    assert [r["validation_accuracy"] for r in c["runs"]] == [0.80, 0.81]
    assert [r["test_accuracy"] for r in c["runs"]] == [0.79, 0.81]
    assert [r["search"]["default_test_accuracy"] for r in c["runs"]] == [0.78, 0.79]
    assert [r["search"]["seconds"] for r in c["runs"]] == [100.0, 101.0]
    assert [r["search"]["config"]["lr"] for r in c["runs"]] == [0.001, 0.002]
    assert [r["search"]["comparison"]["p_value"] for r in c["runs"]] == pytest.approx([0.25, 0.35])
    assert c["search"]["test_vs_own_default_points"]["mean"] == pytest.approx(1.5)
    assert c["search"]["samples"] == 8 and c["search"]["search"] == json.loads(docs.read_text())[
        "--split-seed 0 --seed 0"]["search"]
    assert "at least as good as the search's own untuned trial" in c["search"]["verdict"]
    bench = json.loads((out / "search" / "seed-1" / "bench.json").read_text())
    assert bench["tune_command"] == "loratune tune --split-seed 1 --seed 1 --out " \
        f"{out / 'search' / 'seed-1'} --overwrite" and bench["action"] == "resume"
    assert bench["search"] == json.loads(docs.read_text())["--split-seed 1 --seed 1"]
    table = capsys.readouterr().out
    assert "the chosen trial of an 8-trial search" in table and "Searches per seed" in table
    assert "lr=0.002 rank=8 targets=qv" in table and "test vs default" in table

    assert quality.main(argv) == 0                         # everything done: nothing runs
    assert len(calls(log)) == len(first) + 1
    check_numbers(json.loads(js.read_text()), [0, 1])

    # another space (a changed default): a different search, run again from the start, not reused nor resumed
    resolve = quality.resolve_search
    monkeypatch.setattr(quality, "resolve_search",
                        lambda flags: {**resolve(flags), "search": {"lr": {"loguniform": [1e-4, 1e-3]}}})
    search_docs(docs, [0, 1])
    (out / "search" / "seed-0" / "search.json").unlink()   # interrupted, but with the old space: not resumed
    assert quality.main(argv) == 0
    again = calls(log)[len(first) + 1:]
    assert again == [{"out": str(out / "search" / f"seed-{s}"), "resume": False, "tune": True} for s in (0, 1)]
    assert json.loads((out / "search" / "seed-0" / "bench.json").read_text())["search"]["search"] == {
        "lr": {"loguniform": [1e-4, 1e-3]}}


@pytest.mark.slow
def test_real_tiny_runs(tmp_path, monkeypatch) -> None:
    """Two tiny real trainings of MiniLM (two seeds); a configuration spelling the defaults out as ``auto``
    shares them (checks the options resolved here against the config.yaml loratune writes); a second
    invocation runs nothing."""
    monkeypatch.setitem(quality.CONFIGS, "auto", (["--lr", "auto", "--modules-to-save", "auto"], "the defaults"))
    out, js = tmp_path / "runs", tmp_path / "q.json"
    argv = ["--configs", "default,auto", "--seeds", "0,1", "--out", str(out), "--json", str(js),
            "--extra", "--max-steps 2 --sample-pct 0.05"]
    assert quality.main(argv) == 0
    res = json.loads(js.read_text())
    check_numbers(res, [0, 1])
    assert res["configs"]["auto"]["runs_of"] == "default"
    assert all(r["wall_s"] > 0 for r in res["configs"]["default"]["runs"])
    bench = json.loads((out / "default" / "seed-1" / "bench.json").read_text())
    assert bench["train_command"].startswith("loratune train --split-seed 1 --seed 1 --threads 1 --max-steps 2")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/*/results.json")}
    assert len(stamps) == 2

    assert quality.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/results.json")} == stamps
    again = json.loads(js.read_text())
    assert again["configs"]["default"]["mean_accuracy"] == res["configs"]["default"]["mean_accuracy"]
