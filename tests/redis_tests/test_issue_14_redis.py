"""Issue #14, finding 5: the resume route could take Redis down.

The review's reproduction: every waiting resume held a Redis connection of its own (its
`XREAD BLOCK`) from an unbounded pool, so 80 resumes from one client exhausted a Redis with
`maxclients 60`; live streams stopped buffering and chats on another worker got 429 (the
limiter fails closed). These tests run against a private redis-server with that limit.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.to_thread
import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request

from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.redis import RedisRateLimiter, RedisStreamBuffer
from tokenhub_stream.redis._streams import _BLOCK
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

from .conftest import RedisServer, run_redis, serve

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
MALLORY = {"x-user": "mallory"}
ALICE = {"x-user": "alice"}
RESUMES = 80
MAXCLIENTS = 60


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    """A private redis-server that accepts at most 60 clients, as in the review."""
    with run_redis() as server:
        with redis.Redis(host=server.host, port=server.port) as admin:
            admin.config_set("maxclients", MAXCLIENTS)
        yield server


def clients(server: RedisServer) -> dict[str, int]:
    """What the server counted: connections now, ever accepted, and refused at maxclients."""
    with redis.Redis(host=server.host, port=server.port) as admin:
        info = {**admin.info("clients"), **admin.info("stats")}
    keys = ("connected_clients", "blocked_clients", "total_connections_received")
    return {k: int(info[k]) for k in (*keys, "rejected_connections")}


async def blocked(server: RedisServer) -> dict[str, int]:
    """Poll Redis (bounded) until a client waits in a blocking read; its counts then."""
    for _ in range(500):
        counts = await anyio.to_thread.run_sync(clients, server)
        if counts["blocked_clients"]:
            return counts
        await anyio.sleep(0.02)
    raise AssertionError("no client blocked in Redis")


def by_header(request: Request) -> str | None:
    return request.headers.get("x-user")


def chat_app(upstream_url: str, redis_url: str) -> Starlette:
    """One proxy worker: resumable streams and the rate limit on the shared Redis."""
    buffer = RedisStreamBuffer(redis_url)
    limiter = RedisRateLimiter(redis_url, rate=100, burst=1000)
    proxy = ChatProxy(
        api_key=None,
        base_url=upstream_url,
        authorize=by_header,
        rate_limiter=limiter,
        stream_buffer=buffer,
        keepalive_interval=None,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with buffer, limiter, proxy:
            yield

    return Starlette(routes=proxy.routes("/api/chat"), lifespan=lifespan)


async def test_issue_14_eighty_resumes_leave_redis_to_the_chats(small_redis: RedisServer) -> None:
    fake = FakeChatUpstream(delay=0.001)
    fake.enqueue(Script(deltas=["mallory's"], end="stall"), *[Script(text="Hi Alice.")] * 3)
    limits = httpx.Limits(max_connections=RESUMES + 20)
    with (
        run_upstream(fake) as running,
        serve(chat_app(running.base_url, small_redis.url)) as first,
        serve(chat_app(running.base_url, small_redis.url)) as second,
    ):
        async with httpx.AsyncClient(timeout=20, limits=limits) as client:
            with anyio.fail_after(45):
                # Mallory starts a stream that stays live, then resumes it 80 times at once.
                async with client.stream(
                    "POST",
                    f"{first}/api/chat",
                    content=BODY,
                    headers={**MALLORY, "x-resumable": "1"},
                ) as live:
                    stream_id = live.headers["x-stream-id"]
                    async for _ in live.aiter_raw():
                        break
                target = f"{first}/api/chat/streams/{stream_id}"
                opened: list[httpx.Response] = []
                reading: list[AsyncIterator[bytes]] = []  # kept open (a break would close)

                async def resume_once() -> None:
                    request = client.build_request("GET", target, headers=MALLORY)
                    response = await client.send(request, stream=True)
                    opened.append(response)
                    if response.status_code == 200:
                        chunks = response.aiter_raw()
                        reading.append(chunks)
                        await chunks.__anext__()  # past the replay: waiting for the live rest

                try:
                    async with anyio.create_task_group() as tg:
                        for _ in range(RESUMES):
                            tg.start_soon(resume_once)
                    # With the 80 resumes open: Alice chats on both workers.
                    answers = []
                    for url in (second, first):
                        response = await client.post(
                            f"{url}/api/chat", content=BODY, headers={**ALICE, "x-resumable": "1"}
                        )
                        answers.append(response)
                    alices = answers[1].headers.get("x-stream-id", "not-resumable-xxxxxxx")
                    replay = await client.get(f"{second}/api/chat/streams/{alices}", headers=ALICE)
                    during = clients(small_redis)
                finally:
                    for response in opened:
                        await response.aclose()
                    await client.delete(target, headers=MALLORY)
    for answer in answers:
        # Served, streamed, and resumable: the live stream was buffered in Redis.
        assert answer.status_code == 200, answer.text
        assert answer.text.endswith("data: [DONE]\nid: 5\n\n")
        assert "x-stream-id" in answer.headers
    assert replay.status_code == 200 and replay.content == answers[1].content
    statuses = sorted(r.status_code for r in opened)  # the cap: 4 resumes per principal
    assert statuses.count(200) == 4 and statuses.count(429) == RESUMES - 4, statuses
    assert during["rejected_connections"] == 0
    assert during["connected_clients"] < MAXCLIENTS // 2


async def test_issue_14_waiting_readers_share_redis_connections(small_redis: RedisServer) -> None:
    # Below the proxy: 80 readers of one RedisStreamBuffer waiting on 80 live streams hold
    # no connection each; a pool of 8 serves them, the appends and a late reader.
    before = clients(small_redis)
    async with RedisStreamBuffer(small_redis.url, max_connections=8) as buffer:
        ids = [f"stream-{i:03d}-aaaaaaaaaaaa" for i in range(RESUMES + 1)]
        for stream_id in ids:
            await buffer.create(stream_id, "principal:mallory")
            await buffer.append(stream_id, [(1, b"one")])
        got: dict[str, list[int]] = {stream_id: [] for stream_id in ids}
        first_seen = {stream_id: anyio.Event() for stream_id in ids}
        second_seen = {stream_id: anyio.Event() for stream_id in ids}
        arrived: dict[str, float] = {}

        async def reader(stream_id: str) -> None:
            async for event_id, _ in buffer.read(stream_id, 0, idle=30):
                got[stream_id].append(event_id)
                if event_id == 1:
                    first_seen[stream_id].set()
                else:
                    arrived[stream_id] = time.monotonic()
                    second_seen[stream_id].set()

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for stream_id in ids[:RESUMES]:
                    tg.start_soon(reader, stream_id)
                for stream_id in ids[:RESUMES]:
                    await first_seen[stream_id].wait()
                waiting = await blocked(small_redis)
                # A reader of another stream joins while the shared read blocks on 80
                # keys; its live event must not wait out the block (4 s).
                late = ids[RESUMES]
                tg.start_soon(reader, late)
                await first_seen[late].wait()
                sent = time.monotonic()
                await buffer.append(late, [(2, b"two")])
                await buffer.end(late, ttl=60)
                with anyio.move_on_after(_BLOCK):  # without a wake-up: no sooner than that
                    await second_seen[late].wait()
                for stream_id in ids[:RESUMES]:
                    await buffer.append(stream_id, [(2, b"two")])
                    await buffer.end(stream_id, ttl=60)
    after = clients(small_redis)
    assert all(events == [1, 2] for events in got.values()), got
    assert arrived[late] - sent < 1.0
    assert waiting["blocked_clients"] == 1  # one XREAD BLOCK for all 80 readers
    assert after["rejected_connections"] == 0
    opened = after["total_connections_received"] - before["total_connections_received"]
    assert opened <= 8 + 6, opened  # the pool, plus this test's own INFO connections


async def test_issue_14_limiter_pool_is_bounded(small_redis: RedisServer) -> None:
    # A burst of 80 requests at once must not open 80 connections for the rate limit.
    before = clients(small_redis)
    # timeout=10: the point is the pool's bound, not latency; 80 checks through 8
    # connections can take longer than the default 1 s on a machine busy with other tests.
    async with RedisRateLimiter(
        small_redis.url, rate=1000, burst=10_000, max_connections=8, timeout=10
    ) as limiter:
        results: list[float | None] = []

        async def one() -> None:
            results.append(await limiter.acquire("address:203.0.113.9"))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(RESUMES):
                    tg.start_soon(one)
    after = clients(small_redis)
    assert results == [None] * RESUMES
    assert after["rejected_connections"] == 0
    opened = after["total_connections_received"] - before["total_connections_received"]
    assert opened <= 8 + 1, opened
    with pytest.raises(ValueError, match="max_connections"):
        RedisRateLimiter(small_redis.url, max_connections=0)
    with pytest.raises(ValueError, match="max_connections"):
        RedisStreamBuffer(small_redis.url, max_connections=1)  # one is the blocking read's
