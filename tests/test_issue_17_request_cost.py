"""Issue #17: the fixed cost of one request over the engine, cut without changing what a
request does.

These pin the behaviour that the cheaper mechanisms must keep: the response head's wait
(one timer per pool instead of one per request) fails each request at its own deadline;
the watchdog, which now heaps a stream's timer only when its thread wakes (and not at all
when the stream ended by then), still wakes for a deadline due before that; request
headers encoded once per client and set of headers still follow every change; the body,
encoded through json's C encoder made directly, is the bytes json.dumps makes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest

import tokenhub_stream as ts
from tokenhub_stream import _base, _watchdog
from tokenhub_stream._chunks import ChunkParser
from tokenhub_stream._engine._http import HttpEngine
from tokenhub_stream._watchdog import StreamTimer, watchdog
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

pytestmark = pytest.mark.anyio

SLACK = 0.25
KEY = "sk-th_canary_issue17_request_0123456789"
MESSAGES = [{"role": "user", "content": "hello"}]
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


# --- the watchdog ----------------------------------------------------------------------------


class _HasSocket:
    """What the engine's responses give the watchdog: their socket, by name."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, name: str) -> object:
        return self._sock if name == "socket" else None


def _in_heap(timer: StreamTimer) -> bool:
    with watchdog.lock:
        return any(entry[2] is timer for entry in watchdog._heap)


def test_issue_17_a_stream_that_ended_before_its_first_check_leaves_no_timer() -> None:
    # A short stream's timer is stopped long before its first check (the idle timeout
    # later): the watchdog forgets it when it next wakes, instead of keeping it in its
    # heap until then (a minute of a busy client's streams, by default).
    left, right = socket.socketpair()
    try:
        timer = StreamTimer(ChunkParser(), first_token=60.0, idle=60.0)
        assert timer.watch(_HasSocket(left), None)
        timer.stop()
        alive = StreamTimer(ChunkParser(), first_token=60.0, idle=60.0)
        assert alive.watch(_HasSocket(left), None)
        deadline = time.monotonic() + 5
        while not _in_heap(alive):  # the thread woke and looked at both
            assert time.monotonic() < deadline, "the watchdog never looked"
            time.sleep(0.01)
        assert not _in_heap(timer)
        alive.stop()
    finally:
        left.close()
        right.close()


@pytest.mark.timing
def test_issue_17_a_deadline_before_the_watchdogs_wake_up_wakes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The thread sleeps until its next tick (made long here); a stream whose first check
    # falls before that must wake it, not wait for the tick.
    monkeypatch.setattr(_watchdog, "_TICK", 2.0)
    left, right = socket.socketpair()
    keeper = StreamTimer(ChunkParser(), first_token=60.0, idle=60.0)
    try:
        assert keeper.watch(_HasSocket(left), None)  # the thread runs, sleeping in ticks
        time.sleep(0.1)  # ...now in a tick of 2 s
        parser = ChunkParser(started_at=time.monotonic())
        timer = StreamTimer(parser, first_token=0.1, idle=60.0)
        assert timer.watch(_HasSocket(left), None)
        right.settimeout(5)
        assert right.recv(1) == b""  # shut down by the watchdog
        elapsed = time.monotonic() - parser.started_at
        assert timer.fired == "first_token" and 0.1 <= elapsed < 0.1 + SLACK
    finally:
        keeper.stop()
        left.close()
        right.close()


def exit_code(pid: int, failure: str) -> int:
    """The forked child's exit code, once it exited (killed and failed after 10 s)."""
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(failure)
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_issue_17_a_forked_child_starts_its_own_watchdog() -> None:
    # The watchdog no longer asks its thread whether it is alive on every stream: a forked
    # child, where the parent's thread does not run, is told so at the fork.
    left, right = socket.socketpair()
    keeper = StreamTimer(ChunkParser(), first_token=60.0, idle=60.0)
    try:
        assert keeper.watch(_HasSocket(left), None)  # the parent's thread runs
        with watchdog.lock:  # not held by the parent's thread as it forks
            pid = os.fork()
        if pid == 0:  # the child: a deadline must fire here too
            code = 1
            try:
                timer = StreamTimer(
                    ChunkParser(started_at=time.monotonic()), first_token=0.05, idle=None
                )
                timer.watch(_HasSocket(left), None)
                right.settimeout(5)
                code = 0 if right.recv(1) == b"" and timer.fired == "first_token" else 1
            finally:
                os._exit(code)
        assert exit_code(pid, "the child's deadline never fired") == 0
    finally:
        keeper.stop()
        left.close()
        right.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_issue_17_a_forked_child_gets_a_fresh_watchdog() -> None:
    # Forked while another thread holds the watchdog's lock (its own thread mid-check, a
    # client in `watch`), the child must not inherit the held lock (its holder does not run
    # there: the child's first stream would wait forever), nor the parent's timers, whose
    # sockets it shares (shutting one down would end the parent's stream).
    left, right = socket.socketpair()
    keeper = StreamTimer(ChunkParser(), first_token=60.0, idle=60.0)
    held, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with watchdog.lock:
            held.set()
            leave.wait(10)

    holder = threading.Thread(target=hold)
    try:
        assert keeper.watch(_HasSocket(left), None)
        holder.start()
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                if watchdog.lock.acquire(timeout=2):
                    code = 0 if not watchdog._heap and not watchdog._new else 2
                    watchdog.lock.release()
            finally:
                os._exit(code)
        leave.set()
        # 1: the child could not take the lock; 2: it kept the parent's timers
        assert exit_code(pid, "the child never finished") == 0
    finally:
        leave.set()
        if holder.is_alive():
            holder.join(5)
        keeper.stop()
        left.close()
        right.close()


