"""Issue #17: the clients send over our engine (`_engine/`), and httpx stays the path for
what the engine does not do.

The respx tests of `test_client.py` mock httpx, so they pin the httpx path; these are
their twins over the engine, on real loopback sockets: the same request as httpx sends,
statuses, retries and `Retry-After`, compressed answers, the response head's wait, the
pool (a stale keep-alive connection, a new event loop), `stream.response`. The rest of
the client's behaviour over the engine is the whole client suite, which runs on the
engine by default (and once more on httpx in CI: `.ci/run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import json
import pathlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

import tokenhub_stream as ts
from tokenhub_stream._engine._h1 import ResponseParser
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

MESSAGES = [{"role": "user", "content": "hello"}]
KEY = "sk-th_canary_issue17_0123456789"
SLACK = 0.25
both = pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        yield running


@pytest.fixture(autouse=True)
def _engine_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # CI runs the client suite a second time with TOKENHUB_STREAM_ENGINE=httpx; these
    # tests are about the engine itself, and set the switch where they test it.
    monkeypatch.delenv("TOKENHUB_STREAM_ENGINE", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def engine_sends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs the engines (asyncio and blocking) were asked to POST to, in order."""
    from tokenhub_stream._engine._http import HttpEngine, HttpResponse
    from tokenhub_stream._engine._sync import SyncEngine, SyncResponse

    sent: list[str] = []
    send_async, send_sync = HttpEngine.send, SyncEngine.send

    async def counted_async(self: HttpEngine, url: str, *args: Any, **kw: Any) -> HttpResponse:
        sent.append(url)
        return await send_async(self, url, *args, **kw)

    def counted_sync(self: SyncEngine, url: str, *args: Any, **kw: Any) -> SyncResponse:
        sent.append(url)
        return send_sync(self, url, *args, **kw)

    monkeypatch.setattr(HttpEngine, "send", counted_async)
    monkeypatch.setattr(SyncEngine, "send", counted_sync)
    return sent


def sse(*texts: str) -> bytes:
    frames = [
        b"data: "
        + json.dumps(
            {"choices": [{"index": 0, "delta": {"content": t}}]}, ensure_ascii=False
        ).encode()
        for t in texts
    ]
    finish = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    frames.append(b"data: " + json.dumps(finish).encode())
    return b"".join(f + b"\n\n" for f in frames) + b"data: [DONE]\n\n"


def stream_once(
    sync: bool, base_url: str, **kw: object
) -> tuple[list[str], ts.ChatStream | ts.AsyncChatStream, ts.Client | ts.AsyncClient]:
    """One stream with a fresh Client or AsyncClient (asyncio); texts, stream, client."""
    options: dict[str, object] = {"base_url": base_url, "api_key": KEY, "max_retries": 0}
    options.update(kw)
    if sync:
        with ts.Client(**options) as client:  # type: ignore[arg-type]
            with client.stream_chat(MESSAGES) as stream:
                return list(stream), stream, client

    async def main() -> tuple[list[str], ts.AsyncChatStream, ts.AsyncClient]:
        async with ts.AsyncClient(**options) as client:  # type: ignore[arg-type]
            async with client.stream_chat(MESSAGES) as stream:
                return [t async for t in stream], stream, client

    return anyio.run(main)


def chat_once(sync: bool, base_url: str, **kw: object) -> ts.ChatResult:
    options: dict[str, object] = {"base_url": base_url, "api_key": KEY, "max_retries": 0}
    options.update(kw)
    if sync:
        with ts.Client(**options) as client:  # type: ignore[arg-type]
            return client.chat(MESSAGES)

    async def main() -> ts.ChatResult:
        async with ts.AsyncClient(**options) as client:  # type: ignore[arg-type]
            return await client.chat(MESSAGES)

    return anyio.run(main)


# --- a loopback server that answers with exactly the bytes a test gives ------------------

Answer = Callable[[bytes, bytes], bytes | None]


