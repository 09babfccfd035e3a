"""LoRA beside full fine-tuning: ``loratune report RUN_DIR --baseline FULL_RUN_DIR`` (and ``loratune tune
--baseline``) puts a finished ``--method full`` run's numbers next to a LoRA run's (or a search's best trial's).

The headline is one sentence, "LoRA reaches 99% of full fine-tuning's accuracy with 0.65% of the parameters":
the accuracy ratio is LoRA's test accuracy over the baseline's (validation accuracy, said so, where either run
has no test metrics), the parameter share LoRA's ``trainable_params`` over the baseline's (every weight, the
task head included); the files' sizes (``adapter_bytes``: the adapter, or the full run's model file) follow.

A baseline is checked before anything is drawn (:func:`load_baseline`, an :class:`InputError` naming
``--baseline``): a finished run directory (``results.json``) whose ``config.yaml`` says ``method: full``, cut
from the same data with the same split (:data:`SAME_DATA`). Another base model is allowed and said on the page.
Its path is remembered in the LoRA directory's ``baseline.json``, so a later report of that directory (``tune
--resume``'s, or ``loratune report`` without the flag) shows the comparison again; a remembered baseline that
no longer passes the checks becomes one line on the page instead of an error. Delete the file to drop it.

A run from before ``--method`` existed has no ``method`` key: it is a LoRA run (:func:`method_of`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratune.errors import InputError
from loratune.report.html import card, esc, finite, fmt, human_bytes, note, table
from loratune.training import rundir
from loratune.training.options import DEFAULTS

FLAG = "--baseline"
BASELINE_FILE = "baseline.json"
"""In a LoRA run or search directory: ``{"baseline": "/abs/path"}``, the full run its report compares with."""
SAME_DATA = ("data", "validation_file", "test_file", "split_seed", "sample_pct", "text_column", "label_column")
"""config.yaml keys that must agree: the two runs are scored on the same validation and test rows."""
SEARCH_FILES = ("trials.json", "trials.csv", "search.json", "search.yaml")
COMPARED = ("accuracy", "loss", "f1")


def method_of(cfg: dict[str, Any]) -> str:
    """``lora`` or ``full`` from a config.yaml document; a run from before ``--method`` (no key) is LoRA."""
    return str(cfg.get("method") or "lora")


def weights_dir(run: Path, cfg: dict[str, Any] | None = None) -> Path:
    """Where a run keeps what it trained: ``RUN/model`` (a transformers folder) for full fine-tuning, else
    ``RUN/adapter``."""
    cfg = rundir.read_config_doc(run) if cfg is None else cfg
    return run / ("model" if method_of(cfg) == "full" else "adapter")


@dataclass
class Baseline:
    """A checked full fine-tuning run: its directory, config.yaml and results.json, and notes for the page."""

    path: Path
    cfg: dict[str, Any]
    results: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def lora_config(run: Path, kind: str) -> dict[str, Any]:
    """The options of the LoRA side: a run's config.yaml, or a search's fixed options under its best trial's."""
    if kind != "search":
        return rundir.read_config_doc(run)
    options = rundir.read_yaml(run / "search.yaml").get("options")
    return {**(options if isinstance(options, dict) else {}), **rundir.read_config_doc(run / "best")}


def load_baseline(path: str | Path, lora_cfg: dict[str, Any], against: str) -> Baseline:
    """``path`` as a baseline for the LoRA side whose options are ``lora_cfg`` (``against`` names it in
    messages, e.g. "RUN_DIR runs/a"); InputError, one line naming --baseline, for anything unusable."""
    path = Path(path)
    if method_of(lora_cfg) == "full":
        raise InputError(f"{FLAG}: {against} is itself a full fine-tuning run (method: full); compare a LoRA "
                         "run or search with it")
    if not path.exists():
        raise InputError(f"{FLAG}: {path} does not exist")
    if not path.is_dir():
        raise InputError(f"{FLAG}: {path} is a file, not a run directory")
    if any((path / f).is_file() for f in SEARCH_FILES):
        raise InputError(f"{FLAG}: {path} is a search directory; the baseline is one `loratune train --method full` "
                         "run directory")
    if not (path / "config.yaml").is_file():
        raise InputError(f"{FLAG}: {path} is not a run directory (no config.yaml)")
    cfg = rundir.read_config_doc(path)
    if not cfg:
        raise InputError(f"{FLAG}: {path / 'config.yaml'} is unreadable")
    if method_of(cfg) != "full":
        what = "a LoRA run" if method_of(cfg) == "lora" else f"a --method {method_of(cfg)} run"
        raise InputError(f"{FLAG}: {path} is {what}; the baseline is a --method full run")
    results = rundir.read_results(path)
    if results is None:
        raise InputError(f"{FLAG}: {path} has not finished (no readable results.json); the baseline is a finished "
                         "--method full run")
    if lora_cfg:
        for key in SAME_DATA:
            mine, theirs = lora_cfg.get(key, DEFAULTS.get(key)), cfg.get(key, DEFAULTS.get(key))
            if not _same(key, mine, theirs):
                raise InputError(f"{FLAG}: {path} was trained on other data than {against}: {key} {theirs!r} there, "
                                 f"{mine!r} here; the comparison needs the same data and split "
                                 f"({', '.join(SAME_DATA)})")
    notes = []
    if lora_cfg and lora_cfg.get("model") != cfg.get("model"):
        notes.append(f"the baseline fine-tuned {cfg.get('model')}, LoRA adapted {lora_cfg.get('model')}: "
                     "this compares across models, not only across methods")
    return Baseline(path, cfg, results, notes)


