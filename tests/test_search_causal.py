"""The search on causal-LM data, on the tiny random Llama of test_causal_train: one real search (its table's causal
columns, the best by validation loss tested on test, McNemar on choice scoring, the base model evaluated once and as
``train`` evaluates it, its answers each trial's generations.json keeps, a resume that reuses it, the CLI's summary
and the report with the best trial's generations), the metric each task offers and its mode, refused before Ray
starts, and the trainer writing a given baseline as its own."""

from __future__ import annotations

import csv
import html
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run, synthetic_rows, write_csv
from test_causal_train import llama_dir, rows, write_jsonl  # noqa: F401 - llama_dir is a fixture

from loratune.search import driver
from loratune.search.trials import new_search
from loratune.training import rundir
from loratune.training.options import TrainConfig

FIXED = {"batch_size": 8, "max_length": 64, "targets": "all-linear", "dropout": 0.0, "log_every": 2}
SPACE = {"lr": {"loguniform": [1e-2, 5e-2]}, "rank": {"choice": [2, 4]}}
CAUSAL = ["val_loss", "val_perplexity", "val_accuracy", "val_exact_match"]
MARK = "passed_in"                      # a key the counted base-model evaluation adds: a trial that shows it got it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """80 prompt -> positive/negative rows (a label set: choice accuracy): 64 train, 8 validation, 8 test."""
    return write_jsonl(tmp_path_factory.mktemp("causal-search-data") / "train.jsonl", rows(80))


@pytest.fixture(scope="module")
def free_text(tmp_path_factory) -> str:
    """Rows whose completions are all different: no label set, so no choice accuracy."""
    return write_jsonl(tmp_path_factory.mktemp("free-text") / "train.jsonl",
                       [{"prompt": f"count to {i}", "completion": f"{i} {i + 1}"} for i in range(40)])


def counted(calls: list, mp: pytest.MonkeyPatch) -> None:
    """driver.base_model_metrics counted, its metrics marked with :data:`MARK` (a trial that shows the mark took
    them from the driver instead of evaluating the base model itself); its answers as they are."""
    real = driver.base_model_metrics

    def wrapper(cfg, prepared, precisions):
        calls.append(list(precisions))
        metrics, answers = real(cfg, prepared, precisions)
        return {p: {split: {**m, MARK: 1.0} for split, m in splits.items()} for p, splits in metrics.items()}, answers

    mp.setattr(driver, "base_model_metrics", wrapper)


@pytest.fixture(scope="module")
def search(tmp_path_factory, llama_dir, data):  # noqa: F811 - the imported fixture
    """One search: 2 trials of 1 epoch, 2 rungs, the default metric; (result, its folder, base-model calls)."""
    out, calls = tmp_path_factory.mktemp("causal-search") / "s", []
    with pytest.MonkeyPatch.context() as mp:
        counted(calls, mp)
        result = driver.tune(space=SPACE, samples=2, max_epochs=1, rungs_per_epoch=2, out=out, model=llama_dir,
                             data=data, **FIXED)
    return result, out, calls


def _epoch0(run: Path) -> dict[str, dict]:
    """A run's epoch-0 records in metrics.jsonl, by split, without the record's own keys."""
    return {x["split"]: {k: v for k, v in x.items() if k not in ("type", "split", "epoch", "step")}
            for x in rundir.read_metrics(run) if x.get("type") == "eval" and x.get("epoch") == 0}


def _unmarked(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != MARK}


def test_a_causal_search_writes_its_metrics_and_tests_the_best(search) -> None:
    r, out, _ = search
    assert (r.metric, r.mode) == ("val_loss", "min")
    with open(out / "trials.csv", newline="", encoding="utf-8") as f:
        header = next(csv.reader(f))
    table = json.loads((out / "trials.json").read_text())
    cols = ["trial", "status", "epochs_run", "lr", "rank", *CAUSAL]       # no F1, no intervals: no confusion matrix
    assert header == r.columns == cols and [list(t) for t in table] == [cols] * 2
    assert (table[0]["lr"], table[0]["rank"]) == (5e-4, 8)                # the untuned default (causal-LM's) first
    for t in table:
        assert t["status"] in ("completed", "stopped_early") and t["epochs_run"] in (0.5, 1)
        assert math.isfinite(t["val_loss"]) and t["val_perplexity"] == pytest.approx(math.exp(t["val_loss"]))
        assert 0 <= t["val_accuracy"] <= 1 and 0 <= t["val_exact_match"] <= 1
    best = min(table, key=lambda t: t["val_loss"])
    assert r.best["trial"] == best["trial"] and r.best["validation"]["loss"] == best["val_loss"]

    res = json.loads((out / "best" / "results.json").read_text())
    assert set(res["test"]) == {"loss", "perplexity", "accuracy", "exact_match"}
    assert res["validation"]["loss"] == best["val_loss"] and res["trial"] == best["trial"]
    summary = json.loads((out / "search.json").read_text())
    assert summary["best"]["test"] == res["test"] and set(summary["default"]["test"]) == set(res["test"])
    cmp = summary["comparison"]                                          # McNemar on choice scoring's right/wrong
    if best["trial"] == table[0]["trial"]:
        assert cmp["same_trial"]
    else:
        assert cmp["n"] == 8 and cmp["best_accuracy"] == res["test"]["accuracy"] and 0 <= cmp["p_value"] <= 1
        assert cmp["default_accuracy"] == summary["default"]["test"]["accuracy"]


