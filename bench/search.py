"""Benchmark 2: search wall time. ``loratune tune`` as ``make demo`` runs it (the default space, 8 samples, ≤ 3
epochs, ASHA grace one rung / reduction 4 at 4 rungs an epoch, val_loss, built-in model and data, seed 0) against
a faithful re-implementation of the seed's Ray Tune + peft search (``reference``, below: the seed's space, fp32,
random batches, 2 CPUs per trial, ASHA grace 1 epoch / reduction 2, scored on loratune's own split). Each side runs as a child process; its whole process tree's
RSS and PSS (Ray's processes and workers included) are sampled every 0.5 s for the peaks.

    python -m bench.search                 # both sides, then the table (about 30 minutes)
    python -m bench.search --side ours     # one side only
    python -m bench.search --split-seed 1  # both sides on another stratified cut (default 0, `make demo`'s)
    python -m bench.search --seed 1        # both sides with another sampler and training seed (default 0)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SAMPLES, MAX_EPOCHS, SEED = 8, 3, 0
SPLIT_SEED = 0                     # the train/validation/test cut both sides use (``--split-seed``)
OURS_ARGS: list[str] = []          # extra ``loratune tune`` flags for our side (``--ours-args``), e.g. other rungs


# --- the reference: the seed's Ray Tune + peft code ------------------------------------------------------------

def _seed_trainable(config: dict[str, Any], data: dict[str, Any], seed: int = 0) -> None:
    """One trial as the seed wrote it: peft model, fp32, DataLoader with random batches, a torch loop, a report
    of validation loss and accuracy after each epoch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import tune
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    from loratune.training.models import load_tokenizer, resolve_model_path

    torch.manual_seed(seed)
    path = resolve_model_path("minilm-l6")
    tok = load_tokenizer("minilm-l6")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=config["rank"], lora_alpha=config["rank"],
                                             lora_dropout=config["dropout"], target_modules=list(config["targets"])))
    collate = DataCollatorWithPadding(tok)
    train = DataLoader(data["train"], batch_size=16, shuffle=True, collate_fn=collate,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(data["validation"], batch_size=64, shuffle=False, collate_fn=collate)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"], weight_decay=0.01)
    total = MAX_EPOCHS * len(train)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * total), total)
    for epoch in range(MAX_EPOCHS):
        model.train()
        for batch in train:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        model.eval()
        loss_sum, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for batch in val:
                out = model(**batch)
                loss_sum += out.loss.item() * len(batch["labels"])
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                n += len(batch["labels"])
        tune.report({"val_loss": loss_sum / n, "val_accuracy": correct / n, "epoch": epoch + 1})


def reference(out: Path) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from loratune.search.driver import (
        _ray_session,  # only to start Ray quietly in a short temp folder
    )
    from loratune.training.loop import prepare_data
    from loratune.training.options import TrainConfig

    t0 = time.monotonic()
    prepared = prepare_data(TrainConfig(split_seed=SPLIT_SEED))
    rows = lambda enc: [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": int(y)}  # noqa: E731
                        for ids, y in zip(enc.input_ids, enc.labels)]
    data = {"train": rows(prepared.train), "validation": rows(prepared.validation)}
    space = {"lr": tune.loguniform(1e-4, 1e-1), "rank": tune.choice([2, 4, 6, 8, 10, 16]),
             "targets": tune.choice([["query"], ["value"], ["query", "value"]]), "dropout": tune.uniform(0.1, 0.5)}
    out.mkdir(parents=True, exist_ok=True)
    with _ray_session(None, out / "ray.log"):
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_seed_trainable, data=data, seed=SEED), {"cpu": 2}),
            param_space=space,
            tune_config=tune.TuneConfig(metric="val_loss", mode="min", num_samples=SAMPLES,
                                        search_alg=BasicVariantGenerator(random_state=SEED),
                                        scheduler=ASHAScheduler(max_t=MAX_EPOCHS, grace_period=1, reduction_factor=2)),
            run_config=tune.RunConfig(name="reference", storage_path=str(out.resolve()), verbose=0))
        grid = tuner.fit()
        best = grid.get_best_result(metric="val_loss", mode="min", scope="all")
        df = best.metrics_dataframe
        row = df.loc[df["val_loss"].idxmin()]
        accs = [r.metrics_dataframe["val_accuracy"].max() for r in grid if r.metrics_dataframe is not None]
        res = {"seconds": time.monotonic() - t0, "best_val_loss": float(row["val_loss"]),
               "best_val_accuracy": float(row["val_accuracy"]), "max_val_accuracy": float(max(accs)),
               "best_config": {k: best.config[k] for k in ("lr", "rank", "targets", "dropout")}, "trials": len(grid),
               "val_n": len(data["validation"]),
               "epochs_trained": sum(len(r.metrics_dataframe) for r in grid if r.metrics_dataframe is not None)}
    return res


