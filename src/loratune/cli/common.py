"""What the commands share: the training flags (from :class:`loratune.training.options.TrainConfig`), YAML
files of options, and writing the report at the end of a run without failing it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable

import yaml

from loratune import yamltext
from loratune.cli.progress import Renderer
from loratune.errors import InputError
from loratune.training.options import (
    AUTO,
    OPTIONS,
    Option,
    auto_text,
    declared_default,
    flag,
)

log = logging.getLogger("loratune")


def shown_default(name: str) -> str:
    """A training option's default as ``--help`` shows it: ``8``, ``qv``, ``off``, ``auto = 0.0005 for ...``."""
    spec, default = OPTIONS[name], declared_default(name)
    if spec.auto and default == AUTO:
        return auto_text(name)
    if default is None:
        return spec.unset
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, tuple)):
        return ",".join(map(str, default))
    return str(default)


def option_help(name: str) -> str:
    """A training option's help line (argparse-escaped): what it does, its range, its default."""
    spec = OPTIONS[name]
    text = spec.help + (f", {spec.range_text()}" if spec.range_text() else "")
    return f"{text} (default: {shown_default(name)})".replace("%", "%%")


def add_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *,
               default: Any = argparse.SUPPRESS) -> None:
    """One training option as a flag: its type, choices, metavar and help all come from its :class:`Option`."""
    spec = OPTIONS[name]
    kw: dict[str, Any] = {"dest": name, "default": default, "help": option_help(name)}
    if spec.kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif spec.choices:                  # shown, and checked by TrainConfig: a one-line error naming the flag
        kw["metavar"] = "{" + ",".join(spec.choices) + "}"
    else:
        kw["metavar"] = (spec.metavar or name.upper()) + ("|auto" if spec.auto else "")
        if spec.kind in ("int", "float"):
            kw["type"] = _cli_number(spec)
    p.add_argument(flag(name), **kw)


def _cli_number(spec: Option) -> Callable[[str], Any]:
    """argparse's ``type`` for a number option (``auto`` too where the option allows it)."""
    convert: Callable[[str], Any] = int if spec.kind == "int" else float
    expected = ("an integer" if spec.kind == "int" else "a number") + (" or auto" if spec.auto else "")

    def parse(text: str) -> Any:
        if spec.auto and text == AUTO:
            return AUTO
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as a flag; unset flags stay unset, so a --config file can fill them."""
    g = p.add_argument_group("training options (also YAML keys of --config)")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    for name in OPTIONS:
        add_option(g, name)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options from --config, then flags on top."""
    opts: dict[str, Any] = {}
    if getattr(args, "config", None):
        opts.update(read_yaml(args.config))
    opts.update({k: v for k, v in vars(args).items() if k in OPTIONS})
    return opts


def given_training_flags(args: argparse.Namespace) -> list[str]:
    """The training flags given on the command line (``--config`` first), spelled as typed."""
    given = [flag(k) for k in vars(args) if k in OPTIONS]
    return (["--config"] if getattr(args, "config", None) else []) + given


def read_yaml(path: str) -> dict[str, Any]:
    """``--config``'s options: a mapping, without ``debug`` (the CLI's own key, :func:`config_debug`)."""
    doc = _read_config(path)
    _debug_of(doc, path)                                    # checked: true or false
    return {k: v for k, v in doc.items() if k != "debug"}


def config_debug(path: str) -> bool:
    """``debug:`` of a ``--config`` file (a YAML key like every training flag, DESIGN.md); InputError unless it
    is true or false."""
    return _debug_of(_read_config(path), path)


def _debug_of(doc: dict[str, Any], path: str) -> bool:
    value = doc.get("debug", False)
    if not isinstance(value, bool):
        raise InputError(f"--config: {path}: debug: expected true or false, got {value!r}")
    return value


def _read_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--config: {path} " + ("is a folder" if p.is_dir() else "does not exist"))
    try:
        doc = yamltext.load(p.read_text(encoding="utf-8"))
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