def test_the_base_model_is_evaluated_once_and_as_train_evaluates_it(search, tmp_path) -> None:
    """One evaluation for the search; each trial's epoch 0 is that one (it carries the mark), and equals what a
    plain ``train`` of the same options writes: validation in the trial, test in best/results.json."""
    from loratune.training.loop import train

    r, out, calls = search
    assert calls == [["auto"]]
    shared = json.loads((out / "base_model.json").read_text())["by_precision"]["auto"]
    for t in r.rows:
        trial = out / "trials" / t["trial"]
        assert _epoch0(trial) == {"validation": shared["validation"]}             # trials test nothing
    plain = tmp_path / "plain"
    train(rundir.read_config(out / "trials" / r.rows[0]["trial"])[0], out=plain)
    mine = json.loads((plain / "results.json").read_text())["baseline"]
    trial_res = rundir.read_results(out / "trials" / r.rows[0]["trial"])        # the default trains to its end
    assert _unmarked(trial_res["baseline"]["validation"]) == mine["validation"]
    assert _unmarked(_epoch0(out / "trials" / r.rows[0]["trial"])["validation"]) == mine["validation"]
    best = json.loads((out / "best" / "results.json").read_text())["baseline"]
    assert {k: _unmarked(v) for k, v in best.items()} == mine and best["test"][MARK] == 1.0
    answers = json.loads((out / "base_model.json").read_text())["generations"]["auto"]     # the base model's answers
    assert [r["base"] for r in rundir.read_generations(plain)["rows"]] == answers              # as train makes them


def test_each_trial_writes_the_base_answers_it_was_given_and_the_page_shows_the_best_s(search) -> None:
    """base_model.json keeps the base model's answers to the first validation rows (all 8 here: fewer than
    SAMPLE_ROWS); every trial writes them as its generations.json base column, beside its own kept pass's answers;
    the search page shows the best trial's base-model metrics, learning curves and generations."""
    from loratune.report.search_page import search_page
    from loratune.training.loop import prepare_data

    r, out, _ = search
    answers = json.loads((out / "base_model.json").read_text())["generations"]["auto"]
    val = prepare_data(rundir.read_config(out / "trials" / r.rows[0]["trial"])[0]).validation
    assert len(val) == 8 and len(answers) == 8 and all(isinstance(a, str) for a in answers)
    for t in r.rows:
        doc = rundir.read_generations(out / "trials" / t["trial"])
        assert [x["base"] for x in doc["rows"]] == answers
        assert [x["reference"] for x in doc["rows"]] == val.references and all(x["adapter"] is not None
                                                                               for x in doc["rows"])
        passes = [e for e in rundir.evaluations(out / "trials" / t["trial"]) if e["epoch"] != 0]   # not the base's
        assert doc["epoch"] == rundir.best_evaluation(passes)["epoch"]                               # the kept pass
    best = rundir.read_generations(out / "best")          # (the adapter column against a separate generation of the
    assert best == rundir.read_generations(out / "trials" / r.best["trial"])    # adapter: test_report_causal, fp32)

    _, glance, body = search_page(out)
    page = "".join(glance + body)
    base = json.loads((out / "best" / "results.json").read_text())["baseline"]
    assert '<td class="t">base model (no adapter)</td>' in page
    assert f'data-v="{base["validation"]["loss"]!r}"' in page and f'data-v="{base["test"]["loss"]!r}"' in page
    adapter = page[page.index(f"<h2>The best adapter (trial {r.best['trial']})</h2>"):]
    assert adapter.index("<h3>Its learning curves</h3>") < adapter.index('alt="learning curves"')
    section = adapter[adapter.index("<h3>Its sample generations</h3>"):]
    section = section[section.index("<tbody>"):section.index("</tbody>")]
    assert section.count("<tr") == 8 and "test-split predictions" not in page
    for x in best["rows"]:
        assert html.escape(x["adapter"], quote=True) in section and html.escape(x["base"], quote=True) in section


