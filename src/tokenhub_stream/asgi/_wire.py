"""The proxy's wire format, sans-I/O: event boundaries, error bodies and frames, and what
an upstream answer must look like. Nothing here awaits.

Internal interface of `tokenhub_stream.asgi`: every name without an underscore is used by
the package's other modules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from .._config import DEFAULT_MAX_EVENT_BYTES
from .._exceptions import ProtocolError
from .._json import redact_json

__all__: list[str] = []


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ProxyRejection(Exception):
    """A request the proxy answers itself, before anything is sent upstream.

    `upstream`, when given, is an upstream's error object (already redacted) sent as the
    `error` instead of the one built from message, type, param and code.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        upstream: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or _ERROR_TYPES.get(status, "api_error")
        self.headers = dict(headers or {})
        self.upstream = upstream


def error_body(
    message: str,
    *,
    error_type: str,
    code: str | None = None,
    param: str | None = None,
    upstream: Mapping[str, object] | None = None,
) -> bytes:
    """OpenAI's error shape, as JSON bytes; `upstream` (an upstream's error object) goes
    out as it is instead."""
    if upstream is not None:
        # UTF-8 rather than \u escapes: the upstream's text takes no more room than it did
        # in the upstream's body, which the proxy read within its cap.
        return json.dumps({"error": upstream}, separators=(",", ":"), ensure_ascii=False).encode()
    payload = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return json.dumps(payload, separators=(",", ":")).encode()


def error_frame(message: str, *, code: str, upstream: Mapping[str, object] | None = None) -> bytes:
    # An in-band error after HTTP 200 (OpenRouter and Groq send the same shape): the openai SDK
    # raises APIError on it, our client raises APIError, and no `[DONE]` follows.
    body = error_body(message, error_type="api_error", code=code, upstream=upstream)
    return b"data: " + body + b"\n\n"


def upstream_error_object(obj: object, secret: str | None) -> dict[str, object] | None:
    """The `error` object of an OpenAI-shaped error body (`{"error": {"message": "...",
    ...}}`), every string in it (object keys too) with `secret` replaced by `[redacted]`;
    None for any other shape, which the proxy answers with an error object of its own."""
    if not isinstance(obj, Mapping):
        return None
    err = obj.get("error")
    if not isinstance(err, Mapping) or not isinstance(err.get("message"), str):
        return None

    def redact(text: str) -> str:
        return text.replace(secret, "[redacted]") if secret and secret in text else text

    try:
        return redact_json(err, redact)
    except ValueError:  # nested deeper than any error needs
        return None


def is_json_answer(content_type: str | None) -> bool:
    """Whether an upstream 2xx `Content-Type` is `application/json` in UTF-8 (RFC 8259)."""
    if not content_type:
        return False
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/json":
        return False
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


def is_identity(content_encoding: str | None) -> bool:
    """Whether an upstream body is sent as is (no `Content-Encoding`, or `identity`)."""
    return content_encoding is None or content_encoding.strip().lower() in ("", "identity")


def is_length_framed(headers: Mapping[str, str], http_version: str) -> bool:
    """Whether the body's end is marked (Content-Length, chunked, HTTP/2+), not just a close."""
    if "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower():
        return True
    return http_version not in ("HTTP/1.1", "HTTP/1.0")


# Two consecutive line terminators (CRLF | CR | LF) end an event (WHATWG HTML, "Parsing an
# event stream"). The lookahead keeps a backtracking match from splitting a CRLF in two.
EVENT_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")


class EventSplitter:
    """Cut a byte stream at SSE event boundaries without decoding it.

    `feed()` returns the bytes that end at the last complete event so far and keeps the
    rest (at most one incomplete event) for later, so whatever the proxy adds to the
    stream (a keep-alive comment, an error frame) lands between two events.

    Linear in the input: an unfinished event is kept as a list of pieces joined once,
    and only the new bytes (plus the 3 before them, where a boundary can straddle) are
    scanned. An unfinished event over `max_event_bytes` raises `ProtocolError`, as the
    client does, so an upstream line that never ends cannot grow the proxy's memory.
    """

    __slots__ = ("_max", "_pieces", "_size", "_tail")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._pieces: list[bytes] = []
        self._size = 0
        self._tail = b""  # the last (up to) 3 bytes held, where a boundary may begin

    @property
    def pending(self) -> bytes:
        return b"".join(self._pieces)

    def feed(self, chunk: bytes) -> bytes:
        if not self._pieces and chunk.endswith(b"\n\n"):
            return chunk  # fast path: upstreams usually write whole events per chunk
        tail = self._tail
        scan = tail + chunk
        end = len(scan)
        # A trailing CR may be the first half of a CRLF: wait for the next byte.
        if scan.endswith(b"\r"):
            end -= 1
        cut = -1
        for match in EVENT_BOUNDARY.finditer(scan, 0, end):
            cut = match.end()
        if cut < 0:
            if chunk:
                self._pieces.append(chunk)
                self._size += len(chunk)
                self._tail = scan[-3:]
                if self._size > self._max:
                    raise ProtocolError(f"an upstream event exceeds max_event_bytes ({self._max})")
            return b""
        # Bytes of `chunk` that end the last complete event (a boundary cannot end inside
        # the tail: that would have been found by the previous scan).
        taken = max(0, cut - len(tail))
        self._pieces.append(chunk[:taken])
        out = b"".join(self._pieces)
        rest = chunk[taken:]
        self._pieces = [rest] if rest else []
        self._size = len(rest)
        self._tail = rest[-3:]
        return out

    def flush(self) -> bytes:
        rest = b"".join(self._pieces)
        self._pieces, self._size, self._tail = [], 0, b""
        return rest
