"""Issue #14, findings 1, 2, 7, 8 and the total deadline of 10: a hostile upstream.

The upstream here is a raw HTTP/1.1 server on a thread and event loop of its own
(`Hostile`), scripted per test, so that it can send what no framework would: heads that
never end, answers larger than any limit, bodies without framing cut mid-event,
compressed streams, HTML, a byte at a time. The proxy runs under uvicorn (`serve`), and
each test runs on every upstream path the proxy has (`path`): our httptools client (the
default on asyncio), httpx's own transport (the fallback without httptools), and httpx
with a `transport=` (what trio uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.util
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import anyio.to_thread
import httpx
import pytest

from tokenhub_stream._engine import ResponseHeadTooLarge
from tokenhub_stream._engine import _http as _proxy_http
from tokenhub_stream._engine._http import HttpEngine, HttpResponse
from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.asgi._upstream import HttpxUpstream
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

from .conftest import KEY, LeakScanner, _ProxyApp, http_client, serve
from .faults import content_frame
from .test_proxy_hostile import body_of, call

pytestmark = pytest.mark.anyio

Handler = Callable[["Conn"], Awaitable[None]]

PATHS = ["native", "nohttptools", "httpx"]
EVENT = content_frame("hello")
DONE = b"data: [DONE]\n\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
ANSWER = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "stop",
            }
        ],
    }
).encode()


# --- the hostile upstream --------------------------------------------------------------------


class Hostile:
    """A raw loopback upstream on its own thread and loop, running `handler` per connection.

    It records when the handler began its attack (`begin()`) and when it saw the proxy
    close the connection (a failed write, or end of file while reading).
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.base_url = ""
        self.sent = 0
        self.began = threading.Event()
        self.closed = threading.Event()
        self.began_at = 0.0
        self.closed_at = 0.0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Hostile:
        self._thread.start()
        assert self._ready.wait(5), "the hostile upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self.handler(Conn(self, reader, writer))
            except (ConnectionError, asyncio.IncompleteReadError):
                self.seen_closing()
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def seen_closing(self) -> None:
        if not self.closed.is_set():
            self.closed_at = time.monotonic()
            self.closed.set()

    async def wait_closed(self, timeout: float) -> float:
        """Seconds from `begin()` until the proxy closed the connection."""
        assert await anyio.to_thread.run_sync(self.closed.wait, timeout), "never closed"
        return self.closed_at - self.began_at


