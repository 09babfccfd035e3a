"""``loratune serve --ray``: the same app on Ray Serve, on N replicas that each hold the base and every adapter.

Each replica is a Ray actor that runs :func:`loratune.serve.server.prepare` with the options given at start
and serves :func:`loratune.serve.app.build_app`'s app (its lifespan starts and drains the replica's batcher)
behind Serve's HTTP proxy on ``host:port``. Every adapter is in every replica, so a request for any adapter
may go to any replica, and each replica gathers its own requests into mixed-adapter batches. Run-time
loading and unloading are refused (403): a load would reach one replica, and the replicas would disagree on
what is served. Each response names its replica in the ``x-loratune-replica`` header.

Local (no ``address``): Ray starts on 127.0.0.1 in a short temp folder with this machine's CPUs and an auth
token kept in the environment (as the search's), and stops with the server, leaving no Ray process. With
``address`` the server joins that cluster, deploys its application and deletes it on the way out; the
cluster (and Serve's controller and proxies) stay. The adapter folders must then be readable at the same
paths on every node, and loratune importable there.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib.util
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from loratune.errors import InputError
from loratune.runtime import available_cpus, require
from loratune.serve.app import error_response
from loratune.serve.model import base_of
from loratune.serve.server import (
    API_KEY_ENV,
    Emit,
    _loopback,
    _url_host,
    bind,
    parse_adapters,
    search_adapters,
)

log = logging.getLogger(__name__)

APP = "loratune"
"""The Serve application's (and its deployment's) name."""
RUNTIME_ROUTES = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
REPLICA_HEADER = b"x-loratune-replica"
INSTALL = "pip install 'loratune[serve-ray]'"
_ADDRESS = re.compile(r"(?:ray://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})")
_TOKEN = secrets.token_hex(32)        # this process's Ray auth token for a local Ray (never on disk)


# --- a replica -----------------------------------------------------------------------------------------

class _RayRoutes:
    """Pure ASGI middleware around a replica's app: names the replica in each response's headers, and answers
    the run-time loading routes 403 (once the key, if any, is right: a wrong one still gets the app's 401)."""

    def __init__(self, app: Any, api_key: str | None, replica: str) -> None:
        self.app, self.replica = app, replica.encode()
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)             # the lifespan: the app's batcher
            return

        async def named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER, self.replica)]}
            await send(message)

        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if scope["path"] in RUNTIME_ROUTES and (self.key is None or hmac.compare_digest(given, self.key)):
            response = error_response(403, f"{scope['path']}: loading and unloading adapters at run time is off "
                                           "under --ray (a load would reach one replica of several); restart the "
                                           "deployment with the adapters to serve")
            await response(scope, receive, named)
            return
        await self.app(scope, receive, named)


class Replica:
    """One Serve replica: :func:`prepare` in the constructor (the base, every adapter, ``threads`` torch
    threads), then ``build_app``'s app, bound by Serve's ``ingress`` through ``__serve_build_asgi_app__``."""

    def __init__(self, options: dict[str, Any], cwd: str, loopback: bool) -> None:
        from loratune.serve.server import prepare

        if os.path.isdir(cwd):
            os.chdir(cwd)                    # the driver's: relative model paths (an adapter's base) mean the same
        if loopback:
            _grpc_on_loopback()
        self.state = prepare(**options)

    def __serve_build_asgi_app__(self) -> Any:
        from ray import serve

        from loratune.serve.app import build_app

        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - a name for the header only; the process id names it as well
            replica = str(os.getpid())
        return _RayRoutes(build_app(self.state), self.state.api_key, replica)


def _grpc_on_loopback() -> None:
    """Serve (2.60) gives each replica a gRPC server for calls between deployments, bound to ``[::]:0``: every
    interface, whatever the node's address (ray-project/ray#64544). A local deployment stays on 127.0.0.1, so
    the replica binds it there; it starts after the constructor, which runs this."""
    from ray.serve._private import replica

    bind_port = getattr(replica, "add_port_to_grpc_server", None)
    if bind_port is None:
        log.warning("Ray Serve changed: its replicas' gRPC server may listen beyond 127.0.0.1")
        return

    def bind_loopback(server: Any, address: str) -> int:
        return bind_port(server, "127.0.0.1:0" if address == "[::]:0" else address)

    replica.add_port_to_grpc_server = bind_loopback


# --- checks (before Ray starts) ------------------------------------------------------------------------

