"""Issue 16: a bare `break` out of a tool loop closes the upstream connection at once.

`async for event in client.run_tools(...): break`, with no `async with`, used to leave
the turn's connection open until a full garbage collection, as streams did before issue
15 finding 2: the loop object and its generator referred to each other. Now the
generator does not refer to the loop, and a dropped loop lets go of the stream it is
reading, whose own weakref finalizer shuts the socket down at once, with no event loop
turn (each test blocks the loop while it waits for the upstream to see the disconnect),
with a `ResourceWarning` that names where the loop was made and where it was dropped. On
a real loopback upstream, asyncio, trio and sync, in the first turn and in a later one.
"""

from __future__ import annotations

import gc
import sys
import warnings
import weakref
from collections.abc import Iterator

import anyio
import pytest

import tokenhub_stream as ts
from tokenhub_stream.testing import RunningUpstream, Script, ScriptedToolCall
from tokenhub_stream.tools import tool

from .conftest import KEY, MESSAGES
from .test_issue_15_break import (
    FD_SLACK,
    assert_disconnected_at_once,
    endless,
    open_fds,
    wait_fds,
)

pytestmark = pytest.mark.anyio

#: "The upstream sees the disconnect within 1 s of the break, 20 times in a row".
BREAKS_IN_A_ROW = 20


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    # How an abandoned async generator is finalised differs by event loop: both run.
    return str(request.param)


@tool
def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city.
    """
    return f"sunny in {city}"


def enqueue_turns(upstream: RunningUpstream, turn: int) -> None:
    """`turn` 1: the first answer never ends; 2: a tool turn first, then that."""
    if turn == 2:
        call = ScriptedToolCall(name="get_weather", arguments='{"city": "Paris"}')
        upstream.app.enqueue(Script(tool_calls=[call]))
    upstream.app.enqueue(endless())


def dropped_loops(caught: pytest.WarningsRecorder) -> list[warnings.WarningMessage]:
    return [w for w in caught if "unclosed tool loop" in str(w.message)]


# --- async: asyncio and trio ------------------------------------------------------------


@pytest.mark.parametrize("turn", [1, 2])
async def test_issue_16_loop_break_closes_the_connection_at_once(
    upstream: RunningUpstream, turn: int
) -> None:
    async with ts.AsyncClient(base_url=upstream.base_url, api_key=KEY, max_retries=0) as client:
        fds = open_fds()
        with anyio.fail_after(30):
            for i in range(BREAKS_IN_A_ROW):
                enqueue_turns(upstream, turn)
                with pytest.warns(ResourceWarning) as caught:
                    made = sys._getframe().f_lineno + 1
                    async for event in client.run_tools(MESSAGES, tools=[get_weather]):
                        if isinstance(event, ts.ContentDelta):
                            break
                    assert_disconnected_at_once(upstream, i)
                (ours,) = dropped_loops(caught)
                assert f"<AsyncToolLoop in turn {turn} of at most 8> made at " in str(ours.message)
                assert f"made at {__file__}:{made}:" in str(ours.message)
                assert ours.filename == __file__  # the place that dropped it
                assert len(upstream.app.requests) == turn * (i + 1)
        # The async rest of the cleanup ran in the loop meanwhile: nothing is left open.
        assert await wait_fds(fds + FD_SLACK) <= fds + FD_SLACK


async def test_issue_16_loop_is_freed_without_the_collector(upstream: RunningUpstream) -> None:
    """No reference cycle: with the collector off, the loop object goes at the `break`."""
    gc.collect()
    gc.disable()
    try:
        async with ts.AsyncClient(base_url=upstream.base_url, api_key=KEY) as client:
            enqueue_turns(upstream, 1)
            loop = client.run_tools(MESSAGES, tools=[get_weather])
            handle = weakref.ref(loop)
            with pytest.warns(ResourceWarning) as caught:
                async for _ in loop:
                    break
                dropped = sys._getframe().f_lineno + 1
                del loop
                assert handle() is None
                assert_disconnected_at_once(upstream, 0)
            (ours,) = dropped_loops(caught)
            assert (ours.filename, ours.lineno) == (__file__, dropped)
    finally:
        gc.enable()


async def test_issue_16_closed_or_finished_loops_do_not_warn(upstream: RunningUpstream) -> None:
    async with ts.AsyncClient(base_url=upstream.base_url, api_key=KEY) as client:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            enqueue_turns(upstream, 1)
            async with client.run_tools(MESSAGES, tools=[get_weather]) as loop:
                async for _ in loop:
                    break  # in `async with`: closed on the way out, no warning
            assert_disconnected_at_once(upstream, 0)
            del loop
            upstream.app.enqueue(Script(text="all of it"))
            finished = client.run_tools(MESSAGES, tools=[get_weather])
            assert (await finished.until_done()).content == "all of it"
            del finished
            never_started = client.run_tools(MESSAGES, tools=[get_weather])
            del never_started
            gc.collect()
        ours = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
        # (trio also warns about httpx's own body generators, which it does not close)
        assert [m for m in ours if "'httpcore." not in m and "'httpx." not in m] == []


# --- sync ---------------------------------------------------------------------------------


@pytest.fixture
def sync_client(upstream: RunningUpstream) -> Iterator[ts.Client]:
    with ts.Client(base_url=upstream.base_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("turn", [1, 2])
def test_issue_16_loop_break_closes_the_connection_at_once_sync(
    upstream: RunningUpstream, sync_client: ts.Client, turn: int
) -> None:
    fds = open_fds()
    for i in range(BREAKS_IN_A_ROW):
        enqueue_turns(upstream, turn)
        with pytest.warns(ResourceWarning) as caught:
            made = sys._getframe().f_lineno + 1
            for event in sync_client.run_tools(MESSAGES, tools=[get_weather]):
                if isinstance(event, ts.ContentDelta):
                    break
            assert_disconnected_at_once(upstream, i)
        (ours,) = dropped_loops(caught)
        assert f"<ToolLoop in turn {turn} of at most 8> made at {__file__}:{made}:" in str(
            ours.message
        )
        assert ours.filename == __file__
    assert open_fds() <= fds + FD_SLACK
