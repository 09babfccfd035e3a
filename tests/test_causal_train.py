"""Causal-LM training end to end on tiny random Llama (ChatML template) and GPT-2 (no template) models: the task
``auto`` picks, the three data formats, the baseline, choice scoring against a hand computation, gradient
accumulation, SIGKILL + resume, and one-line errors for bad input. One slow test trains the real SmolLM2."""

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
from conftest import kill_at_logged_step
from safetensors.torch import load_file
from test_causal_data import _bpe, chat_tokenizer

from loratune.errors import InputError
from loratune.training.options import TrainConfig

CLI = [sys.executable, "-m", "loratune"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
GOOD, BAD = ["good", "great", "fine", "lovely"], ["bad", "awful", "poor", "dull"]


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt -> "positive" / "negative" rows a tiny model learns in a few steps."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        good = rng.random() < 0.5
        word = rng.choice(GOOD if good else BAD)
        out.append({"prompt": f"the film is {word} and {rng.choice(GOOD + BAD)}",
                    "completion": "positive" if good else "negative"})
    return out


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         initializer_range=0.2, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    out = tmp_path_factory.mktemp("llama") / "base"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>"]), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                       eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    out = tmp_path_factory.mktemp("gpt2") / "base"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("causal-data") / "train.jsonl", rows(120))


def opts(model: str, data: str, **extra) -> dict:
    """A tiny run's options; fp32, so that the numbers pinned here (against fp32 evaluations, between batch
    layouts) are the same on CPUs with native bf16, where ``--precision auto`` would train in bf16."""
    return {"model": model, "data": data, "batch_size": 8, "max_length": 64, "lr": 3e-2, "targets": "all-linear",
            "dropout": 0.0, "log_every": 2, "threads": 1, "precision": "fp32", **extra}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, llama_dir, data) -> Path:
    from loratune.training.loop import train

    out = tmp_path_factory.mktemp("llama-run") / "run"
    train(TrainConfig(**opts(llama_dir, data, epochs=3)), out=out)
    return out


# --------------------------------------------------------------------------- options and data

def test_task_auto_reads_the_data_s_columns_then_the_model(tmp_path, llama_dir, data, tiny_model_dir) -> None:
    csv = tmp_path / "c.csv"
    csv.write_text("text,label\nnice,pos\n", encoding="utf-8")
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "input": "", "output": "y"}])
    chat = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    assert TrainConfig(data=data).task == "causal-lm"
    assert TrainConfig(data=data).model == "smollm2-135m"                    # the causal-LM default model
    assert TrainConfig(data=alpaca).task == TrainConfig(data=chat).task == "causal-lm"
    assert TrainConfig(data=str(csv), model=llama_dir).task == "classification"    # the data decides first
    assert TrainConfig(data="rotten-tomatoes-4k-instruct").task == "causal-lm"
    assert TrainConfig(data="no-such-dataset", model=llama_dir).task == "causal-lm"   # then the model
    assert TrainConfig(data="no-such-dataset", model=tiny_model_dir).task == "classification"
    cfg = TrainConfig(data=data)
    assert (cfg.lr, cfg.epochs, cfg.max_length) == (5e-4, 1, 512)
    assert cfg.to_dict()["task"] == "causal-lm" and TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="--class-weights: a classification option, but this run's task is causal-lm"):
        TrainConfig(data=data, class_weights="balanced")
    with pytest.raises(InputError, match="--system-prompt: a causal-lm option, but this run's task is classification"):
        TrainConfig(system_prompt="be brief")
    with pytest.raises(InputError, match="--method full: full fine-tuning of a causal LM is not supported"):
        TrainConfig(data=data, method="full")


def test_the_three_formats_give_the_same_tokens(tmp_path, llama_dir) -> None:
    """prompt-completion, messages and Alpaca rows of the same conversations train on the same tokens and labels."""
    from loratune.training.loop import prepare_data

    base = rows(40, seed=5)
    files = {"pc": write_jsonl(tmp_path / "pc.jsonl", base),
             "msg": write_jsonl(tmp_path / "msg.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                                        {"role": "assistant", "content": r["completion"]}]}
                                                          for r in base]),
             "alpaca": write_jsonl(tmp_path / "al.jsonl", [{"instruction": r["prompt"], "input": "",
                                                             "output": r["completion"]} for r in base])}
    prepared = {k: prepare_data(TrainConfig(**opts(llama_dir, f))) for k, f in files.items()}
    ref = prepared["pc"]
    assert ref.label_names == ["negative", "positive"] and len(ref.train) == 32
    for p in prepared.values():
        for a, b in zip(p.train.input_ids + p.validation.enc.input_ids, ref.train.input_ids + ref.validation.enc.input_ids):
            assert np.array_equal(a, b)
        for a, b in zip(p.train.labels, ref.train.labels):
            assert np.array_equal(a, b)
    tok = chat_tokenizer()
    first = ref.train.input_ids[0]
    trained = ref.train.labels[0] != -100
    assert tok.decode(first[trained]) == base[0]["completion"] + "<|im_end|>" or \
        tok.decode(first[trained]) in ("positive<|im_end|>", "negative<|im_end|>")


