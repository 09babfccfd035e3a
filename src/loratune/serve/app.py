"""The ASGI app (Starlette): vLLM's routes for classification and causal-LM adapters.

    GET  /health                          200 while serving (no key needed)
    GET  /v1/models                       the base and every adapter, in OpenAI's list format
    POST /v1/classify, /classify          {"model": ADAPTER, "input": TEXT | [TEXT, ...]} -> vLLM's envelope
    POST /v1/completions                  causal-LM adapters: OpenAI's completions (serve/completions.py)
    POST /v1/chat/completions             causal-LM adapters: OpenAI's chat completions
    POST /v1/load_lora_adapter            {"lora_name": NAME, "lora_path": DIR under --adapters-dir}
    POST /v1/unload_lora_adapter          {"lora_name": NAME}
    GET  /metrics                         Prometheus text

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the field named in
``param``: 400 malformed JSON or a bad adapter folder, 401 no or a wrong key, 403 a path outside
``--adapters-dir`` (or runtime loading off), 404 an unknown model or route, 413 a body, list or text over the
limits, 422 a field of the wrong type or value. With an API key (``LORATUNE_API_KEY``), every route but
``/health`` needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from loratune.errors import InputError
from loratune.serve.batcher import Batcher
from loratune.serve.http import (
    HttpError,
    check_text,
    error_response,
    read_json,
    submit,
    text_field,
)
from loratune.serve.metrics import Metrics
from loratune.serve.model import ServedAdapter, ServedModel

log = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
"""An adapter's name: what a request's ``model`` says. No slashes or spaces (names show in URLs and metrics)."""


@dataclass
class Limits:
    """What one request may ask for; over a limit is a 413 naming the field."""

    max_inputs: int = 256
    max_chars: int = 20_000
    max_body_bytes: int = 8 * 1024 * 1024
    max_tokens: int = 512
    """Most tokens one completion may write (``--max-tokens``; a chat's default)."""


@dataclass
class ServerState:
    """Everything the routes share. ``adapters`` is the event loop's view (the worker thread has its own, in
    ``model.adapters``): a name is added once its load finished and removed the moment its unload is asked."""

    model: ServedModel
    batcher: Batcher
    adapters: dict[str, ServedAdapter]
    adapters_dir: Path | None = None
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    busy: set[str] = field(default_factory=set)
    """Names being loaded or unloaded: a second load or unload of one waits for none, it is refused."""

    @property
    def base_name(self) -> str:
        return self.model.base


# --- helpers ---------------------------------------------------------------------------------------

def _texts(body: dict[str, Any], limits: Limits) -> list[str]:
    value = body.get("input")
    if value is None:
        raise HttpError(422, "field 'input' is required: a text or a list of texts", "input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise HttpError(422, f"field 'input' must be a text or a list of texts, got {type(value).__name__}", "input")
    if not texts:
        raise HttpError(422, "field 'input' is an empty list", "input")
    if len(texts) > limits.max_inputs:
        raise HttpError(413, f"field 'input' has {len(texts):,} texts; the limit is {limits.max_inputs:,} a request",
                        "input")
    for i, t in enumerate(texts):
        where = "input" if isinstance(value, str) else f"input[{i}]"
        if not isinstance(t, str):
            raise HttpError(422, f"field '{where}' must be a string, got {type(t).__name__}", where)
        if len(t) > limits.max_chars:
            raise HttpError(413, f"field '{where}' is {len(t):,} characters; the limit is {limits.max_chars:,}", where)
        check_text(t, where)
    return texts


# --- routes ------------------------------------------------------------------------------------------

Handler = Callable[[Request, ServerState], Awaitable[tuple[Response, str | None, int]]]


def route(state: ServerState, name: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """A handler with the shared error handling and metrics: (response, adapter, texts) -> response."""

    async def endpoint(request: Request) -> Response:
        t0 = time.monotonic()
        adapter: str | None = None
        texts = 0
        try:
            response, adapter, texts = await handler(request, state)
        except HttpError as e:
            response = error_response(e.status, e.message, e.param)
            adapter = getattr(e, "adapter", None)
        except Exception as e:  # noqa: BLE001 - one request's failure is its own 500, never the server's end
            log.exception("%s failed", name)
            response = error_response(500, f"internal error: {type(e).__name__}: {e}")
        state.metrics.request(adapter, name, response.status_code, time.monotonic() - t0, texts)
        return response

    return endpoint


async def health(request: Request, state: ServerState) -> tuple[Response, str | None, int]:
    return JSONResponse({"status": "ok"}), None, 0


async def models(request: Request, state: ServerState) -> tuple[Response, str | None, int]:
    task = state.model.task
    data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "loratune",
             "root": state.base_name, "parent": None, "max_model_len": state.model.base_max_length,
             "task": task, "labels": state.model.base_labels}]
    for a in list(state.adapters.values()):
        data.append({"id": a.name, "object": "model", "created": a.created, "owned_by": "loratune", "root": a.path,
                     "parent": state.base_name, "max_model_len": a.max_length, "task": task,
                     "labels": a.labels if task == "classification" else None})
    return JSONResponse({"object": "list", "data": data}), None, 0


async def classify(request: Request, state: ServerState) -> tuple[Response, str | None, int]:
    body = await read_json(request, state.limits.max_body_bytes)
    name = text_field(body, "model")
    assert name is not None
    if state.model.task != "classification":
        raise HttpError(400, f"this server's adapters write text ({state.base_name} is a causal LM); use "
                             "/v1/completions or /v1/chat/completions", "model")
    texts = _texts(body, state.limits)
    if name == state.base_name and name not in state.adapters:
        if state.model.base_labels is None:
            raise HttpError(400, f"the base model {name} has no trained classification head; name an adapter: "
                                 f"{', '.join(state.adapters) or 'none loaded'}", "model")
        labels, max_length, adapter = state.model.base_labels, state.model.base_max_length, None
    elif name in state.adapters:
        a = state.adapters[name]
        labels, max_length, adapter = a.labels, a.max_length, name
    else:
        e = HttpError(404, f"the model {name!r} does not exist; this server has {state.base_name} and the adapters "
                           f"{', '.join(state.adapters) or '(none)'}", "model")
        raise e
    ids = state.model.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    probs = await submit(state.batcher, [(adapter, x) for x in ids], name)
    data = []
    for i, p in enumerate(probs):
        k = int(p.argmax())
        data.append({"index": i, "label": labels[k], "probs": [float(q) for q in p], "num_classes": len(labels),
                     "probabilities": {lab: float(q) for lab, q in zip(labels, p)}})
    tokens = sum(len(x) for x in ids)
    return JSONResponse({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                         "model": name, "data": data,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                                   "prompt_tokens_details": None}}), adapter, len(texts)