def _same(key: str, a: Any, b: Any) -> bool:
    """Whether two config values name the same data: numbers by value, paths by file (a relative path as
    written from another folder matches the absolute one it ends)."""
    if a == b:
        return True
    if key in ("split_seed", "sample_pct"):
        try:
            return math.isclose(float(a), float(b))
        except (TypeError, ValueError):
            return False
    if key not in ("data", "validation_file", "test_file") or not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    if pa.is_absolute() != pb.is_absolute():
        full, rel = (pa, pb) if pa.is_absolute() else (pb, pa)
        parts = [p for p in rel.parts if p != "."]
        return ".." not in parts and bool(parts) and list(full.parts[-len(parts):]) == parts
    return False


def remember(run: Path, baseline: str | Path) -> None:
    """Record the baseline in ``run/baseline.json`` for later reports of ``run``."""
    rundir.write_json(run / BASELINE_FILE, {"baseline": str(Path(baseline).resolve())})


def resolve(run: Path, kind: str, given: str | Path | None) -> tuple[Baseline | None, str | None]:
    """The baseline of a report: ``given`` (checked strictly, then remembered), else the remembered one
    (checked too; a failure is the returned line for the page, not an error). (None, None): none."""
    lora_cfg = lora_config(run, kind)
    against = f"{'SEARCH_DIR' if kind == 'search' else 'RUN_DIR'} {run}"
    if given is not None:
        base = load_baseline(given, lora_cfg, against)
        remember(run, base.path)
        return base, None
    doc = rundir.read_json(run / BASELINE_FILE)
    stored = doc.get("baseline") if isinstance(doc, dict) else None
    if not isinstance(stored, str):
        return None, None
    try:
        return load_baseline(stored, lora_cfg, against), None
    except InputError as e:
        return None, (f"comparison with full fine-tuning not shown: the baseline remembered in {BASELINE_FILE} "
                      f"fails its check ({e}); delete {run / BASELINE_FILE} to stop this line")


# --- the numbers ----------------------------------------------------------------------------------------

def percent(x: float) -> str:
    """A ratio as a whole percent: 0.9878 -> '99%'; below 1 it never reads 100% (0.9961 -> '99.6%')."""
    whole = f"{100 * x:.0f}%"
    if x < 1 and whole == "100%":
        return f"{min(100 * x, 99.9):.1f}%"
    return whole


def share(x: float) -> str:
    """A small share with two significant digits, never in e-notation: 0.006492 -> '0.65%', 0.25 -> '25%'."""
    v = 100 * x
    if v >= 10:
        return f"{v:.0f}%"
    return f"{float(f'{v:.2g}'):.10f}".rstrip("0").rstrip(".") + "%"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if finite(a) and finite(b) and b else None


@dataclass
class Comparison:
    """LoRA (a run's or a search's best trial's results.json) against a :class:`Baseline`."""

    lora: dict[str, Any]
    base: Baseline
    split: str                       # the split the headline's accuracies come from
    why: str                         # why validation, when it is
    accuracy: float | None           # LoRA accuracy / full accuracy
    params: float | None             # LoRA trainable / full trainable parameters
    size: float | None               # LoRA adapter file / full model file

    @property
    def sentence(self) -> str:
        """The headline, e.g. "LoRA reaches 99% of full fine-tuning's accuracy with 0.65% of the parameters"."""
        if self.accuracy is None:
            return "LoRA and full fine-tuning: no accuracy to compare yet (a run has no metrics)"
        text = f"LoRA reaches {percent(self.accuracy)} of full fine-tuning's accuracy"
        if self.params is not None:
            text += f" with {share(self.params)} of the parameters"
        if self.split == "validation":
            text += f" (validation accuracy: {self.why})"
        return text

    @property
    def size_text(self) -> str:
        """'Its adapter file is 1.2 MB, 0.45% of the fully fine-tuned model's 266.5 MB (220× smaller)' (or '')."""
        a, b = self.lora_train.get("adapter_bytes"), self.base_train.get("adapter_bytes")
        if self.size is None:
            return ""
        return (f"Its adapter file is {human_bytes(a)}, {share(self.size)} of the fully fine-tuned model's "
                f"{human_bytes(b)} ({1 / self.size:,.0f}× smaller)")

    @property
    def lora_train(self) -> dict[str, Any]:
        return self.lora.get("train") or {}

    @property
    def base_train(self) -> dict[str, Any]:
        return self.base.results.get("train") or {}