class RawServer:
    """HTTP/1.1 on 127.0.0.1: each request (head, body) is answered with `answer(head,
    body)`'s bytes (None: nothing, the connection stays open until the client leaves).
    Records the requests and counts the connections."""

    def __init__(
        self, answer: Answer, *, close_after: bool = False, tls: ssl.SSLContext | None = None
    ) -> None:
        self.answer = answer
        self.close_after = close_after  # close each connection after its answer
        self._tls = tls
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        if self._tls is not None:
            try:
                conn = self._tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
        buf = b""
        with conn:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(rest) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    rest += data
                body, buf = rest[:length], rest[length:]
                self.requests.append((head, body))
                answer = self.answer(head, body)
                if answer is None:
                    with contextlib.suppress(OSError):
                        while conn.recv(65536):
                            pass
                    return
                conn.sendall(answer)
                if self.close_after:
                    return


@contextlib.contextmanager
def raw_server(answer: Answer, **kw: Any) -> Iterator[RawServer]:
    server = RawServer(answer, **kw)
    try:
        yield server
    finally:
        server.close()


def chunked(status: bytes, headers: dict[str, str], parts: list[bytes]) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ntransfer-encoding: chunked\r\n"
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"
    return head + b"\r\n" + body


def sized(status: bytes, headers: dict[str, str], body: bytes) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body)
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    return head + b"\r\n" + body


SSE_HEADERS = {"content-type": "text/event-stream"}


# --- which way a request goes ------------------------------------------------------------


@both
def test_issue_17_clients_send_over_the_engine_by_default(
    upstream: RunningUpstream, sync: bool
) -> None:
    upstream.app.enqueue(Script(deltas=["a", "b"]))
    texts, stream, client = stream_once(sync, upstream.base_url)
    assert texts == ["a", "b"] and stream.outcome == ts.Outcome("completed", "done")
    assert client._engine is None  # closed with the client...
    assert client._http is None  # ...and no httpx client was ever made
    assert type(stream._state._answer).__name__ == ("SyncResponse" if sync else "HttpResponse")


@both
@pytest.mark.parametrize("why", ["switch", "http_client", "proxy", "credentials"])
def test_issue_17_httpx_where_the_engine_does_not_go(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch, sync: bool, why: str
) -> None:
    upstream.app.enqueue(Script(deltas=["a"]))
    base_url = upstream.base_url
    if why == "switch":
        monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", "httpx")
    elif why == "proxy":
        # a proxy from the environment (that does not apply to this host): httpx reads it
        monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    elif why == "credentials":
        base_url = base_url.replace("http://", "http://user:pw@")
    if why != "http_client":
        texts, stream, client = stream_once(sync, base_url)
    elif sync:
        with httpx.Client() as http:
            texts, stream, client = stream_once(sync, base_url, http_client=http)
    else:

        async def main() -> tuple[list[str], ts.AsyncChatStream, ts.AsyncClient]:
            async with (
                httpx.AsyncClient() as http,
                ts.AsyncClient(base_url=base_url, http_client=http) as client,
                client.stream_chat(MESSAGES) as stream,
            ):
                return [t async for t in stream], stream, client

        texts, stream, client = anyio.run(main)
    assert texts == ["a"]
    assert isinstance(stream._state._answer, httpx.Response)
    assert client._engine is None
    if why == "credentials":
        assert upstream.app.requests[-1].headers["authorization"].startswith("Basic ")


def test_issue_17_async_client_under_trio_uses_httpx(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=["a"]))

    async def main() -> None:
        async with ts.AsyncClient(base_url=upstream.base_url) as client:
            async with client.stream_chat(MESSAGES) as stream:
                assert [t async for t in stream] == ["a"]
            assert isinstance(stream._state._answer, httpx.Response)
            assert client._engine is None and client._http is not None

    anyio.run(main, backend="trio")


def test_issue_17_engine_switch_refuses_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", "h2")
    with pytest.raises(ValueError, match="TOKENHUB_STREAM_ENGINE"):
        ts.Client(base_url="http://127.0.0.1:9/v1")
    monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", "HTTPX")
    assert ts.AsyncClient(base_url="http://127.0.0.1:9/v1")._use_engine is False


# --- the request ---------------------------------------------------------------------------


