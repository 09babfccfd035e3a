"""``--baseline``: a LoRA run (or a search's best trial) beside a full fine-tuning run, and the page of a full
fine-tuning run itself. Every run directory here is written by hand in the trainer's formats (config.yaml,
results.json, metrics.jsonl): no training, no model."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest

from loratune.cli import tune as tune_cli
from loratune.cli.main import main
from loratune.cli.progress import Renderer
from loratune.errors import InputError
from loratune.report import baseline as bl
from loratune.report.write import write_report
from loratune.search.trials import SearchResult
from loratune.training import rundir
from loratune.training.options import TrainConfig

LORA_TRAIN = {"trainable_params": 147_456, "all_params": 22_860_674, "adapter_bytes": 592_000,
              "model_bytes": 90_900_000, "seconds": 120.5, "tokens_per_s": 1160.0}
FULL_TRAIN = {"trainable_params": 22_713_216, "all_params": 22_713_216, "adapter_bytes": 90_930_000,
              "model_bytes": 90_900_000, "seconds": 300.0, "tokens_per_s": 410.0}
SENTENCE = "LoRA reaches 99% of full fine-tuning's accuracy with 0.65% of the parameters"


def make_run(path: Path, *, method: str = "lora", test: float | None = 0.81, val: float = 0.80,
             train: dict | None = None, finished: bool = True, **options: object) -> Path:
    """A run directory as loratune.train leaves it (no adapter/ or model/: nothing here loads a model)."""
    cfg = TrainConfig(method=method, epochs=2, **options)
    rundir.write_config(path, cfg, label_names=["neg", "pos"])
    lines = [{"type": "train", "step": 10, "epoch": 1, "loss": 0.69, "lr": 1e-4},
             {"type": "eval", "split": "validation", "epoch": 1, "step": 20, "loss": 0.5, "accuracy": val - 0.05},
             {"type": "train", "step": 30, "epoch": 2, "loss": 0.4, "lr": 5e-5},
             {"type": "eval", "split": "validation", "epoch": 2, "step": 40, "loss": 0.42, "accuracy": val, "f1": val}]
    (path / "metrics.jsonl").write_text("".join(rundir.json_line(x) for x in lines), encoding="utf-8")
    if finished:
        rundir.write_json(path / "results.json", {
            "validation": {"loss": 0.42, "accuracy": val, "f1": val}, "best_epoch": 2,
            "test": None if test is None else {"loss": 0.41, "accuracy": test, "f1": test - 0.01},
            "train": train if train is not None else (FULL_TRAIN if method == "full" else LORA_TRAIN)})
    return path


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    return make_run(tmp_path / "lora", test=0.81)


@pytest.fixture
def full(tmp_path: Path) -> Path:
    return make_run(tmp_path / "full", method="full", test=0.82, val=0.83)


def read(path: Path) -> str:
    """A page's text as a browser shows it (entities decoded: "fine-tuning's")."""
    return html.unescape(path.read_text(encoding="utf-8"))


def glance(text: str) -> str:
    """The top of a page, above its first section."""
    return text[:text.index("<h2>")]


# --- the numbers ---------------------------------------------------------------------------------------------

def test_sentence_from_the_files(lora: Path, full: Path) -> None:
    """0.81 / 0.82 test accuracy -> 99%; 147,456 / 22,713,216 trainable parameters -> 0.65%."""
    text = read(write_report(lora, baseline=full))
    assert SENTENCE in glance(text)
    assert "vs full fine-tuning" in glance(text) and "99% of its accuracy" in glance(text)
    assert "<h2>LoRA vs full fine-tuning</h2>" in text
    size = 592_000 / 90_930_000
    assert f"0.65% of the fully fine-tuned model's 90.9 MB ({1 / size:,.0f}× smaller)" in text
    assert "validation accuracy:" not in text and "compares across models" not in text
    assert str(full) in text
    c = bl.compare(rundir.read_results(lora), bl.load_baseline(full, rundir.read_config_doc(lora), "RUN_DIR"))
    assert c.split == "test" and c.accuracy == pytest.approx(0.81 / 0.82)
    assert c.params == pytest.approx(147_456 / 22_713_216) and c.size == pytest.approx(size)


def test_validation_stands_in_for_a_missing_test(tmp_path: Path, full: Path) -> None:
    lora = make_run(tmp_path / "notest", test=None, val=0.83 * 0.5)
    text = read(write_report(lora, baseline=full))
    assert ("LoRA reaches 50% of full fine-tuning's accuracy with 0.65% of the parameters "
            "(validation accuracy: the LoRA run has no test metrics)") in text


@pytest.mark.parametrize("x,text", [(0.006492, "0.65%"), (0.003, "0.3%"), (0.25, "25%"), (1.0, "100%"),
                                    (1.234e-5, "0.0012%"), (0.0996, "10%")])