def check(*, host: str, port: int, replicas: int, address: str | None, threads: int | None,
          options: dict[str, Any]) -> dict[str, Any]:
    """Every flag checked without loading a model or starting Ray: {"base", "adapters" (names), "port",
    "options" (folders made absolute)}; the replicas' own loading errors come back as InputError too."""
    missing = [m for m in ("ray", "fastapi", "aiohttp") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"--ray: needs Ray Serve ({', '.join(missing)} not installed here): {INSTALL}")
    try:
        require("ray")                              # the private parts used here: those of the declared range
    except ImportError as e:
        raise InputError(f"--ray: {e}") from None
    if replicas < 1:
        raise InputError(f"--replicas: must be at least 1, got {replicas}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads: must be at least 1, got {threads}")
    if address is not None and address != "auto" and not _address_ok(address):
        raise InputError(f"--address: expected HOST:PORT of a Ray cluster's head (or auto, or ray://HOST:PORT), "
                         f"got {address!r}")
    if address is not None and port == 0:
        raise InputError("--port: give a fixed port with --address (every node's Serve proxy listens on it)")
    named = parse_adapters(options.get("adapters") or ())
    root = options.get("adapters_dir")
    if root is not None and not Path(root).is_dir():
        raise InputError(f"--adapters-dir: {root} " + ("is not a folder" if Path(root).exists() else "does not exist"))
    found = search_adapters(Path(root)) if root is not None else {}
    if options.get("merge") and (len(named) != 1 or root is not None):
        raise InputError("--merge: folds exactly one adapter into the base; give one --adapter and no --adapters-dir")
    names = {**named, **found}
    base = options.get("base") or (base_of(next(iter(names.values()))) if names else None)
    if base is None:
        raise InputError("--base: give a base model, or at least one --adapter (whose base is then served)")
    if address is None:                                      # taken, or a host not here: refused now
        with contextlib.closing(bind(host, port) if port else spare_port(host)) as sock:
            port = sock.getsockname()[1]
    absolute = {"adapters": {n: os.path.abspath(d) for n, d in named.items()},
                "adapters_dir": None if root is None else os.path.abspath(root)}
    return {"base": base, "adapters": list(names), "port": port, "options": {**options, **absolute}}


def spare_port(host: str, tries: int = 64) -> socket.socket:
    """A listening socket on a free port on ``host`` that nothing hands out by itself, for Serve's proxy under
    ``--port 0``. The proxy binds the port only once Ray has started, and Ray's processes take ports from the
    kernel's ephemeral range (a bind to port 0, the local end of each connection) and at random above its start
    (``ray._private.node.Node._get_unused_port``), so a free port picked there can be gone by then (seen: "Failed
    to bind to address"). So one below that range, from 20000 (under it lie the ports services are set on by
    hand), at random; the kernel's choice where the range leaves no room or every try is taken."""
    bind(host, 0).close()                                   # a host that is not here: refused as for a fixed port
    low = ephemeral_ports()[0]
    candidates = range(20000, low)
    for port in random.sample(candidates, min(tries, len(candidates))):
        try:
            return bind(host, port)
        except InputError:
            continue
    return bind(host, 0)


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it assigns itself (Linux's ``ip_local_port_range``; elsewhere Linux's
    default, which lies below the IANA range other systems use)."""
    with contextlib.suppress(OSError, ValueError):
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    return 32768, 60999


def _address_ok(address: str) -> bool:
    m = _ADDRESS.fullmatch(address)
    return bool(m) and 1 <= int(m.group(1)) <= 65535


def fit(replicas: int, threads: int | None, total: float, biggest: float) -> int:
    """Torch threads (and Ray CPUs) per replica: ``threads``, else the CPUs split evenly (at least 1);
    InputError where the replicas cannot all be placed (Ray would wait for CPUs forever)."""
    n = threads or max(1, min(int(biggest), int(total) // replicas))
    if n > biggest:
        raise InputError(f"--threads: {n} threads a replica, but no node has more than {biggest:g} CPUs")
    if replicas * n > total:
        raise InputError(f"--replicas: {replicas} replicas of {n} thread{'s' if n > 1 else ''} need "
                         f"{replicas * n} CPUs; {'this machine' if total == biggest else 'the cluster'} has "
                         f"{total:g} (give fewer --replicas or --threads)")
    return n


# --- Ray ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _env(values: dict[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``values`` (None: unset) for the block."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def ray_session(address: str | None, cpus: int, emit: Emit) -> Iterator[str | None]:
    """Start a local Ray on 127.0.0.1 (``address`` None; yields its temp folder) or join ``address`` (yields
    None). On the way out: a local Ray is shut down with Serve and its folder removed, no process left; on a
    cluster only our application is deleted."""
    local, loopback = address is None, on_loopback(address)
    env: dict[str, str | None] = {"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    if loopback:                                   # Ray's address is 127.0.0.1 (else Ray would use the node's)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if local:
        env["RAY_ADDRESS"] = None                                           # never someone's cluster
        if not any(k in os.environ for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)     # else Ray writes ~/.ray/auth_token
    temp = tempfile.mkdtemp(prefix="lt-ray-", dir="/tmp" if os.path.isdir("/tmp") else None) if local else None
    try:
        with _env(env):
            try:
                import ray
                from ray import serve
                from ray._private import ray_constants
            except ImportError as e:
                raise InputError(f"--ray: Ray Serve does not import here ({e}): {INSTALL}") from None
            serve_log = logging.getLogger("ray.serve")
            level = serve_log.level
            serve_log.setLevel(logging.WARNING)                      # its INFO lines would show on stderr
            flag = ray_constants.ENABLE_RAY_CLUSTER
            if loopback:
                ray_constants.ENABLE_RAY_CLUSTER = False            # if ray was imported before the env was set
            if local:
                ray._raylet.Config.initialize("")                   # re-read RAY_AUTH_* likewise
            kw: dict[str, Any] = dict(log_to_driver=False, configure_logging=True, logging_level=logging.WARNING)
            try:
                if local:
                    emit({"kind": "message", "text": f"starting Ray on 127.0.0.1 with {cpus} CPUs (its files: {temp})"})
                    ray.init(num_cpus=cpus, include_dashboard=False, _temp_dir=temp, **kw)
                else:
                    emit({"kind": "message", "text": f"joining the Ray cluster at {address}"})
                    ray.init(address=address, **kw)
                yield temp
            finally:
                # Delete the application: its replicas answer what they hold while the proxy still runs (no
                # serve.shutdown(): it kills the proxies at once, and a local ray.shutdown() ends every actor).
                with contextlib.suppress(Exception):                 # Serve may not have started
                    if ray.is_initialized():
                        serve.delete(APP)
                ray.shutdown()
                ray_constants.ENABLE_RAY_CLUSTER = flag
                serve_log.setLevel(level)
    finally:
        if local:
            raylet = sys.modules.get("ray._raylet")
            if raylet is not None:
                raylet.Config.initialize("")                        # back to the caller's RAY_AUTH_* settings
            _reap(temp)


def on_loopback(address: str | None) -> bool:
    """A local Ray (``address`` None) or a cluster on this machine's loopback."""
    return address is None or bool(re.match(r"(ray://)?(127\.|localhost:|\[::1\]:)", address))


