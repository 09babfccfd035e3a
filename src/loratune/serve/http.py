"""What every route shares: OpenAI's error shape and reading a request's JSON body."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 413: "RequestTooLargeError", 422: "UnprocessableEntityError",
          500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (404: NotFoundError, ...)."""
    return _TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": _TYPES.get(status, "Error"), "param": param,
                                   "code": status}}, status_code=status)


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 over ``limit`` bytes (read no further), 400 not JSON or not an object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HttpError(413, f"the body is {int(length):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"the body is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise HttpError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(body, dict):
        raise HttpError(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


def text_field(body: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None:
        if required:
            raise HttpError(422, f"field {key!r} is required", key)
        return None
    if not isinstance(value, str) or not value:
        raise HttpError(422, f"field {key!r} must be a non-empty string, got {json.dumps(value)[:60]}", key)
    return value


def check_text(text: str, where: str) -> None:
    """422 for a string that is no UTF-8 text (a lone surrogate, which JSON's \\ud800 escapes can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise HttpError(422, f"field '{where}' holds a lone surrogate (\\ud800-\\udfff): not text", where) from None


async def submit(batcher: Any, rows: list[Any], name: str) -> list[Any]:
    """``batcher.submit(rows)``, its failures as the request's HTTP errors: 404 the adapter was unloaded while
    the request waited, 500 its rows failed run alone, 503 the server is shutting down."""
    from loratune.serve.batcher import AdapterGone, ForwardFailed

    try:
        return await batcher.submit(rows)
    except AdapterGone:
        raise HttpError(404, f"the adapter {name!r} was unloaded while this request waited", "model") from None
    except ForwardFailed as e:
        raise HttpError(500, f"internal error: {e} (the other requests of its batch were answered)") from None
    except RuntimeError as e:
        raise HttpError(503, str(e)) from None
