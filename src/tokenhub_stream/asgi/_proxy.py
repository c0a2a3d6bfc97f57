"""`ChatProxy`: settings, mounting (routes, middleware, lifespan) and dispatch."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import logging
import secrets
import sys
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, cast

import anyio
import anyio.abc
import httpx

from ..__version__ import __version__
from .._engine import DEFAULT_MAX_RESPONSE_HEAD_BYTES, ResponseHeadTooLarge
from .._models import ChatMessage, Usage
from .._sweep import Sweep
from .._tool_loop import DEFAULT_MAX_TURNS
from ._admission import (
    check_host,
    check_origin,
    client_address,
    first_forwarded,
    is_trusted,
    parse_allowed_hosts,
    parse_networks,
)
from ._body import (
    DEFAULT_ALLOWED_FIELDS,
    OutputCaps,
    outgoing_body,
    parse_body,
    parse_content_type,
    validate_body,
)
from ._limits import RateLimiter, UsageLimiter
from ._redact import KeyRedactor, check_api_key
from ._resume import (
    DEFAULT_RESUME_TTL,
    InMemoryStreamBuffer,
    ResumableStream,
    StreamBuffer,
)
from ._upstream import (
    Upstream,
    UpstreamResponse,
    default_upstream,
    httpx_head_size,
    is_h11_head_overflow,
)
from ._wire import (
    EventSplitter,
    ProxyRejection,
    error_body,
    error_frame,
    is_identity,
    is_json_answer,
    is_length_framed,
    upstream_error_object,
)

try:
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.routing import BaseRoute, Mount, Route
    from starlette.types import ASGIApp
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub_stream.asgi needs Starlette: pip install 'tokenhub_stream[asgi]'"
    ) from exc

if TYPE_CHECKING:
    from ..tools import ToolSet, ToolsTypes
    from ._record import TurnCollector

__all__ = ["ChatProxy", "CompletionRecord", "Outcome"]

logger = logging.getLogger("tokenhub_stream.asgi")

Scope = MutableMapping[str, object]
Message = MutableMapping[str, object]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

Outcome = Literal["completed", "upstream_error", "client_disconnect", "timeout"]

DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_PROXY_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=10.0)
DEFAULT_FINISH_TIMEOUT = 120.0
#: Resumes one principal (or client address) may hold open at once in one process.
DEFAULT_MAX_RESUMES_PER_PRINCIPAL = 4
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
DEFAULT_TOTAL_TIMEOUT = 600.0
_CLOSE_TIMEOUT = 1.0
_MAX_ERROR_BODY = 64 * 1024
_KEEPALIVE = b": keep-alive\n\n"
# On everything the proxy writes (issue #14): a browser never sniffs an answer into HTML.
_NOSNIFF = (b"x-content-type-options", b"nosniff")


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One turn through the proxy, handed to `on_complete`.

    `message` (content, tool calls), `finish_reason` and `usage` are assembled from a copy of
    the stream (or the JSON body when `stream` was false); empty/`None` when nothing arrived.
    `usage` is only ever what the upstream reported. `estimated_usage` is set when that is
    missing or incomplete for a turn the upstream took on (a client that left early, a cut
    stream, an upstream that sends no usage): the proxy's estimate of the whole turn, the
    figure a `UsageLimiter` is charged instead (docs/proxy.md, "Usage of a turn that ends
    early"). `started_at` is wall-clock (`time.time()`); `ttfb` (request to first byte sent
    to the client) and `duration` are seconds.
    """

    request_id: str
    principal: object
    model: str
    messages: list[object]
    message: ChatMessage
    finish_reason: str | None
    usage: Usage | None
    outcome: Outcome
    status: int
    error: str | None
    started_at: float
    ttfb: float | None
    duration: float
    bytes_sent: int
    estimated_usage: Usage | None = None

    def __repr__(self) -> str:
        return (
            f"CompletionRecord(request_id={self.request_id!r}, model={self.model!r}, "
            f"outcome={self.outcome!r}, finish_reason={self.finish_reason!r})"
        )


AuthorizeHook = Callable[[Request], Awaitable[object | None] | object | None]
OnRequestHook = Callable[
    [Request, dict[str, object]], Awaitable[Mapping[str, object]] | Mapping[str, object]
]
OnCompleteHook = Callable[[CompletionRecord], Awaitable[None] | None]
Exchange = Callable[[Send, "_Turn", anyio.abc.TaskGroup], Awaitable[None]]


async def _maybe_await(value: object) -> object:
    if inspect.isawaitable(value):
        return await value
    return value


class _Turn:
    """Mutable state of one request, shared by the relay, the watcher and the ticker."""

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
        "ticker_task",
        "collector",
        "response_done",
        "resume",
        "expired",
    )

    def __init__(self) -> None:
        self.request_id = secrets.token_hex(8)
        self.started = time.perf_counter()
        self.wall = time.time()
        self.principal: object = None
        self.limit_key: str | None = None
        self.model = "-"
        self.messages: list[object] = []
        self.status = 0
        self.outcome: Outcome | Literal["rejected"] = "completed"
        self.error: str | None = None
        self.ttfb: float | None = None
        self.bytes_sent = 0
        self.client_gone = False
        self.last_write = 0.0
        self.writing = False
        self.ticker_writing: anyio.Event | None = None
        self.ticker_task: asyncio.Task[None] | None = None  # the native relay's keep-alive
        self.collector: TurnCollector | None = None
        self.response_done = False
        self.resume: ResumableStream | None = None
        self.expired = False  # cut by total_timeout


