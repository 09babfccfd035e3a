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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bench.common import non_embedding_params

if TYPE_CHECKING:
    from loratune.training.levers import Levers

SEED_TARGETS = {"distilbert": ["q_lin", "v_lin"], "minilm": ["query", "value"]}


def distilbert_folder(root: Path) -> str:
    """A random-init distilbert-base classifier saved with MiniLM's tokenizer (vocab 30522 matches)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from loratune.training.models import load_tokenizer

    path = root / "distilbert-base-random"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        model = DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
        model.save_pretrained(str(path))
        load_tokenizer("minilm-l6").save_pretrained(str(path))
    return str(path)


def ours(model: str, prepared: Any, steps: int, warmup: int, out: Path, levers: Levers | None = None,
         **options: Any) -> dict[str, float]:
    """loratune.train with its defaults (bf16 where native, buckets, batch 16, r=8 α=16 q,v + head); ``levers``:
    a ``Levers`` to train with instead of the default one (bench/levers.py switches each off alone)."""
    from loratune import train
    from loratune.training.levers import Levers
    from loratune.training.options import TrainConfig

    marks: dict[int, tuple[float, float, float]] = {}

    def progress(ev: dict[str, Any]) -> None:
        if ev["kind"] == "step" and ev["step"] in (warmup, warmup + steps):
            marks[ev["step"]] = (time.perf_counter(), ev["tokens_per_s"] * ev["seconds"], ev["seconds"])

    cfg = TrainConfig(model=model, max_steps=warmup + steps, log_every=10_000, **options)
    train(cfg, out=out, overwrite=True, prepared=prepared, progress=progress, evaluate_test=False,
          levers=levers if levers is not None else Levers())
    (t0, tok0, _), (t1, tok1, _) = marks[warmup], marks[warmup + steps]
    wall = t1 - t0
    return {"tokens_per_s": (tok1 - tok0) / wall, "samples_per_s": steps * cfg.batch_size / wall, "seconds": wall}


def seed(model_path: str, prepared: Any, steps: int, warmup: int, out: Path, family: str) -> dict[str, float]:
    """The seed recipe: peft get_peft_model + transformers Trainer, fp32, DataCollatorWithPadding, random order."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from loratune.training.models import load_model, load_tokenizer

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


def peft_tricks(model_path: str, prepared: Any, steps: int, warmup: int, family: str, *, dora: bool = False,
                precision: str = "bf16") -> dict[str, float]:
    """peft with loratune's tricks and nothing else: peft get_peft_model (our default r=8, α=16, q,v, dropout
    0.1) trained by a plain loop with bf16 autocast and length-bucketed batches (DESIGN.md's "peft with the
    same tricks"); it shows what loratune's own levers add on top of bf16 + buckets. ``dora``: peft's use_dora;
    ``precision``: the autocast (bench/variants.py uses what loratune picks)."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from loratune.runtime import autocast
    from loratune.tasks.batches import batch_order, collate
    from loratune.training.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(model_path, prepared.label_names, seed=0),
                           LoraConfig(r=8, lora_alpha=16, target_modules=SEED_TARGETS[family], lora_dropout=0.1,
                                      use_dora=dora, task_type="SEQ_CLS")).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.01)
    tr = prepared.train
    order = batch_order(tr.lengths, 16, bucket=True, shuffle=True, seed=0, epoch=0)
    real, t0 = 0, 0.0
    for i, idx in enumerate(order[:warmup + steps]):
        if i == warmup:
            t0 = time.perf_counter()
        b = collate(tr, idx, prepared.pad_id, 1)
        with autocast(torch.device("cpu"), precision):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        F.cross_entropy(logits.float(), b["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            real += int(tr.lengths[idx].sum())
    wall = time.perf_counter() - t0
    return {"tokens_per_s": real / wall, "samples_per_s": steps * 16 / wall, "seconds": wall}


def model_flops_params(model_path: str, label_names: list[str]) -> tuple[int, int]:
    """(non-embedding weights, weights of the last layer that loratune's first-token lever skips for all tokens
    but the first: its query, attention output and feed-forward matrices)."""
    from loratune.training.firsttoken import FIRST_TOKEN_HEADS, _last_layer
    from loratune.training.models import load_model

    model = load_model(model_path, label_names)
    found = _last_layer(model) if type(model).__name__ in FIRST_TOKEN_HEADS else None
    skipped = 0
    if found is not None:
        suffixes = ("attention.self.query", "intermediate.dense", "output.dense",      # output.dense: both of BERT's
                    "attention.q_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2")
        skipped = sum(m.weight.numel() for n, m in found[0].named_modules()
                      if isinstance(m, torch.nn.Linear) and n.endswith(suffixes))
    return non_embedding_params(model), skipped


def run(root: Path, *, steps: int, warmup: int, peaks: dict[str, float], models: tuple[str, ...]) -> list[dict[str, Any]]:
    from loratune.training.loop import prepare_data
    from loratune.training.options import TrainConfig

    rows = []
    for family in models:
        path = distilbert_folder(root) if family == "distilbert" else "minilm-l6"
        prepared = prepare_data(TrainConfig(model=path))
        n, skipped = model_flops_params(path, prepared.label_names)
        s = seed(path, prepared, steps, warmup, root / f"seed-{family}", family)
        p = peft_tricks(path, prepared, steps, warmup, family)
        o = ours(path, prepared, steps, warmup, root / f"ours-{family}")
        for side, r in (("seed (peft+Trainer, fp32)", s), ("peft + bf16 + buckets", p), ("loratune train", o)):
            gflops = 4 * n * r["tokens_per_s"] / 1e9
            # FLOPs really executed: loratune's last layer runs the skipped matrices for one token per sentence
            done = gflops - (4 * skipped * (r["tokens_per_s"] - r["samples_per_s"]) / 1e9 if side == "loratune train" else 0)
            rows.append({"model": family, "side": side, **r, "gflops": gflops, "gflops_executed": done,
                         "pct_bf16_peak_executed": 100 * done / peaks["bf16"],
                         "pct_bf16_peak": 100 * gflops / peaks["bf16"], "pct_fp32_peak": 100 * gflops / peaks["fp32"],
                         "params_non_emb": n})
        rows.append({"model": family, "side": "ratio", "tokens_per_s": o["tokens_per_s"] / s["tokens_per_s"],
                     "samples_per_s": o["samples_per_s"] / s["samples_per_s"]})
        rows.append({"model": family, "side": "ratio vs peft+tricks", "tokens_per_s": o["tokens_per_s"] / p["tokens_per_s"],
                     "samples_per_s": o["samples_per_s"] / p["samples_per_s"]})
    return rows


def padding_stats(prepared: Any) -> dict[str, float]:
    from loratune.tasks.batches import batch_order, padding_fraction

    lens = prepared.train.lengths
    return {"random": padding_fraction(lens, batch_order(lens, 16, bucket=False, shuffle=True, seed=0, epoch=0)),
            "bucketed": padding_fraction(lens, batch_order(lens, 16, bucket=True, shuffle=True, seed=0, epoch=0)),
            "mean_len": float(np.mean(lens))}
