"""Rate limits and budgets shared by every worker and machine, kept in Redis.

Each check is one Lua script (EVALSHA, loaded again when the server lost it), so a read,
the decision and the write happen atomically on the server, whatever the number of proxy
processes. The scripts read the clock with Redis' `TIME`, so machines with skewed clocks
still share one timeline.

When Redis fails (down, unreachable, slower than `timeout`), `on_redis_error` decides:
`"closed"` (the default) refuses the request with a short `Retry-After`, so an outage
cannot turn into unmetered spending; `"open"` lets it through. Either way a warning is
logged, with no URL, password or upstream key in it.
"""

from __future__ import annotations

import logging
import math
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

from ._connection import RedisBacked, RedisError, aioredis

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from .._models import Usage

__all__ = [
    "BudgetUsage",
    "OnRedisError",
    "RedisBudget",
    "RedisRateLimiter",
]

logger = logging.getLogger("tokenhub_stream.redis")

OnRedisError = Literal["open", "closed"]

DEFAULT_RATE_LIMIT_PREFIX = "tokenhub:ratelimit:"
DEFAULT_BUDGET_PREFIX = "tokenhub:budget:"
DEFAULT_REDIS_TIMEOUT = 1.0
DEFAULT_ERROR_RETRY_AFTER = 1.0
#: Connections a limiter made from a URL opens at most (per process).
DEFAULT_MAX_CONNECTIONS = 16
_WARNING_INTERVAL = 10.0

# KEYS[1]: the bucket (a hash: tokens, ts). ARGV: rate (tokens/s), burst, cost.
# Returns {allowed (0/1), seconds to wait as a string} (Lua numbers reach Redis as integers).
_TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate)
end
if tokens < cost then
  return {0, tostring((cost - tokens) / rate)}
end
tokens = tokens - cost
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
-- A bucket left alone this long is full again: forgetting it changes nothing.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {1, '0'}
"""

# KEYS[1]: the principal's budget (a hash: w = window number, r = requests, t = tokens).
# ARGV: window seconds, max requests (-1: none), max tokens (-1: none), tokens to add.
# Tokens to add = -1: check and count one request; 0: only read; > 0: add them.
# Returns {allowed (0/1), requests, tokens, seconds until the window ends as a string}.
_BUDGET = """
local window = tonumber(ARGV[1])
local max_requests = tonumber(ARGV[2])
local max_tokens = tonumber(ARGV[3])
local add_tokens = tonumber(ARGV[4])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local index = math.floor(now / window)
local state = redis.call('HMGET', KEYS[1], 'w', 'r', 't')
local requests = tonumber(state[2]) or 0
local tokens = tonumber(state[3]) or 0
if tonumber(state[1]) ~= index then
  requests = 0
  tokens = 0
end
local reset = (index + 1) * window - now
if add_tokens < 0 then
  if (max_requests >= 0 and requests >= max_requests)
      or (max_tokens >= 0 and tokens >= max_tokens) then
    return {0, requests, tokens, tostring(reset)}
  end
  requests = requests + 1
elseif add_tokens == 0 then
  return {1, requests, tokens, tostring(reset)}
else
  tokens = tokens + add_tokens