def _adapter_path(state: ServerState, raw: str) -> Path:
    """``raw`` (relative to ``--adapters-dir``, or absolute) as a folder that really lies under it: the path
    is resolved (``..`` and every link followed) before the check, so a link out of the folder is refused."""
    assert state.adapters_dir is not None
    root = state.adapters_dir.resolve()
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as e:      # ValueError: a NUL byte, a lone surrogate
        raise HttpError(400, f"lora_path {raw!r}: not a usable path ({e})", "lora_path") from None
    if real != root and root not in real.parents:
        raise HttpError(403, f"lora_path {raw!r} is outside --adapters-dir {root} (links are followed)", "lora_path")
    if not real.is_dir():
        raise HttpError(404, f"lora_path {raw!r}: no such folder under --adapters-dir", "lora_path")
    return real


async def load_adapter(request: Request, state: ServerState) -> tuple[Response, str | None, int]:
    body = await read_json(request, 64 * 1024)
    name = text_field(body, "lora_name")
    raw = text_field(body, "lora_path")
    assert name is not None and raw is not None
    if state.model.merged:
        raise HttpError(400, "this server serves one merged adapter (--merge); it loads no others")
    if state.adapters_dir is None:
        raise HttpError(403, "loading adapters at run time is off: start the server with --adapters-dir DIR",
                        "lora_path")
    if not NAME.fullmatch(name):
        raise HttpError(422, f"lora_name {name!r}: use letters, digits and . _ : @ + - (at most 128)", "lora_name")
    if name in state.adapters or name in state.busy or name == state.base_name:
        raise HttpError(400, f"the adapter {name!r} has already been loaded", "lora_name")
    path = _adapter_path(state, raw)
    state.busy.add(name)
    try:
        adapter = await state.batcher.call(state.model.add, name, path)
    except InputError as e:
        raise HttpError(400, str(e), "lora_path") from None
    finally:
        state.busy.discard(name)
    state.adapters[name] = adapter
    log.info("loaded adapter %s from %s", name, path)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully."), name, 0


