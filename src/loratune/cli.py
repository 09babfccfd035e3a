"""``loratune`` subcommands: parse flags, call the library function, show what a person needs.

Exit codes: 0 success; 2 bad input (one line on stderr naming the field or file, no traceback);
1 internal error (traceback only with ``--debug``); 130 interrupted (a checkpoint was written).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import DEFAULTS, TrainConfig, flag
from .errors import InputError
from .progress import Renderer

log = logging.getLogger("loratune")

HELP = {
    "model": "built-in name (minilm-l6), local transformers folder, or hub id (if cached)",
    "data": "built-in name (rotten-tomatoes-4k), CSV/JSONL/Parquet file, HF dataset name or save_to_disk folder",
    "targets": "module-name suffixes (q_lin,v_lin), short names q,k,v,o, a preset (qv, attention, all-linear) or re:REGEX",
    "layers": "only these layer indices, e.g. 0,1 or 3-5 (default: all)",
    "clip": "gradient-norm clipping (0: off)",
}
OPTIONAL_INT = {"max_steps", "early_stop", "checkpoint_every", "threads"}


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; unset flags stay unset, so a --config file can fill them."""
    g = p.add_argument_group("training options (also YAML keys of --config)")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    for name, default in DEFAULTS.items():
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        text = HELP.get(name, (TrainConfig.__dataclass_fields__[name].metadata or {}).get("help", ""))
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif name in OPTIONAL_INT or isinstance(default, int):
            kw["type"] = int
        elif isinstance(default, float) or name == "clip":
            kw["type"] = float
        shown = ",".join(default) if isinstance(default, list) else default
        g.add_argument(flag(name), help=f"{text} (default: {shown})".strip(), **kw)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options from --config, then flags on top."""
    opts: dict[str, Any] = {}
    if getattr(args, "config", None):
        opts.update(read_yaml(args.config))
    opts.update({k: v for k, v in vars(args).items() if k in DEFAULTS})
    return opts


def read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config: {path} " + ("is a folder" if p.is_dir() else "does not exist"))
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"--config: {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise InputError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"--config: {path} must hold a mapping of option: value")
    return doc


# --- commands ---------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace, ui: Renderer) -> int:
    from .trainer import train

    opts = train_options(args)
    result = train(TrainConfig.from_dict(opts) if not args.resume else None, out=args.out, resume=args.resume,
                   overwrite=args.overwrite, progress=ui.event)
    if result.already_done:
        ui.line(f"run {result.run_dir} already finished; nothing to resume")
    v, t, s = result.validation, result.test or {}, result.train
    ui.line(f"best epoch {result.best_epoch}: validation accuracy {v['accuracy']:.4f} (loss {v['loss']:.4f}), "
            f"test accuracy {t.get('accuracy', float('nan')):.4f}")
    ui.line(f"training: {s.get('tokens_per_s', 0):,.0f} tokens/s, {s.get('seconds', 0):.1f} s, "
            f"{s.get('trainable_params', 0):,} trainable parameters; adapter {s.get('adapter_bytes', 0) / 1e6:.2f} MB "
            f"vs model {s.get('model_bytes', 0) / 1e6:.1f} MB")
    ui.line(f"run directory: {result.run_dir} (adapter in {result.run_dir / 'adapter'})")
    if not (result.run_dir / "report.html").exists() or not result.already_done:
        write_report_safely(result.run_dir, ui)
    return 0


def cmd_eval(args: argparse.Namespace, ui: Renderer) -> int:
    from .inference import evaluate_adapter

    m = evaluate_adapter(args.adapter, data=args.data, split=args.split, text_column=args.text_column,
                         label_column=args.label_column, precision=args.precision, base=args.base)
    if args.json:
        ui.out(json.dumps(m))
    else:
        ui.out(f"{m['split']} ({m['examples']} examples): " + ", ".join(
            f"{k} {v:.4f}" for k, v in m.items() if k not in ("split", "examples")))
    return 0


def cmd_predict(args: argparse.Namespace, ui: Renderer) -> int:
    from .inference import predict, read_lines

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
    from .inference import merge_export

    out = merge_export(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    ui.line(f"merged model written to {out} (load it with AutoModelForSequenceClassification.from_pretrained)")
    return 0


def cmd_info(args: argparse.Namespace, ui: Renderer) -> int:
    from .inference import info

    r = info(args.model, targets=args.targets, rank=args.rank, alpha=args.alpha, layers=args.layers,
             num_labels=args.num_labels, bias=args.bias)
    ui.out(r["line"])
    if args.verbose:
        ui.out(f"{r['model']}: {len(r['adapted'])} adapted matrices: " + ", ".join(r["adapted"]))
    else:
        ui.out(f"{r['model']}: {len(r['adapted'])} adapted matrices; adapter ≈ {r['adapter_bytes_fp32'] / 1e6:.2f} MB "
               f"vs model {r['model_bytes_fp32'] / 1e6:.1f} MB (fp32)")
    return 0


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loratune", description="Fine-tune transformers with LoRA; search LoRA settings.")
    p.add_argument("--version", action="version", version=f"loratune {__import__('loratune').__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="debug logging; tracebacks on internal errors")

    s = sub.add_parser("info", parents=[common], help="trainable-parameter report, no training")
    s.add_argument("--model", default=DEFAULTS["model"], help=HELP["model"])
    s.add_argument("--targets", default="qv", help=HELP["targets"])
    s.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    s.add_argument("--alpha", type=float, default=DEFAULTS["alpha"])
    s.add_argument("--layers", default=None, help=HELP["layers"])
    s.add_argument("--bias", default="none", choices=["none", "all", "lora_only"])
    s.add_argument("--num-labels", type=int, default=2)
    s.add_argument("-v", "--verbose", action="store_true", help="list the adapted matrices")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", parents=[common], help="train one LoRA adapter")
    add_train_options(s)
    s.add_argument("--out", type=Path, help="run directory (default: runs/train-<timestamp>)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", parents=[common], help="metrics of an adapter on a split")
    s.add_argument("--adapter", required=True, help="adapter folder (a run's adapter/)")
    s.add_argument("--data", help="data to evaluate on (default: the run's own)")
    s.add_argument("--split", default="test", choices=["validation", "test"])
    s.add_argument("--text-column")
    s.add_argument("--label-column")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    s.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--json", action="store_true", help="one JSON object")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", parents=[common], help="classify texts (arguments, --file, or stdin)")
    s.add_argument("--adapter", required=True)
    s.add_argument("texts", nargs="*", metavar="TEXT")
    s.add_argument("--file", help="one text per line ('-': stdin)")
    s.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    s.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--batch-size", type=int, default=256, help="texts classified at a time (bounds memory)")
    s.add_argument("--json", action="store_true", help="JSON lines: text, label, score, probabilities")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("merge", parents=[common], help="export a plain transformers model with the adapter merged")
    s.add_argument("--adapter", required=True)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--base", help="base model (default: the one the adapter was trained on)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_merge)

    from .report_cli import register as report_commands
    from .search_cli import register as tune_command

    tune_command(sub, common)
    report_commands(sub, common)
    return p


def write_report_safely(run_dir: Path, ui: Renderer) -> None:
    """The report at the end of a run; a failure to draw it never fails the finished run."""
    try:
        from .report import write_report

        ui.line(f"report: {write_report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - the run's own results are already safe on disk
        log.warning("could not write the report: %s", e)
        ui.err(f"loratune: the report could not be written ({type(e).__name__}: {e}); "
               f"try `loratune report {run_dir}`")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    ui = Renderer()
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        import warnings

        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
    from .trainer import Diverged, Interrupted

    try:
        return int(args.func(args, ui) or 0)
    except InputError as e:
        ui.err(f"loratune {args.command}: error: {e}")
        return 2
    except Interrupted as e:
        ui.err(f"loratune {args.command}: {e}; continue with --resume")
        return 130
    except KeyboardInterrupt:
        ui.err(f"loratune {args.command}: interrupted")
        return 130
    except Diverged as e:
        ui.err(f"loratune {args.command}: {e}")
        return 1
    except BrokenPipeError:                                   # `loratune predict ... | head`
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback unless asked
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            ui.err(f"loratune {args.command}: error: disk full while writing {e.filename or 'a file'} ({e.strerror});"
                   " files are written atomically, so the last good checkpoint is kept: free space, then --resume")
            return 1
        if debug:
            traceback.print_exc()
        ui.err(f"loratune {args.command}: internal error: {type(e).__name__}: {e}"
               + ("" if debug else " (run with --debug for the traceback)"))
        return 1
    finally:
        ui.close()


if __name__ == "__main__":
    sys.exit(main())
