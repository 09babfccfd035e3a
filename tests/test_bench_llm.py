"""bench/llm.py (``make bench-llm``): the rows' commands and time estimate, the table's figures on synthetic
results.json documents (the zero-shot row from the instruct runs' ``baseline``, mean ± sd, the two targets in
words), a whole run with a stand-in for ``loratune train`` (sharing bench-quality's ``default`` runs), and the
fact the benchmark rests on: the instruct data holds the classification data's sentences in each split."""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
from pathlib import Path

import pytest

from bench import llm
from bench import quality as q

ROOT = Path(__file__).resolve().parent.parent

FAKE = textwrap.dedent("""
    # A stand-in for `loratune train`: config.yaml as loratune writes it, then results.json with accuracies that
    # depend on the seed and the row (a causal LM's with exact match and the base model's `baseline`).
    import json, os, sys
    from pathlib import Path
    import yaml
    from bench.quality import resolve
    argv = sys.argv[2:]
    out = Path(argv[argv.index("--out") + 1])
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(json.dumps({"out": str(out), "argv": argv}) + "\\n")
    cfg = resolve([a for i, a in enumerate(argv) if a not in ("--out", "--overwrite") and argv[i - 1] != "--out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    s = cfg["seed"]
    if cfg["task"] == "causal-lm":
        doc = {"validation": {"accuracy": 0.86 + 0.01 * s, "exact_match": 0.85}, "test": {"accuracy": 0.85,
               "exact_match": 0.84 + 0.01 * s}, "baseline": {"validation": {"accuracy": 0.68, "exact_match": 0.1},
               "test": {"accuracy": 0.72 + 0.01 * s, "exact_match": 0.2}}, "train": {"trainable_params": 460800}}
    elif cfg["model"] == "minilm-l6":
        doc = {"validation": {"accuracy": 0.79 + 0.01 * s}, "test": {"accuracy": 0.80},
               "train": {"trainable_params": 74498}}
    else:
        doc = {"validation": {"accuracy": 0.81}, "test": {"accuracy": 0.80 + 0.005 * s},
               "train": {"trainable_params": 461952}}
    (out / "results.json").write_text(json.dumps({**doc, "best_epoch": 1}))
""")


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- the commands -------------------------------------------------------------------------------

