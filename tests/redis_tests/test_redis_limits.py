"""RedisRateLimiter and RedisBudget against a real private redis-server."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import anyio
import pytest
import redis

from tokenhub_stream._models import Usage
from tokenhub_stream.asgi import InMemoryRateLimiter, RateLimiter, UsageLimiter
from tokenhub_stream.redis import BudgetUsage, RedisBudget, RedisRateLimiter

from .conftest import run_redis

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

PASSWORD = "redis-pw-canary-7d1e"


async def take(limiter: RateLimiter, key: str, n: int) -> list[float | None]:
    return [await limiter.acquire(key) for _ in range(n)]


# --- the token bucket -------------------------------------------------------------------------


async def test_redis_rate_limiter_allows_a_burst_then_refuses(redis_url: str) -> None:
    async with RedisRateLimiter(redis_url, rate=0.5, burst=3) as limiter:
        start = time.monotonic()
        results = await take(limiter, "principal:alice", 4)
        took = time.monotonic() - start
    assert results[:3] == [None, None, None]
    wait = results[3]
    # One token at 0.5/s: 2 s after the first take, less however long the four took.
    assert wait is not None and 2.0 - took - 0.01 <= wait <= 2.0, (wait, took)


async def test_redis_rate_limiter_refills_at_its_rate(redis_url: str) -> None:
    # A token every 0.25 s: the two acquires after the refill are far closer together than
    # that, even on a machine busy with other test workers.
    async with RedisRateLimiter(redis_url, rate=4, burst=2) as limiter:
        assert await take(limiter, "k", 2) == [None, None]
        wait = await limiter.acquire("k")
        assert wait is not None and 0 < wait <= 0.25
        await anyio.sleep(wait + 0.01)
        assert await limiter.acquire("k") is None
        assert await limiter.acquire("k") is not None


async def test_redis_rate_limiter_keys_and_prefixes_are_separate(redis_url: str) -> None:
    async with (
        RedisRateLimiter(redis_url, rate=0.01, burst=1, prefix="app-a:") as a,
        RedisRateLimiter(redis_url, rate=0.01, burst=1, prefix="app-b:") as b,
    ):
        assert await a.acquire("principal:alice") is None
        assert await a.acquire("principal:alice") is not None
        assert await a.acquire("principal:bob") is None  # another key
        assert await b.acquire("principal:alice") is None  # another prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = sorted(k.decode() for k in client.keys("*"))
        assert keys == ["app-a:principal:alice", "app-a:principal:bob", "app-b:principal:alice"]
        # Expiry: a bucket is forgotten once it would be full again (1 token at 0.01/s).
        ttl = client.pttl("app-a:principal:alice")
        assert 0 < ttl <= 101_000


async def test_redis_rate_limiter_is_atomic_under_concurrency(redis_url: str) -> None:
    results: list[float | None] = []

    async def one(limiter: RedisRateLimiter) -> None:
        results.append(await limiter.acquire("address:127.0.0.1"))

    # Two clients (two connection pools), 60 concurrent checks against a burst of 10.
    async with (
        RedisRateLimiter(redis_url, rate=0.001, burst=10) as first,
        RedisRateLimiter(redis_url, rate=0.001, burst=10) as second,
    ):
        async with anyio.create_task_group() as tg:
            for i in range(60):
                tg.start_soon(one, first if i % 2 else second)
    assert results.count(None) == 10
    assert len(results) == 60


async def test_redis_rate_limiter_reloads_a_flushed_script(redis_url: str) -> None:
    async with RedisRateLimiter(redis_url, rate=1, burst=5) as limiter:
        assert await limiter.acquire("k") is None
        with redis.Redis.from_url(redis_url) as client:
            client.script_flush()
        assert await limiter.acquire("k") is None  # NOSCRIPT, then EVAL again


async def test_redis_rate_limiter_uses_a_client_it_does_not_own(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    try:
        async with RedisRateLimiter(client, rate=1, burst=1) as limiter:
            assert await limiter.acquire("k") is None
        assert await client.ping() is True  # still open: the limiter does not own it
    finally:
        await client.aclose()


def test_redis_rate_limiter_validates_its_arguments(redis_url: str) -> None:
    for bad in ({"rate": 0}, {"rate": -1}, {"burst": 0}, {"burst": 1.5}, {"timeout": 0}):
        with pytest.raises(ValueError):
            RedisRateLimiter(redis_url, **bad)
    with pytest.raises(ValueError):
        RedisRateLimiter(redis_url, on_redis_error="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RedisRateLimiter("http://localhost:6379")
    with pytest.raises(TypeError):
        RedisRateLimiter(6379)  # type: ignore[arg-type]


def test_redis_limiters_implement_the_proxy_protocols(redis_url: str) -> None:
    limiter = RedisRateLimiter(redis_url)
    budget = RedisBudget(redis_url, requests=1)
    assert isinstance(limiter, RateLimiter) and not isinstance(limiter, UsageLimiter)
    assert isinstance(budget, RateLimiter) and isinstance(budget, UsageLimiter)
    assert not isinstance(InMemoryRateLimiter(), UsageLimiter)


# --- when Redis is down -----------------------------------------------------------------------


@pytest.fixture
def stopped_redis_url() -> Iterator[str]:
    """The URL (with a password) of a Redis that was running and is now stopped."""
    with run_redis() as server:
        port = server.port
    yield f"redis://:{PASSWORD}@127.0.0.1:{port}/0"


@pytest.fixture
def silent_redis_url() -> Iterator[str]:
    """A port that accepts connections and never answers (a hung or blackholed Redis)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"redis://:{PASSWORD}@127.0.0.1:{sock.getsockname()[1]}/0"


