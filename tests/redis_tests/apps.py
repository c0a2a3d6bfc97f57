"""App factories for `proxy_process` (run as `uvicorn --factory redis_tests.apps:<name>`).

Each is configured from environment variables, because it runs in a separate process:

- `UPSTREAM_URL` (required): the upstream API root, e.g. a `run_upstream(...).base_url`.
- `UPSTREAM_KEY`: the server key sent upstream (default: none).
- `REDIS_URL`: the shared Redis, for the factories that use it.

The proxy is served at `POST /api/chat`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from tokenhub_stream.asgi import ChatProxy

CHAT_PATH = "/api/chat"


def _proxy(**options: object) -> ChatProxy:
    return ChatProxy(
        api_key=os.environ.get("UPSTREAM_KEY") or None,
        base_url=os.environ["UPSTREAM_URL"],
        **options,  # type: ignore[arg-type]
    )


def _app(proxy: ChatProxy, *closers: contextlib.AbstractAsyncContextManager[object]) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for closer in closers:
                await stack.enter_async_context(closer)
            await stack.enter_async_context(proxy)
            yield

    return Starlette(routes=proxy.routes(CHAT_PATH), lifespan=lifespan)


def plain_proxy() -> Starlette:
    """ChatProxy with no limits."""
    return _app(_proxy())
