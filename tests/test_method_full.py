"""``--method full``: every weight trains, the run writes ``model/`` (a transformers folder), and resume, eval,
predict and tune work as for an adapter; ``--split-seed`` cuts other splits and never touches ``--seed``."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_at_logged_step, synthetic_rows, write_csv
from safetensors.torch import load_file

from loratune.errors import InputError
from loratune.training.data import load_splits
from loratune.training.options import TrainConfig

CLI = [sys.executable, "-m", "loratune"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXTS = ["a great warm film", "dull and boring", "the plot is a mess", "wonderful acting and a fine story"]


@pytest.fixture
def cli_main():
    from loratune.cli.main import main

    return main


def _flags(model: str, data: str, **extra: object) -> list[str]:
    opts = {"model": model, "data": data, "method": "full", "epochs": 2, "batch_size": 8, "lr": 1e-3,
            "max_length": 32, "log_every": 5, "threads": 1, **extra}
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def full_ref(tmp_path_factory, tiny_model_dir) -> tuple[Path, str]:
    """An uninterrupted full fine-tuning run (2 epochs of 60 steps, a checkpoint every 10)."""
    tmp = tmp_path_factory.mktemp("full")
    data = write_csv(tmp / "d.csv", synthetic_rows(600, seed=3))
    out = subprocess.run(CLI + ["train", "--out", str(tmp / "ref"),
                                *_flags(tiny_model_dir, data, checkpoint_every=10)],
                         env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return tmp / "ref", data


def test_full_trains_every_weight_and_writes_a_model_folder(full_ref, tiny_model_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    ref, _ = full_ref
    res = json.loads((ref / "results.json").read_text())
    n = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
            .parameters())
    assert res["train"]["trainable_params"] == res["train"]["all_params"] == n
    assert (ref / "model" / "model.safetensors").is_file() and not (ref / "adapter").exists()
    assert res["train"]["adapter_bytes"] == (ref / "model" / "model.safetensors").stat().st_size
    assert "method: full" in (ref / "config.yaml").read_text()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).state_dict()
    tuned = load_file(str(ref / "model" / "model.safetensors"))
    moved = [k for k in tuned if k in base and not torch.equal(base[k], tuned[k])]
    assert any("encoder.layer.0.attention.self.query.weight" in k for k in moved)   # the encoder itself trained
    assert any("embeddings.word_embeddings" in k for k in moved)


def test_model_folder_loads_in_transformers_alone_with_loratunes_predictions(full_ref) -> None:
    from loratune.infer.inference import predict

    ref, _ = full_ref
    ours = [r["probabilities"] for r in predict(ref / "model", TEXTS, precision="fp32")]
    code = ("import json, sys, torch\n"
            "from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T\n"
            f"d = {str(ref / 'model')!r}; texts = {TEXTS!r}\n"
            "m, t = M.from_pretrained(d).eval(), T.from_pretrained(d)\n"
            "with torch.no_grad(): p = torch.softmax(m(**t(texts, padding=True, return_tensors='pt')).logits, -1)\n"
            "assert not any(k.startswith(('loratune', 'peft')) for k in sys.modules)\n"
            "print(json.dumps({'labels': m.config.id2label, 'p': p.tolist()}))\n")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    names = list(ours[0])
    assert list(theirs["labels"].values()) == names
    np.testing.assert_allclose(np.array([[row[n] for n in names] for row in ours]), np.array(theirs["p"]), atol=1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_full_resumes_after_sigkill_to_the_same_weights(seed, full_ref, tiny_model_dir, tmp_path) -> None:
    ref, data = full_ref
    run = tmp_path / "run"
    target = random.Random(seed).randrange(10, 110, 5)
    proc = subprocess.Popen(CLI + ["train", "--out", str(run), *_flags(tiny_model_dir, data, checkpoint_every=10)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_at_logged_step(proc, run, target)
    assert not (run / "results.json").exists(), f"the run finished before the kill at step {target}"
    out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max().item() <= 1e-6, k
    assert json.loads((run / "results.json").read_text())["test"] == json.loads((ref / "results.json").read_text())["test"]


def test_eval_and_predict_take_the_model_folder_and_merge_refuses_it(full_ref, cli_main, capsys, tmp_path) -> None:
    ref, _ = full_ref
    assert cli_main(["eval", "--adapter", str(ref / "model"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    test = json.loads((ref / "results.json").read_text())["test"]
    assert got["examples"] == 60 and got["accuracy"] == test["accuracy"]
    assert abs(got["loss"] - test["loss"]) < 1e-5
    assert cli_main(["predict", "--adapter", str(ref / "model"), "--json", TEXTS[0]]) == 0
    assert json.loads(capsys.readouterr().out.strip())["label"] in ("neg", "pos")
    assert cli_main(["merge", "--adapter", str(ref / "model"), "--out", str(tmp_path / "m")]) == 2
    assert "nothing to merge" in capsys.readouterr().err
    assert cli_main(["eval", "--adapter", str(ref / "model"), "--base", "x"]) == 2


@pytest.mark.parametrize("flag", [["--rank", "4"], ["--targets", "q"], ["--modules-to-save", "pooler"],
                                  ["--dropout", "0.2"]])
def test_lora_options_are_refused_with_full(flag, cli_main, capsys, tmp_path, tiny_model_dir, tiny_data) -> None:
    out = tmp_path / "r"
    argv = ["train", "--model", tiny_model_dir, "--data", tiny_data, "--method", "full", "--out", str(out), *flag]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "--method full" in err and not out.exists()


def test_a_stored_full_run_reads_back_whatever_the_lora_defaults_are_now(full_ref, tmp_path, cli_main,
                                                                          tiny_model_dir) -> None:
    """config.yaml of a full run holds the LoRA options at the defaults of its day; they may move since."""
    import shutil

    import yaml

    from loratune.training import rundir

    ref, _ = full_ref
    run = tmp_path / "old"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns(".lock"))
    doc = yaml.safe_load((run / "config.yaml").read_text())
    doc.update(rank=4, targets=["attention"], alpha=8.0, modules_to_save=["pooler"])     # "older defaults"
    (run / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    cfg, _ = rundir.read_config(run)
    assert cfg.method == "full" and cfg.rank == TrainConfig().rank
    assert cli_main(["eval", "--adapter", str(run / "model"), "--json"]) == 0
    assert cli_main(["eval", "--adapter", tiny_model_dir]) == 2                 # a base model folder: no adapter


def test_full_auto_lr_is_its_own() -> None:
    assert TrainConfig(method="full").lr == 5e-5 and TrainConfig().lr != 5e-5
    assert TrainConfig(method="full", lr=1e-4).lr == 1e-4
    assert TrainConfig(method="full").replace(method="lora").lr == TrainConfig().lr     # auto follows the method


def test_a_full_search_tunes_lr_and_tests_the_best_model(tmp_path, tiny_model_dir, tiny_data) -> None:
    from loratune.search.driver import tune

    r = tune(samples=2, max_epochs=1, out=tmp_path / "s", model=tiny_model_dir, data=tiny_data, method="full",
             batch_size=8, max_length=32, log_every=5)
    table = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert len(table) == 2 and table[0]["lr"] == 5e-5 and "rank" not in table[0]   # the default first; lr only
    assert 1e-5 <= table[1]["lr"] <= 2e-4
    assert (tmp_path / "s" / "best" / "model" / "model.safetensors").is_file()
    assert 0 <= r.best["test"]["accuracy"] <= 1
    with pytest.raises(InputError, match="--rank"):
        tune(space={"rank": {"choice": [2, 4]}}, samples=1, max_epochs=1, out=tmp_path / "s2", model=tiny_model_dir,
             data=tiny_data, method="full")


# --- --split-seed ------------------------------------------------------------------------------------------

def _cut(data: str, **kw: object) -> dict[str, list[str]]:
    s = load_splits(TrainConfig(data=data, **kw))
    return {name: list(getattr(s, name).texts) for name in ("train", "validation", "test")}


def test_split_seed_gives_disjoint_stratified_reproducible_splits(tmp_path) -> None:
    rows = [(f"text number {i}", "pos" if i % 4 else "neg") for i in range(400)]      # 300 pos / 100 neg
    data = write_csv(tmp_path / "d.csv", rows)
    label = dict(rows)
    cuts = {s: _cut(data, split_seed=s) for s in (0, 1, 2)}
    for s, cut in cuts.items():
        parts = [set(cut[n]) for n in ("train", "validation", "test")]
        assert sum(map(len, parts)) == 400 and len(set.union(*parts)) == 400            # disjoint, complete
        for name, n in (("validation", 40), ("test", 40), ("train", 320)):
            assert len(cut[name]) == n
            assert sum(label[t] == "neg" for t in cut[name]) == n // 4                  # stratified: 25% neg
        assert cut == _cut(data, split_seed=s)                                          # reproducible
        assert cut == _cut(data, split_seed=s, seed=123)                                # --seed does not move it
    assert len({tuple(c["validation"]) for c in cuts.values()}) == 3                    # seeds differ
    sub = {s: _cut(data, split_seed=s, sample_pct=0.5)["train"] for s in (0, 1)}
    assert len(sub[0]) == 160 and set(sub[0]) <= set(cuts[0]["train"]) and sub[0] != sub[1]


def test_split_seed_never_changes_the_training_seed(tiny_model_dir, tiny_data) -> None:
    from loratune.training.loop import build_model, prepare_data

    a = build_model(TrainConfig(model=tiny_model_dir, data=tiny_data, split_seed=0), ["neg", "pos"])[0]
    b = build_model(TrainConfig(model=tiny_model_dir, data=tiny_data, split_seed=7), ["neg", "pos"])[0]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)                                    # same init, head and A
    pa = prepare_data(TrainConfig(model=tiny_model_dir, data=tiny_data, max_length=32, split_seed=0))
    pb = prepare_data(TrainConfig(model=tiny_model_dir, data=tiny_data, max_length=32, split_seed=7))
    assert not np.array_equal(pa.validation.labels, pb.validation.labels) or \
        not all(np.array_equal(x, y) for x, y in zip(pa.validation.input_ids, pb.validation.input_ids))


def test_split_seed_is_refused_where_nothing_is_cut(tmp_path, tiny_data) -> None:
    with pytest.raises(InputError, match="--split-seed"):
        TrainConfig(split_seed=1, validation_file=tiny_data, test_file=tiny_data)
    TrainConfig(split_seed=1, validation_file=tiny_data)                               # test is still cut
    TrainConfig(split_seed=1, validation_file=tiny_data, test_file=tiny_data, sample_pct=0.5)  # seeds the subsample
    data = _dataset_with_splits(tmp_path)
    load_splits(TrainConfig(data=data))
    with pytest.raises(InputError, match="--split-seed: .* has its own validation and test splits"):
        load_splits(TrainConfig(data=data, split_seed=1))


def _dataset_with_splits(tmp_path: Path) -> str:
    """A ``save_to_disk`` folder with its own train / validation / test splits."""
    import datasets

    rows = synthetic_rows(60, seed=1)
    ds = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]})
    out = tmp_path / "hf"
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(10)), "test": ds.select(range(10, 20))}
                         ).save_to_disk(str(out))
    return str(out)
