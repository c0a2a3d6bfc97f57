"""Rate limits: the `RateLimiter` and `UsageLimiter` protocols the proxy admits requests
through, and `InMemoryRateLimiter` on a sans-I/O `TokenBucket`. Shared limits across
processes are in `tokenhub_stream.redis`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .._models import Usage

__all__ = ["InMemoryRateLimiter", "RateLimiter", "TokenBucket", "UsageLimiter"]


@runtime_checkable
class RateLimiter(Protocol):
    """Check and record one request for `key` (a principal or a client address).

    Return `None` to let the request through (and count it), or the number of seconds after
    which the caller may retry; the proxy then answers 429 with that `Retry-After`.
    """

    async def acquire(self, key: str) -> float | None: ...


@runtime_checkable
class UsageLimiter(RateLimiter, Protocol):
    """A `RateLimiter` that also counts tokens (a budget), such as `redis.RedisBudget`.

    After each turn the upstream took on, the proxy calls `record(key, usage)` with the key
    `acquire` was called with: the upstream's usage (the proxy asks streams for it), or,
    when that did not arrive (a client that left early), an estimate
    (`CompletionRecord.estimated_usage`). A failing `record` is logged and never breaks the
    finished response.
    """

    async def record(self, key: str, usage: Usage) -> None: ...


class InMemoryRateLimiter:
    """A token bucket per key, in this process's memory.

    ```python
    limiter = InMemoryRateLimiter(rate=1 / 6, burst=10)  # 10 at once, then 10 a minute
    proxy = ChatProxy(api_key=key, base_url=url, rate_limiter=limiter)
    ```

    Args:
        rate: tokens added per second.
        burst: bucket size, the requests allowed at once.
        max_keys: buckets kept; the least recently used is forgotten first.

    Raises:
        ValueError: a non-positive rate, burst or max_keys.
    """

    def __init__(self, rate: float = 1.0, burst: int = 10, *, max_keys: int = 100_000) -> None:
        self._bucket = TokenBucket(rate, burst, max_keys)

    def __repr__(self) -> str:
        return f"InMemoryRateLimiter(rate={self._bucket.rate!r}, burst={self._bucket.burst!r})"

    async def acquire(self, key: str) -> float | None:
        return self._bucket.take(key)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBucket:
    """Per-key token buckets in memory (sans-I/O; `now` is passed in for tests)."""

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[key] = bucket
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return max(1.0, math.ceil((1.0 - bucket.tokens) / self.rate))
