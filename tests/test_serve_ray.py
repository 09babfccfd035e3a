"""``loratune serve --ray``: the same app on a local Ray Serve deployment of several replicas.

A deployment is started as a person starts it (a subprocess of the CLI) with test_serve's tiny base and
adapters: its answers are pinned against ``loratune.predict``, two replicas answer, run-time loading is
refused, the API key applies, and SIGTERM exits 0 leaving no process of its Ray (each Ray process's command
line names the Ray's temp folder, which the server names on stderr). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import importlib.util
import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
import test_serve
from test_serve import TEXTS, assert_matches, call, classify

# test_serve's tiny base, its adapters and predict's answers (module fixtures; one torch thread, autouse)
base_dir, root, loaded, refs, one_thread = (test_serve.base_dir, test_serve.root, test_serve.loaded, test_serve.refs,
                                            test_serve.one_thread)

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("ray", "fastapi", "aiohttp")),
                                reason="Ray Serve is not installed (pip install 'loratune[serve-ray]')")

KEY = "test-key-ray"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Deployment:
    url: str
    proc: subprocess.Popen
    lines: list[str]
    temp: str
    """The local Ray's temp folder: every process of that Ray names it in its command line."""


@contextmanager
def deployment(*args: str, key: str | None = None, timeout: float = 240) -> Iterator[Deployment]:
    """``loratune serve --ray --port 0 ARGS`` (fp32, one thread a replica unless ARGS say) until it serves;
    SIGTERM, then a kill, if it still runs on the way out. Build a causal-LM deployment by passing its
    adapters here too."""
    env = {k: v for k, v in os.environ.items() if k not in ("LORATUNE_API_KEY", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH")) if p)
    if key:
        env["LORATUNE_API_KEY"] = key
    argv = [sys.executable, "-m", "loratune.cli.main", "serve", "--ray", "--port", "0", "--precision", "fp32", *args]
    if "--threads" not in args:
        argv += ["--threads", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("serving "):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        url = re.search(r" on (http://127\.0\.0\.1:\d+) ", next(x for x in lines if x.startswith("serving "))).group(1)
        temp = re.search(r"its files: (\S+)\)", "".join(lines)).group(1)
        yield Deployment(url, proc, lines, temp)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(10)


def replica_of(url: str, headers: dict[str, str]) -> str:
    """The replica that answered one GET /v1/models (Serve picks one per request)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("GET", "/v1/models", headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        return response.getheader("x-loratune-replica")
    finally:
        conn.close()


def ray_processes(temp: str) -> dict[int, str]:
    """{pid: command line} of the processes of the Ray in ``temp``: their command line names it (raylet, GCS)
    or a file they hold open lies in it (actors and workers log there; their titles hide their command lines)."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if temp.encode() in cmdline or any(os.readlink(fd).startswith(temp) for fd in (entry / "fd").iterdir()):
                found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            continue
    return found


def listening(pids: list[int]) -> list[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(pid, address, port) of every TCP socket these processes listen on (/proc/net/tcp and tcp6)."""
    inodes = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:                       # 0A: LISTEN
                raw, port = cols[1].split(":")
                b = bytes.fromhex(raw)                                      # 32-bit words, little-endian
                b = b"".join(b[i:i + 4][::-1] for i in range(0, len(b), 4))
                address = ipaddress.ip_address(b)
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                    address = address.ipv4_mapped
                out.append((inodes[cols[9]], address, int(port, 16)))
    return out


def stop_and_check_nothing_is_left(d: Deployment) -> None:
    """SIGTERM: exit 0 and, within 30 s, no process of its Ray and no temp folder."""
    pids = ray_processes(d.temp)
    assert len(pids) >= 5, f"the test sees the Ray's processes while it serves: {pids}"   # GCS, raylet, 2 replicas...
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(90) == 0, "".join(d.lines)
    deadline = time.monotonic() + 30
    while ray_processes(d.temp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes(d.temp) == {}
    assert not Path(d.temp).exists()


# --- tests ----------------------------------------------------------------------------------------------

def test_two_replicas_answer_as_predict_refuse_loading_and_leave_no_ray_process(root, refs, base_dir) -> None:
    served = ["a2", "a3", "a4"]
    with deployment("--replicas", "2", *[a for n in served for a in ("--adapter", f"{n}={root / n}")],
                    key=KEY) as d:
        assert "(2 Ray Serve replicas) (API key required)" in next(x for x in d.lines if x.startswith("serving "))
        status, body = call(d.url, "GET", "/v1/models", headers=AUTH)
        assert status == 200, body
        assert [m["id"] for m in body["data"]] == [base_dir, *served]
        for name in served:
            status, body = classify(d.url, name, TEXTS, headers=AUTH)
            assert status == 200, body
            assert_matches(body, refs[name], TEXTS, what=name)
        # the key applies on every route but /health
        assert call(d.url, "GET", "/health")[0] == 200
        assert call(d.url, "GET", "/v1/models")[0] == 401
        assert classify(d.url, "a2", TEXTS)[0] == 401
        assert call(d.url, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "extra")})[0] == 401
        # run-time loading and unloading: refused, and the adapters stay
        for path, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(root / "extra")}),
                           ("/v1/unload_lora_adapter", {"lora_name": "a2"})):
            status, answer = call(d.url, "POST", path, body, headers=AUTH)
            assert status == 403 and "--ray" in answer["error"]["message"], answer
        assert classify(d.url, "a2", TEXTS[:1], headers=AUTH)[0] == 200
        # both replicas answer (Serve picks one of two at random a request: 2^-29 to see one only)
        seen = {replica_of(d.url, AUTH) for _ in range(30)}
        assert len(seen) == 2, seen
        # Ray, Serve's proxy and the replicas listen on the loopback only
        sockets = listening([d.proc.pid, *ray_processes(d.temp)])
        assert any(port == int(urlsplit(d.url).port) for _, _, port in sockets), sockets
        from loratune.serve.ray_serve import ephemeral_ports
        assert 20000 <= urlsplit(d.url).port < ephemeral_ports()[0], d.url   # --port 0: none Ray or the kernel gives
        assert [s for s in sockets if not s[1].is_loopback] == [], ray_processes(d.temp)
        stop_and_check_nothing_is_left(d)
    assert "stopped: Ray is shut down" in d.lines[-1]


def test_an_adapter_a_replica_cannot_load_exits_2_with_one_line(root, tmp_path) -> None:
    """An adapter whose weights fail only when a replica loads them: the replica's InputError, as one line
    (exit 2), and the local Ray is gone."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root / "a2", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("LORATUNE_API_KEY", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "loratune.cli.main", "serve", "--ray", "--replicas", "1", "--port",
                           "0", "--threads", "1", "--adapter", f"a={root / 'a2'}", "--adapter", f"b={bad}"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("loratune serve: error: --adapter b:"), proc.stderr
    assert "Traceback" not in proc.stderr
    temp = re.search(r"its files: (\S+)\)", proc.stderr).group(1)
    deadline = time.monotonic() + 30
    while ray_processes(temp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes(temp) == {} and not Path(temp).exists()


def test_fit_splits_the_cpus_and_refuses_what_cannot_be_placed() -> None:
    from loratune.errors import InputError
    from loratune.serve.ray_serve import _address_ok, fit

    assert fit(2, None, 8, 8) == 4 and fit(3, None, 8, 8) == 2 and fit(2, None, 2, 2) == 1
    assert fit(4, None, 16, 4) == 4 and fit(2, 3, 8, 8) == 3
    with pytest.raises(InputError, match="--replicas: 3 replicas of 1 thread need 3 CPUs; this machine has 2"):
        fit(3, None, 2, 2)
    with pytest.raises(InputError, match="no node has more than 4 CPUs"):
        fit(2, 6, 16, 4)
    assert _address_ok("10.0.0.1:6379") and _address_ok("head.local:6379") and _address_ok("ray://head:10001")
    assert _address_ok("[::1]:6379")
    assert not any(_address_ok(a) for a in ("head", "head:", "head:0", "head:70000", "http://head:6379", ":6379"))


def test_port_0_picks_a_free_port_below_the_range_the_kernel_and_ray_hand_out(monkeypatch) -> None:
    """``--port 0``: Serve's proxy binds its port only after Ray has started, and Ray's processes take ports from
    the kernel's ephemeral range and at random above its start; the port is picked below it (CI once lost the
    kernel's pick to a Ray process: "Failed to bind to address")."""
    import socket

    from loratune.errors import InputError
    from loratune.serve import ray_serve

    low, high = ray_serve.ephemeral_ports()
    assert (low, high) == tuple(map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()))
    picked = set()
    for _ in range(5):
        with ray_serve.spare_port("127.0.0.1") as sock:
            port = sock.getsockname()[1]
            assert 20000 <= port < low, port
            with pytest.raises(OSError):                                  # it is held (listening) until closed
                socket.create_server(("127.0.0.1", port))
            picked.add(port)
    assert len(picked) > 1, picked                                        # at random: 5 equal of ~12,700 by chance: ~0
    # every candidate taken (or none left by the range): the kernel's choice, still a free port
    monkeypatch.setattr(ray_serve, "ephemeral_ports", lambda: (20002, high))
    held = []
    for p in (20000, 20001):
        try:
            held.append(socket.create_server(("127.0.0.1", p)))
        except OSError:
            pass                                                          # taken by someone else: taken all the same
    try:
        with ray_serve.spare_port("127.0.0.1") as sock:
            assert low <= sock.getsockname()[1] <= high
    finally:
        for s in held:
            s.close()
    with pytest.raises(InputError, match="^--host: cannot resolve 'no-such-host.invalid'"):
        ray_serve.spare_port("no-such-host.invalid")