class Conn:
    def __init__(
        self, hostile: Hostile, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.hostile = hostile
        self.reader = reader
        self.writer = writer

    async def request(self) -> bytes:
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head + await self.reader.readexactly(length)

    def begin(self) -> None:
        self.hostile.began_at = time.monotonic()
        self.hostile.began.set()

    async def send(self, data: bytes) -> bool:
        """Write and drain; False once the proxy has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.hostile.seen_closing()
            return False
        if self.writer.transport.is_closing():
            self.hostile.seen_closing()
            return False
        self.hostile.sent += len(data)
        return True

    async def until_closed(self) -> None:
        while await self.reader.read(65536):
            pass
        self.hostile.seen_closing()


# --- the proxy, on each upstream path --------------------------------------------------------


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    name = str(request.param)
    if name == "nohttptools":
        find_spec = importlib.util.find_spec

        def without_httptools(module: str, package: str | None = None) -> object:
            return None if module == "httptools" else find_spec(module, package)

        monkeypatch.setattr(importlib.util, "find_spec", without_httptools)
    return name


@contextlib.contextmanager
def proxied(path: str, base_url: str, **options: object) -> Iterator[tuple[str, ChatProxy]]:
    """ChatProxy under uvicorn; yields the chat URL (its models list is URL + "/models")."""
    if path == "httpx":
        options.setdefault("transport", httpx.AsyncHTTPTransport())
    options.setdefault("keepalive_interval", None)
    proxy = ChatProxy(api_key=KEY, base_url=base_url, **options)  # type: ignore[arg-type]
    with serve(_ProxyApp(proxy)) as root:
        yield f"{root}/v1/chat/completions", proxy


def assert_path(proxy: ChatProxy, path: str) -> None:
    """The request really went through the upstream client the test is named after."""
    upstream = proxy._upstreams.chosen
    if path == "native":
        assert type(upstream) is HttpEngine
    else:
        assert type(upstream) is HttpxUpstream


def error_of(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert isinstance(error, dict)
    return error


def frames(body: bytes) -> list[bytes]:
    return [part + b"\n\n" for part in body.split(b"\n\n") if part]


# --- finding 1: the response head ------------------------------------------------------------


def flood_blocks(kind: str) -> Iterator[bytes]:
    """64 KiB blocks of a head that never ends."""
    if kind == "repeated":  # one name, over and over (joined quadratically before the fix)
        block = b"x-a: b\r\n" * 8192
        while True:
            yield block
    elif kind == "distinct":  # a new name each line (kept in memory without bound)
        n = 0
        while True:
            lines = [b"x-%d: %s\r\n" % (n + i, b"v" * 40) for i in range(1200)]
            n += 1200
            yield b"".join(lines)
    else:  # "endless": one value that never ends (httptools grows it by concatenation)
        yield b"x-a: "
        block = b"a" * 65536
        while True:
            yield block


FLOOD_CAP = 16 * 1024 * 1024


def flood(kind: str) -> Handler:
    async def handler(conn: Conn) -> None:
        await conn.request()
        conn.begin()
        if not await conn.send(SSE_HEAD):
            return
        for block in flood_blocks(kind):
            if conn.hostile.sent >= FLOOD_CAP:
                break
            if not await conn.send(block):
                return
        # Never refused: end the head and answer, which a lenient proxy relays.
        await conn.send(b"\r\ncontent-length: 0\r\n\r\n")
        await conn.until_closed()

    return handler


async def probe_until(
    browser: httpx.AsyncClient, url: str, done: anyio.Event, at_least: int = 5
) -> list[float]:
    """Latencies of unrelated requests to the same worker, until `done` (and `at_least`)."""
    latencies: list[float] = []
    while not done.is_set() or len(latencies) < at_least:
        started = time.perf_counter()
        response = await browser.get(url)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200
    return latencies


@pytest.mark.parametrize("kind", ["repeated", "distinct", "endless"])
async def test_issue_14_header_flood_is_refused_at_once(
    path: str, kind: str, leaks: LeakScanner
) -> None:
    with Hostile(flood(kind)) as upstream, proxied(path, upstream.base_url) as (url, proxy):
        async with http_client(leaks) as browser, http_client(leaks) as prober:
            done = anyio.Event()
            got: list[httpx.Response] = []
            latencies: list[float] = []

            async def chat() -> None:
                try:
                    got.append(await browser.post(url, content=body_of()))
                finally:
                    done.set()

            async def probe() -> None:
                assert await anyio.to_thread.run_sync(upstream.began.wait, 5)
                latencies.extend(await probe_until(prober, f"{url}/models", done))

            with anyio.fail_after(20):
                started = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(chat)
                    tg.start_soon(probe)
                answered = time.perf_counter() - started
                closed_after = await upstream.wait_closed(5)
        assert_path(proxy, path)
    (response,) = got
    assert response.status_code == 502, response.content[:200]
    error = error_of(response)
    assert error["code"] == "upstream_protocol_error"
    assert error["message"] == "The upstream's response head is larger than 16384 bytes."
    assert response.headers["x-content-type-options"] == "nosniff"
    # Refused as the bytes arrived: the upstream was cut off long before its flood ended.
    assert answered < 3.0, answered
    assert closed_after < 2.0, closed_after
    assert upstream.sent < FLOOD_CAP
    # Other requests on the same worker stayed fast (about 1 ms unloaded).
    assert max(latencies) < 0.5, latencies


def head_of(size: int, *, status: bytes = b"200 OK", ctype: bytes = b"text/event-stream") -> bytes:
    """A plausible head of about `size` bytes (status line to blank line), of 100-byte lines."""
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype + b"\r\n"
    n = 0
    while len(head) + 100 + 2 <= size:
        head += b"x-h%04d: %s\r\n" % (n, b"v" * 90)
        n += 1
    return head


def answer(raw: bytes, *, close: bool = False) -> Handler:
    """Send `raw` after the request, then close (`close`) or wait for the proxy to."""

    async def handler(conn: Conn) -> None:
        await conn.request()
        conn.begin()
        if await conn.send(raw) and not close:
            await conn.until_closed()

    return handler


@pytest.mark.parametrize(("size", "refused"), [(1500, False), (3000, True)])
async def test_issue_14_max_response_head_bytes_holds_on_every_path(
    path: str, size: int, refused: bool, leaks: LeakScanner
) -> None:
    # A stream that has begun and goes on: refusing it must close its connection.
    body = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
    if not refused:
        body += b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE)
    raw = head_of(size) + b"transfer-encoding: chunked\r\n\r\n" + body
    with (
        Hostile(answer(raw)) as upstream,
        proxied(path, upstream.base_url, max_response_head_bytes=2048) as (url, proxy),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of())
                if refused:
                    assert await upstream.wait_closed(5) < 2.0
        assert_path(proxy, path)
    if refused:
        assert response.status_code == 502
        error = error_of(response)
        assert error["message"] == "The upstream's response head is larger than 2048 bytes."
    else:
        assert response.status_code == 200
        assert response.content == EVENT + DONE


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_issue_14_head_limit_is_exact_at_every_split() -> None:
    # Our httptools client, fed the response in two reads split at every offset: a head of
    # exactly the limit passes (repeated names joined), one byte less of limit refuses it
    # and closes the socket, however the head and the body share the reads.
    head = SSE_HEAD + b"x-a: 1\r\nx-a: 2\r\nx-a: 3\r\ncontent-length: %d\r\n\r\n" % len(EVENT)
    raw = head + EVENT
    pool = _proxy_http._Pool(("http", "x", 80), 1, httpx.Timeout(5.0), None)
    with anyio.fail_after(10):
        for limit in (len(head), len(head) - 1):
            for offset in range(1, len(raw)):
                transport = _Transport()
                connection = _proxy_http._Connection(pool)
                connection.connection_made(transport)
                response = HttpResponse(connection, None, limit)
                started = asyncio.ensure_future(response.start(b"", b""))
                await asyncio.sleep(0)
                connection.data_received(raw[:offset])
                connection.data_received(raw[offset:])
                if limit < len(head):
                    with pytest.raises(ResponseHeadTooLarge):
                        await started
                    assert transport.closed, offset
                    continue
                await started
                assert response.headers["x-a"] == "1, 2, 3"
                assert await response.aread() == EVENT, offset
                assert not transport.closed
                pool._idle.clear()


async def test_issue_14_tool_loop_holds_max_response_head_bytes(leaks: LeakScanner) -> None:
    raw = head_of(3000) + b"transfer-encoding: chunked\r\n\r\n"
    with (
        Hostile(answer(raw)) as upstream,
        proxied("native", upstream.base_url, max_response_head_bytes=2048, tools=[get_time]) as (
            url,
            _,
        ),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of())
                assert await upstream.wait_closed(5) < 2.0
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "upstream_protocol_error"
    assert error["message"] == "The upstream's response head is larger than 2048 bytes."


async def test_issue_14_interim_heads_count_toward_the_head_limit(leaks: LeakScanner) -> None:
    # A 103 and a 200 head, each under the limit, together over it (our httptools client;
    # httpx keeps interim heads out of its own limits).
    early = head_of(1200, status=b"103 Early Hints", ctype=b"text/plain") + b"\r\n"
    final = head_of(1200) + b"content-length: %d\r\n\r\n" % len(DONE) + DONE
    assert len(early) < 2048 and len(final) < 2048 < len(early + final)
    with (
        Hostile(answer(early + final)) as upstream,
        proxied("native", upstream.base_url, max_response_head_bytes=2048) as (url, proxy),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of())
        assert_path(proxy, "native")
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_protocol_error"


# --- finding 2: non-streaming answers --------------------------------------------------------

BIG = 64 * 1024 * 1024


def json_flood(framing: str) -> Handler:
    """A JSON answer of 64 MiB, in 64 KiB writes, framed as asked."""

    async def handler(conn: Conn) -> None:
        await conn.request()
        conn.begin()
        framed = {
            "content-length": b"content-length: %d\r\n\r\n" % BIG,
            "chunked": b"transfer-encoding: chunked\r\n\r\n",
            "close": b"connection: close\r\n\r\n",
        }[framing]
        if not await conn.send(JSON_HEAD + framed):
            return
        block = b"a" * 65536
        for _ in range(BIG // len(block)):
            data = b"%x\r\n%s\r\n" % (len(block), block) if framing == "chunked" else block
            if not await conn.send(data):
                return
        await conn.send(b"0\r\n\r\n" if framing == "chunked" else b"")

    return handler


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close"])
async def test_issue_14_json_answer_over_max_response_bytes_is_502(
    path: str, framing: str, leaks: LeakScanner
) -> None:
    limit = 256 * 1024
    with (
        Hostile(json_flood(framing)) as upstream,
        proxied(path, upstream.base_url, max_response_bytes=limit) as (url, proxy),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(20):
                response = await browser.post(url, content=body_of(stream=False))
                closed_after = await upstream.wait_closed(5)
        assert_path(proxy, path)
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "upstream_response_too_large"
    assert error["message"] == f"The upstream's answer is larger than {limit} bytes."
    assert closed_after < 2.0, closed_after
    assert upstream.sent < BIG


async def test_issue_14_json_answer_is_read_no_further_than_one_chunk_past_the_limit() -> None:
    pulled = 0

    class Endless(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            nonlocal pulled
            while True:
                pulled += 1
                yield b"a" * 1024

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=Endless())

    proxy = ChatProxy(
        api_key=KEY,
        base_url="https://upstream.test/v1",
        transport=httpx.MockTransport(handler),
        max_response_bytes=64 * 1024,
    )
    status, headers, body = await call(proxy, body_of(stream=False))
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_response_too_large"
    assert pulled == 64 + 1


@pytest.mark.parametrize("size", [1000, 256 * 1024])
async def test_json_answer_within_max_response_bytes_is_relayed(
    path: str, size: int, leaks: LeakScanner
) -> None:
    body = ANSWER[:-1] + b',"pad":"' + b"p" * (size - len(ANSWER) - 10) + b'"}'
    assert len(body) == size - 1
    raw = JSON_HEAD + b"content-length: %d\r\n\r\n" % len(body) + body
    with (
        Hostile(answer(raw)) as upstream,
        proxied(path, upstream.base_url, max_response_bytes=256 * 1024) as (url, proxy),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of(stream=False))
        assert_path(proxy, path)
    assert response.status_code == 200
    assert response.content == body


# --- finding 7: silent truncation ------------------------------------------------------------


async def test_issue_14_close_delimited_half_event_is_an_error_frame(
    path: str, leaks: LeakScanner
) -> None:
    half = b'data: {"choices":[{"index":0,"delta":{"content":"hal'
    raw = SSE_HEAD + b"connection: close\r\n\r\n" + EVENT + half
    records: list[object] = []
    with (
        Hostile(answer(raw, close=True)) as upstream,
        proxied(path, upstream.base_url, on_complete=records.append) as (url, proxy),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of())
        assert_path(proxy, path)
    assert response.status_code == 200
    first, last = frames(response.content)
    assert first == EVENT
    error = json.loads(last.removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_error"
    assert b"hal" not in response.content and b"[DONE]" not in response.content


@pytest.mark.parametrize("ending", [DONE, b"", b"\n"], ids=["done", "boundary", "blank-line"])
async def test_close_delimited_stream_ending_at_an_event_boundary_is_byte_exact(
    path: str, ending: bytes, leaks: LeakScanner
) -> None:
    # The proxy never invents an ending: without [DONE] the browser's client judges it.
    raw = SSE_HEAD + b"connection: close\r\n\r\n" + EVENT + ending
    with (
        Hostile(answer(raw, close=True)) as upstream,
        proxied(path, upstream.base_url) as (url, proxy),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of())
        assert_path(proxy, path)
    assert response.status_code == 200
    assert response.content == EVENT + ending


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_issue_14_compressed_answer_is_502(
    path: str, stream: bool, leaks: LeakScanner
) -> None:
    payload = gzip.compress(EVENT + DONE if stream else ANSWER)
    head = SSE_HEAD if stream else JSON_HEAD
    raw = head + b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload
    with Hostile(answer(raw)) as upstream, proxied(path, upstream.base_url) as (url, proxy):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of(stream=stream))
        assert_path(proxy, path)
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "upstream_protocol_error"
    assert error["message"] == "The upstream sent a compressed answer."
    assert b"\x1f\x8b" not in response.content


# --- finding 8: content types and nosniff ----------------------------------------------------

NOT_JSON = [
    b"text/html",
    b"text/html; charset=utf-8",
    b"text/plain",
    b"application/javascript",
    b"application/json; charset=utf-7",
    b"image/svg+xml",
]


@pytest.mark.parametrize("ctype", NOT_JSON, ids=[c.decode() for c in NOT_JSON])
async def test_issue_14_non_json_answer_is_502(path: str, ctype: bytes, leaks: LeakScanner) -> None:
    page = b"<html><script>alert(document.cookie)</script></html>"
    head = b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\n"
    raw = head + b"content-length: %d\r\n\r\n" % len(page) + page
    with Hostile(answer(raw)) as upstream, proxied(path, upstream.base_url) as (url, proxy):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of(stream=False))
        assert_path(proxy, path)
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_protocol_error"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert b"<script>" not in response.content


async def test_issue_14_answer_without_content_type_is_502(leaks: LeakScanner) -> None:
    raw = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(ANSWER) + ANSWER
    with Hostile(answer(raw)) as upstream, proxied("native", upstream.base_url) as (url, _):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of(stream=False))
    assert response.status_code == 502


@pytest.mark.parametrize(
    "ctype",
    [b"application/json", b"Application/JSON; charset=UTF-8", b'application/json;charset="utf-8"'],
)
async def test_issue_14_json_answer_is_served_as_application_json(
    path: str, ctype: bytes, leaks: LeakScanner
) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\n"
    raw = head + b"content-length: %d\r\n\r\n" % len(ANSWER) + ANSWER
    with Hostile(answer(raw)) as upstream, proxied(path, upstream.base_url) as (url, proxy):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of(stream=False))
        assert_path(proxy, path)
    assert response.status_code == 200
    assert response.content == ANSWER
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-content-type-options"] == "nosniff"


def get_time(city: str) -> str:
    """The local time in a city."""
    return f"noon in {city}"


async def test_issue_14_nosniff_on_every_response(leaks: LeakScanner) -> None:
    # Every kind of response the proxy writes, one request each: streams, JSON answers,
    # the models list, its own refusals, upstream errors, resumes, the tool loop.
    app = FakeChatUpstream(api_key=KEY, delay=0)

    def authorize(request: object) -> str | None:
        headers = getattr(request, "headers", {})
        return None if "x-deny" in headers else headers.get("x-user", "someone")

    class Limiter:
        async def acquire(self, key: str) -> float | None:
            return 5.0 if key == "principal:limited" else None

    def failing(request: object, body: dict[str, object]) -> dict[str, object]:
        if body.get("user") == "boom":
            raise RuntimeError("hook failed")
        return body

    seen: list[tuple[str, httpx.Response]] = []
    with run_upstream(app) as running:
        plain = ChatProxy(
            api_key=KEY,
            base_url=running.base_url,
            resumable=True,
            authorize=authorize,
            rate_limiter=Limiter(),
            on_request=failing,
            max_body_bytes=4096,
            keepalive_interval=None,
        )
        tools = ChatProxy(
            api_key=KEY, base_url=running.base_url, tools=[get_time], keepalive_interval=None
        )
        gone = ChatProxy(api_key=KEY, base_url="http://127.0.0.1:9/v1", keepalive_interval=None)
        with (
            serve(_ProxyApp(plain)) as root,
            serve(_ProxyApp(tools)) as tools_root,
            serve(_ProxyApp(gone)) as gone_root,
        ):
            url = f"{root}/v1/chat/completions"
            async with http_client(leaks, timeout=10) as browser:

                async def post(
                    label: str,
                    body: bytes = b"",
                    headers: dict[str, str] | None = None,
                    target: str = url,
                ) -> httpx.Response:
                    response = await browser.post(
                        target, content=body or body_of(), headers=headers
                    )
                    seen.append((label, response))
                    return response

                async def get(label: str, target: str, method: str = "GET") -> None:
                    seen.append((label, await browser.request(method, target)))

                with anyio.fail_after(30):
                    app.enqueue(Script(text="hi"))
                    streamed = await post("stream", headers={"x-resumable": "1"})
                    stream_id = streamed.headers["x-stream-id"]
                    app.enqueue(Script(text="hi"))
                    await post("json", body_of(stream=False))
                    app.enqueue(Script(status=400))
                    await post("upstream 400")
                    app.enqueue(Script(status=500))
                    await post("upstream 500")
                    await post("unreachable", target=f"{gone_root}/v1/chat/completions")
                    await post("bad json", b"{")
                    await post("401", headers={"x-deny": "1"})
                    await post("403", headers={"origin": "https://evil.example"})
                    await post("413", b"x" * 5000)
                    await post("415", headers={"content-type": "text/html"})
                    await post("429", headers={"x-user": "limited"})
                    await post("500 hook", body_of(user="boom"))
                    await get("models", f"{url}/models")
                    await get("models HEAD", f"{url}/models", "HEAD")
                    await get("405", f"{url}/models", "DELETE")
                    await get("404", f"{url}/nothing")
                    await get("resume", f"{url}/streams/{stream_id}")
                    await get("resume 404", f"{url}/streams/{'x' * 24}")
                    await get("resume DELETE", f"{url}/streams/{stream_id}", "DELETE")
                    app.enqueue(Script(text="hi"))
                    tools_url = f"{tools_root}/v1/chat/completions"
                    await post("tools stream", target=tools_url)
                    app.enqueue(Script(text="hi"))
                    await post("tools json", body_of(stream=False), target=tools_url)
    statuses = {label: response.status_code for label, response in seen}
    assert statuses == {
        "stream": 200,
        "json": 200,
        "upstream 400": 400,
        "upstream 500": 502,
        "unreachable": 502,
        "bad json": 400,
        "401": 401,
        "403": 403,
        "413": 413,
        "415": 415,
        "429": 429,
        "500 hook": 500,
        "models": 200,
        "models HEAD": 200,
        "405": 405,
        "404": 404,
        "resume": 200,
        "resume 404": 404,
        "resume DELETE": 204,
        "tools stream": 200,
        "tools json": 200,
    }
    missing = [label for label, r in seen if r.headers.get("x-content-type-options") != "nosniff"]
    assert missing == []


# --- finding 10: a total deadline per turn ---------------------------------------------------

TOTAL = 1.0


def trickle(framing: bytes) -> Handler:
    """One event, then the next one a byte at a time, every 50 ms, for ever."""

    async def handler(conn: Conn) -> None:
        await conn.request()
        conn.begin()
        if not await conn.send(SSE_HEAD + framing + EVENT):
            return
        while True:
            for i in range(len(EVENT)):
                await asyncio.sleep(0.05)
                if not await conn.send(EVENT[i : i + 1]):
                    return

    return handler


@pytest.mark.parametrize(
    "framing",
    [b"connection: close\r\n\r\n", b"transfer-encoding: chunked\r\n\r\n"],
    ids=["close", "chunked"],
)
async def test_issue_14_trickling_stream_ends_at_total_timeout(
    path: str, framing: bytes, leaks: LeakScanner
) -> None:
    chunked = b"chunked" in framing

    async def chunk_handler(conn: Conn) -> None:
        await conn.request()
        conn.begin()
        head = SSE_HEAD + framing + b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
        if not await conn.send(head):
            return
        while True:
            for i in range(len(EVENT)):
                await asyncio.sleep(0.05)
                if not await conn.send(b"1\r\n" + EVENT[i : i + 1] + b"\r\n"):
                    return

    handler = chunk_handler if chunked else trickle(framing)
    records: list[object] = []
    with (
        Hostile(handler) as upstream,
        proxied(path, upstream.base_url, total_timeout=TOTAL, on_complete=records.append) as (
            url,
            proxy,
        ),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                started = time.perf_counter()
                response = await browser.post(url, content=body_of())
                elapsed = time.perf_counter() - started
                closed_after = await upstream.wait_closed(5)
        assert_path(proxy, path)
    assert response.status_code == 200
    first, *_, last = frames(response.content)
    assert first == EVENT
    error = json.loads(last.removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_timeout"
    assert error["message"] == "The answer took longer than the proxy allows."
    assert b"[DONE]" not in response.content
    assert TOTAL - 0.05 <= elapsed < TOTAL + 1.5, elapsed
    assert closed_after < TOTAL + 1.5, closed_after


async def test_issue_14_silent_upstream_is_504_at_total_timeout(
    path: str, leaks: LeakScanner
) -> None:
    async def silent(conn: Conn) -> None:
        await conn.request()
        conn.begin()
        await conn.until_closed()

    with (
        Hostile(silent) as upstream,
        proxied(path, upstream.base_url, total_timeout=TOTAL) as (url, proxy),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                started = time.perf_counter()
                response = await browser.post(url, content=body_of())
                elapsed = time.perf_counter() - started
                closed_after = await upstream.wait_closed(5)
        assert_path(proxy, path)
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "upstream_timeout"
    assert TOTAL - 0.05 <= elapsed < TOTAL + 1.5, elapsed
    assert closed_after < TOTAL + 1.5, closed_after


async def test_issue_14_tool_loop_ends_at_total_timeout(leaks: LeakScanner) -> None:
    with (
        Hostile(trickle(b"connection: close\r\n\r\n")) as upstream,
        proxied("native", upstream.base_url, total_timeout=TOTAL, tools=[get_time]) as (url, _),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                started = time.perf_counter()
                response = await browser.post(url, content=body_of())
                elapsed = time.perf_counter() - started
                await upstream.wait_closed(5)
    assert response.status_code == 200
    last = frames(response.content)[-1]
    assert json.loads(last.removeprefix(b"data: "))["error"]["code"] == "upstream_timeout"
    assert b"[DONE]" not in response.content
    assert TOTAL - 0.05 <= elapsed < TOTAL + 1.5, elapsed


async def test_issue_14_total_timeout_is_cut_from_a_resumable_stream(leaks: LeakScanner) -> None:
    # Resumable streams take the anyio relay on every path.
    with (
        Hostile(trickle(b"connection: close\r\n\r\n")) as upstream,
        proxied("native", upstream.base_url, total_timeout=TOTAL, resumable=True) as (url, _),
    ):
        async with http_client(leaks) as browser:
            with anyio.fail_after(10):
                response = await browser.post(url, content=body_of(), headers={"x-resumable": "1"})
    assert response.status_code == 200 and "x-stream-id" in response.headers
    last = frames(response.content)[-1]
    assert b'"code":"upstream_timeout"' in last
    assert b"[DONE]" not in response.content


def test_issue_14_upstream_limits_have_documented_defaults() -> None:
    proxy = ChatProxy(api_key=KEY)
    assert proxy.total_timeout == 600.0
    assert proxy.max_response_head_bytes == 16 * 1024
    assert proxy.max_response_bytes == 4 * 1024 * 1024
    assert ChatProxy(api_key=KEY, total_timeout=None).total_timeout is None
    for bad in (
        {"total_timeout": 0},
        {"total_timeout": -1.0},
        {"max_response_head_bytes": 0},
        {"max_response_bytes": 0},
    ):
        with pytest.raises(ValueError):
            ChatProxy(api_key=KEY, **bad)
