"""The pure half of the clients, per request: the settings (`BaseClient`), request
building (`build_call` -> `Call`), which way a request goes (`engine_fits`: our engine,
`_engine/`, or httpx), what an httpx error or an HTTP status becomes, and the deadline of
a non-streaming answer. The per-stream bookkeeping is in `_stream.py`, the retry policy
in `_retry.py`.

No I/O, no sockets, no threads here: `_async_client.py` and its generated twin
`_sync_client.py` are the thin shells that send and read, and `_watchdog.py` owns the
sockets and the deadline thread (this module holds a `StreamTimer`, its interface)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.util
import json
import time
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias
from urllib.request import getproxies

import anyio
import httpx

from ._chunks import ChunkParser
from ._config import (
    DEFAULT_BASE_URL,
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_WAIT,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    UNSET,
    Timeout,
    UnsetType,
    env_api_key,
    env_base_url,
    env_engine,
)
from ._errors import error_from_frame, error_from_status, request_id_of
from ._exceptions import (
    MissingAPIKeyError,
    ProtocolError,
    StreamTimeout,
    TokenHubError,
    TransportError,
    TruncatedStreamError,
)
from ._json import Redact, loads
from ._models import ChatResult
from ._structured import OutputSpec, StructuredOutput, output_spec
from ._telemetry import ChatRecorder, current
from ._watchdog import HasSocket, StreamTimer

MessagesTypes: TypeAlias = Sequence[Mapping[str, object]]
HeaderTypes: TypeAlias = Mapping[str, str]
TimeoutTypes: TypeAlias = Timeout | float | None


ERROR_BODY_LIMIT = 64 * 1024
#: Connections per origin in a client's own pool: httpx's default limit.
ENGINE_MAX_CONNECTIONS = 100
#: The largest response head read over the engine: h11's buffer as httpcore sets it, so
#: the engine refuses no head that httpx would have read.
ENGINE_MAX_HEAD_BYTES = 100 * 1024


class Answer(Protocol):
    """What the policy reads of a response: an `httpx.Response`, or the engine's."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def reason_phrase(self) -> str: ...


def AsyncShield() -> anyio.CancelScope:
    """Cleanup must run even inside a cancelled scope (anyio cancellation is level-triggered)."""
    return anyio.CancelScope(shield=True)


def SyncShield() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


async def async_sleep(seconds: float) -> None:
    await anyio.sleep(seconds)


def sync_sleep(seconds: float) -> None:
    time.sleep(seconds)


@dataclass(slots=True)
class Call:
    """One prepared request: everything the shells need to send it, and its policies."""

    url: str
    headers: dict[str, str] = field(repr=False)  # holds the Authorization header
    body: bytes = field(repr=False)
    timeout: Timeout
    max_retries: int
    model: str
    stream: bool
    redact: Redact = field(repr=False)  # hides the client's key in what the upstream says
    messages: list[Mapping[str, object]] = field(default_factory=list)
    output: OutputSpec | None = None  # what `response_format=` asked for, if structured
    #: Its spans and metrics (`_telemetry.py`); None when telemetry is off.
    observer: ChatRecorder | None = field(default=None, repr=False)

    def httpx_timeout(self) -> httpx.Timeout:
        t = self.timeout
        # Until the response headers arrive, a socket read timeout is exact for the
        # first-token deadline (nothing else comes before the headers).
        header_wait = _min(t.first_token, t.total)
        return httpx.Timeout(connect=t.connect, read=header_wait, write=t.connect, pool=t.connect)

    def request_extensions(self) -> dict[str, object]:
        """httpx's request extensions: the timeout dict (a fresh one per request: `_start`
        loosens its read timeout). Cheaper than passing `timeout=` to `build_request`."""
        as_dict = _TIMEOUT_DICTS.get(self.timeout)
        if as_dict is None:
            as_dict = _TIMEOUT_DICTS[self.timeout] = self.httpx_timeout().as_dict()
            if len(_TIMEOUT_DICTS) > 64:  # many per-call timeouts: keep the cache small
                _TIMEOUT_DICTS.clear()
        return {"timeout": dict(as_dict)}

    def engine_timeout(self) -> httpx.Timeout:
        """`httpx_timeout()` for the engine's `send(timeout=)`: connect and pool limits,
        and the wait for the response head (made once per `Timeout`)."""
        found = _ENGINE_TIMEOUTS.get(self.timeout)
        if found is None:
            if len(_ENGINE_TIMEOUTS) > 64:  # many per-call timeouts: keep the cache small
                _ENGINE_TIMEOUTS.clear()
            found = _ENGINE_TIMEOUTS[self.timeout] = self.httpx_timeout()
        return found


