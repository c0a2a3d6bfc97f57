"""ChatProxy under uvicorn between a misbehaving upstream and a client, on loopback.

The proxy must turn an upstream failure after the 200 into an error frame (never a
truncated answer that looks complete), close the upstream when the browser goes, record
the turn in `on_complete`, and apply back-pressure to a reader that does not read.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator

import anyio
import anyio.to_thread
import httpx
import pytest

import tokenhub_stream as ts
from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import (
    DISCONNECT_WITHIN,
    KEY,
    MESSAGES,
    TRIALS,
    LeakScanner,
    Proxied,
    _ProxyApp,
    figure,
    http_client,
    proxied,
    serve,
    slack,
    wait_disconnected,
)
from .faults import WHERE, broken_stream, content_frame

pytestmark = pytest.mark.anyio

BODY = json.dumps({"messages": MESSAGES}).encode()


async def through(
    proxy: Proxied, leaks: LeakScanner, **kw: object
) -> tuple[list[str], ts.TokenHubError | None, ts.AsyncChatStream]:
    got: list[str] = []
    async with ts.AsyncClient(base_url=proxy.base_url, max_retries=0) as c:
        stream = c.stream_chat(MESSAGES, **kw)  # type: ignore[call-overload]
        try:
            async with stream:
                async for text in stream:
                    got.append(text)
        except ts.TokenHubError as exc:
            leaks.add("client error via proxy", exc)
            return got, exc, stream
    return got, None, stream


# --- cuts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", WHERE)
async def test_proxy_cut_becomes_an_error_frame_after_the_deltas(
    proxy: Proxied, leaks: LeakScanner, where: str
) -> None:
    rng = random.Random(f"proxy-{where}")
    for trial in range(TRIALS):
        broken = broken_stream(where, rng)
        chunks = broken.chunks if trial % 2 else [b"".join(broken.chunks)]
        proxy.upstream.app.enqueue(Script(raw=chunks, end="cut", delay=0))
        with anyio.fail_after(5):
            got, error, _ = await through(proxy, leaks)
        assert "".join(got) == broken.text, (trial, broken)
        # The partial frame is never forwarded: the client sees the proxy's error frame.
        assert isinstance(error, ts.APIError) and error.code == "upstream_error", error
        record = (await proxy.records.wait(trial + 1))[trial]
        assert record.outcome == "upstream_error"
        assert record.message.content == broken.text
        leaks.add("record", repr(record))


async def test_proxy_clean_close_without_done_reaches_the_client_as_truncated(
    proxy: Proxied, leaks: LeakScanner
) -> None:
    proxy.upstream.app.enqueue(Script(raw=[content_frame("a")], delay=0))
    with anyio.fail_after(5):
        got, error, _ = await through(proxy, leaks)
    assert got == ["a"] and isinstance(error, ts.TruncatedStreamError)
    (record,) = await proxy.records.wait(1)
    assert record.outcome == "upstream_error" and record.message.content == "a"


# --- stalls ------------------------------------------------------------------------------------

SETTING = 0.5


@pytest.mark.timing
@pytest.mark.parametrize("after", [0, 2], ids=["after_headers", "after_2_chunks"])
async def test_proxy_silent_upstream_hits_the_proxy_read_timeout(
    upstream: RunningUpstream, leaks: LeakScanner, after: int
) -> None:
    frames = [content_frame(f"t{i}") for i in range(after)]
    upstream.app.enqueue(Script(raw=frames, end="stall", delay=0))
    timeout = httpx.Timeout(5.0, read=SETTING)
    with proxied(upstream, timeout=timeout) as proxy:
        got: list[str] = []
        error: ts.TokenHubError | None = None
        with anyio.fail_after(5):
            async with ts.AsyncClient(base_url=proxy.base_url, max_retries=0) as c:
                try:
                    async with c.stream_chat(MESSAGES) as stream:
                        async for text in stream:
                            got.append(text)
                except ts.TokenHubError as exc:
                    error = exc
        # From the upstream's last write (its headers, or its last frame), which the
        # proxy's read timeout counts from; the client's last delta comes later, by however
        # long the relay took.
        last_write = upstream.app.requests[-1].last_write_at
        assert last_write is not None
        elapsed = time.monotonic() - last_write
        (record,) = await proxy.records.wait(1)
    assert got == [f"t{i}" for i in range(after)]
    assert isinstance(error, ts.APIError) and error.code == "upstream_timeout", error
    assert record.outcome == "timeout" and record.message.content == "".join(got)
    figure(f"proxy read timeout {SETTING} s (upstream silent {after} chunks in)", elapsed)
    assert SETTING <= elapsed < SETTING + slack(SETTING), elapsed


@pytest.mark.timing
@pytest.mark.parametrize("after", [0, 2], ids=["after_headers", "after_2_chunks"])
async def test_proxy_keepalive_only_stall_fires_the_client_timeout(
    upstream: RunningUpstream, leaks: LeakScanner, after: int
) -> None:
    # Keep-alives keep the proxy's socket read alive, so the client's own deadline
    # (which keep-alives do not reset) must fire, name itself, and close the upstream.
    kind = "first_token" if after == 0 else "idle"
    frames = [content_frame(f"t{i}") for i in range(after)]
    upstream.app.enqueue(Script(raw=frames, end="stall", keepalive=0.05, delay=0))
    with proxied(upstream, timeout=httpx.Timeout(5.0, read=SETTING)) as proxy:
        timeout = ts.Timeout(connect=5, first_token=SETTING, idle=SETTING)
        start = last = time.monotonic()
        with anyio.fail_after(5), pytest.raises(ts.StreamTimeout) as info:
            async with ts.AsyncClient(base_url=proxy.base_url, timeout=timeout) as c:
                async with c.stream_chat(MESSAGES) as stream:
                    try:
                        async for _ in stream:
                            last = time.monotonic()
                    finally:
                        fired = time.monotonic()  # when it raised; closing is not timed
        elapsed = fired - (start if after == 0 else last)
        gone = time.monotonic()
        assert await wait_disconnected(upstream, -1, DISCONNECT_WITHIN)
        closed_after = upstream.app.requests[-1].disconnected_at or 0.0
        (record,) = await proxy.records.wait(1)
    assert info.value.kind == kind
    figure(f"client {kind} timeout {SETTING} s through the proxy, keep-alives", elapsed)
    assert SETTING <= elapsed < SETTING + slack(SETTING), elapsed
    assert closed_after - gone < DISCONNECT_WITHIN
    assert record.outcome == "client_disconnect"


# --- browser disconnect ----------------------------------------------------------------------


async def test_proxy_browser_disconnect_closes_upstream_and_records_partial_text(
    proxy: Proxied, leaks: LeakScanner
) -> None:
    rng = random.Random("disconnect")
    worst = 0.0
    async with http_client(leaks) as browser:
        for trial in range(TRIALS):
            n = rng.randint(0, 3)  # 0: the browser leaves while waiting for the first token
            deltas = [f"d{trial}.{i} " for i in range(n)]
            frames = [content_frame(d) for d in deltas]
            proxy.upstream.app.enqueue(Script(raw=frames, end="stall", keepalive=0.05, delay=0))
            index = len(proxy.upstream.app.requests)
            seen = b""
            with anyio.fail_after(5):
                async with browser.stream("POST", proxy.url, content=BODY) as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_raw():
                        seen += chunk
                        if seen.count(b"data: ") >= n:
                            break
                left = time.monotonic()
                leaks.add("browser body", seen)
            assert await wait_disconnected(proxy.upstream, index, DISCONNECT_WITHIN), trial
            closed_at = proxy.upstream.app.requests[index].disconnected_at
            assert closed_at is not None
            worst = max(worst, closed_at - left)
            record = (await proxy.records.wait(trial + 1))[trial]
            assert record.outcome == "client_disconnect", record
            assert record.message.content == "".join(deltas)
    figure(f"upstream closed after browser disconnect, worst of {TRIALS} (s)", worst)
    assert worst < DISCONNECT_WITHIN


# --- retries through the proxy --------------------------------------------------------------


async def test_proxy_429_retry_after_passes_through_and_the_client_retries(
    proxy: Proxied, leaks: LeakScanner
) -> None:
    proxy.upstream.app.enqueue(Script(status=429, headers={"Retry-After": "1"}))
    proxy.upstream.app.enqueue(Script(deltas=["ok"]))
    async with ts.AsyncClient(base_url=proxy.base_url, max_retries=1) as c:
        start = time.monotonic()
        with anyio.fail_after(5):
            async with c.stream_chat(MESSAGES) as stream:
                got = [t async for t in stream]
    assert got == ["ok"] and time.monotonic() - start >= 1.0
    assert len(proxy.upstream.app.requests) == 2


async def test_proxy_error_frame_after_a_delta_is_not_retried(
    proxy: Proxied, leaks: LeakScanner
) -> None:
    frame = {"error": {"message": "overloaded", "code": "service_unavailable"}}
    proxy.upstream.app.enqueue(
        Script(deltas=["partial"], error_frame=frame, end="close", finish_reason=None),
        Script(deltas=["retried"]),
    )
    async with ts.AsyncClient(base_url=proxy.base_url, max_retries=3, max_retry_wait=0.01) as c:
        with anyio.fail_after(5), pytest.raises(ts.ServerError):
            async with c.stream_chat(MESSAGES) as stream:
                async for _ in stream:
                    pass
    assert stream.message.content == "partial"
    assert len(proxy.upstream.app.requests) == 1


# --- slow reader: back-pressure ----------------------------------------------------------------

FRAME_BYTES = 16 * 1024
BULK_FRAMES = 640  # 10.5 MB


def _bulk_frame(i: int) -> bytes:
    pad = "b" * (FRAME_BYTES - 120)
    return content_frame(f"{i:06d}{pad}")


class CountingUpstream:
    """A raw asyncio upstream in a thread that knows how far its writes got.

    `user: "bulk"` streams 10.5 MB as fast as the socket drains; anything else streams
    20 small events 20 ms apart. `sent` counts bytes accepted by the kernel (after each
    drain, with a small send buffer), so it is the upstream's real progress.
    """

    def __init__(self) -> None:
        self.sent = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CountingUpstream:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        server = loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        server.close()
        loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        writer.transport.set_write_buffer_limits(high=FRAME_BYTES)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            body = json.loads(await reader.readexactly(length))
            bulk = body.get("user") == "bulk"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            for i in range(BULK_FRAMES if bulk else 20):
                data = _bulk_frame(i) if bulk else content_frame(f"s{i} ")
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
                self.sent += len(data) if bulk else 0
                if not bulk:
                    await asyncio.sleep(0.02)
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def counting() -> Iterator[CountingUpstream]:
    with CountingUpstream() as up:
        yield up


def _open_slow_reader(port: int, path: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: effective
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"messages": MESSAGES, "user": "bulk"}).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _dechunk(raw: bytes) -> bytes:
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:80]
    out = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


async def _plateau(counting: CountingUpstream, quiet: float, limit: float) -> int:
    """Wait until the upstream's progress stops for `quiet` seconds; return it."""
    deadline = time.monotonic() + limit
    last, since = counting.sent, time.monotonic()
    while time.monotonic() < deadline:
        await anyio.sleep(0.05)
        if counting.sent != last:
            last, since = counting.sent, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
    raise AssertionError(f"the upstream never stopped: {counting.sent} bytes sent")


