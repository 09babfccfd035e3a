"""The training loop end to end on a tiny local model: files, learning, resume after SIGKILL, API; and its
pieces (one optimizer step, the state a checkpoint holds) called on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import synthetic_rows, write_csv
from safetensors.torch import load_file

import loratune
from loratune.errors import Diverged, InputError, Interrupted
from loratune.tasks.batches import collate
from loratune.training import loop as trainer
from loratune.training.levers import Levers
from loratune.training.options import TrainConfig
from loratune.training.state import Optim, TrainState, linear_schedule

CLI = [sys.executable, "-m", "loratune"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _opts(model: str, data: str, **kw) -> dict:
    return {"model": model, "data": data, "epochs": 2, "batch_size": 8, "lr": 3e-3, "max_length": 32, "rank": 4,
            "alpha": 8, "log_every": 5, "threads": 1, **kw}


def _flags(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def test_train_writes_the_contract_files_and_learns(tmp_path, tiny_model_dir, tiny_data) -> None:
    r = loratune.train(out=tmp_path / "run", **_opts(tiny_model_dir, tiny_data, epochs=4))
    run = tmp_path / "run"
    assert {"config.yaml", "adapter", "metrics.jsonl", "results.json", "tb", "checkpoints"} <= {p.name for p in run.iterdir()}
    res = json.loads((run / "results.json").read_text())
    for split in ("validation", "test"):
        assert set(res[split]) == {"loss", "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"}
    assert res["validation"]["accuracy"] >= 0.9, res        # the sentiment word decides the label
    assert res["best_epoch"] == r.best_epoch and 1 <= r.best_epoch <= 4
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["type"] == "eval"] == [1, 2, 3, 4]
    assert sum(x["type"] == "train" for x in lines) == 4 * 40 // 5  # 320 rows / 8 = 40 steps an epoch
    assert res["train"]["tokens_per_s"] > 0 and res["train"]["trainable_params"] > 0
    assert json.loads((run / "adapter" / "loratune.json").read_text())["id2label"] == ["neg", "pos"]
    # the best epoch's validation metrics are the ones kept
    best = next(x for x in lines if x["type"] == "eval" and x["epoch"] == r.best_epoch)
    assert best["loss"] == pytest.approx(res["validation"]["loss"]) == min(x["loss"] for x in lines if x["type"] == "eval")


def test_schedule_is_linear_warmup_then_decay() -> None:
    f = linear_schedule(total=100, warmup=10)
    assert [f(0), f(5), f(10), f(55), f(100)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_same_seed_same_adapter_and_max_steps(tmp_path, tiny_model_dir, tiny_data) -> None:
    a = loratune.train(out=tmp_path / "a", **_opts(tiny_model_dir, tiny_data, epochs=1))
    b = loratune.train(out=tmp_path / "b", **_opts(tiny_model_dir, tiny_data, epochs=1))
    wa, wb = (load_file(str(r.run_dir / "adapter" / "adapter_model.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = loratune.train(out=tmp_path / "c", **_opts(tiny_model_dir, tiny_data, epochs=5, max_steps=50))
    assert c.train["steps"] == 50 and c.train["epochs_run"] == 2


def _fresh_model(cfg: TrainConfig, data: trainer.Prepared, out: Path, head_bias: list[float] | None) -> trainer.Run:
    """A fresh fp32 run on the CPU, its model in eval mode (its own dropout off, so batch shapes can't change
    what is computed); ``head_bias``: the classifier's bias set to it (predictions that favour a class)."""
    run = trainer.setup(cfg, data, out, device=torch.device("cpu"), precision="fp32", threads=1, levers=Levers(),
                        emit=lambda event: None)
    run.model.eval()
    if head_bias is not None:
        with torch.no_grad():
            next(p for n, p in run.model.named_parameters() if "classifier" in n and n.endswith("bias")).copy_(
                torch.tensor(head_bias))
    return run


