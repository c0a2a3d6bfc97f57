"""ChatProxy's default upstream on asyncio: aiohttp called directly (`_proxy_upstream.py`)."""

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


async def test_default_upstream_is_aiohttp_without_httpx(upstream: Upstream) -> None:
    # The servers in these tests run on asyncio, so every uvicorn test goes through this
    # path; here it is checked by name, with the bytes passed through unchanged.
    app, running = upstream
    app.enqueue(Script(text="hello there"))
    proxy = ChatProxy(api_key=KEY, base_url=running.base_url, keepalive_interval=None)
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
        assert type(proxy._upstream).__name__ == "AiohttpUpstream"
        assert proxy._client is None  # no httpx client was built for the passthrough
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert b"hello" in response.content
    assert app.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert_no_key(response.content, response.headers)


async def test_idle_limit_is_per_gap_not_per_stream(upstream: Upstream) -> None:
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


async def test_idle_limit_fires_after_the_last_chunk(upstream: Upstream) -> None:
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
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            async with client.stream(
                "POST", f"{url}/api/chat", json={"messages": MESSAGES}
            ) as response:
                body = b""
                last = time.monotonic()
                async for chunk in response.aiter_raw():
                    if b"upstream_timeout" in chunk:
                        silent = time.monotonic() - last
                    else:
                        last = time.monotonic()
                    body += chunk
    assert all(f"d{i} ".encode() in body for i in range(6))
    assert b'"code":"upstream_timeout"' in body and b"[DONE]" not in body
    assert read * 0.9 <= silent < read + 0.4, silent
