"""Serving benchmark, generation (the second half of ``make bench-serve``): causal-LM adapters on the built-in
LLM (SmolLM2-135M-Instruct), tokens/s and time to first token, one adapter against four mixed.

    python -m bench.serve_llm            # 2 rounds × 3 configurations, 40 s each (about 6 minutes on 2 cores)
    python -m bench.serve_llm --quick    # 1 round, 15 s each: a smoke run

Configurations, each its own ``loratune serve --threads 1 --max-batch 8`` process:

- ``merged``: one adapter folded into the base (``--merge``): plain transformers decoding, no LoRA at all;
- ``mixed-1``: one adapter routed per row (the unmerged LoRA path), every request naming it;
- ``mixed-4``: four adapters on one base, requests spread round-robin, so every batch mixes all four.

The adapters are made, not trained: ``loratune train --task causal-lm``'s LoRA (q, v; r 8, α 16) with
lora_B random (seeded), saved as training saves them. Requests: 8 concurrent clients (a closed loop: each
sends its next chat request when its last one ended), each a one-turn chat asking the sentiment of one of
the built-in data's sentences, ``max_tokens`` 16, greedy, streamed (server-sent events), through
OpenAI's Python client. A stream's first content chunk is its time to first token (TTFT: queueing, the
batch's prefill and the first step); tokens/s counts the tokens that arrived inside the counted window, over
the window: each request's ``usage.completion_tokens`` spread evenly over its content chunks, each counted at
its arrival (a chunk is one token but where a piece ends mid-character). Rounds alternate the order; the server is pinned
to the last CPU and the client to the first, as ``bench.serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.serve import Server, _git, _lscpu, request_texts

CONFIGS = ["merged", "mixed-1", "mixed-4"]


def make_adapters(root: Path, n: int) -> list[Path]:
    """``n`` causal-LM adapters on the built-in LLM with lora_B random (B = 0 would be a no-op adapter)."""
    import torch

    from loratune.core.adapters import save_adapter
    from loratune.core.inject import LoraSpec, inject, lora_layers
    from loratune.training.gguf import BUILTIN_LLM
    from loratune.training.models import load_causal_lm, model_hint

    out = []
    for i in range(n):
        model = load_causal_lm(BUILTIN_LLM)
        spec = LoraSpec(targets=("q_proj", "v_proj"), rank=8, alpha=16)
        targets = inject(model, spec)
        g = torch.Generator().manual_seed(2000 + i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                b = layer.adapters["default"].lora_B
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
        folder = root / f"g{i}"
        save_adapter(model, folder, spec, targets, base_model=model_hint(BUILTIN_LLM),
                     meta={"task": "causal-lm", "model": BUILTIN_LLM, "max_length": 256, "system_prompt": None})
        out.append(folder)
    return out


async def _phase(server: Server, texts: list[str], *, concurrency: int, warmup: float, seconds: float,
                 max_tokens: int) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0,
                                timeout=300)
    t0 = time.monotonic()
    window = (t0 + warmup, t0 + warmup + seconds)
    counter = iter(range(1_000_000))
    chunks: list[tuple[float, float]] = []    # (arrival, tokens) of every content chunk
    ttft: list[float] = []                    # of requests whose first token came inside the window
    done: list[tuple[float, int]] = []        # (end, completion tokens)

    async def one_client() -> None:
        while time.monotonic() < window[1]:
            i = next(counter)
            model = server.models[i % len(server.models)]
            text = texts[i % len(texts)]
            sent = time.monotonic()
            first = None
            mine: list[float] = []
            stream = await client.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": f"Is this movie review positive or negative? {text}"}])
            async for chunk in stream:
                now = time.monotonic()
                if chunk.choices and chunk.choices[0].delta.content:
                    mine.append(now)
                    if first is None:
                        first = now
                if chunk.usage is not None:
                    done.append((now, chunk.usage.completion_tokens))
                    # the request's tokens spread over its chunks (a chunk holds more than one token where a
                    # piece ended mid-character; the stop token has none): exact totals, each at its arrival
                    chunks.extend((t, chunk.usage.completion_tokens / len(mine)) for t in mine)
            if first is not None and window[0] <= first <= window[1]:
                ttft.append(first - sent)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    await client.close()
    counted = sum(n for t, n in chunks if window[0] <= t <= window[1])
    finished = [n for end, n in done if window[0] <= end <= window[1]]
    ms = np.array(ttft) * 1000
    return {"tokens_per_s": counted / seconds, "tokens": counted,
            "tokens_per_s_finished": sum(finished) / seconds, "requests_finished": len(finished),
            "ttft_p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "ttft_p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
            "ttft_mean_ms": float(ms.mean()) if len(ms) else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_llm", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 5 s warm-up, 10 s per phase: a smoke run")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over the configurations (default 2; quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="counted seconds per phase (default 30; quick 10)")
    ap.add_argument("--warmup", type=float, default=None, help="uncounted seconds first (default 10; quick 5)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients, each one request at a time (default 8)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request (default 16)")
    ap.add_argument("--max-batch", type=int, default=8, help="the servers' --max-batch (default 8)")
    ap.add_argument("--max-wait-ms", type=float, default=20.0, help="the servers' --max-wait-ms (default 20)")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/serve-llm-<time>.json)")
    a = ap.parse_args(argv)
    rounds = a.rounds or (1 if a.quick else 2)
    seconds = a.seconds or (10.0 if a.quick else 30.0)
    warmup = a.warmup if a.warmup is not None else (5.0 if a.quick else 10.0)
    started = time.monotonic()
    log = lambda s: print(f"[{time.monotonic() - started:6.0f}s] {s}", file=sys.stderr, flush=True)

    from bench.common import machine, quiet, table

    quiet()
    cpus = sorted(os.sched_getaffinity(0))
    pin = len(cpus) >= 2
    server_cpu, client_cpu = (cpus[-1], cpus[0]) if pin else (None, None)
    res: dict[str, Any] = {
        "machine": {**machine(), "lscpu": _lscpu()}, "git": _git(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
        "options": {"rounds": rounds, "seconds": seconds, "warmup": warmup, "concurrency": a.concurrency,
                    "max_tokens": a.max_tokens, "server_threads": 1, "max_batch": a.max_batch,
                    "max_wait_ms": a.max_wait_ms, "server_cpu": server_cpu, "client_cpu": client_cpu,
                    "quick": a.quick}}
    with tempfile.TemporaryDirectory(prefix="lt-bench-serve-llm-") as tmp:
        root = Path(tmp)
        texts = request_texts()
        folders = make_adapters(root / "adapters", 4)
        res["adapters"] = {"count": 4, "bytes_on_disk": [(f / "adapter_model.safetensors").stat().st_size
                                                          for f in folders]}
        log(f"4 adapters made ({res['adapters']['bytes_on_disk'][0]:,} bytes each)")
        pairs = [f"g{i}={f}" for i, f in enumerate(folders)]
        names = [f"g{i}" for i in range(4)]
        servers = {"merged": Server("merged", ["--merge", "--adapter", pairs[0]], names[:1], {}),
                   "mixed-1": Server("mixed-1", ["--adapter", pairs[0]], names[:1], {}),
                   "mixed-4": Server("mixed-4", [x for p in pairs for x in ("--adapter", p)], names, {})}
        logs = root / "logs"
        logs.mkdir()
        extra = ["--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)]
        try:
            for s in servers.values():
                s.start(logs, 1, extra)
            for s in servers.values():
                s.wait_ready(600)
                if server_cpu is not None:
                    s.pin(server_cpu)
            log("servers ready: " + ", ".join(f"{n} :{s.port}" for n, s in servers.items()))
            if pin:
                os.sched_setaffinity(0, {client_cpu})
            res["rounds"] = []
            for r in range(rounds):
                order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
                got = {}
                for name in order:
                    got[name] = asyncio.run(_phase(servers[name], texts, concurrency=a.concurrency, warmup=warmup,
                                                   seconds=seconds, max_tokens=a.max_tokens))
                    log(f"round {r + 1} {name:8} {json.dumps(got[name])}")
                res["rounds"].append(got)
        finally:
            for s in servers.values():
                s.stop()
    rows = []
    summary: dict[str, Any] = {}
    for name in CONFIGS:
        tps = [rd[name]["tokens_per_s"] for rd in res["rounds"]]
        ratio = [rd[name]["tokens_per_s"] / rd["merged"]["tokens_per_s"] for rd in res["rounds"]]
        p50 = [rd[name]["ttft_p50_ms"] or np.nan for rd in res["rounds"]]
        p99 = [rd[name]["ttft_p99_ms"] or np.nan for rd in res["rounds"]]
        summary[name] = {"tokens_per_s_mean": float(np.mean(tps)), "vs_merged_mean": float(np.mean(ratio)),
                         "ttft_p50_ms_mean": float(np.mean(p50)), "ttft_p99_ms_mean": float(np.mean(p99))}
        rows.append([name, " / ".join(f"{x:.1f}" for x in tps), f"{np.mean(ratio):.3f}",
                     f"{np.mean(p50):.0f} / {np.mean(p99):.0f}"])
    summary["mixed-4_vs_mixed-1"] = float(np.mean([rd["mixed-4"]["tokens_per_s"] / rd["mixed-1"]["tokens_per_s"]
                                                   for rd in res["rounds"]]))
    res["summary"] = summary
    print(table(rows, ["configuration", "tokens/s per round", "÷ merged (mean)", "TTFT p50 / p99 ms"]))
    print(f"4 adapters mixed / 1 adapter: {summary['mixed-4_vs_mixed-1']:.3f} (tokens/s)")
    out = Path(a.out or f"bench/results/serve-llm-{time.strftime('%Y-%m-%d-%H%M', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