@both
def test_issue_17_engine_sends_the_request_httpx_sends(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    seen = []
    for engine in ("auto", "httpx"):
        monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", engine)
        for kind in ("stream", "chat"):
            upstream.app.enqueue(Script(deltas=["a"]))
            options = {"headers": {"X-Trace": "1"}, "timeout": 5.0}
            if kind == "stream":
                _, stream, _ = stream_once(sync, upstream.base_url, **options)
                assert isinstance(stream._state._answer, httpx.Response) == (engine == "httpx")
            else:
                assert chat_once(sync, upstream.base_url, **options).message.content == "a"
            request = upstream.app.requests[-1]
            seen.append((kind, request.headers, request.body))
    engine_requests, httpx_requests = seen[:2], seen[2:]
    assert engine_requests == httpx_requests
    headers = engine_requests[0][1]
    assert headers["authorization"] == f"Bearer {KEY}" and headers["x-trace"] == "1"
    assert headers["accept-encoding"] == "identity"  # streams ask for no compression
    assert headers["user-agent"].startswith("python-httpx/")


# --- answers -------------------------------------------------------------------------------


@both
def test_issue_17_engine_statuses_retries_and_retry_after(
    upstream: RunningUpstream, engine_sends: list[str], sync: bool
) -> None:
    upstream.app.enqueue(Script(status=429, headers={"Retry-After": "0.1"}))
    upstream.app.enqueue(Script(status=503))
    upstream.app.enqueue(Script(deltas=["ok"]))
    start = time.monotonic()
    texts, stream, _ = stream_once(sync, upstream.base_url, max_retries=2)
    assert texts == ["ok"] and len(upstream.app.requests) == 3
    assert time.monotonic() - start >= 0.1  # Retry-After waited out
    upstream.app.enqueue(Script(status=401, error={"error": {"message": f"bad key {KEY}"}}))
    with pytest.raises(ts.AuthenticationError) as info:
        stream_once(sync, upstream.base_url, max_retries=3)
    assert len(upstream.app.requests) == 4  # not retried
    assert KEY not in str(info.value) and info.value.status_code == 401
    upstream.app.enqueue(Script(status=429, headers={"Retry-After": "120"}))
    with pytest.raises(ts.RateLimitError) as limited:
        stream_once(sync, upstream.base_url, max_retries=3)
    assert limited.value.retry_after == 120 and len(upstream.app.requests) == 5
    assert len(engine_sends) == 5


@both
def test_issue_17_engine_refusals_before_streaming(engine_sends: list[str], sync: bool) -> None:
    answers = iter(
        [
            sized(b"200 OK", {"content-type": "text/html"}, b"<html>hi</html>"),
            sized(b"200 OK", {"content-type": "application/json"}, b'{"error": {"message": "x"}}'),
            sized(b"418 I'm a teapot", {}, b""),
        ]
    )
    with raw_server(lambda head, body: next(answers)) as server:
        with pytest.raises(ts.ProtocolError, match="text/event-stream"):
            stream_once(sync, server.url)
        with pytest.raises(ts.APIError, match="x"):
            stream_once(sync, server.url)
        with pytest.raises(ts.APIError, match="teapot") as info:
            stream_once(sync, server.url)
        assert info.value.status_code == 418  # the reason phrase from the status line
    assert len(engine_sends) == 3


@both
def test_issue_17_engine_decodes_a_compressed_answer_as_httpx(
    engine_sends: list[str], sync: bool
) -> None:
    # Streams ask for identity; an upstream that compresses anyway is decoded (by httpx's
    # own decoders, reading the engine's body), as on the httpx path. So is chat().
    stream_body = gzip.compress(sse("hé", "llo"))
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "zipped"}}],
    }
    answers = iter(
        [
            chunked(b"200 OK", {**SSE_HEADERS, "content-encoding": "gzip"}, [stream_body]),
            sized(
                b"200 OK",
                {"content-type": "application/json", "content-encoding": "gzip"},
                gzip.compress(json.dumps(completion).encode()),
            ),
        ]
    )
    with raw_server(lambda head, body: next(answers)) as server:
        texts, stream, _ = stream_once(sync, server.url)
        assert "".join(texts) == "héllo" and stream.outcome == ts.Outcome("completed", "done")
        assert chat_once(sync, server.url).message.content == "zipped"
        chat_head = server.requests[1][0].lower()
        assert b"accept-encoding: gzip, deflate" in chat_head  # httpx's default, as before
    assert len(engine_sends) == 2


