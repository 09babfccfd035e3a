"""Every bad input a user can give, through the CLI: exit 2, one line naming the field or file, no
traceback, and no output that looks complete. Each case says its kind; the matrix covers every
command and at least eight kinds, with numeric ranges a minority."""

from __future__ import annotations

import json
import shutil
import struct
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest
from conftest import synthetic_rows, write_csv

from loratune.cli.main import main

FAST = ["--epochs", "1", "--batch-size", "8", "--max-length", "32", "--rank", "4", "--threads", "1"]
Case = tuple[str, str, Callable[[Path, dict], list[str]], str]    # (kind, name, argv builder, message fragment)


def _train(*extra: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, ctx: ["train", "--model", ctx["model"], "--data", ctx["data"], "--out", str(tmp / "out"),
                             *FAST, *[x.format(tmp=tmp, **ctx) for x in extra]]


def _file(name: str, content: bytes) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, ctx: dict) -> list[str]:
        (tmp / name).write_bytes(content)
        return _train("--data", str(tmp / name))(tmp, ctx)
    return build


def _adapter(cmd: str, mutate: Callable[[Path], None], *extra: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, ctx: dict) -> list[str]:
        adapter = tmp / "adapter"
        shutil.copytree(ctx["adapter"], adapter)
        mutate(adapter)
        argv = {"eval": ["eval", "--adapter", str(adapter), "--data", ctx["data"]],
                "analyze": ["analyze", ctx["adapter"], "--compare", str(adapter)],
                "predict": ["predict", "--adapter", str(adapter), "a fine film"],
                "merge": ["merge", "--adapter", str(adapter), "--out", str(tmp / "merged")]}[cmd]
        return argv + [x.format(tmp=tmp, **ctx) for x in extra]
    return build


def _tune(space_yaml: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, ctx: dict) -> list[str]:
        (tmp / "space.yaml").write_text(space_yaml)
        return ["tune", "--config", str(tmp / "space.yaml"), "--model", ctx["model"], "--data", ctx["data"],
                "--out", str(tmp / "out"), "--max-length", "32"]
    return build


def _edit_config(**changes) -> Callable[[Path], None]:
    def mutate(adapter: Path) -> None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg.update(changes)
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    return mutate


def _parquet_truncated(tmp: Path, ctx: dict) -> list[str]:
    import pandas as pd

    pd.DataFrame(synthetic_rows(50), columns=["text", "label"]).to_parquet(tmp / "d.parquet")
    data = (tmp / "d.parquet").read_bytes()
    (tmp / "d.parquet").write_bytes(data[: len(data) // 2])
    return _train("--data", str(tmp / "d.parquet"))(tmp, ctx)


def _csv(name: str, rows, header=("text", "label")) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, ctx: dict) -> list[str]:
        write_csv(tmp / name, rows, header=header)
        return _train("--data", str(tmp / name))(tmp, ctx)
    return build


def _val_file(rows) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, ctx: dict) -> list[str]:
        write_csv(tmp / "val.csv", rows)
        return _train("--validation-file", str(tmp / "val.csv"))(tmp, ctx)
    return build


def _yaml(text: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, ctx: dict) -> list[str]:
        (tmp / "c.yaml").write_text(text)
        return _train("--config", str(tmp / "c.yaml"))(tmp, ctx)
    return build


def _nonempty_out(cmd: str) -> Callable[[Path, dict], list[str]]:
    def build(tmp: Path, ctx: dict) -> list[str]:
        (tmp / "out").mkdir()
        (tmp / "out" / "keep.txt").write_text("mine")
        if cmd == "train":
            return _train()(tmp, ctx)
        return ["merge", "--adapter", ctx["adapter"], "--out", str(tmp / "out")]
    return build


def _broken_model_folder(tmp: Path, ctx: dict) -> list[str]:
    shutil.copytree(ctx["model"], tmp / "m")
    weights = next((tmp / "m").glob("*.safetensors"))
    weights.write_bytes(struct.pack("<Q", 10**9) + b"{")
    return _train("--model", str(tmp / "m"))(tmp, ctx)


