"""A causal-LM run's sample generations and its report, on the tiny random Llama of test_causal_train: the run keeps
its first validation rows' prompts, references and the greedy answers of the base model and of the kept adapter
(each pinned against a separate generation), a resume keeps the base answers it cannot make again, and the run page
shows them, escaped, beside the base model's metrics and the learning curves."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch
from test_causal_train import GOOD, llama_dir, opts, rows, write_jsonl  # noqa: F401 - llama_dir is a fixture

from loratune.report.html import CLIP
from loratune.tasks.causal_eval import SAMPLE_ROWS
from loratune.training import rundir
from loratune.training.options import TrainConfig

CPU = torch.device("cpu")
TRICKY = f'the film is <b>{GOOD[0]}</b> & "fine"'                  # HTML's special characters, escaped on the page
LONG = "the film is good and " + "very " * 60 + "long"               # longer than a cell shows (html.CLIP)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """96 training rows; 18 validation rows (more than SAMPLE_ROWS), the first two tricky; 8 test rows."""
    folder = tmp_path_factory.mktemp("causal-report-data")
    val = rows(18, seed=7)
    val[0] = {"prompt": TRICKY, "completion": "positive"}
    val[1] = {"prompt": LONG, "completion": "positive"}
    return {"data": write_jsonl(folder / "train.jsonl", rows(96)),
            "validation_file": write_jsonl(folder / "val.jsonl", val),
            "test_file": write_jsonl(folder / "test.jsonl", rows(8, seed=3)), "prompts": [r["prompt"] for r in val]}


def _cfg(llama_dir: str, files: dict, **extra) -> TrainConfig:  # noqa: F811
    return TrainConfig(**opts(llama_dir, files["data"], validation_file=files["validation_file"],
                              test_file=files["test_file"], epochs=2, **extra))


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory, llama_dir, files) -> Path:  # noqa: F811
    from loratune.training.loop import train

    out = tmp_path_factory.mktemp("causal-report") / "run"
    train(_cfg(llama_dir, files), out=out)
    return out


def _greedy(model, tok, split, n: int) -> list[str]:
    """A separate greedy generation (one batch of the first ``n`` prompts) of the split's first rows."""
    from loratune.tasks.causal_metrics import greedy_generate

    return greedy_generate(model, tok, split.prompts()[:n], CPU, split.max_new_tokens, precision="fp32")


def test_a_run_keeps_the_first_validation_rows_with_both_models_answers(causal_run, llama_dir,  # noqa: F811
                                                                         files) -> None:
    from loratune.infer.inference import load
    from loratune.training.loop import prepare_data
    from loratune.training.models import load_causal_lm, load_tokenizer

    doc = json.loads((causal_run / "generations.json").read_text(encoding="utf-8"))
    res = json.loads((causal_run / "results.json").read_text(encoding="utf-8"))
    assert set(doc) == {"split", "epoch", "rows"} and doc["split"] == "validation"
    assert doc["epoch"] == res["best_epoch"]                          # the kept adapter's pass
    n = SAMPLE_ROWS
    assert n == 16 and len(doc["rows"]) == n                           # 18 validation rows: the first 16
    assert all(set(r) == {"prompt", "reference", "base", "adapter"} for r in doc["rows"])
    assert [r["prompt"] for r in doc["rows"]] == files["prompts"][:n]
    val = prepare_data(rundir.read_config(causal_run)[0]).validation
    assert [r["reference"] for r in doc["rows"]] == val.references[:n]

    base = _greedy(load_causal_lm(llama_dir), load_tokenizer(llama_dir), val, n)
    loaded = load(causal_run / "adapter", device="cpu")
    tuned = _greedy(loaded.model, loaded.tokenizer, val, n)
    assert [r["base"] for r in doc["rows"]] == base
    assert [r["adapter"] for r in doc["rows"]] == tuned
    words = ("positive", "negative")                                  # training taught it the answers' words
    assert sum(t.startswith(words) for t in tuned) >= n // 2 > sum(b.startswith(words) for b in base)


