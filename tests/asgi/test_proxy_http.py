"""The proxy's HTTP/1.1 upstream client on httptools (`_proxy_http.py`).

Against real loopback servers: a raw asyncio server scripted per test for the protocol
edge cases, and the local upstream (`tokenhub_stream.testing`) through ChatProxy.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tokenhub_stream._engine import _http as _proxy_http
from tokenhub_stream._engine._http import HttpEngine, HttpResponse
from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.asgi._upstream import HttpxUpstream, Upstreams
from tokenhub_stream.testing import Script

from .conftest import KEY, assert_no_key, serve
from .test_proxy_uvicorn import MESSAGES, Upstream, starlette_app

pytestmark = pytest.mark.anyio

HEADERS = {"authorization": f"Bearer {KEY}", "accept": "text/event-stream"}
OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


BACKENDS: list[object] = ["asyncio"]
if importlib.util.find_spec("uvloop") is not None:
    BACKENDS.append(pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    # asyncio only by design (trio goes through httpx); uvloop is the recommended loop.
    return request.param


class RawServer:
    """A loopback server running `handler` per connection; it records what it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.disconnects: list[float] = []  # loop time each connection was seen closing
        self.disconnected = asyncio.Event()
        self.received = asyncio.Event()
        self.url = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def raw_server(handler: Handler, scheme: str = "http") -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    listener = await asyncio.start_server(server._handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{scheme}://127.0.0.1:{port}/v1/chat/completions"
    try:
        yield server
    finally:
        listener.close()


async def read_request(server: RawServer, reader: asyncio.StreamReader) -> bytes | None:
    """One request head and body, or None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length)
    server.requests.append(head + body)
    server.received.set()
    return head + body


async def wait_closed(server: RawServer, reader: asyncio.StreamReader) -> None:
    """Read until the client closes, then record when."""
    while await reader.read(65536):
        pass
    seen_closing(server)


def seen_closing(server: RawServer) -> None:
    server.disconnects.append(asyncio.get_running_loop().time())
    server.disconnected.set()


def chunked(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def upstream_client(max_connections: int = 10, timeout: httpx.Timeout | float = 5.0) -> HttpEngine:
    return HttpEngine(max_connections, httpx.Timeout(timeout))


async def fetch(client: HttpEngine, url: str) -> tuple[HttpResponse, bytes]:
    response = await client.send(url, HEADERS, b'{"stream":true}')
    try:
        return response, await response.aread()
    finally:
        await response.aclose()


def keep_alive_handler(*responses: bytes) -> Handler:
    """Answer each request on a connection with the next response, keeping it open."""

    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        for response in responses:
            if await read_request(server, reader) is None:
                seen_closing(server)
                return
            writer.write(response)
            await writer.drain()
        await wait_closed(server, reader)

    return handler


def serving(*responses: bytes) -> AbstractAsyncContextManager[RawServer]:
    return raw_server(keep_alive_handler(*responses))


# --- bodies --------------------------------------------------------------------------------


async def test_proxy_http_content_length_body() -> None:
    body = b'data: {"a":1}\n\n'
    response_bytes = OK_HEAD + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    async with serving(response_bytes) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            response, data = await fetch(client, server.url)
        await client.aclose()
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert data == body
    request = server.requests[0]
    assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"host: {server.url.split('/')[2]}\r\n".encode() in request
    assert b"content-length: 15\r\n" in request and request.endswith(b'{"stream":true}')


async def test_proxy_http_chunked_body() -> None:
    events = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    response_bytes = OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(*events)
    async with serving(response_bytes) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            _, data = await fetch(client, server.url)
        await client.aclose()
    assert data == b"".join(events)


async def test_proxy_http_close_delimited_body_is_not_reused() -> None:
    # No Content-Length, no chunking: the body ends when the server closes.
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\ndata: 1\n\ndata: 2\n\n")
        await writer.drain()

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            _, first = await fetch(client, server.url)
            _, second = await fetch(client, server.url)
        await client.aclose()
    assert first == second == b"data: 1\n\ndata: 2\n\n"
    assert server.connections == 2


@pytest.mark.parametrize(
    "raw",
    [
        OK_HEAD + b"content-length: 18\r\n\r\ndata: 1\n\ndata: 2\n\n",
        OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: 1\n\n", b"data: 2\n\n"),
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
        + OK_HEAD
        + b"content-length: 18\r\n\r\ndata: 1\n\ndata: 2\n\n",
    ],
    ids=["content-length", "chunked", "interim-103"],
)
async def test_proxy_http_bytes_split_at_every_offset(raw: bytes) -> None:
    # The parser sees the response in two reads, split at every offset (headers too).
    class Transport(asyncio.Transport):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def close(self) -> None:
            pass

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    pool = _proxy_http._Pool(("http", "x", 80), 1, httpx.Timeout(5.0), None)
    with anyio.fail_after(5):
        for offset in range(1, len(raw)):
            connection = _proxy_http._Connection(pool)
            connection.connection_made(Transport())
            response = HttpResponse(connection, None)
            started = asyncio.ensure_future(response.start(b"", b""))
            await asyncio.sleep(0)
            connection.data_received(raw[:offset])
            connection.data_received(raw[offset:])
            await started
            assert response.status_code == 200
            assert "link" not in response.headers
            assert await response.aread() == b"data: 1\n\ndata: 2\n\n", offset
            assert pool._idle[-1] is connection  # read to its end: back in the pool
            pool._idle.clear()


async def test_proxy_http_headers_are_lower_case_and_joined() -> None:
    raw = OK_HEAD + b"X-Thing: a\r\nx-thing: b\r\nRetry-After: 2\r\ncontent-length: 0\r\n\r\n"
    async with serving(raw) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            response, data = await fetch(client, server.url)
        await client.aclose()
    assert data == b""
    assert response.headers["x-thing"] == "a, b"
    assert response.headers["retry-after"] == "2"


# --- the pool ------------------------------------------------------------------------------


async def test_proxy_http_keep_alive_reuses_one_connection() -> None:
    raw = OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: [DONE]\n\n")
    async with serving(*([raw] * 5)) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            for _ in range(5):
                _, data = await fetch(client, server.url)
                assert data == b"data: [DONE]\n\n"
        await client.aclose()
    assert server.connections == 1
    assert len(server.requests) == 5


async def test_proxy_http_connection_close_is_honoured() -> None:
    raw = OK_HEAD + b"connection: close\r\ncontent-length: 2\r\n\r\nok"
    async with serving(raw) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            await fetch(client, server.url)
            await fetch(client, server.url)
        await client.aclose()
    assert server.connections == 2


def held_handler(release: asyncio.Event) -> Handler:
    """Per request: the headers and one event, the rest once `release` is set."""

    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await read_request(server, reader) is not None:
            writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await wait_closed(server, reader)

    return handler


async def test_proxy_http_pool_limit_and_pool_timeout() -> None:
    # One connection: a second request waits for it, and gives up after timeout.pool.
    release = asyncio.Event()
    async with raw_server(held_handler(release)) as server:
        client = HttpEngine(1, httpx.Timeout(5.0, pool=0.2))
        with anyio.fail_after(5):
            first = await client.send(server.url, HEADERS, b"{}")
            start = time.monotonic()
            with pytest.raises(httpx.PoolTimeout):
                await client.send(server.url, HEADERS, b"{}")
            assert 0.15 <= time.monotonic() - start < 2.0
            # A waiter gets the connection as soon as the first response has ended.
            waiting = asyncio.ensure_future(fetch(client, server.url))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            release.set()
            assert await first.aread() == b"data: 1\n\n"
            await first.aclose()
            _, data = await waiting
        await client.aclose()
    assert data == b"data: 1\n\n"
    assert server.connections == 1


async def test_proxy_http_waiter_gets_the_slot_of_a_closed_connection() -> None:
    release = asyncio.Event()
    async with raw_server(held_handler(release)) as server:
        client = HttpEngine(1, httpx.Timeout(5.0, pool=2.0))
        with anyio.fail_after(5):
            first = await client.send(server.url, HEADERS, b"{}")
            waiting = asyncio.ensure_future(client.send(server.url, HEADERS, b"{}"))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            await first.aclose()  # unfinished: its connection closes, its slot is handed on
            second = await waiting
            release.set()
            assert await second.aread() == b"data: 1\n\n"
        await client.aclose()
    assert server.connections == 2


async def test_proxy_http_cancelled_waiter_leaks_no_slot() -> None:
    release = asyncio.Event()
    async with raw_server(held_handler(release)) as server:
        client = HttpEngine(1, httpx.Timeout(5.0, pool=2.0))
        with anyio.fail_after(5):
            first = await client.send(server.url, HEADERS, b"{}")
            waiting = asyncio.ensure_future(client.send(server.url, HEADERS, b"{}"))
            await asyncio.sleep(0.05)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            release.set()
            assert await first.aread() == b"data: 1\n\n"
            _, data = await fetch(client, server.url)
        await client.aclose()
    assert data == b"data: 1\n\n"
    assert server.connections == 1


async def test_proxy_http_idle_connections_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_proxy_http, "KEEPALIVE_EXPIRY", 0.2)
    raw = OK_HEAD + b"content-length: 2\r\n\r\nok"
    async with serving(raw, raw) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            await fetch(client, server.url)
            await server.disconnected.wait()
            await fetch(client, server.url)
        await client.aclose()
    assert server.connections == 2


async def test_proxy_http_server_closing_an_idle_connection_is_no_error() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"content-length: 2\r\n\r\nok")
        await writer.drain()  # then close: the client finds out while the connection idles

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            await fetch(client, server.url)
            await asyncio.sleep(0.1)
            _, data = await fetch(client, server.url)
        await client.aclose()
    assert data == b"ok"
    assert server.connections == 2


async def test_proxy_http_bytes_after_the_response_stop_reuse() -> None:
    raw = OK_HEAD + b"content-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n"
    async with serving(raw, raw) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            _, first = await fetch(client, server.url)
            _, second = await fetch(client, server.url)
        await client.aclose()
    assert first == second == b"ok"
    assert server.connections == 2


async def test_proxy_http_bytes_on_an_idle_connection_close_it() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"content-length: 2\r\n\r\nok")
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")  # nobody asked
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            await fetch(client, server.url)
            await server.disconnected.wait()  # the client closed it
            _, data = await fetch(client, server.url)
        await client.aclose()
    assert data == b"ok"
    assert server.connections == 2


async def test_proxy_http_switching_protocols_is_remote_protocol_error() -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    async with serving(raw) as server:
        client = upstream_client()
        with anyio.fail_after(5), pytest.raises(httpx.RemoteProtocolError):
            await client.send(server.url, HEADERS, b"{}")
        await client.aclose()


# --- connecting ----------------------------------------------------------------------------


async def test_proxy_http_connect_refused_is_connect_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    client = upstream_client()
    with anyio.fail_after(5), pytest.raises(httpx.ConnectError) as caught:
        await client.send(f"http://127.0.0.1:{port}/v1/chat/completions", HEADERS, b"{}")
    assert isinstance(caught.value.__cause__, OSError)
    assert_no_key(caught.value, repr(client))
    await client.aclose()


async def test_proxy_http_connect_timeout() -> None:
    # TCP connects, but the TLS handshake never gets an answer: the connect timeout.
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await wait_closed(server, reader)

    async with raw_server(handler, scheme="https") as server:
        client = HttpEngine(10, httpx.Timeout(5.0, connect=0.2))
        start = time.monotonic()
        with anyio.fail_after(5), pytest.raises(httpx.ConnectTimeout):
            await client.send(server.url, HEADERS, b"{}")
        assert time.monotonic() - start < 2.0
        with anyio.fail_after(2):
            await server.disconnected.wait()
        assert [pool._open for pool in client._pools.values()] == [0]
        await client.aclose()


async def test_proxy_http_resolves_a_name_once_for_a_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups: list[str] = []
    resolve = _proxy_http._Pool._resolve

    async def counted(pool: _proxy_http._Pool) -> list[tuple[int, str]]:
        lookups.append(pool.origin[1])
        return await resolve(pool)

    monkeypatch.setattr(_proxy_http._Pool, "_resolve", counted)
    raw = OK_HEAD + b"content-length: 2\r\n\r\nok"
    async with serving(raw) as server:
        url = server.url.replace("127.0.0.1", "localhost")
        client = upstream_client()
        with anyio.fail_after(5):
            results = await asyncio.gather(*(fetch(client, url) for _ in range(5)))
        await client.aclose()
    assert [data for _, data in results] == [b"ok"] * 5
    assert server.connections == 5
    assert lookups == ["localhost"]
    assert b"host: localhost:" in server.requests[0]


async def test_proxy_http_tries_each_address(monkeypatch: pytest.MonkeyPatch) -> None:
    async def addresses(pool: _proxy_http._Pool) -> list[tuple[int, str]]:
        # Nothing listens on 127.0.0.2 (the server is bound to 127.0.0.1): refused.
        return [(socket.AF_INET, "127.0.0.2"), (socket.AF_INET, "127.0.0.1")]

    monkeypatch.setattr(_proxy_http._Pool, "_resolve", addresses)
    async with serving(OK_HEAD + b"content-length: 2\r\n\r\nok") as server:
        client = upstream_client()
        with anyio.fail_after(5):
            _, data = await fetch(client, server.url)
        await client.aclose()
    assert data == b"ok"


async def test_proxy_http_lookup_failure_is_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def addresses(pool: _proxy_http._Pool) -> list[tuple[int, str]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(_proxy_http._Pool, "_resolve", addresses)
    client = upstream_client()
    with anyio.fail_after(5), pytest.raises(httpx.ConnectError) as caught:
        await client.send("http://upstream.invalid/v1/chat/completions", HEADERS, b"{}")
    assert isinstance(caught.value.__cause__, socket.gaierror)
    await client.aclose()


# --- timeouts ------------------------------------------------------------------------------


async def test_proxy_http_no_headers_is_read_timeout() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = HttpEngine(10, httpx.Timeout(5.0, read=0.2))
        with anyio.fail_after(5), pytest.raises(httpx.ReadTimeout):
            await client.send(server.url, HEADERS, b"{}")
        with anyio.fail_after(2):
            await server.disconnected.wait()
        await client.aclose()


async def test_proxy_http_idle_timeout_fires_after_silence() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = HttpEngine(10, httpx.Timeout(5.0, read=0.3))
        with anyio.fail_after(5):
            response = await client.send(server.url, HEADERS, b"{}")
            chunks = response.aiter_raw()
            assert await chunks.__anext__() == b"data: 1\n\n"
            start = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                await chunks.__anext__()
            silent = time.monotonic() - start
            await server.disconnected.wait()
        await response.aclose()
        await client.aclose()
    assert 0.25 <= silent < 1.5, silent


async def test_proxy_http_one_idle_timer_for_all_streams() -> None:
    # Three streams on one client with a 0.3 s read limit: the silent two time out, the
    # one that keeps talking (every 0.1 s, for 1 s) does not; then no timer is left.
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await read_request(server, reader)
        assert request is not None
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        if b"talk" in request:
            for _ in range(10):
                await asyncio.sleep(0.1)
                writer.write(b"9\r\ndata: 2\n\n\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await wait_closed(server, reader)

    async def read_all(client: HttpEngine, body: bytes) -> str:
        response = await client.send(server.url, HEADERS, body)
        try:
            async for _ in response.aiter_raw():
                pass
        except httpx.ReadTimeout:
            return "timeout"
        finally:
            await response.aclose()
        return "complete"

    async with raw_server(handler) as server:
        client = HttpEngine(10, httpx.Timeout(5.0, read=0.3))
        with anyio.fail_after(5):
            outcomes = await asyncio.gather(
                read_all(client, b"{}"), read_all(client, b'{"talk": 1}'), read_all(client, b"{}")
            )
        watch = client._watch
        assert watch is not None
        assert not watch._members
        await asyncio.sleep(0.2)  # its last look finds nothing and does not re-arm
        assert watch._timer is None
        await client.aclose()
    assert list(outcomes) == ["timeout", "complete", "timeout"]


async def test_proxy_http_time_spent_writing_is_not_upstream_silence() -> None:
    # The upstream is silent for 1 s, longer than the 0.4 s limit, but the reader spends
    # 0.9 s of it elsewhere (writing to a slow client): it waited only 0.1 s.
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(1.0)
        writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await writer.drain()
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = HttpEngine(10, httpx.Timeout(5.0, read=0.4))
        with anyio.fail_after(5):
            response = await client.send(server.url, HEADERS, b"{}")
            received = []
            async for chunk in response.aiter_raw():
                received.append(chunk)
                if len(received) == 1:
                    await asyncio.sleep(0.9)
        await response.aclose()
        await client.aclose()
    assert received == [b"data: 1\n\n", b"data: 2\n\n"]


# --- closing -------------------------------------------------------------------------------


async def test_proxy_http_aborted_response_closes_the_upstream_socket() -> None:
    # The billing path: the upstream sees the disconnect at once, not at its next write.
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            response = await client.send(server.url, HEADERS, b"{}")
            assert await response.aiter_raw().__anext__() == b"data: 1\n\n"
            closed_at = asyncio.get_running_loop().time()
            await response.aclose()
            await server.disconnected.wait()
        await client.aclose()
    assert server.disconnects[0] - closed_at < 1.0
    with pytest.raises(httpx.StreamClosed):
        await response.__anext__()


async def test_proxy_http_cancel_while_waiting_for_headers_closes_the_socket() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            sending = asyncio.ensure_future(client.send(server.url, HEADERS, b"{}"))
            await server.received.wait()
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            await server.disconnected.wait()
        await client.aclose()


async def test_proxy_http_aclose_closes_busy_connections() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            response = await client.send(server.url, HEADERS, b"{}")
            await client.aclose()
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()
            await server.disconnected.wait()


# --- back-pressure and broken bodies -------------------------------------------------------


async def test_proxy_http_back_pressure_bounds_the_buffer() -> None:
    total = 8 * 1024 * 1024
    block = b"x" * 65536
    server_buffered: list[int] = []

    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"content-length: %d\r\n\r\n" % total)
        for _ in range(total // len(block)):
            writer.write(block)
            server_buffered.append(writer.transport.get_write_buffer_size())
            await writer.drain()
        await wait_closed(server, reader)

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(10):
            response = await client.send(server.url, HEADERS, b"{}")
            await asyncio.sleep(0.5)  # a reader that does not read: a slow client
            held = response.pending_size
            assert len(server_buffered) < total // len(block)  # the server is held back
            size = 0
            async for chunk in response.aiter_raw():
                assert set(chunk) == {ord("x")}
                size += len(chunk)
        await client.aclose()
    # 64 KiB, plus what one read brought in when it crossed the mark.
    assert held <= 64 * 1024 + 256 * 1024, held
    assert size == total


@pytest.mark.parametrize(
    "raw",
    [
        OK_HEAD + b"content-length: 100\r\n\r\ndata: 1\n\n",
        OK_HEAD + b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n",
    ],
    ids=["content-length", "chunked"],
)
async def test_proxy_http_upstream_cut_mid_body_is_an_error(raw: bytes) -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(raw)
        await writer.drain()  # then close mid-body

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            response = await client.send(server.url, HEADERS, b"{}")
            received = []
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_raw():
                    received.append(chunk)
        await response.aclose()
        await client.aclose()
    assert received == [b"data: 1\n\n"]  # what came before the cut is delivered first


async def test_proxy_http_reset_mid_body_is_read_error() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)
        writer.write(OK_HEAD + b"transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            response = await client.send(server.url, HEADERS, b"{}")
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await response.aread()
        await client.aclose()


async def test_proxy_http_garbage_is_remote_protocol_error() -> None:
    async with serving(b"SSH-2.0-OpenSSH\r\n\r\n") as server:
        client = upstream_client()
        with anyio.fail_after(5), pytest.raises(httpx.RemoteProtocolError):
            await client.send(server.url, HEADERS, b"{}")
        await client.aclose()


async def test_proxy_http_no_response_is_remote_protocol_error() -> None:
    async def handler(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(server, reader)  # and close without a word

    async with raw_server(handler) as server:
        client = upstream_client()
        with anyio.fail_after(5), pytest.raises(httpx.RemoteProtocolError) as caught:
            await client.send(server.url, HEADERS, b"{}")
        await client.aclose()
    assert_no_key(caught.value)


# --- the response object and the key -------------------------------------------------------


async def test_proxy_http_response_members_and_key_hygiene() -> None:
    raw = OK_HEAD + b"content-length: 2\r\n\r\nok"
    async with serving(raw) as server:
        client = upstream_client()
        with anyio.fail_after(5):
            response = await client.send(server.url, HEADERS, b"{}")
            with pytest.raises(httpx.ResponseNotRead):
                _ = response.content
            assert not response.is_stream_consumed
            assert await response.aread() == b"ok"
            assert response.is_stream_consumed
            with pytest.raises(httpx.StreamConsumed):
                response.aiter_raw()
            await response.aclose()
        assert_no_key(repr(client), repr(response), repr(client._pools))
        with pytest.raises(httpx.LocalProtocolError) as caught:
            await client.send(server.url, {"authorization": f"Bearer {KEY}\r\nx: y"}, b"")
        assert_no_key(caught.value)
        await client.aclose()
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.send("ftp://127.0.0.1/v1", HEADERS, b"")
    with pytest.raises(ValueError):
        HttpEngine(0, httpx.Timeout(1.0))


# --- TLS -----------------------------------------------------------------------------------


def self_signed(tmp: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 made with the openssl command, or None without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return cert, key


async def test_proxy_http_tls(tmp_path: Path) -> None:
    pair = self_signed(tmp_path)
    if pair is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is needed for the TLS test in CI")
        pytest.skip("no openssl command to make a certificate")
    cert, key = pair
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    raw = OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: tls\n\n")
    server = RawServer(keep_alive_handler(raw, raw))
    listener = await asyncio.start_server(server._handle, "127.0.0.1", 0, ssl=server_context)
    url = f"https://127.0.0.1:{listener.sockets[0].getsockname()[1]}/v1/chat/completions"
    try:
        # The default context (certifi's bundle) refuses a self-signed certificate.
        client = upstream_client()
        with anyio.fail_after(5), pytest.raises(httpx.ConnectError) as caught:
            await client.send(url, HEADERS, b"{}")
        assert isinstance(caught.value.__cause__, ssl.SSLError)
        await client.aclose()
        client = upstream_client()
        client._ssl = ssl.create_default_context(cafile=str(cert))
        with anyio.fail_after(5):
            _, first = await fetch(client, url)
            _, second = await fetch(client, url)
        await client.aclose()
    finally:
        listener.close()
    assert first == second == b"data: tls\n\n"
    assert server.connections == 1  # one kept-alive connection (the refused one never got here)


# --- through ChatProxy ---------------------------------------------------------------------


async def test_proxy_http_is_the_default_upstream(upstream: Upstream) -> None:
    app, running = upstream
    app.enqueue(Script(text="hello there"))
    proxy = ChatProxy(api_key=KEY, base_url=running.base_url, keepalive_interval=None)
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
        assert type(proxy._upstreams.chosen) is HttpEngine  # no httpx for the passthrough
    assert response.status_code == 200
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert app.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert app.requests[-1].headers["accept-encoding"] == "identity"
    assert_no_key(response.content, response.headers)


async def test_proxy_http_falls_back_to_httpx_without_httptools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    find_spec = importlib.util.find_spec

    def without_httptools(name: str, package: str | None = None) -> object:
        return None if name == "httptools" else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_httptools)
    upstreams = Upstreams(
        max_connections=10, timeout=httpx.Timeout(5.0), max_head_bytes=16384, transport=None
    )
    assert isinstance(upstreams.get(), HttpxUpstream)
    assert not upstreams.native
    await upstreams.aclose()
