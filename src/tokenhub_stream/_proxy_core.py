"""Sans-I/O pieces of the ASGI proxy: event boundaries, request validation, origin checks.

Nothing here awaits; `asgi.py` is the I/O shell around it.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from ._chunks import redact_json
from ._config import DEFAULT_MAX_EVENT_BYTES
from ._exceptions import ProtocolError

__all__: list[str] = []

# OpenAI chat-completions request parameters that may reach the upstream. Anything else the
# browser sends is dropped (after `on_request`), so a page cannot set provider-specific knobs
# the server owner did not choose to expose.
DEFAULT_ALLOWED_FIELDS: frozenset[str] = frozenset(
    {
        "audio",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "reasoning_effort",
        "response_format",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
    }
)

_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")

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


# --- what the upstream may answer (issue #14) ------------------------------------------------

#: The largest upstream response head (status line and headers, interim 1xx heads included)
#: the proxy reads: h11's default limit for an incomplete event; nginx's proxy buffer is 4-8 KiB.
DEFAULT_MAX_RESPONSE_HEAD_BYTES = 16 * 1024


class ResponseHeadTooLarge(httpx.RemoteProtocolError):
    """The upstream's response head went past `max_response_head_bytes` (issue #14)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upstream's response head exceeds {limit} bytes")
        self.limit = limit


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
_BOUNDARY = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")


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
        for match in _BOUNDARY.finditer(scan, 0, end):
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


# --- content type ---------------------------------------------------------------------------


def parse_content_type(value: str | None) -> str:
    """Return the charset to decode the body with, or raise a 415 rejection.

    Browsers label `fetch(url, {body: JSON.stringify(...)})` as `text/plain;charset=UTF-8`,
    so that is accepted next to `application/json`.
    """
    if not value:
        return "utf-8"
    media, _, params = value.partition(";")
    media = media.strip().lower()
    if media not in ("application/json", "text/plain"):
        raise ProxyRejection(
            415,
            f"Unsupported content type {media!r}: send application/json or text/plain.",
            code="unsupported_media_type",
        )
    charset = "utf-8"
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "charset":
            charset = val.strip().strip('"').lower() or "utf-8"
    return charset