def test_the_run_page_shows_metrics_curves_and_the_escaped_generations(causal_run) -> None:
    from loratune.report.write import write_report

    page = write_report(causal_run).read_text(encoding="utf-8")
    doc = rundir.read_generations(causal_run)
    res = rundir.read_results(causal_run)
    assert "<h2>Learning curves</h2>" in page and 'alt="learning curves"' in page
    assert [e["epoch"] for e in rundir.evaluations(causal_run)] == [0, 1, 2]     # the base model's, then training's:
    assert "best epoch: none" not in page                                        # no epoch-0 test point among them
    for who in ("validation (base model)", "validation (trained)", "test (base model)", "test (trained)"):
        assert f'<td class="t">{who}</td>' in page
    assert f'data-v="{res["baseline"]["validation"]["loss"]!r}"' in page and f'data-v="{res["test"]["loss"]!r}"' in page

    section = page[page.index("<h2>Sample generations</h2>"):]
    section = section[:section.index("</table>")]
    assert TRICKY not in page and html.escape(TRICKY, quote=True) in section
    shown = section.split(f'title="{html.escape(LONG, quote=True)}">', 1)[1].split("</span>", 1)[0]
    assert shown.endswith("…") and LONG.startswith(shown[:-1]) and len(shown) <= CLIP + 1   # cut, whole on hover
    body = section[section.index("<tbody>"):]
    assert body.count("<tr") == len(doc["rows"]) == SAMPLE_ROWS
    hits = [r["adapter"].strip().lower() == r["reference"].strip().lower() for r in doc["rows"]]
    assert body.count('<tr class="hit">') == sum(hits) and body.count("✓") == sum(hits)
    assert f"{sum(hits)} of {SAMPLE_ROWS}" in section
    for r in doc["rows"][2:]:                                         # short texts whole, escaped
        assert html.escape(r["base"] or "", quote=True) in body and html.escape(r["adapter"], quote=True) in body


def test_a_resumed_run_keeps_the_base_answers(causal_run, llama_dir, files, tmp_path) -> None:  # noqa: F811
    """Stopped after epoch 1's checkpoint and resumed in a fresh train() (nothing in memory): the base model is not
    evaluated again, yet the new best epoch's generations.json has its answers, as the uninterrupted run's has."""
    from loratune.training import loop

    class Stop(Exception):
        pass

    def stop_after_first(epoch, val, ckpt) -> None:
        if epoch == 1:
            raise Stop

    out = tmp_path / "run"
    with pytest.raises(Stop):
        loop.train(_cfg(llama_dir, files), out=out, on_epoch=stop_after_first)
    first = rundir.read_generations(out)
    assert first["epoch"] == 1 and all(r["base"] is not None and r["adapter"] is not None for r in first["rows"])

    seen: list[str] = []
    real = loop.evaluate_split

    def spy(run, split):
        seen.append("validation" if split is run.data.validation else "test")
        return real(run, split)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "evaluate_split", spy)
        loop.train(out=out, resume=True)
    assert seen == ["validation", "test"]                              # epoch 2 and the test: no base model again
    want = json.loads((causal_run / "generations.json").read_text(encoding="utf-8"))
    got = json.loads((out / "generations.json").read_text(encoding="utf-8"))
    assert want["epoch"] == got["epoch"] == 2                          # rewritten after the resume
    assert got == want and [r["base"] for r in got["rows"]] == [r["base"] for r in first["rows"]]


def test_the_generations_table_escapes_cuts_and_marks() -> None:
    """The section on a hand-written generations.json: hostile text escaped, a long answer cut with the whole
    text on hover, matches by exact match's rule (case and surrounding whitespace aside), missing answers as '-'."""
    import tempfile

    from loratune.report.html import clip
    from loratune.report.sections import generations_section

    long = "word " * 100
    rows = [{"prompt": "<script>alert('x')</script>", "reference": "Yes", "base": "no", "adapter": " yes \n"},
            {"prompt": "q", "reference": "a & b", "base": None, "adapter": long},
            {"prompt": "q2", "reference": "z", "base": "z", "adapter": ""}]
    with tempfile.TemporaryDirectory() as d:
        rundir.write_generations(Path(d), rows, 1.5)
        out = "".join(generations_section(Path(d)))
    assert "<script>" not in out and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in out
    assert out.count('<tr class="hit">') == 1 and "1 of 3 (base model: 1)" in out and "epoch 1.5" in out
    assert f'title="{long}"' in out and "a &amp; b" in out and '<span class="note">(empty)</span>' in out
    assert '<td class="w">-</td>' in out                                # no base answer
    shown = clip(long).split(">", 1)[1].removesuffix("…</span>")
    assert long.startswith(shown) and CLIP // 2 < len(shown) <= CLIP and not shown.endswith(" ")   # at a word's end
    assert clip("short <i>") == "short &lt;i&gt;" and clip(None) == "-"


def test_a_classifier_run_keeps_no_generations(finished_run) -> None:
    from loratune.report.run_page import run_page

    assert not (finished_run / "generations.json").exists()
    assert "Sample generations" not in "".join(run_page(finished_run)[2])