class ChatProxy:
    """An ASGI app that streams chat completions from an upstream, keeping the key server-side.

    ```python
    proxy = ChatProxy(api_key=os.environ["TOKENHUB_KEY"], base_url=BASE_URL,
                      allowed_models=["gpt-4o-mini"], max_tokens_cap=2048)
    app = Starlette(routes=proxy.routes("/api/chat"))      # POST /api/chat, GET /api/chat/models
    app = FastAPI(routes=proxy.routes("/v1/chat/completions"))  # for the openai SDK
    app = FastAPI(middleware=[proxy.middleware("/api/chat")])  # ahead of routing: leaner
    ```

    Args:
        api_key: the upstream key; sent only to `base_url`, never shown anywhere (an
            upstream's echo of it is redacted: docs/proxy.md, "Key redaction"). `None`
            for a local server that needs none (vLLM, Ollama): no `Authorization` is sent.
        base_url: the upstream API root; requests go to `base_url + "/chat/completions"`.
        default_model: used when the body has no `model` (default: the client's default).
        allowed_models: models the browser may ask for (`None`: any); also `GET <mount>/models`.
        allowed_fields: body fields forwarded upstream (default: OpenAI's chat parameters).
        max_tokens_cap: the most output tokens one answer may ask for. Every forwarded
            request carries a limit no larger: `max_tokens` / `max_completion_tokens`
            above it are clamped, and a body with neither (or `null`) gets
            `max_tokens_field` set to it. Applied last, after `on_request`.
        max_tokens_field: the field written when the body has no token limit:
            `"max_tokens"` (understood most widely) or `"max_completion_tokens"` (what
            OpenAI's reasoning models require).
        max_choices: `n` (and `best_of`) above it are clamped to it; each choice is a
            whole answer, billed as such. Applied last, after `on_request`.
        max_body_bytes: larger request bodies get 413.
        allowed_origins: origins allowed to POST (default: the request's own host; `"*"`: any).
        allowed_hosts: the host names the app is served as (`"app.example.com"`,
            `"*.example.com"`, `"localhost:8000"`); any other `Host` (or, from
            `trusted_proxies`, `X-Forwarded-Host`) gets 400 before anything else, on every
            route: the guard against DNS rebinding (a page on a name re-pointed at the
            server passes the origin check). `None` (the default): no check.
        trusted_proxies: addresses/networks whose `X-Forwarded-*` headers are believed.
        authorize: `request -> principal | None` (sync or async); `None` answers 401. It may
            raise `starlette.exceptions.HTTPException` with a status of its choice.
        rate_limiter: a `RateLimiter`, keyed by principal (if any) or client address; a
            `UsageLimiter` also gets each turn's usage (`tokenhub_stream.redis` has both):
            the proxy then asks streams for usage (`stream_options.include_usage`, if
            that field is allowed) and charges an estimate for a turn that ended without it.
        on_request: `(request, body) -> body`, may rewrite the outgoing body.
        on_complete: `(CompletionRecord) -> None`, once per forwarded turn.
        on_disconnect: `"cancel"` closes the upstream when the client goes; `"finish"` reads
            it to its end (within `finish_timeout`) for `on_complete`, sending it nowhere.
        keepalive_interval: seconds of upstream silence before a `: keep-alive` comment
            (sent within a quarter of it, at most 1 s, later); `None` disables them.
        timeout: the upstream timeouts (`read` is also the idle limit of a stream).
        total_timeout: seconds a turn may take, from the request to the end of the answer
            (default 600); past it the upstream is closed and the browser gets a 504, or
            an error frame and no `[DONE]` once the stream has started. `None`: no limit.
        max_response_head_bytes: the largest upstream response head (status line and
            headers, 1xx interim heads included; default 16 KiB); a larger one is refused
            as it arrives, its connection closed, and the browser gets a 502.
        max_response_bytes: the largest non-streaming (`"stream": false`) upstream answer
            (default 4 MiB); a larger one is not read further, its connection closed, and
            the browser gets a 502.
        max_connections: size of the outbound connection pool.
        transport: an `httpx.AsyncBaseTransport` for the upstream. Default, when the
            server runs on asyncio: a small HTTP/1.1 client of ours on httptools' C parser
            (the `asgi` extra), else aiohttp's pool called directly, else httpx's own; all
            measured in docs/performance.md. Under trio, or with `transport=`, httpx. The
            tool loop uses httpx-aiohttp's `AiohttpTransport` on asyncio, else httpx.
        tools: run the tool loop server-side with these tools (a `ToolSet`, `Tool`s or
            functions): the browser gets content deltas only, tool progress as SSE
            comments, and one `[DONE]`; a body with `tools`/`tool_choice` is a 400.
        max_tool_turns: the most upstream requests one tool-using answer may make.
        resumable: offer resumable streams to requests that ask with `X-Resumable: 1`:
            `X-Stream-Id`, `id:` lines, `GET <mount>/streams/{id}` (docs: "Resumable
            streams"). Implied by `stream_buffer`; not available with `tools`.
        stream_buffer: where resumable streams are kept (default: `InMemoryStreamBuffer()`;
            `tokenhub_stream.redis.RedisStreamBuffer` behind several processes).
        max_resumes_per_principal: resumes (`GET <mount>/streams/{id}`) one principal, or
            client address, may hold open at once in this process; more get 429. Resumes
            also pass `authorize` and take from `rate_limiter` like chats.
        resume_ttl: seconds a finished stream stays resumable.

    Raises:
        ValueError: an invalid option, or an `api_key` with whitespace, control or
            non-ASCII characters (a trailing newline, say); the message never shows it.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str | None = None,
        default_model: str | None = None,
        allowed_models: Collection[str] | None = None,
        allowed_fields: Collection[str] = DEFAULT_ALLOWED_FIELDS,
        max_tokens_cap: int | None = None,
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        max_choices: int = 1,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        allowed_origins: Collection[str] | None = None,
        allowed_hosts: Collection[str] | None = None,
        trusted_proxies: Collection[str] = (),
        authorize: AuthorizeHook | None = None,
        rate_limiter: RateLimiter | None = None,
        on_request: OnRequestHook | None = None,
        on_complete: OnCompleteHook | None = None,
        on_disconnect: Literal["cancel", "finish"] = "cancel",
        finish_timeout: float = DEFAULT_FINISH_TIMEOUT,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
        timeout: httpx.Timeout | float = DEFAULT_PROXY_TIMEOUT,
        total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
        max_response_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        transport: httpx.AsyncBaseTransport | None = None,
        tools: ToolsTypes | None = None,
        max_tool_turns: int = DEFAULT_MAX_TURNS,
        resumable: bool = False,
        stream_buffer: StreamBuffer | None = None,
        max_resumes_per_principal: int = DEFAULT_MAX_RESUMES_PER_PRINCIPAL,
        resume_ttl: float = DEFAULT_RESUME_TTL,
    ) -> None:
        from .. import _config

        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ValueError("api_key must be a non-empty string, or None for no key")
        if api_key is not None:
            check_api_key(api_key)
        if on_disconnect not in ("cancel", "finish"):
            raise ValueError("on_disconnect must be 'cancel' or 'finish'")
        if max_tokens_cap is not None and (
            isinstance(max_tokens_cap, bool)
            or not isinstance(max_tokens_cap, int)
            or max_tokens_cap < 1
        ):
            raise ValueError("max_tokens_cap must be a positive integer or None")
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("max_tokens_field must be 'max_tokens' or 'max_completion_tokens'")
        if isinstance(max_choices, bool) or not isinstance(max_choices, int) or max_choices < 1:
            raise ValueError("max_choices must be a positive integer")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if keepalive_interval is not None and keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be positive or None")
        if max_connections < 1:
            raise ValueError("max_connections must be positive")
        if total_timeout is not None and not total_timeout > 0:
            raise ValueError("total_timeout must be positive or None")
        if max_response_head_bytes < 1:
            raise ValueError("max_response_head_bytes must be positive")
        if max_response_bytes < 1:
            raise ValueError("max_response_bytes must be positive")
        if isinstance(max_tool_turns, bool) or not isinstance(max_tool_turns, int):
            raise ValueError("max_tool_turns must be a positive integer")
        if max_tool_turns < 1:
            raise ValueError("max_tool_turns must be a positive integer")
        if stream_buffer is not None:
            resumable = True
        if resumable and tools is not None:
            raise ValueError("resumable streams are not available with tools=")
        if resume_ttl <= 0:
            raise ValueError("resume_ttl must be positive")
        if isinstance(max_resumes_per_principal, bool) or max_resumes_per_principal < 1:
            raise ValueError("max_resumes_per_principal must be a positive integer")
        tool_set: ToolSet | None = None
        if tools is not None:
            from ..tools import ToolSet

            tool_set = ToolSet.coerce(tools)
            if not tool_set:
                raise ValueError("tools is empty; pass None for a plain passthrough")
        base = (base_url or _config.DEFAULT_BASE_URL).rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")
        self._api_key = api_key
        # None when there is no key: an empty key would "match" everywhere.
        self._redactor = KeyRedactor(api_key) if api_key else None
        self._url = base + "/chat/completions"
        self.base_url = base
        self.default_model = default_model or _config.DEFAULT_MODEL
        self.allowed_models = None if allowed_models is None else frozenset(allowed_models)
        self.allowed_fields = frozenset(allowed_fields)
        self.max_tokens_cap = max_tokens_cap
        self.max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = max_tokens_field
        self.max_choices = max_choices
        self.max_body_bytes = max_body_bytes
        self.allowed_origins = (
            None
            if allowed_origins is None
            else frozenset(o if o == "*" else o.rstrip("/").lower() for o in allowed_origins)
        )
        self._allowed_hosts = None if allowed_hosts is None else parse_allowed_hosts(allowed_hosts)
        self._trusted = parse_networks(trusted_proxies)
        self.authorize = authorize
        self.rate_limiter = rate_limiter
        self._usage_checked: tuple[RateLimiter, UsageLimiter | None] | None = None
        self.on_request = on_request
        self.on_complete = on_complete
        self.on_disconnect = on_disconnect
        self.finish_timeout = finish_timeout
        self.keepalive_interval = keepalive_interval
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.total_timeout = total_timeout
        self.max_response_head_bytes = max_response_head_bytes
        self.max_response_bytes = max_response_bytes
        self._max_connections = max_connections
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        # The default upstream on asyncio (our httptools client, else aiohttp without
        # httpx); None: use _get_client().
        self._upstream: Upstream | None = None
        self._upstream_chosen = transport is not None
        # True once the upstream is our httptools client: its streams are relayed on plain
        # asyncio tasks (_race_native) and its responses close synchronously.
        self._native = False
        # The native relay's keep-alives: one timer for every open stream (_proxy_sweep).
        self._keepalives: Sweep[_Turn, Send] | None = (
            None if keepalive_interval is None else Sweep(keepalive_interval, self._tick)
        )
        # The native relay's total_timeout: one timer for every open turn, as above.
        self._deadlines: Sweep[_Turn, asyncio.Task[None]] | None = (
            None if total_timeout is None else Sweep(total_timeout, self._expire)
        )
        self.tools = tool_set
        self.max_tool_turns = max_tool_turns
        if resumable and stream_buffer is None:
            stream_buffer = InMemoryStreamBuffer()
        self.stream_buffer = stream_buffer
        self.resume_ttl = resume_ttl
        self.max_resumes_per_principal = max_resumes_per_principal
        # Resumes being served per owner (the max_resumes_per_principal cap).
        self._resumes: dict[str, int] = {}
        # Resumable streams relayed by this process, for DELETE <mount>/streams/{id}.
        self._live_streams: dict[str, ResumableStream] = {}
        self._headers = {
            **({"authorization": f"Bearer {api_key}"} if api_key else {}),
            "content-type": "application/json",
            "accept-encoding": "identity",
            "user-agent": f"tokenhub_stream/{__version__}",
        }
        # The upstream request's headers by `stream`, built once (never mutated after).
        self._request_headers = {
            stream: {**self._headers, "accept": accept}
            for stream, accept in ((True, "text/event-stream"), (False, "application/json"))
        }

    def __repr__(self) -> str:
        return f"ChatProxy(base_url={self.base_url!r}, default_model={self.default_model!r})"

    # --- mounting ---------------------------------------------------------------------------

    def routes(self, path: str) -> list[BaseRoute]:
        """Starlette routes serving the proxy at exactly `path` and `GET path + "/models"`.

        ```python
        app = Starlette(routes=[*proxy.routes("/api/chat"), ...])
        app = FastAPI(routes=proxy.routes("/api/chat"))   # or app.router.routes.extend(...)
        ```

        A bare `Mount(path, app=proxy)` also works, but Starlette answers `POST path` (no
        trailing slash) with a 307 that `fetch` follows as a GET; these routes do not.
        """
        path = "/" + path.strip("/")
        return [
            Route(path, endpoint=_AtMountRoot(self), name="tokenhub_chat"),
            Mount(path, app=self, name="tokenhub_chat_mount"),
        ]

    def middleware(self, path: str) -> Middleware:
        """Starlette/FastAPI middleware serving the proxy at `path`, ahead of routing.

        ```python
        app = Starlette(routes=[...], middleware=[proxy.middleware("/api/chat")])
        app = FastAPI(middleware=[proxy.middleware("/api/chat")], lifespan=proxy.lifespan)
        ```

        It answers what `routes(path)` answers (`path`, `path/`, `GET path/models`) and
        passes every other request, and the lifespan, to the app. A stream then skips the
        app's routing and exception handling: each open stream holds about 2.5 KiB less and
        each event passes one `send` wrapper instead of two (docs/performance.md). Put
        middleware the proxy's hooks rely on (sessions, say) before it in the list.
        """
        path = "/" + path.strip("/")
        return Middleware(_Front, proxy=self, path=path)

    async def aclose(self) -> None:
        """Close the outbound connection pool."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
        upstream, self._upstream = self._upstream, None
        self._upstream_chosen = self._transport is not None
        self._native = False
        if upstream is not None:
            await upstream.aclose()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """A Starlette/FastAPI `lifespan` that closes the pool at shutdown.

        ```python
        app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
        ```

        Mounted apps get no lifespan events of their own, so the host app runs this one.
        """
        try:
            yield
        finally:
            await self.aclose()

    async def __aenter__(self) -> ChatProxy:
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.aclose()

    def _get_client(self) -> httpx.AsyncClient:
        client = self._client
        if client is None:
            limits = httpx.Limits(
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
            )
            client = httpx.AsyncClient(
                timeout=self._timeout,
                limits=limits,
                transport=self._transport or _fast_transport(limits),
                follow_redirects=False,
                trust_env=False,
            )
            self._client = client
        return client

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = _route_path(scope)
            if path in ("", "/"):
                await self._chat(scope, receive, send)  # checks the host itself (_prepare)
                return
            if self._allowed_hosts is not None:
                try:
                    self._own_host(_headers(scope), _peer(scope))
                except ProxyRejection as rejection:
                    await _send_error(send, rejection)
                    return
            if path.rstrip("/") == "/models":
                await self._models(scope, send)
            elif path.startswith("/streams/"):
                from ._resume import serve_resume

                await serve_resume(self, scope, receive, send, path[len("/streams/") :])
            else:
                await _send_error(send, ProxyRejection(404, "Not found.", code="not_found"))
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            # Refused up front (starlette middleware/gzip.py does the same for non-http).
            await send({"type": "websocket.close", "code": 1008})
        else:
            raise RuntimeError(f"ChatProxy cannot serve {kind!r} scopes")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _models(self, scope: Scope, send: Send) -> None:
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise _method_not_allowed("GET")
            await self._authorize(Request(scope))
        except ProxyRejection as rejection:
            await _send_error(send, rejection)
            return
        models = sorted(self.allowed_models) if self.allowed_models else [self.default_model]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tokenhub"} for m in models]
        body = _json({"object": "list", "data": data})
        await _send_simple(send, 200, body, [(b"content-type", b"application/json")])

    async def _authorize(self, request: Request) -> object:
        if self.authorize is None:
            return None
        try:
            principal = await _maybe_await(self.authorize(request))
        except HTTPException as exc:
            headers = dict(exc.headers or {})
            raise ProxyRejection(exc.status_code, str(exc.detail), headers=headers) from None
        if principal is None:
            raise ProxyRejection(401, "Not authorized.", code="unauthorized")
        return principal

    # --- POST <mount> -----------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        turn = _Turn()
        try:
            prepared = await self._prepare(scope, receive, turn)
        except ProxyRejection as rejection:
            turn.status = rejection.status
            turn.outcome = "rejected"
            await _send_error(send, rejection, turn.request_id)
            self._log(turn)
            return
        except Exception:
            # A failing hook (authorize, rate_limiter, on_request): a key-free 500.
            logger.exception("request failed before forwarding request_id=%s", turn.request_id)
            turn.status = 500
            turn.outcome = "rejected"
            failure = ProxyRejection(
                500, "The proxy failed.", code="internal_error", error_type="api_error"
            )
            await _send_error(send, failure, turn.request_id)
            self._log(turn)
            return
        request_body, stream = prepared
        if self.on_complete is not None or self._usage_limiter() is not None:
            from ._record import TurnCollector

            # The tool loop hands over its answer as one chat.completion object.
            turn.collector = TurnCollector(
                stream=stream and self.tools is None, request_bytes=len(request_body)
            )
        if stream and self.stream_buffer is not None:
            from ._resume import owner_of, wants_resumable

            headers = _headers(scope)
            if wants_resumable(headers):
                owner = owner_of(self, turn.principal, scope, headers)
                turn.resume = ResumableStream(self.stream_buffer, owner, self.resume_ttl)
        try:
            if self.tools is None:
                self._choose_upstream()
                if self._native and turn.resume is None:
                    # Called here, not through a helper: each coroutine frame on this
                    # task's chain stays for the whole stream (docs/performance.md).
                    relay = self._exchange(request_body, stream, send, turn, None)
                    await self._race_native(relay, receive, send, turn)
                else:
                    await self._forward(request_body, stream, receive, send, turn)
            else:
                from ._tools import ToolExchange

                exchange = ToolExchange(self, request_body, stream)
                await self._race(exchange.run, receive, send, turn)
        finally:
            self._log(turn)
        await self._complete(turn)

    async def _prepare(self, scope: Scope, receive: Receive, turn: _Turn) -> tuple[bytes, bool]:
        headers = _headers(scope)
        peer = _peer(scope)
        own_host = self._own_host(headers, peer)
        if scope["method"] != "POST":
            raise _method_not_allowed("POST")
        check_origin(headers, own_host=own_host, allowed_origins=self.allowed_origins)
        charset = parse_content_type(headers.get("content-type"))
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        request = Request(scope)
        await self._admit(request, turn, headers, peer)
        raw = await self._read_body(receive)
        body, stream = validate_body(
            parse_body(raw, charset),
            default_model=self.default_model,
            allowed_models=self.allowed_models,
            max_tokens_cap=self.max_tokens_cap,
        )
        if self.tools is not None:
            from ._tools import reject_tool_fields

            reject_tool_fields(body)  # the browser's own body, before on_request
        if self.on_request is not None:
            rewritten = await _maybe_await(self.on_request(request, body))
            if not isinstance(rewritten, Mapping):
                raise TypeError("on_request must return the body mapping")
            body = dict(rewritten)
        model = body.get("model")
        turn.model = model if isinstance(model, str) else "-"
        usage_limiter = self._usage_limiter()
        if self.on_complete is not None or usage_limiter is not None:
            # Only a record needs them: a long conversation is not held for the whole stream.
            messages = body.get("messages")
            turn.messages = list(messages) if isinstance(messages, list) else []
        # A budget needs every streamed turn's usage; the tool loop asks for it itself. An
        # allow-list without stream_options (an upstream that refuses them) opts out.
        include_usage = (
            usage_limiter is not None
            and self.tools is None
            and "stream_options" in self.allowed_fields
        )
        # Read per request, as every other setting: the attributes may be reassigned.
        caps = OutputCaps(self.max_tokens_cap, self.max_tokens_field, self.max_choices)
        content = outgoing_body(
            body, self.allowed_fields, stream, caps=caps, include_usage=include_usage
        )
        return content, stream

    def _own_host(self, headers: dict[str, str], peer: str | None) -> str | None:
        """The host the client asked for; 400 if `allowed_hosts` does not list it.

        `Host`, or from a `trusted_proxies` peer its `X-Forwarded-Host`: the value the
        same-origin check compares `Origin` with, so the one a rebound name would forge.
        """
        host = headers.get("host")
        if is_trusted(peer, self._trusted):
            host = first_forwarded(headers.get("x-forwarded-host")) or host
        if self._allowed_hosts is not None:
            check_host(host, self._allowed_hosts)
        return host

    def _client_key(self, principal: object, peer: str | None, headers: dict[str, str]) -> str:
        """`principal:<principal>`, else `address:<client ip>`: rate-limit key, stream owner."""
        if principal is not None:
            return f"principal:{principal}"
        address = client_address(peer, headers.get("x-forwarded-for"), self._trusted)
        return f"address:{address or 'unknown'}"

    async def _admit(
        self, request: Request, turn: _Turn, headers: dict[str, str], peer: str | None
    ) -> None:
        """`authorize`, then the rate limiter: one admission for chats and resumes alike.

        Sets `turn.principal` and, with a limiter, `turn.limit_key`; raises the rejection.
        """
        turn.principal = await self._authorize(request)
        limiter = self.rate_limiter
        if limiter is None:
            return
        key = turn.limit_key = self._client_key(turn.principal, peer, headers)
        retry_after = await limiter.acquire(key)
        if retry_after is not None:
            seconds = str(max(1, int(retry_after + 0.999)))
            raise ProxyRejection(
                429,
                "Too many requests: slow down.",
                code="rate_limit_exceeded",
                headers={"retry-after": seconds},
            )

    async def _read_body(self, receive: Receive) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProxyRejection(400, "The client went away.", code="client_disconnect")
            chunk = message.get("body", b"")
            if isinstance(chunk, bytes) and chunk:
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)
                parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    # --- forwarding -------------------------------------------------------------------------

    async def _forward(
        self, content: bytes, stream: bool, receive: Receive, send: Send, turn: _Turn
    ) -> None:
        # A partial, not a closure: one coroutine (and one frame per chunk's resume) less.
        exchange = functools.partial(self._exchange, content, stream)
        await self._race(exchange, receive, send, turn)

    async def _race_native(
        self, exchange: Coroutine[Any, Any, None], receive: Receive, send: Send, turn: _Turn
    ) -> None:
        # _race on asyncio's own tasks, for our httptools client: anyio's task group, its
        # cancel scopes and task-state entries, and a keep-alive task per stream were
        # about 5 KiB of each open stream (docs/performance.md). The exchange runs in a
        # child task, this task watches for `http.disconnect`; the child's end wakes this
        # task with a cancel that is taken back (uncancel), as asyncio.timeout does. The
        # exchange's `tg` is None here.
        host = asyncio.current_task()
        assert host is not None
        wake = _WakeHost(host)
        child = asyncio.get_running_loop().create_task(exchange)
        child.add_done_callback(wake)
        deadlines = self._deadlines
        if deadlines is not None:
            deadlines.add(turn, child)
        try:
            # The watcher, inline (one frame less per open stream).
            while (await receive())["type"] != "http.disconnect":
                pass
            # After a complete response uvicorn answers receive() with http.disconnect:
            # that is not the client leaving (see _watch_disconnect).
            if not turn.response_done:
                turn.client_gone = True
                if turn.outcome == "completed":
                    turn.outcome = "client_disconnect"
                if self.on_disconnect == "cancel" or turn.collector is None:
                    child.cancel()
                else:
                    await asyncio.sleep(self.finish_timeout)  # "finish", cut by its end
                    turn.outcome = "timeout"
                    child.cancel()
        except BaseException as exc:
            wake.watching = False
            ours = isinstance(exc, asyncio.CancelledError) and wake.woke and host.uncancel() == 0
            if not ours:
                # Cancelled from outside (server shutdown), or receive() failed: the
                # exchange goes too.
                child.cancel()
                await _join(child)
                raise
        finally:
            wake.watching = False
            if deadlines is not None:
                deadlines.discard(turn)
            tick = turn.ticker_task
            if tick is not None and not tick.done():
                tick.cancel()
        await _join(child)
        if not child.cancelled():
            failure = child.exception()
            if failure is not None:
                raise failure
        elif turn.expired:
            await self._deadline_passed(send, turn)

    def _expire(self, turns: list[tuple[_Turn, asyncio.Task[None]]]) -> None:
        # The native relay's total_timeout look (self._deadlines): the exchange of a turn
        # past it is cancelled (its upstream closes), and _race_native answers for it.
        limit = self.total_timeout
        if limit is None:
            return
        due = time.perf_counter() - limit
        for turn, child in turns:
            if turn.started <= due and not child.done():
                turn.expired = True
                child.cancel()

    async def _race(self, exchange: Exchange, receive: Receive, send: Send, turn: _Turn) -> None:
        # The exchange runs against the client's `http.disconnect` in one task group. It
        # runs in the child task and the watcher in this one: every upstream chunk resumes
        # the exchange's task, and a child's coroutine chain is a handful of frames deep
        # where this task's runs through the server and every middleware. Its exception is
        # re-raised here as itself, not as an exception group.
        failure: list[Exception] = []

        async def run(tg: anyio.abc.TaskGroup) -> None:
            try:
                limit = self.total_timeout
                if limit is None:
                    await exchange(send, turn, tg)
                else:
                    left = limit - (time.perf_counter() - turn.started)
                    with anyio.move_on_after(left) as deadline:
                        await exchange(send, turn, tg)
                    if deadline.cancelled_caught:
                        turn.expired = True
                        await self._deadline_passed(send, turn)
            except Exception as exc:
                failure.append(exc)
            finally:
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, tg)
            await self._watch_disconnect(receive, tg.cancel_scope, turn)
        if failure:
            raise failure[0]
        resumable = turn.resume is not None and turn.resume.announced
        if turn.client_gone and turn.outcome == "completed" and not resumable:
            turn.outcome = "client_disconnect"

    async def _watch_disconnect(
        self, receive: Receive, scope: anyio.CancelScope, turn: _Turn
    ) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if turn.response_done:
            # Servers answer receive() with http.disconnect once the response is complete
            # (uvicorn does): that is not the client leaving.
            return
        turn.client_gone = True
        # A resumable stream whose id the client got is finished into its buffer (and
        # on_complete) for a resume: its turn completes, unless finish_timeout cuts it.
        resumable = turn.resume is not None and turn.resume.announced
        if turn.outcome == "completed" and not resumable:
            turn.outcome = "client_disconnect"
        if not resumable and (self.on_disconnect == "cancel" or turn.collector is None):
            scope.cancel()
            return
        # "finish": keep reading so on_complete sees the whole turn, within a time limit.
        await anyio.sleep(self.finish_timeout)
        turn.outcome = "timeout"
        scope.cancel()

    async def _exchange(
        self,
        content: bytes,
        stream: bool,
        send: Send,
        turn: _Turn,
        tg: anyio.abc.TaskGroup | None,
    ) -> None:
        try:
            response = await self._send_upstream(self._request_headers[stream], content)
        except Exception as exc:
            _log_upstream_failure(turn, exc)
            if isinstance(exc, ResponseHeadTooLarge):
                message = f"The upstream's response head is larger than {exc.limit} bytes."
                await self._fail_before(send, turn, 502, message, "upstream_protocol_error")
            elif _is_timeout(exc):
                message = "The upstream timed out."
                await self._fail_before(send, turn, 504, message, "upstream_timeout")
            else:
                message = "Could not reach the upstream."
                await self._fail_before(send, turn, 502, message, "upstream_unreachable")
            return
        try:
            if not 200 <= response.status_code < 300:
                await self._upstream_status(response, send, turn)
            elif not is_identity(response.headers.get("content-encoding")):
                # We ask for identity; compressed bytes relayed as text would be garbage
                # behind a 200 (issue #14). The headers say so before any status is sent.
                message = "The upstream sent a compressed answer."
                await self._fail_before(send, turn, 502, message, "upstream_protocol_error")
            elif not stream:
                await self._relay_json(response, send, turn)
            else:
                ctype = response.headers.get("content-type", "")
                if not ctype.lower().startswith("text/event-stream"):
                    message = "The upstream answered a streaming request without an event stream."
                    await self._fail_before(send, turn, 502, message, "upstream_protocol_error")
                    return
                await self._relay_stream(response, send, turn, tg)
        finally:
            # Closing an unfinished response closes its connection: the upstream stops
            # generating. Shielded, because this runs when the watcher cancelled us; our
            # httptools client's close is synchronous and needs no shield.
            if tg is None:
                cast("_ClosesNow", response).close()
            else:
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await response.aclose()
            if turn.resume is not None:  # the end marker, also after a cut or a timeout
                with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
                    await turn.resume.close()

    def _choose_upstream(self) -> None:
        if not self._upstream_chosen:
            # Measured in docs/performance.md: no httpx objects per request or generators
            # per chunk, when no transport was given and this is asyncio.
            self._upstream = upstream = default_upstream(
                self._max_connections, self._timeout, self.max_response_head_bytes
            )
            self._native = _is_native(upstream)
            self._upstream_chosen = True

    async def _send_upstream(self, headers: dict[str, str], content: bytes) -> UpstreamResponse:
        self._choose_upstream()
        upstream = self._upstream
        if upstream is not None:
            return await upstream.send(self._url, headers, content)
        client = self._get_client()
        request = client.build_request("POST", self._url, headers=headers, content=content)
        limit = self.max_response_head_bytes
        try:
            response = await client.send(request, stream=True)
        except httpx.RemoteProtocolError as exc:
            if is_h11_head_overflow(exc):
                raise ResponseHeadTooLarge(limit) from exc
            raise
        # httpx's own bound is h11's buffer (100 KiB in httpcore); ours is checked here.
        if httpx_head_size(response) > limit:
            await response.aclose()
            raise ResponseHeadTooLarge(limit)
        return response

    async def _fail_before(
        self, send: Send, turn: _Turn, status: int, message: str, code: str
    ) -> None:
        turn.status = status
        turn.outcome = "timeout" if status == 504 else "upstream_error"
        turn.error = message
        rejection = ProxyRejection(status, message, code=code, error_type="api_error")
        await self._send_start_error(send, turn, rejection)

    async def _deadline_passed(self, send: Send, turn: _Turn) -> None:
        # The turn ran past total_timeout (issue #14: an upstream trickling a byte a second
        # never ended); its exchange was cancelled and the upstream closed.
        if turn.response_done:
            return  # it ended just as the deadline came
        logger.warning("turn exceeded total_timeout request_id=%s", turn.request_id)
        message = "The answer took longer than the proxy allows."
        if turn.status == 0:
            await self._fail_before(send, turn, 504, message, "upstream_timeout")
            return
        turn.outcome = "timeout"
        turn.error = message
        if turn.client_gone:
            return
        # After the start the status is fixed: an error frame, and no [DONE].
        await self._write(send, turn, error_frame(message, code="upstream_timeout"))
        writing = turn.ticker_writing
        if writing is not None:
            await writing.wait()
        turn.response_done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_start_error(self, send: Send, turn: _Turn, rejection: ProxyRejection) -> None:
        if turn.client_gone:
            return
        body = error_body(
            rejection.message,
            error_type=rejection.error_type,
            code=rejection.code,
            param=rejection.param,
            upstream=rejection.upstream,
        )
        if len(body) > _MAX_ERROR_BODY:  # an upstream object the redaction made larger
            body = error_body(
                rejection.message,
                error_type=rejection.error_type,
                code=rejection.code,
                param=rejection.param,
            )
        body = self._redact(body)
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", turn.request_id.encode()),
        ]
        headers += [(k.encode(), v.encode()) for k, v in rejection.headers.items()]
        turn.response_done = True
        await _send_simple(send, rejection.status, body, headers)
        turn.bytes_sent += len(body)
        turn.ttfb = time.perf_counter() - turn.started

    async def _upstream_status(self, response: UpstreamResponse, send: Send, turn: _Turn) -> None:
        status = response.status_code
        raw = await _read_capped(response, _MAX_ERROR_BODY)
        turn.outcome = "upstream_error"
        if status in (400, 404, 413, 422, 429):
            upstream = _upstream_error(self._redact(raw), self._api_key)
            message = upstream.message or f"The upstream answered {status}."
            headers = {}
            retry_after = response.headers.get("retry-after")
            if retry_after is not None and retry_after.strip().replace(".", "", 1).isdigit():
                headers["retry-after"] = retry_after.strip()
            # The upstream's own error object when it sent one (param and any extra keys
            # included, for the SDKs); else one built from what it did send.
            rejection = ProxyRejection(
                status,
                message,
                code=upstream.code,
                param=upstream.param,
                error_type=upstream.type or None,
                headers=headers,
                upstream=upstream.error,
            )
        else:
            # An upstream 401/403 means the server's key is wrong, not the browser's session.
            rejection = ProxyRejection(
                502,
                f"The upstream answered {status}.",
                code="upstream_error",
                error_type="api_error",
            )
        turn.status = rejection.status
        turn.error = rejection.message
        await self._send_start_error(send, turn, rejection)

    async def _relay_json(self, response: UpstreamResponse, send: Send, turn: _Turn) -> None:
        # Only JSON is answered (issue #14: a text/html 200 was served from the app's
        # origin), and only up to max_response_bytes is read into memory.
        if not is_json_answer(response.headers.get("content-type")):
            message = "The upstream answered a non-streaming request without JSON."
            await self._fail_before(send, turn, 502, message, "upstream_protocol_error")
            return
        limit = self.max_response_bytes
        length = response.headers.get("content-length", "").strip()
        try:
            too_long = length.isdigit() and int(length) > limit
            raw = None if too_long else await _read_up_to(response, limit)
        except Exception as exc:
            _log_upstream_failure(turn, exc)
            if _is_timeout(exc):
                message = "The upstream timed out."
                await self._fail_before(send, turn, 504, message, "upstream_timeout")
                return
            await self._fail_before(
                send, turn, 502, "The upstream response broke off.", "upstream_error"
            )
            return
        if raw is None:
            logger.warning("upstream answer too large request_id=%s", turn.request_id)
            message = f"The upstream's answer is larger than {limit} bytes."
            await self._fail_before(send, turn, 502, message, "upstream_response_too_large")
            return
        body = self._redact(raw)
        if turn.collector is not None:
            turn.collector.feed_json(body)
        turn.status = response.status_code
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", turn.request_id.encode()),
        ]
        if not turn.client_gone:
            turn.response_done = True
            await _send_simple(send, turn.status, body, headers)
            turn.ttfb = time.perf_counter() - turn.started
            turn.bytes_sent += len(body)

    async def _relay_stream(
        self,
        response: UpstreamResponse,
        send: Send,
        turn: _Turn,
        tg: anyio.abc.TaskGroup | None,
    ) -> None:
        start_headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache, no-transform"),
            (b"x-accel-buffering", b"no"),
            _NOSNIFF,
            (b"x-request-id", turn.request_id.encode()),
        ]
        resume = turn.resume
        if resume is not None:
            if await resume.open():
                start_headers.append((b"x-stream-id", resume.stream_id.encode()))
            else:
                resume = turn.resume = None
        # Set just before the start goes out: a status of 0 means none was sent.
        turn.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        if resume is not None:
            assert tg is not None  # resumable streams take the anyio relay
            resume.announce(turn, tg.cancel_scope, self._live_streams)
        turn.last_write = time.monotonic()
        keepalives = self._keepalives if tg is None else None
        if keepalives is not None:
            keepalives.add(turn, send)
        elif self.keepalive_interval is not None and tg is not None:
            tg.start_soon(self._keepalive, send, turn, self.keepalive_interval)
        splitter = EventSplitter()
        redact = None if self._redactor is None else self._redactor.stream().feed
        collector = turn.collector
        # From here on the status is fixed: a failure ends the stream with an error frame.
        try:
            # try/finally rather than contextlib.aclosing: no object for the whole stream.
            chunks = _raw_chunks(response)
            try:
                async for chunk in chunks:
                    out = splitter.feed(chunk)
                    if not out:
                        continue
                    if redact is not None:
                        out = redact(out)
                    if collector is not None:
                        collector.feed(out)
                    if resume is not None:
                        out = await resume.tag(out)
                    if not turn.client_gone:
                        await self._write(send, turn, out)
            finally:
                await chunks.aclose()
            rest = splitter.flush()
            if rest.strip(b"\r\n") and not _is_framed(response):
                # A close-delimited body ends with the connection, so a cut looks like an
                # end: a half event there is a cut, never forwarded as if whole (issue #14).
                raise httpx.RemoteProtocolError("the upstream closed the connection mid-event")
            if rest and redact is not None:
                rest = redact(rest)
            if rest:
                if collector is not None:
                    collector.feed(rest)
                if resume is not None:
                    rest = await resume.tag(rest)
                if not turn.client_gone:
                    await self._write(send, turn, rest)
        except Exception as exc:
            _log_upstream_failure(turn, exc)
            if _is_timeout(exc):
                message = "The upstream went silent."
                await self._fail_after(send, turn, "timeout", message, "upstream_timeout")
            else:
                message = "The upstream stream broke off."
                await self._fail_after(send, turn, "upstream_error", message, "upstream_error")
        finally:
            if keepalives is not None:
                keepalives.discard(turn)
        if resume is not None:
            resume.mark_complete()
        if not turn.client_gone:
            writing = turn.ticker_writing
            if writing is not None:
                await writing.wait()
            turn.response_done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _tick(self, streams: list[tuple[_Turn, Send]]) -> None:
        # The native relay's keep-alive look (self._keepalives): a stream silent for the
        # whole interval gets its comment from a short task.
        assert self.keepalive_interval is not None
        due = time.monotonic() - self.keepalive_interval
        loop = asyncio.get_running_loop()
        for turn, send in streams:
            if turn.last_write > due or turn.client_gone or turn.writing:
                continue  # writing: the relay is on it; look again next time
            tick = turn.ticker_task
            if tick is None or tick.done():
                turn.ticker_task = loop.create_task(self._tick_one(send, turn))

    async def _tick_one(self, send: Send, turn: _Turn) -> None:
        if turn.writing or turn.client_gone:
            return  # the relay began a write since the look: no comment needed
        try:
            await self._keepalive_once(send, turn)
        except Exception as exc:  # a gone client: the relay's watcher sees it
            logger.debug("keep-alive not sent: %s", type(exc).__name__)

    async def _fail_after(
        self,
        send: Send,
        turn: _Turn,
        outcome: Outcome,
        message: str,
        code: str,
        upstream: Mapping[str, object] | None = None,
    ) -> None:
        if turn.outcome == "completed":
            turn.outcome = outcome
        turn.error = message
        frame = self._redact(error_frame(message, code=code, upstream=upstream))
        if turn.resume is not None:
            frame = await turn.resume.tag(frame)
        if not turn.client_gone:
            await self._write(send, turn, frame)

    async def _write(self, send: Send, turn: _Turn, data: bytes) -> None:
        ticker = turn.ticker_writing
        if ticker is not None:
            await ticker.wait()
        turn.writing = True
        try:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            turn.writing = False
        if turn.ttfb is None:
            turn.ttfb = time.perf_counter() - turn.started
        turn.bytes_sent += len(data)
        turn.last_write = time.monotonic()

    async def _keepalive(self, send: Send, turn: _Turn, interval: float) -> None:
        # Load balancers cut idle connections (often after 60 s); a comment between two
        # events keeps them open and probes for a gone client. The relay never holds a
        # partial event on the wire, so this always lands at an event boundary.
        while not turn.client_gone:
            wait = turn.last_write + interval - time.monotonic()
            if turn.writing:
                wait = 0.001
            if wait > 0:
                await anyio.sleep(wait)
                continue
            await self._keepalive_once(send, turn)

    async def _keepalive_once(self, send: Send, turn: _Turn) -> None:
        done = turn.ticker_writing = anyio.Event()
        try:
            await send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})
        finally:
            turn.ticker_writing = None
            done.set()
        turn.bytes_sent += len(_KEEPALIVE)
        turn.last_write = time.monotonic()

    def _redact(self, data: bytes) -> bytes:
        # A whole body (an error, a JSON answer); streams use a StreamRedactor.
        redactor = self._redactor
        return data if redactor is None else redactor(data)

    # --- after the turn ---------------------------------------------------------------------

    def _log(self, turn: _Turn) -> None:
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

    def _usage_limiter(self) -> UsageLimiter | None:
        # Called on every request: an isinstance() against a runtime-checkable protocol
        # costs microseconds (about 2% of the proxy's CPU at 500 streams), so the answer is
        # kept for the limiter it was computed for (`rate_limiter` may be reassigned).
        limiter = self.rate_limiter
        if limiter is None:
            return None
        checked = self._usage_checked
        if checked is None or checked[0] is not limiter:
            usage = limiter if isinstance(limiter, UsageLimiter) else None
            checked = self._usage_checked = (limiter, usage)
        return checked[1]

    async def _complete(self, turn: _Turn) -> None:
        hook = self.on_complete
        limiter = self._usage_limiter()
        if turn.collector is None or turn.outcome == "rejected":
            return
        if hook is None and limiter is None:
            return
        try:
            record = turn.collector.record(
                request_id=turn.request_id,
                principal=turn.principal,
                model=turn.model,
                messages=turn.messages,
                outcome=turn.outcome,
                status=turn.status,
                error=turn.error,
                started_at=turn.wall,
                ttfb=turn.ttfb,
                duration=time.perf_counter() - turn.started,
                bytes_sent=turn.bytes_sent,
            )
        except Exception:
            logger.exception("on_complete failed request_id=%s", turn.request_id)
            return
        usage = record.usage if record.estimated_usage is None else record.estimated_usage
        if limiter is not None and turn.limit_key is not None and usage is not None:
            try:
                await limiter.record(turn.limit_key, usage)
            except Exception:
                # Like a failing hook: logged, and the finished response stays intact.
                logger.exception("rate_limiter.record failed request_id=%s", turn.request_id)
        if hook is None:
            return
        try:
            await _maybe_await(hook(record))
        except Exception:
            # A failing hook is the owner's bug; it must not break the (finished) response.
            logger.exception("on_complete failed request_id=%s", turn.request_id)


