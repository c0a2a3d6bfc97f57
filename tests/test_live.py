"""Streaming behaviour over real loopback sockets, against the local upstream.

Incremental delivery, cancellation reaching the server, timeouts, connection reuse:
things only a real server can show.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import anyio
import pytest

import tokenhub_stream as ts
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

MESSAGES = [{"role": "user", "content": "hello there"}]
# Bound for "the server saw the disconnect" (the figure) and timeout precision
# (the setting plus max(10%, 250 ms)).
DISCONNECT_WITHIN = 1.0
SLACK = 0.25


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        yield running


def enqueue(up: RunningUpstream, script: Script) -> None:
    up.app.enqueue(script)


@pytest.mark.anyio
async def test_live_async_deltas_arrive_as_sent(upstream: RunningUpstream) -> None:
    enqueue(upstream, Script(deltas=["one ", "two ", "three"], delay=0.3))
    stamps: list[tuple[float, str]] = []
    start = time.monotonic()
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            async for text in stream:
                stamps.append((time.monotonic() - start, text))
    assert [t for _, t in stamps] == ["one ", "two ", "three"]
    # each delta was handed out when it arrived, not when the body ended
    assert stamps[-1][0] - stamps[0][0] >= 0.45
    assert stream.outcome == ts.Outcome("completed", "done")
    assert stream.timings.time_to_first_token is not None
    assert stream.timings.rate_unit == "deltas/s"


def test_live_sync_deltas_arrive_as_sent(upstream: RunningUpstream) -> None:
    enqueue(upstream, Script(deltas=["one ", "two ", "three"], delay=0.3))
    stamps: list[float] = []
    start = time.monotonic()
    with ts.stream_chat_sync(MESSAGES, base_url=upstream.base_url) as stream:
        for _ in stream:
            stamps.append(time.monotonic() - start)
    assert len(stamps) == 3 and stamps[-1] - stamps[0] >= 0.45


@pytest.mark.anyio
async def test_live_default_reply_with_usage(upstream: RunningUpstream) -> None:
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES, include_usage=True) as stream:
            text = "".join([t async for t in stream])
    assert "hello there" in text
    assert stream.message.content == text
    assert stream.usage is not None and stream.usage.completion_tokens
    assert stream.timings.rate_unit == "tokens/s"
    body = upstream.app.requests[-1].json
    assert body is not None and body["stream_options"] == {"include_usage": True}


# --- cancellation reaches the server -------------------------------------------------


def stall(up: RunningUpstream) -> None:
    enqueue(up, Script(deltas=["first"], end="stall", keepalive=0.05))


@pytest.mark.anyio
async def test_live_async_leaving_context_closes_upstream(upstream: RunningUpstream) -> None:
    stall(upstream)
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            async for text in stream:
                assert text == "first"
                break
        assert upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)
    assert stream.outcome is not None and stream.outcome.kind == "cancelled"
    assert stream.message.content == "first"


@pytest.mark.anyio
async def test_live_async_aclose_closes_upstream(upstream: RunningUpstream) -> None:
    stall(upstream)
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        stream = client.stream_chat(MESSAGES)
        iterator = stream.__aiter__()
        assert await iterator.__anext__() == "first"
        await stream.aclose()
        assert upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)
        assert stream.outcome is not None and stream.outcome.kind == "cancelled"


@pytest.mark.anyio
async def test_live_async_cancel_scope_closes_upstream_and_reraises(
    upstream: RunningUpstream,
) -> None:
    stall(upstream)
    got: list[str] = []
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(10), anyio.CancelScope() as scope:
            async with client.stream_chat(MESSAGES) as stream:
                async for text in stream:
                    got.append(text)
                    # Cancelled 0.2 s after the first delta, while the upstream stalls
                    # (not a fixed time from the start: a loaded machine may be slower).
                    scope.deadline = anyio.current_time() + 0.2
        assert scope.cancelled_caught  # the cancellation propagated, not swallowed
        assert upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)
    assert got == ["first"]
    assert stream.outcome is not None and stream.outcome.kind == "cancelled"


@pytest.mark.anyio
async def test_live_async_cancel_while_waiting_for_first_token(upstream: RunningUpstream) -> None:
    enqueue(upstream, Script(deltas=["late"], first_delay=30, keepalive=0.05))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(10), anyio.CancelScope() as scope:
            async with client.stream_chat(MESSAGES) as stream:
                # The headers are in, so the upstream has the request; its first token is
                # 30 s away. Cancelled 0.2 s from here, not from the start: on a loaded
                # machine the request itself may take longer than that (seen once).
                scope.deadline = anyio.current_time() + 0.2
                async for _ in stream:
                    pass
        assert scope.cancelled_caught
        assert upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)


# trio warns (ResourceWarning) when it has to finalise an unfinished async generator:
# that is the reason the docs recommend `async with`. The drop itself is shown on asyncio.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_live_async_bare_break_closes_when_dropped(upstream: RunningUpstream) -> None:
    stall(upstream)
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        stream = client.stream_chat(MESSAGES)
        async for _ in stream:
            break
        # Dropped unfinished: closed at once, with a ResourceWarning as files and sockets
        # give (issue #15).
        with pytest.warns(ResourceWarning, match="unclosed stream"):
            del stream
            gc.collect()
        # Keep the event loop running (a blocking wait here would hold off anything the
        # close left to it) until the upstream sees the disconnect.
        with anyio.fail_after(DISCONNECT_WITHIN):
            while True:
                if upstream.app.requests[-1].disconnected:
                    break
                await anyio.sleep(0.01)


def test_live_sync_leaving_context_closes_upstream(upstream: RunningUpstream) -> None:
    stall(upstream)
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES) as stream:
            for _ in stream:
                break
        assert upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)
    assert stream.outcome is not None and stream.outcome.kind == "cancelled"


def test_live_sync_bare_break_closes_when_dropped(upstream: RunningUpstream) -> None:
    stall(upstream)
    with ts.Client(base_url=upstream.base_url) as client:
        stream = client.stream_chat(MESSAGES)
        for _ in stream:
            break
        with pytest.warns(ResourceWarning, match="unclosed stream"):
            del stream
            gc.collect()
        assert upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)


# --- end of stream --------------------------------------------------------------------


@pytest.mark.anyio
async def test_live_done_ends_stream_even_if_connection_stays_open(
    upstream: RunningUpstream,
) -> None:
    first = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    # [DONE], then the body stays open for 5 s before a heartbeat: the stream must end
    # at [DONE], and the bounded drain must give up quickly.
    enqueue(upstream, Script(raw=[first, b"data: [DONE]\n\n", b": late heartbeat\n\n"], delay=5))
    start = time.monotonic()
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            got = [t async for t in stream]
    assert time.monotonic() - start < 5 + 1.0 and got == ["x"]


@pytest.mark.anyio
async def test_live_done_then_open_connection_ends_quickly(upstream: RunningUpstream) -> None:
    frames = [
        b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\ndata: [DONE]\n\n',
        b": hb\n\n",
    ]
    enqueue(upstream, Script(raw=frames, delay=5))
    start = time.monotonic()
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            assert [t async for t in stream] == ["x"]
    assert time.monotonic() - start < 1.0
    assert stream.outcome == ts.Outcome("completed", "done")


@pytest.mark.anyio
async def test_live_bare_close_after_finish_is_complete(upstream: RunningUpstream) -> None:
    enqueue(upstream, Script(deltas=["a", "b"], end="close"))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            assert [t async for t in stream] == ["a", "b"]
    assert stream.outcome == ts.Outcome("completed", "finish_reason")


@pytest.mark.parametrize("end", ["cut", "close"])
@pytest.mark.anyio
async def test_live_cut_connection_delivers_deltas_then_raises(
    upstream: RunningUpstream, end: str
) -> None:
    enqueue(upstream, Script(deltas=["a", "b"], end=end, finish_reason=None))  # type: ignore[arg-type]
    got: list[str] = []
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with pytest.raises(ts.TruncatedStreamError):
            async with client.stream_chat(MESSAGES) as stream:
                async for text in stream:
                    got.append(text)
    assert got == ["a", "b"]
    assert stream.outcome is not None and stream.outcome.kind == "truncated"


def test_live_sync_error_frame_after_deltas(upstream: RunningUpstream) -> None:
    enqueue(
        upstream,
        Script(
            deltas=["a"],
            error_frame={"error": {"message": "rate", "code": "rate_limit_exceeded"}},
            end="close",
            finish_reason=None,
        ),
    )
    got: list[str] = []
    with pytest.raises(ts.RateLimitError):
        with ts.stream_chat_sync(MESSAGES, base_url=upstream.base_url) as stream:
            for text in stream:
                got.append(text)
    assert got == ["a"]
    assert stream.outcome is not None and stream.outcome.kind == "upstream_error"


@pytest.mark.anyio
async def test_live_retry_on_429_then_stream(upstream: RunningUpstream) -> None:
    enqueue(upstream, Script(status=429, headers={"Retry-After": "0"}))
    enqueue(upstream, Script(deltas=["ok"]))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            assert [t async for t in stream] == ["ok"]
    assert len(upstream.app.requests) == 2


@pytest.mark.anyio
async def test_live_auth_error_never_leaks_key() -> None:
    key = "sk-th_live_canary_42"
    with run_upstream(FakeChatUpstream(api_key="sk-th_other")) as up:
        async with ts.AsyncClient(base_url=up.base_url, api_key=key) as client:
            with pytest.raises(ts.AuthenticationError) as info:
                async with client.stream_chat(MESSAGES, max_retries=0) as stream:
                    async for _ in stream:
                        pass
    assert key not in str(info.value) and key not in repr(info.value)


# --- timeouts: the right one, never early, not much late --------------------------------


@pytest.mark.timing
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_live_first_token_timeout_ignores_keepalives(upstream: RunningUpstream, sync: bool) -> None:
    enqueue(upstream, Script(deltas=["late"], first_delay=10, keepalive=0.05))
    elapsed, error = run_stream(upstream, sync, ts.Timeout(first_token=0.5))
    assert isinstance(error, ts.StreamTimeout) and error.kind == "first_token"
    assert 0.5 <= elapsed < 0.5 + SLACK, elapsed
    assert upstream.app.requests[-1].wait_disconnected(DISCONNECT_WITHIN)


@pytest.mark.timing
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_live_idle_timeout_ignores_keepalives(upstream: RunningUpstream, sync: bool) -> None:
    enqueue(upstream, Script(deltas=["a", "b"], end="stall", keepalive=0.05))
    elapsed, error = run_stream(upstream, sync, ts.Timeout(idle=0.5))
    assert isinstance(error, ts.StreamTimeout) and error.kind == "idle"
    assert 0.5 <= elapsed < 0.5 + SLACK, elapsed


@pytest.mark.timing
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_live_total_timeout(upstream: RunningUpstream, sync: bool) -> None:
    enqueue(upstream, Script(text="word " * 100, delay=0.02))
    elapsed, error = run_stream(upstream, sync, ts.Timeout(total=0.5), since_start=True)
    assert isinstance(error, ts.StreamTimeout) and error.kind == "total"
    assert 0.5 <= elapsed < 0.5 + SLACK, elapsed


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_live_slow_stream_within_timeouts_completes(upstream: RunningUpstream, sync: bool) -> None:
    # gaps of 0.15 s under an idle limit of 0.4 s: a timer that is not reset by data
    # events (or that fires early) would cut this stream.
    enqueue(upstream, Script(deltas=["a", "b", "c", "d", "e"], delay=0.15))
    elapsed, error = run_stream(upstream, sync, ts.Timeout(first_token=0.4, idle=0.4))
    assert error is None, error


def run_stream(
    up: RunningUpstream, sync: bool, timeout: ts.Timeout, since_start: bool = False
) -> tuple[float, BaseException | None]:
    """Stream until done or error; return seconds since the last delta (or the start).

    The clock stops where the error is raised: closing the stream and its client after it
    is not part of the deadline.
    """
    last = start = time.monotonic()
    fired: float | None = None
    if sync:
        try:
            with ts.stream_chat_sync(MESSAGES, base_url=up.base_url, timeout=timeout) as stream:
                try:
                    for _ in stream:
                        last = time.monotonic()
                finally:
                    fired = time.monotonic()
        except ts.TokenHubError as exc:
            end = time.monotonic() if fired is None else fired
            return end - (start if since_start else last), exc
        return time.monotonic() - start, None

    async def main() -> tuple[float, BaseException | None]:
        last = start
        fired: float | None = None
        try:
            async with ts.stream_chat(MESSAGES, base_url=up.base_url, timeout=timeout) as stream:
                try:
                    async for _ in stream:
                        last = time.monotonic()
                finally:
                    fired = time.monotonic()
        except ts.TokenHubError as exc:
            end = time.monotonic() if fired is None else fired
            return end - (start if since_start else last), exc
        return time.monotonic() - start, None

    return anyio.run(main)


# --- the pool ---------------------------------------------------------------------------


# Timing: the connection returns to the pool only if the upstream's end of body arrives
# within the drain bound after [DONE] (50 ms); a starved upstream thread misses it.
@pytest.mark.timing
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_live_sequential_streams_reuse_one_connection(
    upstream: RunningUpstream, sync: bool
) -> None:
    local_ports: set[object] = set()

    def note(stream: ts.ChatStream | ts.AsyncChatStream) -> None:
        assert stream.response is not None
        network = stream.response.extensions["network_stream"]
        local_ports.add(network.get_extra_info("client_addr"))

    for _ in range(100):
        enqueue(upstream, Script(deltas=["x"], delay=0))
    if sync:
        with ts.Client(base_url=upstream.base_url) as client:
            for _ in range(100):
                with client.stream_chat(MESSAGES) as stream:
                    assert list(stream) == ["x"]
                note(stream)
    else:

        async def main() -> None:
            async with ts.AsyncClient(base_url=upstream.base_url) as client:
                for _ in range(100):
                    async with client.stream_chat(MESSAGES) as stream:
                        assert [t async for t in stream] == ["x"]
                    note(stream)

        anyio.run(main)
    assert len(local_ports) == 1, local_ports


@pytest.mark.anyio
async def test_live_events_tool_calls_reasoning(upstream: RunningUpstream) -> None:
    from tokenhub_stream.testing import ScriptedToolCall

    enqueue(
        upstream,
        Script(
            reasoning="hmm",
            deltas=["Let me check."],
            tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city": "Paris"}')],
            tool_call_index=False,
        ),
    )
    events: list[ts.StreamEvent] = []
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            async for event in stream.events():
                events.append(event)
    kinds = {type(e).__name__ for e in events}
    assert {"ReasoningDelta", "ContentDelta", "ToolCallDelta", "FinishEvent"} <= kinds
    message = stream.message
    assert message.reasoning == "hmm" and message.content == "Let me check."
    assert [(c.name, c.arguments) for c in message.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')
    ]
    assert message.finish_reason == "tool_calls"


# --- chat(): the non-streaming call has deadlines too --------------------------------


@pytest.mark.timing
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_live_chat_stall_hits_first_token_deadline(upstream: RunningUpstream, sync: bool) -> None:
    # DeepSeek sends blank-line keep-alives on non-streaming requests: they reset nothing.
    enqueue(upstream, Script(text="never", end="stall", keepalive=0.05))
    start = time.monotonic()
    with pytest.raises(ts.StreamTimeout) as info:
        if sync:
            with ts.Client(base_url=upstream.base_url) as client:
                client.chat(MESSAGES, timeout=ts.Timeout(first_token=0.5))
        else:

            async def main() -> None:
                async with ts.AsyncClient(base_url=upstream.base_url) as client:
                    await client.chat(MESSAGES, timeout=ts.Timeout(first_token=0.5))

            anyio.run(main)
    elapsed = time.monotonic() - start
    assert info.value.kind == "first_token"
    assert 0.5 <= elapsed < 0.5 + SLACK, elapsed


def test_live_chat_total_deadline_and_cut_body(upstream: RunningUpstream) -> None:
    enqueue(upstream, Script(text="never", end="stall", keepalive=0.05))
    enqueue(upstream, Script(text="half", end="cut"))
    with ts.Client(base_url=upstream.base_url) as client:
        with pytest.raises(ts.StreamTimeout) as info:
            client.chat(MESSAGES, timeout=ts.Timeout(total=0.4))
        assert info.value.kind == "total"
        with pytest.raises((ts.TransportError, ts.ProtocolError)):
            client.chat(MESSAGES, max_retries=0)
        result = client.chat(MESSAGES)  # the default reply: the client is still usable
    assert "hello there" in result.message.content


@pytest.mark.anyio
async def test_live_rate_counts_reasoning_deltas(upstream: RunningUpstream) -> None:
    enqueue(upstream, Script(reasoning="one two three four", deltas=[], delay=0.01))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        async with client.stream_chat(MESSAGES) as stream:
            assert [t async for t in stream] == []
    timings = stream.timings
    assert timings.rate_unit == "deltas/s" and timings.rate is not None and timings.rate > 0
    assert stream.message.reasoning == "one two three four"