@pytest.mark.timing
@both
def test_issue_17_engine_head_wait_is_the_first_token_deadline(
    engine_sends: list[str], sync: bool
) -> None:
    with raw_server(lambda head, body: None) as server:  # never answers
        start = time.monotonic()
        with pytest.raises(ts.StreamTimeout) as info:
            stream_once(sync, server.url, timeout=ts.Timeout(first_token=0.3))
        elapsed = time.monotonic() - start
        assert info.value.kind == "first_token" and 0.3 <= elapsed < 0.3 + SLACK
        with pytest.raises(ts.StreamTimeout) as total:
            stream_once(sync, server.url, timeout=ts.Timeout(first_token=5, total=0.3))
        assert total.value.kind == "total"
    assert len(engine_sends) == 2


@both
def test_issue_17_engine_connect_errors(engine_sends: list[str], sync: bool) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ts.TransportError) as info:
        stream_once(sync, f"http://127.0.0.1:{port}/v1")
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert info.value.retryable and len(engine_sends) == 1


@both
def test_issue_17_stream_response_is_an_httpx_response(
    upstream: RunningUpstream, sync: bool
) -> None:
    upstream.app.enqueue(Script(deltas=["a"], headers={"x-ratelimit-remaining": "7"}))
    _, stream, _ = stream_once(sync, upstream.base_url)
    response = stream.response
    assert isinstance(response, httpx.Response) and response is stream.response
    assert response.status_code == 200 and response.reason_phrase == "OK"
    assert response.headers["x-ratelimit-remaining"] == "7"
    assert response.headers["x-request-id"] == stream.request_id
    assert response.is_closed  # the stream ended
    assert response.request.url == upstream.base_url + "/chat/completions"
    host, port = response.extensions["network_stream"].get_extra_info("server_addr")[:2]
    assert (host, port) == ("127.0.0.1", upstream.port)


# --- the pool ------------------------------------------------------------------------------


@both
def test_issue_17_engine_does_not_reuse_a_connection_the_server_closed(
    engine_sends: list[str], sync: bool
) -> None:
    # Keep-alive as far as the headers go, but the server closes each connection once it
    # has answered: the next request must not be sent on the dead one (it would fail).
    answer = chunked(b"200 OK", SSE_HEADERS, [sse("a")])
    with raw_server(lambda head, body: answer, close_after=True) as server:
        if sync:
            with ts.Client(base_url=server.url, max_retries=0) as client:
                for _ in range(3):
                    with client.stream_chat(MESSAGES) as stream:
                        assert list(stream) == ["a"]
                    time.sleep(0.05)  # the server's close reaches us
        else:

            async def main() -> None:
                async with ts.AsyncClient(base_url=server.url, max_retries=0) as client:
                    for _ in range(3):
                        async with client.stream_chat(MESSAGES) as stream:
                            assert [t async for t in stream] == ["a"]
                        await anyio.sleep(0.05)

            anyio.run(main)
        assert server.connections == 3 and len(engine_sends) == 3


def test_issue_17_sync_engine_shared_by_threads(
    upstream: RunningUpstream, engine_sends: list[str]
) -> None:
    # httpx's Client may be shared by threads; so may ours: each stream on a connection of
    # its own, the pool never handing one connection to two threads.
    for _ in range(40):
        upstream.app.enqueue(Script(deltas=["a", "b"], delay=0.001))
    errors: list[BaseException] = []
    with ts.Client(base_url=upstream.base_url, max_retries=0) as client:

        def work() -> None:
            try:
                for _ in range(5):
                    with client.stream_chat(MESSAGES) as stream:
                        assert list(stream) == ["a", "b"]
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert client._engine is not None
        pool = next(iter(client._engine._pools.values()))
        assert len(pool._idle) <= 8 and not errors, errors
    assert len(engine_sends) == 40