def test_the_built_in_instruct_data_has_the_classifier_s_sentences_in_each_split() -> None:
    from loratune.training.causal_data import INSTRUCT_PROMPT, load_causal_splits
    from loratune.training.data import load_splits

    for seed in (0, 1):
        cls = load_splits(TrainConfig(split_seed=seed))
        inst = load_causal_splits(TrainConfig(data="rotten-tomatoes-4k-instruct", split_seed=seed))
        assert inst.choices == cls.label_names == ["negative", "positive"]
        for name in ("train", "validation", "test"):
            split, convs = getattr(cls, name), getattr(inst, name)
            assert [c[0]["content"] for c in convs] == [INSTRUCT_PROMPT.format(text=t) for t in split.texts]
            assert [c[1]["content"] for c in convs] == [cls.label_names[k] for k in split.labels]


# --------------------------------------------------------------------------- training

def test_a_run_writes_the_baseline_metrics_and_a_causal_adapter(llama_run, llama_dir) -> None:
    from loratune.tasks.causal_eval import evaluate_causal
    from loratune.training.loop import prepare_data
    from loratune.training.models import load_causal_lm, load_tokenizer

    res = json.loads((llama_run / "results.json").read_text())
    keys = {"loss", "perplexity", "accuracy", "exact_match"}
    assert set(res["validation"]) == set(res["test"]) == keys
    assert set(res["baseline"]) == {"validation", "test"} and set(res["baseline"]["test"]) == keys
    lines = [json.loads(x) for x in (llama_run / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if x["type"] == "eval"]
    assert [(e["epoch"], e["split"]) for e in evals] == [(0, "validation"), (0, "test"), (1, "validation"),
                                                          (2, "validation"), (3, "validation")]
    assert {k: evals[1][k] for k in keys} == res["baseline"]["test"]
    # The baseline is the base model itself, evaluated the same way.
    from loratune.training import rundir

    cfg, _ = rundir.read_config(llama_run)
    data = prepare_data(cfg)
    base, _ = evaluate_causal(load_causal_lm(llama_dir), load_tokenizer(llama_dir), data.validation,
                              torch.device("cpu"), "fp32", data.pad_id)
    for k in keys:
        assert base[k] == pytest.approx(res["baseline"]["validation"][k], rel=1e-6, abs=1e-9)
    # Training learned the answers: the completion loss fell far below the base model's.
    assert res["validation"]["loss"] < 0.5 * res["baseline"]["validation"]["loss"]
    assert res["train"]["truncated_rows"] == 0
    cfg_json = json.loads((llama_run / "adapter" / "adapter_config.json").read_text())
    meta = json.loads((llama_run / "adapter" / "loratune.json").read_text())
    assert cfg_json["task_type"] == "CAUSAL_LM" and meta["task"] == "causal-lm"
    assert meta["id2label"] == ["negative", "positive"] and meta["system_prompt"] is None


def test_choice_accuracy_and_loss_equal_a_hand_computation(llama_dir) -> None:
    """Candidates scored by summing each token's log-softmax of full-vocabulary logits, one sequence at a time."""
    from loratune.tasks.causal import encode_conversation
    from loratune.tasks.causal_eval import evaluate_causal, prepare_split
    from loratune.training.models import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(llama_dir), load_tokenizer(llama_dir)
    torch.manual_seed(3)
    with torch.no_grad():                               # a model whose choices are not all the same
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
             for r in rows(12, seed=9)]
    cands = ["negative", "positive", "fine"]
    split = prepare_split(convs, tok, 64, [f"row {i}" for i in range(len(convs))], cands)
    metrics, gens = evaluate_causal(model, tok, split, torch.device("cpu"), "fp32", tok.pad_token_id, batch_size=5)

    def score(conv: list, answer: str) -> tuple[float, int]:
        ids, labels, _ = encode_conversation(conv[:-1] + [{"role": "assistant", "content": answer}], tok, 64)
        logits = model(input_ids=torch.as_tensor(ids[None], dtype=torch.long)).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        pos = np.flatnonzero(labels != -100)
        return float(sum(logp[t - 1, labels[t]] for t in pos)), len(pos)

    with torch.no_grad():
        scores = np.array([[score(c, a)[0] for a in cands] for c in convs])
        gold = [score(c, c[-1]["content"]) for c in convs]
    truth = np.array([cands.index(c[-1]["content"]) for c in convs])
    assert metrics["accuracy"] == pytest.approx(float(np.mean(scores.argmax(1) == truth)))
    assert metrics["loss"] == pytest.approx(-sum(s for s, _ in gold) / sum(n for _, n in gold), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]), rel=1e-9)
    refs = [c[-1]["content"].lower() for c in convs]
    assert metrics["exact_match"] == pytest.approx(np.mean([g.strip().lower() == r for g, r in zip(gens, refs)]))


