"""The client against an upstream that misbehaves on a real loopback socket.

Cuts, stalls, garbage and rate limits, each repeated `TRIALS` times where it is cheap
(20 in CI, 100 in the soak run). Every wait sits inside `anyio.fail_after`: a hang fails.
"""

from __future__ import annotations

import random
import time
import tracemalloc

import anyio
import pytest

import tokenhub_stream as ts
from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import (
    KEY,
    MESSAGES,
    TRIALS,
    LeakScanner,
    figure,
    slack,
    wait_disconnected,
)
from .faults import WHERE, broken_stream, content_frame, finish_frame

pytestmark = pytest.mark.anyio

DONE = b"data: [DONE]\n\n"


def client(up: RunningUpstream, **kw: object) -> ts.AsyncClient:
    options: dict[str, object] = {"base_url": up.base_url, "api_key": KEY, "max_retries": 0}
    options.update(kw)
    return ts.AsyncClient(**options)  # type: ignore[arg-type]


async def collect(
    c: ts.AsyncClient, leaks: LeakScanner, **kw: object
) -> tuple[list[str], ts.TokenHubError | None, ts.AsyncChatStream]:
    got: list[str] = []
    stream = c.stream_chat(MESSAGES, **kw)  # type: ignore[call-overload]
    try:
        async with stream:
            async for text in stream:
                got.append(text)
    except ts.TokenHubError as exc:
        leaks.add("client error", exc)
        return got, exc, stream
    return got, None, stream


# --- cuts --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", WHERE)
async def test_client_cut_delivers_deltas_then_typed_error(
    upstream: RunningUpstream, leaks: LeakScanner, where: str
) -> None:
    rng = random.Random(f"client-{where}")
    async with client(upstream) as c:
        for trial in range(TRIALS):
            broken = broken_stream(where, rng)
            # Half the trials coalesce everything into one write: the deltas before the
            # cut must still come out.
            chunks = broken.chunks if trial % 2 else [b"".join(broken.chunks)]
            upstream.app.enqueue(Script(raw=chunks, end="cut", delay=0))
            with anyio.fail_after(5):
                got, error, stream = await collect(c, leaks)
            assert "".join(got) == broken.text, (trial, broken)
            assert isinstance(error, ts.TruncatedStreamError), (trial, error)
            assert stream.outcome is not None and stream.outcome.kind == "truncated"
            assert stream.message.content == broken.text


async def test_client_clean_close_without_done_is_truncated(
    upstream: RunningUpstream, leaks: LeakScanner
) -> None:
    async with client(upstream) as c:
        for _ in range(TRIALS):
            upstream.app.enqueue(Script(raw=[content_frame("a"), content_frame("b")], delay=0))
            with anyio.fail_after(5):
                got, error, _ = await collect(c, leaks)
            assert got == ["a", "b"] and isinstance(error, ts.TruncatedStreamError)


async def test_client_utf8_split_across_writes_is_reassembled(
    upstream: RunningUpstream, leaks: LeakScanner
) -> None:
    frame = content_frame("🙂é€日")
    start = frame.index("🙂".encode())
    async with client(upstream) as c:
        for cut in range(start, start + len("🙂é€日".encode()) + 1):  # every byte of them
            upstream.app.enqueue(Script(raw=[frame[:cut], frame[cut:], DONE], delay=0))
            with anyio.fail_after(5):
                got, error, _ = await collect(c, leaks)
            assert error is None and got == ["🙂é€日"], cut


# --- stalls ----------------------------------------------------------------------------------