def test_resume_reuses_the_base_model_and_the_cli_and_report_show_the_search(search, tmp_path, capsys) -> None:
    """A search whose end was lost resumes (the base model read back, not evaluated again) to the same table; a
    finished one prints its summary; the report draws its page."""
    from loratune.report.write import write_report

    r, out, _ = search
    again = tmp_path / "s"
    shutil.copytree(out, again)
    for name in ("search.json", "trials.csv", "trials.json", "best"):
        p = again / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    doc = (again / "search.yaml").read_text().replace(str(out), str(again))   # Ray's experiment, in the copy
    (again / "search.yaml").write_text(doc)
    calls: list = []
    with pytest.MonkeyPatch.context() as mp:
        counted(calls, mp)
        resumed = driver.tune(resume=again)
    assert calls == [] and not resumed.already_done
    assert [(t["trial"], t["val_loss"]) for t in resumed.rows] == [(t["trial"], t["val_loss"]) for t in r.rows]

    code, stdout, err = run(capsys, "tune", "--resume", str(out))
    assert code == 0, err
    assert "already finished" in stdout and f"best trial {r.best['trial']} by val_loss (min)" in stdout
    assert "exact_match" in stdout and "test loss" in stdout
    html = write_report(out).read_text(encoding="utf-8")
    assert "loratune search" in html and r.best["trial"] in html


def test_the_metric_decides_the_mode(llama_dir, data) -> None:  # noqa: F811
    def mode(metric: str, given: str | None = None) -> str:
        return new_search(None, {"model": llama_dir, "data": data}, SPACE, 2, 1, 1, None, "random", metric, given, 2,
                          None, None)["mode"]

    assert mode("val_loss") == mode("val_perplexity") == "min"
    assert mode("val_exact_match") == mode("val_accuracy") == "max"
    assert mode("val_exact_match", "min") == "min"                              # a given mode stands


def test_a_metric_the_task_does_not_report_is_refused_before_ray(tmp_path, capsys, llama_dir, data,  # noqa: F811
                                                                 free_text) -> None:
    reviews = write_csv(tmp_path / "reviews.csv", synthetic_rows(40))       # text/label: classification
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps(SPACE))                       # a small space: each search is refused before it runs
    causal = ["--model", llama_dir, "--max-length", "64", "--samples", "2", "--max-epochs", "1", "--space", str(space)]
    cases = [([*causal, "--data", data, "--metric", "val_f1"],
              "--metric: val_f1: a causal-lm trial does not report it; this search offers val_loss, val_perplexity, "
              "val_accuracy, val_exact_match"),
             ([*causal, "--data", free_text, "--metric", "val_accuracy"],
              "completions are not a label set (at most 20 distinct answers), so no choice accuracy is scored; this "
              "search offers val_loss, val_perplexity, val_exact_match"),
             (["--model", "minilm-l6", "--data", reviews, "--metric", "val_exact_match"],    # refused before it loads
              "--metric: val_exact_match: a classification trial does not report it; this search offers val_loss, "
              "val_accuracy, val_f1")]
    for argv, fragment in cases:
        code, _, err = run(capsys, "tune", *argv, "--out", str(tmp_path / "o"))
        assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()                                    # nothing written, Ray never started


def test_train_writes_a_given_baseline_as_its_own_and_evaluates_only_the_rest(tmp_path, monkeypatch, llama_dir,  # noqa: F811
                                                                               data) -> None:
    from loratune.training import loop

    seen: list[str] = []
    real = loop.evaluate_split

    def spy(run, split):
        seen.append("validation" if split is run.data.validation else "test")
        return real(run, split)

    monkeypatch.setattr(loop, "evaluate_split", spy)
    given = {"validation": {"loss": 9.0, "perplexity": math.exp(9.0), "accuracy": 0.25, "exact_match": 0.0}}
    loop.train(TrainConfig(model=llama_dir, data=data, epochs=1, threads=1, **FIXED), out=tmp_path / "r",
               baseline=given)
    assert seen == ["test", "validation", "test"]             # epoch 0's test, the epoch's validation, the end's test
    epoch0 = _epoch0(tmp_path / "r")
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert epoch0["validation"] == res["baseline"]["validation"] == given["validation"]
    assert epoch0["test"] == res["baseline"]["test"] and set(res["baseline"]["test"]) == set(given["validation"])


