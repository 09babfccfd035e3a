"""bench/search.py's table: each side's best validation accuracy with its 95% Wilson interval (the 2-sentence
gaps between searches are read against it), and the wall-time ratio only when both sides ran."""

from __future__ import annotations

import math
from pathlib import Path

from bench import search


def _side(acc: float, seconds: float, **kw) -> dict:
    return {"seconds": seconds, "epochs_trained": 9.0, "best_val_accuracy": acc, "best_val_loss": 0.44,
            "max_val_accuracy": acc, "peak_rss_mib": 1000.0, "peak_pss_mib": 900.0, **kw}


def test_rows_give_the_wilson_interval_of_the_best_accuracy() -> None:
    rows = search.rows({"reference": _side(0.8025, 1338.0, val_n=400), "ours": _side(0.7975, 207.0, val_n=400)})
    assert [len(r) for r in rows] == [len(search.HEADER)] * 3
    # 319 of 400: p = 0.7975, z = 1.959964; Wilson's centre and half-width in closed form
    z, n, p = 1.959963984540054, 400, 319 / 400
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert rows[1][4] == f"[{centre - half:.3f}, {centre + half:.3f}]" == "[0.755, 0.834]"
    assert rows[2][0].startswith("ratio") and rows[2][1] == 1338.0 / 207.0


def test_rows_without_a_side_or_its_size() -> None:
    rows = search.rows({"ours": _side(0.7975, 207.0)})        # a result from before val_n was recorded
    assert rows[0][1] == "not run" and rows[1][4] == "" and len(rows) == 2


def test_results_name_the_machine_the_code_and_the_load(tmp_path, monkeypatch) -> None:
    """A ratio is only read with the CPU it ran on (a Zen 4 and a Zen 5 differ in their bf16 peak, not in their
    model name) and the commit: results.json carries lscpu's family and model, the commit, and each side's load."""
    import json
    import subprocess

    monkeypatch.setattr(search, "measure", lambda side, root: _side(0.79, 300.0, val_n=400))
    assert search.main(["--side", "ours", "--root", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["machine"]["cpus"] >= 1 and res["machine"]["torch"]
    assert res["machine"]["lscpu"]["CPU family"].isdigit() and res["machine"]["lscpu"]["Model"].isdigit()
    repo = Path(search.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    assert res["git"]["commit"] == head
    ours = res["ours"]
    assert ours["best_val_accuracy"] == 0.79 and ours["split_seed"] == 0 and ours["seed"] == 0
    assert len(ours["loadavg_start"]) == len(ours["loadavg_end"]) == 3 and ours["started"].endswith("UTC")
    assert "reference" not in res