def _first_step(cfg: TrainConfig, data: trainer.Prepared, group: list[np.ndarray], out: Path,
                head_bias: list[float] | None = None) -> dict:
    """One optimizer_step of a :func:`_fresh_model` on ``group``: the loss, the gradients AdamW got and the
    updated tensors."""
    run = _fresh_model(cfg, data, out, head_bias)
    optim = Optim.create(run.model, cfg, total=run.total, device=run.device, precision="fp32")
    before = {n: p.detach().clone() for n, p in optim.params.items()}
    grads: list[dict[str, torch.Tensor]] = []
    optim.optimizer.register_step_pre_hook(
        lambda opt, args, kw: grads.append({n: p.grad.clone() for n, p in optim.params.items() if p.grad is not None}))
    state = TrainState()
    loss = trainer.optimizer_step(run, optim, state, group)
    return {"loss": loss, "grads": grads[0], "before": before, "state": state, "run": run,
            "after": {n: p.detach().clone() for n, p in optim.params.items()}}


def test_grad_accum_2x4_is_one_batch_of_8(tmp_path, tiny_model_dir, tiny_data) -> None:
    """Two micro-batches of 4 accumulate to the gradient of the mean loss over all 8: the same loss, the same
    gradients and the same updated LoRA weights as one batch of 8 (dropout off, no clipping, no warm-up)."""
    cfg = TrainConfig.from_dict(_opts(tiny_model_dir, tiny_data, dropout=0.0, precision="fp32", warmup=0.0, clip=0))
    data = trainer.prepare_data(cfg)
    idx = np.arange(8)
    one = _first_step(cfg, data, [idx], tmp_path)
    two = _first_step(cfg.replace(batch_size=4, grad_accum=2), data, [idx[:4], idx[4:]], tmp_path)
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
    assert one["grads"].keys() == two["grads"].keys() and any("lora_B" in n for n in one["grads"])
    for n, g in one["grads"].items():
        assert g.abs().max() > 0 or "lora_A" in n, n               # B = 0 at the start: A gets no gradient yet
        assert torch.linalg.norm(g - two["grads"][n]) <= 1e-3 * torch.linalg.norm(g) + 1e-8, n    # to rounding
    moved = [n for n in one["after"] if not torch.equal(one["after"][n], one["before"][n])]
    assert any("lora_B" in n for n in moved)
    for n, w in one["after"].items():
        assert torch.allclose(w, two["after"][n], rtol=1e-5, atol=1e-7), n
    assert (one["state"].step, one["state"].next_batch, one["state"].samples) == (1, 1, 8)
    assert (two["state"].step, two["state"].next_batch, two["state"].samples) == (1, 2, 8)
    assert one["state"].tokens == two["state"].tokens == int(data.train.lengths[idx].sum())


