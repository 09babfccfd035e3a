"""A quick interleaved A/B of the training levers on the distilbert-size model (3 rounds × 30 steps), for a
short quiet window of the machine: ``python -m bench.ab``. Prints tokens/s per round."""
import json
import tempfile
import time
from pathlib import Path

from bench import train as tb
from bench.common import quiet
from loratune.runtime import set_threads
from loratune.training.levers import Levers
from loratune.training.loop import prepare_data
from loratune.training.options import TrainConfig

quiet(); set_threads(None)
root = Path(tempfile.mkdtemp(prefix="lt-ab-"))
d = tb.distilbert_folder(root); p = prepare_data(TrainConfig(model=d))
cases = [("default", Levers(), {}), ("frozen off", Levers(frozen_bf16=False), {}), ("pad8", Levers(pad_to=8), {}),
         ("fp32 buckets", Levers(), {"precision": "fp32"})]
got = {c[0]: [] for c in cases}
for r in range(3):
    for name, levers, opts in cases:
        got[name].append(tb.ours(d, p, 30, 5, root / "x", levers=levers, **opts)["tokens_per_s"])
        print(name, round(got[name][-1]), time.strftime("%T"), flush=True)

print(json.dumps(got))
