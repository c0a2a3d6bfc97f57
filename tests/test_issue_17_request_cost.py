"""Issue #17: the fixed cost of one request over the engine, cut without changing what a
request does.

These pin the behaviour that the cheaper mechanisms must keep: the response head's wait
(one timer per pool instead of one per request) fails each request at its own deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from tokenhub_stream._engine._http import HttpEngine

pytestmark = pytest.mark.anyio

SLACK = 0.25
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the engine is asyncio's


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Answers POST /ok at once; POST /silent never (the connection stays open).
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if head.startswith(b"POST /silent"):
                await reader.read()  # until the client leaves
                return
            writer.write(ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    srv = await asyncio.start_server(_serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()


async def _head_wait(engine: HttpEngine, url: str, seconds: float) -> float:
    """Send, wait for the head with a limit of `seconds`; how long until it failed."""
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await engine.send(url, {}, b"{}", httpx.Timeout(5.0, read=seconds))
    return time.monotonic() - start


@pytest.mark.timing
async def test_issue_17_head_waits_fail_each_at_its_own_deadline(server: str) -> None:
    # Two heads waited for at once, the later deadline first: the timer the first armed
    # must not make the second late, nor the first early.
    engine = HttpEngine(10, httpx.Timeout(None))
    try:
        with anyio.fail_after(5):
            late = asyncio.ensure_future(_head_wait(engine, server + "/silent", 0.6))
            await asyncio.sleep(0)
            soon = await _head_wait(engine, server + "/silent", 0.3)
            assert 0.3 <= soon < 0.3 + SLACK
            assert 0.6 <= await late < 0.6 + SLACK
    finally:
        await engine.aclose()


@pytest.mark.timing
async def test_issue_17_a_head_that_came_does_not_time_the_next_wait(server: str) -> None:
    # A request answered at once, with a short limit, leaves the pool's timer armed at its
    # deadline; the next request, with a longer limit, fails at its own deadline, not then.
    engine = HttpEngine(10, httpx.Timeout(None))
    try:
        with anyio.fail_after(5):
            for _ in range(3):  # answered: the timer stays armed at the first deadline
                response = await engine.send(
                    server + "/ok", {}, b"{}", httpx.Timeout(5.0, read=0.2)
                )
                assert await response.aread() == b"ok"
                response.close()
            elapsed = await _head_wait(engine, server + "/silent", 0.5)
            assert 0.5 <= elapsed < 0.5 + SLACK
            # The pool goes on: answered requests still get their answer.
            response = await engine.send(server + "/ok", {}, b"{}", httpx.Timeout(5.0, read=0.2))
            assert response.status_code == 200
            response.close()
    finally:
        await engine.aclose()


async def test_issue_17_closing_the_engine_disarms_the_head_timer(server: str) -> None:
    # Nothing of a closed engine is left on the event loop to fire later.
    engine = HttpEngine(10, httpx.Timeout(None))
    response = await engine.send(server + "/ok", {}, b"{}", httpx.Timeout(5.0, read=60.0))
    response.close()
    pools = list(engine._pools.values())
    await engine.aclose()
    assert pools and all(pool._heads_timer is None for pool in pools)
    assert not [
        handle
        for handle in asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
        if not handle.cancelled() and getattr(handle._callback, "__self__", None) in pools
    ]
