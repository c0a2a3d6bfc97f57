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
# Fields that multiply the answer: `n` choices, and vLLM's `best_of` candidates (billed
# though not returned). Not multipliers: `logprobs`/`top_logprobs` (bigger frames, the same
# tokens), `audio`/`modalities` and `reasoning_effort` (output tokens, bounded by the token
# limit), `prediction` (its rejected tokens count as output too, bounded the same way).
_CHOICE_FIELDS = ("n", "best_of")

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
    """Return the charset to decode the body with (always UTF-8), or raise a 415 rejection.

    Browsers label `fetch(url, {body: JSON.stringify(...)})` as `text/plain;charset=UTF-8`,
    so that is accepted next to `application/json`. A charset other than UTF-8 is a 415.
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
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
            # UTF-8 only (RFC 8259 section 8.1): a body in UTF-7 or UTF-16 reads differently
            # to a filter in front of the app than to the upstream (issue 14).
            if charset not in ("", "utf-8", "utf8"):
                raise ProxyRejection(
                    415,
                    f"Unsupported charset {charset[:40]!r}: send the body as UTF-8.",
                    code="unsupported_charset",
                )
    return "utf-8"


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
    choices = body.get("n")
    if choices is not None and (
        isinstance(choices, bool) or not isinstance(choices, int) or choices < 1
    ):
        # A lenient upstream (pydantic in lax mode) would read "128" as 128.
        raise ProxyRejection(
            400, "'n' must be a positive integer.", code="invalid_value", param="n"
        )
    return out, stream


# One encoder, not one per json.dumps() call with these options (~4 us per request).
_ENCODE_BODY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


@dataclass(frozen=True, slots=True)
class OutputCaps:
    """The bounds every forwarded body is brought within, applied last (after `on_request`
    and the allow-list), so that they hold whatever the browser or a hook wrote."""

    max_tokens: int | None = None
    max_tokens_field: str = "max_tokens"
    max_choices: int = 1


def apply_caps(out: dict[str, object], caps: OutputCaps) -> None:
    """Clamp the output limits of `out` in place.

    With a token cap, each of `max_tokens` / `max_completion_tokens` that is present gets
    clamped to it, a `null` one is dropped, and when neither is left `max_tokens_field` is
    set to the cap: the upstream's default (often the model's whole context) never
    applies. A value that is not an integer from 0 to the cap (only `on_request` can
    produce one: the browser's gets a 400 first) becomes the cap. `n` and `best_of` above
    `max_choices`, or not positive integers, become `max_choices`; a `null` is dropped.
    """
    cap = caps.max_tokens
    if cap is not None:
        limited = False
        for field in _TOKEN_FIELDS:
            if field not in out:
                continue
            value = out[field]
            if value is None:
                del out[field]
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= cap:
                out[field] = cap
            limited = True
        if not limited:
            out[caps.max_tokens_field] = cap
    most = caps.max_choices
    for field in _CHOICE_FIELDS:
        if field not in out:
            continue
        value = out[field]
        if value is None:
            del out[field]
        elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            out[field] = most


def outgoing_body(
    body: Mapping[str, object],
    allowed: Collection[str],
    stream: bool,
    *,
    caps: OutputCaps | None = None,
    include_usage: bool = False,
) -> bytes:
    """The upstream request body: the allow-listed fields, `stream`, then the caps.

    `include_usage` (streams only) sets `stream_options.include_usage`, keeping the other
    stream options: a `UsageLimiter` needs the turn's usage.
    """
    out = {k: v for k, v in body.items() if k in allowed}
    out["stream"] = stream
    if not stream:
        # OpenAI rejects stream_options on a non-streaming request.
        out.pop("stream_options", None)
    elif include_usage:
        options = out.get("stream_options")
        merged = dict(options) if isinstance(options, Mapping) else {}
        merged["include_usage"] = True
        out["stream_options"] = merged
    if caps is not None:
        apply_caps(out, caps)
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


# --- the upstream key -----------------------------------------------------------------------


def check_api_key(api_key: str) -> None:
    """Refuse a key that cannot be a header value as it stands (a `ValueError`).

    A key read from a file or an environment variable often keeps its trailing newline;
    sent as is, the request fails far from the cause ("could not reach the upstream").
    The message never repeats the key.
    """
    if not all(0x21 <= ord(c) <= 0x7E for c in api_key):
        raise ValueError(
            "api_key contains whitespace, a control character or a non-ASCII character "
            "(a trailing newline from a file or an environment variable?): strip it"
        )


REDACTED = b"[redacted]"

# Keys this long are matched in their variant forms too; shorter ones are placeholders
# such as "EMPTY" for a local server, where a case-blind match would eat ordinary words.
_MIN_VARIANT_KEY = 16
# The length of the two anchors searched for in every write. It bounds what a cut key can
# leak (15 characters); CPython's `in` prepares its needle on every call, so on the usual
# 200-300-byte event two 16-byte searches cost about as much as two searches for the key.
_ANCHOR = 16
# The rest of a key cut across two writes is looked for only from this length: a shorter
# rest leaks too little to matter and would match by chance.
_MIN_REST = 4
# ... in the next few writes: a keep-alive comment or an Azure filter frame may come between
# the two pieces.
_REST_WRITES = 4
_SHORT_ESCAPES = frozenset(b'"\\/')


def _form(c: int) -> bytes:
    # One key character as JSON may carry it: itself in either case, \u00XX (hex digits
    # in either case), or a two-character escape for " \ and /.
    char = bytes([c])
    forms = [b"[" + char.lower() + char.upper() + b"]" if char.isalpha() else re.escape(char)]
    digits = b"".join(
        b"[" + d.lower() + d.upper() + b"]" if d.isalpha() else d
        for d in (bytes([x]) for x in b"%02x" % c)
    )
    forms.append(rb"\\u00" + digits)
    if c in _SHORT_ESCAPES:
        forms.append(re.escape(b"\\" + char))
    return b"(?:" + b"|".join(forms) + b")"


def _forms(part: bytes) -> bytes:
    return b"".join(_form(c) for c in part)


class KeyRedactor:
    """The forms of the upstream key to take out of what the proxy relays (one per proxy).

    `redactor(data)` redacts a whole body; `redactor.stream()` gives the redactor of one
    stream, which also catches a key cut across two of its writes. Each find becomes
    `[redacted]`; nothing is ever held back.

    A key of 16 characters or more is found in any mix of letter case and with any of its
    characters JSON-escaped (`\\u002d`, `\\u002D`, `\\/`). Each write is searched for two
    anchors, the first 16 characters of the key and the 16 from its middle, in those
    forms; a find is widened to the whole run of key characters around it. So a key cut in
    two (a model or gateway streaming it as two deltas) is caught: if the first piece holds
    the first anchor, it is redacted and the next 4 writes are searched for the rest (when
    4 characters or more remain); otherwise the second piece holds the middle anchor and is
    redacted, and the browser has seen at most the first 15 characters. Not caught: a
    key cut in more pieces of which none holds an anchor (a model spelling it out token by
    token), other encodings (base64, hex, URL or HTML escapes) and a reversed key. A
    shorter key (a placeholder such as `EMPTY`) is matched as its exact bytes only.

    A write with no key in sight costs a lower-cased copy, two 16-byte substring searches
    and a search for a backslash.
    """

    __slots__ = ("_anchors", "_codes", "_exact", "_find", "_key", "_rests", "_short", "_starts")

    def __init__(self, key: str) -> None:
        raw = key.encode()
        self._key = raw
        self._exact = len(raw) < _MIN_VARIANT_KEY
        middle = len(raw) // 2
        size = min(_ANCHOR, middle)
        self._starts = (0, middle)
        self._anchors = (raw[:size].lower(), raw[middle : middle + size].lower())
        self._find = re.compile(
            b"(?P<a>"
            + _forms(raw[:size])
            + b")|(?P<b>"
            + _forms(raw[middle : middle + size])
            + b")"
        )
        # The hex of the key's own characters (lower-cased, as in the lower-cased copy
        # searched): other escapes (non-ASCII text, Go's \u003c) pass.
        self._codes = frozenset(b"%02x" % c for c in raw)
        # \/ \" \\ of the key's own characters: only a key holding one of them (base64
        # keys hold "/") pays for this check.
        self._short = tuple(bytes((0x5C, c)) for c in sorted(set(raw) & _SHORT_ESCAPES))
        self._rests: dict[int, re.Pattern[bytes]] = {}

    def __repr__(self) -> str:
        return "KeyRedactor()"  # never the key

    def __call__(self, data: bytes) -> bytes:
        return self._redact(data)[0]

    def stream(self) -> StreamRedactor:
        return StreamRedactor(self)

    def _redact(self, data: bytes) -> tuple[bytes, int]:
        # (redacted data, where in the key a run it ended with stops, else 0).
        if self._exact:
            key = self._key
            return (data.replace(key, REDACTED) if key in data else data), 0
        low = data.lower()
        first, second = self._anchors
        if first in low or second in low or (b"\\" in low and self._escaped(low)):
            return self._scan(data)
        return data, 0

    def _escaped(self, low: bytes) -> bool:
        # A \u00XX escape of one of the key's characters (a loop of finds: cheaper than a
        # regex call for the one or two escapes an event holds), or \/ \" \\ of one.
        find, codes = low.find, self._codes
        at = find(b"\\u00")
        while at >= 0:
            if low[at + 4 : at + 6] in codes:
                return True
            at = find(b"\\u00", at + 4)
        return bool(self._short) and any(s in low for s in self._short)

    def _scan(self, data: bytes) -> tuple[bytes, int]:
        key = self._key
        spans: list[tuple[int, int]] = []
        pending = 0
        size = len(self._anchors[0])
        for match in self._find.finditer(data):
            first = self._starts[0 if match.lastgroup == "a" else 1]
            start, i = match.start(), first
            while i > 0:
                n = _form_before(data, start, key[i - 1])
                if not n:
                    break
                start, i = start - n, i - 1
            end, j = match.end(), first + size
            while j < len(key):
                n = _form_at(data, end, key[j])
                if not n:
                    break
                end, j = end + n, j + 1
            spans.append((start, end))
            pending = j if j < len(key) else 0
        if not spans:
            return data, 0
        return _cut(data, spans), pending

    def _rest(self, data: bytes, done: int) -> bytes | None:
        # A write after one that ended with a run up to key[done]: take out the first
        # key[done:] (a cut key's second piece). None: not in this write.
        rest = self._key[done:]
        if len(rest) < _MIN_REST:
            return data
        pattern = self._rests.get(done)
        if pattern is None:
            pattern = self._rests[done] = re.compile(_forms(rest))
        match = pattern.search(data)
        if match is None:
            return None
        return _cut(data, [match.span()])


class StreamRedactor:
    """`KeyRedactor` for one stream: `feed(write) -> write`, never holding bytes back."""

    __slots__ = ("_first", "_left", "_pending", "_second", "_shared")

    def __init__(self, shared: KeyRedactor) -> None:
        self._shared = shared
        self._pending = 0  # where in the key a run a recent write ended with stops
        self._left = 0  # the writes still searched for the rest of that run
        # KeyRedactor._redact inlined (one call less per write); b"" for a short key.
        self._first, self._second = (b"", b"") if shared._exact else shared._anchors

    def feed(self, data: bytes) -> bytes:
        shared = self._shared
        if self._pending:
            cut = shared._rest(data, self._pending)
            self._left -= 1
            if cut is not None or not self._left:
                self._pending = 0
            if cut is not None:
                data = cut
        first = self._first
        if not first:
            return shared._redact(data)[0]
        low = data.lower()
        if not (first in low or self._second in low):
            if b"\\" not in low:  # memchr: the common case ends here
                return data
            # JSON escapes (often \n or \"): only those of the key's characters matter.
            if not shared._escaped(low):
                return data
        data, pending = shared._scan(data)
        if pending:
            self._pending, self._left = pending, _REST_WRITES
        return data


def _form_at(data: bytes, pos: int, c: int) -> int:
    # The length of key character `c`'s form starting at `pos`, else 0. Escapes first:
    # read as raw characters, "\u0041" would end in the key characters "0041".
    if data.startswith(b"\\u00", pos) and data[pos + 4 : pos + 6].lower() == b"%02x" % c:
        return 6
    if c in _SHORT_ESCAPES and data.startswith(bytes((0x5C, c)), pos):
        return 2
    if data[pos : pos + 1].lower() == bytes([c]).lower():
        return 1
    return 0


def _form_before(data: bytes, pos: int, c: int) -> int:
    # The length of key character `c`'s form ending at `pos`, else 0.
    if (
        pos >= 6
        and data.startswith(b"\\u00", pos - 6)
        and data[pos - 2 : pos].lower() == b"%02x" % c
    ):
        return 6
    if c in _SHORT_ESCAPES and pos >= 2 and data[pos - 2 : pos] == bytes((0x5C, c)):
        return 2
    if pos >= 1 and data[pos - 1 : pos].lower() == bytes([c]).lower():
        return 1
    return 0


def _cut(data: bytes, spans: list[tuple[int, int]]) -> bytes:
    # Overlapping or touching spans (both anchors of one key) become one "[redacted]".
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    parts: list[bytes] = []
    last = 0
    for start, end in merged:
        parts.append(data[last:start])
        parts.append(REDACTED)
        last = end
    parts.append(data[last:])
    return b"".join(parts)
