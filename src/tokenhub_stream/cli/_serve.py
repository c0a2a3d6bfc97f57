"""`tokenhub-stream serve`: the browser chat page, with `ChatProxy` mounted at `/api/chat`.

```python
from tokenhub_stream.cli._serve import create_app

app = create_app(base_url="http://127.0.0.1:11434/v1", api_key=None)  # uvicorn module:app
```

The app serves the page at `/` (with its `chat.js` and `chat.css` from the package's
`cli/static/`, read through `importlib.resources` so they ship in the wheel), `/config.json`
(the default model, and whether the local upstream answers), and the proxy's
`POST /api/chat` and `GET /api/chat/models`. With a `ConversationStore` it also keeps the
history: every turn is written by the store's recorder, and `GET /api/conversations`,
`GET /api/conversations/{id}` and `DELETE /api/conversations/{id}` serve it to the page.
The page is plain HTML and JS with no build step.

Deliberate choices:

- The page is served with a strict Content-Security-Policy (scripts and styles only from
  this origin, no inline script): model output is rendered with `textContent` only, and the
  policy is a second fence should that ever slip.
- The model picker lists the upstream's own `GET /models` (fetched once at start), and the
  proxy is limited to those models, so the browser can only ask for what the upstream has.
- An upstream without a key (vLLM, Ollama, the local upstream) gets no `Authorization`
  header: `ChatProxy(api_key=None)`, no made-up placeholder token.
- `serve` has no login: with a store, the page gives each browser a random id in an
  HttpOnly, SameSite=Lax cookie, and the principal is a digest of it. Two browsers (or
  profiles) never see each other's history; the cookie itself is never stored or logged.
- Streams are resumable (in this process's memory): the page sends `X-Resumable: 1`,
  resumes from its last event id after a dropped connection, and stops with
  `DELETE /api/chat/streams/{id}`; a closed tab no longer cuts the answer, so a reload
  finds it whole in the history.
- The page learns of a finished turn before the proxy's `on_complete` has written it, so
  `GET /api/conversations?after=<x-request-id>` waits (briefly) for that turn's write.
- Every request passes `_Guard` first: a `Host` that is not one of the names the server
  listens as gets 400 (a page whose DNS name was re-pointed at 127.0.0.1, DNS rebinding,
  would otherwise be same-origin with the proxy), and with a token (`--require-token`,
  `TOKENHUB_SERVE_TOKEN`) a request without it gets 401. The token arrives once in the
  printed URL (`/?token=...`), which trades it for an HttpOnly cookie.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx

from .._config import DEFAULT_BASE_URL, DEFAULT_MODEL, env_base_url
from ..asgi import DEFAULT_KEEPALIVE_INTERVAL, ChatProxy, CompletionRecord
from ..asgi._admission import HostPattern, check_host, check_origin, parse_allowed_hosts
from ..asgi._wire import ProxyRejection, error_body
from ._upstream import ResolvedUpstream, default_model, resolve_upstream

try:
    from starlette.applications import Starlette
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import RedirectResponse, Response
    from starlette.routing import BaseRoute, Route
    from starlette.types import ASGIApp, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub-stream serve needs Starlette and uvicorn: pip install 'tokenhub_stream[cli]'"
    ) from exc

if TYPE_CHECKING:
    from ..store import Conversation, ConversationStore, Message

__all__ = ["LOCAL_HOSTS", "create_app", "default_store_url", "run_serve", "served_hosts"]

logger = logging.getLogger("tokenhub_stream.serve")

MODELS_TIMEOUT = 5.0

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
#: The history is private: no cache may keep it.
_PRIVATE_HEADERS = {**_SECURITY_HEADERS, "cache-control": "no-store"}

#: The browser's anonymous id (see the module docstring).
COOKIE = "tokenhub_browser"
#: 400 days, the longest lifetime Chrome keeps; every page load renews it.
COOKIE_MAX_AGE = 400 * 24 * 3600
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9_-]{32,128}")
_REQUEST_ID = re.compile(r"[0-9a-f]{1,64}")
#: The longest `GET /api/conversations?after=...` waits for a turn's write.
WRITE_WAIT = 3.0
#: Env var naming the store's SQLAlchemy URL (`--store-url` wins over it).
STORE_URL_ENV = "TOKENHUB_STORE_URL"
#: The names a server on this machine is reached as; `create_app` accepts only these by default.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: Env var holding the token `serve` then requires (`--require-token` makes up one without it).
TOKEN_ENV = "TOKENHUB_SERVE_TOKEN"
#: The cookie the token is traded for (see the module docstring).
TOKEN_COOKIE = "tokenhub_token"
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,256}")
_ANY_ADDRESS = ("", "0.0.0.0", "::")


def _read_static() -> dict[str, bytes]:
    folder = resources.files(__package__ or "tokenhub_stream.cli").joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in _STATIC}


def create_app(
    *,
    base_url: str | None,
    api_key: str | None,
    model: str | None = None,
    models: Sequence[str] | None = None,
    local: bool = False,
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    store: ConversationStore | None = None,
    allowed_hosts: Collection[str] | None = LOCAL_HOSTS,
    token: str | None = None,
) -> Starlette:
    """Build the chat app: the page at `/` and `ChatProxy` at `/api/chat` (with its
    `/api/chat/stats`, which the page shows in a small panel).

    ```python
    with run_upstream() as running:
        app = create_app(base_url=running.base_url, api_key=None, local=True)
        uvicorn.run(app, port=8000)
    ```

    Args:
        base_url: the upstream API root (`None`: token-hub's).
        api_key: the upstream key, kept on the server (`None`: the upstream needs none).
        model: the model selected when the page opens (default: `DEFAULT_MODEL`, or the
            first of `models` if that list lacks it).
        models: the models the picker offers and the proxy allows (`None`: any model, and
            the picker offers only the default).
        local: the upstream is the local test upstream; the page says so.
        keepalive_interval: passed to `ChatProxy`.
        store: keep the conversations there (each browser its own, by cookie) and serve
            them under `/api/conversations`; `None`: no history, and no cookie.
        allowed_hosts: the names the app is reached as (`ChatProxy`'s `allowed_hosts`
            syntax); any other `Host` gets 400 on every route, the guard against DNS
            rebinding. Default `LOCAL_HOSTS`; `None`: any host.
        token: require it on every request: `Authorization: Bearer <token>`, or the
            cookie that `GET /?token=<token>` sets; otherwise 401. `None`: no token.

    Returns:
        A Starlette app; its lifespan closes the proxy's connection pool (and the store's).

    Raises:
        ValueError: an invalid `base_url`, allowed host or token (16-256 characters of
            `A-Z a-z 0-9 . _ ~ -`).
    """
    allowed = list(dict.fromkeys(models)) if models else None
    default = model or DEFAULT_MODEL
    if allowed is not None and default not in allowed:
        if model:
            allowed.append(model)
        else:
            default = allowed[0]
    if token is not None and _TOKEN.fullmatch(token) is None:
        raise ValueError("the token must be 16-256 characters of A-Z a-z 0-9 . _ ~ -")
    hosts = None if allowed_hosts is None else parse_allowed_hosts(allowed_hosts)
    history = None if store is None else _History(store)
    proxy = ChatProxy(
        api_key=api_key or None,  # "" is no key too, as for TOKENHUB_KEY
        base_url=base_url,
        default_model=default,
        allowed_models=allowed,
        keepalive_interval=keepalive_interval,
        authorize=None if history is None else _authorize,
        on_request=None if history is None else history.recorder.on_request,
        on_complete=None if history is None else history.on_complete,
        # The page asks for resumable streams and resumes after a dropped connection.
        resumable=True,
        allowed_hosts=allowed_hosts,  # _Guard checks first; this holds wherever it is mounted
        stats=True,  # GET /api/chat/stats, for the page's panel
    )
    files = _read_static()
    config = json.dumps({"default_model": default, "local": local}).encode()

    def page(name: str) -> Route:
        body, media_type = files[name], _STATIC[name]

        async def endpoint(request: Request) -> Response:
            response = Response(body, media_type=media_type, headers=_SECURITY_HEADERS)
            if history is not None and name == "index.html":
                _set_browser_cookie(request, response)
            return response

        return Route("/" if name == "index.html" else f"/{name}", endpoint, methods=["GET"])

    async def config_json(request: Request) -> Response:
        return Response(config, media_type="application/json", headers=_SECURITY_HEADERS)

    routes: list[BaseRoute] = [
        *(page(name) for name in _STATIC),
        Route("/config.json", config_json, methods=["GET"]),
        *proxy.routes("/api/chat"),
        *(() if history is None else history.routes()),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with proxy.lifespan(app):
            try:
                yield
            finally:
                if store is not None:
                    await store.aclose()

    guard = Middleware(_Guard, hosts=hosts, token=token)
    app = Starlette(routes=routes, middleware=[guard], lifespan=lifespan)
    app.state.proxy = proxy
    app.state.store = store
    return app


# --- who may use it ---------------------------------------------------------------------------


def served_hosts(host: str, extra: Sequence[str] = ()) -> list[str]:
    """The names a server listening on `host` accepts: `LOCAL_HOSTS`, `host`, then `extra`.

    A wildcard address (`0.0.0.0`, `::`) is no name a browser sends, so it adds none: other
    machines then need `extra` (`--allowed-host`).
    """
    hosts = [*LOCAL_HOSTS, *(() if host in _ANY_ADDRESS else (host,)), *extra]
    return list(dict.fromkeys(hosts))


class _Guard:
    """ASGI middleware ahead of every route: the `Host` check (400), then the token (401)."""

    def __init__(
        self, app: ASGIApp, *, hosts: tuple[HostPattern, ...] | None, token: str | None
    ) -> None:
        self.app = app
        self._hosts = hosts
        self._token = None if token is None else token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self._hosts is not None:
            try:
                check_host(headers.get("host"), self._hosts)
            except ProxyRejection as rejection:
                response = _error(400, rejection.message, rejection.code or "host_not_allowed")
                await response(scope, receive, send)
                return
        if self._token is not None:
            request = Request(scope)
            if not self._has_token(request, self._token):
                await self._login(request, self._token)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _has_token(request: Request, token: bytes) -> bool:
        bearer = request.headers.get("authorization", "")
        if bearer[:7].lower() == "bearer " and _same(bearer[7:].strip(), token):
            return True
        cookie = request.cookies.get(TOKEN_COOKIE)
        return cookie is not None and _same(cookie, token)

    @staticmethod
    def _login(request: Request, token: bytes) -> Response:
        # The printed URL's `?token=`: traded for a cookie, and dropped from the address bar
        # (and so from the history and any Referer) by a redirect.
        given = request.query_params.get("token")
        if request.method != "GET" or given is None or not _same(given, token):
            message = "This server needs its token: open the URL it printed."
            return _error(401, message, "token_required")
        url = request.url
        response = RedirectResponse(url.remove_query_params("token"), status_code=303)
        response.set_cookie(
            TOKEN_COOKIE,
            given,
            max_age=COOKIE_MAX_AGE,
            path="/",
            httponly=True,
            samesite="lax",
            secure=url.scheme == "https",
        )
        response.headers.update(_PRIVATE_HEADERS)
        return response


def _same(given: str, token: bytes) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), token)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- history ----------------------------------------------------------------------------------


def browser_principal(request: Request) -> str | None:
    """The principal of the browser that sent `request`, or `None` without a valid cookie."""
    value = request.cookies.get(COOKIE)
    if value is None or _COOKIE_VALUE.fullmatch(value) is None:
        return None
    return principal_of(value)


def principal_of(cookie: str) -> str:
    """The principal stored for the browser cookie `cookie`."""
    # A digest, so the database and the proxy's log never hold the cookie, which is all it
    # takes to read this browser's history.
    return "browser:" + hashlib.sha256(cookie.encode()).hexdigest()[:32]


def _set_browser_cookie(request: Request, response: Response) -> None:
    value = request.cookies.get(COOKIE)
    if value is None or _COOKIE_VALUE.fullmatch(value) is None:
        value = secrets.token_urlsafe(32)
    response.set_cookie(
        COOKIE,
        value,
        max_age=COOKIE_MAX_AGE,
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def _authorize(request: Request) -> str:
    principal = browser_principal(request)
    if principal is None:
        raise HTTPException(401, "No browser session: reload the chat page.")
    return principal


class _Written:
    """The request ids whose turn the recorder has handled (written or logged as lost)."""

    def __init__(self, size: int = 1024) -> None:
        self._done: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._waiting: dict[str, anyio.Event] = {}
        self._size = size

    def mark(self, request_id: str) -> None:
        self._done[request_id] = None
        while len(self._done) > self._size:
            self._done.popitem(last=False)
        event = self._waiting.pop(request_id, None)
        if event is not None:
            event.set()

    async def wait(self, request_id: str, timeout: float) -> None:
        if request_id in self._done:
            return
        event = self._waiting.setdefault(request_id, anyio.Event())
        with anyio.move_on_after(timeout):
            await event.wait()
        if not event.is_set() and self._waiting.get(request_id) is event:
            del self._waiting[request_id]  # a bogus or rejected id must not stay here


class _History:
    """The store's proxy hooks and the `/api/conversations` routes, per browser."""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store
        self.recorder = store.recorder()
        self.written = _Written()

    async def on_complete(self, record: CompletionRecord) -> None:
        try:
            await self.recorder.on_complete(record)
        finally:
            self.written.mark(record.request_id)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/api/conversations", self.list_conversations, methods=["GET"]),
            Route("/api/conversations/{id}", self.conversation, methods=["GET", "DELETE"]),
        ]

    async def list_conversations(self, request: Request) -> Response:
        principal = browser_principal(request)
        if principal is None:
            return _unauthorized()
        after = request.query_params.get("after")
        if after and _REQUEST_ID.fullmatch(after):
            await self.written.wait(after, WRITE_WAIT)
        try:
            found = await self.store.list_conversations(principal)
        except Exception:
            return _store_failed()
        return _json({"conversations": [_summary(c) for c in found]})

    async def conversation(self, request: Request) -> Response:
        principal = browser_principal(request)
        if principal is None:
            return _unauthorized()
        conversation_id = str(request.path_params["id"])
        if request.method == "DELETE":
            # SameSite=Lax already keeps the cookie off cross-site DELETEs; this says so.
            try:
                check_origin(
                    request.headers, own_host=request.headers.get("host"), allowed_origins=None
                )
            except ProxyRejection as rejection:
                return _error(rejection.status, rejection.message, rejection.code or "forbidden")
            try:
                deleted = await self.store.delete_conversation(principal, conversation_id)
            except Exception:
                return _store_failed()
            return Response(status_code=204, headers=_PRIVATE_HEADERS) if deleted else _not_found()
        try:
            found = await self.store.get_conversation(principal, conversation_id)
        except Exception:
            return _store_failed()
        if found is None:
            return _not_found()
        return _json({**_summary(found), "messages": [_message(m) for m in found.messages]})


