"""The Redis client every object of `tokenhub_stream.redis` opens or borrows.

The one place that imports redis-py (with the message that names the extra), and
`RedisBacked`, the base of the limiters (`_limits.py`) and the stream buffer
(`_streams.py`): a client made from a URL, which the object owns and `aclose()` closes,
or one passed in, which stays the caller's.
"""

from __future__ import annotations

from typing import Self

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub_stream.redis needs redis-py: pip install 'tokenhub_stream[redis]'"
    ) from exc

__all__ = ["RedisBacked", "RedisError", "aioredis"]


class RedisBacked:
    """An object whose state is in Redis: its client, and closing it (`async with`).

    Args:
        connection: a `redis://` / `rediss://` / `unix://` URL, or a `redis.asyncio.Redis`.
        max_connections: the pool size, for a client made from a URL.
        timeout: the longest wait for a free connection and for connecting.
        socket_timeout: redis-py's per-command socket timeout (`None`: none).

    Raises:
        TypeError: `connection` is neither a URL nor a `redis.asyncio.Redis`.
    """

    def __init__(
        self,
        connection: str | aioredis.Redis,
        *,
        max_connections: int,
        timeout: float,
        socket_timeout: float | None,
    ) -> None:
        if isinstance(connection, str):
            # A bounded pool: a burst of requests waits for a connection (within `timeout`)
            # instead of opening one each until Redis refuses every client (maxclients).
            pool = aioredis.BlockingConnectionPool.from_url(
                connection,
                max_connections=max_connections,
                timeout=timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=timeout,
            )
            self._redis: aioredis.Redis = aioredis.Redis.from_pool(pool)
            self._owns_client = True
        elif isinstance(connection, aioredis.Redis):
            self._redis = connection
            self._owns_client = False
        else:
            raise TypeError("connection must be a redis:// URL or a redis.asyncio.Redis")

    async def aclose(self) -> None:
        """Close the Redis connection pool, if this object created it from a URL."""
        if self._owns_client:
            await self._redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.aclose()