def test_choice_scoring_says_which_rows_it_got_right_and_without_it_there_is_no_comparison(llama_dir, data,  # noqa: F811
                                                                                           free_text, tmp_path,
                                                                                           capsys) -> None:
    """score_causal is evaluate_causal plus per-row correctness (None without a label set); a search on such data
    has no McNemar test: comparison None, and search.json says why."""
    from loratune.cli.progress import Renderer
    from loratune.cli.tune import print_results
    from loratune.search.space import parse_space
    from loratune.search.trials import NO_PAIRS, Tested, finish, trial_record
    from loratune.tasks.causal_eval import evaluate_causal, score_causal
    from loratune.training.loop import prepare_data
    from loratune.training.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(llama_dir)
    for source, labelled in ((data, True), (free_text, False)):
        prepared = prepare_data(TrainConfig(model=llama_dir, data=source, **FIXED))
        tok = load_tokenizer(llama_dir)
        scores = score_causal(model, tok, prepared.test, torch.device("cpu"), "fp32", prepared.pad_id)
        assert (scores.metrics, scores.generations) == evaluate_causal(model, tok, prepared.test, torch.device("cpu"),
                                                                       "fp32", prepared.pad_id)
        if labelled:
            assert scores.correct.dtype == bool and scores.correct.shape == (len(prepared.test),)
            assert scores.correct.mean() == scores.metrics["accuracy"]
        else:
            assert scores.correct is None and "accuracy" not in scores.metrics

    space = parse_space(SPACE, TrainConfig(model=llama_dir, data=free_text))
    trials = []
    for name, loss in (("t0", 2.0), ("t1", 1.5)):
        run_dir = tmp_path / "trials" / name
        (run_dir / "adapter").mkdir(parents=True)
        lines = [{"type": "eval", "split": "validation", "epoch": 0, "step": 0, "loss": 0.1},     # epoch 0: the base
                 {"type": "eval", "split": "validation", "epoch": 1, "step": 4, "loss": loss, "perplexity":
                  math.exp(loss), "exact_match": 0.5}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        trials.append(trial_record(space, name, "completed", {"lr": 0.01, "rank": 2}, run_dir,
                                   ["val_loss", "val_perplexity", "val_exact_match"]))
    assert trials[0]["row"]["val_loss"] == 2.0 and trials[0]["best"]["epoch"] == 1     # not the base model's 0.1
    result = finish(tmp_path, {"metric": "val_loss", "mode": "min", "experiment": ""}, space, trials, 1.0,
                    lambda adapter: Tested({"loss": 1.0, "exact_match": 0.5}, None), lambda e: None,
                    ["val_loss", "val_perplexity", "val_exact_match"])
    summary = json.loads((tmp_path / "search.json").read_text())
    assert result.best["trial"] == "t1" and summary["comparison"] is None and summary["comparison_note"] == NO_PAIRS
    assert result.columns == ["trial", "status", "epochs_run", "lr", "rank", "val_loss", "val_perplexity",
                              "val_exact_match"]
    ui = Renderer()
    try:
        print_results(ui, result)                                            # the CLI's summary says why too
    finally:
        ui.close()
    out = capsys.readouterr().out
    assert "validation loss 1.5000, exact_match 0.5000; test loss 1.0000, exact_match 0.5000" in out
    assert NO_PAIRS in out and "McNemar p" not in out


def test_causal_data_gets_its_own_default_space(capsys, llama_dir, data) -> None:  # noqa: F811
    """With no space given a causal-LM search searches spaces/causal.yaml (no pooler to train, which the
    classifier's space has and a causal LM lacks): shown by --show-space, valid on the model (its presets resolve
    to modules it has), and the untuned causal default is one of its points."""
    import yaml

    from loratune.search.space import (
        CAUSAL_SPACE,
        DEFAULT_SPACE,
        default_space,
        load_space,
        parse_space,
        validate,
    )

    assert "modules_to_save" not in CAUSAL_SPACE and "modules_to_save" in DEFAULT_SPACE
    assert load_space("causal") == CAUSAL_SPACE
    code, out, err = run(capsys, "tune", "--show-space", "--model", llama_dir, "--data", data)
    assert code == 0, err
    assert yaml.safe_load(out)["search"] == CAUSAL_SPACE
    cfg = TrainConfig(model=llama_dir, data=data)
    assert cfg.task == "causal-lm" and default_space(cfg) == CAUSAL_SPACE
    assert default_space(TrainConfig()) == DEFAULT_SPACE
    validate(CAUSAL_SPACE, cfg, load_model=True)                  # every target preset names modules of the model
    space = parse_space(CAUSAL_SPACE, cfg)
    point = space.default_point(cfg)
    assert point == {"lr": 5e-4, "rank": 8, "alpha": 16.0, "targets": "q,v", "dropout": 0.1}
    assert all(d.contains(point[d.key]) for d in space.sampled)