def test_share(x: float, text: str) -> None:
    assert bl.share(x) == text


def test_percent() -> None:
    assert bl.percent(0.81 / 0.82) == "99%" and bl.percent(1.012) == "101%"
    assert bl.percent(0.9961) == "99.6%" and bl.percent(0.99999) == "99.9%" and bl.percent(1.0) == "100%"


def test_the_baseline_is_remembered(lora: Path, full: Path) -> None:
    """A later report of the directory compares again; a baseline gone since is one line, not an error."""
    write_report(lora, baseline=full)
    assert json.loads((lora / "baseline.json").read_text())["baseline"] == str(full.resolve())
    assert SENTENCE in read(write_report(lora))
    (full / "results.json").unlink()
    text = read(write_report(lora))
    assert SENTENCE not in text and "comparison with full fine-tuning not shown" in text and "has not finished" in text


def test_another_model_is_allowed_and_said(tmp_path: Path, lora: Path) -> None:
    other = make_run(tmp_path / "other", method="full", test=0.82, model="distilbert")
    text = read(write_report(lora, baseline=other))
    assert SENTENCE in text
    assert "the baseline fine-tuned distilbert, LoRA adapted minilm-l6: this compares across models" in text


def test_paths_name_the_same_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "r.csv").write_text("text,label\n")
    assert bl._same("data", "data/r.csv", str(tmp_path / "data" / "r.csv"))      # a search writes it absolute
    assert bl._same("data", "./data/r.csv", "data/../data/r.csv")
    assert bl._same("data", "elsewhere/r.csv", "/old/home/elsewhere/r.csv")       # moved since: the tail matches
    assert not bl._same("data", "r.csv", "/x/other.csv")
    assert not bl._same("data", "rotten-tomatoes-4k", "imdb")
    assert bl._same("sample_pct", 1, 1.0) and not bl._same("split_seed", 0, 1)


# --- refusals, through the CLI ---------------------------------------------------------------------------------

