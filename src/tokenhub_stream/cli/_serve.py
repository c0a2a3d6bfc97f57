"""`tokenhub-stream serve`: the browser chat page, with `ChatProxy` mounted at `/api/chat`.

```python
from tokenhub_stream.cli._serve import create_app

app = create_app(base_url="http://127.0.0.1:11434/v1", api_key=None)  # uvicorn module:app
```

The app serves four things: the page at `/` (with its `chat.js` and `chat.css` from the
package's `cli/static/`, read through `importlib.resources` so they ship in the wheel),
`/config.json` (the default model, and whether the local upstream answers), and the proxy's
`POST /api/chat` and `GET /api/chat/models`. The page is plain HTML and JS with no build step.

Deliberate choices:

- The page is served with a strict Content-Security-Policy (scripts and styles only from
  this origin, no inline script): model output is rendered with `textContent` only, and the
  policy is a second fence should that ever slip.
- The model picker lists the upstream's own `GET /models` (fetched once at start), and the
  proxy is limited to those models, so the browser can only ask for what the upstream has.
- `ChatProxy` needs a key; an upstream without one (vLLM, Ollama, the local upstream) gets a
  placeholder bearer token, which those servers ignore.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Iterator, Sequence
from importlib import resources

import httpx

from .._config import DEFAULT_BASE_URL, DEFAULT_MODEL, env_base_url
from ..asgi import DEFAULT_KEEPALIVE_INTERVAL, ChatProxy
from ._upstream import Upstream, default_model, resolve_upstream

try:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute, Route
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub-stream serve needs Starlette and uvicorn: pip install 'tokenhub_stream[cli]'"
    ) from exc

__all__ = ["create_app", "run_serve"]

#: Sent upstream when there is no key: servers without auth ignore it.
NO_KEY = "no-key"
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
) -> Starlette:
    """Build the chat app: the page at `/` and `ChatProxy` at `/api/chat`.

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

    Returns:
        A Starlette app; its lifespan closes the proxy's connection pool.

    Raises:
        ValueError: an invalid `base_url`.
    """
    allowed = list(dict.fromkeys(models)) if models else None
    default = model or DEFAULT_MODEL
    if allowed is not None and default not in allowed:
        if model:
            allowed.append(model)
        else:
            default = allowed[0]
    proxy = ChatProxy(
        api_key=api_key or NO_KEY,
        base_url=base_url,
        default_model=default,
        allowed_models=allowed,
        keepalive_interval=keepalive_interval,
    )
    files = _read_static()
    config = json.dumps({"default_model": default, "local": local}).encode()

    def page(name: str) -> Route:
        body, media_type = files[name], _STATIC[name]

        async def endpoint(request: Request) -> Response:
            return Response(body, media_type=media_type, headers=_SECURITY_HEADERS)

        return Route("/" if name == "index.html" else f"/{name}", endpoint, methods=["GET"])

    async def config_json(request: Request) -> Response:
        return Response(config, media_type="application/json", headers=_SECURITY_HEADERS)

    routes: list[BaseRoute] = [
        *(page(name) for name in _STATIC),
        Route("/config.json", config_json, methods=["GET"]),
        *proxy.routes("/api/chat"),
    ]
    app = Starlette(routes=routes, lifespan=proxy.lifespan)
    app.state.proxy = proxy
    return app


@contextlib.contextmanager
def _resolve(base_url: str | None, api_key: str | None) -> Iterator[Upstream]:
    # The rule of issue #4, shared with `chat` and `ask` (`resolve_upstream`); a key passed
    # in explicitly counts as if it came from TOKENHUB_KEY.
    if api_key is None:
        with resolve_upstream(base_url) as upstream:
            yield upstream
        return
    yield Upstream((base_url or env_base_url() or DEFAULT_BASE_URL).rstrip("/"), api_key, False)


def _fetch_models(upstream: Upstream) -> list[str] | None:
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


def run_serve(
    *,
    host: str,
    port: int,
    base_url: str | None,
    api_key: str | None,
    model: str | None,
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

    Returns:
        0 once the server stopped.

    Raises:
        ImportError: uvicorn is not installed (`pip install 'tokenhub_stream[cli]'`).
        OSError: the address could not be bound.
    """
    try:
        import uvicorn
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "tokenhub-stream serve needs uvicorn: pip install 'tokenhub_stream[cli]'"
        ) from exc

    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(_resolve(base_url, api_key))
        app = create_app(
            base_url=upstream.base_url,
            api_key=upstream.api_key,
            model=model or default_model(upstream),
            models=_fetch_models(upstream),
            local=upstream.local,
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sys.stdout.write(_display_url(host, int(sock.getsockname()[1])) + "\n")
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