end
redis.call('HSET', KEYS[1], 'w', string.format('%d', index), 'r', requests, 't', tokens)
redis.call('PEXPIRE', KEYS[1], math.ceil(reset * 1000) + 1000)
return {1, requests, tokens, tostring(reset)}
"""


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """What one key has spent in the current window of a `RedisBudget`.

    `reset_after` is the number of seconds until the window ends and the counts restart.
    """

    requests: int
    tokens: int
    reset_after: float


class _RedisLimit(RedisBacked):
    """The Redis connection, key prefix, timeout and error policy of one limiter."""

    def __init__(
        self,
        connection: str | aioredis.Redis,
        prefix: str,
        on_redis_error: OnRedisError,
        error_retry_after: float,
        timeout: float,
        max_connections: int,
    ) -> None:
        if on_redis_error not in ("open", "closed"):
            raise ValueError("on_redis_error must be 'open' or 'closed'")
        if not isinstance(prefix, str):
            raise ValueError("prefix must be a string")
        if not error_retry_after > 0:
            raise ValueError("error_retry_after must be positive")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if isinstance(max_connections, bool) or max_connections < 1:
            raise ValueError("max_connections must be a positive integer")
        self._secrets: tuple[str, ...] = ()
        if isinstance(connection, str):
            parsed = urllib.parse.urlsplit(connection)
            if parsed.scheme not in ("redis", "rediss", "unix"):
                raise ValueError("the Redis URL must start with redis://, rediss:// or unix://")
            secrets = (parsed.password, urllib.parse.unquote(parsed.password or ""))
            self._secrets = tuple(s for s in secrets if s)
        super().__init__(
            connection, max_connections=max_connections, timeout=timeout, socket_timeout=timeout
        )
        self.prefix = prefix
        self.on_redis_error: OnRedisError = on_redis_error
        self.error_retry_after = error_retry_after
        self.timeout = timeout
        self._last_warning = -math.inf
        self._suppressed = 0

    def _script(self, source: str) -> AsyncScript:
        return self._redis.register_script(source)

    async def _run(self, script: AsyncScript, key: str, args: list[str]) -> list[object]:
        # `AsyncScript` sends EVALSHA and falls back to SCRIPT LOAD on NOSCRIPT (a restarted
        # or flushed server). The whole call is bounded: a hung Redis must not hang requests.
        with anyio.fail_after(self.timeout):
            result = await script(keys=[self.prefix + key], args=args)
        if not isinstance(result, list):  # pragma: no cover - the scripts return tables
            raise RedisError("unexpected script result")
        return result

    async def _take(
        self, script: AsyncScript, key: str, args: list[str], action: str
    ) -> float | None:
        """Run a checking script: `None` if it allowed the request, else the seconds to
        wait (the script's last value), or what `on_redis_error` says if Redis failed."""
        try:
            result = await self._run(script, key, args)
        except (RedisError, OSError, TimeoutError) as exc:
            return self._on_error(action, exc)
        return None if result[0] == 1 else max(float(_text(result[-1])), 0.001)

    def _on_error(self, action: str, exc: BaseException) -> float | None:
        # Log without secrets: redis-py's messages name host and port, never the password,
        # but a URL-shaped message is scrubbed anyway.
        detail = str(exc) or type(exc).__name__
        for secret in self._secrets:
            detail = detail.replace(secret, "[redacted]")
        now = time.monotonic()
        if now - self._last_warning >= _WARNING_INTERVAL:
            suppressed = (
                f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
            )
            logger.warning(
                "Redis failed during %s, failing %s: %s: %s%s",
                action,
                self.on_redis_error,
                type(exc).__name__,
                detail,
                suppressed,
            )
            self._last_warning = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        return None if self.on_redis_error == "open" else self.error_retry_after


class RedisRateLimiter(_RedisLimit):
    """A token bucket per key in Redis, shared by every process using the same server.

    ```python
    from tokenhub_stream.redis import RedisRateLimiter

    limiter = RedisRateLimiter("redis://localhost:6379/0", rate=1 / 6, burst=10)
    proxy = ChatProxy(api_key=key, base_url=url, rate_limiter=limiter)
    ```

    A `RateLimiter` for `ChatProxy`: `acquire(key)` takes one token from the bucket of `key`
    (each bucket holds `burst` tokens and refills at `rate` per second) and returns `None`,
    or the seconds until a token is back. The check and the take are one Lua script, so N
    workers together allow exactly `burst` requests at once. Buckets expire in Redis once
    they would be full again.

    Args:
        connection: a `redis://` / `rediss://` / `unix://` URL (this object then owns the
            connection pool and `aclose()` closes it), or a `redis.asyncio.Redis` you own.
        rate: tokens added per second.
        burst: bucket size, the requests allowed at once.
        prefix: prepended to every Redis key, to share a server between apps.
        on_redis_error: `"closed"` refuses requests while Redis fails (with
            `error_retry_after`); `"open"` lets them through. Both log a warning.
        error_retry_after: the `Retry-After` seconds of a request refused because Redis failed.
        timeout: the most seconds one check may take before it counts as a Redis failure
            (waiting for a free connection included).
        max_connections: the most connections to Redis this object opens, when made from
            a URL (a client you pass keeps its own pool).

    Raises:
        ValueError: a non-positive rate, burst, timeout, error_retry_after or
            max_connections, a bad URL scheme or an unknown `on_redis_error`.
        TypeError: `connection` is neither a URL nor a `redis.asyncio.Redis`.
    """

    def __init__(
        self,
        connection: str | aioredis.Redis,
        *,
        rate: float = 1.0,
        burst: int = 10,
        prefix: str = DEFAULT_RATE_LIMIT_PREFIX,
        on_redis_error: OnRedisError = "closed",
        error_retry_after: float = DEFAULT_ERROR_RETRY_AFTER,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if not rate > 0 or math.isinf(rate):
            raise ValueError("rate must be a positive number")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError("burst must be a positive integer")
        limit = (prefix, on_redis_error, error_retry_after, timeout, max_connections)
        super().__init__(connection, *limit)
        self.rate = float(rate)
        self.burst = burst
        self._bucket = self._script(_TOKEN_BUCKET)

    def __repr__(self) -> str:
        return (
            f"RedisRateLimiter(rate={self.rate!r}, burst={self.burst!r}, prefix={self.prefix!r}, "
            f"on_redis_error={self.on_redis_error!r})"
        )

    async def acquire(self, key: str) -> float | None:
        """Take one token for `key`: `None` if allowed, else the seconds until one is back."""
        args = [repr(self.rate), str(self.burst), "1"]
        return await self._take(self._bucket, key, args, "a rate-limit check")


class RedisBudget(_RedisLimit):
    """A per-principal budget of requests and tokens per time window, in Redis.

    ```python
    from tokenhub_stream.redis import RedisBudget

    budget = RedisBudget("redis://localhost:6379/0", requests=200, tokens=100_000, window=86400)
    proxy = ChatProxy(api_key=key, base_url=url, rate_limiter=budget, max_tokens_cap=2048)
    ```

    As a `ChatProxy` `rate_limiter`, `acquire(key)` refuses (with the seconds until the
    window ends) once the key made `requests` requests or used `tokens` tokens in the
    current window, and counts one request otherwise. It is also a `UsageLimiter`: after
    each turn the proxy calls `record(key, usage)`, which adds the turn's total tokens.
    The proxy asks streamed turns for their usage, and charges an estimate for a turn that
    ended without it (a client that left early). Tokens are checked before a turn and
    charged after it, so the last turn of a window may overshoot `tokens` by at most one
    answer (`max_tokens_cap` bounds it).

    Windows are fixed (aligned to multiples of `window` seconds of Redis' clock), so a key
    may spend up to twice its budget across a window boundary. Keys expire when their
    window ends.

    Args:
        connection: a `redis://` / `rediss://` / `unix://` URL (this object then owns the
            connection pool and `aclose()` closes it), or a `redis.asyncio.Redis` you own.
        requests: requests allowed per key and window (`None`: unlimited).
        tokens: tokens (prompt + completion) allowed per key and window (`None`: unlimited).
        window: the window length in seconds.
        prefix: prepended to every Redis key.
        on_redis_error: `"closed"` refuses requests while Redis fails (with
            `error_retry_after`); `"open"` lets them through. A failed `record` logs a
            warning and the turn's tokens go uncounted.
        error_retry_after: the `Retry-After` seconds of a request refused because Redis failed.
        timeout: the most seconds one Redis call may take before it counts as a failure
            (waiting for a free connection included).
        max_connections: the most connections to Redis this object opens, when made from
            a URL (a client you pass keeps its own pool).

    Raises:
        ValueError: both limits `None`, a negative limit, a non-positive window, timeout,
            error_retry_after or max_connections, a bad URL scheme or an unknown
            `on_redis_error`.
        TypeError: `connection` is neither a URL nor a `redis.asyncio.Redis`.
    """

    def __init__(
        self,
        connection: str | aioredis.Redis,
        *,
        requests: int | None = None,
        tokens: int | None = None,
        window: float = 86400.0,
        prefix: str = DEFAULT_BUDGET_PREFIX,
        on_redis_error: OnRedisError = "closed",
        error_retry_after: float = DEFAULT_ERROR_RETRY_AFTER,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if requests is None and tokens is None:
            raise ValueError("give requests=, tokens= or both")
        for name, value in (("requests", requests), ("tokens", tokens)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{name} must be a non-negative integer or None")
        if not window > 0 or math.isinf(window):
            raise ValueError("window must be a positive number of seconds")
        limit = (prefix, on_redis_error, error_retry_after, timeout, max_connections)
        super().__init__(connection, *limit)
        self.requests = requests
        self.tokens = tokens
        self.window = float(window)
        self._budget = self._script(_BUDGET)

    def __repr__(self) -> str:
        return (
            f"RedisBudget(requests={self.requests!r}, tokens={self.tokens!r}, "
            f"window={self.window!r}, prefix={self.prefix!r}, "
            f"on_redis_error={self.on_redis_error!r})"
        )

    def _args(self, add_tokens: int) -> list[str]:
        limits = (
            -1 if self.requests is None else self.requests,
            -1 if self.tokens is None else self.tokens,
        )
        return [repr(self.window), str(limits[0]), str(limits[1]), str(add_tokens)]

    async def acquire(self, key: str) -> float | None:
        """Count one request for `key`: `None` if within budget, else seconds to the next window."""
        return await self._take(self._budget, key, self._args(-1), "a budget check")

    async def record(self, key: str, usage: Usage) -> None:
        """Add a finished turn's tokens (its `total_tokens`, else prompt + completion) to `key`."""
        total = usage.total_tokens
        if total is None:
            total = (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
        if total <= 0:
            return
        try:
            await self._run(self._budget, key, self._args(total))
        except (RedisError, OSError, TimeoutError) as exc:
            self._on_error("recording usage", exc)

    async def spent(self, key: str) -> BudgetUsage:
        """What `key` has spent in the current window.

        Raises:
            redis.exceptions.RedisError: Redis failed (here there is nothing to fail open to).
        """
        _, requests, tokens, reset = await self._run(self._budget, key, self._args(0))
        return BudgetUsage(int(str(requests)), int(str(tokens)), float(_text(reset)))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
