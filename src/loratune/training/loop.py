"""The training loop, top to bottom: data -> model + LoRA -> epochs of AdamW steps -> best adapter.

No Trainer: tokenize once, length-bucketed batches with dynamic padding, bf16 autocast where the
CPU has it, linear warm-up and decay, gradient accumulation and clipping, an evaluation per epoch
(the best epoch by validation loss is kept), checkpoints that make ``--resume`` land on the same
adapter as an uninterrupted run, and progress events for whoever draws them.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loratune.core.adapters import file_size, save_adapter
from loratune.core.inject import LoraSpec, count_parameters, expand_targets, inject
from loratune.errors import Diverged, InputError, Interrupted
from loratune.runtime import (
    autocast,
    cast_frozen_linears,
    release_memory,
    resolve_device,
    resolve_precision,
    set_threads,
)
from loratune.tasks.batches import Encoded, batch_order, collate, padding_fraction
from loratune.tasks.classification import evaluate, tokenize
from loratune.training import rundir
from loratune.training.checkpoint import load_checkpoint, load_latest, save_checkpoint
from loratune.training.data import load_splits
from loratune.training.fastops import use_fast_attention, use_fast_dropout
from loratune.training.firsttoken import first_token_last_layer
from loratune.training.models import load_model, load_tokenizer, model_hint
from loratune.training.options import TrainConfig

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]

# Speed levers of the loop (bench/ switches them off one at a time to measure each; see BENCHMARKS.md).
FROZEN_BF16 = True
"""bf16 training: keep frozen linear weights in bf16 once instead of autocast re-casting them each step."""
FAST_DROPOUT = True
"""CPU training: dropout masks from 16-bit slices of 64-bit draws (fastops.keep_mask), ~4x cheaper than bernoulli_,
in the model's and the adapters' dropouts."""
FAST_ATTENTION = True
"""CPU training: attention written out with those masks on its probabilities (fastops.fast_attention) instead of
sdpa's math path."""
FIRST_TOKEN = True
"""Classifiers that read token 0 only: the last layer computes token 0 only (firsttoken.py; exact, 1/7 less work)."""
PAD_TO = 1
"""Round each training batch's width up to a multiple of this (8 measured slower here: more padding)."""


@dataclass(frozen=True, eq=False)
class Prepared:
    """Tokenized splits and what travels with them; picklable, so a search ships it to trials once."""

    label_names: list[str]
    train: Encoded
    validation: Encoded
    test: Encoded
    pad_id: int


@dataclass
class RunResult:
    run_dir: Path
    validation: dict[str, float]
    test: dict[str, float] | None
    best_epoch: int
    train: dict[str, Any] = field(default_factory=dict)
    already_done: bool = False