class _AtMountRoot:
    """Serve the proxy's root from a Starlette `Route` at an exact path (no 307)."""

    def __init__(self, proxy: ChatProxy) -> None:
        self._proxy = proxy

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        # The proxy's root, without a copy of the scope (a Route only passes "http"). Not
        # async: the Route awaits _chat's own coroutine, one frame less for the whole stream.
        return self._proxy._chat(scope, receive, send)


class _Front:
    """ASGI middleware: the proxy at one path, ahead of the app (ChatProxy.middleware)."""

    def __init__(self, app: ASGIApp, *, proxy: ChatProxy, path: str) -> None:
        self.app = app
        self._proxy = proxy
        self._path = path
        self._base = path.rstrip("/")  # "" for "/": then every path is below it
        self._below = self._base + "/"

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not async: the server awaits the coroutine of whoever answers, so a stream's task
        # holds no frame of this middleware.
        if scope["type"] == "http":
            path = _route_path(scope)
            if path == self._path:
                return self._proxy._chat(scope, receive, send)
            if path.startswith(self._below):
                # As a Mount would: the proxy sees the rest of the path below its root.
                root = str(scope.get("root_path", ""))
                child = dict(scope, root_path=root + self._base)
                return self._proxy(child, receive, send)
        return self.app(scope, receive, send)


