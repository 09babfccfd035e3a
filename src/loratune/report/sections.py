"""Sections shared by the run and search pages, and the tolerant readers behind them: a report is
written even from a damaged or unfinished run, with a line saying what is missing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loratune.report import plots
from loratune.report.html import esc, finite, fmt, human_bytes, img, note, table

log = logging.getLogger(__name__)


SIZE_KEYS = ("trainable_params", "all_params", "adapter_bytes", "model_bytes")


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None (logged) when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: unreadable, skipped (%s)", path, e)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file; broken lines (a run killed mid-write) are skipped."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        log.warning("%s: unreadable, skipped (%s)", path, e)
        doc = None
    return doc if isinstance(doc, dict) else {}


def curves(run: Path) -> tuple[list[tuple[int, float]], list[dict[str, Any]]]:
    """(train loss per logged step, validation evaluations) from ``metrics.jsonl``."""
    lines = read_jsonl(run / "metrics.jsonl")
    train = [(int(x["step"]), float(x["loss"])) for x in lines if x.get("type") == "train"
             and isinstance(x.get("step"), int) and finite(x.get("loss"))]
    evals = [x for x in lines if x.get("type") == "eval" and isinstance(x.get("epoch"), int)]
    return train, evals


def predict_test_split(run: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(true class ids (N,), probabilities (N, C), label names): the run's adapter on its test split,
    cut from its data exactly as in training (the run's ``config.yaml``, the adapter's classes)."""
    from loratune.infer.inference import load
    from loratune.runtime import resolve_precision
    from loratune.tasks.classification import predict_probs, tokenize
    from loratune.training.data import load_splits
    from loratune.training.rundir import read_config

    cfg, _ = read_config(run)
    loaded = load(run / "adapter", device=cfg.device)
    splits = load_splits(cfg, label_names=loaded.label_names)
    enc = tokenize(splits.test, loaded.tokenizer, loaded.max_length)
    device = next(loaded.model.parameters()).device
    probs, _ = predict_probs(loaded.model, enc, device, resolve_precision(cfg.precision, device), pad_id=loaded.pad_id)
    return enc.labels, probs, loaded.label_names


def guarded(what: str, fn: Any, *args: Any) -> list[str]:
    """A section, or one line saying why it is missing: a report is written even from a damaged run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one broken section must not cost the whole report
        log.warning("report: %s skipped: %s", what, e)
        return [note(f"{what}: not available ({type(e).__name__}: {e})")]


def size_facts(train: dict[str, Any]) -> str:
    """'1.1 kB adapter vs 89.4 kB model: 16× smaller' (or '')."""
    a, m = train.get("adapter_bytes"), train.get("model_bytes")
    if not (a and m):
        return ""
    return f"{human_bytes(a)} adapter vs {human_bytes(m)} model"


def ratio(train: dict[str, Any]) -> float | None:
    a, m = train.get("adapter_bytes"), train.get("model_bytes")
    return m / a if a and m else None


def size_section(train: dict[str, Any]) -> list[str]:
    if not any(train.get(k) for k in SIZE_KEYS):
        return [note("sizes: not recorded (the run did not finish)")]
    t, a = train.get("trainable_params"), train.get("all_params")
    share = f"{t:,} of {a:,} parameters trained ({100 * t / a:.3g}%, the task head included)" if t and a else ""
    return ["<h2>Size</h2>", img(plots.size_plot(t, a, train.get("adapter_bytes"), train.get("model_bytes")), "sizes"),
            f"<p>{esc(share)}. {esc(size_facts(train))}.</p>"]


def test_section(run: Path) -> list[str]:
    from loratune.tasks.metrics import confusion, per_class

    labels, probs, names = predict_test_split(run)
    preds = probs.argmax(axis=1)
    pc = per_class(labels, preds, len(names))
    rows = [[n, pc["precision"][i], pc["recall"][i], pc["f1"][i], pc["support"][i]] for i, n in enumerate(names)]
    return ["<h3>Test split: confusion, per class, ROC</h3><div class=row>",
            img(plots.confusion_plot(confusion(labels, preds, len(names)), names), "confusion matrix"),
            img(plots.roc_plot(labels, probs, names), "ROC curve"), "</div>",
            table(["class", "precision", "recall", "F1", "support"], rows)]


def metrics_table(results: dict[str, Any]) -> str:
    keys = ["loss", "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"]
    rows = [[split] + [(results.get(split) or {}).get(k) for k in keys] for split in ("validation", "test")
            if results.get(split)]
    return table(["split"] + keys, rows)


def analysis_section(adapter: Path, compare: Path | None = None, labels: tuple[str, str] = ("", "")) -> list[str]:
    """ΔW of ``adapter``: table and spectrum; with ``compare``, φ heatmaps (Figure 3 of the LoRA paper)."""
    from loratune.report.analysis import analyze_adapter, short_names

    res = analyze_adapter(adapter, compare)
    mats = [m.to_json() for m in res.matrices]
    names = short_names([m["name"] for m in mats])
    rows = [[n, "×".join(map(str, m["shape"])), m["rank"], m["effective_rank"], m["frobenius_norm"],
             m["amplification"], " ".join(f"{x:.3g}" for x in m["singular_values"][:4])] for n, m in zip(names, mats)]
    out = ["<h2>What the adapter learned: ΔW = (α/r)·B·A</h2>",
           "<p>Per adapted matrix: the effective rank is the fewest directions holding 90% of ‖ΔW‖²<sub>F</sub>; "
           "the amplification ‖ΔW‖<sub>F</sub> / ‖Uᵀ·W0·V‖<sub>F</sub> says how strongly ΔW boosts directions the "
           "frozen weight W0 barely uses (LoRA paper §7).</p>",
           table(["matrix", "shape", "r", "effective rank", "‖ΔW‖_F", "amplification", "top singular values"], rows,
                 sortable=True),
           img(plots.singular_values_plot(mats, names), "singular values")]
    if res.note:
        out.append(note(f"amplification: {res.note}"))
    if compare is not None and res.phi:
        phi_names = short_names(list(res.phi))
        out += [f"<h3>Subspace similarity φ between {esc(labels[0])} and {esc(labels[1])}</h3>",
                "<p>φ(i, j) = ‖V₁[:, :i]ᵀ·V₂[:, :j]‖²<sub>F</sub> / min(i, j) over the right-singular vectors of the "
                "two A matrices: 1 where the top directions coincide, 0 where they are orthogonal.</p>",
                img(plots.phi_heatmaps(res.phi, phi_names, labels[0], labels[1]), "subspace similarity")]
    return out


def config_section(run: Path) -> list[str]:
    cfg = read_yaml(run / "config.yaml")
    if not cfg:
        return []
    text = yaml.safe_dump(cfg, sort_keys=False)
    return [f"<details><summary>Configuration (config.yaml)</summary><pre>{esc(text)}</pre></details>"]


def describe_targets(run: Path, given: Any = None) -> str:
    """'q,v (query, value)': the targets as given and the module names they expanded to."""
    given = given if given is not None else read_yaml(run / "config.yaml").get("targets")
    cfg = read_json(run / "adapter" / "adapter_config.json") or {}
    modules = cfg.get("target_modules")
    text = fmt(given) if given is not None else ""
    if isinstance(modules, list) and modules and ",".join(map(str, modules)) != text:
        text = f"{text} ({', '.join(map(str, modules))})" if text else ", ".join(map(str, modules))
    return text or "-"