def prepare_data(cfg: TrainConfig) -> Prepared:
    """Load, split and tokenize once (the tokenizer of ``cfg.model``)."""
    splits = load_splits(cfg)
    tok = load_tokenizer(cfg.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    enc = {name: tokenize(getattr(splits, name), tok, cfg.max_length) for name in ("train", "validation", "test")}
    return Prepared(splits.label_names, enc["train"], enc["validation"], enc["test"], int(pad))


def build_model(cfg: TrainConfig, label_names: list[str]) -> tuple[nn.Module, LoraSpec, list[str]]:
    """The base classifier with a fresh adapter ``default``; returns (model, spec, peft-style targets)."""
    model = load_model(cfg.model, label_names, seed=cfg.seed)
    spec = LoraSpec(targets=cfg.targets, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
                    init=cfg.init, layers=cfg.layers, bias=cfg.bias)
    torch.manual_seed(cfg.seed)
    inject(model, spec)
    return model, spec, expand_targets(model, cfg.targets)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (as transformers' Trainer)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name.lower() else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then linear decay to 0 at ``total`` (transformers' linear schedule)."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


@contextmanager
def _interrupt_flag() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set a flag the loop checks after each step (main thread only; Ray trials skip it)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set():                                       # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        flag.set()

    for s in old:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def train(config: TrainConfig | None = None, *, out: str | Path | None = None, resume: bool = False,
          overwrite: bool = False, progress: Progress | None = None, prepared: Prepared | None = None,
          resume_from: str | Path | None = None, on_epoch: Callable[[int, dict[str, float], Path], None] | None = None,
          evaluate_test: bool = True, **options: Any) -> RunResult:
    """Train one LoRA adapter; the run directory gets the contract's files.

    ``options`` override fields of ``config`` (``train(rank=4)``). With ``resume`` the run in ``out``
    continues from its newest checkpoint with the options it was started with. ``prepared`` is the
    tokenized data (a search prepares it once for all trials). ``resume_from`` names
    a checkpoint file to continue from (a search's trial). ``on_epoch(epoch, val_metrics, ckpt)`` is
    called after each epoch's checkpoint (the search reports through it).
    """
    emit = progress or (lambda event: None)
    out = Path(out) if out is not None else rundir.default_out("train")
    if resume_from is None:                  # a trial restored by the search reuses its own folder
        rundir.check_out(out, resume=resume, overwrite=overwrite)
    if resume:
        cfg, _ = rundir.read_config(out)
        if (out / "results.json").is_file():
            done = rundir_results(out)
            emit({"kind": "already_done", "run_dir": str(out)})
            return RunResult(out, done["validation"], done.get("test"), done["best_epoch"], done.get("train", {}), True)
    else:
        cfg = config.replace(**options) if config is not None else TrainConfig.from_dict(options)
    threads = set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    data = prepared or prepare_data(cfg)
    model, spec, targets = build_model(cfg, data.label_names)
    model.to(device)
    rundir.start(out, overwrite=overwrite and resume_from is None)
    if not resume:
        rundir.write_config(out, cfg, label_names=data.label_names)
    state = load_checkpoint(Path(resume_from)) if resume_from else (load_latest(out / "checkpoints") if resume else None)
    with _interrupt_flag() as stop:
        return _loop(cfg, model, spec, targets, data, out, device, precision, threads, state, emit, on_epoch,
                     evaluate_test, stop)


def rundir_results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def _loop(cfg: TrainConfig, model: nn.Module, spec: LoraSpec, targets: list[str], data: Prepared, out: Path,
          device: torch.device, precision: str, threads: int, state: dict[str, Any] | None, emit: Progress,
          on_epoch: Callable[..., None] | None, evaluate_test: bool, stop: threading.Event) -> RunResult:
    from torch.utils.tensorboard import SummaryWriter

    tr = data.train
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".adapters." not in n)
    if FROZEN_BF16:                                        # after inject: adapters took the fp32 dtype
        cast_frozen_linears(model, precision)
    if FAST_DROPOUT:                                       # the model's and the adapters' dropouts
        use_fast_dropout(model)
    if FAST_ATTENTION:                                     # the attention probabilities' dropout
        use_fast_attention(model)
    if FIRST_TOKEN:
        first_token_last_layer(model)
    batches_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total / steps_per_epoch)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, math.ceil(cfg.warmup * total)))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    weight = None
    if cfg.class_weights == "balanced":                      # n / (C · count_c), as sklearn's "balanced"
        counts = np.bincount(tr.labels, minlength=len(data.label_names)).astype(np.float64)
        weight = torch.tensor(len(tr.labels) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)

    step, epoch, next_batch, best, best_epoch, bad_epochs, history = 0, 0, 0, math.inf, 0, 0, []
    best_state: dict[str, torch.Tensor] = {}
    seconds, tokens, samples = 0.0, 0, 0
    metrics_path = out / "metrics.jsonl"
    if state is not None:
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        step, epoch, next_batch = state["step"], state["epoch"], state["next_batch"]
        best, best_epoch, bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]
        best_state, history = state["best_state"], state["history"]
        seconds, tokens, samples = state["seconds"], state["tokens"], state["samples"]
        if metrics_path.exists():                             # drop lines logged after the checkpoint
            with open(metrics_path, "r+b") as f:
                f.truncate(state["metrics_bytes"])
        log.info("resuming at step %d (epoch %d, batch %d)", step, epoch + 1, next_batch)
    tb = SummaryWriter(str(out / "tb"), purge_step=step)       # drops events a killed run logged past it
    mlog = open(metrics_path, "a" if state is not None else "w", encoding="utf-8")   # a fresh start: fresh log

    def record(obj: dict[str, Any]) -> None:
        mlog.write(json.dumps(rundir._clean(obj)) + "\n")
        mlog.flush()

    def checkpoint() -> Path:
        mlog.flush()
        return save_checkpoint(out / "checkpoints", step, {
            "step": step, "epoch": epoch, "next_batch": next_batch, "params": {n: p.detach().cpu() for n, p in params.items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(), "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
            "best_state": best_state, "history": history, "seconds": seconds, "tokens": tokens, "samples": samples,
            "metrics_bytes": metrics_path.stat().st_size})

    emit({"kind": "start", "total_steps": total, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
          "step": step, "train_size": len(tr), "precision": precision, "threads": threads, "device": str(device)})
    log.info("training %d steps (%d epochs of %d), %s on %s with %d threads", total, epochs, steps_per_epoch,
             precision, device, threads)
    stopped_early = False
    try:
        while epoch < epochs and step < total and not stopped_early:
            model.train()
            order = batch_order(tr.lengths, cfg.batch_size, bucket=cfg.bucket, shuffle=True, seed=cfg.seed, epoch=epoch)
            bi = next_batch
            while bi < len(order) and step < total:
                group = order[bi:bi + cfg.grad_accum]            # one optimizer step's micro-batches
                t0 = time.perf_counter()
                loss_sum = 0.0
                for idx in group:
                    b = {k: v.to(device, non_blocking=True) for k, v in collate(tr, idx, data.pad_id, PAD_TO).items()}
                    with autocast(device, precision):
                        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    loss = F.cross_entropy(logits.float(), b["labels"], weight=weight)
                    loss_item = loss.item()                       # one host sync per micro-batch
                    if not math.isfinite(loss_item):
                        raise Diverged(step + 1, loss_item)
                    scaler.scale(loss * (len(idx) / sum(len(g) for g in group))).backward()
                    loss_sum += loss_item * len(idx)
                    tokens += int(tr.lengths[idx].sum())
                    samples += len(idx)
                if cfg.clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                bi += len(group)
                next_batch = bi
                seconds += time.perf_counter() - t0
                loss_val = loss_sum / sum(len(g) for g in group)
                if step % cfg.log_every == 0 or step == total:
                    lr = sched.get_last_lr()[0]
                    record({"type": "train", "step": step, "epoch": epoch + 1, "loss": loss_val, "lr": lr,
                            "tokens_per_s": tokens / max(seconds, 1e-9)})
                    tb.add_scalar("train/loss", loss_val, step)
                    tb.add_scalar("train/lr", lr, step)
                emit({"kind": "step", "step": step, "total_steps": total, "epoch": epoch + 1, "loss": loss_val,
                      "tokens_per_s": tokens / max(seconds, 1e-9), "seconds": seconds})
                if stop.is_set():
                    path = checkpoint()
                    raise Interrupted(f"interrupted at step {step}; checkpoint {path}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and bi < len(order):
                    checkpoint()
            # --- end of an epoch: evaluate, keep the best, maybe stop early, checkpoint -------------
            val, _ = evaluate(model, data.validation, device, precision, data.pad_id)
            release_memory()                     # the epoch's activations, freed, back to the OS
            epoch += 1
            next_batch = 0
            improved = val["loss"] < best
            if improved:
                best, best_epoch, bad_epochs = val["loss"], epoch, 0
                best_state = {n: p.detach().cpu().clone() for n, p in params.items()}
                save_adapter(model, out / "adapter", spec, targets, base_model=model_hint(cfg.model),
                             meta={"id2label": data.label_names, "model": cfg.model, "max_length": cfg.max_length})
            else:
                bad_epochs += 1
            history.append({"epoch": epoch, "step": step, **val})
            record({"type": "eval", "split": "validation", "epoch": epoch, "step": step, **val})
            for k, v in val.items():
                tb.add_scalar(f"validation/{k}", v, step)
            emit({"kind": "eval", "epoch": epoch, "epochs": epochs, "step": step, "metrics": val, "best": improved})
            stopped_early = bool(cfg.early_stop and bad_epochs >= cfg.early_stop)
            path = checkpoint()
            if on_epoch is not None:
                on_epoch(epoch, val, path)
    finally:
        tb.close()
        mlog.close()

    with torch.no_grad():                                       # back to the best epoch's weights
        for n, t in best_state.items():
            params[n].copy_(t)
    best_val = next(h for h in history if h["epoch"] == best_epoch)
    best_val = {k: v for k, v in best_val.items() if k not in ("epoch", "step")}
    test = None
    if evaluate_test:
        test, _ = evaluate(model, data.test, device, precision, data.pad_id)
        emit({"kind": "test", "metrics": test})
    trainable, total_params = count_parameters(model)
    stats = {"tokens_per_s": tokens / max(seconds, 1e-9), "samples_per_s": samples / max(seconds, 1e-9),
             "seconds": seconds, "steps": step, "epochs_run": epoch, "stopped_early": stopped_early,
             "precision": precision, "threads": threads, "trainable_params": trainable, "all_params": total_params,
             "adapter_bytes": file_size(out / "adapter"), "model_bytes": base_bytes,
             "padding_fraction": padding_fraction(tr.lengths, batch_order(tr.lengths, cfg.batch_size, bucket=cfg.bucket,
                                                                           shuffle=True, seed=cfg.seed, epoch=0))}
    rundir.write_json(out / "results.json", {"validation": best_val, "test": test, "best_epoch": best_epoch,
                                            "train": stats, "history": history})
    emit({"kind": "done", "run_dir": str(out)})
    return RunResult(out, best_val, test, best_epoch, stats)


__all__ = ["train", "prepare_data", "build_model", "evaluate", "RunResult", "Prepared", "Diverged", "Interrupted",
           "InputError"]