_TIMEOUT_DICTS: dict[Timeout, dict[str, float | None]] = {}
_ENGINE_TIMEOUTS: dict[Timeout, httpx.Timeout] = {}


def _min(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def loosen_read_timeout(response: httpx.Response, *seconds: float | None) -> None:
    """Loosen the read timeout of `response`'s body to the longest of `seconds` (None if
    any is None): a backstop only, as the watchdog enforces the exact deadlines. httpcore
    reads it when the body starts, so this must run before the first read."""
    timeouts = response.request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = None if None in seconds else max(s for s in seconds if s is not None)


def redactor(secret: str | None) -> Redact:
    def redact(text: str) -> str:
        if secret and secret in text:
            text = text.replace(secret, "***")
        return text

    return redact


class BaseClient:
    """Configuration shared by `Client` and `AsyncClient` (no I/O)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT,
        include_usage: bool = False,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        strict_utf8: bool = False,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        headers: HeaderTypes | None = None,
        strict_schemas: bool = True,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._api_key = api_key if api_key is not None else env_api_key()
        self.base_url = (base_url or env_base_url() or DEFAULT_BASE_URL).rstrip("/")
        self.model = model
        self.timeout = Timeout.coerce(timeout)
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.include_usage = include_usage
        self.max_event_bytes = max_event_bytes
        self.strict_utf8 = strict_utf8
        self.drain_timeout = drain_timeout
        self.headers = dict(headers or {})
        self.strict_schemas = strict_schemas
        self._redact = redactor(self._api_key)
        self._last_url: tuple[str, httpx.URL] | None = None
        # A call's headers -> their lines for the engine (`_engine_headers`). They hold
        # the key: kept here only, never shown (the repr shows the base URL alone).
        self._engine_lines: dict[tuple[tuple[str, str], ...], bytes] = {}

    def _httpx_url(self, url: str) -> httpx.URL:
        """`url` parsed once: every request of a client goes to the same endpoint."""
        last = self._last_url
        if last is None or last[0] != url:
            last = self._last_url = (url, httpx.URL(url))
        return last[1]

    def _engine_headers(self, call: Call) -> Mapping[str, str] | bytes:
        """What the engine is given as `call`'s headers (`engine_headers`): their lines,
        encoded once per set of headers (a client sends the same ones on every request:
        1.1 of 1.5 µs per request saved), or the mapping itself when a header cannot be
        sent (the engine then raises as it always did)."""
        key = tuple(call.headers.items())
        lines = self._engine_lines.get(key)
        if lines is not None:
            return lines
        from ._engine._h1 import header_lines

        headers = engine_headers(call)
        try:
            lines = header_lines(headers)
        except httpx.LocalProtocolError:
            return headers
        if len(self._engine_lines) >= 16:  # many per-call headers: keep the cache small
            self._engine_lines.clear()
        self._engine_lines[key] = lines
        return lines

    def __repr__(self) -> str:
        return f"<{type(self).__name__} base_url={self.base_url!r}>"


def build_call(
    client: BaseClient,
    messages: MessagesTypes,
    model: str | UnsetType,
    params: Mapping[str, object],
    *,
    stream: bool,
    timeout: TimeoutTypes | UnsetType,
    max_retries: int | UnsetType,
    include_usage: bool | UnsetType,
    extra_headers: HeaderTypes | None,
    response_format: object = None,
) -> Call:
    """Prepare one request (`response_format`: see `_structured.py`).

    Raises:
        TypeError: `stream` in `params`, messages not a list, a `response_format` that
            cannot be sent (see `output_spec`).
        ImportError: a type as `response_format` and no pydantic.
        MissingAPIKeyError: the default URL and no key.
    """
    if "stream" in params:
        raise TypeError("'stream' is set by the client: use stream_chat() to stream, chat() not to")
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} mappings")
    if client._api_key is None and client.base_url == DEFAULT_BASE_URL:
        raise MissingAPIKeyError(
            "no API key for the token-hub gateway: pass api_key=... or set TOKENHUB_KEY "
            "(local OpenAI-compatible servers need none: set base_url or TOKENHUB_BASE_URL)"
        )
    model_name = client.model if model is UNSET else model
    body: dict[str, object] = {"model": model_name, "messages": list(messages)}
    body["stream"] = stream
    body.update(params)
    output = None
    if response_format is not None:
        output = output_spec(response_format)
        body["response_format"] = output.request(client.strict_schemas)
    if include_usage is UNSET:
        include_usage = client.include_usage
    if stream and include_usage:
        options = params.get("stream_options")
        merged = dict(options) if isinstance(options, Mapping) else {}
        merged["include_usage"] = True
        body["stream_options"] = merged
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
    }
    if stream:
        headers["Accept-Encoding"] = "identity"
    if client._api_key:
        headers["Authorization"] = f"Bearer {client._api_key}"
    headers.update(client.headers)
    if extra_headers:
        headers.update(extra_headers)
    url = client.base_url + "/chat/completions"
    telemetry = current()  # None when off: the one check per request
    observer = None
    if telemetry is not None:
        observer = telemetry.chat(
            model=model_name, params=body, url=url, messages=messages, stream=stream
        )
    return Call(
        url=url,
        headers=headers,
        body=_encode_body(body),
        timeout=client.timeout if timeout is UNSET else Timeout.coerce(timeout),
        max_retries=client.max_retries if max_retries is UNSET else max_retries,
        model=model_name,
        stream=stream,
        redact=client._redact,
        messages=list(messages),
        output=output if output is not None and output.structured else None,
        observer=observer,
    )


# allow_nan=False, as httpx's json=: NaN and Infinity are not JSON (ValueError). Made
# once: `json.dumps` with any option builds an encoder per call (0.6 µs of 2.2).
_BODY_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _direct_encoder() -> Callable[[dict[str, object]], str] | None:
    """What `_BODY_ENCODER.encode` does with a dict, less its set-up in Python per call
    (0.3 of its 1.5 µs): the C encoder it makes, made here directly, with a fresh
    `markers` dict per call as `encode` makes (a circular body stays a ValueError). None
    where there is no C encoder, or where it does not encode as `_BODY_ENCODER` does."""
    try:
        from _json import make_encoder
    except ImportError:
        return None
    from json.encoder import encode_basestring_ascii

    def encode(body: dict[str, object]) -> str:
        make = make_encoder(
            {}, _BODY_ENCODER.default, encode_basestring_ascii, None, ":", ",", False, False, False
        )
        return "".join(make(body, 0))

    sample: dict[str, object] = {"a": [1, 2.5, None, True, "é\n\u2028"], "b": {"c": -0.0}}
    try:
        if encode(sample) == _BODY_ENCODER.encode(sample):
            return encode
    except Exception:  # a C encoder that is not the one json uses
        pass
    return None


_ENCODE_DIRECT = _direct_encoder()


def _encode_body(body: dict[str, object]) -> bytes:
    """`body` as JSON bytes, as `_BODY_ENCODER` encodes it (ValueError for NaN, infinities
    and circular references, TypeError for what JSON cannot hold)."""
    encode = _ENCODE_DIRECT
    text = _BODY_ENCODER.encode(body) if encode is None else encode(body)
    return text.encode()


def parsed_result(call: Call, result: ChatResult) -> ChatResult:
    """`chat()`'s result, with the validated structured output in `parsed` when the call
    has a `response_format`.

    Raises:
        OutputRefusedError: the model refused (`message.refusal`).
        OutputValidationError, IncompleteOutputError: a bad structured output.
    """
    if call.output is None:
        return result
    message = result.message
    output = StructuredOutput(call.output)
    value = output.finish_text(message.content, message.finish_reason, message.refusal)
    return dataclasses.replace(result, parsed=value)


def answered(call: Call, response: Answer) -> bool:
    """Whether `response` is the answer `call` waits for: a 2xx, and an event stream when
    it streams (anything else becomes an error: `status_error`)."""
    return response.status_code < 300 and (not call.stream or is_event_stream(response))


def send_error(exc: Exception, call: Call) -> TokenHubError:
    """Translate an httpx error raised before the response headers arrived."""
    t = call.timeout
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        error: TokenHubError = StreamTimeout("connect", t.connect)
    elif isinstance(exc, httpx.TimeoutException):
        is_total = t.total is not None and t.total == call.httpx_timeout().read
        error = StreamTimeout(*(("total", t.total) if is_total else ("first_token", t.first_token)))
    elif isinstance(exc, httpx.ConnectError):
        error = TransportError(f"could not connect to the upstream: {exc}", retryable=True)
    else:
        error = TransportError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def status_error(call: Call, response: Answer, body: bytes) -> TokenHubError:
    """The error for an HTTP error status, or for a 2xx that is not an event stream
    (`body`: the start of the response's body)."""
    headers = response.headers
    if response.status_code >= 300:
        return error_from_status(
            response.status_code, body, headers, reason=response.reason_phrase, redact=call.redact
        )
    try:
        obj = loads(body)
    except (ValueError, RecursionError):
        obj = None
    if isinstance(obj, dict) and ("error" in obj or obj.get("object") == "error"):
        return error_from_frame(obj, request_id=request_id_of(headers), redact=call.redact)
    ctype = headers.get("content-type", "(none)")
    return ProtocolError(f"expected a text/event-stream response, got {ctype}")


def direct_transport_ok(base_url: str) -> bool:
    """Whether a client that makes its own pool may send straight to its transport.

    httpx's `Client.send()` adds, per request: the auth flow (nothing here but basic auth
    from a URL's user:password), redirects (not followed by default), cookies (parsed
    through `http.cookiejar`: ~35 µs), event hooks (none on our own client), proxies from
    the environment, the `elapsed` timer and a log line: together ~0.13 ms of a ~1 ms
    request (docs/performance.md). Sending through the transport (httpx's public transport
    API) skips them; only when nothing of that could apply: no proxy configured in the
    environment (the same `getproxies()` httpx reads) and no user:password in the URL.
    """
    return not getproxies() and not httpx.URL(base_url).userinfo


def engine_fits(base_url: str) -> bool:
    """Whether a client that makes its own pool sends over our engine (`_engine/`: HTTP/1.1
    on httptools) rather than httpx: unless `TOKENHUB_STREAM_ENGINE=httpx`, or something
    only httpx does applies (a proxy from the environment, credentials in the URL: see
    `direct_transport_ok`), or httptools is missing. A client given an `http_client`
    uses it; the async client under trio uses httpx too (`engine_runs_async`).

    Raises:
        ValueError: `TOKENHUB_STREAM_ENGINE` is neither "auto" nor "httpx".
    """
    if env_engine() == "httpx" or not _has_httptools():
        return False
    return httpx.URL(base_url).scheme in ("http", "https") and direct_transport_ok(base_url)


@functools.cache
def _has_httptools() -> bool:
    return importlib.util.find_spec("httptools") is not None


def engine_runs_async() -> bool:
    """The asyncio engine can send from here: the running event loop is asyncio's (under
    trio there is none)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def engine_runs_sync() -> bool:
    """The blocking engine sends from any thread."""
    return True


@functools.cache
def httpx_default_headers() -> Mapping[str, str]:
    """The headers an httpx client sends by default (Accept, Accept-Encoding, Connection,
    User-Agent), lower-case names: the engine sends them too, so a request is the same
    whichever way it goes."""
    client = httpx.Client(transport=httpx.MockTransport(_unused), trust_env=False)
    headers = {name.lower(): value for name, value in client.headers.items()}
    client.close()
    return headers


def _unused(request: httpx.Request) -> httpx.Response:
    raise AssertionError("never sent")


def engine_headers(call: Call) -> dict[str, str]:
    """The headers sent for `call` over the engine: httpx's defaults with the call's over
    them (lower-case names), as `direct_request` makes them for httpx; the engine adds
    Host and Content-Length."""
    headers = dict(httpx_default_headers())
    for name, value in call.headers.items():
        headers[name.lower()] = value
    return headers


def direct_request(url: httpx.URL, call: Call, defaults: Mapping[str, str]) -> httpx.Request:
    """The request `Client.build_request` would make: the pool client's default headers
    (`defaults`, lower-case names) overridden by the call's."""
    headers = dict(defaults)
    for name, value in call.headers.items():
        headers[name.lower()] = value
    return httpx.Request(
        "POST", url, content=call.body, headers=headers, extensions=call.request_extensions()
    )


class CompletionDeadline:
    """The deadline of a non-streaming `chat()`: the whole answer must arrive within
    `first_token` (the answer is its first token), and within `total` when set. Blank-line
    keep-alives (DeepSeek sends them on non-streaming requests) reset neither."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self.sent_at = time.monotonic()
        self._timer: StreamTimer | None = None

    def restart(self) -> None:
        """The request is sent (again): the deadlines count from now."""
        self.sent_at = time.monotonic()
        observer = self._call.observer
        if observer is not None:
            observer.sending(self._call.headers)

    def watch(self, response: httpx.Response | HasSocket) -> None:
        t = self._call.timeout
        if isinstance(response, httpx.Response):
            loosen_read_timeout(response, t.first_token, t.total)
        parser = ChunkParser(started_at=self.sent_at)
        self._timer = StreamTimer(parser, first_token=t.first_token, idle=None)
        total = None if t.total is None else self.sent_at + t.total
        self._timer.watch(response, total)

    def error(self, exc: Exception) -> TokenHubError:
        """Translate an httpx error raised while reading the body."""
        self.stop()
        fired = self._timer.fired if self._timer is not None else None
        t = self._call.timeout
        timeout = None
        if fired in ("first_token", "total") or isinstance(exc, httpx.TimeoutException):
            timeout = (
                StreamTimeout("total", t.total)
                if fired == "total"
                else StreamTimeout("first_token", t.first_token)
            )
        return read_error(exc, "response", timeout)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()


def read_error(exc: Exception, what: str, timeout: StreamTimeout | None) -> TokenHubError:
    """Translate an httpx error raised while reading a body (`what`: "response" or
    "stream"); `timeout` is what the error means when a deadline caused it."""
    if timeout is not None:
        error: TokenHubError = timeout
    elif isinstance(exc, httpx.RemoteProtocolError):
        error = TruncatedStreamError(f"the upstream closed the {what} mid-way: {exc}")
    else:
        error = TransportError(f"reading the {what} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def generator_done(generator: object) -> bool:
    """True for a generator, sync or async, that ran to its end or was closed (closing
    it again would do nothing)."""
    return getattr(generator, "ag_frame", 0) is None or getattr(generator, "gi_frame", 0) is None


def is_event_stream(response: Answer) -> bool:
    ctype = response.headers.get("content-type")
    return ctype is None or "event-stream" in ctype


def raw_chunks(response: httpx.Response) -> AsyncIterable[bytes] | Iterable[bytes] | None:
    """The body's chunks as they come off the connection, or None when httpx must decode
    them (the upstream compressed despite `identity`, or a mock has already read them).

    `response.stream` is the transport's byte stream (public in httpx's transport API);
    reading it directly skips `aiter_raw()`'s extra generator layer per chunk. The shells
    close the response themselves, as `aiter_raw()` would.
    """
    if not wants_raw(response):
        return None
    return response.stream


def wants_raw(response: httpx.Response) -> bool:
    """Read raw bytes unless the upstream compressed the body despite `identity`
    (or a mock transport has already read it)."""
    if response.is_stream_consumed:
        return False
    return not is_encoded(response.headers)


def is_encoded(headers: Mapping[str, str]) -> bool:
    """Whether the body is compressed (a Content-Encoding other than identity): httpx
    then decodes it (the engine passes bodies as they come)."""
    encoding = headers.get("content-encoding")
    return encoding is not None and encoding.strip().lower() not in ("", "identity")