def parse_body(raw: bytes, charset: str) -> dict[str, object]:
    try:
        text = raw.decode(charset)
    except (LookupError, UnicodeDecodeError):
        raise ProxyRejection(
            400, "The request body is not valid text.", code="invalid_body"
        ) from None
    try:
        # NaN and Infinity are Python's extension, not JSON: the upstream would refuse them.
        body = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
        raise ProxyRejection(
            400, "The request body is not valid JSON.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ProxyRejection(400, "The request body must be a JSON object.", code="invalid_body")
    return body


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def validate_body(
    body: dict[str, object],
    *,
    default_model: str,
    allowed_models: Collection[str] | None,
    max_tokens_cap: int | None,
) -> tuple[dict[str, object], bool]:
    """Check the browser's body and return (body with model and clamps applied, stream)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProxyRejection(
            400, "'messages' must be a non-empty list.", code="invalid_messages", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ProxyRejection(
                400,
                f"messages[{i}] must be an object with a string 'role'.",
                code="invalid_messages",
                param=f"messages[{i}]",
            )
    out = dict(body)
    model = body.get("model")
    if model is None or model == "":
        model = default_model
    if not isinstance(model, str):
        raise ProxyRejection(400, "'model' must be a string.", code="invalid_model", param="model")
    if allowed_models is not None and model not in allowed_models:
        raise ProxyRejection(
            400,
            f"The model {model!r} is not available here.",
            code="model_not_allowed",
            param="model",
        )
    out["model"] = model
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise ProxyRejection(
            400, "'stream' must be a boolean.", code="invalid_stream", param="stream"
        )
    for field in _TOKEN_FIELDS:
        if field not in body or body[field] is None:
            continue
        value = body[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProxyRejection(
                400, f"'{field}' must be a non-negative integer.", code="invalid_value", param=field
            )
        if max_tokens_cap is not None and value > max_tokens_cap:
            out[field] = max_tokens_cap
    return out, stream


# One encoder, not one per json.dumps() call with these options (~4 us per request).
_ENCODE_BODY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def outgoing_body(body: Mapping[str, object], allowed: Collection[str], stream: bool) -> bytes:
    out = {k: v for k, v in body.items() if k in allowed}
    out["stream"] = stream
    if not stream:
        # OpenAI rejects stream_options on a non-streaming request.
        out.pop("stream_options", None)
    try:
        return _ENCODE_BODY(out).encode()
    except UnicodeEncodeError:  # a lone surrogate escape such as "\\ud800" parses, but is no text
        raise ProxyRejection(
            400, "The request body contains invalid Unicode.", code="invalid_body"
        ) from None
    except ValueError:  # 1e999 parses as infinity, which JSON cannot carry
        raise ProxyRejection(
            400, "The request body contains a number out of range.", code="invalid_body"
        ) from None


# --- origin checks --------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def is_trusted(host: str | None, networks: tuple[Network, ...]) -> bool:
    if not host or not networks:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def normalize_origin(scheme: str, netloc: str) -> str:
    scheme = scheme.lower()
    netloc = netloc.lower()
    port = _DEFAULT_PORTS.get(scheme)
    if port and netloc.endswith(":" + port):
        netloc = netloc[: -len(port) - 1]
    return f"{scheme}://{netloc}"


def origin_of(value: str) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return normalize_origin(parts.scheme, parts.netloc)


def check_origin(
    headers: Mapping[str, str],
    *,
    own_host: str | None,
    allowed_origins: frozenset[str] | None,
) -> None:
    """Refuse cross-site browser requests (403); requests with neither header pass.

    `text/plain` POSTs need no CORS preflight, so without this check any page could spend the
    owner's tokens through a visitor's logged-in browser.
    """
    if headers.get("sec-fetch-site", "").lower() == "cross-site":
        raise ProxyRejection(403, "Cross-site requests are not allowed.", code="cross_site")
    origin_header = headers.get("origin")
    if origin_header is None:
        return
    origin = origin_of(origin_header)
    if origin is None:
        raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")
    if allowed_origins is not None:
        if "*" in allowed_origins or origin in allowed_origins:
            return
        raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")
    if own_host is None:
        raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")
    # The own host is compared without the scheme: behind a TLS-terminating proxy that is not
    # in `trusted_proxies` the ASGI scheme says http while the page is https. A Host header
    # carries a port only when it is not the default for the scheme the browser used.
    own = own_host.lower()
    if own.endswith((":80", ":443")):
        own = own.rsplit(":", 1)[0]
    if origin.split("://", 1)[1] == own:
        return
    raise ProxyRejection(403, "This origin is not allowed.", code="origin_not_allowed")


# --- host checks ----------------------------------------------------------------------------

#: An `allowed_hosts` entry: a name (`example.com`, `127.0.0.1`, `[::1]`), `.suffix` for
#: `*.suffix`, or `*`; and the one port it allows (`None`: any).
HostPattern = tuple[str, int | None]


def split_host(value: str) -> tuple[str, int | None] | None:
    """A `Host` value as `(name, port)`: lowercased, IPv6 in brackets; `None` if malformed."""
    text = value.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        try:
            name = f"[{ipaddress.IPv6Address(text[1:end])}]"
        except ValueError:
            return None
        rest = text[end + 1 :]
    else:
        name, colon, port = text.partition(":")
        rest = colon + port
        # `localhost.` is the fully qualified form of the same name.
        name = name[:-1] if name.endswith(".") else name
    if not name:
        return None
    if not rest:
        return name, None
    digits = rest[1:]
    if rest[0] != ":" or not (digits.isascii() and digits.isdigit()) or len(digits) > 5:
        return None
    return name, int(digits)


def parse_allowed_hosts(values: Iterable[str]) -> tuple[HostPattern, ...]:
    """`allowed_hosts` as patterns; raises `ValueError` on an entry that is no host name."""
    if isinstance(values, str):
        raise ValueError("allowed_hosts must be a collection of host names, not one string")
    patterns: list[HostPattern] = []
    for value in values:
        text = value.strip().lower()
        if text == "*":
            patterns.append(("*", None))
            continue
        try:  # a bare IPv6 address, as `--host ::1` gives it
            text = f"[{ipaddress.IPv6Address(text)}]"
        except ValueError:
            pass
        wildcard = text.startswith("*.")
        parsed = split_host(text[2:] if wildcard else text)
        if parsed is None or "*" in parsed[0] or "/" in parsed[0]:
            raise ValueError(f"not a host name for allowed_hosts: {value!r}")
        name, port = parsed
        patterns.append(("." + name if wildcard else name, port))
    return tuple(patterns)


def check_host(value: str | None, patterns: tuple[HostPattern, ...]) -> None:
    """Refuse (400) a request whose host is not one of `patterns`: the DNS-rebinding guard.

    A page on `evil.example` whose name the attacker re-points at the server's address
    reaches it with `Host: evil.example`; the same-origin check alone, which compares
    `Origin` with that very host, would let it through.
    """
    parsed = None if value is None else split_host(value)
    if parsed is not None:
        name, port = parsed
        for pattern, allowed_port in patterns:
            if allowed_port is not None and allowed_port != port:
                continue
            if pattern in ("*", name) or (pattern[0] == "." and name.endswith(pattern)):
                return
    raise ProxyRejection(400, "This host is not allowed.", code="host_not_allowed")


def first_forwarded(value: str | None) -> str | None:
    if not value:
        return None
    first = value.split(",", 1)[0].strip()
    return first or None


def client_address(
    peer: str | None, forwarded_for: str | None, networks: tuple[Network, ...]
) -> str | None:
    """The client address, walking X-Forwarded-For right to left past trusted proxies."""
    if not is_trusted(peer, networks) or not forwarded_for:
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, networks):
            return hop
    return hops[0] if hops else peer


# --- rate limiting --------------------------------------------------------------------------


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBucket:
    """Per-key token buckets in memory (sans-I/O; `now` is passed in for tests)."""

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return max(1.0, math.ceil((1.0 - bucket.tokens) / self.rate))
