"""The run directory: where it goes, when an existing one may be reused, its small files, and the one
reader of them.

Every read of ``metrics.jsonl``, ``results.json``, ``config.yaml`` and ``generations.json`` goes through here
(the trainer's resume, the search's trials table, the report), and so does the one rule for "the best epoch":
the evaluation with the lowest *finite* validation loss, the earliest on a tie. A run whose every
validation loss is non-finite has no best epoch (:func:`best_evaluation` returns None).

The readers are tolerant where a person looks at a damaged or unfinished run (a torn last line of
``metrics.jsonl`` is skipped, an unreadable file reads as missing, with a warning) and strict where
a run continues from it (:func:`read_config`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from loratune import yamltext
from loratune.errors import InputError
from loratune.runtime import versions
from loratune.training import lock
from loratune.training.options import TrainConfig, option_names

log = logging.getLogger(__name__)


def default_out(command: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<command>-<timestamp>``, with a suffix if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{command}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{command}-{stamp}-{n}"
    return path


RUN_FILES = ("config.yaml", "search.yaml")
"""What a run (config.yaml, written first) or a search (search.yaml) directory holds from its start: ``--overwrite``
empties only a folder holding one (``--out . --overwrite`` would have emptied the working directory)."""


def check_out(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an existing non-empty ``--out`` unless ``--resume`` or ``--overwrite`` (checked before any work)."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite: give one or the other")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} is a file, not a folder")
    if resume:
        if not out.is_dir() or not (out / "config.yaml").is_file():
            raise InputError(f"--out: nothing to resume in {out} (no config.yaml there)")
        return
    if (busy := lock.holder(out)) is not None:
        raise InputError(f"--out: {out} is in use by another loratune process ({busy}); wait for it to end, "
                         f"or give another --out")
    held = out.is_dir() and any(p.name != lock.NAME for p in out.iterdir())
    if held and not overwrite:
        raise InputError(f"--out: {out} exists and is not empty; use --resume to continue it or --overwrite to replace it")
    if held and not any((out / name).is_file() for name in RUN_FILES):
        raise InputError(f"--overwrite: {out} holds files but no loratune run or search (no {' or '.join(RUN_FILES)}); "
                         "it replaces only those: give a new or empty --out")


def start(out: Path, *, overwrite: bool) -> None:
    """Create (or empty, with ``--overwrite``) the folder; the lock file stays (its holder is this process)."""
    if overwrite and out.is_dir():
        for child in out.iterdir():
            if child.name == lock.NAME:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` with NaN and infinities as null: valid JSON for any reader (``--json`` output)."""
    return json.dumps(_clean(obj), **kw)


def json_line(obj: Any) -> str:
    """One line of ``metrics.jsonl``: ``obj`` as JSON, NaN and infinities as null, with its newline."""
    return json.dumps(_clean(obj)) + "\n"


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON (temp file + rename); NaN becomes null so any JSON reader takes it."""
    _atomic_text(path, json.dumps(_clean(obj), indent=2) + "\n")


GENERATIONS = "generations.json"
"""A causal-LM run's sample of greedy answers: :func:`write_generations`."""


def write_generations(out: Path, rows: list[dict[str, Any]], epoch: float | None, split: str = "validation") -> None:
    """``out/generations.json``, atomically: ``{"split", "epoch", "rows": [{"prompt", "reference", "base",
    "adapter"}, ...]}``, the first rows of ``split`` with the base model's and the adapter's greedy answers (null:
    not known yet); ``epoch``: the evaluation the adapter's answers come from (the kept adapter's), None before one."""
    write_json(out / GENERATIONS, {"split": split, "epoch": epoch, "rows": rows})


def write_config(out: Path, cfg: TrainConfig, **extra: Any) -> None:
    """``out/config.yaml``: the resolved options, ``extra`` keys (label names) and the library versions, atomically."""
    doc = {**cfg.to_dict(), **extra, "versions": versions()}
    _atomic_text(out / "config.yaml", yamltext.dump(doc, sort_keys=False))