def test_issue_17_async_client_moves_to_a_new_event_loop(upstream: RunningUpstream) -> None:
    # Connections belong to the loop they were made on: a client used from a second
    # loop must not send on the first loop's sockets (that loop would never read the
    # answer); the first loop's are closed (they close as that loop runs again).
    client = ts.AsyncClient(base_url=upstream.base_url)

    async def one() -> object:
        async with client.stream_chat(MESSAGES) as stream:
            assert [t async for t in stream] == ["x"]
        assert stream.response is not None
        return stream.response.extensions["network_stream"].get_extra_info("client_addr")

    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        for _ in range(2):
            upstream.app.enqueue(Script(deltas=["x"]))
        a = first.run_until_complete(asyncio.wait_for(one(), 10))
        b = second.run_until_complete(asyncio.wait_for(one(), 10))
        assert a != b  # a new connection on the new loop
        first.run_until_complete(asyncio.sleep(0))  # the first loop closes its socket
        second.run_until_complete(client.aclose())
    finally:
        first.close()
        second.close()
    gc.collect()  # nothing left unclosed (a ResourceWarning fails the test)


@pytest.mark.timing
@pytest.mark.parametrize("engine", ["auto", "httpx"])
def test_issue_17_deadlines_fire_on_uvloop(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    # uvloop's transports hand out a socket that refuses shutdown() (a TypeError, which
    # ended the watchdog's thread: deadlines then fired only at httpx's read-timeout
    # backstop): the watchdog shuts the descriptor down another way, on either path.
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", engine)
    upstream.app.enqueue(Script(deltas=["a"], end="stall", keepalive=0.05))

    async def main() -> tuple[float, BaseException | None]:
        last = time.monotonic()
        try:
            async with ts.AsyncClient(
                base_url=upstream.base_url, timeout=ts.Timeout(idle=0.4)
            ) as c:
                async with c.stream_chat(MESSAGES) as stream:
                    async for _ in stream:
                        last = time.monotonic()
        except ts.StreamTimeout as exc:
            return time.monotonic() - last, exc
        return 0.0, None

    elapsed, error = uvloop.run(asyncio.wait_for(main(), 10))
    assert isinstance(error, ts.StreamTimeout) and error.kind == "idle"
    assert 0.4 <= elapsed < 0.4 + SLACK


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture
def tls_server_context(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A self-signed certificate for 127.0.0.1, made now; the clients trust it through
    SSL_CERT_FILE, which they read as httpx does."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(key)]
        + ["-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.timing
@both
def test_issue_17_engine_over_tls(
    tls_server_context: ssl.SSLContext, engine_sends: list[str], sync: bool
) -> None:
    # The engine's TLS is httpx's default context (here trusting the test's certificate
    # as httpx would, through SSL_CERT_FILE); the watchdog's deadlines reach a TLS socket.
    whole = chunked(b"200 OK", SSE_HEADERS, [sse("sec", "ure")])
    stalled = whole[: whole.index(b"\r\n\r\n") + 4] + b"%x\r\n%s\r\n" % (
        len(sse("a")[:40]),
        sse("a")[:40],
    )
    answers = iter([whole, stalled])
    with raw_server(lambda head, body: next(answers), tls=tls_server_context) as server:
        texts, stream, _ = stream_once(sync, server.url)
        assert "".join(texts) == "secure" and stream.outcome == ts.Outcome("completed", "done")
        assert stream.response is not None
        tls = stream.response.extensions["network_stream"].get_extra_info("ssl_object")
        assert isinstance(tls, ssl.SSLObject | ssl.SSLSocket)
        start = time.monotonic()
        with pytest.raises(ts.StreamTimeout) as info:
            stream_once(sync, server.url, timeout=ts.Timeout(first_token=0.3))
        assert info.value.kind == "first_token" and time.monotonic() - start < 0.3 + SLACK
    assert len(engine_sends) == 2


# --- bytes split anywhere ------------------------------------------------------------------


class _Reader(ResponseParser):
    """The engine's response state machine with no socket: chunk bodies as they come."""

    __slots__ = ()


def test_issue_17_chunk_bodies_split_anywhere_reach_the_parser_intact() -> None:
    # CRLF line endings, HTTP chunk boundaries inside a CRLF and inside a UTF-8 sequence,
    # the whole response split in two at every byte: the parser fed one chunk body at a
    # time (its fast path where it can) delivers the same text.
    events = sse("hé", "llo", " wörld").replace(b"\n\n", b"\r\n\r\n")
    cut = events.index(b"\r\n") + 1  # a chunk ends between CR and LF
    utf8 = events.index("é".encode()) + 1  # ...and inside "é"
    parts = [events[:cut], events[cut:utf8], events[utf8:]]
    raw = chunked(b"200 OK", SSE_HEADERS, parts)
    for offset in range(1, len(raw)):
        reader = _Reader()
        parser = ts.ChunkParser()
        texts: list[str] = []
        for piece in (raw[:offset], raw[offset:]):
            reader.parse(piece)
            while reader.has_pending:
                texts.extend(parser.feed_text(reader.take_chunk()))
        assert reader.keep_alive and reader.error is None, offset
        assert "".join(texts) == "héllo wörld" and parser.done, offset


def test_issue_17_sync_engine_body_outlasts_the_head_wait() -> None:
    # The sync engine leaves the head's socket timeout on through a body with no read
    # limit (no settimeout calls per request): a body read that outlasts it reads again.
    from tokenhub_stream._engine._sync import SyncEngine

    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n']
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                answer = chunked(b"200 OK", SSE_HEADERS, events)
                cut = answer.index(events[1]) - 4  # before the second chunk's size line
                conn.sendall(answer[:cut])
                time.sleep(0.5)  # longer than the head wait below
                conn.sendall(answer[cut:])
                conn.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        engine = SyncEngine(4, httpx.Timeout(None))
        try:
            response = engine.send(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                {},
                b"{}",
                httpx.Timeout(5.0, read=0.2),
            )
            got = [chunk for batch in response.iter_batches() for chunk in batch]
            response.close()
        finally:
            engine.close()
        thread.join(5)
    assert got == events


def test_issue_17_sync_engine_sends_a_body_larger_than_the_socket_buffer() -> None:
    # The sync engine writes a request to the descriptor without polling first; what one
    # write does not take (a body over the socket's buffer, a server slow to read) goes
    # on through sendall and its timeout, every byte in order.
    from tokenhub_stream._engine._sync import SyncEngine

    body = bytes(range(256)) * (16 * 1024)  # 4 MiB
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                time.sleep(0.2)  # the client's first write fills the buffers meanwhile
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                while len(rest) < len(body):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                received.append(rest)
                conn.sendall(sized(b"200 OK", {}, b"ok"))
                conn.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        engine = SyncEngine(4, httpx.Timeout(None))
        try:
            response = engine.send(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                {},
                body,
                httpx.Timeout(5.0),
            )
            answer = response.read()
            response.close()
        finally:
            engine.close()
        thread.join(5)
    assert answer == b"ok"
    assert received == [body]


@both
def test_issue_17_a_stream_received_whole_is_not_drained_under_a_deadline(sync: bool) -> None:
    # The whole answer came with the last read: draining after [DONE] waits for nothing,
    # so no drain deadline goes to the watchdog; the connection still goes back to the pool.
    def answer(head: bytes, body: bytes) -> bytes:
        return chunked(b"200 OK", SSE_HEADERS, [sse("hi", " there")])

    with raw_server(answer) as server:
        options: dict[str, Any] = {"base_url": server.url, "api_key": KEY, "max_retries": 0}
        if sync:
            with ts.Client(**options) as client:
                streams = []
                for _ in range(2):
                    with client.stream_chat(MESSAGES) as stream:
                        assert "".join(stream) == "hi there"
                    streams.append(stream)
        else:

            async def main() -> list[ts.AsyncChatStream]:
                made = []
                async with ts.AsyncClient(**options) as client:
                    for _ in range(2):
                        async with client.stream_chat(MESSAGES) as stream:
                            assert "".join([t async for t in stream]) == "hi there"
                        made.append(stream)
                return made

            streams = anyio.run(main)  # type: ignore[arg-type]
    for stream in streams:
        assert stream.outcome is not None and stream.outcome.ok
        timer = stream._state._timer
        assert timer is not None and timer.drain_deadline is None
    assert server.connections == 1