def test_balanced_class_weights_are_sklearns_and_weight_the_loss(tmp_path, tiny_model_dir) -> None:
    from sklearn.utils.class_weight import compute_class_weight

    rows = synthetic_rows(300)[:200] + [r for r in synthetic_rows(300)[200:] if r[1] == "pos"]   # 150 pos, 100 neg
    data_path = write_csv(tmp_path / "skewed.csv", rows)
    cfg = TrainConfig.from_dict(_opts(tiny_model_dir, data_path, dropout=0.0, precision="fp32", class_weights="balanced"))
    data = trainer.prepare_data(cfg)
    labels = data.train.labels
    w = trainer.class_weights(labels, 2)
    ref = compute_class_weight("balanced", classes=np.arange(2), y=labels)
    assert torch.allclose(w, torch.tensor(ref, dtype=torch.float32)) and abs(ref[0] - ref[1]) > 0.1
    assert torch.allclose(w, torch.tensor([len(labels) / (2 * (labels == c).sum()) for c in (0, 1)], dtype=torch.float32))
    group = [np.concatenate([np.flatnonzero(labels == 0)[:2], np.flatnonzero(labels == 1)[:6]])]   # 2 of one, 6 of the other
    step = _first_step(cfg, data, group, tmp_path, head_bias=[1.0, -1.0])      # class 1 examples: larger losses
    assert torch.equal(step["run"].weight, w)
    b = collate(data.train, group[0], data.pad_id)
    model = _fresh_model(cfg, data, tmp_path, head_bias=[1.0, -1.0]).model
    with torch.no_grad():                                       # the same fresh model, before its step
        per_example = F.cross_entropy(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"], reduction="none")
    wy = w[b["labels"]]
    weighted = float((wy * per_example).sum() / wy.sum())      # sum_i w[y_i] l_i / sum_i w[y_i]
    assert step["loss"] == pytest.approx(weighted, rel=1e-5)
    assert abs(weighted - float(per_example.mean())) > 0.05      # the weights did change the loss


def test_grad_accum_counts_optimizer_steps(tmp_path, tiny_model_dir) -> None:
    data = write_csv(tmp_path / "skewed.csv", synthetic_rows(300)[:200] + [r for r in synthetic_rows(300)[200:] if r[1] == "pos"])
    r = loratune.train(out=tmp_path / "r", **_opts(tiny_model_dir, data, epochs=1, grad_accum=3,
                                                  class_weights="balanced", bucket=False, precision="fp32"))
    # 250 rows -> 200 train; 25 batches of 8 -> 9 optimizer steps of up to 3 batches (the last of 1)
    assert r.train["steps"] == 9 and r.train["samples_per_s"] > 0
    lines = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["type"] == "train"] == [5, 9]


