"""ChatProxy's upstreams on asyncio: our engine on httptools (the default) and httpx (with
`transport=`, or without httptools).

`test_proxy_http.py` tests the engine on its own; these run both through ChatProxy.
"""

from __future__ import annotations

import time

import anyio
import httpx
import pytest

from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.testing import Script

from .conftest import KEY, assert_no_key, serve
from .test_proxy_uvicorn import MESSAGES, Upstream, starlette_app

pytestmark = pytest.mark.anyio


UPSTREAMS = ["engine", "httpx"]


def use_upstream(proxy: ChatProxy, kind: str) -> None:
    """Make `proxy` send through `kind` (the default picks the engine when it can)."""
    if kind == "httpx":
        proxy._upstreams._transport = httpx.AsyncHTTPTransport(trust_env=False)


@pytest.mark.parametrize("kind", UPSTREAMS)
async def test_upstream_passes_bytes_without_httpx(upstream: Upstream, kind: str) -> None:
    # The servers in these tests run on asyncio, so every uvicorn test goes through the
    # default; here each upstream is checked, with the bytes passed through unchanged.
    app, running = upstream
    app.enqueue(Script(text="hello there"))
    proxy = ChatProxy(api_key=KEY, base_url=running.base_url, keepalive_interval=None)
    use_upstream(proxy, kind)
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
        assert proxy._upstreams.native == (kind == "engine")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert b"hello" in response.content
    assert app.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert_no_key(response.content, response.headers)


@pytest.mark.timing
@pytest.mark.parametrize("kind", UPSTREAMS)
async def test_idle_limit_is_per_gap_not_per_stream(upstream: Upstream, kind: str) -> None:
    # The idle timer fires once per `read` seconds and re-arms while chunks keep coming:
    # a stream far longer than the limit, with every gap well inside it, completes.
    app, running = upstream
    app.enqueue(Script(deltas=[f"d{i} " for i in range(12)], delay=0.1))
    proxy = ChatProxy(
        api_key=KEY,
        base_url=running.base_url,
        keepalive_interval=None,
        timeout=httpx.Timeout(5.0, read=0.4),
    )
    use_upstream(proxy, kind)
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(10):
        start = time.monotonic()
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
        elapsed = time.monotonic() - start
    assert elapsed > 0.8  # two idle limits and more
    assert response.status_code == 200
    assert b"upstream_timeout" not in response.content
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert all(f"d{i} ".encode() in response.content for i in range(12))


@pytest.mark.timing
@pytest.mark.parametrize("kind", UPSTREAMS)
async def test_idle_limit_fires_after_the_last_chunk(upstream: Upstream, kind: str) -> None:
    # Chunks for longer than the limit, then silence: the error frame comes one limit
    # after the last chunk, not one limit after the headers.
    app, running = upstream
    app.enqueue(Script(deltas=[f"d{i} " for i in range(6)], delay=0.1, end="stall"))
    read = 0.4
    proxy = ChatProxy(
        api_key=KEY,
        base_url=running.base_url,
        keepalive_interval=None,
        timeout=httpx.Timeout(5.0, read=read),
    )
    use_upstream(proxy, kind)
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            async with client.stream(
                "POST", f"{url}/api/chat", json={"messages": MESSAGES}
            ) as response:
                body = b""
                async for chunk in response.aiter_raw():
                    if b"upstream_timeout" in chunk:
                        timed_out = time.monotonic()
                    body += chunk
    # From the upstream's last write, which the limit counts from (the client's last
    # chunk arrives later, by however long the relay took).
    last_write = app.requests[-1].last_write_at
    assert last_write is not None
    silent = timed_out - last_write
    assert all(f"d{i} ".encode() in body for i in range(6))
    assert b'"code":"upstream_timeout"' in body and b"[DONE]" not in body
    assert read * 0.9 <= silent < read + 0.4, silent
