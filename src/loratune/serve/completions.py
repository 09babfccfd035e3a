"""OpenAI's text routes for causal-LM adapters, as vLLM's multi-LoRA server answers them.

    POST /v1/completions        {"model", "prompt": TEXT | [TEXT, ...], "max_tokens", "temperature", "top_p",
                                 "seed", "stop", "stream", "stream_options"}
    POST /v1/chat/completions   {"model", "messages": [{"role", "content"}, ...], the same options,
                                 "max_completion_tokens" as another name of "max_tokens"}

Each handler takes the request and the app's ``ServerState`` (``state``: app.py imports this module, not
the reverse). ``model`` names an adapter (or the base, which then writes alone). A chat is rendered by the tokenizer's
chat template with the assistant's header, after the adapter's system prompt when the messages bring no
system turn (what ``loratune generate`` does); a completion's prompt is plain text, tokenized as the
tokenizer gives it. Requests for any adapters decode together (:meth:`loratune.serve.lm.ServedLM.generate`).

As OpenAI's API: ``temperature`` defaults to 1 (0: greedy), ``top_p`` to 1, ``max_tokens`` to 16 for a
completion and to the server's ``--max-tokens`` for a chat; a request for more than ``--max-tokens`` is a
422, and a prompt plus ``max_tokens`` beyond the model's context is cut to fit (``finish_reason``
``length``). ``stream: true`` answers with server-sent events (``data: {chunk}``, ending ``data: [DONE]``),
and ``stream_options.include_usage`` adds a last chunk with the usage. Options loratune does not implement
(``n`` > 1, ``best_of`` > 1, ``echo``, ``logprobs``, penalties, tools, ``response_format``) are a 422 naming
them, never silently ignored.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loratune.errors import InputError
from loratune.serve.http import (
    HttpError,
    check_text,
    error_type,
    read_json,
    submit,
    text_field,
)
from loratune.serve.lm import GenRow

MAX_STOP_CHARS = 256
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = {"echo": (False, None), "logprobs": (False, None), "top_logprobs": (None, 0), "best_of": (None, 1),
               "n": (None, 1), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "response_format": (None, {"type": "text"}), "suffix": (None, ""), "prompt_logprobs": (None,),
               # vLLM's sampling extras, which its clients send expecting them to act
               "repetition_penalty": (None, 1, 1.0), "top_k": (None, -1, 0), "min_p": (None, 0, 0.0),
               "min_tokens": (None, 0), "ignore_eos": (None, False), "stop_token_ids": (None, []),
               "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0)}
"""Fields that change what OpenAI's API (or vLLM's) returns, with the values that ask for nothing loratune lacks:
any other value is a 422 naming the field, never ignored."""


async def completions(request: Request, state: Any) -> tuple[Response, str | None, int]:
    return await _answer(request, state, chat=False)


async def chat_completions(request: Request, state: Any) -> tuple[Response, str | None, int]:
    return await _answer(request, state, chat=True)


def _target(state: Any, name: str) -> tuple[str | None, str | None]:
    """(adapter or None for the base, the system prompt to put first) for a request's ``model``."""
    if state.model.task != "causal-lm":
        raise HttpError(400, f"this server's adapters classify ({state.base_name} is a classifier); use "
                             "/v1/classify", "model")
    if name in state.adapters:
        return name, state.adapters[name].system_prompt
    if name == state.base_name:
        if state.model.merged:
            raise HttpError(400, f"this server serves the adapter {', '.join(state.adapters)} merged into "
                                 f"{name}'s weights (--merge); the base alone is not served", "model")
        return None, None
    raise HttpError(404, f"the model {name!r} does not exist; this server has {state.base_name} and the adapters "
                         f"{', '.join(state.adapters) or '(none)'}", "model")


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float, *,
            low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or not math.isfinite(value) or (low_open and value == low):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise HttpError(422, f"field {key!r} must be a number in {span}, got {json.dumps(value)[:40]}", key)
    return float(value)


