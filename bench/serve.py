"""Serving benchmark (``make bench-serve``): many LoRA adapters on one base against one merged adapter and the base.

    python -m bench.serve            # 3 rounds × 5 configurations, 20 s each (about 7 minutes on 2 cores)
    python -m bench.serve --quick    # 1 round, 4 s each: a smoke run (about 2 minutes)

What is measured (the [serve] issue): throughput (texts/s) and p50 / p99 latency at a fixed concurrency for

- ``base``: the base alone, a plain transformers classifier without LoRA (``loratune merge`` of adapter a00,
  served as ``--base MERGED_DIR`` with no adapters; requests name the base);
- ``merged``: one adapter folded into the base (``--merge --adapter a00=DIR``);
- ``mixed-1``, ``mixed-4``, ``mixed-16``: 1, 4 and 16 adapters routed per row on one frozen base, requests
  spread over them round-robin (a batch of 8 rows holds 8 different adapters of the 16: the worst case);

and the server's memory (VmRSS, VmHWM, RssAnon, RssFile of /proc/PID/status): each server idle and after
the rounds, and one more server (``load``, ``--base minilm-l6``) that goes through the states over HTTP:
``cold`` (the base alone as started), ``cold+1`` (a00 loaded: its probe is the first forward pass),
``primed`` (a00 unloaded: the base alone after a forward pass), ``primed+16`` (the 16 loaded) and ``primed+16
after traffic`` (a few seconds over the 16). Targets: mixed-16 ≥ 0.8 × merged in throughput; RSS(16
adapters) − RSS(base alone) ≤ 1.15 × the 16 adapters' bytes on disk, read three ways: primed → primed+16 (one
process, nothing between but the 16 loads: the precise one), mixed-16 − base after the rounds (two processes,
the base a plain classifier: the literal one, ± a few MiB of heap that traffic leaves) and cold → primed+16
(adds what a server's first adapter and first forward pass cost).

The adapters are MiniLM (``minilm-l6``) adapters with the default LoRA options of ``loratune train`` (q,v,
r 8, α 16, the head trained in full, no other ``modules_to_save``), made without training: lora_B and the
head perturbed at random (seeded), label sets of 2 to 5 classes, saved as training saves them. Request texts
are the built-in data's 800 validation and test sentences, in the same order for every configuration.

How: every server is its own ``loratune serve --port 0 --threads 1`` process, all started at once and, once
ready, pinned (every thread) to the last CPU; the client (this process: one asyncio thread, raw keep-alive
HTTP/1.1 connections) is pinned to the first, so it never takes the server's core. A phase runs
``--concurrency`` clients (16), each sending one request of ``--texts-per-request`` texts (1) as soon as its
last was answered (a closed loop), ``--warmup`` seconds uncounted, then ``--seconds`` counted. The servers
run with ``--max-batch 8`` (half the concurrency): with 16 clients and a batch of up to 32 a server settles
in one of two states, one batch of 16 or two alternating batches of about 8, depending on how the first
requests happened to arrive, and the two pad differently (about 10%); with 8, every batch is full, and the
configurations compare alike. Throughput is Little's law for the closed loop: the sum over clients of one
request per cycle (send to next send, in the window); counting answers in the window is coarse when 8 land
at once. Latency is send to full answer of the requests answered in the window. Rounds alternate the order
(ABCDE, EDCBA, ...), so drift on a shared machine hits every configuration alike; the ratios are per round
and of the means over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABEL_SETS = [["negative", "positive"], ["negative", "neutral", "positive"],
              ["awful", "poor", "good", "great"], ["1", "2", "3", "4", "5"]]
CONFIGS = ("base", "merged", "mixed-1", "mixed-4", "mixed-16")
THROUGHPUT_TARGET = 0.8
MEMORY_TARGET = 1.15


# --- the adapters -------------------------------------------------------------------------------------

def make_adapters(root: Path, n: int) -> list[Path]:
    """``n`` MiniLM adapters with ``loratune train``'s default LoRA options, lora_B and the head perturbed."""
    import torch

    from loratune.core.adapters import save_adapter
    from loratune.core.inject import inject
    from loratune.training.models import load_model, model_hint
    from loratune.training.options import TrainConfig

    cfg = TrainConfig()                       # every option default: minilm-l6, q,v, r 8, α 16, head only
    spec = cfg.lora_spec()
    out = []
    for i in range(n):
        labels = LABEL_SETS[i % len(LABEL_SETS)]
        model = load_model(cfg.model, labels, seed=i)
        targets = inject(model, spec)
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if "lora_B" in name:          # B = 0 at init (a no-op adapter): give it a trained-like size
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif "lora_A" not in name:    # the head (classifier weight and bias)
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        folder = root / f"a{i:02d}"
        save_adapter(model, folder, spec, targets, base_model=model_hint(cfg.model),
                     meta={"model": cfg.model, "id2label": labels, "max_length": cfg.max_length,
                           "task": "classification"})
        out.append(folder)
    return out