@pytest.mark.timing
async def test_proxy_slow_reader_back_pressure_reaches_the_upstream(
    counting: CountingUpstream, leaks: LeakScanner
) -> None:
    total = sum(len(_bulk_frame(i)) for i in range(BULK_FRAMES))
    proxy = ChatProxy(
        api_key=KEY,
        base_url=f"http://127.0.0.1:{counting.port}/v1",
        keepalive_interval=None,
        timeout=httpx.Timeout(30.0),
    )
    with serve(_ProxyApp(proxy)) as root:
        port = int(root.rsplit(":", 1)[1])
        sock = await anyio.to_thread.run_sync(_open_slow_reader, port, "/v1/chat/completions")
        try:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            # 1. The reader reads nothing: the upstream must stop, far short of 10 MB.
            stalled = await _plateau(counting, quiet=0.5, limit=10)
            growth = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            assert stalled < 0.8 * total, stalled  # kernel buffers hold about 4 MB of it
            # 2. Meanwhile another stream through the same proxy is not slowed.
            start = time.monotonic()
            async with http_client(leaks) as other:
                body = json.dumps({"messages": MESSAGES}).encode()
                with anyio.fail_after(5):
                    response = await other.post(f"{root}/v1/chat/completions", content=body)
            other_time = time.monotonic() - start
            assert response.status_code == 200 and response.text.count("data: ") == 21
            assert other_time < 20 * 0.02 + 0.5, other_time
            # 3. Read 1 byte a few times a second: progress upstream follows the reader.
            sock.setblocking(False)
            received = bytearray()
            for _ in range(10):
                await anyio.sleep(0.1)
                try:
                    received += sock.recv(1)
                except BlockingIOError:
                    pass
            still = counting.sent
            assert still - stalled <= 2 * FRAME_BYTES, (stalled, still)
            # 4. Read the rest at full speed: every byte arrives, in order.
            sock.setblocking(True)
            sock.settimeout(20)

            def read_all() -> bytes:
                chunks = [bytes(received)]
                while True:
                    data = sock.recv(1 << 16)
                    if not data:
                        break
                    chunks.append(data)
                    if data.endswith(b"0\r\n\r\n"):
                        break
                return b"".join(chunks)

            raw = await anyio.to_thread.run_sync(read_all)
        finally:
            if tracemalloc.is_tracing():
                tracemalloc.stop()
            sock.close()
    body = _dechunk(raw)
    expected = b"".join(_bulk_frame(i) for i in range(BULK_FRAMES)) + b"data: [DONE]\n\n"
    assert zlib.crc32(body) == zlib.crc32(expected) and len(body) == len(expected)
    assert counting.sent == total
    figure("slow reader: upstream bytes sent while the reader read none", stalled)
    figure("slow reader: traced memory growth of the process during the stall (bytes)", growth)
    figure("slow reader: a second stream's time (s), 20 events x 20 ms", other_time)
    # Kernel socket buffers hold most of what was sent; Python-level buffering is small.
    assert growth < 2 * 1024 * 1024, growth
