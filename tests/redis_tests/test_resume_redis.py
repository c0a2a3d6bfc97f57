"""Resumable streams on Redis (issue #7): RedisStreamBuffer against a private redis-server, and
the issue's proof, a stream started on one proxy process resumed byte-exact on another."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from tokenhub_stream import SSEDecoder
from tokenhub_stream.asgi import ChatProxy, StreamBuffer
from tokenhub_stream.redis import RedisStreamBuffer
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

from .conftest import proxy_process, serve

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
ALICE = {"x-user": "alice"}


def chunk(text: str) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


WORDS = [f"w{i} " for i in range(12)]
RAW = [chunk(w) for w in WORDS] + [b"data: [DONE]\n\n"]


def ids_of(data: bytes) -> list[str]:
    return [e.id or "" for e in SSEDecoder().feed(data) if e.data]


def text_of(data: bytes) -> str:
    out = []
    for event in SSEDecoder().feed(data):
        if event.data.startswith("{"):
            out += [c["delta"].get("content") or "" for c in json.loads(event.data)["choices"]]
    return "".join(out)


@contextlib.contextmanager
def upstream() -> Iterator[tuple[FakeChatUpstream, RunningUpstream]]:
    app = FakeChatUpstream(delay=0.001)
    with run_upstream(app) as running:
        yield app, running


def resumable(**extra: str) -> dict[str, str]:
    return {"x-resumable": "1", "content-type": "application/json", **extra}


async def post_all(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> httpx.Response:
    response = await client.post(f"{url}/api/chat", content=BODY, headers=headers)
    await response.aread()
    return response


async def post_until(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], events: int
) -> tuple[str, bytes]:
    got = b""
    async with client.stream("POST", f"{url}/api/chat", content=BODY, headers=headers) as response:
        assert response.status_code == 200, response.status_code
        stream_id = response.headers["x-stream-id"]
        async for piece in response.aiter_raw():
            got += piece
            if got.count(b"\n\n") >= events:
                break
    return stream_id, got  # leaving the block unread drops the connection


# --- the buffer against a real Redis ------------------------------------------------------------


async def eventually(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait, bounded, until `await predicate()` holds."""
    with anyio.fail_after(timeout):
        while True:
            if await predicate():
                return
            await anyio.sleep(0.01)


async def is_gone(buffer: RedisStreamBuffer, stream_id: str) -> bool:
    return await buffer.info(stream_id) is None


async def blocked_in_xread(redis_url: str) -> bool:
    """Whether a client of the server is blocked in XREAD right now (CLIENT LIST)."""
    import redis.asyncio

    async with redis.asyncio.Redis.from_url(redis_url) as admin:
        clients = await admin.client_list()
    return any(c.get("cmd") == "xread" and "b" in c.get("flags", "") for c in clients)


async def test_redis_stream_buffer_keeps_tails_and_ends(redis_url: str) -> None:
    async with RedisStreamBuffer(redis_url, prefix="t:") as buffer:
        assert isinstance(buffer, StreamBuffer)
        assert await buffer.info("s1") is None
        await buffer.create("s1", "principal:alice")
        await buffer.append("s1", [(1, b"a"), (2, b"b")])
        info = await buffer.info("s1")
        assert info is not None
        assert (info.owner, info.first_id, info.last_id, info.ended) == (
            "principal:alice",
            1,
            2,
            False,
        )
        got: list[tuple[int, bytes]] = []

        async def tail() -> None:
            async for event in buffer.read("s1", 1, idle=10):
                got.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(tail)
            await eventually(lambda: blocked_in_xread(redis_url))
            await buffer.append("s1", [(3, b"c\r\n\x00\xff")])
            await buffer.end("s1", ttl=0.5)
        assert got == [(2, b"b"), (3, b"c\r\n\x00\xff")]  # bytes kept as they are
        info = await buffer.info("s1")
        assert info is not None and info.ended and info.last_id == 3
        await eventually(lambda: is_gone(buffer, "s1"), 0.5 + 2)  # expired with its ttl
        with pytest.raises(TimeoutError):
            await buffer.create("s2", "x")
            async for _ in buffer.read("s2", 0, idle=0.3):
                pass
    assert "redis://" not in repr(buffer)


async def test_redis_stream_buffer_trims_to_max_events(redis_url: str) -> None:
    async with RedisStreamBuffer(redis_url, max_events=5) as buffer:
        await buffer.create("s", "o")
        for i in range(1, 400):
            await buffer.append("s", [(i, b"x" * 10)])
        info = await buffer.info("s")
        assert info is not None and info.last_id == 399 and info.first_id > 1
        await buffer.end("s", 60)
        events = [e async for e in buffer.read("s", info.first_id - 1, idle=5)]
        assert [i for i, _ in events] == list(range(info.first_id, 400))