def test_dry_run_commands_budget_and_estimate(tmp_path, capsys) -> None:
    assert llm.main(["--dry-run", "--seeds", "4", "--out", str(tmp_path), "--instruct-sample-pct", "0.5",
                     "--extra", "--lr 1e-3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not list(tmp_path.iterdir())
    runs = [line for line in lines if not line.startswith("#")]
    tail = "--split-seed 4 --seed 4 --threads 1"
    assert runs[0].endswith(f"train {tail} --data rotten-tomatoes-4k-instruct --epochs 1 --sample-pct 0.5 --lr 1e-3 "
                            f"--out {tmp_path}/smollm2-instruct/seed-4 --overwrite")          # the longest first
    assert runs[1].endswith(f"train {tail} --model smollm2-135m --epochs 1 --lr 1e-3 --out {tmp_path}/smollm2-cls/"
                            f"seed-4 --overwrite")
    assert runs[2].endswith(f"train {tail} --lr 1e-3 --out {tmp_path}/minilm-lora/seed-4 --overwrite")
    assert any("smollm2-zero-shot: read from the smollm2-instruct runs' results.json (`baseline`)" in x for x in lines)
    assert lines[-1].startswith("# expected wall time ≈ ")


def test_time_estimate_of_the_defaults_fits_an_hour(monkeypatch) -> None:
    """The default budget's estimate (what the docstring states), and the list scheduling it assumes."""
    a = llm.parse_args([])
    _, distinct = q.make_jobs(a, llm.row_flags(a))
    s = {j.config: llm.estimate(j) for j in distinct}
    assert 22 * 60 < s["smollm2-instruct"] < 28 * 60 and 7 * 60 < s["smollm2-cls"] < 11 * 60
    assert 2 * 60 < s["minilm-lora"] < 3.5 * 60
    order = sorted(distinct, key=llm.estimate, reverse=True)
    assert 50 * 60 < llm.makespan(order, 2) < 60 * 60        # all 9 runs; 53 min with MiniLM's reused
    cut = llm.parse_args(["--instruct-sample-pct", "0.5"])
    half = [j for j in q.make_jobs(cut, llm.row_flags(cut))[1] if j.config == "smollm2-instruct"][0]
    assert llm.estimate(half) < s["smollm2-instruct"] - 9 * 60
    monkeypatch.setattr(llm, "estimate", lambda seconds: seconds)     # each job starts when a worker is free
    assert llm.makespan([5, 4, 3, 3, 1], 2) == 8 and llm.makespan([5, 4, 3, 3, 1], 1) == 16


def test_bad_flags_are_refused(tmp_path, capsys) -> None:
    assert llm.main(["--out", str(tmp_path), "--cls-sample-pct", "2"]) == 2
    assert "sample-pct" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        llm.main(["--rows", "smollm2-zero-shot", "--dry-run"])     # no run of its own: comes with the instruct row


# --- the numbers --------------------------------------------------------------------------------

VAL = {"minilm-lora": [0.79, 0.80, 0.78], "smollm2-cls": [0.81, 0.82, 0.80], "smollm2-instruct": [0.845, 0.85, 0.83]}
TEST = {"minilm-lora": [0.80, 0.81, 0.79], "smollm2-cls": [0.80, 0.80, 0.82], "smollm2-instruct": [0.86, 0.845, 0.85]}
BASE_VAL, BASE_TEST = [0.67, 0.70, 0.69], [0.73, 0.71, 0.72]
PARAMS = {"minilm-lora": 74_498, "smollm2-cls": 461_952, "smollm2-instruct": 460_800}


def synthetic_jobs(tmp_path: Path) -> tuple[dict, dict]:
    a = llm.parse_args(["--seeds", "0,1,2", "--out", str(tmp_path)])
    flags = llm.row_flags(a)
    jobs = {}
    for name in llm.ROWS:
        for i in range(3):
            f = ["--split-seed", str(i), "--seed", str(i), "--threads", "1", *flags[name][0]]
            raw, resolved = q.resolve_both(f)
            doc = {"validation": {"accuracy": VAL[name][i]}, "test": {"accuracy": TEST[name][i]}, "best_epoch": 1,
                   "train": {"trainable_params": PARAMS[name]}}
            if name == "smollm2-instruct":
                doc["validation"]["exact_match"], doc["test"]["exact_match"] = 0.80 + 0.01 * i, 0.82
                doc["baseline"] = {"validation": {"accuracy": BASE_VAL[i], "exact_match": 0.10},
                                   "test": {"accuracy": BASE_TEST[i], "exact_match": 0.20 + 0.01 * i}}
            jobs[name, i] = q.Job(name, i, f, raw, resolved, tmp_path / name / f"seed-{i}", status="done",
                                  wall_s=100.0 * (i + 1), results=doc)
    return jobs, flags


def test_rows_from_synthetic_results(tmp_path) -> None:
    jobs, flags = synthetic_jobs(tmp_path)
    rows = llm.summarize(list(llm.ROWS), [0, 1, 2], jobs, flags)
    assert list(rows) == [*llm.ROWS, "smollm2-zero-shot"]
    for name in llm.ROWS:
        both = [(v + t) / 2 for v, t in zip(VAL[name], TEST[name])]
        for key, xs in (("validation_accuracy", VAL[name]), ("test_accuracy", TEST[name]), ("mean_accuracy", both)):
            assert rows[name][key]["n"] == 3
            assert rows[name][key]["mean"] == pytest.approx(statistics.mean(xs), abs=1e-12)
            assert rows[name][key]["sd"] == pytest.approx(statistics.stdev(xs), abs=1e-12)
        assert rows[name]["trainable_params"] == PARAMS[name]
        assert rows[name]["wall_s_mean"] == 200.0
    inst = rows["smollm2-instruct"]
    assert inst["mean_accuracy"]["mean"] == pytest.approx((0.8525 + 0.8475 + 0.84) / 3)
    assert inst["mean_accuracy"]["sd"] == pytest.approx(0.0062915, abs=1e-6)            # by hand: sqrt(7.9167e-5 / 2)
    em = [(0.80 + 0.82) / 2, (0.81 + 0.82) / 2, (0.82 + 0.82) / 2]
    assert inst["exact_match"]["mean"] == pytest.approx(statistics.mean(em))
    assert inst["exact_match"]["sd"] == pytest.approx(statistics.stdev(em))
    assert rows["minilm-lora"]["exact_match"]["n"] == 0
    assert rows["smollm2-cls"]["training"] == "1 epoch (default 3)" and inst["training"] == "1 epoch"

    zs = rows["smollm2-zero-shot"]                          # the base model, from the instruct runs' `baseline`
    assert [r["validation_accuracy"] for r in zs["runs"]] == BASE_VAL
    assert [r["test_accuracy"] for r in zs["runs"]] == BASE_TEST
    assert zs["mean_accuracy"]["mean"] == pytest.approx(statistics.mean([0.70, 0.705, 0.705]))
    assert zs["exact_match"]["mean"] == pytest.approx(statistics.mean([0.15, 0.155, 0.16]))
    assert zs["trainable_params"] == 0 and zs["wall_s_mean"] is None and zs["training"] == "none (the base model)"


def test_targets_in_words(tmp_path) -> None:
    jobs, flags = synthetic_jobs(tmp_path)
    rows = llm.summarize(list(llm.ROWS), [0, 1, 2], jobs, flags)
    results = tmp_path / "results"
    results.mkdir()
    runs = [{"seed": s, "mean_accuracy": m} for s, m in ((0, 0.81), (1, 0.80), (2, 0.82))]
    older = {"when": "2026-11-30 15:14 UTC", "machine": {"cpu": "Zen"}, "seeds": [0, 1, 2],
             "configs": {"default": {"mean_accuracy": {"mean": 0.79}},
                         "full": {"mean_accuracy": {"mean": 0.81, "sd": 0.01, "n": 3}, "runs": runs}}}
    (results / "quality-2026-11-30-1514.json").write_text(json.dumps(older))
    (results / "quality-2026-12-01-1135.json").write_text(json.dumps({"configs": {"default": {
        "mean_accuracy": {"mean": 0.79}}}}))                  # newer, but without `full`
    other = llm.newest_quality(results)
    assert other["file"].endswith("quality-2026-11-30-1514.json") and list(other["rows"]) == ["full"]

    t = llm.targets(rows, other)
    gain = t["instruct_vs_zero_shot"]
    per = [15.25, 14.25, 13.5]                               # 100 × (instruct − zero-shot) of the 800, per split
    assert list(gain["per_seed"].values()) == pytest.approx(per)
    assert gain["points"]["mean"] == pytest.approx(statistics.mean(per))
    assert gain["points"]["sd"] == pytest.approx(statistics.stdev(per))
    assert not gain["met"]
    assert gain["sentence"] == ("instruct − zero-shot on validation + test (800 sentences): +14.33 ± 0.88 points "
                                "over 3 splits (seed 0 +15.25, seed 1 +14.25, seed 2 +13.50): target ≥ 15 missed (1 "
                                "of 3 splits reach it)")
    vs = t["instruct_vs_minilm"]["rows"]
    assert list(vs) == ["minilm-lora", "full"]
    inst = statistics.mean([0.8525, 0.8475, 0.84])
    assert vs["minilm-lora"]["points_of_means"] == pytest.approx(100 * (inst - statistics.mean([0.795, 0.805, 0.785])))
    assert vs["minilm-lora"]["paired_points"]["n"] == 3 and vs["minilm-lora"]["beats"]
    assert vs["full"]["points_of_means"] == pytest.approx(100 * (inst - 0.81))
    assert vs["full"]["paired_points"]["mean"] == pytest.approx(100 * (inst - statistics.mean([0.81, 0.80, 0.82])))
    assert f"from {results / 'quality-2026-11-30-1514.json'} (2026-11-30 15:14 UTC, Zen)" in vs["full"]["label"]
    assert t["instruct_vs_minilm"]["beats_all"]
    assert vs["full"]["sentence"].endswith("beats it")

    jobs["smollm2-instruct", 1].results["validation"]["accuracy"] = 0.60     # now below `full` on average
    t = llm.targets(llm.summarize(list(llm.ROWS), [0, 1, 2], jobs, flags), other)
    assert not t["instruct_vs_minilm"]["beats_all"] and t["instruct_vs_minilm"]["rows"]["full"]["sentence"].endswith(
        "does not beat it")


# --- a whole run, with a stand-in for loratune ----------------------------------------------------

def test_run_shares_bench_quality_default_and_resumes(tmp_path, monkeypatch, capsys) -> None:
    fake = tmp_path / "fake_loratune.py"
    fake.write_text(FAKE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("FAKE_LOG", str(log))
    out, prog = tmp_path / "runs", f"{sys.executable} {fake}"
    assert q.main(["--configs", "default", "--seeds", "0,1", "--out", str(out), "--json", str(tmp_path / "q.json"),
                   "--loratune", prog]) == 0
    assert len(calls(log)) == 2
    argv = ["--seeds", "0,1", "--out", str(out), "--json", str(tmp_path / "l.json"), "--loratune", prog,
            "--quality-json", str(tmp_path / "q.json")]
    assert llm.main(argv) == 0
    ran = calls(log)[2:]
    assert sorted(c["out"] for c in ran) == sorted(str(out / r / f"seed-{s}") for r in ("smollm2-cls",
                                                                                        "smollm2-instruct")
                                                    for s in (0, 1))    # minilm-lora: bench-quality's default runs
    res = json.loads((tmp_path / "l.json").read_text())
    rows = res["rows"]
    assert [r["dir"] for r in rows["minilm-lora"]["runs"]] == [str(out / "default" / f"seed-{s}") for s in (0, 1)]
    assert rows["minilm-lora"]["mean_accuracy"]["mean"] == pytest.approx(statistics.mean([0.795, 0.80]))
    assert rows["smollm2-zero-shot"]["test_accuracy"]["mean"] == pytest.approx(0.725)
    assert rows["smollm2-instruct"]["trainable_params"] == 460_800
    assert res["targets"]["instruct_vs_zero_shot"]["per_seed"] == pytest.approx({"0": 15.5, "1": 15.5})
    assert res["targets"]["instruct_vs_zero_shot"]["met"]
    assert res["machine"]["cpus"] >= 1 and res["minilm_file"] is None      # q.json has no `full` row
    table = capsys.readouterr().out
    assert "| smollm2-zero-shot" in table and "val+test (800)" in table and "target ≥ 15 met" in table

    assert llm.main(argv) == 0                              # everything done: nothing runs
    assert len(calls(log)) == 6


# --- the data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instruct_data_holds_the_classification_sentences(seed) -> None:
    """With the same --split-seed, rotten-tomatoes-4k-instruct's validation and test sets are
    rotten-tomatoes-4k's, sentence for sentence, in the same order and with the same labels (so every row of the
    table is scored on the same 400 + 400 sentences); another split seed cuts other ones."""
    from loratune.training.causal_data import (
        INSTRUCT_PROMPT,
        load_causal_splits,
        reference,
    )
    from loratune.training.data import load_splits
    from loratune.training.options import TrainConfig

    cls = load_splits(TrainConfig(split_seed=seed))
    inst = load_causal_splits(TrainConfig(data=llm.INSTRUCT_DATA, split_seed=seed))
    head, tail = INSTRUCT_PROMPT.split("{text}")
    for name in ("train", "validation", "test"):
        convs, split = getattr(inst, name), getattr(cls, name)
        questions = [next(m["content"] for m in c if m["role"] == "user") for c in convs]
        assert all(x.startswith(head) and x.endswith(tail) for x in questions)
        assert [x[len(head):len(x) - len(tail)] for x in questions] == list(split.texts), name
        assert [reference(c) for c in convs] == [cls.label_names[int(k)] for k in split.labels], name
    assert (len(cls.validation), len(cls.test)) == (400, 400)
    other = load_splits(TrainConfig(split_seed=seed + 1))
    assert set(other.validation.texts) != set(cls.validation.texts)
