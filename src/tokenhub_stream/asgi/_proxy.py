"""`ChatProxy`: its settings, mounting (routes, middleware, lifespan) and dispatch.

A chat request goes: `_chat` -> `_prepare` (the gate, the body) -> the relay's race of the
exchange (`Passthrough.exchange`, or the tool loop's `ToolExchange.run`) against the
client's leaving -> the log line -> the record (`on_complete`, a `UsageLimiter`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Literal

import httpx

from ..__version__ import __version__
from .._config import Timeout
from .._engine import DEFAULT_MAX_RESPONSE_HEAD_BYTES
from .._genai import provider_name, server_of
from ..tools._core import DEFAULT_MAX_TURNS
from ._admission import AuthorizeHook, Gate
from ._body import (
    DEFAULT_ALLOWED_FIELDS,
    OutputCaps,
    outgoing_body,
    parse_body,
    parse_content_type,
    validate_body,
)
from ._buffers import DEFAULT_RESUME_TTL, InMemoryStreamBuffer, ResumableStream, StreamBuffer
from ._limits import RateLimiter
from ._passthrough import Passthrough
from ._record import OnCompleteHook, TurnCollector
from ._redact import KeyRedactor, check_api_key
from ._relay import Relay
from ._resume import ResumeRoute, wants_resumable
from ._telemetry import PrincipalHook, ProxyObserver
from ._turn import (
    Receive,
    Scope,
    Send,
    Turn,
    log_turn,
    maybe_await,
    method_not_allowed,
    peer,
    request_headers,
    route_path,
    send_error,
    send_simple,
)
from ._upstream import Upstreams
from ._wire import ProxyRejection

try:
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.routing import BaseRoute, Mount, Route
    from starlette.types import ASGIApp
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub_stream.asgi needs Starlette: pip install 'tokenhub_stream[asgi]'"
    ) from exc

if TYPE_CHECKING:
    from ..tools import ToolsTypes
    from ._tools import ToolSettings

__all__ = ["ChatProxy"]

logger = logging.getLogger("tokenhub_stream.asgi")

DEFAULT_MAX_BODY_BYTES = 256 * 1024
DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_PROXY_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=10.0)
DEFAULT_FINISH_TIMEOUT = 120.0
#: Resumes one principal (or client address) may hold open at once in one process.
DEFAULT_MAX_RESUMES_PER_PRINCIPAL = 4
DEFAULT_MAX_RESPONSE_BYTES = 4 * 1024 * 1024
DEFAULT_TOTAL_TIMEOUT = 600.0

OnRequestHook = Callable[
    [Request, dict[str, object]], Awaitable[Mapping[str, object]] | Mapping[str, object]
]


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
        transport: an `httpx.AsyncBaseTransport` for the upstream (then httpx sends). Default,
            when the server runs on asyncio: our HTTP/1.1 engine on httptools' C parser (the
            `asgi` extra; measured in docs/performance.md), for plain, resumable and tool
            streams alike; under trio, httpx's own transport.
        tools: run the tool loop server-side with these tools (a `ToolSet`, `Tool`s or
            functions): the browser gets content deltas only, tool progress as SSE
            comments, and one `[DONE]`; a body with `tools`/`tool_choice` is a 400.
        max_tool_turns: the most upstream requests one tool-using answer may make.
        strict_schemas: send the tools' schemas with `strict: true` (they are strict-ready;
            docs/structured.md); False leaves it out, for upstreams that reject it (vLLM,
            SGLang).
        resumable: offer resumable streams to requests that ask with `X-Resumable: 1`:
            `X-Stream-Id`, `id:` lines, `GET <mount>/streams/{id}` (docs: "Resumable
            streams"). Implied by `stream_buffer`; not available with `tools`.
        stream_buffer: where resumable streams are kept (default: `InMemoryStreamBuffer()`;
            `tokenhub_stream.redis.RedisStreamBuffer` behind several processes).
        max_resumes_per_principal: resumes (`GET <mount>/streams/{id}`) one principal, or
            client address, may hold open at once in this process; more get 429. Resumes
            also pass `authorize` and take from `rate_limiter` like chats.
        resume_ttl: seconds a finished stream stays resumable.
        stats: serve `GET <mount>/stats` (behind `authorize`): a JSON snapshot of this
            process's counters (open streams, turns by outcome, p50/p95 time to first
            token, tokens/s, bytes, keep-alives; docs/proxy.md, "Live stats"). Counting
            tokens reads a copy of each stream, as `on_complete` does.
        telemetry_principal: `principal -> str | None`, the `enduser.id` recorded on the
            request's span and the per-turn metrics when OpenTelemetry is on
            (docs/observability.md); without it no principal is recorded.

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
        strict_schemas: bool = True,
        resumable: bool = False,
        stream_buffer: StreamBuffer | None = None,
        max_resumes_per_principal: int = DEFAULT_MAX_RESUMES_PER_PRINCIPAL,
        resume_ttl: float = DEFAULT_RESUME_TTL,
        stats: bool = False,
        telemetry_principal: PrincipalHook | None = None,
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
        self.authorize = authorize
        self.rate_limiter = rate_limiter
        self.on_request = on_request
        self.on_complete = on_complete
        self.on_disconnect = on_disconnect
        self.finish_timeout = finish_timeout
        self.keepalive_interval = keepalive_interval
        self.total_timeout = total_timeout
        self.max_response_head_bytes = max_response_head_bytes
        self.max_response_bytes = max_response_bytes
        self.tools = tool_set
        self.max_tool_turns = max_tool_turns
        if resumable and stream_buffer is None:
            stream_buffer = InMemoryStreamBuffer()
        self.stream_buffer = stream_buffer
        self.resume_ttl = resume_ttl
        self.max_resumes_per_principal = max_resumes_per_principal
        timeouts = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        # None when there is no key: an empty key would "match" everywhere.
        redactor = KeyRedactor(api_key) if api_key else None
        user_agent = f"tokenhub_stream/{__version__}"
        headers = {
            **({"authorization": f"Bearer {api_key}"} if api_key else {}),
            "content-type": "application/json",
            "accept-encoding": "identity",
            "user-agent": user_agent,
        }
        # The parts, each built once; they import downward only (docs/architecture.md).
        self._gate = Gate(self, allowed_hosts=allowed_hosts, trusted_proxies=trusted_proxies)
        self._relay = Relay(
            keepalive_interval=keepalive_interval,
            total_timeout=total_timeout,
            redactor=redactor,
        )
        self._upstreams = Upstreams(
            max_connections=max_connections,
            timeout=timeouts,
            max_head_bytes=max_response_head_bytes,
            transport=transport,
        )
        # Resumable streams relayed by this process, for DELETE <mount>/streams/{id}.
        live_streams: dict[str, ResumableStream] = {}
        self._passthrough = Passthrough(
            settings=self,
            relay=self._relay,
            upstreams=self._upstreams,
            url=base + "/chat/completions",
            # The upstream request's headers by `stream`, built once (never mutated after).
            headers={
                stream: {**headers, "accept": accept}
                for stream, accept in ((True, "text/event-stream"), (False, "application/json"))
            },
            api_key=api_key,
            redactor=redactor,
            live_streams=live_streams,
        )
        self._observer = ProxyObserver(
            stats=stats,
            principal=telemetry_principal,
            server=server_of(base),
            provider=provider_name(server_of(base)[0]),
        )
        self._resume = ResumeRoute(
            settings=self,
            gate=self._gate,
            relay=self._relay,
            live_streams=live_streams,
            idle=(timeouts.read or 120.0) + 10.0,
        )
        self._tool_settings: ToolSettings | None = None
        if tool_set is not None:
            from ._tools import ToolSettings

            read = timeouts.read
            self._tool_settings = ToolSettings(
                tools=tool_set,
                max_turns=max_tool_turns,
                api_key=api_key,
                base_url=base,
                default_model=self.default_model,
                timeout=Timeout(connect=timeouts.connect, first_token=read, idle=read),
                user_agent=user_agent,
                max_head_bytes=max_response_head_bytes,
                redactor=redactor,
                strict_schemas=strict_schemas,
            )

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
        await self._upstreams.aclose()

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

    # --- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = route_path(scope)
            if path in ("", "/"):
                await self._chat(scope, receive, send)  # checks the host itself (_prepare)
                return
            if self._gate.checks_hosts:
                try:
                    self._gate.own_host(request_headers(scope), peer(scope))
                except ProxyRejection as rejection:
                    await send_error(send, rejection)
                    return
            if path.rstrip("/") == "/models":
                await self._models(scope, send)
            elif path.rstrip("/") == "/stats" and self._observer.stats is not None:
                await self._stats(scope, send)
            elif path.startswith("/streams/"):
                await self._resume.serve(scope, receive, send, path[len("/streams/") :])
            else:
                await send_error(send, ProxyRejection(404, "Not found.", code="not_found"))
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
                raise method_not_allowed("GET")
            await self._gate.authorize(Request(scope))
        except ProxyRejection as rejection:
            await send_error(send, rejection)
            return
        models = sorted(self.allowed_models) if self.allowed_models else [self.default_model]
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "tokenhub"} for m in models]
        body = _json({"object": "list", "data": data})
        await send_simple(send, 200, body, [(b"content-type", b"application/json")])

    async def _stats(self, scope: Scope, send: Send) -> None:
        # GET <mount>/stats: this process's counters, behind the same gate as the chat.
        stats = self._observer.stats
        assert stats is not None
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise method_not_allowed("GET")
            await self._gate.authorize(Request(scope))
        except ProxyRejection as rejection:
            await send_error(send, rejection)
            return
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send_simple(send, 200, _json(stats.snapshot()), headers)

    # --- POST <mount> -----------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        # POST <mount>: one chat turn.
        turn = Turn()
        self._observer.begin(scope, turn)
        try:
            request_body, stream = await self._prepare(scope, receive, turn)
        except ProxyRejection as rejection:
            turn.status = rejection.status
            turn.outcome = "rejected"
            await send_error(send, rejection, turn.request_id)
            log_turn(turn)
            return
        except Exception:
            # A failing hook (authorize, rate_limiter, on_request): a key-free 500.
            logger.exception("request failed before forwarding request_id=%s", turn.request_id)
            turn.status = 500
            turn.outcome = "rejected"
            failure = ProxyRejection(
                500, "The proxy failed.", code="internal_error", error_type="api_error"
            )
            await send_error(send, failure, turn.request_id)
            log_turn(turn)
            return
        usage_limiter = self._gate.usage_limiter()
        if self.on_complete is not None or usage_limiter is not None or turn.watch is not None:
            # The tool loop hands over its answer as one chat.completion object.
            turn.collector = TurnCollector(
                stream=stream and self.tools is None, request_bytes=len(request_body)
            )
        if stream and self.stream_buffer is not None:
            headers = request_headers(scope)
            if wants_resumable(headers):
                owner = self._gate.client_key(turn.principal, peer(scope), headers)
                turn.resume = ResumableStream(self.stream_buffer, owner, self.resume_ttl)
        try:
            exchange: Coroutine[Any, Any, None]
            if self._tool_settings is None:
                exchange = self._passthrough.exchange(request_body, stream, send, turn)
            else:
                from ._tools import ToolExchange

                tools = ToolExchange(
                    self._tool_settings,
                    self._relay,
                    self._upstreams.tool_transport(),
                    request_body,
                    stream,
                    want_usage=self.on_complete is not None or usage_limiter is not None,
                )
                exchange = tools.run(send, turn)
            # Awaited here, not through a helper: each coroutine frame on this task's
            # chain stays for the whole stream (docs/performance.md).
            await self._relay.race(turn, exchange, receive, send, self._leave)
        finally:
            log_turn(turn)
        await self._report(turn)

    def _leave(self, turn: Turn) -> float | None:
        # The client left before the answer ended. A resumable stream whose id it got is
        # finished into its buffer (and on_complete) for a resume; with "finish",
        # on_complete sees the whole turn; both within finish_timeout. Else: cancel now.
        resumable = turn.resume is not None and turn.resume.announced
        if turn.outcome == "completed" and not resumable:
            turn.outcome = "client_disconnect"
        if not resumable and (self.on_disconnect == "cancel" or turn.collector is None):
            return None
        return self.finish_timeout

    async def _prepare(self, scope: Scope, receive: Receive, turn: Turn) -> tuple[bytes, bool]:
        gate = self._gate
        headers = request_headers(scope)
        address = peer(scope)
        own_host = gate.own_host(headers, address)
        if scope["method"] != "POST":
            raise method_not_allowed("POST")
        gate.check_origin(headers, own_host)
        charset = parse_content_type(headers.get("content-type"))
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        request = Request(scope)
        await gate.admit(request, turn, headers, address)
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
            rewritten = await maybe_await(self.on_request(request, body))
            if not isinstance(rewritten, Mapping):
                raise TypeError("on_request must return the body mapping")
            body = dict(rewritten)
        model = body.get("model")
        turn.model = model if isinstance(model, str) else "-"
        usage_limiter = gate.usage_limiter()
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
        if turn.watch is not None:
            turn.watch.request(body, stream)
        return content, stream

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

    async def _report(self, turn: Turn) -> None:
        # After the turn: its record to on_complete, its usage to a UsageLimiter. Either
        # failing is logged and never breaks the (finished) response.
        hook = self.on_complete
        limiter = self._gate.usage_limiter()
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
                logger.exception("rate_limiter.record failed request_id=%s", turn.request_id)
        if hook is None:
            return
        try:
            await maybe_await(hook(record))
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
            path = route_path(scope)
            if path == self._path:
                return self._proxy._chat(scope, receive, send)
            if path.startswith(self._below):
                # As a Mount would: the proxy sees the rest of the path below its root.
                root = str(scope.get("root_path", ""))
                child = dict(scope, root_path=root + self._base)
                return self._proxy(child, receive, send)
        return self.app(scope, receive, send)


def _json(obj: object) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":")).encode()


def _too_large(limit: int) -> ProxyRejection:
    return ProxyRejection(
        413, f"The request body is larger than {limit} bytes.", code="request_too_large"
    )
