"""``loratune report RUN_DIR``: one self-contained HTML page for a training run or a search.

The page is a single file: figures are PNG data URIs (:mod:`loratune.report.plots`), CSS and the table-
sorting script are inline, and a Content-Security-Policy forbids every request (``default-src
'none'``; images only from ``data:``), so it opens offline in any browser and sends nothing anywhere.

What it reads (missing optional pieces are skipped, with a line saying so):

- a run directory: ``results.json``, ``metrics.jsonl``, ``config.yaml``, ``adapter/``; the confusion
  matrix, per-class scores and ROC curve come from re-running the adapter on the test split, cut as
  in training (:func:`loratune.infer.inference.run_split`). Every run file is read through
  :mod:`loratune.training.rundir`, which also decides each run's best epoch.
- a search directory: ``trials.json`` (else ``trials.csv``), ``search.json``, ``search.yaml``,
  ``trials/<id>/`` (each trial's run directory), ``best/`` (the best trial's, test-evaluated).
- with ``baseline=FULL_RUN_DIR`` (``--baseline``), or one remembered in the directory's ``baseline.json``:
  a finished ``--method full`` run on the same data, beside the run's or the best trial's numbers
  (:mod:`loratune.report.baseline`). A full fine-tuning run's own page has ``model/`` and no ΔW.

The top of the page answers at a glance: which rank and targets won, the metrics, and how much
smaller the adapter is than the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loratune.errors import InputError
from loratune.report import baseline as bl
from loratune.report.html import page
from loratune.report.run_page import run_page
from loratune.report.search_page import search_page

log = logging.getLogger(__name__)


def write_report(run_dir: str | os.PathLike, baseline: str | os.PathLike | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` (a run or a search directory) and return its path. ``baseline``: a finished
    full fine-tuning run to compare with (an InputError naming --baseline when it is not one; remembered in
    ``RUN_DIR/baseline.json`` for later reports)."""
    run = Path(run_dir)
    kind = directory_kind(run)
    base, why = bl.resolve(run, kind, baseline)
    if kind == "search":
        title, glance, body = search_page(run, base, why)
    else:
        title, glance, body = run_page(run, base, why)
    out = run / "report.html"
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text(page(title, glance, body), encoding="utf-8")
    os.replace(tmp, out)
    log.info("report written to %s", out)
    return out


def directory_kind(run: Path) -> str:
    """``"search"`` or ``"run"``; InputError for anything else."""
    if not run.exists():
        raise InputError(f"RUN_DIR: {run} does not exist")
    if not run.is_dir():
        raise InputError(f"RUN_DIR: {run} is a file, not a run or search directory")
    if any((run / f).is_file() for f in ("trials.json", "trials.csv", "search.json")):
        return "search"
    if (run / "results.json").is_file() or (run / "metrics.jsonl").is_file():
        return "run"
    raise InputError(f"RUN_DIR: {run} is not a run directory (no results.json or metrics.jsonl) "
                     "nor a search directory (no trials.json, trials.csv or search.json)")
