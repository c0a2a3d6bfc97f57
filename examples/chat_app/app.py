"""Browser chat: a Starlette app that mounts ChatProxy at /api/chat and serves the chat page.

Run (inside the project's virtualenv):

    python examples/chat_app/app.py              # then open http://127.0.0.1:8000/
    python examples/chat_app/app.py --port 8080

This is what `tokenhub-stream serve` runs, written out: the page (`index.html`, `chat.js`,
`chat.css`, plain HTML and JS from the package's `cli/static/`) at `/`, and the key-hiding
proxy at `POST /api/chat` and `GET /api/chat/models`. To change the page, copy those three
files next to this one and swap the `StaticFiles(packages=...)` for
`StaticFiles(directory=..., html=True)`.

It talks to token-hub when TOKENHUB_KEY is set, or to any OpenAI-compatible server named by
TOKENHUB_BASE_URL (e.g. http://localhost:11434/v1 for Ollama, no key needed). With neither,
it starts the local test upstream of `tokenhub_stream.testing` in-process (the `cli` extra)
and says so on stderr: no key, no network.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from tokenhub_stream import DEFAULT_BASE_URL
from tokenhub_stream.asgi import ChatProxy


def upstream_models(base_url: str, api_key: str | None) -> list[str] | None:
    """The upstream's own model list, for the page's picker (None if it has none)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/models", headers=headers, timeout=5)
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]] or None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def build_app(base_url: str, api_key: str | None, *, local: bool = False) -> Starlette:
    models = upstream_models(base_url, api_key)
    proxy = ChatProxy(
        api_key=api_key or None,  # None: no key (vLLM, Ollama, the local upstream)
        base_url=base_url,
        default_model=models[0] if models else None,
        allowed_models=models,  # the browser may only ask for these
    )

    async def config(request: Request) -> JSONResponse:
        # Read by the page: the model selected at first, and whether to show the
        # "local test upstream" notice.
        return JSONResponse({"default_model": proxy.default_model, "local": local})

    page = StaticFiles(packages=[("tokenhub_stream.cli", "static")], html=True)
    return Starlette(
        routes=[
            *proxy.routes("/api/chat"),  # POST /api/chat without a 307, GET /api/chat/models
            Route("/config.json", config),
            Mount("/", page),
        ],
        lifespan=proxy.lifespan,  # closes the proxy's connection pool at shutdown
    )


@contextlib.contextmanager
def upstream() -> Iterator[tuple[str, str | None, bool]]:
    """(base_url, api_key, local) from the environment, or a local upstream started here."""
    key = os.environ.get("TOKENHUB_KEY") or None
    url = os.environ.get("TOKENHUB_BASE_URL") or None
    if key or url:
        yield url or DEFAULT_BASE_URL, key, False
        return
    from tokenhub_stream.testing import run_upstream

    with run_upstream() as running:
        print(
            "No TOKENHUB_KEY or TOKENHUB_BASE_URL: "
            f"using the local test upstream at {running.base_url}",
            file=sys.stderr,
        )
        yield running.base_url, None, True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with upstream() as (base_url, api_key, local):
        print(f"http://{args.host}:{args.port}/", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops the server
            uvicorn.run(build_app(base_url, api_key, local=local), host=args.host, port=args.port)