def _kill_after_checkpoint(cmd: list[str], run: Path, min_step: int) -> None:
    """Start ``cmd``, SIGKILL it as soon as a checkpoint at or past ``min_step`` exists."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.stem[5:]) for p in (run / "checkpoints").glob("step-*.pt")] if (run / "checkpoints").is_dir() else []
        if steps and max(steps) >= min_step:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists(), "the run finished before it could be killed"


def test_resume_after_sigkill_gives_the_same_adapter(tmp_path, tiny_model_dir) -> None:
    data = write_csv(tmp_path / "more.csv", synthetic_rows(1500, seed=3))      # 1,200 train rows: 150 steps/epoch
    opts = _opts(tiny_model_dir, data, epochs=3, checkpoint_every=20, dropout=0.1)
    ref = loratune.train(out=tmp_path / "ref", **opts)
    w_ref = load_file(str(ref.run_dir / "adapter" / "adapter_model.safetensors"))
    for n, kill_at in enumerate((40, 200)):                 # mid-epoch 1; mid-epoch 2 (after an evaluation)
        run = tmp_path / f"killed-{n}"
        _kill_after_checkpoint(CLI + ["train", "--out", str(run), *_flags(opts)], run, kill_at)
        out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        w_res = load_file(str(run / "adapter" / "adapter_model.safetensors"))
        assert w_ref.keys() == w_res.keys()
        for k in w_ref:
            assert (w_ref[k] - w_res[k]).abs().max().item() <= 1e-6, k
        res_ref = json.loads((ref.run_dir / "results.json").read_text())
        res = json.loads((run / "results.json").read_text())
        assert res["validation"] == pytest.approx(res_ref["validation"], abs=1e-6)
        assert res["best_epoch"] == res_ref["best_epoch"]
        ref_lines = (ref.run_dir / "metrics.jsonl").read_text().splitlines()
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [json.loads(x)["step"] for x in ref_lines]  # none twice
    again = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0 and "already finished" in again.stdout


def test_sigint_checkpoints_exits_130_and_resumes(tmp_path, tiny_model_dir, tiny_data) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(CLI + ["train", "--out", str(run), *_flags(_opts(tiny_model_dir, tiny_data, epochs=3))],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err and "Traceback" not in err
    assert list((run / "checkpoints").glob("step-*.pt"))
    out = subprocess.run(CLI + ["train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (run / "results.json").exists()


def test_library_rejects_bad_options(tmp_path, tiny_model_dir, tiny_data) -> None:
    with pytest.raises(InputError, match="--lr"):
        loratune.train(out=tmp_path / "x", **_opts(tiny_model_dir, tiny_data, lr=0))
    with pytest.raises(InputError, match="unknown training option 'rnak'"):
        loratune.train(out=tmp_path / "x", rnak=3)
    assert not (tmp_path / "x").exists()


def test_early_stop_after_epochs_without_improvement(tmp_path, tiny_model_dir, tiny_data, monkeypatch) -> None:
    """--early-stop 2: validation losses 0.5, 0.4, 0.45, 0.46 stop the run after epoch 4 (two epochs without a
    new best), keep epoch 2 as the best, and leave epoch 2's adapter (not epoch 4's) in the run directory."""
    from loratune.training import loop as trainer

    scripted = iter([0.5, 0.4, 0.45, 0.46, 0.3, 0.2])          # 0.3 and later: never reached by validation
    snapshots: list[dict[str, torch.Tensor]] = []              # LoRA weights at each evaluation, in call order
    real = trainer.evaluate

    def scripted_evaluate(model, enc, *a, **kw):
        metrics, probs = real(model, enc, *a, **kw)
        snapshots.append({n.replace(".adapters.default", ""): p.detach().clone()
                          for n, p in model.named_parameters() if "lora_" in n})
        return {**metrics, "loss": next(scripted)}, probs

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    r = loratune.train(out=tmp_path / "run", **_opts(tiny_model_dir, tiny_data, epochs=6, early_stop=2))
    assert r.train["stopped_early"] is True and r.train["epochs_run"] == 4 and r.best_epoch == 2
    assert r.validation["loss"] == pytest.approx(0.4)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["type"] == "eval"] == [1, 2, 3, 4]
    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    lora = {k.removeprefix("base_model.model.").removesuffix(".weight"): v for k, v in saved.items() if "lora_" in k}
    epoch2, epoch4 = snapshots[1], snapshots[3]
    assert lora and set(lora) == set(epoch2)
    assert all(torch.equal(v, epoch2[k]) for k, v in lora.items())
    assert not all(torch.equal(v, epoch4[k]) for k, v in lora.items())   # it did train on after epoch 2


RELEASE = """
import sys, psutil, torch
from loratune.runtime import release_memory
me = psutil.Process()
big = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del big                                       # glibc raises its mmap threshold to 16 MB (it does so up to 32 MB)
keep, freed = [], []
for _ in range(400):
    freed.append(torch.empty(1 << 20, dtype=torch.uint8).fill_(1))   # 1 MB each, now from the heap, touched
    keep.append(torch.ones(16))                                       # small blocks pin the heap between them
