"""A real two-node Ray cluster: each node in its own network namespace with its own address and CPU.

The head runs in namespace A (10.x.y.1), the worker in namespace B (10.x.y.2), joined by a veth pair.
A small search joins the cluster with --address from namespace A; every trial reports the address of
the node it ran on, and both nodes must appear. Teardown ends exactly the processes that
`ip netns pids` lists for the two namespaces (never `ray stop`, never by name) and deletes them.
Needs root and iproute2 (`ip`); CI has both.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_search import CLI

RAY = str(Path(sys.executable).with_name("ray"))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _netns_pids(ns: str) -> list[int]:
    done = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in done.stdout.split()] if done.returncode == 0 else []


def _end_namespace(ns: str) -> None:
    """SIGTERM, then SIGKILL, exactly the processes inside ``ns``; then delete it (its veth end goes with it)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = _netns_pids(ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _netns_pids(ns) and time.time() < deadline:
            time.sleep(0.2)
    _ip("netns", "del", ns, check=False)


@pytest.fixture
def two_nodes(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the two-node cluster test needs root (network namespaces)")
    if shutil.which("ip") is None:
        pytest.skip("the two-node cluster test needs iproute2 (`ip`); apt-get install iproute2")
    pid = os.getpid()
    ns_a, ns_b = f"lt-{pid}-a", f"lt-{pid}-b"
    veth_a, veth_b = f"lt{pid}a", f"lt{pid}b"
    net = f"10.{200 + pid % 50}.{pid // 50 % 250}"
    head, worker = f"{net}.1", f"{net}.2"
    temps = [tempfile.mkdtemp(prefix="lt-h-", dir="/tmp"), tempfile.mkdtemp(prefix="lt-w-", dir="/tmp")]
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    created: list[str] = []
    try:
        added = _ip("netns", "add", ns_a, check=False)
        if added.returncode != 0:
            pytest.skip(f"`ip netns add` does not work here: {added.stderr.strip()}")
        created.append(ns_a)
        _ip("netns", "add", ns_b)
        created.append(ns_b)
        _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        for ns, veth, addr in ((ns_a, veth_a, head), (ns_b, veth_b, worker)):
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        common = ["--num-cpus", "1", "--disable-usage-stats"]
        for ns, args in ((ns_a, ["--head", f"--node-ip-address={head}", "--port", "6379", "--temp-dir", temps[0],
                                 "--include-dashboard", "false"]),
                         (ns_b, [f"--address={head}:6379", f"--node-ip-address={worker}", "--temp-dir", temps[1]])):
            started = subprocess.run(["ip", "netns", "exec", ns, RAY, "start", *args, *common], env=env,
                                     capture_output=True, text=True, timeout=120)
            assert started.returncode == 0, started.stdout + started.stderr
        yield {"ns": ns_a, "address": f"{head}:6379", "nodes": {head, worker}, "env": env}
    finally:
        for ns in reversed(created):
            _end_namespace(ns)
        _ip("link", "del", veth_a, check=False)                       # only if it never moved into a namespace
        for d in temps:
            shutil.rmtree(d, ignore_errors=True)


def test_search_on_a_two_node_cluster_uses_both_nodes(tmp_path, two_nodes, tiny_model_dir, tiny_data) -> None:
    out = tmp_path / "s"
    config = tmp_path / "search.yaml"
    config.write_text("search:\n  lr: {loguniform: [1.0e-3, 1.0e-2]}\n  rank: {choice: [2, 4]}\n")
    argv = ["tune", "--address", two_nodes["address"], "--config", str(config), "--samples", "4",
            "--max-epochs", "2", "--model", tiny_model_dir, "--data", tiny_data, "--out", str(out),
            "--batch-size", "8", "--max-length", "32"]
    done = subprocess.run(["ip", "netns", "exec", two_nodes["ns"], *CLI, *argv], env=two_nodes["env"],
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    nodes = set()
    for path in (out / "ray").glob("*/result.json"):
        nodes |= {json.loads(line)["node_ip"] for line in path.read_text().splitlines() if line.strip()}
    assert nodes == two_nodes["nodes"], nodes
    table = json.loads((out / "trials.json").read_text())
    assert len(table) == 4 and all(t["status"] in ("completed", "stopped_early") for t in table)
    assert (out / "best" / "adapter" / "adapter_config.json").is_file()
    assert "[10." in done.stderr                                      # the live view shows each trial's node