# --- helpers --------------------------------------------------------------------------------


class _WakeHost:
    """The exchange task's done callback: cancels the watching task once (see _race_native).

    A slotted object rather than a closure over three cells: it lives as long as the stream.
    """

    __slots__ = ("host", "watching", "woke")

    def __init__(self, host: asyncio.Task[Any]) -> None:
        self.host = host
        self.watching = True
        self.woke = False

    def __call__(self, _: object) -> None:
        if self.watching:
            self.woke = True
            self.host.cancel()


class _ClosesNow(Protocol):
    def close(self) -> None: ...


def _is_native(upstream: Upstream | None) -> bool:
    # Imported only if default_upstream chose it (it needs httptools).
    native = sys.modules.get("tokenhub_stream._engine._http")
    return native is not None and isinstance(upstream, native.HttpUpstream)


async def _join(task: asyncio.Task[None]) -> None:
    # Wait for a task's end without taking its result or exception.
    if not task.done():
        await asyncio.wait((task,))


def _is_timeout(exc: BaseException) -> bool:
    # httpx-aiohttp maps every aiohttp.ClientConnectionError, "connection refused" included,
    # to httpx.ConnectTimeout: look at the cause to tell a refusal (502) from a timeout (504).
    cause = exc.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
        return False
    return isinstance(exc, httpx.TimeoutException | TimeoutError)


