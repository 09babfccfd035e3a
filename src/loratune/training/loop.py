"""The training loop, top to bottom: data -> model + LoRA -> epochs of AdamW steps -> best adapter.

No Trainer: tokenize once, length-bucketed batches with dynamic padding, bf16 autocast where the
CPU has it, linear warm-up and decay, gradient accumulation and clipping, an evaluation per epoch
(the best epoch by validation loss is kept), checkpoints that make ``--resume`` land on the same
adapter as an uninterrupted run, and progress events for whoever draws them.

:func:`train` sets a run up and hands it to :func:`fit`, the loop itself: :func:`optimizer_step`s,
:func:`end_epoch`s, :func:`checkpoint`s, then :func:`finish` (results.json). Where the run is lives in one
:class:`TrainState` (state.py); the speed levers come in as one :class:`Levers` (levers.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loratune import runtime
from loratune.core.adapters import save_adapter
from loratune.core.inject import LoraSpec, count_parameters, expand_targets, inject
from loratune.errors import Diverged, InputError, Interrupted
from loratune.tasks.batches import Encoded, batch_order, collate, padding_fraction
from loratune.tasks.causal import (
    IGNORE_INDEX,
    CausalEncoded,
    collate_causal,
    encode_conversations,
)
from loratune.tasks.causal_eval import (
    SAMPLE_ROWS,
    CausalSplit,
    evaluate_causal,
    prepare_split,
    sample_rows,
)
from loratune.tasks.causal_metrics import label_logprobs
from loratune.tasks.classification import evaluate, tokenize
from loratune.tasks.metrics import confusion as confusion_matrix
from loratune.training import compiled, lock, rundir
from loratune.training.checkpoint import load_checkpoint, load_latest, save_checkpoint
from loratune.training.data import load_splits
from loratune.training.levers import Levers
from loratune.training.models import (
    fit_max_length,
    load_causal_lm,
    load_model,
    load_tokenizer,
    model_hint,
    modules_to_save,
    pad_id_of,
    save_model,
)
from loratune.training.options import TrainConfig
from loratune.training.state import Optim, TrainState

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
OnEpoch = Callable[[float, dict[str, float], Path], None]
COLLAPSE_SHARE = 0.9
"""A classifier is collapsed when at least this share of its validation predictions is one class and its
validation loss is at or above the entropy of the training labels (what predicting their frequencies scores)."""


@dataclass(frozen=True, eq=False)
class Prepared:
    """Tokenized splits and what travels with them; picklable, so a search ships it to trials once.

    Classification: :class:`Encoded` splits, ``label_names`` the classes. Causal LM (``task``): the training
    split a :class:`CausalEncoded`, validation and test :class:`CausalSplit`\ s, ``label_names`` the choice
    candidates (the data's distinct completions where they are a label set, else empty)."""

    label_names: list[str]
    train: Encoded | CausalEncoded
    validation: Encoded | CausalSplit
    test: Encoded | CausalSplit
    pad_id: int
    task: str = "classification"
    max_length: int | None = None                       # the tokens cut at (auto fitted to the model's positions)


@dataclass
class RunResult:
    """What :func:`train` returns: the best epoch's validation metrics, the test metrics (None: not evaluated),
    results.json's ``train`` statistics; ``already_done``: a resume found the run finished."""

    run_dir: Path
    validation: dict[str, float]
    test: dict[str, float] | None
    best_epoch: float
    train: dict[str, Any] = field(default_factory=dict)
    already_done: bool = False


@dataclass(eq=False)
class Run:
    """What stays fixed while one run trains: its options, data, model, where it writes, how long it trains."""

    cfg: TrainConfig
    data: Prepared
    model: nn.Module
    spec: LoraSpec | None                               # None: full fine-tuning (every weight trains, no adapter)
    targets: list[str]                                  # the adapted modules, peft-style (the adapter's config)
    out: Path
    device: torch.device
    precision: str
    threads: int
    levers: Levers
    emit: Progress
    weight: torch.Tensor | None                         # per-class weights of the loss (None: unweighted)
    total: int                                          # optimizer steps of the whole run (the schedule's length)
    steps_per_epoch: int
    epochs: int
    base_bytes: int                                     # the base model's weights as loaded (before any bf16 cast)
    tokenizer: Any = None                               # full fine-tuning: saved with the model
    stop_collapsed: bool = False                        # a collapsed classifier stops (a search's trials)
    given_baseline: dict[str, dict[str, float]] | None = None   # the base model's metrics, computed by the caller
    base_answers: list[str] | None = None               # causal LM: the base model's first validation answers

    @property
    def artifact(self) -> Path:
        """What the run leaves to use: ``adapter/`` (LoRA) or ``model/`` (full fine-tuning)."""
        return self.out / ("adapter" if self.spec is not None else "model")


def prepare_data(cfg: TrainConfig) -> Prepared:
    """Load, split and tokenize once (the tokenizer of ``cfg.model``)."""
    if cfg.task == "causal-lm":
        from loratune.training.models import model_is_causal

        if not model_is_causal(cfg.model):
            raise InputError(f"--model: {cfg.model} is not a causal LM (a decoder with an LM head); the causal-lm "
                             f"task needs one, e.g. --model smollm2-135m (the default for it)")
    tok = load_tokenizer(cfg.model)
    pad = pad_id_of(tok)
    if (fit := fit_max_length(cfg)) != cfg.max_length:       # auto, past the model's positions
        cfg = cfg.replace(max_length=fit)
    if cfg.task == "causal-lm":
        return _prepare_causal(cfg, tok, int(pad))
    splits = load_splits(cfg)
    enc = {name: tokenize(getattr(splits, name), tok, cfg.max_length) for name in ("train", "validation", "test")}
    return Prepared(splits.label_names, enc["train"], enc["validation"], enc["test"], int(pad),
                    max_length=cfg.max_length)


def _prepare_causal(cfg: TrainConfig, tok: Any, pad: int) -> Prepared:
    """Conversations -> the training sequences and the two evaluation splits; rows cut to ``--max-length``
    are counted and reported (their completion is kept whole where it fits: tasks/causal.py)."""
    from loratune.training.causal_data import load_causal_splits

    splits = load_causal_splits(cfg)
    if not getattr(tok, "chat_template", None):
        other = [f for f in splits.formats if f != "prompt-completion"]
        if other:
            raise InputError(f"--data: {cfg.data} has {other[0]} rows, but the tokenizer of {cfg.model} has no chat "
                             f"template to format them; give prompt/completion columns or a model with a template")
        if cfg.system_prompt is not None:
            raise InputError(f"--system-prompt: the tokenizer of {cfg.model} has no chat template to put a system "
                             f"turn in")
    train = encode_conversations(splits.train, tok, cfg.max_length, splits.wheres["train"])
    val, test = (prepare_split(getattr(splits, name), tok, cfg.max_length, splits.wheres[name], splits.choices)
                 for name in ("validation", "test"))
    for name, enc in (("training", train), ("validation", val.enc), ("test", test.enc)):
        if enc.truncated:
            log.warning("%d of %d %s conversations are longer than --max-length %d tokens and were cut (the "
                        "oldest turns first; the last completion kept whole where it fits)", enc.truncated,
                        len(enc), name, cfg.max_length)
    return Prepared(list(splits.choices), train, val, test, pad, task="causal-lm", max_length=cfg.max_length)


def build_model(cfg: TrainConfig, label_names: list[str], pad_id: int | None = None
                ) -> tuple[nn.Module, LoraSpec | None, list[str]]:
    """The base classifier with a fresh adapter ``default``; returns (model, spec, peft-style targets).
    ``pad_id``: the id the batches are padded with (a classifier's config is set to it: models.load_model).

    ``--method full``: every weight trains and there is no adapter (spec None, no targets). A default
    ``--modules-to-save`` name (``auto``) that names no module of this model is dropped; a given one must exist.
    """
    model = load_causal_lm(cfg.model) if cfg.task == "causal-lm" else load_model(cfg.model, label_names, seed=cfg.seed,
                                                                                            pad_id=pad_id)
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, None, []
    spec = dataclasses.replace(cfg.lora_spec(), modules_to_save=modules_to_save(cfg, model))
    torch.manual_seed(cfg.seed)
    inject(model, spec)
    return model, spec, expand_targets(model, cfg.targets, spec.modules_to_save)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """scikit-learn's "balanced" weights, n / (C · count_c) for each class c of the n labels (a class with no
    example counts as one, so its weight stays finite)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)


def setup(cfg: TrainConfig, data: Prepared, out: Path, *, device: torch.device, precision: str, threads: int,
          levers: Levers, emit: Progress) -> Run:
    """The model with a fresh adapter on ``device``, the levers switched on (and ``--compile``), and the run's
    length."""
    if cfg.compile:
        compiled.check_compiler(device)                     # before the model loads: a one-line refusal
    if data.max_length is not None and data.max_length < cfg.max_length:   # auto, fitted to the model's positions
        cfg = cfg.replace(max_length=data.max_length)       # config.yaml and the adapter: what the data was cut at
    model, spec, targets = build_model(cfg, data.label_names, data.pad_id)
    if spec is not None and "modules_to_save" in cfg.auto_fields:
        cfg = cfg.replace(modules_to_save=spec.modules_to_save)   # config.yaml: what this model trains
    model.to(device)
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".adapters." not in n)
    levers.apply(model, precision)                          # after inject: the adapters took the fp32 dtype
    if cfg.compile:
        n = compiled.compile_layers(model)                  # last: it compiles the levers' forwards
        emit({"kind": "message", "text": f"--compile: the first training step compiles {n} layers (1-2 minutes the "
              "first time, seconds once inductor's cache is warm)" if n else "--compile: no stack of transformer "
              "layers found in this model; it trains uncompiled"})
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / cfg.batch_size) / cfg.grad_accum)
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    if cfg.evals_per_epoch > steps_per_epoch:
        raise InputError(f"--evals-per-epoch: {cfg.evals_per_epoch} validation passes per epoch, but an epoch has "
                         f"{steps_per_epoch} optimizer step(s) ({len(data.train)} training examples, batch "
                         f"{cfg.batch_size} x {cfg.grad_accum}); give at most {steps_per_epoch}")
    weight = None
    if cfg.class_weights == "balanced":
        weight = class_weights(data.train.labels, len(data.label_names)).to(device)
    return Run(cfg, data, model, spec, targets, out, device, precision, threads, levers, emit, weight, total,
               steps_per_epoch, math.ceil(total / steps_per_epoch), base_bytes,
               tokenizer=load_tokenizer(cfg.model) if spec is None or cfg.task == "causal-lm" else None)


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
          resume_from: str | Path | None = None, on_epoch: OnEpoch | None = None, evaluate_test: bool = True,
          levers: Levers = Levers(), claim: bool = True, on_done: Callable[[RunResult], None] | None = None,
          stop_collapsed: bool = False, baseline: Mapping[str, Mapping[str, float]] | None = None,
          base_answers: Sequence[str] | None = None, **options: Any) -> RunResult:
    """Train one LoRA adapter; the run directory gets the contract's files.

    ``options`` override fields of ``config`` (``train(rank=4)``). With ``resume`` the run in ``out``
    continues from its newest checkpoint with the options it was started with. ``prepared`` is the
    tokenized data (a search prepares it once for all trials). ``resume_from`` names
    a checkpoint file to continue from (a search's trial). ``on_epoch(epoch, val_metrics, ckpt)`` is
    called after each validation pass's checkpoint (the search reports through it; ``epoch`` is a decimal for a
    pass inside an epoch, ``--evals-per-epoch``). ``stop_collapsed``: a classifier found collapsed
    (:func:`collapsed`) at a validation pass after the warm-up stops there (a search's trials). ``levers``: the speed levers
    (cost, not results; bench/ switches them off). Raises :class:`Diverged` when a training or validation
    loss is not finite (see :func:`optimizer_step`, :func:`end_epoch`). ``baseline``: a causal LM's epoch 0, the
    base model's metrics ``{"validation": {...}, "test": {...}}`` computed already (a search evaluates the base
    model once for all its trials): written to metrics.jsonl and results.json as :func:`baseline` would have
    computed them; a split it lacks is evaluated here. ``base_answers``: with it, the base model's greedy answers
    to the first validation rows (:data:`SAMPLE_ROWS`), generations.json's base column (none given with a given
    validation baseline: that column stays null).

    ``claim``: check ``out`` and hold its lock (training/lock.py) from the first write to the last, so no
    other process writes there meanwhile; a search's trials pass False (the search holds its directory).
    A new run takes the lock once its inputs have checked out (a refused run writes nothing), a resumed
    one before it reads the run's options. ``on_done(result)`` runs last, still under the lock (the CLI
    writes report.html there).
    """
    emit = progress or (lambda event: None)
    out = Path(out) if out is not None else rundir.default_out("train")
    if claim:
        rundir.check_out(out, resume=resume, overwrite=overwrite)
    with contextlib.ExitStack() as held:
        if claim and resume:
            held.enter_context(lock.hold(out, flag="--resume"))
        if resume:
            cfg, _ = rundir.read_config(out)
            if (done := rundir.read_results(out)) is not None:
                emit({"kind": "already_done", "run_dir": str(out)})
                return _done(RunResult(out, done["validation"], done.get("test"), done["best_epoch"],
                                       done.get("train", {}), True), on_done)
        else:
            cfg = config.replace(**options) if config is not None else TrainConfig.from_dict(options)
        device = runtime.resolve_device(cfg.device)
        run = setup(cfg, prepared or prepare_data(cfg), out, device=device, threads=runtime.set_threads(cfg.threads),
                    precision=runtime.resolve_precision(cfg.precision, device), levers=levers, emit=emit)
        run.stop_collapsed = stop_collapsed
        run.given_baseline = {k: dict(v) for k, v in baseline.items()} if baseline is not None else None
        run.base_answers = list(base_answers) if base_answers is not None else None
        if claim and not resume:
            held.enter_context(lock.hold(out, flag="--out"))
            rundir.check_out(out, resume=False, overwrite=overwrite)     # again, now that no one else can write
        with _interrupt_flag() as stop:
            optim, state, ckpt = _start(run, out, resume=resume, overwrite=overwrite and resume_from is None,
                                        resume_from=resume_from)
            result = fit(run, optim, state, stop, resumed=ckpt, on_epoch=on_epoch, evaluate_test=evaluate_test)
        del run, optim, state                               # the model and optimizer, before on_done's report
        runtime.release_memory()
        return _done(result, on_done)


def _start(run: Run, out: Path, *, resume: bool, overwrite: bool,
           resume_from: str | Path | None) -> tuple[Optim, TrainState, bool]:
    """The folder made (or emptied), config.yaml written for a new run, and the state to train from:
    a fresh one, the newest checkpoint's (``resume``) or a named checkpoint's (a search's trial).
    Returns (optimizer side, state, whether it came from a checkpoint)."""
    rundir.start(out, overwrite=overwrite)
    if not resume:
        rundir.write_config(out, run.cfg, label_names=run.data.label_names)
    ckpt = load_checkpoint(Path(resume_from)) if resume_from else (load_latest(out / "checkpoints") if resume else None)
    optim = Optim.create(run.model, run.cfg, total=run.total, device=run.device, precision=run.precision)
    state = TrainState() if ckpt is None else TrainState.from_checkpoint(ckpt, optim)
    if ckpt is not None:
        log.info("resuming at step %d (epoch %d, batch %d)", state.step, state.epoch + 1, state.next_batch)
    return optim, state, ckpt is not None


def _done(result: RunResult, on_done: Callable[[RunResult], None] | None) -> RunResult:
    if on_done is not None:
        on_done(result)
    return result


def fit(run: Run, optim: Optim, state: TrainState, stop: threading.Event, *, resumed: bool,
        on_epoch: OnEpoch | None = None, evaluate_test: bool = True) -> RunResult:
    """Train from ``state`` to the last step or an early stop, then write the results (the loop itself).

    ``resumed``: ``state`` came from a checkpoint, so metrics.jsonl continues (cut back to the checkpoint's
    length) instead of starting afresh. ``stop`` set: checkpoint after the current step and raise
    :class:`Interrupted`.
    """
    cfg = run.cfg
    with closing(_Logs(run, state, resumed)) as logs:
        _announce(run, state)
        if run.data.task == "causal-lm" and state.baseline is None:
            baseline(run, state, logs, evaluate_test=evaluate_test)
        elif run.data.task == "causal-lm" and run.base_answers is None:     # resumed: evaluated before the kill
            run.base_answers = rundir.base_answers(run.out)
        # No `step < total` here: a checkpoint taken at the last step (Ctrl-C, --checkpoint-every with
        # --max-steps) comes before that epoch's evaluation, which a resume must still run.
        while state.epoch < run.epochs and not state.stopped_early:
            run.model.train()
            order = _epoch_batches(run, state.epoch)
            ends = rung_ends(len(order), cfg.grad_accum, cfg.evals_per_epoch)
            while state.next_batch < len(order) and state.step < run.total and not state.stopped_early:
                if state.rung < len(ends) and state.next_batch >= ends[state.rung]:   # a pass owed: resumed from a
                    _validate(run, optim, state, logs, on_epoch, epoch_end=False)    # Ctrl-C between its step and it
                    run.model.train()
                    continue
                group = order[state.next_batch:state.next_batch + cfg.grad_accum]  # one step's micro-batches
                loss = optimizer_step(run, optim, state, group)
                _log_step(run, optim, state, logs, loss)
                if stop.is_set():                                       # Ctrl-C, SIGTERM: save, then stop
                    path = checkpoint(run, optim, state, logs)
                    raise Interrupted(f"interrupted at step {state.step}; checkpoint {path}")
                inside = state.next_batch < len(order) and state.step < run.total   # an epoch's end has its own
                if inside and state.rung < len(ends) and state.next_batch >= ends[state.rung]:
                    _validate(run, optim, state, logs, on_epoch, epoch_end=False)  # a pass inside the epoch
                    run.model.train()
                elif inside and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    checkpoint(run, optim, state, logs)
            if not state.stopped_early:                 # early stopping (or a collapse) inside the epoch: done
                _validate(run, optim, state, logs, on_epoch, epoch_end=True)
    return finish(run, optim, state, evaluate_test)


def rung_ends(batches: int, grad_accum: int, evals: int) -> list[int]:
    """Where the validation passes inside an epoch come: after the first ``ceil(k · S / evals)`` of its S
    optimizer steps, k = 1 … evals − 1, as batch indices (the epoch's end has its own pass)."""
    steps = math.ceil(batches / grad_accum)
    return [min(batches, math.ceil(k * steps / evals) * grad_accum) for k in range(1, evals)]


def _validate(run: Run, optim: Optim, state: TrainState, logs: _Logs, on_epoch: OnEpoch | None, *,
              epoch_end: bool) -> None:
    """A validation pass (:func:`end_epoch`), then its checkpoint, then ``on_epoch``."""
    val = end_epoch(run, optim, state, logs, epoch_end=epoch_end)
    path = checkpoint(run, optim, state, logs)
    if on_epoch is not None:
        on_epoch(state.progress(run.cfg.evals_per_epoch), val, path)


def _epoch_batches(run: Run, epoch: int) -> list[np.ndarray]:
    """The training batches of ``epoch`` (0-based) in order: the same for the same seed and epoch, so a
    resumed run continues the very order it was in."""
    cfg = run.cfg
    return batch_order(run.data.train.lengths, cfg.batch_size, bucket=cfg.bucket, shuffle=True, seed=cfg.seed,
                       epoch=epoch)


def optimizer_step(run: Run, optim: Optim, state: TrainState, group: list[np.ndarray]) -> float:
    """One AdamW step over the micro-batches ``group`` (index arrays into the training split); returns the
    group's mean training loss.

    Each micro-batch's loss counts by its share of the group's examples, so the accumulated gradient is that
    of the group's mean loss: what one batch of all of them would give (with dropout off and no class
    weights, to rounding). Then clipping, the step, the schedule's step. Advances ``state.step``,
    ``state.next_batch`` (by ``len(group)``) and the throughput counters. Raises :class:`Diverged` when a
    micro-batch's loss is not finite, before its backward pass.
    """
    if run.data.task == "causal-lm":
        return _causal_step(run, optim, state, group)
    t0 = time.perf_counter()
    tr, n = run.data.train, sum(len(idx) for idx in group)
    loss_sum = 0.0
    for idx in group:
        batch = collate(tr, idx, run.data.pad_id, run.levers.pad_to)
        b = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        with runtime.autocast(run.device, run.precision):
            logits = run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # (B, C)
        loss = F.cross_entropy(logits.float(), b["labels"], weight=run.weight)
        loss_item = loss.item()                                 # one host sync per micro-batch
        if not math.isfinite(loss_item):
            raise Diverged(state.step + 1, loss_item)
        optim.scaler.scale(loss * (len(idx) / n)).backward()
        loss_sum += loss_item * len(idx)
        state.tokens += int(tr.lengths[idx].sum())
        state.samples += len(idx)
    _apply_step(run, optim, state, group, t0)
    return loss_sum / n


def _apply_step(run: Run, optim: Optim, state: TrainState, group: list[np.ndarray], t0: float) -> None:
    """Clip, step, schedule, advance ``state`` (after a group's backward passes)."""
    if run.cfg.clip:
        optim.scaler.unscale_(optim.optimizer)                  # clip the true gradient, not the fp16-scaled one
        torch.nn.utils.clip_grad_norm_(optim.params.values(), run.cfg.clip)
    optim.scaler.step(optim.optimizer)
    optim.scaler.update()
    optim.optimizer.zero_grad(set_to_none=True)
    optim.scheduler.step()
    state.step += 1
    state.next_batch += len(group)
    state.seconds += time.perf_counter() - t0


def _causal_step(run: Run, optim: Optim, state: TrainState, group: list[np.ndarray]) -> float:
    """:func:`optimizer_step` for a causal LM: the loss is the mean NLL of the group's trained tokens (each
    micro-batch's token sum over the group's token count, so accumulation equals one big batch), and the LM
    head runs only at the positions that predict a trained token (tasks/causal_metrics.label_logprobs)."""
    t0 = time.perf_counter()
    tr: CausalEncoded = run.data.train                          # type: ignore[assignment]
    n = sum(int((tr.labels[i][1:] != IGNORE_INDEX).sum()) for idx in group for i in idx)
    loss_sum = 0.0
    for idx in group:
        batch = collate_causal(tr, idx, run.data.pad_id, run.levers.pad_to)
        logp, _ = label_logprobs(run.model, batch, run.device, run.precision)
        loss = -logp.sum()
        loss_item = loss.item() / max(1, len(logp))
        if not math.isfinite(loss_item):
            raise Diverged(state.step + 1, loss_item)
        optim.scaler.scale(loss / max(1, n)).backward()
        loss_sum += -float(logp.detach().sum())
        state.tokens += int(tr.lengths[idx].sum())
        state.samples += len(idx)
    _apply_step(run, optim, state, group, t0)
    return loss_sum / max(1, n)


def end_epoch(run: Run, optim: Optim, state: TrainState, logs: _Logs, *, epoch_end: bool = True) -> dict[str, float]:
    """Evaluate on the validation split, keep the epoch if it is the best so far, log it, decide early stopping;
    returns the validation metrics. ``epoch_end`` False: a pass inside the epoch (``--evals-per-epoch``), logged
    with the epoch as a decimal (1.25: one of four passes into the second epoch); it counts like an epoch below.

    The best epoch is :func:`rundir.is_better`'s: a finite loss below the best so far (the earlier epoch on a
    tie). A new best saves the adapter and a copy of the trainable tensors (a causal LM's generations.json too,
    with this pass's answers); any other epoch counts towards ``early_stop``. A validation loss that is NaN or
    infinite means the weights blew up: the run has diverged, and :class:`Diverged` is raised right after that
    evaluation is logged (metrics.jsonl shows the loss as null), before a checkpoint or ``on_epoch`` sees the epoch.
    """
    val, confusion, answers = _evaluate_validation(run)
    runtime.release_memory(full=False)                      # the epoch's activations, freed, back to the OS
    if epoch_end:
        state.epoch, state.next_batch, state.rung = state.epoch + 1, 0, 0
    else:
        state.rung += 1
    at = state.progress(run.cfg.evals_per_epoch)
    improved = rundir.is_better(val["loss"], state.best)
    if improved:
        state.best, state.best_epoch, state.bad_epochs = val["loss"], at, 0
        state.best_state = {n: p.detach().cpu().clone() for n, p in optim.params.items()}
        save_artifact(run)
        if answers:                                     # the kept adapter's answers, as its adapter/: written now
            write_generations(run, answers, at)
    else:
        state.bad_epochs += 1
    extra = {"confusion": confusion} if confusion is not None else {}
    state.history.append({"epoch": at, "step": state.step, **val, **extra})
    logs.record({"type": "eval", "split": "validation", "epoch": at, "step": state.step, **val, **extra})
    for k, v in val.items():
        logs.tb.add_scalar(f"validation/{k}", v, state.step)
    run.emit({"kind": "eval", "epoch": at, "epochs": run.epochs, "step": state.step, "metrics": val,
              "best": improved})
    if not math.isfinite(val["loss"]):
        raise Diverged(state.step, val["loss"], "validation loss")
    state.stopped_early = bool(run.cfg.early_stop and state.bad_epochs >= run.cfg.early_stop)
    if run.stop_collapsed and confusion is not None and state.step >= math.ceil(run.cfg.warmup * run.total) \
            and collapsed(confusion, val["loss"], run.data.train.labels):
        state.stopped_early = state.collapsed = True
        run.emit({"kind": "collapsed", "epoch": at, "step": state.step, "metrics": val})
        cells = np.asarray(confusion)
        log.warning("stopped at epoch %s: collapsed (%.0f%% of the validation predictions are one class, validation "
                    "loss %.4f is no better than predicting the class frequencies)", at,
                    100 * cells.sum(axis=0).max() / max(1, cells.sum()), val["loss"])
    return val


def _evaluate_validation(run: Run) -> tuple[dict[str, float], list[list[int]] | None, list[str]]:
    """The validation split's metrics; for a classifier, its confusion matrix (rows: true class, columns:
    predicted), which metrics.jsonl keeps with each pass (a search's intervals are drawn from it); for a causal LM,
    the greedy generations of its exact match, in row order (else empty)."""
    split = run.data.validation
    if isinstance(split, CausalSplit):
        metrics, answers = evaluate_split(run, split)
        return metrics, None, answers
    metrics, probs = evaluate(run.model, split, run.device, run.precision, run.data.pad_id)
    return metrics, confusion_matrix(split.labels, probs.argmax(axis=1), len(run.data.label_names)), []


def collapsed(confusion: Any, loss: float, train_labels: np.ndarray) -> bool:
    """A collapsed classifier: at least :data:`COLLAPSE_SHARE` of the predictions are one class (the confusion
    matrix's largest column) and the loss (nats) is at or above the entropy of the training labels'
    distribution, which a model that ignores its input reaches by predicting the class frequencies."""
    cells = np.asarray(confusion, dtype=np.float64)
    n = cells.sum()
    if n <= 0 or not math.isfinite(loss):
        return False
    freq = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=cells.shape[0]) / max(1, len(train_labels))
    entropy = float(-sum(p * math.log(p) for p in freq if p > 0))
    return cells.sum(axis=0).max() / n >= COLLAPSE_SHARE and loss >= entropy


def evaluate_split(run: Run, split: Encoded | CausalSplit) -> tuple[dict[str, float], list[str]]:
    """A split's metrics with the run's model, classification's :func:`evaluate` or :func:`evaluate_causal`, and
    a causal LM's greedy generations in row order (those its exact match compared; a classifier's: empty)."""
    if isinstance(split, CausalSplit):
        return evaluate_causal(run.model, run.tokenizer, split, run.device, run.precision, run.data.pad_id)
    return evaluate(run.model, split, run.device, run.precision, run.data.pad_id)[0], []


def baseline(run: Run, state: TrainState, logs: _Logs, *, evaluate_test: bool) -> None:
    """The base model (its fresh adapter is a no-op: B = 0) on validation and test before the first step: epoch 0
    of metrics.jsonl and ``results.json["baseline"]``, so a run shows what training added. A split whose metrics
    the caller gave (``run.given_baseline``: a search computes them once) is written as given, not evaluated.
    generations.json starts here with the base model's answers (``run.base_answers``: given, or from validation's
    evaluation here), the adapter's column null; a resume reads them back from it (:func:`rundir.base_answers`)."""
    run.emit({"kind": "baseline", "step": 0})
    state.baseline = {}
    given = run.given_baseline or {}
    for name, split in (("validation", run.data.validation), ("test", run.data.test)):
        if name == "test" and not evaluate_test:
            continue
        if name in given:
            metrics = dict(given[name])
        else:
            metrics, answers = evaluate_split(run, split)
            if name == "validation":
                run.base_answers = answers[:SAMPLE_ROWS]
        state.baseline[name] = metrics
        logs.record({"type": "eval", "split": name, "epoch": 0, "step": 0, **metrics})
        for k, v in metrics.items():
            logs.tb.add_scalar(f"{name}/{k}", v, 0)
        log.info("base model on %s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    write_generations(run, None, None)
    run.emit({"kind": "baseline_done", "metrics": state.baseline})


def write_generations(run: Run, answers: Sequence[str] | None, epoch: float | None) -> None:
    """generations.json (rundir.write_generations): the first validation rows with the base model's answers
    (``run.base_answers``) and ``answers``, the adapter's of the pass at ``epoch`` (None: none yet)."""
    split = run.data.validation
    assert isinstance(split, CausalSplit)
    rundir.write_generations(run.out, sample_rows(split, run.base_answers, answers), epoch)


def save_artifact(run: Run) -> Path:
    """The current weights as what the run leaves: the adapter (PEFT's files) or, for full fine-tuning, a
    transformers folder (safetensors, config with the label names, tokenizer); written atomically."""
    cfg = run.cfg
    meta: dict[str, Any] = {"id2label": run.data.label_names, "model": cfg.model, "max_length": cfg.max_length}
    if run.data.task == "causal-lm":
        meta.update(task="causal-lm", system_prompt=cfg.system_prompt)
    if run.spec is None:
        return save_model(run.model, run.artifact, tokenizer=run.tokenizer, label_names=run.data.label_names,
                          meta={**meta, "method": "full"})
    return save_adapter(run.model, run.artifact, run.spec, run.targets, base_model=model_hint(cfg.model), meta=meta)


def checkpoint(run: Run, optim: Optim, state: TrainState, logs: _Logs) -> Path:
    """Save ``state`` and ``optim`` as the checkpoint of this step (metrics.jsonl flushed first and its length
    kept, so a resume cuts off what is logged later); returns its path."""
    state.metrics_bytes = logs.flushed_size()
    return save_checkpoint(run.out / "checkpoints", state.step, state.to_checkpoint(optim))


def finish(run: Run, optim: Optim, state: TrainState, evaluate_test: bool) -> RunResult:
    """Back to the best epoch's weights, the test split's metrics (if ``evaluate_test``), results.json, the
    ``done`` event. The best epoch is :func:`rundir.best_evaluation` of the validation history."""
    best = rundir.best_evaluation(state.history)
    if best is None:                # every loss non-finite: only a checkpoint of an older version gets here
        raise Diverged(state.step, math.nan, "every validation loss")
    with torch.no_grad():
        for n, t in state.best_state.items():
            optim.params[n].copy_(t)
    best_val = {k: v for k, v in best.items() if k not in ("epoch", "step", "confusion")}
    test = None
    if evaluate_test:
        test = evaluate_split(run, run.data.test)[0]
        run.emit({"kind": "test", "metrics": test})
    stats = _train_stats(run, state)
    extra = {"baseline": state.baseline} if state.baseline is not None else {}
    rundir.write_json(run.out / "results.json", {"validation": best_val, "test": test, "best_epoch": best["epoch"],
                                                "train": stats, "history": state.history, **extra})
    run.emit({"kind": "done", "run_dir": str(run.out)})
    return RunResult(run.out, best_val, test, best["epoch"], stats)


def _train_stats(run: Run, state: TrainState) -> dict[str, Any]:
    """results.json's ``train``: throughput, length, sizes, and the first epoch's padding share."""
    seconds = max(state.seconds, 1e-9)
    trainable, total_params = count_parameters(run.model)
    return {"tokens_per_s": state.tokens / seconds, "samples_per_s": state.samples / seconds,
            "seconds": state.seconds, "steps": state.step, "epochs_run": state.progress(run.cfg.evals_per_epoch),
            "stopped_early": state.stopped_early, **({"collapsed": True} if state.collapsed else {}), "precision": run.precision, "threads": run.threads,
            "trainable_params": trainable, "all_params": total_params, "adapter_bytes": artifact_bytes(run.artifact),
            "model_bytes": run.base_bytes,
            "padding_fraction": padding_fraction(run.data.train.lengths, _epoch_batches(run, 0)),
            **({"truncated_rows": run.data.train.truncated} if isinstance(run.data.train, CausalEncoded) else {})}


def artifact_bytes(folder: Path) -> int:
    """Bytes of the weights file(s) of an adapter or model folder (``*.safetensors``)."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _announce(run: Run, state: TrainState) -> None:
    """The ``start`` event and log line."""
    run.emit({"kind": "start", "total_steps": run.total, "epochs": run.epochs, "steps_per_epoch": run.steps_per_epoch,
              "step": state.step, "train_size": len(run.data.train), "precision": run.precision,
              "threads": run.threads, "device": str(run.device)})
    log.info("training %d steps (%d epochs of %d), %s on %s with %d threads", run.total, run.epochs,
             run.steps_per_epoch, run.precision, run.device, run.threads)


def _log_step(run: Run, optim: Optim, state: TrainState, logs: _Logs, loss: float) -> None:
    """A ``step`` event every step; metrics.jsonl and TensorBoard every ``log_every`` steps and at the last."""
    speed = state.tokens / max(state.seconds, 1e-9)
    if state.step % run.cfg.log_every == 0 or state.step == run.total:
        lr = optim.scheduler.get_last_lr()[0]
        logs.record({"type": "train", "step": state.step, "epoch": state.epoch + 1, "loss": loss, "lr": lr,
                     "tokens_per_s": speed})
        logs.tb.add_scalar("train/loss", loss, state.step)
        logs.tb.add_scalar("train/lr", lr, state.step)
    run.emit({"kind": "step", "step": state.step, "total_steps": run.total, "epoch": state.epoch + 1, "loss": loss,
              "tokens_per_s": speed, "seconds": state.seconds})


class _Logs:
    """metrics.jsonl and TensorBoard of a training run, open while it trains."""

    def __init__(self, run: Run, state: TrainState, resumed: bool) -> None:
        """A fresh start empties metrics.jsonl; a resume cuts it back to the checkpoint's length (the lines a
        killed run logged after it come again) and drops TensorBoard events past the checkpoint's step."""
        from torch.utils.tensorboard import SummaryWriter

        self.path = run.out / "metrics.jsonl"
        if resumed and self.path.exists():
            with open(self.path, "r+b") as f:
                f.truncate(state.metrics_bytes)
        # The checkpoint's own step was logged before it was written: TensorBoard keeps it and drops what came after.
        self.tb = SummaryWriter(str(run.out / "tb"), purge_step=state.step + 1 if resumed else None)
        self.file = open(self.path, "a" if resumed else "w", encoding="utf-8")

    def record(self, obj: dict[str, Any]) -> None:
        """One line of metrics.jsonl (NaN as null), flushed: a killed run keeps what it logged."""
        self.file.write(rundir.json_line(obj))
        self.file.flush()

    def flushed_size(self) -> int:
        """metrics.jsonl's length in bytes, all written lines included."""
        self.file.flush()
        return self.path.stat().st_size

    def close(self) -> None:
        """Flush and close both (a run that raised keeps everything it logged)."""
        self.tb.close()
        self.file.close()


__all__ = ["train", "fit", "setup", "optimizer_step", "end_epoch", "checkpoint", "finish",
           "class_weights", "prepare_data", "build_model", "evaluate", "Run", "RunResult", "Prepared", "Levers",
           "TrainState", "Diverged", "Interrupted", "InputError"]