# --- the proxy on Redis --------------------------------------------------------------------------


def app_for(proxy: ChatProxy, buffer: RedisStreamBuffer) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with buffer, proxy:
            yield

    return Starlette(routes=proxy.routes("/api/chat"), lifespan=lifespan)


async def test_redis_resume_expires_after_resume_ttl(redis_url: str) -> None:
    with upstream() as (fake, running):
        fake.enqueue(Script(raw=RAW, delay=0.001))
        buffer = RedisStreamBuffer(redis_url)
        proxy = ChatProxy(
            api_key=None, base_url=running.base_url, stream_buffer=buffer, resume_ttl=0.4
        )
        with serve(app_for(proxy, buffer)) as url:
            async with httpx.AsyncClient(timeout=10) as client:
                direct = await post_all(client, url, resumable())
                stream_id = direct.headers["x-stream-id"]
                target = f"{url}/api/chat/streams/{stream_id}"
                fresh = await client.get(target, headers={"last-event-id": "0"})
                await anyio.sleep(0.8)
                stale = await client.get(target, headers={"last-event-id": "0"})
    assert fresh.status_code == 200 and fresh.content == direct.content
    assert stale.status_code == 404


async def test_redis_down_streams_without_resume(caplog: pytest.LogCaptureFixture) -> None:
    with upstream() as (fake, running):
        fake.enqueue(Script(raw=RAW, delay=0.001))
        buffer = RedisStreamBuffer("redis://127.0.0.1:1/0", timeout=0.5)
        proxy = ChatProxy(api_key=None, base_url=running.base_url, stream_buffer=buffer)
        with serve(app_for(proxy, buffer)) as url:
            async with httpx.AsyncClient(timeout=10) as client:
                response = await post_all(client, url, resumable())
                missing = await client.get(f"{url}/api/chat/streams/{'a' * 24}")
    # The answer still streams, byte-exact and without X-Stream-Id: not resumable.
    assert response.status_code == 200 and "x-stream-id" not in response.headers
    assert response.content == b"".join(RAW)
    assert missing.status_code == 503
    assert "stream buffer failed" in caplog.text


# --- the issue's proof: two proxy processes, one Redis -------------------------------------------


async def test_issue_7_stream_resumed_on_another_process_is_byte_exact(redis_url: str) -> None:
    with upstream() as (fake, running):
        fake.enqueue(Script(raw=RAW, delay=0.001), Script(raw=RAW, delay=0.08))
        env = {"UPSTREAM_URL": running.base_url, "REDIS_URL": redis_url}
        factory = "redis_tests.resume_apps:resumable_proxy"
        with proxy_process(factory, env) as first, proxy_process(factory, env) as second:
            async with httpx.AsyncClient(timeout=15) as client:
                with anyio.fail_after(30):
                    direct = await post_all(client, first, resumable(**ALICE))
                    stream_id, head = await post_until(client, first, resumable(**ALICE), 3)
                    last_id = ids_of(head)[-1]
                    # The stream is still running on `first`; resume it on `second`.
                    rest = await client.get(
                        f"{second}/api/chat/streams/{stream_id}",
                        headers={**ALICE, "last-event-id": last_id},
                    )
                    as_bob = await client.get(
                        f"{second}/api/chat/streams/{stream_id}",
                        headers={"x-user": "bob", "last-event-id": "0"},
                    )
                    nobody = await client.get(f"{second}/api/chat/streams/{stream_id}")
                    replay = await client.get(
                        f"{second}/api/chat/streams/{stream_id}", headers=ALICE
                    )
    assert direct.status_code == 200 and rest.status_code == 200
    whole = head + rest.content
    assert whole == direct.content  # byte-exact: no event twice, none missing
    assert ids_of(whole) == [str(i) for i in range(1, len(RAW) + 1)]
    assert text_of(whole) == "".join(WORDS)
    assert replay.content == direct.content
    assert len(fake.requests) == 2  # the direct run and the cut one: no upstream call on resume
    assert fake.requests[1].completed and not fake.requests[1].disconnected
    assert as_bob.status_code == 404  # another principal: as if it did not exist
    assert nobody.status_code == 401


async def test_redis_stream_buffer_live_stream_of_a_dead_worker_expires(redis_url: str) -> None:
    async with RedisStreamBuffer(redis_url, live_ttl=0.4) as buffer:
        await buffer.create("s", "o")
        await buffer.append("s", [(1, b"a")])
        await buffer.append("s", [(2, b"b")])
        info = await buffer.info("s")
        assert info is not None and info.last_id == 2 and not info.ended
        # No event and no end marker for longer than live_ttl: the keys are gone.
        await eventually(lambda: is_gone(buffer, "s"), 0.4 + 2)
        with pytest.raises(LookupError):
            async for _ in buffer.read("s", 0, idle=30):
                pass