def read_config(out: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The options a run was started with (for ``--resume``), and the extra keys."""
    path = out / "config.yaml"
    try:
        doc = yamltext.load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a mapping of options")
    names = set(option_names())
    extra = {k: v for k, v in doc.items() if k not in names}
    return TrainConfig.from_stored({k: v for k, v in doc.items() if k in names}), extra


def _atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it into place: readers see the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clean(obj: Any) -> Any:
    """``obj`` as plain JSON values: non-finite floats become None, keys strings, numpy/torch scalars numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):                               # numpy / torch scalars
        return _clean(obj.item())
    return obj


# --- reading ------------------------------------------------------------------------------------------

def is_better(loss: Any, best: float | None) -> bool:
    """Whether a validation loss beats the best so far (None: none yet): only a finite loss can."""
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return False
    return best is None or loss < best


def best_evaluation(evals: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The evaluation with the lowest finite ``loss``, the earliest on a tie; None when no loss is finite."""
    best: Mapping[str, Any] | None = None
    for e in evals:
        if is_better(e.get("loss"), None if best is None else best["loss"]):
            best = e
    return dict(best) if best is not None else None


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None (logged) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        log.warning("%s: unreadable, skipped (%s)", path, e)
        return None


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file, or {} (logged) when it is missing, unreadable or not a mapping."""
    try:
        doc = yamltext.load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        log.warning("%s: unreadable, skipped (%s)", path, e)
        doc = None
    return doc if isinstance(doc, dict) else {}


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The objects of ``run/metrics.jsonl`` in order; broken lines (a run killed mid-write) are skipped, a
    missing or unreadable file reads as none."""
    path = run / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    except OSError as e:
        log.warning("%s: unreadable, skipped (%s)", path, e)
        text = ""
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def evaluations(run: Path) -> list[dict[str, Any]]:
    """Per-epoch validation metrics from ``metrics.jsonl``, in order: ``{"epoch", "step", "loss", "accuracy",
    ...}`` (the trainer's ``history`` entries, after a causal LM's epoch 0, the base model's); a loss that was NaN or
    infinite reads as None (JSON has neither). Other splits' records (a causal LM's epoch-0 test) are not these."""
    return [{k: v for k, v in x.items() if k not in ("type", "split")} for x in read_metrics(run)
            if x.get("type") == "eval" and x.get("split", "validation") == "validation"
            and isinstance(x.get("epoch"), (int, float)) and not isinstance(x.get("epoch"), bool)]


def train_losses(run: Path) -> list[tuple[int, float]]:
    """(step, training loss) of each logged step in ``metrics.jsonl``, finite losses only."""
    return [(int(x["step"]), float(x["loss"])) for x in read_metrics(run) if x.get("type") == "train"
            and isinstance(x.get("step"), int) and is_better(x.get("loss"), None)]


def read_results(run: Path) -> dict[str, Any] | None:
    """``run/results.json`` (written once, when the run finished), or None when it is missing or unreadable."""
    doc = read_json(run / "results.json")
    return doc if isinstance(doc, dict) else None


def read_generations(run: Path) -> dict[str, Any] | None:
    """``run/generations.json`` (:func:`write_generations`), its rows those that are objects, or None when it is
    missing or unreadable."""
    doc = read_json(run / GENERATIONS)
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        return None
    return {**doc, "rows": [r for r in doc["rows"] if isinstance(r, dict)]}


def base_answers(run: Path) -> list[str] | None:
    """The base model's answers in ``run/generations.json`` (what a resumed run keeps), or None where it has none."""
    rows = (read_generations(run) or {}).get("rows") or []
    answers = [r.get("base") for r in rows]
    return answers if answers and all(isinstance(a, str) for a in answers) else None


def read_config_doc(run: Path) -> dict[str, Any]:
    """``run/config.yaml`` as written (options, label names, versions), for people to look at: {} when it is
    missing or unreadable. A run that continues from it reads it strictly (:func:`read_config`)."""
    return read_yaml(run / "config.yaml")


def adapter_run_config(adapter: str | os.PathLike) -> TrainConfig | None:
    """The options of the run an adapter folder belongs to (``RUN/adapter`` -> ``RUN/config.yaml``), or None
    when the folder sits in no run directory. A damaged ``config.yaml`` is an InputError."""
    run = Path(adapter).resolve().parent
    return read_config(run)[0] if (run / "config.yaml").is_file() else None
