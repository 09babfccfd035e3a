"""``loratune serve``: load the base and the adapters, then answer on uvicorn until SIGTERM or Ctrl-C.

:func:`prepare` does the loading (every check before a port is taken), :func:`serve` binds and runs, and
:func:`start_background` runs a prepared server on a thread (tests, benchmarks). On SIGTERM or SIGINT the
server stops accepting, answers every request it holds (queued rows included), then returns 0 (SIGTERM) or
130 (SIGINT): uvicorn's own handling would re-raise the signal and end the process with it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from loratune.errors import InputError

missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
if missing:
    raise ImportError(f"loratune serve needs {' and '.join(missing)}: pip install 'loratune[serve]'")

from loratune.serve.app import NAME, Limits, ServerState, build_app
from loratune.serve.batcher import Batcher
from loratune.serve.lm import ServedLM
from loratune.serve.model import ServedModel, base_of

log = logging.getLogger(__name__)

API_KEY_ENV = "LORATUNE_API_KEY"
Emit = Callable[[dict[str, Any]], None]


def parse_adapters(items: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``NAME=DIR`` items (or a mapping) -> {name: dir}; names unique and URL-safe, folders existing."""
    pairs: list[tuple[str, str]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), str(v)) for k, v in items.items()]
    else:
        for item in items:
            name, eq, path = str(item).partition("=")
            if not eq or not name or not path:
                raise InputError(f"--adapter: expected NAME=DIR, got {item!r}")
            pairs.append((name, path))
    out: dict[str, str] = {}
    for name, path in pairs:
        if not NAME.fullmatch(name):
            raise InputError(f"--adapter: name {name!r}: use letters, digits and . _ : @ + - (at most 128)")
        if name in out:
            raise InputError(f"--adapter: the name {name!r} is given twice")
        if not Path(path).is_dir():
            raise InputError(f"--adapter: {name}={path}: " + ("not a folder" if Path(path).exists() else "does not exist"))
        out[name] = path
    return out


def search_adapters(folder: Path) -> dict[str, str]:
    """A search directory's adapters: each trial's by its trial id, and ``best``; {} for any other folder.
    Trials without an adapter (failed before their first epoch, or fully fine-tuned) are left out."""
    if not ((folder / "search.yaml").is_file() or (folder / "trials.csv").is_file()):
        return {}
    found: dict[str, str] = {}
    trials = folder / "trials"
    for run in sorted(trials.iterdir()) if trials.is_dir() else []:
        if (run / "adapter" / "adapter_config.json").is_file() and NAME.fullmatch(run.name):
            found[run.name] = str(run / "adapter")
    if (folder / "best" / "adapter" / "adapter_config.json").is_file():
        found["best"] = str(folder / "best" / "adapter")
    return found


def prepare(*, base: str | None = None, adapters: Sequence[str] | Mapping[str, str] = (),
            adapters_dir: str | os.PathLike | None = None, merge: bool = False, max_batch: int = 32,
            max_wait_ms: float = 5.0, precision: str = "auto", device: str = "auto", threads: int | None = None,
            limits: Limits | None = None, api_key: str | None = None, emit: Emit | None = None) -> ServerState:
    """Load the base and every adapter, checked; the state :func:`build_app` serves. ``api_key`` None reads
    ``LORATUNE_API_KEY`` (empty: no key)."""
    from loratune.runtime import set_threads

    emit = emit or (lambda event: None)
    named = parse_adapters(adapters)
    root = Path(adapters_dir) if adapters_dir is not None else None
    if root is not None and not root.is_dir():
        raise InputError(f"--adapters-dir: {root} " + ("is not a folder" if root.exists() else "does not exist"))
    found = search_adapters(root) if root is not None else {}
    clash = sorted(set(found) & set(named))
    if clash:
        raise InputError(f"--adapter: the name {clash[0]!r} is also a trial of the search in --adapters-dir")
    named = {**named, **found}
    if max_batch < 1:
        raise InputError(f"--max-batch: must be at least 1, got {max_batch}")
    if not 0 <= max_wait_ms <= 10_000:
        raise InputError(f"--max-wait-ms: must be between 0 and 10000, got {max_wait_ms}")
    limits = limits or Limits()
    if merge and (len(named) != 1 or root is not None):
        raise InputError("--merge: folds exactly one adapter into the base; give one --adapter and no --adapters-dir"
                         f" (got {len(named)} adapter{'s' if len(named) != 1 else ''}"
                         f"{' and --adapters-dir' if root is not None else ''})")
    if base is None and not named:
        raise InputError("--base: give a base model, or at least one --adapter (whose base is then served)")
    set_threads(threads)
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    task = _task(named, base)
    kind: Any = ServedLM if task == "causal-lm" else ServedModel
    if merge:
        name, folder = next(iter(named.items()))
        emit({"kind": "message", "text": f"loading {name} from {folder}, merged into its base"})
        model = kind.merged_from(name, folder, base=base, device=device, precision=precision)
    else:
        base_name = base or base_of(next(iter(named.values())))
        emit({"kind": "message", "text": f"loading the base model {base_name}"})
        model = kind(base_name, device=device, precision=precision, download=base is not None)
        for i, (name, folder) in enumerate(named.items(), 1):
            emit({"kind": "message", "text": f"loading adapter {i}/{len(named)}: {name} from {folder}"})
            try:
                model.add(name, folder)
            except InputError as e:
                raise InputError(f"--adapter {name}: {e}") from None
    batcher = Batcher(model.generate if task == "causal-lm" else model.classify, max_batch=max_batch,
                      max_wait_ms=max_wait_ms,
                      alive=lambda n: n is None or n in state.adapters)
    state = ServerState(model, batcher, dict(model.adapters), root, key or None, limits)
    batcher.on_batch = state.metrics.batch_ran
    return state