def test_gradient_accumulation_equals_one_big_batch(tmp_path, llama_dir, data) -> None:
    """Token-weighted: two micro-batches of 4 give the adapter one batch of 8 gives (no dropout, fp32)."""
    from loratune.training.loop import train

    outs = []
    for bs, acc in ((8, 1), (4, 2)):
        out = tmp_path / f"b{bs}"
        train(TrainConfig(**opts(llama_dir, data, batch_size=bs, grad_accum=acc, max_steps=3, bucket=False,
                                 epochs=1)), out=out, evaluate_test=False)
        outs.append(load_file(str(out / "adapter" / "adapter_model.safetensors")))
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-5, atol=1e-6)


def test_gpt2_without_a_template_trains_on_prompt_completion(tmp_path, gpt2_dir, data) -> None:
    from loratune.training.loop import train

    res = train(TrainConfig(**opts(gpt2_dir, data, epochs=1, targets="q,v")), out=tmp_path / "run")
    full = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res.validation["loss"] < full["baseline"]["validation"]["loss"]
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] == ["c_attn"]


def test_sigkill_and_resume_end_on_the_uninterrupted_adapter(tmp_path, llama_dir, data) -> None:
    flags = [x for k, v in opts(llama_dir, data, epochs=2, checkpoint_every=3, dropout=0.1, batch_size=12).items()
             for x in (f"--{k.replace('_', '-')}", str(v))]
    ref = subprocess.run(CLI + ["train", "--out", str(tmp_path / "ref"), *flags], env=ENV, capture_output=True,
                         text=True)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(CLI + ["train", "--out", str(run), *flags], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_at_logged_step(proc, run, 12)
    assert not (run / "results.json").exists(), "the run finished before the kill"
    out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (tmp_path / "ref", run))
    assert ra["test"] == rb["test"] and ra["baseline"] == rb["baseline"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for x in lines if x["type"] == "eval" and x["epoch"] == 0) == 2     # the baseline logged once


# --------------------------------------------------------------------------- bad input

@pytest.fixture
def cli(capsys):
    from loratune.cli.main import main

    def call(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        return code, capsys.readouterr().err

    return call


def _one_line(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and fragment in lines[0], err


def test_bad_causal_input_is_one_line(cli, tmp_path, llama_dir, gpt2_dir, tiny_model_dir, data) -> None:
    out = str(tmp_path / "out")
    common = ("--threads", "1", "--out", out, "--overwrite")
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "x", "answer": "y"}] * 30)
    _one_line(*cli("train", "--model", llama_dir, "--data", qa, "--task", "causal-lm", *common),
              "no known conversation format in columns ['question', 'answer']")
    code, err = cli("train", "--model", llama_dir, "--data", qa, "--task", "causal-lm", "--prompt-column", "question",
                    "--completion-column", "answer", "--epochs", "1", "--max-steps", "1", "--batch-size", "8", *common)
    assert code == 0, err                                                   # renamed columns: it trains
    empty = write_jsonl(tmp_path / "e.jsonl", rows(30)[:7] + [{"prompt": "x", "completion": "  "}] + rows(30))
    _one_line(*cli("train", "--model", llama_dir, "--data", empty, *common), "line 8: column 'completion' is empty")
    chat = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "x"},
                                                            {"role": "assistant", "content": "y"}]}] * 30)
    _one_line(*cli("train", "--model", gpt2_dir, "--data", chat, *common),
              "has messages rows, but the tokenizer of")
    _one_line(*cli("train", "--model", tiny_model_dir, "--data", data, "--task", "causal-lm", *common),
              "is not a causal LM")
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    code, err = cli("train", "--model", str(bad), "--data", data, *common)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "x.gguf" in err, err
    _one_line(*cli("train", "--model", llama_dir, "--data", data, "--label-column", "y", *common),
              "--label-column: a classification option, but this run's task is causal-lm")


