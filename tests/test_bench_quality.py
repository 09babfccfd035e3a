"""bench/quality.py (``make bench-quality``): its statistics, resuming and shared runs, with a stand-in for
``loratune train`` (fast), then two real tiny runs of MiniLM (slow)."""

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
    import json, os, sys
    from pathlib import Path
    import yaml
    from bench.quality import resolve
    argv = sys.argv[2:]                                   # after "train"
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
    """Every configuration's means and sds are numpy's on the accuracies in its runs' results.json."""
    cfgs = res["configs"]
    per: dict[str, np.ndarray] = {}
    for name, c in cfgs.items():
        assert [r["seed"] for r in c["runs"]] == seeds
        val, test = [], []
        for r in c["runs"]:
            doc = json.loads((Path(r["dir"]) / "results.json").read_text())
            val.append(doc["validation"]["accuracy"])
            test.append(doc["test"]["accuracy"])
            assert r["validation_accuracy"] == doc["validation"]["accuracy"]
        val_a, test_a = np.array(val), np.array(test)
        both = (val_a + test_a) / 2
        per[name] = both
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
