"""Shared fixtures: tiny random-init models of each architecture family (seconds, CPU)."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
logging.getLogger("transformers").setLevel(logging.ERROR)


_SESSION: list[pytest.Session] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION.append(session)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Once pytest is done (summary printed, every other plugin unconfigured), end the process with pytest's own
    exit status instead of the interpreter's finalisation.

    One clean-clone CI run passed all 1,025 tests, printed its summary and then died of SIGSEGV during the
    interpreter's finalisation; the runs before and after it exited 0. Not reproduced since: six runs of the
    in-process Ray tests (test_search_causal.py) alone and one whole-suite run exited 0, and at that run's end the
    only Python thread besides the main one was tqdm's monitor, so the crash is presumably in the teardown of a
    native library's threads (Ray's core worker, torch's or tokenizers' pools); not found. Every command a user
    runs is tested in its own subprocess, where a crash at exit fails that test; this process's finalisation is
    not part of what the suite tests.
    ``LORATUNE_TEST_FINALIZE=1`` keeps the normal exit (to look for the crash)."""
    if _SESSION and os.environ.get("LORATUNE_TEST_FINALIZE") != "1":
        status = int(_SESSION[-1].exitstatus)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def tiny_model(arch: str, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    """A random-init sequence classifier of family ``arch`` with 2 layers, width 32."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=num_labels)
        return tf.DistilBertForSequenceClassification(cfg)
    common = dict(vocab_size=120, num_labels=num_labels)
    if arch in ("bert", "roberta"):
        cls, conf = {"bert": (tf.BertForSequenceClassification, tf.BertConfig),
                     "roberta": (tf.RobertaForSequenceClassification, tf.RobertaConfig)}[arch]
        return cls(conf(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, **common))
    if arch == "gpt2":
        return tf.GPT2ForSequenceClassification(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                              pad_token_id=0, bos_token_id=1, eos_token_id=1, **common))
    if arch == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                                 num_key_value_heads=2, intermediate_size=64,
                                                                 pad_token_id=0, bos_token_id=1, eos_token_id=1, **common))
    raise ValueError(arch)


ARCHS = ["distilbert", "bert", "roberta", "gpt2"]


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Four rows of token ids (no padding), for forward-pass comparisons."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (4, 10), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# --- a tiny local model folder and a learnable data set, for end-to-end tests ---------------------

POSITIVE = ["good", "great", "fine", "lovely", "superb", "moving", "funny", "smart"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "messy", "stale", "tired"]
FILLER = ["the", "film", "movie", "plot", "cast", "story", "is", "was", "a", "very", "quite", "and", "but", "it"]


def synthetic_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Sentences whose sentiment word decides the label: a tiny model learns it in a few epochs."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 12))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_csv(path, rows, header=("text", "label")) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-init BERT (2 layers, width 32) with a word-level WordPiece vocab, saved as a folder."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER + list("abcdefghijklmnopqrstuvwxyz")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tk = Tokenizer(models.WordPiece(vocab={w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    # "Pre-train" it briefly on other sentences of the same kind (full fine-tuning), so that, as with a
    # real pretrained model, its features carry sentiment: a fresh head plus LoRA then learns in epochs.
    model = tf.BertForSequenceClassification(cfg)
    rows = synthetic_rows(512, seed=99)
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    y = torch.tensor([int(lab == "pos") for _, lab in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(4):
        for i in range(0, len(rows), 32):
            loss = model(input_ids=enc["input_ids"][i:i + 32], attention_mask=enc["attention_mask"][i:i + 32],
                         labels=y[i:i + 32]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.bert.save_pretrained(str(folder))          # the encoder only: loratune adds a fresh head
    return str(folder)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
    """400 learnable rows as a CSV (split 320/40/40 by loratune)."""
    return write_csv(tmp_path_factory.mktemp("data") / "reviews.csv", synthetic_rows(400))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_data):
    """One finished tiny training run (its adapter in ``run/adapter``), shared by tests that only read it."""
    from loratune.cli.main import main

    out = tmp_path_factory.mktemp("finished") / "run"
    argv = ["train", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--max-length", "32", "--rank", "4", "--threads", "1"]
    assert main(argv) == 0
    return out


def kill_at_logged_step(proc, run, target: int, extra: float = 0.0, timeout: float = 300) -> None:
    """SIGKILL the training process ``proc`` once ``run/metrics.jsonl`` logs a step >= ``target`` (then
    ``extra`` seconds more), or at ``timeout``; waits for it to die."""
    import json
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        log = run / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        if any(json.loads(x)["step"] >= target for x in lines[-3:] if x.endswith("}")):
            time.sleep(extra)
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``loratune ARGV`` in this process: (exit code, stdout, stderr)."""
    from loratune.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    """Exit 2 and one line on stderr holding ``fragment``, no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
