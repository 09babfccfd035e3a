"""Load: predict streams 100,000 lines with bounded memory and never stops on one bad line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import synthetic_rows

RUN = ("import resource, sys; from loratune.cli.main import main; code = main(sys.argv[1:]); "
       "sys.stderr.write('PEAK_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _predict(adapter: Path, lines: Path, out: Path) -> tuple[int, int, str]:
    with open(out, "wb") as f:
        p = subprocess.run([sys.executable, "-c", RUN, "predict", "--adapter", str(adapter), "--file", str(lines),
                            "--json", "--batch-size", "1024"], env=ENV, stdout=f, stderr=subprocess.PIPE, text=True,
                           timeout=1200)
    peak = int(next(x for x in p.stderr.splitlines() if x.startswith("PEAK_KB")).split()[1])
    return p.returncode, peak, p.stderr


@pytest.mark.slow
def test_predict_100k_lines_streams_with_bounded_memory(tmp_path, finished_run) -> None:
    texts = [t for t, _ in synthetic_rows(100_000, seed=11)]
    small, big = tmp_path / "2k.txt", tmp_path / "100k.txt"
    small.write_text("\n".join(texts[:2_000]) + "\n")
    with open(big, "wb") as f:
        for i, t in enumerate(texts):
            f.write(b"\xff\xfe not utf-8\n" if i == 54_320 else t.encode() + b"\n")
    code_s, peak_s, _ = _predict(finished_run / "adapter", small, tmp_path / "s.jsonl")
    code_b, peak_b, err = _predict(finished_run / "adapter", big, tmp_path / "b.jsonl")
    assert code_s == 0 and code_b == 0, err
    assert "line 54321: not UTF-8, skipped" in err
    n = 0
    with open(tmp_path / "b.jsonl") as f:
        for n, line in enumerate(f, 1):
            if n in (1, 54_320, 54_321):
                row = json.loads(line)
                assert row["text"] == texts[n - 1 if n <= 54_320 else n]     # input order, bad line left out
    assert n == 99_999
    growth_mb = (peak_b - peak_s) / 1024
    print(f"predict peak RSS: 2k lines {peak_s / 1024:.0f} MB, 100k lines {peak_b / 1024:.0f} MB")
    assert growth_mb < 40, (peak_s, peak_b)          # 50x the lines, not 50x the memory