def compare(lora: dict[str, Any], base: Baseline) -> Comparison:
    """The headline's numbers: test accuracies where both runs have them, else validation (and why)."""
    full = base.results
    lt, ft = (lora.get("test") or {}).get("accuracy"), (full.get("test") or {}).get("accuracy")
    split, why = "test", ""
    if not (finite(lt) and finite(ft)):
        split = "validation"
        why = ("neither run has test metrics" if not finite(lt) and not finite(ft) else
               "the LoRA run has no test metrics" if not finite(lt) else "the baseline has no test metrics")
    acc = _ratio((lora.get(split) or {}).get("accuracy"), (full.get(split) or {}).get("accuracy"))
    lt_, ft_ = lora.get("train") or {}, full.get("train") or {}
    return Comparison(lora, base, split, why, acc, _ratio(lt_.get("trainable_params"), ft_.get("trainable_params")),
                      _ratio(lt_.get("adapter_bytes"), ft_.get("adapter_bytes")))


# --- the page -------------------------------------------------------------------------------------------

def glance_card(c: Comparison) -> str:
    """The "at a glance" card: the accuracy ratio, the parameter share and the file size ratio."""
    if c.accuracy is None:
        return card("vs full fine-tuning", "-", "no accuracy to compare yet")
    detail = [f"{'validation' if c.split == 'validation' else 'test'} accuracy "
              f"{fmt((c.lora.get(c.split) or {}).get('accuracy'))} vs {fmt((c.base.results.get(c.split) or {}).get('accuracy'))}"]
    if c.params is not None:
        detail.append(f"{share(c.params)} of the parameters")
    if c.size is not None:
        detail.append(f"file {1 / c.size:,.0f}× smaller")
    return card("vs full fine-tuning", f"{percent(c.accuracy)} of its accuracy", " · ".join(detail), win=True)


def section(c: Comparison, title: str = "LoRA vs full fine-tuning") -> list[str]:
    """The sentence, notes, the metrics side by side with their ratio, and the costs."""
    full = c.base.results
    rows = []
    for split in ("validation", "test"):
        mine, theirs = c.lora.get(split) or {}, full.get(split) or {}
        for k in COMPARED:
            if k in mine or k in theirs:
                r = _ratio(mine.get(k), theirs.get(k))
                rows.append([split, k, mine.get(k), theirs.get(k), "-" if r is None else f"{100 * r:.1f}%"])
    lt, ft = c.lora_train, c.base_train
    costs = []
    for what, k, show in (("trained parameters", "trainable_params", "{:,.0f}".format),
                          ("file (adapter / whole model)", "adapter_bytes", human_bytes),
                          ("training seconds", "seconds", "{:,.1f}".format),
                          ("tokens per second", "tokens_per_s", "{:,.0f}".format)):
        if finite(lt.get(k)) or finite(ft.get(k)):
            r = _ratio(lt.get(k), ft.get(k))
            costs.append([what] + [show(v) if finite(v) else "-" for v in (lt.get(k), ft.get(k))]
                         + ["-" if r is None else share(r) if r < 1 else f"{r:,.2g}×"])
    out = [f"<h2>{esc(title)}</h2>", f"<p><b>{esc(c.sentence)}.</b> "
           + (f"{esc(c.size_text)}." if c.size_text else "") + "</p>",
           f"<p>Baseline: {esc(c.base.path)} (model {esc(c.base.cfg.get('model', '-'))}, every weight trained, "
           f"best epoch {esc(fmt(full.get('best_epoch')))}).</p>"]
    out += [note(n) for n in c.base.notes]
    out.append("<div class=row>")
    if rows:
        out.append(table(["split", "metric", "LoRA", "full fine-tuning", "LoRA / full"], rows, text_cols=2))
    if costs:
        out.append(table(["", "LoRA", "full fine-tuning", "LoRA / full"], costs))
    out.append("</div>")
    return out