def _whole(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        limit = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise HttpError(422, f"field {key!r} must be a whole number {limit}, got {json.dumps(value)[:40]}", key)
    return int(value)


def _options(body: dict[str, Any], state: Any, chat: bool) -> dict[str, Any]:
    """The generation options of a request, each checked (422 naming the field)."""
    for key, allowed in UNSUPPORTED.items():
        # the same value and type: 0 is not False (logprobs: 0 asks for the chosen tokens' logprobs)
        if key in body and not any(type(body[key]) is type(a) and body[key] == a for a in allowed):
            raise HttpError(422, f"field {key!r} = {json.dumps(body[key])[:40]} is not supported by this server", key)
    limit = state.limits.max_tokens
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _whole(body, key, 1)
    if max_tokens is None:
        max_tokens = limit if chat else min(16, limit)
    elif max_tokens > limit:
        raise HttpError(422, f"field {key!r} is {max_tokens:,}; this server writes at most {limit:,} tokens a "
                             "request (--max-tokens)", key)
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise HttpError(422, "field 'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise HttpError(422, f"field 'stop': a stop string is at most {MAX_STOP_CHARS} characters", "stop")
    for s in stops:
        check_text(s, "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise HttpError(422, f"field 'stream' must be true or false, got {json.dumps(stream)[:40]}", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
        raise HttpError(422, "field 'stream_options' must be an object {\"include_usage\": true|false}",
                        "stream_options")
    if opts is not None and not stream:
        raise HttpError(422, "field 'stream_options' is only allowed with \"stream\": true", "stream_options")
    return {"max_tokens": max_tokens, "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), "seed": _whole(body, "seed", 0, 2**63 - 1),
            "stop": stops, "stream": stream, "include_usage": bool((opts or {}).get("include_usage", False))}


def _prompts(body: dict[str, Any], state: Any) -> list[str]:
    value = body.get("prompt")
    if value is None:
        raise HttpError(422, "field 'prompt' is required: a text or a list of texts", "prompt")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise HttpError(422, "field 'prompt' must be a text or a non-empty list of texts (token ids are not "
                             "accepted)", "prompt")
    if len(texts) > state.limits.max_inputs:
        raise HttpError(413, f"field 'prompt' has {len(texts):,} texts; the limit is {state.limits.max_inputs:,}",
                        "prompt")
    for i, t in enumerate(texts):
        where = "prompt" if isinstance(value, str) else f"prompt[{i}]"
        if not isinstance(t, str) or not t:
            raise HttpError(422, f"field '{where}' must be a non-empty string (token ids are not accepted)", where)
        if len(t) > state.limits.max_chars:
            raise HttpError(413, f"field '{where}' is {len(t):,} characters; the limit is "
                                 f"{state.limits.max_chars:,}", where)
        check_text(t, where)
    return texts


def _messages(body: dict[str, Any], state: Any) -> list[dict[str, str]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise HttpError(422, "field 'messages' is required: a non-empty list of {\"role\", \"content\"}", "messages")
    if len(value) > state.limits.max_inputs:
        raise HttpError(413, f"field 'messages' has {len(value):,} messages; the limit is "
                             f"{state.limits.max_inputs:,}", "messages")
    out, chars = [], 0
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise HttpError(422, f"field '{where}' must be an object {{\"role\", \"content\"}}", where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise HttpError(422, f"field '{where}.role' must be one of {', '.join(ROLES)}, got "
                                 f"{json.dumps(role)[:40]}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise HttpError(422, f"field '{where}.content[{k}]' must be {{\"type\": \"text\", \"text\": ...}}"
                                         " (this server reads text only)", f"{where}.content[{k}]")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise HttpError(422, f"field '{where}.content' must be a string or a list of text parts",
                            f"{where}.content")
        check_text(content, f"{where}.content")
        chars += len(content)
        if chars > state.limits.max_chars:
            raise HttpError(413, f"the messages are over {state.limits.max_chars:,} characters together",
                            "messages")
        out.append({"role": ROLES[role], "content": content})
    return out


async def _answer(request: Request, state: Any, *, chat: bool) -> tuple[Response, str | None, int]:
    body = await read_json(request, state.limits.max_body_bytes)
    name = text_field(body, "model")
    assert name is not None
    adapter, system = _target(state, name)
    opts = _options(body, state, chat)
    model = state.model
    try:
        if chat:
            prompts = [model.chat_ids(_messages(body, state), system)]
        else:
            prompts = [model.text_ids(p) for p in _prompts(body, state)]
    except InputError as e:
        raise HttpError(400, str(e), "messages" if chat else "prompt") from None
    for i, ids in enumerate(prompts):
        if model.room(len(ids)) < 1:
            raise HttpError(400, f"the prompt{'' if len(prompts) == 1 else f' {i}'} is {len(ids):,} tokens; the "
                                 f"model reads at most {model.context:,}", "messages" if chat else "prompt")
    rows = [GenRow(ids, opts["max_tokens"], opts["temperature"], opts["top_p"],
                   None if opts["seed"] is None else opts["seed"] + k, opts["stop"])
            for k, ids in enumerate(prompts)]
    kind = "chatcmpl" if chat else "cmpl"
    head = {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
    if opts["stream"]:
        return _stream(state, adapter, rows, head, chat, opts["include_usage"]), adapter, len(rows)
    results = await _submit(state, adapter, rows, name)
    usage = _usage(results)
    if chat:
        choices = [{"index": k, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                    "finish_reason": r["finish_reason"]} for k, r in enumerate(results)]
        payload = {**head, "object": "chat.completion", "choices": choices, "usage": usage}
    else:
        choices = [{"index": k, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                   for k, r in enumerate(results)]
        payload = {**head, "object": "text_completion", "choices": choices, "usage": usage}
    return JSONResponse(payload), adapter, len(rows)


async def _submit(state: Any, adapter: str | None, rows: list[GenRow], name: str) -> list[dict[str, Any]]:
    return await submit(state.batcher, [(adapter, r) for r in rows], name)


def _usage(results: list[dict[str, Any]]) -> dict[str, int]:
    prompt = sum(r["prompt_tokens"] for r in results)
    done = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _stream(state: Any, adapter: str | None, rows: list[GenRow], head: dict[str, Any], chat: bool,
            include_usage: bool) -> StreamingResponse:
    """Server-sent events: each row's text as it is written, then each row's finish, the usage if asked,
    ``[DONE]``. A failure after the stream began is an ``{"error": ...}`` event before ``[DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, str | None, dict[str, Any] | None]] = asyncio.Queue()
    for k, row in enumerate(rows):
        row.emit = lambda piece, k=k: loop.call_soon_threadsafe(queue.put_nowait, (k, piece, None))
        row.on_done = lambda result, k=k: loop.call_soon_threadsafe(queue.put_nowait, (k, None, result))
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **extra})}\n\n"

    def piece(k: int, text: str | None, finish: str | None = None) -> dict[str, Any]:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": k, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": k, "text": text or "", "logprobs": None, "finish_reason": finish}

    async def events() -> AsyncIterator[str]:
        # The rows are submitted here, not when the response is made: a client gone before the response started
        # has Starlette cancel the stream before its first step, so this body never runs, nor its `finally`.
        task = asyncio.ensure_future(_submit(state, adapter, rows, head["model"]))
        # the stream may end before the batch does (its rows finished first): a later failure is the batch's
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        finished: dict[int, dict[str, Any]] = {}
        getter: asyncio.Future | None = None
        try:
            if chat:
                yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for k in range(len(rows))])
            while len(finished) < len(rows):
                if queue.empty() and task.done():
                    break                                  # the batch ended without finishing every row
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue                               # the task ended: what it queued is read first
                k, text, result = getter.result()
                if result is not None:
                    finished[k] = result
                    yield chunk([piece(k, None, result["finish_reason"])])
                elif text:
                    yield chunk([piece(k, text)])
            if len(finished) < len(rows):
                try:
                    task.result()
                    raise HttpError(500, "internal error: the batch ended without finishing this request")
                except HttpError as e:
                    err = {"message": e.message, "param": e.param, "code": e.status,
                           "type": error_type(e.status)}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
            if include_usage:
                yield chunk([], usage=_usage([finished[k] for k in range(len(rows))]))
            yield "data: [DONE]\n\n"
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if len(finished) < len(rows):              # the client went away: its rows end at their next step
                for row in rows:
                    row.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