del freed
before = me.memory_full_info().uss
ran = release_memory(full=sys.argv[1] == "full")
print(ran, (before - me.memory_full_info().uss) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
@pytest.mark.parametrize("kind", ["full", "young"])
def test_release_memory_hands_a_fragmented_heap_back(kind) -> None:
    """Without it a reused Ray worker grew by ~0.9 GB a trial (freed activations stay in glibc's heap); the
    trim alone (``full=False``, young generations collected) hands it back as well as a full collection."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}   # glibc's defaults
    ran, returned_mib = subprocess.run([sys.executable, "-c", RELEASE, kind], capture_output=True, text=True,
                                       env=env, check=True).stdout.split()
    assert ran == "True" and int(returned_mib) >= 350       # of the 400 MB freed


def test_validation_passes_collect_only_the_young_generations(tmp_path, tiny_model_dir, tiny_data, monkeypatch) -> None:
    """A full collection walks every object of torch and transformers (0.3-0.4 s in a search's trial, four times an
    epoch): the passes inside and at the end of an epoch collect generations 0-1 and trim; the run's end (and a
    search between trials) collects everything once."""
    import gc

    calls: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or real(generation))
    loratune.train(out=tmp_path / "run", **_opts(tiny_model_dir, tiny_data, epochs=2, evals_per_epoch=2))
    assert calls == [1, 1, 1, 1, 2]                             # 2 epochs x 2 passes, then the end of the run


def test_a_nonfinite_validation_loss_ends_the_run_as_diverged(tmp_path, tiny_model_dir, tiny_data, monkeypatch) -> None:
    """Epoch 2's validation loss is NaN: Diverged is raised right after that evaluation is logged (metrics.jsonl
    has it, loss null); no checkpoint, ``on_epoch`` or results.json sees epoch 2; epoch 1's adapter stays."""
    scripted = iter([0.5, float("nan"), 0.45, 0.4])             # 0.45 and later: only if the run went on
    real = trainer.evaluate

    def scripted_evaluate(model, enc, *a, **kw):
        metrics, probs = real(model, enc, *a, **kw)
        return {**metrics, "loss": next(scripted)}, probs

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    run, seen, events = tmp_path / "run", [], []
    with pytest.raises(Diverged, match="at step 80: validation loss is nan") as e:
        loratune.train(out=run, on_epoch=lambda epoch, val, ckpt: seen.append(epoch), progress=events.append,
                       **_opts(tiny_model_dir, tiny_data, epochs=3))
    assert e.value.step == 80                                   # 40 steps an epoch
    assert seen == [1] and not (run / "results.json").exists()
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [(x["epoch"], x["loss"]) for x in evals] == [(1, 0.5), (2, None)]
    assert [ev["epoch"] for ev in events if ev["kind"] == "eval"] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-00000040.pt"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_blown_up_weights_exit_1_as_diverged(tmp_path, tiny_model_dir, tiny_data, monkeypatch, capsys) -> None:
    """The epoch's last step leaves infinite weights (the training loss of that step was still finite): the
    validation loss is NaN, the only epoch has no finite loss, and ``loratune train`` ends as diverged (exit 1
    with Diverged's message), not with an internal error."""
    from loratune.cli.main import main

    real_step = trainer.optimizer_step

    def blow_up_at_the_end(run, optim, state, group):
        loss = real_step(run, optim, state, group)
        if state.step == run.total:
            with torch.no_grad():
                for p in optim.params.values():
                    p.fill_(float("inf"))
        return loss

    monkeypatch.setattr(trainer, "optimizer_step", blow_up_at_the_end)
    out = tmp_path / "run"
    argv = ["train", "--out", str(out), *_flags(_opts(tiny_model_dir, tiny_data, epochs=1))]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "training diverged at step 40: validation loss is nan" in err and "internal error" not in err, err
    assert not (out / "results.json").exists()
    assert '"loss": null' in (out / "metrics.jsonl").read_text().splitlines()[-1]


def test_train_state_checkpoint_round_trip(tmp_path) -> None:
    """Every field (early stopping included) and the optimizer-side states survive torch.save and a
    ``weights_only`` load; the restore puts the tensors and the RNG back."""
    model = torch.nn.Linear(3, 2)
    cfg = TrainConfig(lr=0.1, warmup=0.0)
    optim = Optim.create(model, cfg, total=10, device=torch.device("cpu"), precision="fp32")
    model(torch.ones(4, 3)).sum().backward()
    optim.optimizer.step()
    optim.scheduler.step()
    state = TrainState(step=7, epoch=2, next_batch=3, best=0.25, best_epoch=1, bad_epochs=1, stopped_early=True,
                       best_state={"weight": torch.ones(2, 3)}, history=[{"epoch": 1, "step": 4, "loss": 0.25}],
                       seconds=1.5, tokens=99, samples=12, metrics_bytes=321)
    torch.save(state.to_checkpoint(optim), tmp_path / "c.pt")
    rng = torch.rand(5)                                         # what the next draw is after the save
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    fresh = torch.nn.Linear(3, 2)
    optim2 = Optim.create(fresh, cfg, total=10, device=torch.device("cpu"), precision="fp32")
    back = TrainState.from_checkpoint(ckpt, optim2)
    assert back.__dict__.keys() == state.__dict__.keys()
    for k, v in state.__dict__.items():
        assert torch.equal(back.best_state["weight"], v["weight"]) if k == "best_state" else getattr(back, k) == v, k
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert optim2.scheduler.last_epoch == 1 and optim2.optimizer.state_dict()["state"].keys() == {0, 1}
    assert torch.equal(torch.rand(5), rng)
    old = {k: v for k, v in ckpt.items() if k != "stopped_early"} | {"best": float("inf")}   # an older checkpoint
    assert TrainState.from_checkpoint(old, optim2).stopped_early is False


