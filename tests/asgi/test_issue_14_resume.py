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

from tokenhub_stream.asgi import DEFAULT_MAX_RESUMES_PER_PRINCIPAL, ChatProxy, InMemoryStreamBuffer
from tokenhub_stream.asgi._admission import check_host, parse_allowed_hosts
from tokenhub_stream.asgi._wire import ProxyRejection
from tokenhub_stream.testing import Script

from .conftest import KEY, assert_no_key
from .test_proxy_tools import eventually
from .test_proxy_uvicorn import Mounting
from .test_resume import (
    BODY,
    RAW,
    Upstream,
    ids_of,
    post_all,
    post_until,
    proxied,
    raw_script,
    resumable_headers,
    resume,
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
    # post_until reads at least one event: on a busy machine the next arrives in the same read.
    assert ids_of(first)[:1] == ["1"]


# --- finding 5: resumes are admitted like chats, and capped per principal -----------------------


class CountingLimiter:
    """Allows `allowed` requests in all, then refuses (Retry-After 7); records every key."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.keys: list[str] = []

    async def acquire(self, key: str) -> float | None:
        self.keys.append(key)
        return None if len(self.keys) <= self.allowed else 7.0


@pytest.mark.anyio
async def test_issue_14_resume_passes_authorize_and_the_rate_limiter(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    limiter = CountingLimiter(allowed=3)
    alice = {"x-user": "alice"}
    with proxied(upstream, authorize=by_user, rate_limiter=limiter) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                direct = await post_all(client, url, resumable_headers(url, **alice))
                stream_id = direct.headers["x-stream-id"]
                nobody = await resume(client, url, stream_id, "0")
                replays = [await resume(client, url, stream_id, "0", alice) for _ in range(3)]
                stop = await client.delete(f"{url}/api/chat/streams/{stream_id}", headers=alice)
    assert nobody.status_code == 401  # authorize runs before the limiter: nothing counted
    assert [r.status_code for r in replays] == [200, 200, 429]
    assert replays[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert replays[2].headers["retry-after"] == "7"
    assert limiter.keys == ["principal:alice"] * 4  # the chat's key, for the chat and resumes
    assert stop.status_code == 204  # Stop saves spend: never rate limited


@pytest.mark.anyio
async def test_issue_14_resume_cap_per_principal(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["alice"], end="stall"), Script(deltas=["bob"], end="stall"))
    alice, bob = {"x-user": "alice"}, {"x-user": "bob"}
    with proxied(upstream, authorize=by_user, max_resumes_per_principal=2) as (url, proxy):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(15):
                alice_id, _ = await post_until(client, url, resumable_headers(url, **alice), 1)
                bob_id, _ = await post_until(client, url, resumable_headers(url, **bob), 1)
                target = f"{url}/api/chat/streams/{alice_id}"
                async with (
                    client.stream("GET", target, headers=alice) as one,
                    client.stream("GET", target, headers=alice) as two,
                ):
                    assert (one.status_code, two.status_code) == (200, 200)
                    third = await resume(client, url, alice_id, "1", alice)
                    assert third.status_code == 429
                    assert third.json()["error"]["code"] == "too_many_resumes"
                    assert third.headers["retry-after"] == "1"
                    # The cap is per principal: bob's resume is not affected.
                    async with client.stream(
                        "GET", f"{url}/api/chat/streams/{bob_id}", headers=bob
                    ) as bobs:
                        assert bobs.status_code == 200
                    assert proxy._resume.resumes["principal:alice"] == 2
                # Both of alice's readers left: her slots are free again.
                await eventually(lambda: not proxy._resume.resumes)
                async with client.stream("GET", target, headers=alice) as again:
                    assert again.status_code == 200
                for user, stream_id in ((alice, alice_id), (bob, bob_id)):
                    await client.delete(f"{url}/api/chat/streams/{stream_id}", headers=user)
    assert DEFAULT_MAX_RESUMES_PER_PRINCIPAL == 4
    with pytest.raises(ValueError, match="max_resumes_per_principal"):
        ChatProxy(api_key=KEY, resumable=True, max_resumes_per_principal=0)


# --- finding 6: ChatProxy(allowed_hosts=...) against DNS rebinding --------------------------------

REBOUND = "evil.example:18090"  # the review's reproduction: a page on a name rebound to us


def rebound_headers(**extra: str) -> dict[str, str]:
    # What the browser sends from http://evil.example:18090 once the name points at us:
    # same-origin as far as Origin and Host can tell.
    origin = f"http://{REBOUND}"
    return {"host": REBOUND, "origin": origin, "sec-fetch-site": "same-origin", **extra}


@pytest.mark.anyio
@pytest.mark.parametrize("mount", ["routes", "middleware"])
async def test_issue_14_allowed_hosts_refuses_a_rebound_host_on_every_route(
    upstream: Upstream, mount: Mounting
) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001), raw_script(0.001))
    # Why the option exists: without it, the origin check compares Origin with that very
    # Host, and the rebound page's request goes through.
    with proxied(upstream, mount, authorize=by_user) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            evil = rebound_headers(**{"x-user": "alice"})
            passed = await client.post(f"{url}/api/chat", content=BODY, headers=evil)
    assert passed.status_code == 200 and len(app.requests) == 1
    hosts = ["localhost", "127.0.0.1", "[::1]"]
    with proxied(upstream, mount, allowed_hosts=hosts, authorize=by_user) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            with anyio.fail_after(10):
                evil = rebound_headers(**{"x-user": "alice", "x-resumable": "1"})
                refused = [
                    await client.post(f"{url}/api/chat", content=BODY, headers=evil),
                    await client.post(f"{url}/api/chat/", content=BODY, headers=evil),
                    await client.get(f"{url}/api/chat/models", headers=evil),
                    await client.get(f"{url}/api/chat/streams/{'a' * 24}", headers=evil),
                    await client.delete(f"{url}/api/chat/streams/{'a' * 24}", headers=evil),
                    await client.get(f"{url}/api/chat/nowhere", headers=evil),
                    # Nor is a malformed Host.
                    await client.get(f"{url}/api/chat/models", headers={"host": "[::1"}),
                ]
                ok = await post_all(client, url, resumable_headers(url, **{"x-user": "alice"}))
                local = await client.get(
                    f"{url}/api/chat/models", headers={"host": "localhost.:8000", "x-user": "a"}
                )
    for response in refused:
        assert response.status_code == 400, (response.request.url, response.status_code)
        assert response.json()["error"]["code"] == "host_not_allowed"
    assert ok.status_code == 200 and local.status_code == 200
    assert len(app.requests) == 2  # nothing refused reached the upstream
    assert_no_key(*(r.content for r in refused))


@pytest.mark.anyio
async def test_issue_14_allowed_hosts_checks_the_forwarded_host_behind_a_trusted_proxy(
    upstream: Upstream,
) -> None:
    app, _ = upstream
    app.enqueue(raw_script(0.001))
    hosts, trusted = ["*.example.com"], ["127.0.0.1"]
    with proxied(upstream, allowed_hosts=hosts, trusted_proxies=trusted) as (url, _):
        async with httpx.AsyncClient(timeout=10) as client:
            # nginx sends its upstream's name as Host and the browser's in X-Forwarded-Host.
            behind = {"host": "backend:8000", "origin": "https://chat.example.com"}
            ok = await post_all(client, url, {**behind, "x-forwarded-host": "chat.example.com"})
            evil = await post_all(client, url, {**behind, "x-forwarded-host": "evil.example"})
            apex = await post_all(client, url, {**behind, "x-forwarded-host": "example.com"})
    assert ok.status_code == 200
    assert (evil.status_code, apex.status_code) == (400, 400)  # `*.` covers subdomains only


def test_issue_14_host_patterns() -> None:
    patterns = parse_allowed_hosts(["LocalHost", "::1", "app.example.com:8443", "*.lan"])
    for host in ("localhost", "localhost:1", "LOCALHOST.", "[::1]:8000", "[0:0::1]"):
        check_host(host, patterns)
    for host in ("app.example.com:8443", "box.lan", "a.b.lan:80"):
        check_host(host, patterns)
    refused = ("", "evil.example", "localhost.evil.example", "app.example.com",
               "app.example.com:443", "lan", "evil-lan", "[::2]", "[::1", "localhost:x",
               "localhost:123456", "127.0.0.1")  # fmt: skip
    for bad_host in (None, *refused):
        with pytest.raises(ProxyRejection) as caught:
            check_host(bad_host, patterns)
        assert caught.value.status == 400
    check_host("anything:1", parse_allowed_hosts(["*"]))
    for bad in ("http://example.com", "a*.example.com", "", "[::1", "a/b"):
        with pytest.raises(ValueError):
            parse_allowed_hosts([bad])
    with pytest.raises(ValueError, match="not one string"):
        ChatProxy(api_key=KEY, allowed_hosts="localhost")
