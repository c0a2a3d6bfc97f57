"""App factories for the resumable-stream tests (`uvicorn --factory redis_tests.resume_apps:...`).

Configured from environment variables, since each runs in its own process:

- `UPSTREAM_URL` (required): the upstream API root.
- `REDIS_URL` (required): the Redis both proxies share.
- `RESUME_TTL`: seconds a finished stream stays resumable (default 300).

The proxy is served at `POST /api/chat`; the principal is the `X-User` header (401 without).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request

from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.redis import RedisStreamBuffer


def by_header(request: Request) -> str | None:
    return request.headers.get("x-user")


def resumable_proxy() -> Starlette:
    """ChatProxy with resumable streams in the Redis at `REDIS_URL`."""
    buffer = RedisStreamBuffer(os.environ["REDIS_URL"])
    proxy = ChatProxy(
        api_key=None,
        base_url=os.environ["UPSTREAM_URL"],
        authorize=by_header,
        stream_buffer=buffer,
        resume_ttl=float(os.environ.get("RESUME_TTL", "300")),
        keepalive_interval=None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with buffer, proxy:  # both belong to the server's event loop
            yield

    return Starlette(routes=proxy.routes("/api/chat"), lifespan=lifespan)
