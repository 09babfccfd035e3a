"""The page of a ``--method full`` search: every weight trained, each trial keeps ``model/`` (no adapter), only
the learning rate searched. The search directory is written by hand in loratune.search's formats (search.yaml,
search.json, trials.json, trials.csv, trials/<id>/, best/): no training, no model."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml
from test_baseline import glance, make_run, make_search, read

from loratune.cli import tune as tune_cli
from loratune.cli.progress import Renderer
from loratune.report.write import write_report
from loratune.search.trials import SearchResult
from loratune.training import rundir
from loratune.training.options import TrainConfig

TRIALS = (("t0000", 2e-5, 0.45, 0.78), ("t0001", 5e-5, 0.40, 0.80))


def make_full_search(path: Path, *, method_key: bool = True) -> Path:
    """Two full fine-tuning trials of other learning rates, best/ (trial t0001, with model/), search.json."""
    rows = []
    for tid, lr, loss, acc in TRIALS:
        tdir = make_run(path / "trials" / tid, method="full", lr=lr, test=None, val=acc)
        (tdir / "model").mkdir()
        (tdir / "model" / "model.safetensors").write_bytes(b"\0" * 1234)
        rows.append({"trial": tid, "status": "completed", "epochs_run": 2, "lr": lr, "val_loss": loss,
                     "val_accuracy": acc, "val_f1": acc})
    rundir.write_json(path / "trials.json", rows)
    with open(path / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best_dir = make_run(path / "best", method="full", lr=5e-5, test=0.82, val=0.80)
    (best_dir / "model").mkdir()
    best = {"trial": "t0001", "status": "completed", "config": {"lr": 5e-5},
            "validation": {"loss": 0.40, "accuracy": 0.80}, "best_epoch": 2,
            "test": {"loss": 0.41, "accuracy": 0.82, "f1": 0.81}, "run_dir": str(best_dir)}
    results = rundir.read_results(best_dir)
    rundir.write_json(best_dir / "results.json", {**results, "trial": "t0001", "config": {"lr": 5e-5},
                                                  "test": best["test"]})
    default = {**best, "trial": "t0000", "config": {"lr": 2e-5}, "validation": {"loss": 0.45, "accuracy": 0.78}}
    rundir.write_json(path / "search.json", {"metric": "val_loss", "mode": "min", "trials": 2, "seconds": 90.0,
                                              "best": best, "default": default})
    options = TrainConfig(method="full").to_dict()
    (path / "search.yaml").write_text(yaml.safe_dump({
        "options": options, "search": {"lr": {"loguniform": [1e-5, 2e-4]}}, "samples": 2, "max_epochs": 2,
        "metric": "val_loss", "mode": "min", "experiment": str(path / "ray")}, sort_keys=False))
    return path


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The test-split section's model loading, stubbed: the paths it was asked to load."""
    import loratune.infer.inference as inference

    seen: list[Path] = []

    def fake_run_split(path: Path, **kw: object) -> None:
        seen.append(Path(path))
        raise RuntimeError("no model in this test")

    monkeypatch.setattr(inference, "run_split", fake_run_split)
    return seen


def section(text: str, title: str) -> str:
    """One <h2> section of a page, up to the next."""
    start = text.index(f"<h2>{title}</h2>")
    end = text.find("<h2>", start + 1)
    return text[start:end if end >= 0 else len(text)]


def option_rows(text: str) -> list[str]:
    """The option names of the "Best configuration" table."""
    return re.findall(r"<tr><td[^>]*>([^<]*)</td>", section(text, "Best configuration").split("</table>")[0])


def test_page_of_a_full_search(tmp_path: Path, no_model: list[Path]) -> None:
    search = make_full_search(tmp_path / "search")
    text = read(write_report(search))
    top = glance(text)
    assert "adapter" not in top.lower() and "rank" not in top.lower() and "targets" not in top
    assert "× smaller" not in top
    assert "Full fine-tuning with learning rate 5e-05 won: validation loss 0.4000 (untuned default 0.4500)" in top
    assert "22,713,216 parameters trained" in top and "full fine-tuning" in top
    options = option_rows(text)
    assert "lr" in options and not {"rank", "alpha", "targets", "dropout"} & set(options), options
    assert "There is no adapter: every weight is saved" in text and 'alt="sizes"' not in text
    assert "ΔW" not in text and "What the adapter learned" not in text and "The best adapter" not in text
    assert "<h2>The best model (trial t0001)</h2>" in text
    assert no_model == [search / "best" / "model"]
    assert "test-split predictions: not available (RuntimeError: no model in this test)" in text
    assert "model bytes" in section(text, "Trials") and "adapter bytes" not in text
    assert ">1234<" in section(text, "Trials")


def test_a_search_from_before_method_is_lora(tmp_path: Path, no_model: list[Path]) -> None:
    """No `method:` under search.yaml's options (and none in best/config.yaml): a LoRA search's page."""
    search = make_search(tmp_path / "search")
    doc = yaml.safe_load((search / "search.yaml").read_text())
    del doc["options"]["method"]
    (search / "search.yaml").write_text(yaml.safe_dump(doc))
    best_cfg = rundir.read_config_doc(search / "best")
    del best_cfg["method"]
    (search / "best" / "config.yaml").write_text(yaml.safe_dump(best_cfg))
    text = read(write_report(search))
    top = glance(text)
    assert "Rank 4 on" in top and "× smaller than the model" in top and "adapter size" in top
    assert "Full fine-tuning with" not in top and "full fine-tuning" not in top
    assert {"rank", "alpha", "targets"} <= set(option_rows(text))
    assert 'alt="sizes"' in text and "adapter bytes" in text