def _task(named: Mapping[str, str], base: str | None) -> str:
    """What the server serves, ``classification`` or ``causal-lm``: its adapters' one task (InputError when
    they mix), else what the base is (a causal LM writes text)."""
    from loratune.infer.inference import task_of

    tasks = {name: task_of(folder) for name, folder in named.items()}
    kinds = sorted(set(tasks.values()))
    if len(kinds) > 1:
        one = {k: next(n for n, t in tasks.items() if t == k) for k in kinds}
        raise InputError(f"--adapter: {one['causal-lm']} is a causal-LM adapter and {one['classification']} a "
                         "classification adapter; one server serves one kind (they need different models of the "
                         "base): start one server for each")
    if kinds:
        return kinds[0]
    assert base is not None
    return "causal-lm" if _is_causal_base(base) else "classification"


def _is_causal_base(base: str) -> bool:
    from transformers import AutoConfig

    from loratune.training.models import (
        _from_pretrained,
        is_causal_config,
        resolve_model_path,
    )

    return is_causal_config(_from_pretrained(AutoConfig, resolve_model_path(base), "config"))


class _Server:
    """uvicorn's Server, made here so uvicorn is imported only by ``serve``."""

    @staticmethod
    def make(config: Any, on_ready: Callable[[], None]) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                # uvicorn's own re-raises the signal after shutting down (the process would die by it);
                # here a drained shutdown returns, and serve() turns the signal into an exit code.
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in old.items():
                        signal.signal(sig, handler)

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if not self.should_exit:
                    on_ready()

        return Server(config)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); InputError naming the flag otherwise."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port: must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _config(app: Any, graceful_s: float) -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                          timeout_graceful_shutdown=graceful_s, timeout_keep_alive=5)


def serve(*, host: str = "127.0.0.1", port: int = 8000, emit: Emit | None = None, graceful_s: float = 60.0,
          **options: Any) -> int:
    """``loratune serve``: :func:`prepare` with ``options``, then serve until SIGTERM (returns 0) or SIGINT
    (returns 130), each drained: every request already received is answered."""
    emit = emit or (lambda event: None)
    state = prepare(emit=emit, **options)
    if not _loopback(host):
        log.warning("--host %s: listening beyond this machine%s", host,
                    "" if state.api_key else f"; anyone who can reach it can use it (set {API_KEY_ENV})")
    sock = bind(host, port)
    url = f"http://{_url_host(host)}:{sock.getsockname()[1]}"
    server = _Server.make(_config(build_app(state), graceful_s),
                          lambda: emit({"kind": "ready", "url": url, "base": state.base_name,
                                        "adapters": list(state.adapters), "merged": state.model.merged,
                                        "api_key": bool(state.api_key)}))
    signals: list[int] = []
    handle = server.handle_exit

    def record(sig: int, frame: Any) -> None:
        signals.append(sig)
        handle(sig, frame)

    server.handle_exit = record
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    emit({"kind": "message", "text": "stopped: every request received was answered"})
    return 130 if signals and signals[0] == signal.SIGINT else 0


class Background:
    """A prepared server on a thread of this process (tests, benchmarks): ``url``, then ``stop()``."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0, graceful_s: float = 30.0) -> None:
        self.state = state
        self.sock = bind(host, port)
        self.url = f"http://{_url_host(host)}:{self.sock.getsockname()[1]}"
        ready = threading.Event()
        self.server = _Server.make(_config(build_app(state), graceful_s), ready.set)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="loratune-serve")
        self.thread.start()
        deadline = time.monotonic() + 60
        while not ready.wait(0.05):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")

    def stop(self, timeout: float = 60.0) -> None:
        """Drain and stop (as SIGTERM does)."""
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