async def unload_adapter(request: Request, state: ServerState) -> tuple[Response, str | None, int]:
    body = await read_json(request, 64 * 1024)
    name = text_field(body, "lora_name")
    assert name is not None
    if state.model.merged:
        raise HttpError(400, "this server serves one merged adapter (--merge); it cannot be unloaded")
    if name not in state.adapters or name in state.busy:
        raise HttpError(404, f"the adapter {name!r} is not loaded", "lora_name")
    del state.adapters[name]                  # new requests for it: 404 from now; queued ones: 404 at batch time
    state.busy.add(name)
    try:
        await state.batcher.call(state.model.remove, name)
    finally:
        state.busy.discard(name)
    log.info("unloaded adapter %s", name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully."), name, 0


async def metrics(request: Request, state: ServerState) -> tuple[Response, str | None, int]:
    gauges = {"adapters_loaded": len(state.adapters), "queue_rows": state.batcher.pending_rows(),
              "adapters_bytes_on_disk": sum(a.bytes for a in state.adapters.values())}
    return PlainTextResponse(state.metrics.text(gauges), media_type="text/plain; version=0.0.4"), None, 0


# --- the app ---------------------------------------------------------------------------------------------

class _Auth:
    """Pure ASGI middleware: ``Authorization: Bearer KEY`` on every HTTP route but /health (constant-time
    comparison)."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                response = error_response(401, "a valid API key is required: Authorization: Bearer KEY")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(state: ServerState) -> Any:
    """The ASGI app over ``state``; its lifespan starts and drains the batcher."""
    from contextlib import asynccontextmanager

    from loratune.serve.completions import chat_completions, completions

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        state.batcher.start()
        try:
            yield
        finally:
            await state.batcher.stop()            # every queued request is answered first

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        what = "no such route" if exc.status_code == 404 else str(exc.detail)
        response = error_response(exc.status_code, f"{request.method} {request.url.path}: {what}")
        response.headers.update(exc.headers or {})            # a 405's Allow (RFC 9110 §15.5.6)
        return response

    routes = [
        Route("/health", route(state, "/health", health), methods=["GET"]),
        Route("/v1/models", route(state, "/v1/models", models), methods=["GET"]),
        Route("/v1/classify", route(state, "/v1/classify", classify), methods=["POST"]),
        Route("/classify", route(state, "/classify", classify), methods=["POST"]),
        Route("/v1/completions", route(state, "/v1/completions", completions), methods=["POST"]),
        Route("/v1/chat/completions", route(state, "/v1/chat/completions", chat_completions), methods=["POST"]),
        Route("/v1/load_lora_adapter", route(state, "/v1/load_lora_adapter", load_adapter), methods=["POST"]),
        Route("/v1/unload_lora_adapter", route(state, "/v1/unload_lora_adapter", unload_adapter), methods=["POST"]),
        Route("/metrics", route(state, "/metrics", metrics), methods=["GET"]),
    ]
    app: Any = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    if state.api_key:
        app = _Auth(app, state.api_key)
    return app