# --- the request head ------------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0.0)) as running:
        yield running


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_issue_17_headers_encoded_once_follow_every_change(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    # A client encodes its request headers for the engine once per set of headers: each
    # request still sends its own (per-call headers, the client's edited between calls),
    # and a header that cannot be sent fails as it always did, before anything is sent.
    monkeypatch.delenv("TOKENHUB_STREAM_ENGINE", raising=False)
    calls: list[dict[str, str] | None] = [None, None, {"X-Trace": "a"}, None, {"X-Trace": "b"}]

    def sent() -> list[dict[str, str]]:
        return [request.headers for request in upstream.app.requests]

    bad = {"X-Bad": "a\r\nx: y"}
    if sync:
        with ts.Client(base_url=upstream.base_url, api_key=KEY, max_retries=0) as client:
            for i, extra in enumerate(calls):
                if i == 3:
                    client.headers["X-Team"] = "blue"
                upstream.app.enqueue(Script(deltas=["a"]))
                with client.stream_chat(MESSAGES, extra_headers=extra) as stream:
                    assert list(stream) == ["a"]
            with pytest.raises(ts.TransportError) as info:
                client.stream_chat(MESSAGES, extra_headers=bad).__enter__()
            assert type(client._engine).__name__ == "SyncEngine"
            assert KEY not in repr(client)
    else:

        async def main() -> pytest.ExceptionInfo[ts.TransportError]:
            async with ts.AsyncClient(
                base_url=upstream.base_url, api_key=KEY, max_retries=0
            ) as client:
                for i, extra in enumerate(calls):
                    if i == 3:
                        client.headers["X-Team"] = "blue"
                    upstream.app.enqueue(Script(deltas=["a"]))
                    async with client.stream_chat(MESSAGES, extra_headers=extra) as stream:
                        assert [text async for text in stream] == ["a"]
                with pytest.raises(ts.TransportError) as info:
                    await client.stream_chat(MESSAGES, extra_headers=bad).__aenter__()
                assert type(client._engine).__name__ == "HttpEngine"
                assert KEY not in repr(client)
                return info

        info = anyio.run(main)
    assert isinstance(info.value.__cause__, httpx.LocalProtocolError)
    assert KEY not in str(info.value)
    headers = sent()
    assert len(headers) == len(calls)  # the bad one was never sent
    assert headers[0] == headers[1]
    assert headers[2]["x-trace"] == "a" and "x-trace" not in headers[3]
    assert "x-team" not in headers[2] and headers[3]["x-team"] == headers[4]["x-team"] == "blue"
    assert headers[4]["x-trace"] == "b"
    assert all(h["authorization"] == f"Bearer {KEY}" for h in headers)


# --- the request body ------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["c_encoder", "fallback"])
def test_issue_17_request_body_is_encoded_as_json_dumps(
    monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    # The body is encoded through json's C encoder made directly (where there is one): the
    # same bytes and the same errors as json.dumps with the client's options.
    if not direct:
        monkeypatch.setattr(_base, "_ENCODE_DIRECT", None)
    else:
        assert _base._ENCODE_DIRECT is not None  # CPython has one
    body: dict[str, object] = {
        "model": "m",
        "messages": [{"role": "user", "content": 'héllo \u2028 "q" \\ 🙂'}],
        "stream": True,
        "temperature": 0.1,
        "n": -0.0,
        "stop": [None, True, 1e300],
        "nested": {"a": {"b": []}},
    }
    expected = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    assert _base._encode_body(body) == expected
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            _base._encode_body({"x": bad})
    with pytest.raises(TypeError):
        _base._encode_body({"x": object()})
    circular: dict[str, object] = {}
    circular["self"] = circular
    with pytest.raises(ValueError, match="Circular"):
        _base._encode_body(circular)
    assert _base._encode_body(body) == expected  # nothing left over from the failures
