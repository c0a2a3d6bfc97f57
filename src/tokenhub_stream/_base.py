"""The pure half of the clients: request building, error mapping, retry policy and
stream bookkeeping. No I/O here; `_async_client.py` and its generated sync twin
`_sync_client.py` are the thin shells that send and read."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
import weakref
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Self, TypeAlias
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
)
from ._errors import error_from_frame, error_from_status, request_id_of
from ._exceptions import (
    MissingAPIKeyError,
    ProtocolError,
    StreamConsumed,
    StreamTimeout,
    TokenHubError,
    TransportError,
    TruncatedStreamError,
)
from ._json import Redact, loads
from ._models import ChatMessage, Outcome, Timings, ToolCall, Usage
from ._retry import Retries
from ._watchdog import StreamTimer

MessagesTypes: TypeAlias = Sequence[Mapping[str, object]]
HeaderTypes: TypeAlias = Mapping[str, str]
TimeoutTypes: TypeAlias = Timeout | float | None


ERROR_BODY_LIMIT = 64 * 1024


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


_TIMEOUT_DICTS: dict[Timeout, dict[str, float | None]] = {}


def _min(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _max(*values: float | None) -> float | None:
    if any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


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
        self._redact = redactor(self._api_key)
        self._last_url: tuple[str, httpx.URL] | None = None

    def _httpx_url(self, url: str) -> httpx.URL:
        """`url` parsed once: every request of a client goes to the same endpoint."""
        last = self._last_url
        if last is None or last[0] != url:
            last = self._last_url = (url, httpx.URL(url))
        return last[1]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} base_url={self.base_url!r}>"

    def _prepare(
        self,
        messages: MessagesTypes,
        model: str | UnsetType,
        params: Mapping[str, object],
        *,
        stream: bool,
        timeout: TimeoutTypes | UnsetType,
        max_retries: int | UnsetType,
        include_usage: bool | UnsetType,
        extra_headers: HeaderTypes | None,
    ) -> Call:
        if "stream" in params:
            raise TypeError(
                "'stream' is set by the client: use stream_chat() to stream, chat() not to"
            )
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of {'role': ..., 'content': ...} mappings")
        if self._api_key is None and self.base_url == DEFAULT_BASE_URL:
            raise MissingAPIKeyError(
                "no API key for the token-hub gateway: pass api_key=... or set TOKENHUB_KEY "
                "(local OpenAI-compatible servers need none: set base_url or TOKENHUB_BASE_URL)"
            )
        model_name = self.model if model is UNSET else model
        body: dict[str, object] = {"model": model_name, "messages": list(messages)}
        body["stream"] = stream
        body.update(params)
        if include_usage is UNSET:
            include_usage = self.include_usage
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
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        headers.update(self.headers)
        if extra_headers:
            headers.update(extra_headers)
        return Call(
            url=self.base_url + "/chat/completions",
            headers=headers,
            # allow_nan=False, as httpx's json=: NaN and Infinity are not JSON (ValueError).
            body=json.dumps(body, separators=(",", ":"), allow_nan=False).encode(),
            timeout=self.timeout if timeout is UNSET else Timeout.coerce(timeout),
            max_retries=self.max_retries if max_retries is UNSET else max_retries,
            model=model_name,
            stream=stream,
            redact=self._redact,
            messages=list(messages),
        )


def answered(call: Call, response: httpx.Response) -> bool:
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


def status_error(call: Call, response: httpx.Response, body: bytes) -> TokenHubError:
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

    def watch(self, response: httpx.Response) -> None:
        t = self._call.timeout
        timeouts = response.request.extensions.get("timeout")
        if isinstance(timeouts, dict):
            timeouts["read"] = _max(t.first_token, t.total)
        parser = ChunkParser(started_at=self.sent_at)
        self._timer = StreamTimer(parser, first_token=t.first_token, idle=None)
        total = None if t.total is None else self.sent_at + t.total
        self._timer.watch(response, total)

    def error(self, exc: Exception) -> TokenHubError:
        """Translate an httpx error raised while reading the body."""
        self.stop()
        fired = self._timer.fired if self._timer is not None else None
        t = self._call.timeout
        if fired in ("first_token", "total") or isinstance(exc, httpx.TimeoutException):
            error: TokenHubError = (
                StreamTimeout("total", t.total)
                if fired == "total"
                else StreamTimeout("first_token", t.first_token)
            )
        elif isinstance(exc, httpx.RemoteProtocolError):
            error = TruncatedStreamError(f"the upstream closed the response mid-way: {exc}")
        else:
            error = TransportError(f"reading the response failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()


def generator_done(generator: object) -> bool:
    """True for a generator, sync or async, that ran to its end or was closed (closing
    it again would do nothing)."""
    return getattr(generator, "ag_frame", 0) is None or getattr(generator, "gi_frame", 0) is None


def is_event_stream(response: httpx.Response) -> bool:
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
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    return encoding in ("", "identity")


class StreamState:
    """Bookkeeping of one stream, shared by its public object (`ChatStream`,
    `AsyncChatStream`) and the generators that consume it.

    Those are its owners, and it never refers back to them: a stream nobody reads any
    more is then freed by reference counting, not by a later garbage collection, and when
    the last owner goes while the response is still open, `_abandon()` shuts the
    connection down from the weakref callback itself, with no event loop turn (issue 15).
    """

    _public_name = "ChatStream"

    def __init__(self, client: BaseClient, call: Call) -> None:
        self._base = client
        self._call = call
        self._sent_at: float | None = None
        self._parser = self._new_parser()
        self._timer: StreamTimer | None = None  # the open response's deadlines and socket
        self._response: httpx.Response | None = None  # open, and not yet released
        self._owners: list[_OwnerRef] = []
        # Where the caller made the stream, for the warning if it is dropped unclosed
        # (tracemalloc cannot tell on Python 3.11 for an object with a `__dict__`).
        made = _outside_frame(sys._getframe(1))
        self._made_at = (made.f_code.co_filename, made.f_lineno)
        self._total_deadline: float | None = None
        self._retries = Retries(call.max_retries, client.max_retry_wait)
        self._claimed = False
        self._closed = False
        self._outcome: Outcome | None = None
        self._had_response = False
        #: The `httpx.Response` of the stream once its headers arrived (closed after).
        self.response: httpx.Response | None = None

    def _new_parser(self, request_id: str | None = None) -> ChunkParser:
        return ChunkParser(
            max_event_bytes=self._base.max_event_bytes,
            strict=self._base.strict_utf8,
            started_at=self._sent_at,
            request_id=request_id,
            redact=self._call.redact,
        )

    def _claim(self) -> None:
        if self._claimed:
            raise StreamConsumed("this stream has already been iterated (one consumer each)")
        self._claimed = True

    def _before_send(self) -> None:
        self._sent_at = time.monotonic()
        if self._total_deadline is None and self._call.timeout.total is not None:
            self._total_deadline = self._sent_at + self._call.timeout.total

    def _start(self, response: httpx.Response) -> None:
        """The upstream answered 2xx with an event stream: set up parsing and deadlines."""
        request_id = request_id_of(response.headers)
        parser = self._parser
        sent_at = self._sent_at
        if (
            sent_at is None
            or self._had_response
            or parser.last_event_at is not None
            or parser.ended_at is not None
            or parser.error is not None
        ):
            self._parser = self._new_parser(request_id)  # a retry: start afresh
        else:  # the parser made with the stream has seen nothing yet: reuse it
            parser.started_at = sent_at
            parser.request_id = request_id
        self._had_response = True
        self.response = response
        t = self._call.timeout
        timeouts = response.request.extensions.get("timeout")
        if isinstance(timeouts, dict):
            # httpcore reads the body's read timeout when the body starts: loosen it to a
            # backstop; the watchdog enforces the exact first-token/idle/total deadlines.
            timeouts["read"] = _max(t.first_token, t.idle, t.total)
        self._timer = StreamTimer(self._parser, first_token=t.first_token, idle=t.idle)
        self._timer.watch(response, self._total_deadline)

    def _read_error(self, exc: Exception) -> TokenHubError:
        """Translate an httpx error raised while reading the body."""
        if isinstance(exc, httpx.TimeoutException):
            t = self._call.timeout
            started = self._parser.first_token_at is not None
            error: TokenHubError = StreamTimeout(
                *(("idle", t.idle) if started else ("first_token", t.first_token))
            )
        elif isinstance(exc, httpx.RemoteProtocolError):
            error = TruncatedStreamError(f"the upstream closed the stream mid-way: {exc}")
        else:
            error = TransportError(f"reading the stream failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    def _start_drain(self) -> bool:
        """After [DONE]: drain only if a watchdog can bound the time it takes."""
        return self._timer is not None and self._timer.drain(self._base.drain_timeout)

    def _settle(self) -> TokenHubError | None:
        """Decide the stream's result once the body loop ended; returns the error to raise."""
        parser = self._parser
        timer = self._timer
        if timer is not None:
            timer.stop()
        error = parser.error
        fired = timer.fired if timer is not None else None
        if fired and fired != "drain" and not parser.done:
            if error is None or isinstance(error, TruncatedStreamError | TransportError):
                seconds = {
                    "first_token": self._call.timeout.first_token,
                    "idle": self._call.timeout.idle,
                    "total": self._call.timeout.total,
                }[fired]
                error = StreamTimeout(fired, seconds)  # type: ignore[arg-type]
        if isinstance(error, StreamTimeout) and error.kind == "idle" and parser.finish_reason:
            error = None  # finished, then the upstream kept the connection open: a normal end
        parser.error = error
        if parser.ended_at is None:
            parser.ended_at = time.monotonic()
        if error is None:
            self._outcome = Outcome("completed", "done" if parser.done else "finish_reason")
        else:
            self._outcome = outcome_for(error, self._had_response)
        return error

    def _retry_after_failure(self, error: TokenHubError) -> float | None:
        delay = self._retries.next_delay(error, delivered=bool(self._parser.delivered))
        if delay is not None:
            self._outcome = None
        return delay

    def _fail(self, error: TokenHubError) -> None:
        self._outcome = outcome_for(error, self._had_response)

    def _record_exit(self, exc: BaseException | None) -> None:
        if self._outcome is not None:
            return
        if isinstance(exc, TokenHubError):
            self._outcome = outcome_for(exc, self._had_response)
        else:  # consumer left early, task cancelled, KeyboardInterrupt, consumer's own error
            self._outcome = Outcome("cancelled", type(exc).__name__ if exc else None)
        if self._parser.ended_at is None:
            self._parser.ended_at = time.monotonic()

    # --- owners ------------------------------------------------------------------

    def _adopt(self, owner: object) -> None:
        """Count `owner` (the public stream, or a consuming generator) as keeping this
        stream in use; per stream, never per chunk."""
        self._owners.append(_OwnerRef(owner, self))

    def _on_owner_gone(self) -> None:
        if any(ref() is not None for ref in self._owners):
            return
        if self._response is not None:  # opened, and nobody closed it
            self._abandon()

    def _abandon(self) -> None:
        """Every owner is gone and the response is open: close the connection now.

        This runs inside a weakref callback, so it must not await: it shuts the socket
        down (`StreamTimer.shutdown`: the pending or next read ends at once, and the
        upstream sees the disconnect), and leaves the rest of the cleanup to the
        consuming generator's `finally` (run at once in sync code, and by the event
        loop's async-generator finalizer in async code).
        """
        if self._timer is not None:
            self._timer.shutdown()
        filename, line = self._made_at
        message = (
            f"unclosed stream {self!r} made at {filename}:{line}: its connection was shut "
            "down when it was dropped (use a with block, or close the stream)"
        )
        self._record_exit(None)
        # As CPython's own unclosed files and sockets, the warning points at the code
        # that dropped the stream, and `source` lets tracemalloc show where it was made.
        warnings.warn(message, ResourceWarning, stacklevel=_outside_stacklevel(), source=self)

    # --- results -----------------------------------------------------------------

    @property
    def message(self) -> ChatMessage:
        """The assistant message assembled so far (content, reasoning, tool calls)."""
        return self._parser.message()

    @property
    def usage(self) -> Usage | None:
        """The last usage the upstream reported, normalised; None if it sent none."""
        return self._parser.usage

    @property
    def finish_reason(self) -> str | None:
        return self._parser.finish_reason

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self._parser.message().tool_calls

    @property
    def outcome(self) -> Outcome | None:
        """How the stream ended; None while it is still open."""
        return self._outcome

    @property
    def request_id(self) -> str | None:
        return self._parser.request_id

    @property
    def timings(self) -> Timings:
        """Time to first token, total time and rate (tokens/s from usage, else deltas/s)."""
        p = self._parser
        if self._sent_at is None:
            return Timings()
        start = p.started_at
        end = p.ended_at if p.ended_at is not None else time.monotonic()
        ttft = None if p.first_token_at is None else p.first_token_at - start
        rate = unit = None
        if p.first_token_at is not None:
            span = end - p.first_token_at
            usage = p.usage
            if usage is not None and usage.completion_tokens is not None:
                count, unit = usage.completion_tokens, "tokens/s"
            else:
                count, unit = p.delta_count, "deltas/s"
            rate = count / span if span > 0 else None
            if rate is None:
                unit = None
        return Timings(ttft, end - start, rate, unit)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        state = self._outcome.kind if self._outcome else ("open" if self._claimed else "new")
        return f"<{self._public_name} model={self._call.model!r} {state}>"


