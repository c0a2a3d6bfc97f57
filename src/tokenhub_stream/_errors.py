"""Error mapping, sans-IO: one place turns HTTP statuses and in-band error frames into
the `APIError` subclasses (`_exceptions.py`), so an error reads the same before and after
the first byte of a stream."""

from __future__ import annotations

import time
from collections.abc import Mapping

from ._exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from ._json import Redact, loads, redact_json

__all__ = [
    "error_class",
    "error_from_frame",
    "error_from_status",
    "request_id_of",
    "retry_after_seconds",
]

_CODE_STATUS = {
    "invalid_request_error": 400,
    "badrequesterror": 400,
    "bad_request": 400,
    "tool_use_failed": 400,
    "context_length_exceeded": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "unauthorized": 401,
    "permission_error": 403,
    "permission_denied": 403,
    "not_found_error": 404,
    "notfounderror": 404,
    "model_not_found": 404,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "too_many_requests": 429,
    "server_error": 500,
    "internal_error": 500,
    "internal_server_error": 500,
    "internalservererror": 500,
    "api_error": 500,
    "service_unavailable": 503,
    "overloaded_error": 529,
    "overloaded": 529,
}


def error_class(status_code: int | None) -> type[APIError]:
    """The `APIError` subclass for an HTTP status (or status carried in an error frame)."""
    if status_code is None:
        return APIError
    if status_code in (400, 422):
        return BadRequestError
    if status_code in (401, 403):
        return AuthenticationError
    if status_code == 404:
        return NotFoundError
    if status_code == 429:
        return RateLimitError
    if status_code >= 500:
        return ServerError
    return APIError


def _make_error(
    message: str,
    status_code: int | None,
    err: Mapping[str, object],
    request_id: str | None,
    retry_after: float | None,
    redact: Redact | None,
    body: object,
) -> APIError:
    code = _code_of(err) if err else None
    param = err.get("param")
    if not isinstance(param, str):
        param = None
    kept: Mapping[str, object] | None = None
    if isinstance(body, Mapping):
        try:
            kept = redact_json(body, redact)
        except ValueError:  # nested past any error's need: left out, not walked
            kept = None
    if redact is not None:
        message = redact(message)
        code = redact(code) if code else code
        param = redact(param) if param else param
    retryable = False if code == "insufficient_quota" else None
    return error_class(status_code)(
        message,
        status_code=status_code,
        code=code,
        request_id=request_id,
        retryable=retryable,
        retry_after=retry_after,
        param=param,
        body=kept,
    )


def _status_of(err: Mapping[str, object]) -> int | None:
    for key in ("status_code", "status", "code"):
        value = err.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
            return value
        if isinstance(value, str) and value.isdigit() and 100 <= int(value) < 600:
            return int(value)
    for key in ("code", "type"):
        value = err.get(key)
        if isinstance(value, str) and value.lower() in _CODE_STATUS:
            return _CODE_STATUS[value.lower()]
    return None


def _code_of(err: Mapping[str, object]) -> str | None:
    for key in ("code", "type"):
        value = err.get(key)
        if isinstance(value, str) and value and not value.isdigit():
            return value
    return None


def error_from_frame(
    obj: Mapping[str, object], *, request_id: str | None = None, redact: Redact | None = None
) -> APIError:
    """The `APIError` for an in-band error frame: `{"error": {...}}` (OpenAI, Groq,
    OpenRouter) or vLLM's `{"object": "error", "message": ...}`."""
    err = obj.get("error")
    if isinstance(err, str):
        err = {"message": err}
    if not isinstance(err, Mapping):
        err = obj
    message = err.get("message")
    if not isinstance(message, str) or not message:
        message = "the upstream sent an error frame"
    return _make_error(message, _status_of(err), err, request_id, None, redact, obj)


def retry_after_seconds(value: str | None) -> float | None:
    """Parse `Retry-After`: delta-seconds or an HTTP date; None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from_status(
    status_code: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    reason: str = "",
    redact: Redact | None = None,
) -> APIError:
    """The `APIError` for an HTTP error status, with the upstream's message if it sent one."""
    request_id = request_id_of(headers)
    message: str | None = None
    err: Mapping[str, object] = {}
    try:
        obj = loads(body) if body else None
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict):
        inner = obj.get("error")
        if isinstance(inner, dict):
            err = inner
        elif isinstance(inner, str):
            err = {"message": inner}
        else:
            err = obj
        found = err.get("message") or obj.get("detail")
        if isinstance(found, str):
            message = found
    if message is None:
        text = body[:500].decode("utf-8", "replace").strip()
        message = text or reason or f"HTTP {status_code}"
    retry_after = retry_after_seconds(headers.get("retry-after"))
    return _make_error(message, status_code, err, request_id, retry_after, redact, obj)


def request_id_of(headers: Mapping[str, str]) -> str | None:
    for name in ("x-request-id", "request-id", "x-generation-id", "cf-ray"):
        value = headers.get(name)
        if value:
            return value
    return None