# --------------------------------------------------------------------------- the real model

@pytest.mark.slow
def test_the_real_smollm2_learns_in_a_few_steps(tmp_path) -> None:
    """The built-in LLM (converted from its GGUF by `make data`), a few LoRA steps on built-in instruct rows:
    the validation loss falls below the base model's."""
    from loratune.training.causal_data import load_causal_splits
    from loratune.training.loop import train

    splits = load_causal_splits(TrainConfig(data="rotten-tomatoes-4k-instruct"))

    def as_rows(convs: list, n: int) -> list[dict]:
        return [{"prompt": c[0]["content"], "completion": c[1]["content"]} for c in convs[::len(convs) // n][:n]]

    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", as_rows(getattr(splits, name), n))
             for name, n in (("train", 48), ("validation", 16), ("test", 16))}
    res = train(TrainConfig(data=files["train"], validation_file=files["validation"], test_file=files["test"],
                            max_steps=3, batch_size=16, lr=2e-3), out=tmp_path / "run")
    full = json.loads((tmp_path / "run" / "results.json").read_text())
    assert full["baseline"]["validation"]["loss"] > 0.3                    # the base model is unsure
    assert res.validation["loss"] < 0.8 * full["baseline"]["validation"]["loss"]
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"] == "smollm2-135m"


# --------------------------------------------------------------------------- review fixes

def test_a_completion_longer_than_max_length_is_a_miss_not_a_crash(llama_dir) -> None:
    """Cut to --max-length, such a row keeps the start of its completion and no prompt: nothing to generate from."""
    from loratune.tasks.causal_eval import evaluate_causal, prepare_split
    from loratune.training.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(llama_dir)
    convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
             for r in rows(4, seed=2)]
    convs.append([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good " * 60}])
    split = prepare_split(convs, tok, 48, [f"row {i}" for i in range(len(convs))])
    assert len(split.prompts()[-1]) == 0 and split.enc.truncated >= 1 and len(split.prompts()[0])
    metrics, gens = evaluate_causal(load_causal_lm(llama_dir), tok, split, torch.device("cpu"), "fp32",
                                    tok.pad_token_id)
    assert gens[-1] == "" and 0.0 <= metrics["exact_match"] <= 0.8 and np.isfinite(metrics["loss"])


def test_candidates_are_scored_as_written(tmp_path, llama_dir) -> None:
    """" positive" (a leading space, the usual completion style for base models) is its own candidate."""
    from loratune.training.loop import prepare_data

    spaced = [{"prompt": r["prompt"], "completion": " " + r["completion"]} for r in rows(60, seed=4)]
    data = prepare_data(TrainConfig(**opts(llama_dir, write_jsonl(tmp_path / "s.jsonl", spaced))))
    assert data.label_names == [" negative", " positive"] and (data.validation.gold >= 0).all()


def test_stored_configs_without_a_task_are_classifiers_and_folders_show_their_columns(tmp_path, llama_dir) -> None:
    from loratune.training.detect import detect_task, peek_columns

    assert TrainConfig.from_stored({"model": llama_dir, "data": "some/hub-dataset"}).task == "classification"
    folder = tmp_path / "ds"
    (folder / "train").mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    (folder / "train" / "dataset_info.json").write_text(json.dumps(
        {"features": {"prompt": {"dtype": "string"}, "completion": {"dtype": "string"}}}))
    assert peek_columns(str(folder)) == ("prompt", "completion")
    assert detect_task(TrainConfig(data=str(folder), task="classification")) == "causal-lm"
    with pytest.raises(InputError, match="rotten-tomatoes-4k is text/label data for classification"):
        from loratune.training.causal_data import load_causal_splits

        load_causal_splits(TrainConfig(task="causal-lm", model=llama_dir))


def test_a_save_to_disk_folder_of_conversations_trains(tmp_path, llama_dir) -> None:
    """A Hugging Face ``save_to_disk`` folder with its own splits: the task is read from its features."""
    import datasets

    from loratune.training.loop import prepare_data

    ds = datasets.DatasetDict({name: datasets.Dataset.from_list(rows(n, seed=k)) for k, (name, n) in
                               enumerate((("train", 40), ("validation", 10), ("test", 10)))})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = TrainConfig(**{**opts(llama_dir, str(tmp_path / "ds")), "model": "auto"}, )
    assert cfg.task == "causal-lm" and cfg.model == "smollm2-135m"
    data = prepare_data(cfg.replace(model=llama_dir))
    assert (len(data.train), len(data.validation), len(data.test)) == (40, 10, 10)
    assert data.label_names == ["negative", "positive"]