def bytes_on_disk(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def request_texts() -> list[str]:
    from loratune.training.data import load_splits
    from loratune.training.options import TrainConfig

    s = load_splits(TrainConfig())
    return list(s.validation.texts) + list(s.test.texts)


# --- the servers ---------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    args: list[str]
    models: list[str]                 # what requests name, round-robin
    widths: dict[str, int]            # classes each model answers with (checked on every answer)
    proc: subprocess.Popen | None = None
    port: int = 0
    log: Path | None = None
    memory: dict[str, dict[str, int]] = field(default_factory=dict)

    def start(self, logs: Path, threads: int, extra: list[str]) -> None:
        self.log = logs / f"{self.name}.err"
        exe = REPO / ".venv" / "bin" / "loratune"
        cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "loratune"]),
               "serve", *self.args, "--port", "0", "--threads", str(threads), *extra]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env, cwd=REPO)

    def wait_ready(self, timeout: float) -> None:
        assert self.proc is not None and self.log is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r" on http://127\.0\.0\.1:(\d+)", self.log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} not ready after {timeout:.0f} s")

    def pin(self, cpu: int) -> None:
        """Every thread of the server onto ``cpu`` (threads it starts later inherit it from their creator)."""
        assert self.proc is not None
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})

    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM, RssAnon, RssFile of the server process, in bytes."""
        assert self.proc is not None
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# --- the client ----------------------------------------------------------------------------------------

async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                   body: bytes = b"") -> tuple[int, bytes]:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    writer.write(head + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        if k.strip().lower() == "content-length":
            length = int(v)
    return status, await reader.readexactly(length)


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, data = await asyncio.wait_for(_request(reader, writer, "GET", path), 30)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {data[:200]!r}")
        return data
    finally:
        writer.close()


async def _post(port: int, path: str, body: dict[str, Any]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        status, data = await asyncio.wait_for(_request(reader, writer, "POST", path, json.dumps(body).encode()), 120)
        if status != 200:
            raise RuntimeError(f"POST {path}: {status} {data[:300]!r}")
        return data
    finally:
        writer.close()


def _batch_rows(metrics: bytes) -> tuple[float, float]:
    """(rows, forward passes) so far, from /metrics' loratune_batch_rows histogram."""
    text = metrics.decode()
    total = float(re.search(r"^loratune_batch_rows_sum (\S+)", text, re.MULTILINE).group(1))   # type: ignore[union-attr]
    count = float(re.search(r"^loratune_batch_rows_count (\S+)", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    return total, count


async def _phase(server: Server, texts: list[str], *, concurrency: int, per_request: int, warmup: float,
                 seconds: float, max_requests: int = 200_000) -> dict[str, Any]:
    """One closed-loop load: ``concurrency`` clients, each one request at a time, for warmup + seconds."""
    counter = iter(range(max_requests))
    done: list[tuple[float, float, int]] = []        # (sent, answered, texts)
    cycles: list[list[float]] = []                   # per client: send times inside the counted window
    t0 = time.monotonic()
    window = (t0 + warmup, t0 + warmup + seconds)

    async def client() -> None:
        sends: list[float] = []
        cycles.append(sends)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            while time.monotonic() < window[1]:
                i = next(counter, None)
                if i is None:
                    return
                model = server.models[i % len(server.models)]
                batch = [texts[(i * per_request + j) % len(texts)] for j in range(per_request)]
                body = json.dumps({"model": model, "input": batch}).encode()
                sent = time.monotonic()
                if window[0] <= sent:
                    sends.append(sent)
                status, data = await asyncio.wait_for(_request(reader, writer, "POST", "/v1/classify", body), 120)
                answered = time.monotonic()
                if status != 200:
                    raise RuntimeError(f"{server.name}: POST /v1/classify {status}: {data[:300]!r}")
                rows = json.loads(data)["data"]
                if len(rows) != per_request or rows[0]["num_classes"] != server.widths[model]:
                    raise RuntimeError(f"{server.name}: unexpected answer for {model}: {data[:300]!r}")
                done.append((sent, answered, per_request))
        finally:
            writer.close()

    before = _batch_rows(await _get(server.port, "/metrics"))
    await asyncio.gather(*(client() for _ in range(concurrency)))
    after = _batch_rows(await _get(server.port, "/metrics"))
    counted = [(s, a, n) for s, a, n in done if window[0] <= a <= window[1]]
    lat = np.array([a - s for s, a, _ in counted]) * 1000
    n_texts = sum(n for _, _, n in counted)
    # Little's law for a closed loop: each client does one request per cycle (send to its next send), so the
    # rate is the sum over clients of 1 / its mean cycle. Counting answers inside the window is coarse when a
    # whole batch of answers lands at once (±1 batch of a few dozen); the mean cycles are not.
    rate = sum(per_request * (len(c) - 1) / (c[-1] - c[0]) for c in cycles if len(c) >= 2)
    return {"texts_per_s": rate, "texts": n_texts, "requests": len(counted), "seconds": seconds,
            "texts_per_s_window": n_texts / seconds,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "mean_ms": float(lat.mean()) if len(lat) else None,
            "mean_batch_rows": (after[0] - before[0]) / max(after[1] - before[1], 1)}


async def _memory_steps(server: Server, folders: list[Path], texts: list[str], width: dict[str, int], *,
                        concurrency: int, seconds: float) -> dict[str, Any]:
    """The ``load`` server (``--base minilm-l6``, nothing loaded) through its states, RSS in each: ``cold``;
    ``cold+1`` (a00 loaded: its probe is the process's first forward pass); ``primed`` (a00 unloaded again: the
    base alone, after a forward pass); ``primed+16`` (all 16 loaded); ``primed+16 after traffic`` (``seconds``
    of traffic over the 16)."""
    async def load(folder: Path) -> None:
        await _post(server.port, "/v1/load_lora_adapter", {"lora_name": folder.name, "lora_path": folder.name})

    server.memory["cold"] = server.memory["idle"]
    await load(folders[0])
    server.memory["cold+1"] = server.status()
    await _post(server.port, "/v1/unload_lora_adapter", {"lora_name": folders[0].name})
    server.memory["primed"] = server.status()
    for folder in folders:
        await load(folder)
    server.memory["primed+16"] = server.status()
    server.models, server.widths = [f.name for f in folders], width
    traffic = await _phase(server, texts, concurrency=concurrency, per_request=1, warmup=0.0, seconds=seconds)
    server.memory["primed+16 after traffic"] = server.status()
    return {"traffic_16": traffic}


# --- the run -------------------------------------------------------------------------------------------

def _git() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    src = git("diff", "HEAD", "--", "src")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "src_changed": git("diff", "HEAD", "--name-only", "--", "src").split(),
            "src_diff_sha1": hashlib.sha1(src.encode()).hexdigest() if src else None}


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    keep = ("Model name", "CPU family", "Model", "Stepping", "CPU(s)", "Core(s) per socket", "Thread(s) per core")
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if k in keep}


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 1 s warm-up, 4 s per phase: a smoke run")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over the configurations (default 3; quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="counted seconds per phase (default 20; quick 4)")
    ap.add_argument("--warmup", type=float, default=None, help="uncounted seconds first (default 3; quick 1)")
    ap.add_argument("--concurrency", type=int, default=16, help="clients, each one request at a time (default 16)")
    ap.add_argument("--texts-per-request", type=int, default=1, help="texts in one request (default 1)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default 1)")
    ap.add_argument("--max-batch", type=int, default=8,
                    help="the servers' --max-batch (default 8: half the concurrency, so every batch is full; see above)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="the servers' --max-wait-ms (default 5, theirs)")
    ap.add_argument("--server-args", default="", help="more `loratune serve` flags for every server")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the servers and the client to separate CPUs")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/serve-<YYYY-MM-DD-HHMM>.json)")
    a = ap.parse_args(argv)
    rounds = a.rounds or (1 if a.quick else 3)
    seconds = a.seconds or (4.0 if a.quick else 20.0)
    warmup = a.warmup if a.warmup is not None else (1.0 if a.quick else 3.0)
    started = time.monotonic()
    log = lambda s: print(f"[{time.monotonic() - started:6.0f}s] {s}", file=sys.stderr, flush=True)

    from bench.common import machine, quiet, table

    quiet()
    cpus = sorted(os.sched_getaffinity(0))
    pin = not a.no_pin and len(cpus) >= 2
    server_cpu, client_cpu = (cpus[-1], cpus[0]) if pin else (None, None)
    res: dict[str, Any] = {
        "machine": {**machine(), "lscpu": _lscpu()}, "git": _git(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_start": os.getloadavg(),
        "options": {"rounds": rounds, "seconds": seconds, "warmup": warmup, "concurrency": a.concurrency,
                    "texts_per_request": a.texts_per_request, "server_threads": a.threads,
                    "max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms,
                    "server_args": a.server_args, "server_cpu": server_cpu, "client_cpu": client_cpu,
                    "quick": a.quick, "pythonpath": os.environ.get("PYTHONPATH")}}

    with tempfile.TemporaryDirectory(prefix="lt-bench-serve-") as tmp:
        root = Path(tmp)
        texts = request_texts()
        folders = make_adapters(root / "adapters", 16)
        sizes = [bytes_on_disk(f) for f in folders]
        log(f"16 adapters made: {sum(sizes):,} bytes on disk ({sizes[0]:,} to {max(sizes):,} each)")
        from loratune.infer.inference import merge_export

        merged_dir = merge_export(folders[0], root / "merged")
        res["adapters"] = {"count": len(folders), "bytes_on_disk": sizes, "bytes_on_disk_16": sum(sizes),
                           "classes": [len(LABEL_SETS[i % len(LABEL_SETS)]) for i in range(len(folders))],
                           "texts": len(texts), "mean_text_chars": float(np.mean([len(t) for t in texts]))}
        width = {f"a{i:02d}": len(LABEL_SETS[i % len(LABEL_SETS)]) for i in range(len(folders))}
        pairs = [f"a{i:02d}={f}" for i, f in enumerate(folders)]
        names = list(width)
        servers = {
            "base": Server("base", ["--base", str(merged_dir)], [str(merged_dir)], {str(merged_dir): width["a00"]}),
            "merged": Server("merged", ["--merge", "--adapter", pairs[0]], names[:1], width),
            "mixed-1": Server("mixed-1", ["--adapter", pairs[0]], names[:1], width),
            "mixed-4": Server("mixed-4", [x for p in pairs[:4] for x in ("--adapter", p)], names[:4], width),
            "mixed-16": Server("mixed-16", [x for p in pairs for x in ("--adapter", p)], names, width),
            # memory only: the base alone, then the same process with 1 and 16 adapters loaded over HTTP
            "load": Server("load", ["--base", "minilm-l6", "--adapters-dir", str(root / "adapters")], [], {}),
        }
        logs = root / "logs"
        logs.mkdir()
        extra = ["--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), *a.server_args.split()]
        try:
            for s in servers.values():            # started on every CPU (quicker), pinned once ready
                s.start(logs, a.threads, extra)
            for s in servers.values():
                s.wait_ready(600)
                if server_cpu is not None:
                    s.pin(server_cpu)
            for s in servers.values():
                s.memory["idle"] = s.status()
            log("servers ready: " + ", ".join(f"{n} :{s.port} {_mib(s.memory['idle']['VmRSS'])} MiB"
                                              for n, s in servers.items()))
            if pin:
                os.sched_setaffinity(0, {client_cpu})
            load = servers["load"]
            res["load_memory"] = asyncio.run(_memory_steps(load, folders, texts, width, concurrency=a.concurrency,
                                                           seconds=2.0 if a.quick else 5.0))
            log("load: " + ", ".join(f"{k} {_mib(v['VmRSS'])}" for k, v in load.memory.items()) + " MiB")
            import torch

            torch.set_num_threads(1)

            res["rounds"] = []
            for r in range(rounds):
                order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
                got: dict[str, Any] = {}
                for name in order:
                    got[name] = asyncio.run(_phase(servers[name], texts, concurrency=a.concurrency,
                                                   per_request=a.texts_per_request, warmup=warmup, seconds=seconds))
                    g = got[name]
                    log(f"round {r + 1} {name:9s} {g['texts_per_s']:7.2f} texts/s  p50 {g['p50_ms']:7.1f} ms  "
                        f"p99 {g['p99_ms']:7.1f} ms  batch {g['mean_batch_rows']:.1f}")
                res["rounds"].append({"order": list(order), "loadavg": os.getloadavg(),
                                      "results": {n: got[n] for n in CONFIGS}})
            for s in servers.values():
                s.memory["after"] = s.status()
        finally:
            for s in servers.values():
                s.stop()
        res["server_logs_tail"] = {n: s.log.read_text(errors="replace")[-500:] for n, s in servers.items() if s.log}

    # --- summary ---------------------------------------------------------------------------------------
    per_round = []
    for rd in res["rounds"]:
        g = rd["results"]
        per_round.append({n: g[n]["texts_per_s"] / g["merged"]["texts_per_s"] for n in CONFIGS})
    totals = {n: float(np.mean([rd["results"][n]["texts_per_s"] for rd in res["rounds"]])) for n in CONFIGS}
    lat = {n: {k: float(np.median([rd["results"][n][k] for rd in res["rounds"]])) for k in ("p50_ms", "p99_ms")}
           for n in CONFIGS}
    tput_ratio = totals["mixed-16"] / totals["merged"]
    mem = {n: s.memory for n, s in servers.items()}
    disk16 = res["adapters"]["bytes_on_disk_16"]
    load = mem["load"]
    measures = {
        "primed": ("primed+16", "primed",
                   "one server (--base minilm-l6): the base alone after a forward pass (a00 loaded, unloaded) -> 16"),
        "after_rounds": (None, None,
                         "mixed-16 - base (a plain classifier: the merged folder as --base), both after every round"),
        "cold": ("primed+16", "cold",
                 "one server: the base alone as started (no forward pass yet) -> 16 loaded"),
    }
    memory: dict[str, Any] = {"bytes_on_disk_16": disk16}
    for key, (hi, lo, what) in measures.items():
        delta = (mem["mixed-16"]["after"]["VmRSS"] - mem["base"]["after"]["VmRSS"] if hi is None
                 else load[hi]["VmRSS"] - load[lo]["VmRSS"])
        memory[key] = {"delta": delta, "ratio": delta / disk16, "what": what}
    memory["rss"] = mem
    res["summary"] = {"texts_per_s": totals, "ratio_vs_merged": {n: totals[n] / totals["merged"] for n in CONFIGS},
                      "ratio_vs_merged_per_round": per_round, "median_latency_ms": lat, "memory": memory,
                      "targets": {"throughput_16_vs_merged": {"value": tput_ratio, "target": THROUGHPUT_TARGET,
                                                              "met": tput_ratio >= THROUGHPUT_TARGET,
                                                              "per_round": [p["mixed-16"] for p in per_round]},
                                  **{f"memory_{k}": {"value": memory[k]["ratio"], "target": MEMORY_TARGET,
                                                     "met": memory[k]["ratio"] <= MEMORY_TARGET}
                                     for k in measures}}}
    res["wall_s"] = time.monotonic() - started

    # --- the tables ------------------------------------------------------------------------------------
    rows = []
    for n in CONFIGS:
        row: list[Any] = [n]
        for i, rd in enumerate(res["rounds"]):
            g = rd["results"][n]
            row += [f"{g['texts_per_s']:.2f}", f"{per_round[i][n]:.3f}", f"{g['p50_ms']:.0f} / {g['p99_ms']:.0f}",
                    f"{g['mean_batch_rows']:.1f}"]
        row += [f"{totals[n]:.2f}", f"{totals[n] / totals['merged']:.3f}"]
        rows.append(row)
    header = ["config"]
    for i in range(rounds):
        header += [f"r{i + 1} texts/s", f"r{i + 1} vs merged", f"r{i + 1} p50/p99 ms", f"r{i + 1} batch"]
    header += ["all texts/s", "all vs merged"]
    print(table(rows, header))
    print()
    mrows = []
    for n in ("base", "merged", "mixed-1", "mixed-4", "mixed-16"):
        m = mem[n]
        mrows.append([n, "idle", _mib(m["idle"]["VmRSS"]), _mib(m["idle"]["RssAnon"]), _mib(m["idle"]["RssFile"]),
                      _mib(m["after"]["VmRSS"]), _mib(m["after"]["VmHWM"])])
    for k in ("cold", "cold+1", "primed", "primed+16", "primed+16 after traffic"):
        m = load[k]
        mrows.append(["load", k, _mib(m["VmRSS"]), _mib(m["RssAnon"]), _mib(m["RssFile"]), "", ""])
    print(table(mrows, ["server", "state", "RSS MiB", "anon MiB", "file MiB", "RSS after MiB", "HWM after MiB"]))
    print()
    t = res["summary"]["targets"]
    print(f"16 adapters on disk: {disk16:,} bytes ({_mib(disk16)} MiB)")
    print(f"throughput mixed-16 / merged: {tput_ratio:.3f} (per round "
          f"{', '.join(f'{x:.3f}' for x in t['throughput_16_vs_merged']['per_round'])}); target >= {THROUGHPUT_TARGET}: "
          f"{'met' if t['throughput_16_vs_merged']['met'] else 'MISSED'}")
    for key in measures:
        m = memory[key]
        print(f"memory {key}: {_mib(m['delta'])} MiB = {m['ratio']:.2f} x bytes on disk, target <= {MEMORY_TARGET}: "
              f"{'met' if m['ratio'] <= MEMORY_TARGET else 'MISSED'} ({m['what']})")
    print(f"wall time {res['wall_s']:.0f} s")

    out = Path(a.out) if a.out else REPO / "bench" / "results" / f"serve-{time.strftime('%Y-%m-%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
