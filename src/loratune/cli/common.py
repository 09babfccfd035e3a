"""What the commands share: the training flags (from :class:`loratune.training.options.TrainConfig`), YAML
files of options, and writing the report at the end of a run without failing it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from loratune.cli.progress import Renderer
from loratune.errors import InputError
from loratune.training.options import DEFAULTS, TrainConfig, flag

log = logging.getLogger("loratune")
PRECISION_HELP = "auto (bf16 where native, fp16 on GPUs without bf16, else fp32), fp32, bf16, fp16 (default: auto)"


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


def write_report_safely(run_dir: Path, ui: Renderer) -> None:
    """The report at the end of a run; a failure to draw it never fails the finished run."""
    try:
        from loratune.report.write import write_report

        ui.line(f"report: {write_report(run_dir)}")
    except Exception as e:  # noqa: BLE001 - the run's own results are already safe on disk
        log.warning("could not write the report: %s", e)
        ui.err(f"loratune: the report could not be written ({type(e).__name__}: {e}); "
               f"try `loratune report {run_dir}`")
