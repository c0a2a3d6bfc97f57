"""One request's state (`Turn`), and the ASGI plumbing every route of the proxy shares:
the message types, reading the scope, simple responses and the log lines.

Internal interface of `tokenhub_stream.asgi`: the lowest module of the package, imported
by all the others.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Literal, Protocol

import anyio

from ._buffers import ResumableStream
from ._record import TurnCollector, TurnOutcome
from ._wire import ProxyRejection, error_body

__all__: list[str] = []

logger = logging.getLogger("tokenhub_stream.asgi")

Scope = MutableMapping[str, object]
Message = MutableMapping[str, object]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: On everything the proxy writes (issue #14): a browser never sniffs an answer into HTML.
NOSNIFF = (b"x-content-type-options", b"nosniff")
#: The start of a streamed answer: no caching, no proxy buffering (nginx), no sniffing.
STREAM_HEADERS = (
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
    NOSNIFF,
)


class Cancels(Protocol):
    """What stops a turn's exchange: its asyncio task, or its anyio cancel scope."""

    def cancel(self) -> object: ...


class Watch(Protocol):
    """A turn's stats and telemetry (`_telemetry.TurnWatch`), fed at its lifecycle
    points; it ends with the turn's log line (`log_turn`)."""

    #: The upstream's HTTP status once its headers came (set by the passthrough).
    upstream_status: int | None

    def request(self, body: Mapping[str, object], stream: bool) -> None: ...

    def upstream_headers(self, headers: Mapping[str, str]) -> Mapping[str, str]: ...

    def upstream_ended(self, turn: Turn) -> None: ...

    def attach(self) -> object: ...

    def detach(self, token: object) -> None: ...

    def ended(self, turn: Turn) -> None: ...


class Turn:
    """Mutable state of one request, shared by the relay, the watcher and the timers."""

    __slots__ = (
        "request_id",
        "started",
        "wall",
        "principal",
        "limit_key",
        "model",
        "messages",
        "status",
        "outcome",
        "error",
        "ttfb",
        "bytes_sent",
        "client_gone",
        "last_write",
        "writing",
        "ticker_writing",
        "ticking",
        "collector",
        "response_done",
        "resume",
        "expired",
        "canceller",
        "keepalives",
        "watch",
    )

    def __init__(self) -> None:
        self.request_id = secrets.token_hex(8)
        self.started = time.perf_counter()
        self.wall = time.time()
        self.principal: object = None
        self.limit_key: str | None = None
        self.model = "-"
        self.messages: list[object] = []
        self.status = 0  # 0 until a status has been sent
        self.outcome: TurnOutcome | Literal["rejected"] = "completed"
        self.error: str | None = None
        self.ttfb: float | None = None
        self.bytes_sent = 0
        self.client_gone = False
        self.last_write = 0.0
        self.writing = False
        # Set while a keep-alive is being written: the relay waits for it (never two
        # writes at once on one response).
        self.ticker_writing: anyio.Event | None = None
        self.ticking = False  # a keep-alive write has been started and has not ended
        self.collector: TurnCollector | None = None
        self.response_done = False
        self.resume: ResumableStream | None = None
        self.expired = False  # cut by total_timeout
        self.canceller: Cancels | None = None  # set by the relay's race
        self.keepalives = 0  # keep-alive comments sent
        self.watch: Watch | None = None  # stats and telemetry; None when both are off

    def cancel(self) -> None:
        """Stop the exchange now (a deadline, a gone client): its upstream closes."""
        canceller = self.canceller
        if canceller is not None:
            canceller.cancel()

    def stop(self) -> None:
        """The user's Stop (`DELETE <mount>/streams/{id}`): a client disconnect, now."""
        if self.outcome == "completed":
            self.outcome = "client_disconnect"
        self.cancel()


async def maybe_await(value: object) -> object:
    """`value`, awaited if it is awaitable: the hooks may be sync or async."""
    if inspect.isawaitable(value):
        return await value
    return value


def route_path(scope: Scope) -> str:
    """The request's path below the app's `root_path` (where a `Mount` put it)."""
    path = str(scope["path"])
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        return path[len(root) :]
    return path


def peer(scope: Scope) -> str | None:
    """The address of the connection's other end, as the server saw it."""
    client = scope.get("client")
    return client[0] if isinstance(client, list | tuple) and client else None


def request_headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; repeated names joined as HTTP allows."""
    out: dict[str, str] = {}
    raw = scope.get("headers", ())
    assert isinstance(raw, Iterable)
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out and key != "host" else text
    return out


def method_not_allowed(allowed: str) -> ProxyRejection:
    return ProxyRejection(
        405, "Method not allowed.", code="method_not_allowed", headers={"allow": allowed}
    )


async def send_simple(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    """A whole response at once: status, `headers` (plus nosniff and the length), body."""
    headers = [*headers, NOSNIFF, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, rejection: ProxyRejection, request_id: str | None = None) -> None:
    """A rejection as OpenAI's JSON error shape, with its status and headers."""
    body = error_body(
        rejection.message,
        error_type=rejection.error_type,
        code=rejection.code,
        param=rejection.param,
    )
    headers = [(b"content-type", b"application/json")]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    headers += [(k.encode(), v.encode()) for k, v in rejection.headers.items()]
    await send_simple(send, rejection.status, body, headers)


def log_turn(turn: Turn) -> None:
    """The one log line per chat request; also where its telemetry ends."""
    if turn.watch is not None:
        turn.watch.ended(turn)
    duration = time.perf_counter() - turn.started
    ttfb = "-" if turn.ttfb is None else f"{turn.ttfb * 1000:.1f}"
    logger.info(
        "chat request_id=%s principal=%s model=%s status=%s ttfb_ms=%s duration_ms=%.1f "
        "bytes=%d outcome=%s",
        turn.request_id,
        "-" if turn.principal is None else turn.principal,
        turn.model,
        turn.status,
        ttfb,
        duration * 1000,
        turn.bytes_sent,
        turn.outcome,
    )


def log_upstream_failure(turn: Turn, exc: BaseException) -> None:
    """A warning naming the error's class (never its text: it may quote the request)."""
    cause = exc.__cause__
    logger.warning(
        "upstream failed request_id=%s error=%s%s",
        turn.request_id,
        type(exc).__name__,
        "" if cause is None else f" cause={type(cause).__name__}",
    )
