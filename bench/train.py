"""Benchmark 1: training throughput, loratune's default training against the seed recipe (peft + Trainer).

Both sides train on the same tokenized sentences (the built-in data, MiniLM's tokenizer), batch 16, for
``warmup + steps`` optimizer steps; only the last ``steps`` are timed (step end to step end, wall clock,
data loading included). Real tokens are the non-padding tokens of the timed batches.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import non_embedding_params

SEED_TARGETS = {"distilbert": ["q_lin", "v_lin"], "minilm": ["query", "value"]}


def distilbert_folder(root: Path) -> str:
    """A random-init distilbert-base classifier saved with MiniLM's tokenizer (vocab 30522 matches)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from loratune.models import load_tokenizer

    path = root / "distilbert-base-random"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
        model.save_pretrained(str(path))
        load_tokenizer("minilm-l6").save_pretrained(str(path))
    return str(path)


def ours(model: str, prepared: Any, steps: int, warmup: int, out: Path, **options: Any) -> dict[str, float]:
    """loratune.train with its defaults (bf16 where native, buckets, batch 16, r=8 α=16 q,v + head)."""
    from loratune import train
    from loratune.config import TrainConfig

    marks: dict[int, tuple[float, float, float]] = {}

    def progress(ev: dict[str, Any]) -> None:
        if ev["kind"] == "step" and ev["step"] in (warmup, warmup + steps):
            marks[ev["step"]] = (time.perf_counter(), ev["tokens_per_s"] * ev["seconds"], ev["seconds"])

    cfg = TrainConfig(model=model, max_steps=warmup + steps, log_every=10_000, **options)
    train(cfg, out=out, overwrite=True, prepared=prepared, progress=progress, evaluate_test=False)
    (t0, tok0, _), (t1, tok1, _) = marks[warmup], marks[warmup + steps]
    wall = t1 - t0
    return {"tokens_per_s": (tok1 - tok0) / wall, "samples_per_s": steps * cfg.batch_size / wall, "seconds": wall}


def seed(model_path: str, prepared: Any, steps: int, warmup: int, out: Path, family: str) -> dict[str, float]:
    """The seed recipe: peft get_peft_model + transformers Trainer, fp32, DataCollatorWithPadding, random order."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from loratune.models import load_model, load_tokenizer

    tok = load_tokenizer("minilm-l6")
    model = load_model(model_path, prepared.label_names, seed=0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=SEED_TARGETS[family],
                                             lora_dropout=0.05, task_type="SEQ_CLS"))
    tr = prepared.train
    rows = [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": int(y)}
            for ids, y in zip(tr.input_ids, tr.labels)]
    pad = DataCollatorWithPadding(tok)
    real: list[int] = []

    def collator(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        real.append(sum(len(f["input_ids"]) for f in features))
        return pad(features)

    marks: dict[int, float] = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step in (warmup, warmup + steps):
                marks[state.global_step] = time.perf_counter()

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=16, max_steps=warmup + steps,
                             report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no",
                             use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    with contextlib.redirect_stdout(io.StringIO()):                # the Trainer prints its own summary
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Timer()]).train()
    wall = marks[warmup + steps] - marks[warmup]
    return {"tokens_per_s": sum(real[warmup:warmup + steps]) / wall, "samples_per_s": steps * 16 / wall,
            "seconds": wall}


def model_flops_params(model_path: str, label_names: list[str]) -> int:
    from loratune.models import load_model

    return non_embedding_params(load_model(model_path, label_names))


def run(root: Path, *, steps: int, warmup: int, peaks: dict[str, float], models: tuple[str, ...]) -> list[dict[str, Any]]:
    from loratune.config import TrainConfig
    from loratune.trainer import prepare_data

    rows = []
    for family in models:
        path = distilbert_folder(root) if family == "distilbert" else "minilm-l6"
        prepared = prepare_data(TrainConfig(model=path))
        n = model_flops_params(path, prepared.label_names)
        s = seed(path, prepared, steps, warmup, root / f"seed-{family}", family)
        o = ours(path, prepared, steps, warmup, root / f"ours-{family}")
        for side, r in (("seed (peft+Trainer, fp32)", s), ("loratune train", o)):
            gflops = 4 * n * r["tokens_per_s"] / 1e9
            rows.append({"model": family, "side": side, **r, "gflops": gflops,
                         "pct_bf16_peak": 100 * gflops / peaks["bf16"], "pct_fp32_peak": 100 * gflops / peaks["fp32"],
                         "params_non_emb": n})
        rows.append({"model": family, "side": "ratio", "tokens_per_s": o["tokens_per_s"] / s["tokens_per_s"],
                     "samples_per_s": o["samples_per_s"] / s["samples_per_s"]})
    return rows


def padding_stats(prepared: Any) -> dict[str, float]:
    from loratune.data import batch_order, padding_fraction

    lens = prepared.train.lengths
    return {"random": padding_fraction(lens, batch_order(lens, 16, bucket=False, shuffle=True, seed=0, epoch=0)),
            "bucketed": padding_fraction(lens, batch_order(lens, 16, bucket=True, shuffle=True, seed=0, epoch=0)),
            "mean_len": float(np.mean(lens))}