ROWS = synthetic_rows(60)
CASES: list[Case] = [
    # files
    ("file", "missing data file", _train("--data", "{tmp}/nope.csv"), "nope.csv does not exist"),
    ("file", "empty file", _file("e.csv", b""), "empty"),
    ("file", "folder instead of a file", _train("--validation-file", "{tmp}"), "is a folder"),
    ("file", "bytes that are not UTF-8", _file("l.csv", b"text,label\ngood film,pos\ncaf\xe9,neg\n"), "line 3 is not UTF-8"),
    ("file", "wrong delimiter", _file("p.csv", b"text|label\ngood film|pos\nbad film|neg\n"), "not comma-separated"),
    ("file", "truncated parquet", _parquet_truncated, "not a valid Parquet file"),
    ("file", "unsupported file type", _file("d.xlsx", b"PK\x03\x04"), "unsupported file type"),
    ("file", "JSONL line that is not JSON", _file("d.jsonl", b'{"text": "a", "label": "x"}\n{oops\n'), "line 2 is not valid JSON"),
    ("file", "CSV row with too many fields", _file("r.csv", b"text,label\ngood,pos\nbad,neg,extra\n"), "line 3 has 3 fields"),
    # columns and labels
    ("columns", "missing text column", _csv("c.csv", ROWS, header=("review", "label")), "no column 'text'"),
    ("columns", "missing label column", _train("--label-column", "sentiment"), "no column 'sentiment'"),
    ("labels", "a single class", _csv("one.csv", [(t, "pos") for t, _ in ROWS]), "single class"),
    ("labels", "validation labels unseen in training", _val_file([("good film", "meh")] * 4), "meh"),
    ("labels", "empty text", _csv("b.csv", ROWS[:20] + [("   ", "pos")] + ROWS[20:]), "empty text"),
    ("labels", "null label in JSONL", _file("n.jsonl", b'{"text": "good", "label": "pos"}\n{"text": "bad", "label": null}\n'), "label is empty"),
    ("labels", "too few rows to split", _csv("few.csv", ROWS[:3]), "too few"),
    # numeric ranges
    ("range", "lr <= 0", _train("--lr", "0"), "--lr"),
    ("range", "epochs <= 0", _train("--epochs", "0"), "--epochs"),
    ("range", "batch size <= 0", _train("--batch-size", "0"), "--batch-size"),
    ("range", "rank 0", _train("--rank", "0"), "--rank"),
    ("range", "dropout 1", _train("--dropout", "1"), "--dropout"),
    ("range", "sample pct 0", _train("--sample-pct", "0"), "--sample-pct"),
    ("range", "warmup 1", _train("--warmup", "1.0"), "--warmup"),
    ("range", "rank larger than the matrix", _train("--rank", "64"), "larger than min(d, k)"),
    # choices, targets and output folders
    ("choice", "fp16 on a CPU", _train("--precision", "fp16", "--device", "cpu"), "--precision"),
    ("choice", "eval --precision that does not exist", lambda tmp, ctx: ["eval", "--adapter", ctx["adapter"], "--precision", "fp8"], "--precision: expected one of"),
    ("choice", "cuda without a GPU", _train("--device", "cuda"), "--device"),
    ("choice", "unknown target", _train("--targets", "q_proj"), "target 'q_proj' matches no linear layer"),
    ("choice", "bad target regex", _train("--targets", "re:(("), "bad regex"),
    ("choice", "layers out of range", _train("--layers", "9"), "--layers"),
    ("output", "existing non-empty --out", _nonempty_out("train"), "--resume"),
    ("output", "--resume with nothing to resume", _train("--resume"), "nothing to resume"),
    ("output", "merge into a non-empty --out", _nonempty_out("merge"), "--overwrite"),
    # config files
    ("config", "missing --config file", _train("--config", "{tmp}/none.yaml"), "--config"),
    ("config", "YAML that is not a mapping", _yaml("- rank\n- 4\n"), "mapping"),
    ("config", "invalid YAML", _yaml("rank: [4\n"), "not valid YAML"),
    ("config", "unknown option in YAML", _yaml("rnak: 4\n"), "unknown training option 'rnak'"),
    ("config", "wrong type in YAML", _yaml("lr: fast\n"), "--lr: expected a number"),
    # adapter folders
    ("adapter", "missing adapter folder", lambda tmp, ctx: ["eval", "--adapter", str(tmp / "none")], "does not exist"),
    ("adapter", "missing weights file", _adapter("predict", lambda a: (a / "adapter_model.safetensors").unlink()), "adapter_model.safetensors: missing"),
    ("adapter", "corrupted safetensors", _adapter("eval", lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")), "not a valid safetensors file"),
    ("adapter", "adapter of another base model", _adapter("eval", lambda a: None, "--base", "{other}"), "another base model"),
    ("adapter", "unknown config field", _adapter("merge", _edit_config(frobnicate=3)), "unknown field 'frobnicate'"),
    ("adapter", "wrong type in config", _adapter("predict", _edit_config(r="8")), "'r' has the wrong type"),
    ("adapter", "unsupported peft type", _adapter("eval", _edit_config(peft_type="IA3")), "peft_type 'IA3'"),
    ("adapter", "unsupported peft feature", _adapter("eval", _edit_config(lora_bias=True)), "lora_bias"),
    ("adapter", "link out of the folder", _adapter("eval", lambda a: ((a / "loratune.json").unlink(), (a / "loratune.json").symlink_to("/etc/hostname"))), "leads out of the adapter folder"),
    ("adapter", "bad label names", _adapter("predict", lambda a: (a / "loratune.json").write_text('{"id2label": ["x"]}')), "id2label"),
    # model folders
    ("model", "unknown model name", _train("--model", "no-such-model-xyz"), "no-such-model-xyz"),
    ("model", "model folder without config.json", _train("--model", "{tmp}"), "config.json"),
    ("model", "a file given as model", _train("--model", "{data}"), "is a file"),
    ("model", "model folder with corrupt weights", _broken_model_folder, "--model"),
    ("model", "info on an unknown model", lambda tmp, ctx: ["info", "--model", "no-such-model-xyz"], "no-such-model-xyz"),
    # predict input
    ("input", "predict --file missing", lambda tmp, ctx: ["predict", "--adapter", ctx["adapter"], "--file", str(tmp / "x.txt")], "does not exist"),
    ("input", "predict --file is a folder", lambda tmp, ctx: ["predict", "--adapter", ctx["adapter"], "--file", str(tmp)], "is a folder"),
    ("input", "texts and --file together", lambda tmp, ctx: ["predict", "--adapter", ctx["adapter"], "hi", "--file", str(tmp)], "not both"),
    # search spaces (tune): rejected before Ray starts
    ("space", "unknown distribution", _tune("search:\n  lr: {normal: [0, 1]}\n"), "search.lr"),
    ("space", "lower > upper", _tune("search:\n  lr: {loguniform: [0.1, 0.001]}\n"), "search.lr"),
    ("space", "an empty choice", _tune("search:\n  rank: {choice: []}\n"), "search.rank"),
    ("space", "unknown hyperparameter", _tune("search:\n  rnak: {choice: [2, 4]}\n"), "search.rnak"),
    ("space", "rank larger than a target matrix", _tune("search:\n  rank: {choice: [4, 64]}\n"), "64"),
    ("space", "tie to an unknown option", _tune("search:\n  alpha: \"=rnak\"\n"), "search.alpha"),
    ("space", "auto among searched values", _tune("search:\n  lr: {choice: [auto, 0.001]}\n"), "search.lr: auto is not a value to search"),
    ("range", "tune --samples 0", _tune("samples: 0\n"), "--samples"),
    ("range", "tune --rungs-per-epoch 0", _tune("rungs_per_epoch: 0\n"), "--rungs-per-epoch"),
    ("space", "evals_per_epoch searched", _tune("search:\n  evals_per_epoch: {choice: [1, 2]}\n"), "--rungs-per-epoch"),
    ("input", "tune --evals-per-epoch (the rungs decide)", lambda tmp, ctx: _tune("")(tmp, ctx) + ["--evals-per-epoch", "2"], "set --rungs-per-epoch"),
    ("range", "train --evals-per-epoch beyond an epoch's steps", _train("--evals-per-epoch", "1000"), "--evals-per-epoch: 1000"),
    ("output", "tune --resume on a folder that holds no search", lambda tmp, ctx: ["tune", "--resume", str(tmp)], "no search"),
    # report and analyze
    ("output", "report on a missing folder", lambda tmp, ctx: ["report", str(tmp / "nope")], "does not exist"),
    ("output", "report on a folder that is no run", lambda tmp, ctx: ["report", str(tmp)], "not a run directory"),
    ("adapter", "analyze a missing adapter", lambda tmp, ctx: ["analyze", str(tmp / "nope")], "does not exist"),
    ("adapter", "analyze --compare with a corrupt adapter", _adapter("analyze", lambda a: (a / "adapter_model.safetensors").write_bytes(b"xx")), "not a valid safetensors file"),
    ("model", "analyze --base that does not exist", lambda tmp, ctx: ["analyze", ctx["adapter"], "--base", str(tmp / "none")], "does not exist"),
    ("adapter", "generate with a classification adapter", lambda tmp, ctx: ["generate", "--adapter", ctx["adapter"], "hi"], "use `loratune predict`"),
    ("adapter", "generate a missing adapter", lambda tmp, ctx: ["generate", "--adapter", str(tmp / "nope"), "hi"], "does not exist"),
    ("range", "generate --max-new-tokens 0", lambda tmp, ctx: ["generate", "--adapter", ctx["adapter"], "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    ("input", "serve an adapter given without a name", lambda tmp, ctx: ["serve", "--adapter", ctx["adapter"], "--port", "0"], "expected NAME=DIR"),
    ("adapter", "serve a missing adapter", lambda tmp, ctx: ["serve", "--adapter", f"a={tmp / 'nope'}", "--port", "0"], "does not exist"),
    ("input", "serve --merge with two adapters", lambda tmp, ctx: ["serve", "--merge", "--adapter", f"a={ctx['adapter']}", "--adapter", f"b={ctx['adapter']}", "--port", "0"], "--merge"),
    ("input", "serve --replicas without --ray", lambda tmp, ctx: ["serve", "--adapter", f"a={ctx['adapter']}", "--replicas", "2", "--port", "0"], "--replicas: only with --ray"),
    ("input", "serve --address without --ray", lambda tmp, ctx: ["serve", "--adapter", f"a={ctx['adapter']}", "--address", "10.0.0.1:6379", "--port", "0"], "--address: only with --ray"),
    ("range", "serve --ray --replicas 0", lambda tmp, ctx: ["serve", "--ray", "--replicas", "0", "--adapter", f"a={ctx['adapter']}", "--port", "0"], "--replicas: must be at least 1"),
    ("input", "serve --ray --address that is no HOST:PORT", lambda tmp, ctx: ["serve", "--ray", "--address", "head-node", "--adapter", f"a={ctx['adapter']}", "--port", "8000"], "--address: expected HOST:PORT"),
    ("input", "serve --ray with more replicas than CPUs", lambda tmp, ctx: ["serve", "--ray", "--replicas", "4096", "--adapter", f"a={ctx['adapter']}", "--port", "0"], "CPUs"),
    ("adapter", "serve --ray a missing adapter", lambda tmp, ctx: ["serve", "--ray", "--adapter", f"a={tmp / 'nope'}", "--port", "0"], "does not exist"),
    ("input", "eval on a split that is not there", lambda tmp, ctx: ["eval", "--adapter", ctx["adapter"], "--data", str(tmp / "none.csv")], "does not exist"),
]


def test_every_command_has_bad_input_cases(tmp_path, tiny_model_dir, tiny_data, finished_run,
                                           other_model_dir) -> None:
    """The matrix covers every command the CLI has (read from its parser, so a new command without cases
    fails here) and at least eight kinds of bad input, numeric ranges a minority."""
    from loratune.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    ctx = {"model": tiny_model_dir, "data": tiny_data, "adapter": str(finished_run / "adapter"), "other": other_model_dir}
    covered = Counter()
    for i, (_, _, builder, _) in enumerate(CASES):
        (tmp_path / str(i)).mkdir()
        covered[builder(tmp_path / str(i), ctx)[0]] += 1
    assert set(sub.choices) - set(covered) == set(), f"commands without a bad-input case: {set(sub.choices) - set(covered)}"
    kinds = Counter(kind for kind, *_ in CASES)
    assert len(kinds) >= 8 and kinds["range"] <= len(CASES) / 4, kinds


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time (links not followed)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("kind,name,builder,fragment", CASES, ids=[c[1] for c in CASES])
def test_bad_input(kind, name, builder, fragment, tmp_path, capsys, tiny_model_dir, tiny_data, finished_run,
                   other_model_dir) -> None:
    ctx = {"model": tiny_model_dir, "data": tiny_data, "adapter": str(finished_run / "adapter"), "other": other_model_dir}
    argv = builder(tmp_path, ctx)
    before = _snapshot(tmp_path)
    code = main(argv)
    _, err = capsys.readouterr()
    lines = [x for x in err.strip().splitlines() if x]
    assert code == 2, f"{name}: exit {code}\n{err}"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert _snapshot(tmp_path) == before, f"{name}: a refused command wrote files"     # nothing that looks done


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny model's tokenizer on a wider encoder: an adapter of the tiny model does not fit it."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("wider")
    for f in Path(tiny_model_dir).iterdir():
        if "token" in f.name or f.name.endswith(".txt"):
            shutil.copy(f, folder / f.name)
    cfg = tf.BertConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    tf.BertModel(cfg).save_pretrained(str(folder))
    return str(folder)
