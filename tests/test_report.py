"""The HTML report: a run and a search directory (tiny trainings), self-contained, robust, and opened in a
real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import loratune
from loratune.cli import main as cli
from loratune.errors import InputError
from loratune.report.write import write_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
TRAIN = dict(epochs=2, batch_size=8, max_length=32, threads=1)


class Page(HTMLParser):
    """The tags and attributes of a page (for checks without a browser)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def check_self_contained(path: Path) -> Page:
    """Parses; every image a decodable PNG data URI; nothing refers outside the file."""
    from PIL import Image

    text = path.read_text(encoding="utf-8")
    page = Page(text)
    assert page.all("img"), "no figures"
    for a in page.all("img"):
        src = a["src"] or ""
        assert src.startswith("data:image/png;base64,"), src[:60]
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
        with Image.open(io.BytesIO(raw)) as im:
            assert im.size[0] > 100 and im.size[1] > 50
    for _, attrs in page.tags:
        for key in ("src", "href", "action", "data", "poster"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(key) or ""), (key, attrs[key])
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", text)
    assert not page.all("link") and not any(a.get("src") for a in page.all("script"))
    csp = [a for a in page.all("meta") if (a.get("http-equiv") or "").lower() == "content-security-policy"]
    assert csp and "default-src 'none'" in (csp[0]["content"] or "")
    return page


# --- fixtures: a run and a search directory ---------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: str, tiny_data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    loratune.train(out=out, model=tiny_model_dir, data=tiny_data, rank=4, log_every=5, **TRAIN)
    return out


@pytest.fixture(scope="module")
def search_dir(tiny_model_dir: str, tiny_data: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search directory in the format of loratune.search: three trials of different ranks and target
    sets (one cut after an epoch, as ASHA does), one diverged, best/ and search.json."""
    out = tmp_path_factory.mktemp("report") / "search"
    trials = [("t0000", dict(rank=4, targets="q,v", lr=5e-4, dropout=0.1, alpha=4), "completed", 3),
              ("t0001", dict(rank=8, targets="q", lr=3e-3, dropout=0.2, alpha=8), "completed", 3),
              ("t0002", dict(rank=2, targets="v", lr=1e-4, dropout=0.3, alpha=2), "stopped_early", 1),
              ("t0003", dict(rank=16, targets="q,v", lr=0.09, dropout=0.4, alpha=16), "diverged", 0)]
    rows = []
    for tid, opts, status, epochs in trials:
        tdir = out / "trials" / tid
        row = {"trial": tid, "status": status, "epochs_run": epochs, **opts, "val_loss": None, "val_accuracy": None,
               "val_f1": None}
        if epochs:
            res = loratune.train(out=tdir, model=tiny_model_dir, data=tiny_data, log_every=5,
                                 **{**TRAIN, **opts, "epochs": epochs}, evaluate_test=False)
            if status == "stopped_early":
                (tdir / "results.json").unlink()          # ASHA stops the function: no results.json
            row.update(val_loss=res.validation["loss"], val_accuracy=res.validation["accuracy"],
                       val_f1=res.validation["f1"])
        else:
            tdir.mkdir(parents=True)
        rows.append(row)
    with open(out / "trials.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "trials.json").write_text(json.dumps(rows, indent=2))
    best = min((r for r in rows if r["val_loss"] is not None), key=lambda r: r["val_loss"])
    shutil.copytree(out / "trials" / best["trial"], out / "best")
    test = loratune.evaluate(out / "best" / "adapter", split="test")
    old = json.loads((out / "best" / "results.json").read_text())
    config = {k: best[k] for k in ("lr", "rank", "targets", "dropout", "alpha")}
    brief = {"trial": best["trial"], "status": best["status"], "config": config, "validation": old["validation"],
             "best_epoch": old["best_epoch"], "test": test, "run_dir": str(out / "best")}
    (out / "best" / "results.json").write_text(json.dumps({**old, "test": test, "trial": best["trial"],
                                                           "config": config}))
    (out / "search.json").write_text(json.dumps({"metric": "val_loss", "mode": "min", "trials": 4,
                                                 "statuses": {"completed": 2, "stopped_early": 1, "diverged": 1},
                                                 "seconds": 734.5, "best": brief,
                                                 "default": {**brief, "trial": "t0000"} if best["trial"] != "t0000"
                                                 else brief}))
    (out / "search.yaml").write_text("samples: 4\nmax_epochs: 3\nmetric: val_loss\nmode: min\n")
    return out


# --- a training run ---------------------------------------------------------------------------------

def test_run_report(run_dir: Path) -> None:
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = check_self_contained(path)
    text = path.read_text(encoding="utf-8")
    assert len(page.all("img")) >= 5                     # curves, confusion, ROC, sizes, singular values
    for what in ("learning curves", "confusion", "roc", "precision", "size", "× smaller", "δw", "effective rank"):
        assert what in text.lower(), what
    results = json.loads((run_dir / "results.json").read_text())
    ratio = results["train"]["model_bytes"] / results["train"]["adapter_bytes"]
    assert f"{ratio:,.0f}× smaller" in text


def test_report_of_an_unfinished_run(run_dir: Path, tmp_path: Path) -> None:
    """A run killed in its first epoch: config.yaml and a few metrics lines, no adapter, no results."""
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(run_dir / "config.yaml", part)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:3]
    (part / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "train", "st')    # a torn last line
    text = write_report(part).read_text(encoding="utf-8")
    assert "not finished" in text and "Learning curves" in text
    check_self_contained(part / "report.html")


def _null_losses(run: Path) -> None:
    """Rewrite a run's metrics.jsonl as the trainer writes NaN validation losses: null."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**x, "loss": None} if x["type"] == "eval" else x) + "\n"
                                               for x in lines))


