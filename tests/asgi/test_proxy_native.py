"""The native relay: ChatProxy on asyncio with our httptools client, without anyio tasks.

Its own race (the exchange in a child task, the disconnect watcher in the request's task),
its keep-alives (one timer for all streams, `Sweep`) and what happens when the request's task
is cancelled from outside or `receive()` fails, each against a real upstream on loopback.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping

import anyio
import anyio.to_thread
import httpx
import pytest

from tokenhub_stream.asgi import ChatProxy, CompletionRecord
from tokenhub_stream.testing import Script

from .conftest import KEY
from .test_proxy_uvicorn import MESSAGES, Upstream, proxied, wait_disconnected

pytestmark = pytest.mark.anyio

Message = MutableMapping[str, object]

BODY = json.dumps({"messages": MESSAGES}).encode()


def scope() -> dict[str, object]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }


async def forever() -> Message:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


class Sent(list[Message]):
    """The messages the app sent; `first_body` is set at the first non-empty body."""

    def __init__(self) -> None:
        super().__init__()
        self.first_body = asyncio.Event()


def asgi_io(
    receive_after_body: Callable[[], Awaitable[Message]],
) -> tuple[Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]], Sent]:
    sent = Sent()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        return await receive_after_body()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            sent.first_body.set()

    return receive, send, sent


async def wait_for_body(sent: Sent) -> None:
    with anyio.fail_after(5):
        await sent.first_body.wait()


class Records(list[CompletionRecord]):
    """`on_complete` for a proxy served in another thread; `wait()` for the first record."""

    def __init__(self) -> None:
        super().__init__()
        self._done = threading.Event()

    def __call__(self, record: CompletionRecord) -> None:
        self.append(record)
        self._done.set()

    async def wait(self) -> CompletionRecord:
        assert await anyio.to_thread.run_sync(self._done.wait, 5.0)
        return self[0]


async def test_native_relay_on_asyncio_anyio_relay_elsewhere(
    upstream: Upstream, anyio_backend: str
) -> None:
    app, running = upstream
    app.enqueue(Script(text="hello there"))
    proxy = ChatProxy(api_key=KEY, base_url=running.base_url)
    receive, send, sent = asgi_io(forever)
    try:
        with anyio.fail_after(5):
            await proxy(scope(), receive, send)
        assert proxy._upstreams.native == (anyio_backend == "asyncio")
    finally:
        await proxy.aclose()
    body = b"".join(m.get("body", b"") for m in sent[1:])  # type: ignore[misc]
    assert body.endswith(b"data: [DONE]\n\n")
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_cancelling_the_request_task_closes_the_upstream_and_reraises(
    upstream: Upstream,
) -> None:
    app, running = upstream
    app.enqueue(Script(deltas=["one", " two"], end="stall"))
    proxy = ChatProxy(api_key=KEY, base_url=running.base_url, keepalive_interval=0.05)
    receive, send, sent = asgi_io(forever)
    task = asyncio.get_running_loop().create_task(proxy(scope(), receive, send))
    try:
        await wait_for_body(sent)
        task.cancel()
        with pytest.raises(asyncio.CancelledError), anyio.fail_after(5):
            await task
        assert await wait_disconnected(upstream, 0, 1.0)
        # The keep-alive timer stops once its last stream is gone (it looks every
        # 0.0125 s here).
        await asyncio.sleep(0.2)
        keepalives = proxy._relay._keepalives
        assert keepalives is not None
        assert not keepalives._members
        assert keepalives._timer is None
    finally:
        await proxy.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failing_receive_closes_the_upstream_and_propagates(upstream: Upstream) -> None:
    app, running = upstream
    app.enqueue(Script(deltas=["one", " two"], end="stall"))
    proxy = ChatProxy(api_key=KEY, base_url=running.base_url, keepalive_interval=None)
    broken = asyncio.Event()

    async def after_body() -> Message:
        await broken.wait()
        raise RuntimeError("the server's receive failed")

    receive, send, sent = asgi_io(after_body)
    task = asyncio.get_running_loop().create_task(proxy(scope(), receive, send))
    try:
        await wait_for_body(sent)
        broken.set()
        with pytest.raises(RuntimeError, match="receive failed"), anyio.fail_after(5):
            await task
        assert await wait_disconnected(upstream, 0, 1.0)
    finally:
        await proxy.aclose()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_keepalive_between_events_from_the_ticker(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["one", " two", " three"], delay=0.5))
    with proxied(upstream, keepalive_interval=0.1) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
    body = response.content
    assert body.endswith(b"data: [DONE]\n\n")
    events = body.split(b"\n\n")
    data = [i for i, e in enumerate(events) if e.startswith(b"data:")]
    # Between the first and the second content event (0.5 s apart): comments every
    # 0.1-0.125 s, each a whole event of its own.
    between = events[data[0] + 1 : data[1]]
    assert 2 <= len(between) <= 6, between
    assert all(e == b": keep-alive" for e in between)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_keepalive_while_the_upstream_keeps_talking(upstream: Upstream) -> None:
    app, _ = upstream
    # 0.6 s of deltas 20 ms apart; the ticker looks every 0.2 s. Only a stall of 0.8 s
    # would earn a comment; a ticker that ignored the writes would send two or three.
    app.enqueue(Script(deltas=[f"d{i} " for i in range(30)], delay=0.02))
    with proxied(upstream, keepalive_interval=0.8) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
    assert b"keep-alive" not in response.content
    assert response.content.endswith(b"data: [DONE]\n\n")


async def leave_after_first_token(url: str) -> None:
    """A browser tab closed as soon as the first token ("one") arrived."""
    async with httpx.AsyncClient(timeout=5) as client:
        async with client.stream("POST", f"{url}/api/chat", json={"messages": MESSAGES}) as r:
            async for chunk in r.aiter_raw():
                if b"one" in chunk:
                    break


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_disconnect_finish_reads_the_upstream_to_its_end(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["one", " two", " three", " four"], delay=0.15))
    records = Records()
    with (
        proxied(upstream, on_complete=records, on_disconnect="finish") as url,
        anyio.fail_after(10),
    ):
        await leave_after_first_token(url)
        record = await records.wait()
    assert record.outcome == "client_disconnect"
    assert record.message.content == "one two three four"
    assert record.finish_reason == "stop"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_on_disconnect_finish_is_cut_by_finish_timeout(upstream: Upstream) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["one"], end="stall"))
    records = Records()
    with (
        proxied(upstream, on_complete=records, on_disconnect="finish", finish_timeout=0.3) as url,
        anyio.fail_after(10),
    ):
        await leave_after_first_token(url)
        assert await wait_disconnected(upstream, 0, 2.0)
        record = await records.wait()
    assert record.outcome == "timeout"
    assert record.message.content == "one"