def _time(value: datetime) -> str:
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.isoformat()


def _summary(conversation: Conversation) -> dict[str, object]:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "created": _time(conversation.created),
        "updated": _time(conversation.updated),
        "message_count": conversation.message_count,
    }


def _message(message: Message) -> dict[str, object]:
    out: dict[str, object] = {"role": message.role, "content": message.content}
    if message.role == "assistant":
        out.update(
            model=message.model,
            outcome=message.outcome,
            error=message.error,
            finish_reason=message.finish_reason,
        )
        if message.refusal is not None:  # a declined structured output (#19)
            out["refusal"] = message.refusal
    return out


def _json(data: object) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(body, media_type="application/json", headers=_PRIVATE_HEADERS)


def _error(status: int, message: str, code: str) -> Response:
    error_type = "invalid_request_error" if status < 500 else "api_error"
    body = error_body(message, error_type=error_type, code=code)
    return Response(body, status, media_type="application/json", headers=_PRIVATE_HEADERS)


def _unauthorized() -> Response:
    return _error(401, "No browser session: reload the chat page.", "unauthorized")


def _not_found() -> Response:
    return _error(404, "No such conversation.", "not_found")


def _store_failed() -> Response:
    # The page shows the message; the details (which may name the database) go to the log.
    logger.exception("the conversation store failed")
    return _error(503, "The conversation store failed.", "store_unavailable")