def ours(out: Path) -> dict[str, Any]:
    """``loratune tune`` exactly as ``make demo`` runs it (the CLI, the default space, rungs and ASHA, seed 0)."""
    t0 = time.monotonic()
    exe = Path(sys.executable).with_name("loratune")
    cmd = [str(exe), "tune", "--samples", str(SAMPLES), "--max-epochs", str(MAX_EPOCHS), "--seed", str(SEED),
           "--split-seed", str(SPLIT_SEED), "--out", str(out), "--overwrite", *OURS_ARGS]
    with open(out.parent / "ours.stdout", "w", encoding="utf-8") as f:     # the table and summary a user sees
        subprocess.run(cmd, check=True, stdout=f)
    seconds = time.monotonic() - t0
    summary = json.loads((out / "search.json").read_text())
    trials = json.loads((out / "trials.json").read_text())
    best = summary["best"]
    from loratune.training.loop import prepare_data
    from loratune.training.options import TrainConfig

    val_n = len(prepare_data(TrainConfig(split_seed=SPLIT_SEED)).validation.labels)     # after the clock stopped
    return {"seconds": seconds, "val_n": val_n, "best_val_loss": best["validation"]["loss"],
            "best_val_accuracy": best["validation"]["accuracy"],
            "max_val_accuracy": max(t["val_accuracy"] for t in trials if t.get("val_accuracy") is not None),
            "best_config": best["config"], "trials": len(trials), "statuses": summary["statuses"],
            "epochs_trained": sum(float(t["epochs_run"] or 0) for t in trials), "tune_args": OURS_ARGS,
            "comparison": summary.get("comparison")}


# --- driver: each side in a child process, peak RSS and PSS of its process tree ---------------------------------------