def _log_upstream_failure(turn: _Turn, exc: BaseException) -> None:
    cause = exc.__cause__
    logger.warning(
        "upstream failed request_id=%s error=%s%s",
        turn.request_id,
        type(exc).__name__,
        "" if cause is None else f" cause={type(cause).__name__}",
    )


def _fast_transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    # Measured in docs/performance.md ("Proxy benchmark"): at 500 streams httpx's own pool
    # costs ~27 ms CPU per stream and queues first tokens for seconds; aiohttp's pool and C
    # parser behind httpx's API (httpx-aiohttp) about 3 ms. aiohttp runs on asyncio only.
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not on asyncio (trio)
        return None
    try:
        module = importlib.import_module("httpx_aiohttp")
    except ImportError:
        return None
    transport = module.AiohttpTransport(limits=limits, trust_env=False)
    return cast(httpx.AsyncBaseTransport, transport)


def _raw_chunks(response: UpstreamResponse) -> AsyncGenerator[bytes, None]:
    # aiter_raw() is an async generator typed as an iterator; closing it explicitly frees
    # the connection at once instead of when the garbage collector gets to it.
    return cast("AsyncGenerator[bytes, None]", response.aiter_raw())


def _route_path(scope: Scope) -> str:
    path = str(scope["path"])
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        return path[len(root) :]
    return path