def _reap(temp: str | None, wait_s: float = 20.0) -> None:
    """Wait for the processes of the Ray in ``temp`` (:func:`processes_of`) to end, kill any left after
    ``wait_s``, then remove the folder."""
    if not temp:
        return
    deadline = time.monotonic() + wait_s
    while processes_of(temp) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in processes_of(temp):
        log.warning("a Ray process outlived ray.shutdown(): killing %d", pid)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def processes_of(temp: str) -> list[int]:
    """Processes of the Ray in ``temp`` but this one: their command line names it (raylet, GCS) or a file
    they hold open lies in it (actors, whose titles hide their command lines, log there). Linux ``/proc``;
    elsewhere none are found."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if int(entry.name) != os.getpid() and (temp.encode() in (entry / "cmdline").read_bytes() or any(
                    os.readlink(fd).startswith(temp) for fd in (entry / "fd").iterdir())):
                found.append(int(entry.name))
    return found


def deploy(options: dict[str, Any], replicas: int, threads: int, host: str, port: int, graceful_s: float,
           loopback: bool) -> None:
    """Start Serve's proxy on host:port and deploy the replicas (returns at once; :func:`wait_running`);
    ``loopback``: Ray is on 127.0.0.1, and so are the replicas' gRPC servers."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    from ray.serve.context import _get_global_client

    config = _get_global_client().http_config                  # a cluster whose Serve runs already keeps its own
    if (config.host, config.port) != (host, port):
        raise InputError(f"--port: Serve already runs on this cluster on {config.host}:{config.port}; "
                         f"give --host {config.host} --port {config.port}")
    from ray.serve.api import RunTarget

    ingress = serve.ingress()(Replica)
    deployment = serve.deployment(ingress, name=APP, num_replicas=replicas,
                                  ray_actor_options={"num_cpus": threads}, max_ongoing_requests=256,
                                  max_constructor_retry_count=1, graceful_shutdown_timeout_s=graceful_s,
                                  graceful_shutdown_wait_loop_s=0.5)
    target = deployment.bind({**options, "threads": threads}, os.getcwd(), loopback)
    serve.run_many([RunTarget(target, name=APP, route_prefix="/")], wait_for_applications_running=False)


