"""``loratune info``, ``train``, ``eval``, ``predict`` and ``merge``: one adapter, made or used.

cli/main.py's ``build_parser`` calls :func:`register`; importing this module does nothing (no torch).
"""

from __future__ import annotations

import argparse
import json
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
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
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

    s = sub.add_parser("merge", parents=[common], help="export a plain transformers model with the adapter merged")
    s.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter folder (a run's adapter/), or a full fine-tuning run's model/")
    s.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the merged transformers model")
    s.add_argument("--base", metavar="MODEL", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
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

    m = evaluate_adapter(args.adapter, data=args.data, split=args.split, text_column=args.text_column,
                         label_column=args.label_column, precision=args.precision, base=args.base)
    if args.json:
        ui.out(json.dumps(m))
    else:
        ui.out(f"{m['split']} ({m['examples']} examples): " + ", ".join(
            f"{k} {v:.4f}" for k, v in m.items() if k not in ("split", "examples")))
    return 0


def cmd_predict(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.infer.inference import predict, read_lines

    if args.texts and args.file:
        raise InputError("predict: give texts as arguments or --file, not both")
    bad: list[int] = []

    def on_bad(no: int, why: str) -> None:
        bad.append(no)
        ui.err(f"loratune: {args.file or 'stdin'}: line {no}: {why}")

    texts = args.texts if args.texts else read_lines(args.file, on_bad)
    for row in predict(args.adapter, texts, precision=args.precision, base=args.base, chunk=args.batch_size):
        ui.out(json.dumps(row, ensure_ascii=False) if args.json else f"{row['label']}\t{row['score']:.4f}\t{row['text']}")
    return 0


def cmd_merge(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.infer.inference import merge_export

    out = merge_export(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    ui.line(f"merged model written to {out} (load it with AutoModelForSequenceClassification.from_pretrained)")
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