@pytest.mark.parametrize("which", ["stopped", "silent"])
@pytest.mark.parametrize("policy", ["closed", "open"])
async def test_redis_rate_limiter_on_redis_error(
    which: str, policy: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = request.getfixturevalue(f"{which}_redis_url")
    limiter = RedisRateLimiter(
        url,
        rate=1,
        burst=1,
        on_redis_error=policy,  # type: ignore[arg-type]
        error_retry_after=3,
        timeout=0.3,
    )
    async with limiter:
        started = time.monotonic()
        with anyio.fail_after(5):
            result = await limiter.acquire("principal:alice")
            second = await limiter.acquire("principal:alice")
        elapsed = time.monotonic() - started
    assert result == second == (3 if policy == "closed" else None)
    assert elapsed < 2.0  # bounded by `timeout`, twice
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the second failure within 10 s is not logged again
    assert f"failing {policy}" in warnings[0].getMessage()
    assert PASSWORD not in caplog.text and PASSWORD not in repr(limiter)


async def test_redis_budget_fails_closed_and_drops_uncounted_usage(
    stopped_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with RedisBudget(stopped_redis_url, tokens=100, timeout=0.3) as budget:
        assert await budget.acquire("k") == 1.0
        await budget.record("k", Usage(total_tokens=10))  # logged, does not raise
        with pytest.raises(redis.RedisError):
            await budget.spent("k")
    assert PASSWORD not in caplog.text


async def test_redis_rate_limiter_recovers_when_redis_comes_back() -> None:
    with run_redis() as server:
        port = server.port
        async with RedisRateLimiter(server.url, rate=0.01, burst=1, timeout=0.3) as limiter:
            assert await limiter.acquire("k") is None
            server.stop()
            assert await limiter.acquire("k") == 1.0  # down: closed
            with run_redis(port=port):
                # A restarted server without persistence: the script is loaded again and
                # the buckets start full.
                assert await limiter.acquire("k") is None
                assert await limiter.acquire("k") is not None


# --- the budget -------------------------------------------------------------------------------


async def test_redis_budget_counts_requests_per_window(redis_url: str) -> None:
    async with RedisBudget(redis_url, requests=3, window=3600) as budget:
        assert await take(budget, "principal:alice", 3) == [None, None, None]
        wait = await budget.acquire("principal:alice")
        assert wait is not None and 0 < wait <= 3600
        assert await budget.acquire("principal:bob") is None
        spent = await budget.spent("principal:alice")
        assert (spent.requests, spent.tokens) == (3, 0)  # the refused request is not counted
        assert isinstance(spent, BudgetUsage)
        assert (await budget.spent("principal:carol")).requests == 0
    with redis.Redis.from_url(redis_url) as client:
        assert not client.exists("tokenhub:budget:principal:carol")  # reading writes nothing


async def test_redis_budget_counts_tokens_after_the_turn(redis_url: str) -> None:
    async with RedisBudget(redis_url, tokens=100, window=3600) as budget:
        assert await budget.acquire("k") is None
        await budget.record("k", Usage(prompt_tokens=20, completion_tokens=40))  # no total
        assert await budget.acquire("k") is None  # 60 < 100
        await budget.record("k", Usage(total_tokens=45))
        assert await budget.acquire("k") is not None  # 105 >= 100
        spent = await budget.spent("k")
        assert (spent.requests, spent.tokens) == (2, 105)
        await budget.record("k", Usage())  # unknown usage adds nothing
        assert (await budget.spent("k")).tokens == 105


async def test_redis_budget_starts_over_in_the_next_window(redis_url: str) -> None:
    async with RedisBudget(redis_url, requests=1, window=0.3) as budget:
        assert await budget.acquire("k") is None
        wait = await budget.acquire("k")
        assert wait is not None and wait <= 0.3
        await anyio.sleep(wait + 0.02)
        assert await budget.acquire("k") is None
    with redis.Redis.from_url(redis_url) as client:
        assert 0 < client.pttl("tokenhub:budget:k") <= 1300  # expires after its window


def test_redis_budget_validates_its_arguments(redis_url: str) -> None:
    with pytest.raises(ValueError):
        RedisBudget(redis_url)  # no limit at all
    for bad in ({"requests": -1}, {"tokens": 1.5}, {"requests": 1, "window": 0}):
        with pytest.raises(ValueError):
            RedisBudget(redis_url, **bad)
    budget = RedisBudget(f"redis://:{PASSWORD}@127.0.0.1:1/0", requests=1)
    assert PASSWORD not in repr(budget)
    assert "requests=1" in repr(budget)