def _peer(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if isinstance(client, list | tuple) and client else None


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    raw = scope.get("headers", ())
    assert isinstance(raw, Iterable)
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out and key != "host" else text
    return out


def _json(obj: object) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


def _method_not_allowed(allowed: str) -> ProxyRejection:
    return ProxyRejection(
        405, "Method not allowed.", code="method_not_allowed", headers={"allow": allowed}
    )


def _too_large(limit: int) -> ProxyRejection:
    return ProxyRejection(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )


async def _send_simple(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [*headers, _NOSNIFF, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, rejection: ProxyRejection, request_id: str | None = None) -> None:
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
    await _send_simple(send, rejection.status, body, headers)


async def _read_up_to(response: UpstreamResponse, limit: int) -> bytes | None:
    # The body, or None past `limit`: read no further than one chunk beyond it (the
    # caller's close then drops the connection, and the upstream stops sending).
    if response.is_stream_consumed:  # a response built in memory (httpx.MockTransport)
        content = response.content
        return content if len(content) <= limit else None
    parts: list[bytes] = []
    size = 0
    chunks = _raw_chunks(response)
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
    finally:
        await chunks.aclose()
    return b"".join(parts)


def _is_framed(response: UpstreamResponse) -> bool:
    version = getattr(response, "http_version", "HTTP/1.1")
    return is_length_framed(response.headers, version if isinstance(version, str) else "HTTP/1.1")


async def _read_capped(response: UpstreamResponse, limit: int) -> bytes:
    if response.is_stream_consumed:  # a response built in memory (httpx.MockTransport)
        return response.content[:limit]
    parts: list[bytes] = []
    size = 0
    try:
        async with contextlib.aclosing(_raw_chunks(response)) as chunks:
            async for chunk in chunks:
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
    except httpx.HTTPError:
        pass
    return b"".join(parts)[:limit]


class _UpstreamError(NamedTuple):
    message: str | None = None
    type: str | None = None
    code: str | None = None
    param: str | None = None
    error: dict[str, object] | None = None  # the OpenAI-shaped object, passed on as is


def _upstream_error(raw: bytes, secret: str | None) -> _UpstreamError:
    import json

    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return _UpstreamError()
    if not isinstance(data, dict):
        return _UpstreamError()
    err = data.get("error", data)
    if isinstance(err, str):
        return _UpstreamError(err[:1000])
    if not isinstance(err, dict):
        return _UpstreamError()
    message = err.get("message")
    etype = err.get("type")
    code = err.get("code")
    param = err.get("param")
    return _UpstreamError(
        message[:1000] if isinstance(message, str) else None,
        etype if isinstance(etype, str) else None,
        str(code) if isinstance(code, str | int) and not isinstance(code, bool) else None,
        param if isinstance(param, str) else None,
        upstream_error_object(data, secret),
    )