SETTING = 0.5
TIMING_TRIALS = max(1, TRIALS // 20)


@pytest.mark.timing
@pytest.mark.parametrize("keepalive", [None, 0.05], ids=["silent", "keepalive"])
@pytest.mark.parametrize("after", [0, 3], ids=["after_headers", "after_3_chunks"])
async def test_client_stall_fires_the_right_timeout_on_time(
    upstream: RunningUpstream, leaks: LeakScanner, keepalive: float | None, after: int
) -> None:
    kind = "first_token" if after == 0 else "idle"
    frames = [content_frame(f"t{i}") for i in range(after)]
    timeout = ts.Timeout(connect=5, first_token=SETTING, idle=SETTING)
    async with client(upstream, timeout=timeout) as c:
        for _ in range(TIMING_TRIALS):
            upstream.app.enqueue(Script(raw=frames, end="stall", keepalive=keepalive, delay=0))
            start = last = time.monotonic()
            got: list[str] = []
            with anyio.fail_after(5), pytest.raises(ts.StreamTimeout) as info:
                async with c.stream_chat(MESSAGES) as stream:
                    try:
                        async for text in stream:
                            got.append(text)
                            last = time.monotonic()
                    finally:
                        fired = time.monotonic()  # when it raised; closing is not timed
            elapsed = fired - (start if after == 0 else last)
            assert info.value.kind == kind
            assert got == [f"t{i}" for i in range(after)]
            figure(
                f"client {kind} timeout {SETTING} s, {'keep-alives' if keepalive else 'silent'}",
                elapsed,
            )
            assert SETTING <= elapsed < SETTING + slack(SETTING), elapsed
            assert stream.outcome == ts.Outcome("timeout", kind, info.value)
            assert await wait_disconnected(upstream, -1, 1.0)


@pytest.mark.timing
async def test_client_total_timeout_on_a_slow_stream(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(text="word " * 200, delay=0.02))
    async with client(upstream, timeout=ts.Timeout(total=SETTING)) as c:
        start = time.monotonic()
        with anyio.fail_after(5), pytest.raises(ts.StreamTimeout) as info:
            async with c.stream_chat(MESSAGES) as stream:
                try:
                    async for _ in stream:
                        pass
                finally:
                    fired = time.monotonic()  # when it raised; closing is not timed
        elapsed = fired - start
    assert info.value.kind == "total"
    figure(f"client total timeout {SETTING} s", elapsed)
    assert SETTING <= elapsed < SETTING + slack(SETTING), elapsed


@pytest.mark.timing
def test_client_sync_idle_stall_with_keepalives(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(raw=[content_frame("a")], end="stall", keepalive=0.05))
    last = time.monotonic()
    with ts.Client(base_url=upstream.base_url, api_key=KEY, timeout=ts.Timeout(idle=SETTING)) as c:
        with pytest.raises(ts.StreamTimeout) as info:
            with c.stream_chat(MESSAGES) as stream:
                try:
                    for _ in stream:
                        last = time.monotonic()
                finally:
                    fired = time.monotonic()  # when it raised; closing is not timed
    elapsed = fired - last
    assert info.value.kind == "idle"
    figure(f"sync client idle timeout {SETTING} s, keep-alives", elapsed)
    assert SETTING <= elapsed < SETTING + slack(SETTING), elapsed


# --- garbage -------------------------------------------------------------------------------


@pytest.mark.parametrize("coalesced", [False, True])
async def test_client_invalid_json_frame(
    upstream: RunningUpstream, leaks: LeakScanner, coalesced: bool
) -> None:
    chunks = [content_frame("ok"), b"data: {nope\n\n", content_frame("never")]
    upstream.app.enqueue(Script(raw=[b"".join(chunks)] if coalesced else chunks, delay=0))
    async with client(upstream) as c:
        with anyio.fail_after(5):
            got, error, _ = await collect(c, leaks)
    assert got == ["ok"]
    assert type(error) is ts.ProtocolError and "invalid JSON" in str(error)


@pytest.mark.parametrize("coalesced", [False, True])
async def test_client_invalid_utf8_replaced_or_refused(
    upstream: RunningUpstream, leaks: LeakScanner, coalesced: bool
) -> None:
    bad = b'data: {"choices":[{"index":0,"delta":{"content":"a\xffb"}}]}\n\n'
    chunks = [content_frame("ok"), bad, finish_frame(), DONE]
    raw = [b"".join(chunks)] if coalesced else chunks
    async with client(upstream) as c:
        upstream.app.enqueue(Script(raw=raw, delay=0))
        with anyio.fail_after(5):
            got, error, _ = await collect(c, leaks)
        assert error is None and got == ["ok", "a\ufffdb"]
    async with client(upstream, strict_utf8=True) as c:
        upstream.app.enqueue(Script(raw=raw, delay=0))
        with anyio.fail_after(5):
            got, error, _ = await collect(c, leaks)
        assert got == ["ok"]  # the delta before the bad frame, even in the same write
        assert type(error) is ts.ProtocolError and "UTF-8" in str(error)


@pytest.mark.parametrize("pieces", [1, 16])
async def test_client_frame_over_max_event_bytes(
    upstream: RunningUpstream, leaks: LeakScanner, pieces: int
) -> None:
    big = content_frame("z" * (256 * 1024))
    step = -(-len(big) // pieces)
    raw = [content_frame("ok")] + [big[i : i + step] for i in range(0, len(big), step)]
    upstream.app.enqueue(Script(raw=[*raw, DONE], delay=0))
    async with client(upstream, max_event_bytes=64 * 1024) as c:
        with anyio.fail_after(5):
            got, error, _ = await collect(c, leaks)
    assert got == ["ok"]
    assert type(error) is ts.ProtocolError and "max_event_bytes" in str(error)


async def test_client_never_ending_line_is_refused_and_closed(
    upstream: RunningUpstream, leaks: LeakScanner
) -> None:
    piece = b"x" * (64 * 1024)
    raw = [content_frame("ok"), b"data: " + piece, *([piece] * 400)]  # 26 MB, no line end
    upstream.app.enqueue(Script(raw=raw, delay=0, end="stall"))
    async with client(upstream, max_event_bytes=1024 * 1024) as c:
        with anyio.fail_after(10):
            got, error, _ = await collect(c, leaks)
    assert got == ["ok"]
    assert type(error) is ts.ProtocolError and "max_event_bytes" in str(error)
    assert await wait_disconnected(upstream, -1, 1.0)


async def test_client_million_keepalives_memory_stays_flat(
    upstream: RunningUpstream, leaks: LeakScanner
) -> None:
    comment = b": keep-alive\n\n"
    block = comment * 4096  # 57 KiB; 245 blocks = 1,003,520 comments (14 MB)
    raw = [block] * 245 + [content_frame("after"), finish_frame(), DONE]
    upstream.app.enqueue(Script(raw=raw, delay=0))
    limit = 64 * 1024
    async with client(upstream, max_event_bytes=limit, timeout=ts.Timeout(30)) as c:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            with anyio.fail_after(60):
                got, error, _ = await collect(c, leaks)
            growth = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    assert error is None and got == ["after"]
    figure("client traced peak growth over 1M keep-alives (bytes)", growth)
    # The upstream shares this process: its write buffers (one 57 KiB block at a time
    # under uvicorn's flow control) count too. 14 MB went through.
    assert growth < limit + 2 * 1024 * 1024, growth


# --- rate limits and retries --------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
async def test_client_retry_after_honoured_before_the_first_byte(
    upstream: RunningUpstream, leaks: LeakScanner, status: int
) -> None:
    before = len(upstream.app.requests)
    upstream.app.enqueue(Script(status=status, headers={"Retry-After": "0.3"}))
    upstream.app.enqueue(Script(deltas=["fine"]))
    async with client(upstream, max_retries=2) as c:
        start = time.monotonic()
        with anyio.fail_after(5):
            got, error, _ = await collect(c, leaks)
    assert error is None and got == ["fine"]
    assert len(upstream.app.requests) - before == 2
    assert time.monotonic() - start >= 0.3


async def test_client_retryable_error_frame_before_any_delta_is_retried(
    upstream: RunningUpstream, leaks: LeakScanner
) -> None:
    before = len(upstream.app.requests)
    frame = {"error": {"message": "overloaded", "code": "service_unavailable"}}
    upstream.app.enqueue(Script(deltas=[], error_frame=frame, end="close", finish_reason=None))
    upstream.app.enqueue(Script(deltas=["fine"]))
    async with client(upstream, max_retries=1, max_retry_wait=1) as c:
        with anyio.fail_after(5):
            got, error, _ = await collect(c, leaks)
    assert error is None and got == ["fine"]
    assert len(upstream.app.requests) - before == 2


@pytest.mark.parametrize("failure", ["error_frame_503", "error_frame_429", "cut"])
async def test_client_never_retries_after_a_delta(
    upstream: RunningUpstream, leaks: LeakScanner, failure: str
) -> None:
    before = len(upstream.app.requests)
    for _ in range(TRIALS):
        if failure == "cut":
            script = Script(deltas=["partial"], end="cut")
        else:
            code = "rate_limit_exceeded" if failure.endswith("429") else "service_unavailable"
            frame = {"error": {"message": "later", "code": code}}
            script = Script(deltas=["partial"], error_frame=frame, end="close", finish_reason=None)
        upstream.app.enqueue(script, Script(deltas=["a retry would show this"]))
        async with client(upstream, max_retries=3, max_retry_wait=0.01) as c:
            with anyio.fail_after(5):
                got, error, _ = await collect(c, leaks)
        assert got == ["partial"], got
        expected = {
            "cut": ts.TruncatedStreamError,
            "error_frame_429": ts.RateLimitError,
            "error_frame_503": ts.ServerError,
        }[failure]
        assert isinstance(error, expected), error
        assert upstream.app.pending_scripts == 1  # the second script was never requested
        upstream.app._scripts.clear()
    assert len(upstream.app.requests) - before == TRIALS