class _OwnerRef(weakref.ref[object]):
    """A weak reference to one owner of a stream that tells the stream when the owner is
    gone. It holds the stream weakly too, so it adds no reference cycle."""

    __slots__ = ("state",)

    def __new__(cls, owner: object, state: StreamState) -> Self:
        return super().__new__(cls, owner, _owner_gone)

    def __init__(self, owner: object, state: StreamState) -> None:
        self.state = weakref.ref(state)


def _owner_gone(ref: weakref.ref[object]) -> None:
    # Runs inside the owner's deallocation, where an exception can only be printed and
    # ignored; at interpreter exit the process is about to drop its sockets anyway.
    state = ref.state() if isinstance(ref, _OwnerRef) else None
    if state is not None and not sys.is_finalizing():
        state._on_owner_gone()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_frame(frame: FrameType) -> FrameType:
    """`frame`, or the innermost of its callers outside this package."""
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return frame


def _outside_stacklevel() -> int:
    """The `stacklevel` that points `warn()`, called by our caller, at the innermost frame
    outside this package."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


class StreamView:
    """The results of a stream, as its public object shows them (read from its state)."""

    _state: StreamState

    @property
    def response(self) -> httpx.Response | None:
        """The `httpx.Response` of the stream once its headers arrived (closed after)."""
        return self._state.response

    @property
    def message(self) -> ChatMessage:
        """The assistant message assembled so far (content, reasoning, tool calls)."""
        return self._state.message

    @property
    def usage(self) -> Usage | None:
        """The last usage the upstream reported, normalised; None if it sent none."""
        return self._state.usage

    @property
    def finish_reason(self) -> str | None:
        return self._state.finish_reason

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self._state.tool_calls

    @property
    def outcome(self) -> Outcome | None:
        """How the stream ended; None while it is still open."""
        return self._state.outcome

    @property
    def request_id(self) -> str | None:
        return self._state.request_id

    @property
    def timings(self) -> Timings:
        """Time to first token, total time and rate (tokens/s from usage, else deltas/s)."""
        return self._state.timings

    def __repr__(self) -> str:
        return repr(self._state)


def outcome_for(error: TokenHubError, had_response: bool) -> Outcome:
    if isinstance(error, StreamTimeout):
        return Outcome("timeout", error.kind, error)
    if isinstance(error, TruncatedStreamError):
        return Outcome("truncated", None, error)
    if isinstance(error, TransportError):
        return Outcome("truncated" if had_response else "upstream_error", None, error)
    return Outcome("upstream_error", None, error)
