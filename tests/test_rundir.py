"""The run directory's one reader: the best-epoch rule (only a finite loss can be best) and the tolerant
readers of metrics.jsonl, results.json and config.yaml that the trainer, the trials table and the report share."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import yaml

from loratune.errors import InputError
from loratune.training import rundir
from loratune.training.options import TrainConfig

NAN, INF = float("nan"), float("inf")


def _evals(*losses: object) -> list[dict[str, object]]:
    return [{"epoch": i + 1, "loss": v} for i, v in enumerate(losses)]


# --- the best epoch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("losses,epoch", [
    ((0.5, 0.3, 0.4), 2),
    ((NAN, 0.6, 0.7), 2),                 # NaN never wins (a NaN compares False both ways)
    ((0.6, NAN, 0.7), 1),
    ((0.6, INF, -INF, 0.5), 4),           # neither infinity is a loss; -inf would otherwise always win
    ((None, 0.9, None), 2),               # null: how metrics.jsonl writes NaN / inf
    ((0.4, 0.4, 0.3, 0.3), 3),            # ties: the earliest
    ((0.4, True, "0.1", 0.5), 1),         # not numbers
    ((1, 0.5), 2),                        # an integer loss counts
])
def test_best_evaluation_is_the_lowest_finite_loss_earliest_on_a_tie(losses, epoch) -> None:
    best = rundir.best_evaluation(_evals(*losses))
    assert best is not None and best["epoch"] == epoch


@pytest.mark.parametrize("losses", [(), (NAN,), (None, None), (INF, NAN, None, -INF)])
def test_no_best_evaluation_when_no_loss_is_finite(losses) -> None:
    assert rundir.best_evaluation(_evals(*losses)) is None


def test_best_evaluation_ignores_evaluations_without_a_loss() -> None:
    assert rundir.best_evaluation([{"epoch": 1}, {"epoch": 2, "loss": 0.2}]) == {"epoch": 2, "loss": 0.2}


def test_is_better() -> None:
    assert rundir.is_better(0.5, None) and rundir.is_better(0.4, 0.5)
    assert not rundir.is_better(0.5, 0.5)                               # a tie keeps the earlier epoch
    for bad in (NAN, INF, -INF, None, True, "0.1"):
        assert not rundir.is_better(bad, None) and not rundir.is_better(bad, 0.5), bad


# --- the tolerant readers ---------------------------------------------------------------------------

def _write_lines(run: Path, *lines: str) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return run


def test_a_torn_last_line_of_metrics_jsonl_is_skipped(tmp_path: Path) -> None:
    run = _write_lines(tmp_path, '{"type": "train", "step": 5, "loss": 0.7}', "[1, 2]", "",
                       '{"type": "eval", "split": "validation", "epoch": 1, "step": 5, "loss": 0.6}')
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"type": "train", "st')                                # a run killed mid-write
    assert [x["type"] for x in rundir.read_metrics(run)] == ["train", "eval"]
    assert rundir.train_losses(run) == [(5, 0.7)]
    assert rundir.evaluations(run) == [{"epoch": 1, "step": 5, "loss": 0.6}]


def test_a_missing_metrics_jsonl_reads_as_no_lines(tmp_path: Path) -> None:
    assert rundir.read_metrics(tmp_path) == rundir.evaluations(tmp_path) == rundir.train_losses(tmp_path) == []


def test_evaluations_on_a_null_loss(tmp_path: Path) -> None:
    """The trainer writes a NaN or infinite loss as null: it reads back as None, never best."""
    run = _write_lines(tmp_path,
                       '{"type": "train", "step": 5, "epoch": 1, "loss": null}',
                       '{"type": "eval", "split": "validation", "epoch": 1, "step": 5, "loss": null, "accuracy": 0.5}',
                       '{"type": "eval", "split": "validation", "epoch": "2", "step": 9, "loss": 0.1}',
                       '{"type": "eval", "split": "validation", "epoch": 2, "step": 10, "loss": null, "accuracy": 0.5}')
    evals = rundir.evaluations(run)
    assert evals == [{"epoch": 1, "step": 5, "loss": None, "accuracy": 0.5},
                     {"epoch": 2, "step": 10, "loss": None, "accuracy": 0.5}]
    assert rundir.best_evaluation(evals) is None
    assert rundir.train_losses(run) == []                                 # non-finite training losses: none


def test_write_json_then_read_json_turns_nan_into_null(tmp_path: Path) -> None:
    rundir.write_json(tmp_path / "results.json", {"validation": {"loss": NAN, "accuracy": 0.5}, "best_epoch": 1})
    assert rundir.read_results(tmp_path) == {"validation": {"loss": None, "accuracy": 0.5}, "best_epoch": 1}


@pytest.mark.parametrize("content", [b'{"validation": {"loss": 0.3', b"\xff\xfe not utf-8", b"[" * 100_000])
def test_unreadable_json_reads_as_none_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      content: bytes) -> None:
    (tmp_path / "results.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="loratune.training.rundir"):
        assert rundir.read_json(tmp_path / "results.json") is None
        assert rundir.read_results(tmp_path) is None
    assert "results.json: unreadable" in caplog.text


def test_missing_or_misshapen_files_read_as_nothing(tmp_path: Path) -> None:
    assert rundir.read_json(tmp_path / "nothing.json") is None and rundir.read_results(tmp_path) is None
    (tmp_path / "results.json").write_text("[1, 2]")
    assert rundir.read_json(tmp_path / "results.json") == [1, 2] and rundir.read_results(tmp_path) is None
    assert rundir.read_config_doc(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("- a list\n- not options\n")
    assert rundir.read_config_doc(tmp_path) == {}
    (tmp_path / "config.yaml").write_text("rank: [unclosed\n")
    assert rundir.read_config_doc(tmp_path) == {} and rundir.read_yaml(tmp_path / "config.yaml") == {}


def test_config_round_trip_and_the_run_of_an_adapter(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    assert rundir.adapter_run_config(run / "adapter") is None             # no config.yaml: in no run
    cfg = TrainConfig().replace(rank=3, lr=1e-3)
    rundir.write_config(run, cfg, label_names=["neg", "pos"])
    assert rundir.read_config(run) == (cfg, {"label_names": ["neg", "pos"], "versions": rundir.versions()})
    assert rundir.adapter_run_config(run / "adapter") == cfg
    doc = rundir.read_config_doc(run)
    assert doc["rank"] == 3 and doc["label_names"] == ["neg", "pos"]
    (run / "config.yaml").write_text("rank: [unclosed\n")
    assert rundir.read_config_doc(run) == {}                              # tolerant for people to look at
    with pytest.raises(InputError, match="config.yaml: cannot read"):
        rundir.adapter_run_config(run / "adapter")                        # strict where a run continues from it


def test_written_results_are_valid_json_for_any_reader(tmp_path: Path) -> None:
    rundir.write_json(tmp_path / "x.json", {"a": [INF, -INF, 1.5], "b": {"c": NAN}})
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": [None, None, 1.5], "b": {"c": None}}
    assert not math.isnan(rundir.read_json(tmp_path / "x.json")["a"][2])


def test_dumps_writes_nan_and_infinities_as_null() -> None:
    # --json output (eval's roc_auc is NaN on a split with one class) must be JSON any reader takes.
    text = rundir.dumps({"accuracy": 0.9, "roc_auc": float("nan"), "x": [float("inf"), -float("inf"), 1]})
    assert text == '{"accuracy": 0.9, "roc_auc": null, "x": [null, null, 1]}'
    assert json.loads(text)["roc_auc"] is None


def test_yaml_reads_exponents_without_a_dot_as_numbers() -> None:
    # PyYAML's YAML 1.1 read "lr: 1e-4" as the string '1e-4' ("--lr: expected a number"); YAML 1.2 and people
    # read a number. The rest is the safe loader's: quoted stays text, ints stay ints.
    from loratune import yamltext

    doc = yamltext.load("lr: 1e-4\nb: 5E-5\nc: -2e3\nd: 1.0e-4\ne: '1e-4'\nf: 3\ng: .5\nh: [1e-4, 1e-1]\ni: on")
    assert doc == {"lr": 1e-4, "b": 5e-5, "c": -2000.0, "d": 1e-4, "e": "1e-4", "f": 3, "g": 0.5, "h": [1e-4, 0.1],
                   "i": True}
    assert type(doc["f"]) is int and type(doc["lr"]) is float
    with pytest.raises(yaml.constructor.ConstructorError):
        yamltext.load("!!python/object:os.system {}")


def test_yaml_written_reads_back_as_it_was(tmp_path: Path) -> None:
    # With 1e5 read as a number, a text option '1e5' (a column's name) must be written quoted, or a resume reads a
    # float where config.yaml held text.
    from loratune import yamltext

    doc = {"text_column": "1e5", "label_column": "2E-3", "lr": 1e-4, "rank": 8, "data": "x.csv"}
    text = yamltext.dump(doc, sort_keys=False)
    assert "text_column: '1e5'" in text and yamltext.load(text) == doc
    cfg = TrainConfig(text_column="1e5")
    rundir.write_config(tmp_path, cfg)
    back, _ = rundir.read_config(tmp_path)
    assert back.text_column == "1e5"