def test_a_lora_search_keeps_its_rank_sentence(tmp_path: Path, no_model: list[Path]) -> None:
    text = read(write_report(make_search(tmp_path / "search")))
    top = glance(text)
    assert "Rank 4 on" in top and "× smaller than the model" in top and "adapter size" in top
    assert "Full fine-tuning with" not in top
    assert "rank" in option_rows(text)


@pytest.mark.parametrize("full", [True, False])
def test_tune_names_what_the_best_trial_kept(tmp_path: Path, capsys: pytest.CaptureFixture, full: bool) -> None:
    search = make_full_search(tmp_path / "s") if full else make_search(tmp_path / "s")
    summary = rundir.read_json(search / "search.json")
    result = SearchResult(out=search, columns=["trial"], rows=[], best=summary["best"], default=summary["default"],
                          metric="val_loss", mode="min")
    ui = Renderer()
    try:
        tune_cli.print_results(ui, result)
    finally:
        ui.close()
    out = capsys.readouterr().out
    if full:
        assert f"best model: {search / 'best' / 'model'};" in out and "best adapter" not in out
    else:
        assert f"best adapter: {search / 'best' / 'adapter'};" in out and "best model" not in out


def test_the_headline_says_whether_the_winner_beats_the_default_on_test(tmp_path: Path, no_model: list[Path],
                                                                         capsys: pytest.CaptureFixture,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """search.json's comparison (McNemar on test) in the headline, a card and the CLI's summary; the interval
    columns are the table's, never searched options; the option plots draw points and whiskers, no lines."""
    from loratune.report import plots

    search = make_search(tmp_path / "search")
    rows = rundir.read_json(search / "trials.json")
    for row, (lo, hi) in zip(rows, ((0.74, 0.82), (0.76, 0.84))):
        row.update(val_accuracy_lo=lo, val_accuracy_hi=hi, val_f1_lo=lo, val_f1_hi=hi)
    rundir.write_json(search / "trials.json", rows)
    summary = rundir.read_json(search / "search.json")
    verdict = ("best trial t0001: test accuracy 0.815 vs untuned default 0.790 (+2.5 points); McNemar p = 0.203: "
               "not beyond chance on 400 test examples")
    summary["comparison"] = {"same_trial": False, "split": "test", "n": 400, "best_accuracy": 0.815,
                             "default_accuracy": 0.79, "best_only": 30, "default_only": 20, "p_value": 0.2026,
                             "beyond_chance": False, "verdict": verdict}
    rundir.write_json(search / "search.json", summary)
    figures: list = []
    monkeypatch.setattr(plots, "png", lambda fig: figures.append(fig) or "data:image/png;base64,")
    text = read(write_report(search))
    top = glance(text)
    assert ("On test, against the untuned default: accuracy 0.815 vs 0.790 (+2.5 points), McNemar p = 0.203: "
            "not beyond chance on 400 test examples (the winner was chosen on validation, so only test can judge "
            "it).") in top
    assert "vs untuned default, test" in top and "30 examples only the winner got right, 20 only the default" in top
    assert not {"val_accuracy_lo", "val_f1_hi"} & set(option_rows(text))
    assert "val_accuracy_lo" in section(text, "Trials")
    panels = [ax for fig in figures for ax in fig.axes if ax.get_title().startswith("val_accuracy vs ")]
    assert panels and all(line.get_linestyle() in ("None", "none", "") for ax in panels for line in ax.lines)
    assert any(ax.collections and len(ax.collections) >= 2 for ax in panels)      # points and their whiskers

    result = SearchResult(out=search, columns=["trial"], rows=[], best=summary["best"], default=summary["default"],
                          metric="val_loss", mode="min", summary=summary)
    ui = Renderer()
    try:
        tune_cli.print_results(ui, result)
    finally:
        ui.close()
    assert verdict in capsys.readouterr().out


def test_the_search_card_counts_every_status(tmp_path: Path) -> None:
    """Collapsed trials (training/loop.collapsed stopped them) and statuses the page has no colour for are counted:
    the card's counts add up to the number of trials, and a collapsed cell gets its class."""
    rows = [{"trial": "t0", "status": "completed", "epochs_run": 3, "lr": 5e-4, "val_loss": 0.45, "val_accuracy": 0.78},
            {"trial": "t1", "status": "collapsed", "epochs_run": 1, "lr": 0.05, "val_loss": 0.69, "val_accuracy": 0.5},
            {"trial": "t2", "status": "collapsed", "epochs_run": 1, "lr": 0.08, "val_loss": 0.70, "val_accuracy": 0.5},
            {"trial": "t3", "status": "pending", "epochs_run": 0, "lr": 0.01, "val_loss": None, "val_accuracy": None}]
    rundir.write_json(tmp_path / "trials.json", rows)
    rundir.write_json(tmp_path / "search.json", {"metric": "val_loss", "mode": "min",
                                                 "best": {"trial": "t0", "validation": {"loss": 0.45}}})
    text = read(write_report(tmp_path))
    card = re.search(r'<div class="k">search</div><div class="v">(.*?)</div><div class="d">(.*?)</div>', text)
    assert card and card.group(1) == "4 trials"
    assert card.group(2) == "1 completed, 2 collapsed, 1 pending"
    assert text.count('class="t status-collapsed">collapsed</td>') == 2
    assert re.search(r"\.status-collapsed\{color:#[0-9a-f]{6}\}", text)