def wait_running(stop: threading.Event, emit: Emit) -> bool:
    """Until the application runs (True) or a signal came (False); InputError when a replica's constructor
    refused the input, RuntimeError when the deployment failed otherwise."""
    from ray import serve

    said = ""
    while not stop.wait(0.5):
        app = serve.status().applications.get(APP)
        status = str(app.status) if app is not None else "NOT_STARTED"
        if status.endswith("RUNNING"):
            return True
        if status.endswith("DEPLOY_FAILED") or status.endswith("UNHEALTHY"):
            message = "\n".join([app.message, *(d.message for d in app.deployments.values())]) if app else ""
            found = re.findall(r"InputError: (.+)", message)    # a replica's constructor refused the input
            if found:
                raise InputError(found[-1].strip())
            raise RuntimeError(f"the Ray Serve deployment failed: {message.strip()[-2000:]}")
        detail = next((" ".join(d.message.split()) for d in app.deployments.values() if d.message), "") \
            if app is not None else ""
        if detail and detail != said:
            emit({"kind": "message", "text": f"Ray Serve: {detail}"})
            said = detail
    return False


def wait_proxy(url: str, stop: threading.Event, timeout: float) -> bool:
    """Until ``url``/health answers 200 through Serve's proxy (True), a signal or ``timeout`` (False)."""
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        stop.wait(0.2)
    return False


# --- the command ---------------------------------------------------------------------------------------

def serve_ray(*, host: str = "127.0.0.1", port: int = 8000, replicas: int = 2, address: str | None = None,
              emit: Emit | None = None, threads: int | None = None, graceful_s: float = 60.0,
              **options: Any) -> int:
    """``loratune serve --ray``: ``replicas`` Serve replicas of :func:`prepare` (``options``) on a local Ray
    or the cluster at ``address``, until SIGTERM (returns 0) or SIGINT (130); ``threads`` per replica."""
    emit = emit or (lambda event: None)
    plan = check(host=host, port=port, replicas=replicas, address=address, threads=threads, options=options)
    cpus = available_cpus()
    per = fit(replicas, threads, cpus, cpus) if address is None else 0
    key = os.environ.get(API_KEY_ENV, "") if options.get("api_key") is None else options["api_key"]
    options = {**plan["options"], "api_key": key}            # the replicas' environment may lack the variable
    if not _loopback(host):
        log.warning("--host %s: listening beyond this machine%s", host,
                    "" if key else f"; anyone who can reach it can use it (set {API_KEY_ENV})")
    signals: list[int] = []
    stop = threading.Event()
    old = _catch(signals, stop)
    try:
        with ray_session(address, cpus, emit):
            _catch(signals, stop)                                # ray.init replaced SIGTERM's handler
            if address is not None:
                per = _fit_cluster(replicas, threads)
            emit({"kind": "message", "text": f"deploying {replicas} replica{'s' if replicas > 1 else ''} with "
                                             f"{per} thread{'s' if per > 1 else ''} each"})
            deploy(options, replicas, per, host, plan["port"], graceful_s, loopback=on_loopback(address))
            url = f"http://{_url_host(host)}:{plan['port']}"
            if wait_running(stop, emit):
                # the routes reach the proxy a little after the application runs; on a cluster this node may
                # run no proxy (none of the replicas)
                proxied = wait_proxy(_reachable(host, plan["port"]), stop, 60 if address is None else 10)
                if not proxied and address is None and not stop.is_set():
                    raise RuntimeError(f"Serve's proxy did not answer on {url}")
                if not stop.is_set():
                    emit({"kind": "ready", "url": url, "base": plan["base"], "adapters": plan["adapters"],
                          "merged": bool(options.get("merge")), "api_key": bool(key), "replicas": replicas})
                while not stop.wait(1.0):
                    pass
            emit({"kind": "message", "text": "stopping the replicas" + (" and Ray" if address is None else "")})
    finally:
        _restore(old)
    emit({"kind": "message", "text": "stopped: " + ("Ray is shut down" if address is None else
                                                    f"the application {APP!r} is deleted from the cluster")})
    return 130 if signals and signals[0] == signal.SIGINT else 0


def _fit_cluster(replicas: int, threads: int | None) -> int:
    import ray

    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
    return fit(replicas, threads, sum(nodes), max(nodes, default=0))


def _reachable(host: str, port: int) -> str:
    """The URL this process reaches the proxy at (a wildcard host: the loopback)."""
    near = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{_url_host(near)}:{port}"


def _catch(signals: list[int], stop: threading.Event) -> dict[int, Any] | None:
    """SIGTERM and SIGINT set ``stop`` (the first one is recorded); None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handle(sig: int, frame: Any) -> None:
        signals.append(sig)
        stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(old: dict[int, Any] | None) -> None:
    for sig, handler in (old or {}).items():
        signal.signal(sig, handler)