def _refused(capsys: pytest.CaptureFixture, argv: list[str], fragment: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--baseline" in lines[0] and fragment in lines[0], lines[0]


def test_report_refuses_what_is_not_a_baseline(tmp_path: Path, lora: Path, full: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    cases = {"missing folder": (tmp_path / "nowhere", "does not exist"),
             "a file": (lora / "results.json", "is a file, not a run directory"),
             "a LoRA run": (make_run(tmp_path / "l2"), "is a LoRA run; the baseline is a --method full run"),
             "unfinished": (make_run(tmp_path / "u", method="full", finished=False), "has not finished"),
             "other data": (make_run(tmp_path / "d", method="full", data="imdb.csv"), "data 'imdb.csv' there"),
             "other split seed": (make_run(tmp_path / "s", method="full", split_seed=3), "split_seed 3 there, 0 here"),
             "other sample": (make_run(tmp_path / "p", method="full", sample_pct=0.5), "sample_pct 0.5 there"),
             "other validation file": (make_run(tmp_path / "v", method="full", validation_file="v.csv"),
                                       "validation_file 'v.csv' there, None here"),
             "other test file": (make_run(tmp_path / "t", method="full", test_file="t.csv"), "test_file 't.csv'"),
             "no config": (tmp_path / "empty", "not a run directory (no config.yaml)")}
    (tmp_path / "empty").mkdir()
    for case, (path, fragment) in cases.items():
        _refused(capsys, ["report", str(lora), "--baseline", str(path)], fragment)
    assert not (lora / "baseline.json").exists() and not (lora / "report.html").exists()
    # a run from before --method (no `method:` key) is a LoRA run
    old = make_run(tmp_path / "old")
    doc = rundir.read_config_doc(old)
    del doc["method"]
    import yaml

    (old / "config.yaml").write_text(yaml.safe_dump(doc))
    _refused(capsys, ["report", str(lora), "--baseline", str(old)], f"{old} is a LoRA run")
    # the LoRA side must be LoRA: a full run against a full run is refused
    _refused(capsys, ["report", str(full), "--baseline", str(full)], "is itself a full fine-tuning run")
    assert main(["report", str(lora), "--baseline", str(full)]) == 0
    assert "report written to" in capsys.readouterr().out


# --- a full fine-tuning run's own page -------------------------------------------------------------------------

def test_page_of_a_full_fine_tuning_run(full: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No adapter cards, no ΔW; the parameters trained; the test section runs model/ (stubbed: no model here)."""
    import loratune.infer.inference as inference

    seen = []

    def fake_run_split(path: Path, **kw: object) -> None:
        seen.append(Path(path))
        raise RuntimeError("no model in this test")

    monkeypatch.setattr(inference, "run_split", fake_run_split)
    (full / "model").mkdir()
    text = read(write_report(full))
    top = glance(text)
    assert "22,713,216 parameters trained" in top and "full fine-tuning" in top and "model file" in top
    assert '<div class="k">adapter</div>' not in top and "adapter size" not in top and "rank" not in top
    assert "targets" not in top and "× smaller" not in top
    assert "ΔW" not in text and "What the adapter learned" not in text
    assert "There is no adapter: every weight is saved" in text and "90.9 MB" in text
    assert seen == [full / "model"]
    assert "test-split predictions: not available (RuntimeError: no model in this test)" in text


def test_page_of_a_lora_run_keeps_its_adapter_cards(lora: Path) -> None:
    top = glance(read(write_report(lora)))
    assert '<div class="k">adapter</div>' in top and "rank 8" in top and "× smaller" in top
    assert "full fine-tuning" not in top


# --- a search --------------------------------------------------------------------------------------------------

def make_search(path: Path) -> Path:
    """A search directory in loratune.search's formats: two trials, best/ (trial t0001), search.json."""
    rows = []
    for tid, rank, acc in (("t0000", 8, 0.78), ("t0001", 4, 0.80)):
        make_run(path / "trials" / tid, rank=rank, alpha=rank, test=None, val=acc)
        rows.append({"trial": tid, "status": "completed", "epochs_run": 2, "rank": rank, "val_loss": 0.42,
                     "val_accuracy": acc, "val_f1": acc})
    rows[1]["val_loss"] = 0.40
    rundir.write_json(path / "trials.json", rows)
    make_run(path / "best", rank=4, alpha=4, test=0.81, val=0.80)
    best = {"trial": "t0001", "config": {"rank": 4}, "validation": {"loss": 0.40, "accuracy": 0.80},
            "test": {"loss": 0.41, "accuracy": 0.81, "f1": 0.8}}
    rundir.write_json(path / "search.json", {"metric": "val_loss", "mode": "min", "trials": 2, "seconds": 60.0,
                                              "best": best, "default": {**best, "trial": "t0000"}})
    import yaml

    (path / "search.yaml").write_text(yaml.safe_dump({"options": TrainConfig().to_dict(), "samples": 2,
                                                      "max_epochs": 2, "metric": "val_loss", "mode": "min",
                                                      "experiment": str(path / "ray")}))
    return path


def test_search_page_compares_its_best_trial(tmp_path: Path, full: Path, capsys: pytest.CaptureFixture) -> None:
    search = make_search(tmp_path / "search")
    assert main(["report", str(search), "--baseline", str(full)]) == 0
    text = read(search / "report.html")
    assert SENTENCE in glance(text) and "99% of its accuracy" in glance(text)
    assert "The best trial (t0001) vs full fine-tuning" in text
    _refused(capsys, ["report", str(search), "--baseline", str(search / "trials" / "t0000")], "is a LoRA run")
    _refused(capsys, ["report", str(search), "--baseline", str(search)], "is a search directory")
    other = make_run(tmp_path / "seed", method="full", split_seed=7)
    _refused(capsys, ["report", str(search), "--baseline", str(other)], "other data than SEARCH_DIR")


def test_tune_checks_the_baseline_before_the_search(tmp_path: Path, lora: Path, full: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "never"
    _refused(capsys, ["tune", "--out", str(out), "--samples", "1", "--baseline", str(lora)], "is a LoRA run")
    _refused(capsys, ["tune", "--out", str(out), "--split-seed", "2", "--baseline", str(full)],
             "other data than this search: split_seed 0 there, 2 here")
    _refused(capsys, ["tune", "--out", str(out), "--baseline", str(tmp_path / "gone")], "does not exist")
    assert not out.exists()
    search = make_search(tmp_path / "search")
    _refused(capsys, ["tune", "--resume", str(search), "--baseline", str(lora)], "is a LoRA run")


def test_tune_hands_the_baseline_to_its_report(tmp_path: Path, full: Path) -> None:
    """What `tune --baseline` does around the search (without one): the search directory remembers the baseline
    when it starts, and the report at the end shows the comparison."""
    search = make_search(tmp_path / "search")
    seen = []
    tune_cli._progress(type("V", (), {"event": staticmethod(seen.append)})(), full)(
        {"kind": "search_start", "out": str(search), "trials": 2, "resumed": False, "max_epochs": 2})
    assert seen and json.loads((search / "baseline.json").read_text())["baseline"] == str(full.resolve())
    (search / "baseline.json").unlink()
    result = SearchResult(out=search, columns=["trial"], rows=[], best=None, default=None, metric="val_loss",
                          mode="min")
    ui = Renderer()
    try:
        tune_cli.show_search(ui, result, full)
    finally:
        ui.close()
    assert SENTENCE in read(search / "report.html")


def test_library_error_names_the_flag(lora: Path) -> None:
    with pytest.raises(InputError, match="^--baseline: .* is a LoRA run"):
        write_report(lora, baseline=lora)