def test_a_checkpoint_keeps_cudas_generators_where_cuda_is_in_use(tmp_path, monkeypatch) -> None:
    """On a GPU dropout draws from CUDA's generators: a checkpoint saves them (as transformers' Trainer) and a
    resume puts them back; on a CPU-only run the checkpoint has none. (No GPU here: CUDA's calls are stand-ins.)"""
    model = torch.nn.Linear(3, 2)
    cfg = TrainConfig(lr=0.1, warmup=0.0)
    optim = Optim.create(model, cfg, total=10, device=torch.device("cpu"), precision="fp32")
    assert "cuda_rng" not in TrainState().to_checkpoint(optim)
    states = [torch.arange(8, dtype=torch.uint8), torch.arange(8, 16, dtype=torch.uint8)]
    put: list[list[torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    torch.save(TrainState(step=3).to_checkpoint(optim), tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", put.append)
    assert TrainState.from_checkpoint(ckpt, optim).step == 3
    assert len(put) == 1 and all(torch.equal(a, b) for a, b in zip(put[0], states))


def test_resume_after_the_early_stop_checkpoint_trains_no_more(tmp_path, tiny_model_dir, tiny_data,
                                                                monkeypatch) -> None:
    """Killed after the checkpoint of the epoch that stopped early, before results.json: ``--resume`` trains
    nothing more and ends exactly where the uninterrupted run did (results, adapter, metrics)."""
    opts = _opts(tiny_model_dir, tiny_data, epochs=6, early_stop=1)
    prepared = trainer.prepare_data(TrainConfig.from_dict(opts))
    losses = [0.5, 0.4, 0.45, 0.3, 0.2, 0.1]      # stops after epoch 3; epoch 4 would be a new best
    real = trainer.evaluate

    def scripted_evaluate(model, enc, *a, **kw):
        metrics, probs = real(model, enc, *a, **kw)
        return ({**metrics, "loss": losses.pop(0)} if enc is prepared.validation else metrics), probs

    monkeypatch.setattr(trainer, "evaluate", scripted_evaluate)
    run = tmp_path / "run"
    r = loratune.train(out=run, prepared=prepared, **opts)
    assert r.train["stopped_early"] is True and r.train["epochs_run"] == 3 and r.best_epoch == 2
    files = ("results.json", "metrics.jsonl", "adapter/adapter_model.safetensors")
    finished = {name: (run / name).read_bytes() for name in files}
    (run / "results.json").unlink()                             # the kill: after the last checkpoint, before this
    events: list[dict] = []
    again = loratune.train(out=run, resume=True, prepared=prepared, progress=events.append)
    assert not any(ev["kind"] in ("step", "eval") for ev in events) and len(losses) == 3
    assert json.loads((run / "results.json").read_bytes()) == json.loads(finished["results.json"])
    assert all((run / name).read_bytes() == finished[name] for name in files[1:])
    assert (again.best_epoch, again.train, again.validation) == (r.best_epoch, r.train, r.validation)


def _killed_in_an_evaluation_then_resumed(monkeypatch, run: Path, opts: dict, kill):
    """Train in ``run``, raising KeyboardInterrupt (the kill) inside the n-th validation pass (1-based) at ``step``
    where ``kill(step, n)`` holds, before that pass's checkpoint; then ``--resume`` it and return the result."""
    real_end, calls = trainer.end_epoch, []

    def killed(r, optim, state, logs, **kw):
        calls.append(state.step)
        if kill(state.step, len(calls)):
            raise KeyboardInterrupt
        return real_end(r, optim, state, logs, **kw)

    monkeypatch.setattr(trainer, "end_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        loratune.train(out=run, **opts)
    monkeypatch.setattr(trainer, "end_epoch", real_end)
    return loratune.train(out=run, resume=True)


def _tb_steps(run: Path) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in ("train/loss", "validation/loss")}


def test_ctrl_c_at_a_pass_inside_the_epoch_resumes_with_that_pass_in_its_place(tmp_path, tiny_model_dir,
                                                                             tiny_data) -> None:
    """Ctrl-C at step 10 of 40, where --evals-per-epoch 4 validates: the checkpoint comes before that pass, and the
    resumed run makes it at step 10 (it came one step late, at 11), ending on the uninterrupted run's adapter and log
    lines; TensorBoard keeps the checkpoint step's own events (a resume dropped them)."""
    opts = _opts(tiny_model_dir, tiny_data, evals_per_epoch=4)
    ref = loratune.train(out=tmp_path / "ref", **opts)

    def ctrl_c(event: dict) -> None:
        if event["kind"] == "step" and event["step"] == 10:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="interrupted at step 10"):
        loratune.train(out=tmp_path / "run", progress=ctrl_c, **opts)
    again = loratune.train(out=tmp_path / "run", resume=True)
    lines = [(x["type"], x["step"], x.get("epoch"))
             for x in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert lines == [(x["type"], x["step"], x.get("epoch"))
                     for x in map(json.loads, (ref.run_dir / "metrics.jsonl").read_text().splitlines())]
    assert ("eval", 10, 0.25) in lines
    assert (again.best_epoch, again.validation, again.test) == (ref.best_epoch, ref.validation, ref.test)
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / weights).read_bytes() == (ref.run_dir / weights).read_bytes()
    assert _tb_steps(tmp_path / "run") == _tb_steps(ref.run_dir)


@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_from_a_checkpoint_at_the_last_step_still_evaluates_it(tmp_path, tiny_model_dir, tiny_data,
                                                                      monkeypatch, epochs) -> None:
    """``--max-steps`` ending mid-epoch with ``--checkpoint-every`` leaves a checkpoint at the last step, taken
    before that epoch's evaluation; killed during the evaluation, ``--resume`` must run it (it once went
    straight to the end: no history, "diverged") and end where the uninterrupted run did."""
    steps = 40 * (epochs - 1) + 10                                  # 40 steps an epoch: the last one ends mid-way
    opts = _opts(tiny_model_dir, tiny_data, epochs=epochs, max_steps=steps, checkpoint_every=5)
    ref = loratune.train(out=tmp_path / "ref", **opts)
    # the kill, in the last evaluation (before the epoch's checkpoint)
    again = _killed_in_an_evaluation_then_resumed(monkeypatch, tmp_path / "run", opts,
                                                  lambda step, n: step == steps and n == epochs)
    assert (again.best_epoch, again.validation, again.test) == (ref.best_epoch, ref.validation, ref.test)
    assert again.train["steps"] == ref.train["steps"] == steps
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / weights).read_bytes() == (tmp_path / "ref" / weights).read_bytes()


def test_evals_per_epoch_validates_each_quarter_and_a_resume_from_a_quarter_ends_equal(tmp_path, tiny_model_dir,
                                                                                      tiny_data, monkeypatch) -> None:
    """--evals-per-epoch 4 on 40 steps an epoch: validation after steps 10, 20, 30, 40, ... logged as epochs 0.25 …
    2 with each pass's confusion matrix; killed inside the third pass (before its checkpoint), the resumed run
    ends on the very adapter, results and log lines of the uninterrupted one; more passes than steps: refused."""
    opts = _opts(tiny_model_dir, tiny_data, evals_per_epoch=4)
    ref = loratune.train(out=tmp_path / "ref", **opts)
    evals = [json.loads(x) for x in (ref.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in evals if x["type"] == "eval"]
    assert [x["epoch"] for x in evals] == [0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2]
    assert [x["step"] for x in evals] == [10, 20, 30, 40, 50, 60, 70, 80]
    for x in evals:                                          # 40 validation rows, 20 a class: rows are true classes
        c = np.asarray(x["confusion"])
        assert c.shape == (2, 2) and c.sum() == 40 and list(c.sum(axis=1)) == [20, 20]
        assert np.trace(c) / 40 == pytest.approx(x["accuracy"])
    assert ref.train["epochs_run"] == 2 and ref.best_epoch in [x["epoch"] for x in evals]
    assert "confusion" not in ref.validation
    again = _killed_in_an_evaluation_then_resumed(monkeypatch, tmp_path / "run", opts, lambda step, n: n == 3)
    assert (again.best_epoch, again.validation, again.test) == (ref.best_epoch, ref.validation, ref.test)
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / weights).read_bytes() == (ref.run_dir / weights).read_bytes()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(x["type"], x["step"], x.get("epoch")) for x in lines] == \
        [(x["type"], x["step"], x.get("epoch")) for x in map(json.loads, (ref.run_dir / "metrics.jsonl").read_text().splitlines())]
    with pytest.raises(InputError, match="--evals-per-epoch: 41 .* an epoch has 40 optimizer step"):
        loratune.train(out=tmp_path / "x", **_opts(tiny_model_dir, tiny_data, evals_per_epoch=41))


