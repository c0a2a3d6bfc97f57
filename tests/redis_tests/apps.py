"""App factories for `proxy_process` (run as `uvicorn --factory redis_tests.apps:<name>`).

Each is configured from environment variables, because it runs in a separate process:

- `UPSTREAM_URL` (required): the upstream API root, e.g. a `run_upstream(...).base_url`.
- `UPSTREAM_KEY`: the server key sent upstream (default: none).
- `REDIS_URL`: the shared Redis, for the factories that use it.
- `LIMIT_KIND` (`bucket` or `budget`), `LIMIT_REQUESTS`, `LIMIT_PREFIX`: for `limited_proxy`.

The proxy is served at `POST /api/chat`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from starlette.applications import Starlette

from tokenhub_stream.asgi import ChatProxy, RateLimiter
from tokenhub_stream.redis import RedisBudget, RedisRateLimiter

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


def limited_proxy() -> Starlette:
    """ChatProxy limited to `LIMIT_REQUESTS` requests per client on the Redis at `REDIS_URL`.

    `LIMIT_KIND=bucket`: a `RedisRateLimiter` with that burst and a refill too slow to
    matter during a test; `budget`: a `RedisBudget` of that many requests per hour.
    """
    url = os.environ["REDIS_URL"]
    n = int(os.environ["LIMIT_REQUESTS"])
    prefix = os.environ.get("LIMIT_PREFIX", "tokenhub-test:")
    limiter: RedisRateLimiter | RedisBudget
    if os.environ.get("LIMIT_KIND", "bucket") == "bucket":
        limiter = RedisRateLimiter(url, rate=1 / 3600, burst=n, prefix=prefix)
    else:
        limiter = RedisBudget(url, requests=n, window=3600, prefix=prefix)
    checked: RateLimiter = limiter
    return _app(_proxy(rate_limiter=checked), limiter)
