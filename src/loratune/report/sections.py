"""Sections shared by the run and search pages. A report is written even from a damaged or unfinished run,
with a line saying what is missing: every file is read through the tolerant readers of
:mod:`loratune.training.rundir`, and each section that can fail is :func:`guarded`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import yaml

from loratune.report import plots
from loratune.report.baseline import weights_dir
from loratune.report.html import clip, esc, fmt, human_bytes, img, note, table
from loratune.training import rundir

log = logging.getLogger(__name__)


SIZE_KEYS = ("trainable_params", "all_params", "adapter_bytes", "model_bytes")


def guarded(what: str, fn: Callable[..., list[str]], *args: Any) -> list[str]:
    """A section, or one line saying why it is missing: a report is written even from a damaged run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - one broken section must not cost the whole report
        log.warning("report: %s skipped: %s", what, e)
        return [note(f"{what}: not available ({type(e).__name__}: {e})")]


NO_FINITE_LOSS = "no epoch had a finite validation loss"


def trained(evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The validation passes of the trained model: ``evals`` without epoch 0 (a causal LM's base model)."""
    return [e for e in evals if e.get("epoch") != 0]


def learning_curves_section(run: Path, heading: str = "Learning curves", level: int = 2) -> list[str]:
    """Train loss per logged step and validation metrics per epoch (a causal LM's from epoch 0, the base model), the
    best epoch marked (:func:`rundir.best_evaluation` of the trained epochs); a line saying so when no epoch had a
    finite validation loss."""
    evals = rundir.evaluations(run)
    best = rundir.best_evaluation(trained(evals))
    out = [f"<h{level}>{esc(heading)}</h{level}>"] + guarded("learning curves", lambda: [img(plots.learning_curves(
        rundir.train_losses(run), evals, best["epoch"] if best else None), "learning curves")])
    if trained(evals) and best is None:
        out.append(note(f"best epoch: none; {NO_FINITE_LOSS} (the run diverged)"))
    return out


def size_facts(train: dict[str, Any]) -> str:
    """'1.1 kB adapter vs 89.4 kB model: 16× smaller' (or '')."""
    a, m = train.get("adapter_bytes"), train.get("model_bytes")
    if not (a and m):
        return ""
    return f"{human_bytes(a)} adapter vs {human_bytes(m)} model"


def ratio(train: dict[str, Any]) -> float | None:
    """How many times smaller the adapter file is than the model's weights (None: not recorded)."""
    a, m = train.get("adapter_bytes"), train.get("model_bytes")
    return m / a if a and m else None


def size_section(train: dict[str, Any], full: bool = False) -> list[str]:
    """Trained vs all parameters and adapter vs model bytes, from ``results.json``'s ``train``; for a full
    fine-tuning run (``full``: no adapter) the parameters trained and the model file, without a figure."""
    if not any(train.get(k) for k in SIZE_KEYS):
        return [note("sizes: not recorded (the run did not finish)")]
    t, a = train.get("trainable_params"), train.get("all_params")
    if full:
        trained = f"{t:,} of {a:,} parameters trained ({100 * t / a:.3g}%)" if t and a else \
            f"{t:,} parameters trained" if t else ""
        size = f"the fine-tuned model's file (model/) is {human_bytes(train['adapter_bytes'])}" \
            if train.get("adapter_bytes") else ""
        return ["<h2>Size</h2>", f"<p>Full fine-tuning: {esc('; '.join(x for x in (trained, size) if x))}. "
                "There is no adapter: every weight is saved.</p>"]
    share = f"{t:,} of {a:,} parameters trained ({100 * t / a:.3g}%, the task head included)" if t and a else ""
    return ["<h2>Size</h2>", img(plots.size_plot(t, a, train.get("adapter_bytes"), train.get("model_bytes")), "sizes"),
            f"<p>{esc(share)}. {esc(size_facts(train))}.</p>"]


def test_section(run: Path) -> list[str]:
    """Confusion matrix, per-class scores and ROC of the run's adapter (a full fine-tuning run's model/) on its
    test split, cut from its data exactly as in training, on the device and at the precision of the run's
    ``config.yaml``."""
    from loratune.infer.inference import run_split
    from loratune.tasks.metrics import confusion, per_class

    cfg = rundir.read_config_doc(run)
    res = run_split(weights_dir(run, cfg), split="test", precision=cfg.get("precision") or "auto",
                    device=cfg.get("device") or "auto")
    labels, probs, names = res.labels, res.probs, res.label_names
    preds = probs.argmax(axis=1)
    pc = per_class(labels, preds, len(names))
    rows = [[n, pc["precision"][i], pc["recall"][i], pc["f1"][i], pc["support"][i]] for i, n in enumerate(names)]
    return ["<h3>Test split: confusion, per class, ROC</h3><div class=row>",
            img(plots.confusion_plot(confusion(labels, preds, len(names)), names), "confusion matrix"),
            img(plots.roc_plot(labels, probs, names), "ROC curve"), "</div>",
            table(["class", "precision", "recall", "F1", "support"], rows)]


def metrics_table(results: dict[str, Any]) -> str:
    """Validation and test metrics of ``results.json``, one row per split present; a causal-LM run's rows (loss,
    perplexity, accuracy by choice scoring, exact match) come after the base model's (``baseline``)."""
    base = results.get("baseline") or {}
    if base:
        keys = ["loss", "perplexity", "accuracy", "exact_match"]
        rows = [[f"{split} ({who})"] + [(where.get(split) or {}).get(k) for k in keys]
                for split in ("validation", "test") for who, where in (("base model", base), ("trained", results))
                if where.get(split)]
        return table(["split"] + keys, rows)
    keys = ["loss", "accuracy", "f1", "f1_macro", "precision", "recall", "roc_auc"]
    rows = [[split] + [(results.get(split) or {}).get(k) for k in keys] for split in ("validation", "test")
            if results.get(split)]
    return table(["split"] + keys, rows)


def same_answer(answer: str | None, reference: str | None) -> bool:
    """Exact match's rule: the two equal after ``.strip().lower()`` (a missing one matches nothing)."""
    return answer is not None and reference is not None and answer.strip().lower() == reference.strip().lower()


def generations_section(run: Path, heading: str = "Sample generations", level: int = 2) -> list[str]:
    """A causal-LM run's generations.json: the first validation rows' prompt (the last user turn), reference, and
    the greedy answers of the base model and of the kept adapter, as exact match made them. Rows whose adapter
    answer matches the reference (:func:`same_answer`) are marked; long texts are cut, whole on hover."""
    title = f"<h{level}>{esc(heading)}</h{level}>"
    doc = rundir.read_generations(run)
    if doc is None:
        return [title, note("no generations.json in this run (a run from before loratune kept sample generations, "
                            "or one stopped before its base model's evaluation)")]
    rows, split = doc["rows"], doc.get("split") or "validation"
    hits = [same_answer(r.get("adapter"), r.get("reference")) for r in rows]
    base_hits = sum(same_answer(r.get("base"), r.get("reference")) for r in rows)
    has_base = any(r.get("base") is not None for r in rows)
    has_adapter = any(r.get("adapter") is not None for r in rows)
    epoch = doc.get("epoch")
    kept = f" of epoch {fmt(epoch, True)}, the one the run kept" if epoch is not None else ""
    facts = [f"The first {len(rows)} {split} rows, answered greedily (as exact match answers them) by the base model "
             f"and by the adapter{kept}."]
    if has_adapter:
        facts.append(f"✓ (a green row): the adapter's answer equals the reference, case and surrounding whitespace "
                     f"aside: {sum(hits)} of {len(rows)}" + (f" (base model: {base_hits})" if has_base else "") + ".")
    else:
        facts.append("No adapter answers yet: no validation pass has kept an adapter.")
    if not has_base:
        facts.append("The base model's answers were not kept for this run.")
    cells = [[i + 1, clip(r.get("prompt")), clip(r.get("reference")), clip(r.get("base")), clip(r.get("adapter")),
              "✓" if hit else ""] for i, (r, hit) in enumerate(zip(rows, hits))]
    return [title, f"<p>{esc(' '.join(facts))}</p>",
            "<div class=scroll>" + table(["#", "prompt", "reference", "base model", "adapter", "= reference"], cells,
                                         text_cols=6, row_class=["hit" if h else "" for h in hits]) + "</div>"]


def analysis_section(adapter: Path, compare: Path | None = None, labels: tuple[str, str] = ("", "")) -> list[str]:
    """ΔW of ``adapter``: table and spectrum; with ``compare``, φ heatmaps (Figure 3 of the LoRA paper)."""
    from loratune.core.adapters import read_adapter_config
    from loratune.report.analysis import analyze_adapter, short_names

    res = analyze_adapter(adapter, compare)
    s = "(α/√r)" if read_adapter_config(adapter)[0].rslora else "(α/r)"     # rsLoRA scales by α/√r
    product = "(B·A − B0·A0)" if any(m.delta == "s*(B*A-B0*A0)" for m in res.matrices) else "B·A"
    mats = [m.to_json() for m in res.matrices]
    names = short_names([m["name"] for m in mats])
    rows = [[n, "×".join(map(str, m["shape"])), m["rank"], m["effective_rank"], m["frobenius_norm"],
             m["amplification"], " ".join(f"{x:.3g}" for x in m["singular_values"][:4])] for n, m in zip(names, mats)]
    out = [f"<h2>What the adapter learned: ΔW = {s}·{product}</h2>",
           "<p>Per adapted matrix: the effective rank is the fewest directions holding 90% of ‖ΔW‖²<sub>F</sub>; "
           "the amplification ‖ΔW‖<sub>F</sub> / ‖Uᵀ·W0·V‖<sub>F</sub> says how strongly ΔW boosts directions the "
           "frozen weight W0 barely uses (LoRA paper §7).</p>",
           table(["matrix", "shape", "r", "effective rank", "‖ΔW‖_F", "amplification", "top singular values"], rows,
                 sortable=True),
           img(plots.singular_values_plot(mats, names), "singular values")]
    if any(m.delta == "merged-W0" for m in res.matrices):
        out.append(note(f"DoRA adapter: ΔW is the merged weight minus W0, m/‖W0 + {s}·B·A‖ ⊙ (W0 + {s}·B·A) − W0, "
                        "full rank in general"))
    if product != "B·A":
        out.append(note("PiSSA / OLoRA adapter: A and B started at A0, B0 computed from W0, which the loader replaces "
                        f"by W0 − {s}·B0·A0, so ΔW against the original W0 is {s}·(B·A − B0·A0), rank ≤ 2r"))
    if res.note:
        out.append(note(res.note))
    if compare is not None and res.phi:
        phi_names = short_names(list(res.phi))
        out += [f"<h3>Subspace similarity φ between {esc(labels[0])} and {esc(labels[1])}</h3>",
                "<p>φ(i, j) = ‖V₁[:, :i]ᵀ·V₂[:, :j]‖²<sub>F</sub> / min(i, j) over the right-singular vectors of the "
                "two A matrices: 1 where the top directions coincide, 0 where they are orthogonal.</p>",
                img(plots.phi_heatmaps(res.phi, phi_names, labels[0], labels[1]), "subspace similarity")]
    return out


def config_section(run: Path) -> list[str]:
    """The run's ``config.yaml``, folded (nothing when there is none)."""
    cfg = rundir.read_config_doc(run)
    if not cfg:
        return []
    text = yaml.safe_dump(cfg, sort_keys=False)
    return [f"<details><summary>Configuration (config.yaml)</summary><pre>{esc(text)}</pre></details>"]


def describe_targets(run: Path, given: Any = None) -> str:
    """'q,v (query, value)': the targets as given and the module names they expanded to."""
    given = given if given is not None else rundir.read_config_doc(run).get("targets")
    cfg = rundir.read_json(run / "adapter" / "adapter_config.json") or {}
    modules = cfg.get("target_modules")
    text = fmt(given) if given is not None else ""
    if isinstance(modules, list) and modules and ",".join(map(str, modules)) != text:
        text = f"{text} ({', '.join(map(str, modules))})" if text else ", ".join(map(str, modules))
    return text or "-"
