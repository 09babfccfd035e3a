"""``loratune report`` and ``loratune analyze``: flags -> :mod:`loratune.report.write` / :mod:`loratune.report.analysis`.

cli/main.py's ``build_parser`` calls :func:`register`; importing this module does nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loratune.cli.progress import Renderer

BASELINE_HELP = ("a finished `loratune train --method full` run on the same data and split: its accuracy, "
                 "parameters and file size beside LoRA's (a search: its best trial's), e.g. \"LoRA reaches 99%% of "
                 "full fine-tuning's accuracy with 0.65%% of the parameters\"; remembered in RUN_DIR/baseline.json "
                 "for later reports")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``report`` and ``analyze`` subcommands to cli/main.py's subparsers."""
    s = sub.add_parser("report", parents=[common], help="write RUN_DIR/report.html (a run or a search)",
                       description="Write one self-contained HTML report (plots embedded, no network requests) "
                                   "for a training run or a search directory.")
    s.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (loratune train) or a search "
                                                                 "directory (loratune tune)")
    s.add_argument("--baseline", type=Path, metavar="FULL_RUN_DIR", help=BASELINE_HELP)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("analyze", parents=[common], help="singular values, effective rank and amplification of ΔW",
                       description="Analyse the learned ΔW = s·B·A (s = α/r, α/√r with rsLoRA) of every adapted matrix: "
                                   "singular values, "
                                   "effective rank (90% of ‖ΔW‖²_F), ‖ΔW‖_F, amplification against the base weights; "
                                   "with --compare, the subspace similarity φ of two adapters.")
    s.add_argument("adapter", type=Path, metavar="ADAPTER", help="adapter folder (a run's adapter/)")
    s.add_argument("--compare", type=Path, metavar="ADAPTER2", help="a second adapter: φ per shared matrix")
    s.add_argument("--base", metavar="MODEL", help="base model for the amplification factor "
                                                   "(default: the one the adapter was trained on)")
    s.add_argument("--json", action="store_true", help="one JSON object (the contract's format)")
    s.set_defaults(func=cmd_analyze)


def cmd_report(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.report.write import write_report

    path = write_report(args.run_dir, baseline=args.baseline)
    ui.line(f"report written to {path} (open it in a browser: file://{path.resolve()})")
    return 0


def cmd_analyze(args: argparse.Namespace, ui: Renderer) -> int:
    from loratune.report.analysis import analyze, format_table
    from loratune.training import rundir

    result = analyze(args.adapter, compare=args.compare, base=args.base)
    if args.json:
        ui.out(rundir.dumps(result))
    else:
        for line in format_table(result):
            ui.out(line)
    return 0