def test_report_of_a_run_without_a_finite_validation_loss(run_dir: Path, tmp_path: Path) -> None:
    """Every validation loss non-finite: no best epoch, and a line that says why."""
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "results.json").unlink()
    _null_losses(bad)
    text = write_report(bad).read_text(encoding="utf-8")
    assert "best epoch: none; no epoch had a finite validation loss" in text and "Learning curves" in text
    assert "learning curves: not available" not in text
    assert "no epoch had a finite validation loss" not in write_report(run_dir).read_text(encoding="utf-8")


def test_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        write_report(tmp_path / "file.txt")
    with pytest.raises(InputError, match="not a run directory"):
        write_report(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "RUN_DIR" in err and str(tmp_path) in err and "Traceback" not in err


def test_cli_report(run_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    (run_dir / "report.html").unlink(missing_ok=True)
    assert cli.main(["report", str(run_dir)]) == 0
    assert f"report written to {run_dir / 'report.html'}" in capsys.readouterr().out
    assert (run_dir / "report.html").is_file()


# --- a search ---------------------------------------------------------------------------------------

def test_search_report(search_dir: Path) -> None:
    path = write_report(search_dir)
    page = check_self_contained(path)
    text = path.read_text(encoding="utf-8")
    summary = json.loads((search_dir / "search.json").read_text())
    best = summary["best"]
    glance = text[:text.index("<h2>")]                   # the answers sit above the first section
    assert f"Rank {best['config']['rank']} on {best['config']['targets']}" in glance
    assert "× smaller than the model" in glance and "winner" in glance and "4 trials" in glance
    assert "stopped early (ASHA)" in glance and "diverged" in glance
    tables = [a for a in page.all("table") if a.get("class") == "sortable"]
    assert tables, "the trials table is sortable"
    assert text.count('<tr class="best">') == 1
    for what in ("What mattered", "where ASHA stopped", "Size", "Wall time", "confusion", "Subspace similarity φ",
                 "12.2 min"):
        assert what in text, what
    assert len(page.all("img")) >= 8


def test_search_report_without_optional_pieces(search_dir: Path, tmp_path: Path) -> None:
    """Only trials.csv and the trials' folders (no search.json, trials.json, best/): still a report."""
    bare = tmp_path / "bare"
    shutil.copytree(search_dir / "trials", bare / "trials")
    shutil.copy(search_dir / "trials.csv", bare)
    text = write_report(bare).read_text(encoding="utf-8")
    rows = list(csv.DictReader(open(search_dir / "trials.csv", encoding="utf-8")))
    winner = min((r for r in rows if r["val_loss"]), key=lambda r: float(r["val_loss"]))
    assert f"Rank {winner['rank']} on {winner['targets']}" in text
    check_self_contained(bare / "report.html")
    assert "no epoch had a finite validation loss" not in text
    _null_losses(bare / "trials" / "t0002")
    text = write_report(bare).read_text(encoding="utf-8")
    assert "no epoch had a finite validation loss in trial t0002: no best epoch" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "trials.json").write_text("[]")
    assert "no trial finished" in write_report(empty).read_text(encoding="utf-8")


def _png_size(uri: str) -> tuple[int, int]:
    from PIL import Image

    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        return im.size


def test_figures_from_plain_numbers() -> None:
    """The figure functions on inputs the tiny runs do not produce: three classes, many matrices, every status."""
    from loratune.report import html, plots

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    probs = rng.dirichlet([1, 1, 1], size=60)
    probs[np.arange(60), labels] += 0.5
    assert _png_size(plots.roc_plot(labels, probs / probs.sum(1, keepdims=True), ["a", "b", "c"]))[0] > 100
    assert _png_size(plots.confusion_plot([[5, 1, 0], [2, 7, 1], [0, 0, 9]], ["a", "b", "c"]))[0] > 100
    mats = [{"singular_values": sorted(rng.random(8), reverse=True)} for _ in range(14)] + [{"singular_values": [0.0] * 8}]
    assert _png_size(plots.singular_values_plot(mats, [f"m{i}" for i in range(15)]))[0] > 100
    phi = {f"m{i}": rng.random((4, 8)) for i in range(12)}
    assert _png_size(plots.phi_heatmaps(phi, list(phi), "r=4", "r=8"))[0] > 100
    evals = {"a": [{"epoch": 1, "loss": 0.7, "accuracy": 0.5}, {"epoch": 2, "loss": 0.5, "accuracy": 0.8}],
             "b": [{"epoch": 1, "loss": 0.9, "accuracy": 0.4}], "c": [{"epoch": 1, "loss": float("nan")}], "d": []}
    statuses = {"a": "completed", "b": "stopped_early", "c": "diverged", "d": "failed"}
    assert _png_size(plots.trial_curves(evals, statuses, ["accuracy", "loss"], 3, "a"))[0] > 100
    rows = [{"trial": t, "rank": r, "lr": lr, "val_loss": v} for t, r, lr, v in
            (("a", 2, 1e-4, 0.5), ("b", 8, 1e-2, 0.4), ("c", 8, 3e-3, None), ("d", "x", 1e-3, 0.6))]
    assert _png_size(plots.metric_vs_options(rows, "val_loss", ["rank", "lr"], None, "b"))[0] > 100
    assert _png_size(plots.learning_curves([], []))[0] > 100
    assert _png_size(plots.size_plot(None, None, 1000, None))[0] > 100
    assert html.human_bytes(999) == "999 B" and html.human_bytes(1_234_567) == "1.2 MB"
    assert html.fmt(16.0, option=True) == "16" and html.fmt(5e-4, option=True) == "0.0005"
    assert html.fmt(float("nan")) == "-" and html.fmt(0.12345) == "0.1235" and html.fmt(2e-5) == "2.00e-05"
    page = html.table(["name", "x"], [["<b>", 1.5]], sortable=True)
    assert "&lt;b&gt;" in page and 'data-v="1.5"' in page and "class=sortable" in page


# --- in a real browser ------------------------------------------------------------------------------

PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) { return i.complete ? i.naturalWidth : -1; });
  var table = document.querySelector('table.sortable'), order = [];
  if (table) {
    var heads = Array.from(table.tHead.rows[0].cells).map(function (c) { return c.textContent.trim(); });
    var col = heads.indexOf('rank');
    table.tHead.rows[0].cells[col].click();
    order = Array.from(table.tBodies[0].rows).map(function (r) { return r.cells[col].textContent; });
  }
  var out = {imgs: imgs, requests: performance.getEntriesByType('resource').map(function (e) { return e.name; }),
             violations: window.__violations || [], order: order};
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
document.addEventListener('securitypolicyviolation', function (e) {
  (window.__violations = window.__violations || []).push(e.blockedURI + ' ' + e.violatedDirective);
});
</script>"""


def _chromium(args: list[str], profile: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_in_a_headless_browser(search_dir: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        if os.geteuid() == 0:
            pytest.fail("chromium is missing; CI runs as root and must run this test: apt-get install -y chromium "
                        "(make test does)")
        pytest.skip("needs Debian's chromium: sudo apt-get install -y chromium (make test installs it as root)")
    report = write_report(search_dir)
    # 1) a screenshot that is not blank
    shot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory(prefix="lt-chrome-") as profile:
        proc = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", report.resolve().as_uri()], profile)
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 20 and len(np.unique(pixels)) > 50, "the screenshot is (nearly) blank"
    # 2) a copy with a probe script: every image decoded, no request left the file, the table sorts
    probed = report.with_name("probed.html")
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="lt-chrome-") as profile:
        proc = _chromium(["--virtual-time-budget=10000", "--dump-dom", probed.resolve().as_uri()], profile)
    probed.unlink()
    found = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"probe did not run: {proc.stdout[-500:]} {proc.stderr[-1500:]}"
    import html as html_lib

    result = json.loads(html_lib.unescape(found.group(1)))
    n_imgs = len(Page(report.read_text(encoding="utf-8")).all("img"))
    assert len(result["imgs"]) == n_imgs and all(w > 0 for w in result["imgs"]), result["imgs"]
    assert result["requests"] == [] and result["violations"] == []
    ranks = [int(x) for x in result["order"]]
    assert ranks == sorted(ranks) and len(ranks) == 4


def test_trial_curves_show_passes_inside_the_first_epoch_and_epoch_0(monkeypatch) -> None:
    """A search validating 4 times an epoch (0.25 …) and a causal search's epoch 0 (the base model): the x axis
    starts left of the first point, not at epoch 0.8 (where the first quarter-epoch passes were cut off)."""
    from loratune.report import plots

    figs = []
    monkeypatch.setattr(plots, "png", lambda fig: figs.append(fig) or "data:")
    quarter = {"a": [{"epoch": e, "loss": 1 / (1 + e), "accuracy": 0.5 + e / 10} for e in (0.25, 0.5, 0.75, 1, 2)]}
    plots.trial_curves(quarter, {"a": "completed"}, ["accuracy", "loss"], 2, "a")
    base = {"a": [{"epoch": e, "loss": 1 - e / 4} for e in (0, 0.5, 1)]}
    plots.trial_curves(base, {"a": "completed"}, ["loss"], 1, "a")
    (q_acc, q_loss), (b_loss,) = figs[0].axes, figs[1].axes
    for ax, first, last in ((q_acc, 0.25, 2), (q_loss, 0.25, 2), (b_loss, 0, 1)):
        lo, hi = ax.get_xlim()
        assert lo < first and hi > last and lo > first - 0.5


def test_user_text_is_drawn_as_plain_text(monkeypatch) -> None:
    """Class names, option values and run labels are text, not matplotlib mathtext: '$10-$20' keeps its dollars,
    'a$^$b' (invalid mathtext) still draws, and a label starting with '_' stays in a legend."""
    from loratune.report import plots

    figs = []
    real = plots.png
    monkeypatch.setattr(plots, "png", lambda fig: figs.append(fig) or real(fig))

    def shown(texts) -> list[tuple[str, bool]]:      # what the renderer draws: (string, as mathtext?)
        return [(s.replace("\u200b", ""), m) for s, m in (t._preprocess_math(t.get_text()) for t in texts)]

    names = ["$10-$20", "a$^$b", "_under"]
    plots.confusion_plot([[3, 1, 0], [0, 4, 1], [1, 0, 5]], names)
    ax = figs[-1].axes[0]
    assert shown(ax.get_xticklabels()) == shown(ax.get_yticklabels()) == [(n, False) for n in names]
    labels = np.repeat([0, 1, 2], 10)
    probs = np.full((30, 3), 0.2)
    probs[np.arange(30), labels] = 0.6
    plots.roc_plot(labels, probs, names)
    legend = shown(figs[-1].axes[0].get_legend().get_texts())
    assert [s.split(" (AUC")[0] for s, _ in legend] == names and not any(m for _, m in legend)
    rows = [{"trial": str(i), "rank": 4, "lr": 1e-3 * (i + 1), "val_loss": 0.5 - i / 10, "price": n}
            for i, n in enumerate(names)]
    plots.metric_vs_options(rows, "val_loss", ["rank"], "price", None)
    assert shown(figs[-1].axes[0].get_legend().get_texts()) == [(f"price = {n}", False) for n in sorted(names)]
    plots.phi_heatmaps({"q": np.eye(2)}, ["_q$"], "a$^$b", "_r")
    ax = figs[-1].axes[0]
    assert shown([ax.title, ax.xaxis.label, ax.yaxis.label]) == [("_q$", False), ("j: _r", False),
                                                                 ("i: a$^$b", False)]
    plots.singular_values_plot([{"singular_values": [2.0, 1.0]}], ["_m$"])
    assert shown(figs[-1].axes[1].get_legend().get_texts())[0] == ("_m$", False)
