"""Issue 15, finding 2: a bare `break` closes the upstream connection at once.

`async for text in client.stream_chat(...): break`, with no `async with`, used to leave
the connection open until a full garbage collection: the stream and its consuming
generator referred to each other. Now the stream is freed by reference counting, and a
weakref callback shuts its socket down at once, with no event loop turn (each test
blocks the loop while it waits for the upstream to see the disconnect), with a
`ResourceWarning` that points at the code that dropped it. On a real loopback upstream,
asyncio, trio and sync, through `client.stream_chat`, `stream_chat` and
`stream_chat_sync`.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator

import anyio
import pytest

import tokenhub_stream as ts
from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import DISCONNECT_WITHIN, KEY, MESSAGES

pytestmark = pytest.mark.anyio

#: "The upstream sees the disconnect within 1 s of the break ... 100 times in a row".
BREAKS_IN_A_ROW = 100
#: The same through `stream_chat()` / `stream_chat_sync()`, fewer: each of those builds
#: its own connection pool (~25 ms, httpx's SSL context), and its close is the same code.
OWNED_BREAKS = 20
#: "... and no connection leaks after 1,000 such breaks".
LEAK_BREAKS = 1000
#: Descriptors that may come and go meanwhile (the watchdog, uvicorn's own).
FD_SLACK = 3


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    # The reliability suite runs on asyncio only; this finding is about how each event
    # loop finalises an abandoned async generator, so both backends run here.
    return str(request.param)


def endless() -> Script:
    """An answer that goes on for seconds, then stalls: it ends only when the client goes."""
    return Script(text="word " * 1000, delay=0.005, end="stall", keepalive=0.05)


def quick() -> Script:
    """All of it at once, then a stall: cheap enough for a thousand breaks."""
    return Script(text="a b c", delay=0, end="stall")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def unclosed(caught: pytest.WarningsRecorder) -> list[warnings.WarningMessage]:
    return [w for w in caught if "unclosed stream" in str(w.message)]


def assert_disconnected_at_once(upstream: RunningUpstream, i: int) -> None:
    # A blocking wait: the event loop gets no turn until the upstream has seen the
    # disconnect, so the close cannot come from a task the loop would run later.
    start = time.monotonic()
    seen = upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)
    assert seen, f"break {i + 1}: the upstream saw no disconnect within 1 s"
    assert time.monotonic() - start < DISCONNECT_WITHIN


async def wait_fds(limit: int) -> int:
    """Wait (the loop turning: async cleanup may finish now) until at most `limit`
    descriptors are open; return the count."""
    with anyio.move_on_after(5):
        while open_fds() > limit:  # noqa: ASYNC110 - no event tells that a descriptor closed
            await anyio.sleep(0.01)
    return open_fds()


def async_client(upstream: RunningUpstream) -> ts.AsyncClient:
    return ts.AsyncClient(base_url=upstream.base_url, api_key=KEY, max_retries=0)


# --- async: asyncio and trio ------------------------------------------------------------


@pytest.mark.parametrize("api", ["client.stream_chat", "stream_chat"])
async def test_issue_15_break_closes_the_connection_at_once(
    upstream: RunningUpstream, api: str
) -> None:
    async with async_client(upstream) as client:

        def start() -> ts.AsyncChatStream:
            if api == "stream_chat":
                return ts.stream_chat(MESSAGES, base_url=upstream.base_url, api_key=KEY)
            return client.stream_chat(MESSAGES)

        fds = open_fds()
        with anyio.fail_after(30):
            for i in range(OWNED_BREAKS if api == "stream_chat" else BREAKS_IN_A_ROW):
                upstream.app.enqueue(endless())
                with pytest.warns(ResourceWarning) as caught:
                    async for _ in start():
                        break
                    assert_disconnected_at_once(upstream, i)
                (ours,) = unclosed(caught)
                assert "<AsyncChatStream model=" in str(ours.message)
                assert ours.filename == __file__  # the place that dropped it
        # The async rest of the cleanup (the response, `stream_chat`'s own pool) ran in
        # the loop meanwhile: nothing is left open.
        assert await wait_fds(fds + FD_SLACK) <= fds + FD_SLACK


async def test_issue_15_no_connection_leak_after_1000_breaks(upstream: RunningUpstream) -> None:
    async with async_client(upstream) as client:
        fds = open_fds()
        with anyio.fail_after(50), pytest.warns(ResourceWarning) as caught:
            for _ in range(LEAK_BREAKS):
                upstream.app.enqueue(quick())
                async for _ in client.stream_chat(MESSAGES):
                    break
        assert len(unclosed(caught)) == LEAK_BREAKS
        # Still inside the client: its pool must not be holding the connections.
        assert await wait_fds(fds + FD_SLACK) <= fds + FD_SLACK
    requests = upstream.app.requests
    assert len(requests) == LEAK_BREAKS
    assert all(r.wait_disconnected(1.0) for r in requests)


async def test_issue_15_dropped_anext_and_events_streams_close_at_once(
    upstream: RunningUpstream,
) -> None:
    async with async_client(upstream) as client:
        upstream.app.enqueue(endless())
        stream = client.stream_chat(MESSAGES)
        with pytest.warns(ResourceWarning) as caught:
            assert await stream.__anext__() == "word"
            del stream
            assert_disconnected_at_once(upstream, 0)
        assert len(unclosed(caught)) == 1

        upstream.app.enqueue(endless())
        with pytest.warns(ResourceWarning) as caught:
            async for _ in client.stream_chat(MESSAGES).events():
                break
            assert_disconnected_at_once(upstream, 0)
        assert len(unclosed(caught)) == 1


async def test_issue_15_abandoned_stream_is_freed_without_the_collector(
    upstream: RunningUpstream,
) -> None:
    """No reference cycle: with the collector off, the stream object goes at the
    `break`, and its state once the event loop has finished the async cleanup."""
    gc.collect()
    gc.disable()
    try:
        async with async_client(upstream) as client:
            upstream.app.enqueue(endless())
            stream = client.stream_chat(MESSAGES)
            freed = anyio.Event()
            handle = weakref.ref(stream)
            weakref.finalize(stream._state, freed.set)
            with pytest.warns(ResourceWarning):
                async for _ in stream:
                    break
                del stream
                assert handle() is None
            with anyio.fail_after(5):
                await freed.wait()
    finally:
        gc.enable()


async def test_issue_15_warning_names_where_the_stream_was_made_and_dropped(
    upstream: RunningUpstream,
) -> None:
    async with async_client(upstream) as client:
        upstream.app.enqueue(endless())
        made = sys._getframe().f_lineno + 1
        stream = client.stream_chat(MESSAGES)
        state = stream._state
        with pytest.warns(ResourceWarning) as caught:
            async for _ in stream:
                break
            dropped = sys._getframe().f_lineno + 1
            del stream
        (ours,) = unclosed(caught)
        assert f"made at {__file__}:{made}:" in str(ours.message)
        assert (ours.filename, ours.lineno) == (__file__, dropped)
        assert ours.source is state  # what tracemalloc looks up (`-X tracemalloc`)


async def test_issue_15_closed_or_finished_streams_do_not_warn(upstream: RunningUpstream) -> None:
    async with async_client(upstream) as client:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            upstream.app.enqueue(endless())
            async with client.stream_chat(MESSAGES) as stream:
                async for _ in stream:
                    break  # in `async with`: closed on the way out, no warning
            assert_disconnected_at_once(upstream, 0)
            upstream.app.enqueue(Script(text="all of it", delay=0))
            texts = [t async for t in client.stream_chat(MESSAGES)]  # read to its end
            assert "".join(texts) == "all of it"
            never_sent = client.stream_chat(MESSAGES)
            del never_sent
            gc.collect()
        ours = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        # (trio also warns about httpx's own body generators, which it does not close)
        assert [m for m in ours if "'httpcore." not in m and "'httpx." not in m] == []
        assert stream.outcome == ts.Outcome("cancelled", None)


# --- sync ---------------------------------------------------------------------------------


@pytest.fixture
def sync_client(upstream: RunningUpstream) -> Iterator[ts.Client]:
    with ts.Client(base_url=upstream.base_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("api", ["client.stream_chat", "stream_chat_sync"])
def test_issue_15_break_closes_the_connection_at_once_sync(
    upstream: RunningUpstream, sync_client: ts.Client, api: str
) -> None:
    start: Callable[[], ts.ChatStream] = (
        (lambda: ts.stream_chat_sync(MESSAGES, base_url=upstream.base_url, api_key=KEY))
        if api == "stream_chat_sync"
        else (lambda: sync_client.stream_chat(MESSAGES))
    )
    fds = open_fds()
    for i in range(OWNED_BREAKS if api == "stream_chat_sync" else BREAKS_IN_A_ROW):
        upstream.app.enqueue(endless())
        with pytest.warns(ResourceWarning) as caught:
            for _ in start():
                break
            assert_disconnected_at_once(upstream, i)
        (ours,) = unclosed(caught)
        assert "<ChatStream model=" in str(ours.message)
        assert ours.filename == __file__
    assert open_fds() <= fds + FD_SLACK


def test_issue_15_no_connection_leak_after_1000_breaks_sync(
    upstream: RunningUpstream, sync_client: ts.Client
) -> None:
    fds = open_fds()
    with pytest.warns(ResourceWarning) as caught:
        for _ in range(LEAK_BREAKS):
            upstream.app.enqueue(quick())
            for _ in sync_client.stream_chat(MESSAGES):
                break
    assert len(unclosed(caught)) == LEAK_BREAKS
    assert open_fds() <= fds + FD_SLACK
    assert all(r.wait_disconnected(1.0) for r in upstream.app.requests)