def test_collapsed_is_one_class_and_a_loss_at_the_label_entropy() -> None:
    """Closed form: balanced labels have entropy ln 2 = 0.6931 nats; skewed 3:1 labels 0.5623."""
    balanced, skewed = np.array([0, 1] * 50), np.array([0, 0, 0, 1] * 25)
    constant = [[20, 0], [20, 0]]                                    # every prediction class 0
    assert trainer.collapsed(constant, 0.6932, balanced) and trainer.collapsed(constant, 3.0, balanced)
    assert not trainer.collapsed(constant, 0.6930, balanced)         # below ln 2: it knows something
    assert trainer.collapsed(constant, 0.5624, skewed) and not trainer.collapsed(constant, 0.5622, skewed)
    assert trainer.collapsed([[18, 2], [18, 2]], 0.7, balanced)      # 90% one class: near-constant
    assert not trainer.collapsed([[17, 3], [18, 2]], 0.7, balanced)  # 35 of 40 = 87.5%
    assert not trainer.collapsed(constant, float("nan"), balanced)   # non-finite: diverged, not collapsed


def test_a_collapsed_classifier_stops_at_its_first_pass_after_warm_up(tmp_path, tiny_model_dir, tiny_data,
                                                                     monkeypatch) -> None:
    """stop_collapsed (a search's trials): one class predicted with loss 0.70 >= ln 2 at every pass; warm-up 30% of
    80 steps = 24, so the passes at steps 10 and 20 are not checked and the one at 30 (epoch 0.75) stops the run;
    without stop_collapsed the same run trains on."""
    real = trainer.evaluate

    def one_class(model, enc, *a, **kw):
        metrics, probs = real(model, enc, *a, **kw)
        probs = np.tile(np.array([[0.6, 0.4]], dtype=probs.dtype), (len(probs), 1))
        return {**metrics, "loss": 0.70}, probs

    monkeypatch.setattr(trainer, "evaluate", one_class)
    events: list[dict] = []
    opts = _opts(tiny_model_dir, tiny_data, evals_per_epoch=4, warmup=0.3)
    r = loratune.train(out=tmp_path / "run", stop_collapsed=True, progress=events.append, **opts)
    assert r.train["collapsed"] is True and r.train["stopped_early"] is True and r.train["epochs_run"] == 0.75
    assert [ev["epoch"] for ev in events if ev["kind"] == "collapsed"] == [0.75]
    assert [ev["step"] for ev in events if ev["kind"] == "eval"] == [10, 20, 30]
    plain = loratune.train(out=tmp_path / "plain", **opts)
    assert "collapsed" not in plain.train and plain.train["epochs_run"] == 2
