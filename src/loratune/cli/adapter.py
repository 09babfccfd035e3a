"""``loratune info``, ``train``, ``eval``, ``predict``, ``generate`` and ``merge``: one adapter, made or used.

cli/main.py's ``build_parser`` calls :func:`register`; importing this module does nothing (no torch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from loratune.cli.common import (
    add_option,
    add_train_options,
    given_training_flags,
    train_options,
    write_report_safely,
)
from loratune.cli.progress import Renderer
from loratune.errors import InputError
from loratune.training.options import DEFAULTS, TrainConfig


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the adapter commands to cli/main.py's subparsers."""
    s = sub.add_parser("info", parents=[common], help="trainable-parameter report, no training")
    for name in ("model", "targets", "rank", "alpha", "layers", "bias", "modules_to_save"):   # as train's flags
        default = DEFAULTS[name]
        add_option(s, name, default=",".join(default) if isinstance(default, list) else default)
    s.add_argument("--num-labels", type=int, metavar="N", default=2,
                   help="classes of the task head (default: %(default)s)")
    s.add_argument("-v", "--verbose", action="store_true", help="list the adapted matrices")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", parents=[common], help="train one LoRA adapter (or fine-tune every weight: --method full)")
    add_train_options(s)
    s.add_argument("--out", type=Path, metavar="DIR", help="run directory (default: runs/train-<timestamp>)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, "
                                                         "with the options it was started with (no training flags)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the run or search in --out (a folder of other files is refused)")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", parents=[common], help="metrics of an adapter on a split")
    s.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter folder (a run's adapter/), or a full fine-tuning run's model/")
    s.add_argument("--data", metavar="DATA", help="data to evaluate on (default: the run's own)")
    s.add_argument("--split", default="test", choices=["validation", "test"],
                   help="which split, cut as in training (default: %(default)s)")
    s.add_argument("--text-column", metavar="COLUMN", help="text column of --data (default: the run's)")
    s.add_argument("--label-column", metavar="COLUMN", help="label column of --data (default: the run's)")
    add_option(s, "precision", default=DEFAULTS["precision"])
    s.add_argument("--base", metavar="MODEL", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", parents=[common], help="classify texts (arguments, --file, or stdin)")
    s.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter folder (a run's adapter/), or a full fine-tuning run's model/")
    s.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (default: --file or stdin)")
    s.add_argument("--file", metavar="FILE", help="one text per line ('-': stdin)")
    add_option(s, "precision", default=DEFAULTS["precision"])
    s.add_argument("--base", metavar="MODEL", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="texts classified at a time (bounds memory) (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="JSON lines: text, label, score, probabilities")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("generate", parents=[common],
                       help="write completions with a causal-LM adapter (prompts as arguments, --file, or stdin)")
    s.add_argument("--adapter", required=True, metavar="DIR", help="causal-LM adapter folder (a run's adapter/)")
    s.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts, each a user turn (default: --file or stdin)")
    s.add_argument("--file", metavar="FILE", help="one prompt per line ('-': stdin)")
    s.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="most tokens written per prompt (default: %(default)s)")
    s.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy (the most likely token each time); above 0: sampled, flatter as T grows "
                        "(default: %(default)s)")
    s.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only from the most likely tokens that together hold P of the probability "
                        "(default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, metavar="SEED",
                   help="seed of sampling: the same prompts and seed give the same completions (default: %(default)s)")
    s.add_argument("--system-prompt", metavar="TEXT",
                   help="system turn before each prompt (default: the one the adapter was trained with; '': none)")
    add_option(s, "precision", default=DEFAULTS["precision"])
    s.add_argument("--base", metavar="MODEL", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--json", action="store_true",
                   help="JSON lines, one per prompt in input order: prompt, completion, finish_reason (stop or "
                        "length), tokens (default: the completions' text as it is written)")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("merge", parents=[common], help="export a plain transformers model with the adapter merged")
    s.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter folder (a run's adapter/), or a full fine-tuning run's model/")
    s.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the merged transformers model")
    s.add_argument("--base", metavar="MODEL", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the model folder in --out (a folder without config.json is refused)")
    s.set_defaults(func=cmd_merge)


def cmd_train(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.training.loop import train

    if args.resume:
        check_resume(args)
    config = None if args.resume else TrainConfig.from_dict(train_options(args))
    train(config, out=args.out, resume=args.resume, overwrite=args.overwrite, progress=ui.event,
          on_done=lambda result: show_run(ui, result))
    return 0


def show_run(ui: Renderer, result: Any) -> None:
    """The run's numbers, then report.html (called by ``train`` while it still holds the run's lock)."""
    if result.already_done:
        ui.line(f"run {result.run_dir} already finished; nothing to resume")
    v, t, s = result.validation, result.test or {}, result.train
    if is_causal_metrics(v):
        ui.line(f"best epoch {result.best_epoch}:")
        baseline = run_baseline(result)
        for split, metrics in (("validation", v), ("test", result.test)):
            if metrics:
                ui.line(f"  {split}: {causal_line(metrics, baseline.get(split))}")
    else:
        ui.line(f"best epoch {result.best_epoch}: validation accuracy {v['accuracy']:.4f} (loss {v['loss']:.4f}), "
                f"test accuracy {t.get('accuracy', float('nan')):.4f}")
    full = (result.run_dir / "model").is_dir() and not (result.run_dir / "adapter").is_dir()
    what = "model" if full else "adapter"
    ui.line(f"training: {s.get('tokens_per_s', 0):,.0f} tokens/s, {s.get('seconds', 0):.1f} s, "
            f"{s.get('trainable_params', 0):,} trainable parameters" + (
                f"; model {s.get('adapter_bytes', 0) / 1e6:.1f} MB (full fine-tuning)" if full else
                f"; adapter {s.get('adapter_bytes', 0) / 1e6:.2f} MB vs model {s.get('model_bytes', 0) / 1e6:.1f} MB"))
    ui.line(f"run directory: {result.run_dir} ({what} in {result.run_dir / what})")
    if not (result.run_dir / "report.html").exists() or not result.already_done:
        write_report_safely(result.run_dir, ui)


CAUSAL_METRICS = (("accuracy", "accuracy", ".3f"), ("exact_match", "exact match", ".3f"), ("loss", "loss", ".3f"),
                  ("perplexity", "perplexity", ".2f"))
"""A causal-LM run's metrics as :func:`causal_line` shows them: (key, name, format), in this order; accuracy
only where the data has a set of candidate completions (multiple choice)."""


def is_causal_metrics(metrics: dict[str, Any]) -> bool:
    """A causal-LM run's split metrics (loss, perplexity, exact match; accuracy maybe), not a classifier's."""
    return "perplexity" in metrics or "exact_match" in metrics


def run_baseline(result: Any) -> dict[str, dict[str, Any]]:
    """The base model's metrics before training by split (results.json's ``baseline``: ``{"validation": {...},
    "test": {...}}``), or {} when the run has none."""
    from loratune.training import rundir

    baseline = (rundir.read_results(Path(result.run_dir)) or {}).get("baseline")
    return {k: m for k, m in baseline.items() if isinstance(m, dict)} if isinstance(baseline, dict) else {}


def causal_line(metrics: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    """``accuracy 0.645 -> 0.835, exact match 0.610 -> 0.830, loss 1.230 -> 0.080, perplexity 3.42 -> 1.08``:
    each metric the split has, from ``before`` (the untrained base's, when known) to after training."""
    parts = []
    for key, name, fmt in CAUSAL_METRICS:
        if key not in metrics or metrics[key] is None:
            continue
        was = (before or {}).get(key)
        then = f"{float(was):{fmt}} -> " if isinstance(was, (int, float)) else ""
        parts.append(f"{name} {then}{float(metrics[key]):{fmt}}")
    return ", ".join(parts)


def check_resume(args: argparse.Namespace) -> None:
    """``train --resume``: a run to continue in ``--out``, and no training flag (the run keeps its own options)."""
    from loratune.training import rundir

    if args.out is None:
        raise InputError("--resume: name the run to continue with --out DIR")
    rundir.check_out(args.out, resume=True, overwrite=args.overwrite)     # "nothing to resume" comes first
    given = given_training_flags(args)
    if given:
        raise InputError(f"--resume: a run continues with the options it was started with; drop {given[0]}")


def cmd_eval(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.infer.inference import evaluate_adapter
    from loratune.training import rundir

    m = evaluate_adapter(args.adapter, data=args.data, split=args.split, text_column=args.text_column,
                         label_column=args.label_column, precision=args.precision, base=args.base)
    if args.json:
        ui.out(rundir.dumps(m))
    else:
        ui.out(f"{m['split']} ({m['examples']} examples): " + ", ".join(
            f"{k} {v:.4f}" for k, v in m.items() if k not in ("split", "examples")))
    return 0


def cmd_predict(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.infer.inference import predict, read_lines
    from loratune.training import rundir

    if args.texts and args.file:
        raise InputError("predict: give texts as arguments or --file, not both")
    texts = args.texts if args.texts else read_lines(args.file, _bad_line_reporter(ui, args.file))
    for row in predict(args.adapter, texts, precision=args.precision, base=args.base, chunk=args.batch_size):
        ui.out(rundir.dumps(row, ensure_ascii=False) if args.json else f"{row['label']}\t{row['score']:.4f}\t{row['text']}")
    return 0


def _bad_line_reporter(ui: Renderer, file: str | None) -> Any:
    """``read_lines``'s ``on_bad_line``: one stderr line per skipped line, and the run goes on."""
    def on_bad(no: int, why: str) -> None:
        ui.err(f"loratune: {file or 'stdin'}: line {no}: {why}")
    return on_bad


def cmd_generate(args: argparse.Namespace, ui: Renderer) -> int:
    """Completions one prompt after another: streamed as text (a blank line between two), or ``--json`` lines."""
    from loratune.infer.generate import generate
    from loratune.infer.inference import read_lines
    from loratune.training import rundir

    if args.prompts and args.file:
        raise InputError("generate: give prompts as arguments or --file, not both")
    prompts = args.prompts if args.prompts else read_lines(args.file, _bad_line_reporter(ui, args.file))
    apart = False                                       # a blank line is owed before the next completion

    def show(text: str) -> None:
        nonlocal apart
        ui.close()
        sys.stdout.write(("\n" if apart else "") + text)
        sys.stdout.flush()
        apart = False

    rows = generate(args.adapter, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed, system_prompt=args.system_prompt, precision=args.precision,
                    base=args.base, on_text=None if args.json else show)
    for row in rows:
        if args.json:
            ui.out(rundir.dumps(row, ensure_ascii=False))
            sys.stdout.flush()
        else:
            show("\n")
            apart = True
    return 0


def cmd_merge(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.infer.inference import merge_export, task_of

    out = merge_export(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    loader = "AutoModelForCausalLM" if task_of(args.adapter) == "causal-lm" else "AutoModelForSequenceClassification"
    ui.line(f"merged model written to {out} (load it with {loader}.from_pretrained)")
    return 0


def cmd_info(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.infer.inference import info

    r = info(args.model, targets=args.targets, rank=args.rank, alpha=args.alpha, layers=args.layers,
             num_labels=args.num_labels, bias=args.bias, modules_to_save=args.modules_to_save)
    ui.out(r["line"])
    if args.verbose:
        ui.out(f"{r['model']}: {len(r['adapted'])} adapted matrices: " + ", ".join(r["adapted"]))
    else:
        saved = f", {','.join(r['modules_to_save'])} trained in full" if r["modules_to_save"] else ""
        ui.out(f"{r['model']}: {len(r['adapted'])} adapted matrices{saved}; adapter ≈ "
               f"{r['adapter_bytes_fp32'] / 1e6:.2f} MB vs model {r['model_bytes_fp32'] / 1e6:.1f} MB (fp32)")
    return 0
