"""The CLI as a user drives it: bad input exits 2 with one line; eval, predict, merge, info work."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
import yaml
from conftest import assert_one_line_error, run, synthetic_rows, write_csv

from loratune.cli.common import train_options
from loratune.cli.main import build_parser, main
from loratune.training.options import OPTIONS, TrainConfig, flag, option_names

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "32", "--rank", "4", "--threads", "1", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_data) -> Path:
    """One finished run of the tiny model (adapter in run/adapter)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out), *FAST]) == 0
    return out


BAD_CASES = ["missing file", "missing column", "empty file", "single class", "not utf-8", "unseen validation label",
             "empty text", "lr <= 0", "epochs <= 0", "batch size <= 0", "unknown model", "model folder without config",
             "rank too large", "unknown target", "bad config file", "max length past the positions"]


def _bad_files(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (extra argv, expected message fragment)."""
    rows = synthetic_rows(60)
    (tmp / "empty.csv").write_text("")
    write_csv(tmp / "nocol.csv", rows, header=("review", "label"))
    write_csv(tmp / "one.csv", [(t, "pos") for t, _ in rows])
    (tmp / "latin1.csv").write_bytes("text,label\nfine film,pos\ncaf\xe9 noir,neg\n".encode("latin-1") * 1)
    write_csv(tmp / "val_new.csv", [("a good film", "meh")] * 5)
    write_csv(tmp / "blank.csv", rows[:30] + [("  ", "pos")] + rows[30:])
    return {
        "missing file": (["--data", str(tmp / "nope.csv")], "nope.csv"),
        "missing column": (["--data", str(tmp / "nocol.csv")], "review"),
        "empty file": (["--data", str(tmp / "empty.csv")], "empty"),
        "single class": (["--data", str(tmp / "one.csv")], "single class"),
        "not utf-8": (["--data", str(tmp / "latin1.csv")], "UTF-8"),
        "unseen validation label": (["--validation-file", str(tmp / "val_new.csv")], "meh"),
        "empty text": (["--data", str(tmp / "blank.csv")], "empty"),
        "lr <= 0": (["--lr", "0"], "--lr"),
        "epochs <= 0": (["--epochs", "0"], "--epochs"),
        "batch size <= 0": (["--batch-size", "-1"], "--batch-size"),
        "unknown model": (["--model", "no-such-model-xyz"], "no-such-model-xyz"),
        "model folder without config": (["--model", str(tmp)], "config.json"),
        "rank too large": (["--rank", "33"], "--rank"),
        "unknown target": (["--targets", "q_proj"], "q_proj"),
        "bad config file": (["--config", str(tmp / "empty.csv") + ".yaml"], "--config"),
        # the tiny model has 64 positions: a batch of 65 tokens would fail inside its embeddings mid-training
        "max length past the positions": (["--max-length", "65"], "--max-length: 65 tokens is more than"),
    }


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_train_input_exits_2_with_one_line(case, tmp_path, capsys, tiny_model_dir, tiny_data) -> None:
    argv, fragment = _bad_files(tmp_path)[case]
    out = tmp_path / "run"
    base = ["train", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out), *FAST]
    # later flags win in argparse, so the case's flags override the good defaults above
    code, _, err = run(capsys, *base, *argv)
    assert_one_line_error(code, err, fragment)
    assert not (out / "results.json").exists() and not (out / "adapter").exists()


def test_auto_max_length_fits_the_models_positions(tmp_path, capsys, tiny_model_dir) -> None:
    # --max-length auto (128 for a classifier) on a model with 64 positions: texts are cut at 64, and
    # config.yaml and the adapter (what inference cuts at) say so; 100-word texts train instead of failing.
    rows = [(" ".join(["good"] * 100), "pos"), (" ".join(["bad"] * 100), "neg")] * 20 + synthetic_rows(40)
    write_csv(tmp_path / "long.csv", rows)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--model", tiny_model_dir, "--data", str(tmp_path / "long.csv"), "--out",
                       str(out), "--max-steps", "2", "--batch-size", "8", "--threads", "1")
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["max_length"] == 64
    assert json.loads((out / "adapter" / "loratune.json").read_text())["max_length"] == 64
    code, got, err = run(capsys, "predict", "--adapter", str(out / "adapter"), " ".join(["fine"] * 200))
    assert code == 0 and got.split("\t")[0] in ("pos", "neg"), err


def test_existing_out_is_refused(tmp_path, capsys, tiny_model_dir, tiny_data) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    code, _, err = run(capsys, "train", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out), *FAST)
    assert_one_line_error(code, err, "--resume")
    assert sorted(p.name for p in out.iterdir()) == ["something"]
    # --overwrite replaces a run or a search, never a folder of other files (it emptied any folder given)
    for command in ("train", "tune"):
        code, _, err = run(capsys, command, "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out),
                           "--overwrite", *FAST[2:])
        assert_one_line_error(code, err, "--overwrite: ")
        assert "holds files but no loratune run or search (no config.yaml or search.yaml)" in err
        assert sorted(p.name for p in out.iterdir()) == ["something"]


def test_eval_predict_json_and_merge(trained, tmp_path, capsys) -> None:
    adapter = trained / "adapter"
    code, out, _ = run(capsys, "eval", "--adapter", str(adapter), "--json")
    assert code == 0
    m = json.loads(out)
    results = json.loads((trained / "results.json").read_text())
    assert m["split"] == "test" and m["accuracy"] == pytest.approx(results["test"]["accuracy"])
    code, out, _ = run(capsys, "eval", "--adapter", str(adapter), "--split", "validation", "--json")
    assert json.loads(out)["loss"] == pytest.approx(results["validation"]["loss"], rel=1e-4)

    texts = ["the film was great", "a dull and boring plot", "the cast is superb"]
    code, out, _ = run(capsys, "predict", "--adapter", str(adapter), "--json", *texts)
    rows = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == ["pos", "neg", "pos"]
    for r in rows:
        assert set(r) == {"text", "label", "score", "probabilities"}
        assert r["score"] == max(r["probabilities"].values()) and sum(r["probabilities"].values()) == pytest.approx(1)

    merged = tmp_path / "merged"
    code, _, err = run(capsys, "merge", "--adapter", str(adapter), "--out", str(merged))
    assert code == 0, err
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    tok = AutoTokenizer.from_pretrained(str(merged))
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        p = torch.softmax(model(**tok(texts, padding=True, return_tensors="pt")).logits, -1)
    capsys.readouterr()
    code, out, _ = run(capsys, "predict", "--adapter", str(adapter), "--json", "--precision", "fp32", *texts)
    for r, q in zip([json.loads(x) for x in out.splitlines()], p):
        assert r["probabilities"]["pos"] == pytest.approx(q[1].item(), abs=1e-5)
    capsys.readouterr()
    code, _, err = run(capsys, "merge", "--adapter", str(adapter), "--out", str(merged))
    assert_one_line_error(code, err, "--overwrite")
    assert run(capsys, "merge", "--adapter", str(adapter), "--out", str(merged), "--overwrite")[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "merge", "--adapter", str(adapter), "--out", str(other), "--overwrite")
    assert_one_line_error(code, err, "--overwrite: ")                   # never a folder of other files
    assert (other / "notes.txt").read_text() == "mine"


def test_predict_file_reports_bad_lines_and_goes_on(trained, tmp_path, capsys) -> None:
    f = tmp_path / "in.txt"
    f.write_bytes(b"a great film\n\xff\xfe broken\n\na dull plot\n")
    code, out, err = run(capsys, "predict", "--adapter", str(trained / "adapter"), "--file", str(f))
    assert code == 0
    assert [x.split("\t")[0] for x in out.splitlines()] == ["pos", "neg"]
    assert "line 2: not UTF-8" in err and "line 3: empty" in err


def test_bad_adapter_and_predict_input(tmp_path, capsys, trained) -> None:
    code, _, err = run(capsys, "eval", "--adapter", str(tmp_path / "none"))
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run(capsys, "predict", "--adapter", str(trained / "adapter"), "--file", str(tmp_path))
    assert_one_line_error(code, err, "is a folder")
    code, _, err = run(capsys, "merge", "--adapter", str(trained), "--out", str(tmp_path / "m"))
    assert_one_line_error(code, err, "adapter_config.json")


def test_info_prints_the_peft_line(capsys, tiny_model_dir) -> None:
    code, out, _ = run(capsys, "info", "--model", tiny_model_dir, "--targets", "q,v", "--rank", "2")
    assert code == 0 and out.startswith("trainable params: ")
    code, _, err = run(capsys, "info", "--model", tiny_model_dir, "--targets", "q_lin")
    assert_one_line_error(code, err, "target 'q_lin' matches no linear layer of BertForSequenceClassification")


def test_config_file_and_flags_override(tmp_path, capsys, tiny_model_dir, tiny_data) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {tiny_data}\nrank: 2\nepochs: 1\nbatch_size: 8\nmax_length: 32\n"
                   "lr: auto\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--config", str(cfg), "--rank", "3", "--out", str(out), "--threads", "1")
    assert code == 0, err
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 3
    saved = yaml.safe_load((out / "config.yaml").read_text())             # auto is stored resolved: a resume repeats it
    assert (saved["lr"], saved["max_length"], saved["rank"]) == (5e-4, 32, 3)
    cfg.write_text("rnak: 2\n")
    code, _, err = run(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "x"))
    assert_one_line_error(code, err, "unknown training option 'rnak'")


def _parsers(parser: argparse.ArgumentParser, name: str = "loratune") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_of_every_command_has_help() -> None:
    """Help that is only "(default: …)" counts as none: every flag says what it does."""
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = re.sub(r"\(default: [^)]*\)$", "", action.help or "").strip()
            if not text or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{name} {a.dest}" for a in action._choices_actions if not (a.help or "").strip()]
    assert not missing, missing
    assert {n for n, _ in _parsers(build_parser())} >= {f"loratune {c}" for c in
                                                       ("info", "train", "eval", "predict", "merge", "tune",
                                                        "report", "analyze")}


@pytest.mark.parametrize("command", ["train", "tune"])
def test_help_lists_every_training_option_with_its_help_and_auto_defaults(command, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")   # argparse wraps lines, hyphens too
    for name in option_names():
        assert f" {flag(name)} " in text or f" {flag(name)}, " in text, name
        assert OPTIONS[name].help in text, name
    assert ("peak learning rate of AdamW, > 0 (default: auto = 0.0005 for LoRA classification, 5e-05 for full "
            "fine-tuning classification, 0.0005 for LoRA causal-LM)") in text
    assert "(default: auto = minilm-l6 for LoRA classification, minilm-l6 for full fine-tuning classification, " \
           "smollm2-135m for LoRA causal-LM)" in text
    assert "(default: auto = 3 for LoRA classification, 3 for full fine-tuning classification, 1 for LoRA " \
           "causal-LM)" in text
    assert "truncated; at most the model's positions (auto comes down to them), >= 2 (default: auto = 128 for LoRA " \
           "classification, 128 for full fine-tuning" in text
    assert "--rslora, --no-rslora rank-stabilised" in text
    assert "gradient-norm clipping (0: off), >= 0 (default: 1.0)" in text


def test_flags_take_auto_and_are_typed_by_their_option(capsys) -> None:
    args = build_parser().parse_args(["train", "--lr", "auto", "--max-length", "auto", "--rank", "4", "--clip", "0",
                                      "--no-bucket", "--layers", "0-1", "--targets", "q,v"])
    cfg = TrainConfig.from_dict(train_options(args))
    assert (cfg.lr, cfg.max_length, cfg.rank, cfg.clip, cfg.bucket, cfg.layers, cfg.targets) == (
        5e-4, 128, 4, None, False, (0, 1), ("q", "v"))
    assert cfg.auto_fields == {"model", "task", "lr", "max_length", "modules_to_save", "epochs"}
    assert train_options(build_parser().parse_args(["train"])) == {}          # unset flags stay unset
    for argv, fragment in ((["--lr", "fast"], "argument --lr: expected a number or auto, got 'fast'"),
                           (["--rank", "auto"], "argument --rank: expected an integer, got 'auto'")):
        with pytest.raises(SystemExit) as e:
            main(["train", *argv])
        assert e.value.code == 2 and fragment in capsys.readouterr().err
    code, _, err = run(capsys, "train", "--bias", "some")                   # a choice: one line naming the flag
    assert_one_line_error(code, err, "--bias: expected one of none, all, lora_only, got 'some'")


def test_train_resume_refuses_training_flags(trained, tmp_path, capsys) -> None:
    for extra, name in ((["--rank", "4"], "--rank"), (["--lr", "auto"], "--lr"), (["--no-bucket"], "--bucket"),
                        (["--config", str(tmp_path / "c.yaml")], "--config"),
                        (["--epochs", "2", "--rank", "2"], "--epochs")):
        code, _, err = run(capsys, "train", "--out", str(trained), "--resume", *extra)
        assert_one_line_error(code, err, f"--resume: a run continues with the options it was started with; drop {name}")
    code, _, err = run(capsys, "train", "--resume", "--rank", "4")
    assert_one_line_error(code, err, "--resume: name the run to continue with --out DIR")
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "none"), "--resume", "--rank", "4")
    assert_one_line_error(code, err, "nothing to resume")                   # the missing run is the first problem
    code, out, err = run(capsys, "train", "--out", str(trained), "--resume")
    assert code == 0 and "already finished" in out + err


RUN_THEN_EXIT = """
import gc, sys
from loratune.cli.main import run

class Cycle:                                   # garbage only the collector frees: a cycle with a finalizer
    def __init__(self, path):
        self.path, self.me = path, self
    def __del__(self):
        open(self.path, "w").write("finalized")

gc.disable()                                   # so that only run()'s own collection can free it
Cycle(sys.argv[1])
code = run(sys.argv[2:])
print("code", code, "frozen", gc.get_freeze_count() > 0, "finalized", open(sys.argv[1]).read(), flush=True)
sys.exit(code)
"""


@pytest.mark.parametrize("argv,code", [(["--targets", "q,v", "--rank", "2"], 0), (["--targets", "q_lin"], 2)])
def test_the_command_returns_mains_exit_code_after_finalizing_garbage_and_freezing_the_rest(
        argv, code, tmp_path, tiny_model_dir) -> None:
    """``loratune`` (cli.main.run, the console script and ``python -m loratune``): main's exit code and output;
    garbage left before the exit is finalized (its ``__del__`` ran) before what is alive is frozen for a quick
    exit."""
    mark = tmp_path / "mark"
    mark.write_text("alive")
    done = subprocess.run([sys.executable, "-c", RUN_THEN_EXIT, str(mark), "info", "--model", tiny_model_dir, *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert f"code {code} frozen True finalized finalized" in done.stdout
    assert ("trainable params: " in done.stdout) == (code == 0)
    err = done.stderr.strip().splitlines()
    assert bool(err and err[-1].startswith("loratune info: error: ")) == (code == 2), done.stderr
    module = subprocess.run([sys.executable, "-m", "loratune", "info", "--model", tiny_model_dir, *argv],
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == code and ("trainable params: " in module.stdout) == (code == 0)


def test_debug_is_a_yaml_key_too(tmp_path, capsys, tiny_model_dir, tiny_data) -> None:
    # DESIGN.md: every train option, --debug included, is a flag and a YAML key.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("debug: true\nmax_length: 32\nmax_steps: 1\nbatch_size: 8\nthreads: 1\n")
    argv = [sys.executable, "-m", "loratune", "train", "--model", tiny_model_dir, "--data", tiny_data,
            "--config", str(cfg), "--out", str(tmp_path / "run")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "INFO loratune.training.data: data" in done.stderr            # the debug level's messages
    cfg.write_text("debug: maybe\n")
    code, _, err = run(capsys, "train", "--config", str(cfg), "--out", str(tmp_path / "r2"))
    assert_one_line_error(code, err, "debug: expected true or false, got 'maybe'")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["max_steps"] == 1


@pytest.mark.parametrize("argv,fragment", [
    (["info", "--num-labels", "0"], "--num-labels: expected an integer >= 2, got 0"),
    (["info", "--num-labels", "-1"], "--num-labels: expected an integer >= 2, got -1"),
    (["predict", "--batch-size", "0", "a text"], "--batch-size: expected an integer >= 1, got 0"),
])
def test_counts_below_their_least_exit_2(argv, fragment, trained, capsys) -> None:
    # they passed silently: a head with no classes, a batch size acting as 1
    if argv[0] == "predict":
        argv = [argv[0], "--adapter", str(trained / "adapter"), *argv[1:]]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, fragment)
