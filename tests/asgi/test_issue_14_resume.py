"""Issue #14, findings 5, 6 and 9 in one process: the resume route's admission, the proxy's
`allowed_hosts`, and `InMemoryStreamBuffer`'s per-owner quotas and memory bound.

The Redis side of finding 5 (80 resumes against a Redis with `maxclients 60`) is in
`tests/redis_tests/test_issue_14_redis.py`; `serve`'s hosts and token in
`tests/cli/test_issue_14_hosts.py`.
"""

from __future__ import annotations

import gc
import tracemalloc

import anyio
import httpx
import pytest
from starlette.requests import Request

from tokenhub_stream.asgi import InMemoryStreamBuffer
from tokenhub_stream.testing import Script

from .test_resume import (
    RAW,
    Upstream,
    ids_of,
    post_all,
    post_until,
    proxied,
    raw_script,
    resumable_headers,
)

pytestmark = pytest.mark.timeout(60)


def by_user(request: Request) -> str | None:
    return request.headers.get("x-user")


# --- finding 9: one principal cannot evict others' streams; memory is bounded -------------------


@pytest.mark.anyio
async def test_issue_14_buffer_keeps_another_owners_live_stream() -> None:
    # The review's attack: 1,000 creates by one principal pushed out another's live stream.
    buffer = InMemoryStreamBuffer()
    await buffer.create("victim-stream", "principal:alice")
    await buffer.append("victim-stream", [(1, b"data: a\nid: 1\n\n")])
    for i in range(1500):
        await buffer.create(f"attacker-{i}", "principal:mallory")
    info = await buffer.info("victim-stream")
    assert info is not None and info.owner == "principal:alice" and not info.ended
    # The attacker keeps only its quota, its own newest.
    assert len(buffer) == 1 + buffer.max_streams_per_owner
    assert await buffer.info("attacker-1499") is not None
    assert await buffer.info("attacker-0") is None


@pytest.mark.anyio
async def test_issue_14_buffer_full_of_live_streams_refuses_instead_of_evicting() -> None:
    buffer = InMemoryStreamBuffer(max_streams=3, max_streams_per_owner=2)
    await buffer.create("a1", "alice")
    await buffer.create("b1", "bob")
    await buffer.create("b2", "bob")
    # Full, all live: carol's new stream is refused, nobody's is forgotten.
    with pytest.raises(RuntimeError, match="live"):
        await buffer.create("c1", "carol")
    assert [await buffer.info(s) is not None for s in ("a1", "b1", "b2")] == [True] * 3
    # A finished stream may go for another owner's new one, the first finished first.
    await buffer.end("b1", ttl=60)
    await buffer.end("a1", ttl=60)
    await buffer.create("c1", "carol")
    assert await buffer.info("b1") is None and await buffer.info("a1") is not None
    # Over its quota an owner loses its own streams, a finished one before a live one.
    buffer = InMemoryStreamBuffer(max_streams=10, max_streams_per_owner=2)
    for name, owner in (("a1", "alice"), ("a2", "alice"), ("b1", "bob")):
        await buffer.create(name, owner)
    await buffer.end("a2", ttl=60)
    await buffer.create("a3", "alice")
    assert await buffer.info("a2") is None  # alice's finished one went first
    assert await buffer.info("a1") is not None and await buffer.info("a3") is not None
    await buffer.create("a4", "alice")
    assert await buffer.info("a1") is None  # then her own oldest live one
    assert await buffer.info("b1") is not None and len(buffer) == 3
    with pytest.raises(ValueError):
        InMemoryStreamBuffer(max_streams_per_owner=0)


@pytest.mark.anyio
async def test_issue_14_buffer_memory_bound_holds_in_real_bytes() -> None:
    # The documented bound, max_streams x max_stream_bytes, measured with tracemalloc while
    # every stream is full of small events (where per-event bookkeeping weighs most).
    streams, per_stream = 40, 32 * 1024
    buffer = InMemoryStreamBuffer(
        max_streams=streams, max_stream_bytes=per_stream, max_streams_per_owner=streams
    )
    event = b'data: {"choices":[{"index":0,"delta":{"content":"w "}}]}\n'
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for s in range(streams):
            await buffer.create(f"stream-{s:04d}-xxxxxxxxxx", "owner")
            for i in range(1, 1001):
                await buffer.append(f"stream-{s:04d}-xxxxxxxxxx", [(i, event + b"id: %d\n\n" % i)])
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(buffer) == streams
    # Each stream also has its own few hundred bytes of objects (the deque, the entry).
    assert used <= streams * (per_stream + 2048), used
    # The defaults: at most 250 MiB per process, as documented.
    default = InMemoryStreamBuffer()
    assert default.max_streams * default.max_stream_bytes <= 250 * 1024 * 1024


@pytest.mark.anyio
async def test_issue_14_proxy_relays_unresumable_when_the_buffer_is_full(
    upstream: Upstream,
) -> None:
    app, _ = upstream
    app.enqueue(
        Script(deltas=["alice"], end="stall"),
        Script(deltas=["bob"], end="stall"),
        raw_script(0.001),
    )
    buffer = InMemoryStreamBuffer(max_streams=2, max_streams_per_owner=1)
    with proxied(upstream, stream_buffer=buffer, authorize=by_user) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(15):
                alice = resumable_headers(url, **{"x-user": "alice"})
                alice_id, first = await post_until(client, url, alice, 1)
                bob = resumable_headers(url, **{"x-user": "bob"})
                bob_id, _ = await post_until(client, url, bob, 1)
                carol = await post_all(client, url, resumable_headers(url, **{"x-user": "carol"}))
                # Alice's live stream is still hers to resume.
                async with client.stream(
                    "GET",
                    f"{url}/api/chat/streams/{alice_id}",
                    headers={"x-user": "alice", "last-event-id": "0"},
                ) as rest:
                    assert rest.status_code == 200
                    async for piece in rest.aiter_raw():
                        assert piece.startswith(first[: len(piece)])
                        break
                for user, stream_id in (("alice", alice_id), ("bob", bob_id)):
                    stop = f"{url}/api/chat/streams/{stream_id}"
                    assert (await client.delete(stop, headers={"x-user": user})).status_code == 204
    assert carol.status_code == 200
    assert "x-stream-id" not in carol.headers  # streamed, just not resumable
    assert carol.content == b"".join(RAW)  # the plain passthrough, no ids
    assert ids_of(first) == ["1"]