@contextlib.contextmanager
def _resolve(base_url: str | None, api_key: str | None) -> Iterator[ResolvedUpstream]:
    # The rule of issue #4, shared with `chat` and `ask` (`resolve_upstream`); a key passed
    # in explicitly counts as if it came from TOKENHUB_KEY.
    if api_key is None:
        with resolve_upstream(base_url) as upstream:
            yield upstream
        return
    yield ResolvedUpstream(
        (base_url or env_base_url() or DEFAULT_BASE_URL).rstrip("/"), api_key, False
    )


def _fetch_models(upstream: ResolvedUpstream) -> list[str] | None:
    """The upstream's model ids, or `None` if it cannot list them."""
    headers = {"authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
    try:
        response = httpx.get(
            upstream.base_url.rstrip("/") + "/models",
            headers=headers,
            timeout=MODELS_TIMEOUT,
            trust_env=False,
        )
        response.raise_for_status()
        data = response.json().get("data")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return ids or None


def _display_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _warn_exposed(host: str, allowed_hosts: Sequence[str], token: str | None) -> None:
    if _is_loopback(host):
        return
    if host in _ANY_ADDRESS and not allowed_hosts:
        sys.stderr.write(
            "tokenhub-stream: listening on every interface, but only localhost names are "
            "accepted: add --allowed-host NAME for the name or address other machines use\n"
        )
    if token is None:
        sys.stderr.write(
            "tokenhub-stream: anyone who can reach this port can spend the upstream key: "
            "--require-token asks every browser for a token\n"
        )


def default_store_url() -> str:
    """Where `serve` keeps the history: a SQLite file in the user's data folder.

    `$XDG_DATA_HOME/tokenhub_stream/conversations.db`, else
    `~/.local/share/tokenhub_stream/conversations.db`.
    """
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec: a relative path is invalid and ignored.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return f"sqlite+aiosqlite:///{base / 'tokenhub_stream' / 'conversations.db'}"


def _open_store(store_url: str | None) -> ConversationStore | None:
    url = store_url or os.environ.get(STORE_URL_ENV) or None
    try:
        from ..store import ConversationStore
    except ImportError:
        if url is not None:
            raise ImportError(
                "--store-url needs the store extra: pip install 'tokenhub_stream[store]'"
            ) from None
        sys.stderr.write(
            "tokenhub-stream: conversation history is off: "
            "pip install 'tokenhub_stream[store]' to keep it\n"
        )
        return None
    from sqlalchemy.exc import ArgumentError

    try:
        store = ConversationStore(url or default_store_url())
    except ArgumentError as exc:
        raise ValueError(f"not a database URL for the conversation store: {exc}") from None
    where = store.url.database if store.url.get_backend_name() == "sqlite" else None
    shown = where or store.url.render_as_string(hide_password=True)
    sys.stderr.write(f"tokenhub-stream: conversations are kept in {shown} (--no-store: off)\n")
    return store


def run_serve(
    *,
    host: str,
    port: int,
    base_url: str | None,
    api_key: str | None,
    model: str | None,
    store_url: str | None = None,
    history: bool = True,
    allowed_hosts: Sequence[str] = (),
    require_token: bool = False,
) -> int:
    """Serve the chat page until Ctrl-C, printing its URL on stdout.

    ```python
    raise SystemExit(run_serve(host="127.0.0.1", port=8000, base_url=None, api_key=None,
                               model=None))
    ```

    Args:
        host: the address to listen on.
        port: the port (0 picks a free one; the printed URL has the real one).
        base_url: the upstream API root; `None` reads `TOKENHUB_BASE_URL`.
        api_key: the upstream key; `None` reads `TOKENHUB_KEY`. With neither a key nor a
            base URL, the local test upstream is started in-process and announced in one
            line on stderr (`resolve_upstream`).
        model: the model selected when the page opens.
        store_url: the conversation store's SQLAlchemy URL; `None` reads
            `TOKENHUB_STORE_URL`, else `default_store_url()`. Its location is announced in
            one line on stderr.
        history: keep conversations (needs the `store` extra; without it, and without a
            store URL, the page runs without history and says so on stderr).
        allowed_hosts: names accepted beside `LOCAL_HOSTS` and `host` itself (the
            `--allowed-host` option); any other `Host` gets 400 (`served_hosts`).
        require_token: require a token on every request: `TOKENHUB_SERVE_TOKEN`, else a
            random one; the printed URL carries it (`?token=...`). A set
            `TOKENHUB_SERVE_TOKEN` requires it even without this.

    Returns:
        0 once the server stopped.

    Raises:
        ImportError: uvicorn is not installed (`pip install 'tokenhub_stream[cli]'`), or a
            store URL was given without the `store` extra or its driver.
        ValueError: the store URL is not a database URL, `base_url` or an allowed host is
            invalid, or `TOKENHUB_SERVE_TOKEN` is not 16-256 characters of
            `A-Z a-z 0-9 . _ ~ -`.
        OSError: the address could not be bound.
    """
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "tokenhub-stream serve needs uvicorn: pip install 'tokenhub_stream[cli]'"
        ) from exc

    hosts = served_hosts(host, allowed_hosts)
    parse_allowed_hosts(hosts)  # a bad --allowed-host fails before anything starts
    token = os.environ.get(TOKEN_ENV) or (secrets.token_urlsafe(24) if require_token else None)
    if token is not None and _TOKEN.fullmatch(token) is None:
        raise ValueError(f"{TOKEN_ENV} must be 16-256 characters of A-Z a-z 0-9 . _ ~ -")
    _warn_exposed(host, allowed_hosts, token)
    with contextlib.ExitStack() as stack:
        store = _open_store(store_url) if history else None
        upstream = stack.enter_context(_resolve(base_url, api_key))
        app = create_app(
            base_url=upstream.base_url,
            api_key=upstream.api_key,
            model=model or default_model(upstream),
            models=_fetch_models(upstream),
            local=upstream.local,
            store=store,
            allowed_hosts=hosts,
            token=token,
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP: asyncio (when uvloop is missing) sets TCP_NODELAY only then; without
        # it Nagle holds small SSE writes for the browser's delayed ACK (40 ms).
        sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        url = _display_url(host, int(sock.getsockname()[1]))
        sys.stdout.write(url + ("" if token is None else f"?token={token}") + "\n")
        sys.stdout.flush()
        config = uvicorn.Config(
            app,
            log_level="warning",
            # An open chat stream must not hold Ctrl-C up for long.
            timeout_graceful_shutdown=2,
        )
        # uvicorn stops on the first Ctrl-C, then re-raises it once it has shut down.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run(sockets=[sock])
    return 0