def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) summed over ``pid``'s process tree. RSS counts a shared page once per process that maps it
    (Ray's shared memory, the libraries); PSS splits it between them, so its sum is the memory really used."""
    try:
        import psutil
    except ImportError:
        return 0, 0
    try:
        p = psutil.Process(pid)
        procs = [p] + p.children(recursive=True)
    except psutil.Error:
        return 0, 0
    rss = pss = 0
    for q in procs:
        try:
            m = q.memory_full_info()
            rss, pss = rss + m.rss, pss + getattr(m, "pss", m.rss)
        except psutil.Error:
            pass
    return rss, pss


def measure(side: str, root: Path) -> dict[str, Any]:
    result = root / f"{side}.json"
    result.unlink(missing_ok=True)
    child = subprocess.Popen([sys.executable, "-m", "bench.search", "--side", side, "--root", str(root), "--child",
                              "--samples", str(SAMPLES), "--max-epochs", str(MAX_EPOCHS), "--split-seed", str(SPLIT_SEED),
                              "--seed", str(SEED),
                              "--ours-args", shlex.join(OURS_ARGS)],
                             cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak = [0, 0]

    def sample() -> None:
        while child.poll() is None:
            rss, pss = _tree_memory(child.pid)
            peak[:] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = child.wait()
    th.join()
    mem = {"peak_rss_mib": peak[0] / 2**20, "peak_pss_mib": peak[1] / 2**20}
    if rc != 0:
        return {"error": f"exit {rc}", **mem}
    return {**json.loads(result.read_text()), **mem}


def rows(res: dict[str, dict[str, Any]]) -> list[list[Any]]:
    out = []
    for side, name in (("reference", "seed reference (Ray Tune + peft, fp32, cpu 2/trial)"), ("ours", "loratune tune")):
        r = res.get(side)
        if r is None or "error" in r:
            out.append([name, "not run" if r is None else r["error"], "", "", "", "", "", "", ""])
        else:
            out.append([name, r["seconds"], r.get("epochs_trained", ""), r["best_val_accuracy"], _wilson_text(r),
                        r["best_val_loss"], r["max_val_accuracy"], r["peak_rss_mib"], r.get("peak_pss_mib", "")])
    if all(s in res and "error" not in res[s] for s in ("ours", "reference")):
        out.append(["ratio (reference / ours)", res["reference"]["seconds"] / res["ours"]["seconds"], "", "", "", "",
                    "", "", ""])
    return out


def _wilson_text(r: dict[str, Any]) -> str:
    """The best validation accuracy's 95% Wilson interval (``val_n`` sentences), as ``[lo, hi]``."""
    from loratune.search.stats import wilson

    n = r.get("val_n")
    if not n:
        return ""
    lo, hi = wilson(round(r["best_val_accuracy"] * n), n)
    return f"[{lo:.3f}, {hi:.3f}]"


HEADER = ["search", "wall s", "epochs trained", "best val acc", "its 95% Wilson interval", "best val loss", "max val acc (any trial)", "peak RSS MiB",
          "peak PSS MiB"]


def main(argv: list[str] | None = None) -> int:
    global SAMPLES, MAX_EPOCHS, SEED, SPLIT_SEED, OURS_ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["ours", "reference", "both"], default="both")
    ap.add_argument("--root", default="/tmp/lt-bench-search")
    ap.add_argument("--samples", type=int, default=SAMPLES, help="trials (smoke runs: fewer)")
    ap.add_argument("--max-epochs", type=int, default=MAX_EPOCHS, help="epochs per trial (smoke runs: 1)")
    ap.add_argument("--split-seed", type=int, default=SPLIT_SEED, help="the train/validation/test cut both sides "
                    "search on (default 0, what `make demo` uses)")
    ap.add_argument("--seed", type=int, default=SEED, help="both sides' search seed: the sampler's draws and each "
                    "trial's training seed (default 0, what `make demo` uses)")
    ap.add_argument("--ours-args", default="", help="extra `loratune tune` flags for our side, e.g. "
                    "'--rungs-per-epoch 1' (the default: none, what `make demo` runs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    SAMPLES, MAX_EPOCHS, SEED, SPLIT_SEED = a.samples, a.max_epochs, a.seed, a.split_seed
    OURS_ARGS = shlex.split(a.ours_args)
    root = Path(a.root)
    root.mkdir(parents=True, exist_ok=True)
    if a.child:
        res = (ours if a.side == "ours" else reference)(root / a.side)
        (root / f"{a.side}.json").write_text(json.dumps(res))
        return 0
    from bench.common import machine, table
    from bench.serve import _git, _lscpu

    # the machine (lscpu's family and model tell a Zen 4 from a Zen 5), the code, and how busy the host was
    res: dict[str, Any] = {"machine": {**machine(), "lscpu": _lscpu()}, "git": _git()}
    for side in (["reference", "ours"] if a.side == "both" else [a.side]):
        start, load = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()
        res[side] = {**measure(side, root), "split_seed": SPLIT_SEED, "seed": SEED, "started": start,
                     "loadavg_start": load, "loadavg_end": os.getloadavg()}
        print(f"{side}: {json.dumps(res[side])}", flush=True)
    (root / "results.json").write_text(json.dumps(res, indent=1))
    print(table(rows(res), HEADER))
    return 0


if __name__ == "__main__":
    sys.exit(main())
