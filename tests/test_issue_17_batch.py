"""Issue #17: `ChunkParser.feed_text_batch`, the template fast path over all the chunks of
one network read in one call.

Every test compares it with `feed_text` fed chunk by chunk (the reference, unchanged):
the same deltas, message, finish reason, usage, error (class and text), timings and
counts, for the benchmark's stream, the recorded shapes, escapes, bad bytes, error frames,
`[DONE]` and oversized events mid-read, and generated streams cut and grouped at random.
The clock stands still within a read, as a read's chunks arrive together: the batch path
reads it once per run where `feed_text` reads it per chunk.

A consumer that stops part-way through a run (a `break` after a delta) sees the message
it would have had chunk by chunk: the run's other deltas are never counted.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenhub_stream as ts
from test_issue_15_content_parts import RECORDED
from test_issue_17_engine import SSE_HEADERS, chunked, raw_server
from tokenhub_stream import ChunkParser, ProtocolError

DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
MESSAGES = [{"role": "user", "content": "hi"}]
Batches = list[list[bytes]]


def bench_chunk(delta: dict[str, object], finish: str | None = None, **extra: Any) -> bytes:
    # The shape of benchmarks/sse_server.py's chunks (and OpenAI's): compact, ids repeated.
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        **extra,
    }
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8", "surrogatepass") + b"\n\n"


def plain(content: object, **extra: Any) -> bytes:
    return bench_chunk({"content": content}, **extra)


def bench_stream(n: int) -> list[bytes]:
    tokens = [" naïve" if i % 100 == 99 else f" word{i % 1000}" for i in range(n)]
    role = bench_chunk({"role": "assistant", "content": ""})
    return [role, *(plain(t) for t in tokens), bench_chunk({}, "stop"), DONE]


def groups(chunks: list[bytes], size: int) -> Batches:
    return [chunks[i : i + size] for i in range(0, len(chunks), size)]


class Clock:
    """Stands still within a read: the test moves it on between reads."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def per_chunk(batches: Batches, **kw: Any) -> tuple[list[str], ChunkParser]:
    """The reference: `feed_text` chunk by chunk, as the consumer did before."""
    clock = Clock()
    parser = ChunkParser(clock=clock, **kw)
    out: list[str] = []
    for n, batch in enumerate(batches):
        clock.now = 1001.0 + n
        for chunk in batch:
            out.extend(parser.feed_text(chunk))
            if parser.stopped:
                break
        if parser.stopped:
            break
    else:
        clock.now += 0.5
        parser.feed_eof()
    return out, parser


def batched(batches: Batches, **kw: Any) -> tuple[list[str], ChunkParser, int]:
    """`feed_text_batch` over each read, run after run; also returns the number of runs."""
    clock = Clock()
    parser = ChunkParser(clock=clock, **kw)
    out: list[str] = []
    runs = 0
    for n, batch in enumerate(batches):
        clock.now = 1001.0 + n
        end = 0
        while end < len(batch) and not parser.stopped:
            deltas, end = parser.feed_text_batch(batch, end)
            runs += 1
            out.extend(deltas)
        if parser.stopped:
            break
    else:
        clock.now += 0.5
        parser.feed_eof()
    return out, parser, runs


def state(parser: ChunkParser) -> dict[str, object]:
    error = parser.error
    return {
        "message": parser.message(),
        "usage": parser.usage,
        "finish_reason": parser.finish_reason,
        "done": parser.done,
        "stopped": parser.stopped,
        "error": None if error is None else (type(error), str(error)),
        "first_token_at": parser.first_token_at,
        "last_event_at": parser.last_event_at,
        "ended_at": parser.ended_at,
        "delta_count": parser.delta_count,
        "delivered": parser.delivered,
        "ids": (parser.response_id, parser.response_model, parser.role),
    }


def same(batches: Batches, **kw: Any) -> tuple[list[str], ChunkParser, int]:
    out, parser, runs = batched(batches, **kw)
    ref_out, ref = per_chunk(batches, **kw)
    assert out == ref_out
    assert state(parser) == state(ref)
    return out, parser, runs


@pytest.fixture(params=["orjson", "stdlib"])
def json_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from tokenhub_stream import _chunks

    backend: str = request.param
    if backend == "stdlib":
        monkeypatch.setattr(_chunks, "_loads_event", _chunks._stdlib_loads_event)
        monkeypatch.setattr(_chunks, "loads", json.loads)
        monkeypatch.setattr(_chunks, "_TEMPLATE_U_ESCAPES", True)
    else:
        pytest.importorskip("orjson")
    return backend


# --- the same result as chunk by chunk ---------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
def test_issue_17_batch_benchmark_stream(size: int, json_backend: str) -> None:
    chunks = bench_stream(500)
    out, parser, runs = same(groups(chunks, size))
    assert "".join(out) == parser.message().content and len(out) == 500
    assert parser.finish_reason == "stop" and parser.done and parser.error is None
    if size >= 64:  # the content chunks of a read are taken a run at a time
        assert runs <= 4 + 2 * len(chunks) // size


def test_issue_17_batch_one_clock_reading_per_run() -> None:
    reads = 0

    def clock() -> float:
        nonlocal reads
        reads += 1
        return float(reads)

    parser = ChunkParser(clock=clock)
    chunks = bench_stream(200)
    for chunk in chunks[:3]:
        parser.feed_text(chunk)  # the role, then the template is learnt
    before = reads
    deltas, end = parser.feed_text_batch(chunks, 3)
    assert end == len(chunks) - 2  # stops before the finish chunk
    assert len(list(deltas)) == end - 3
    assert reads == before + 1
    assert parser.last_event_at == parser.clock() - 1


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_issue_17_batch_recorded_shapes_cut_at_random(data: st.DataObject) -> None:
    stream = data.draw(st.sampled_from(RECORDED))
    body = b"".join(stream.chunks)
    whole = data.draw(st.booleans())
    if whole:  # one event per chunk, as recorded
        chunks = list(stream.chunks)
    else:
        points = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=10)))
        chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=len(chunks), max_size=len(chunks)))
    batches: Batches = []
    while chunks:
        size = sizes.pop()
        batches.append(chunks[:size])
        chunks = chunks[size:]
    out, parser, _ = same(batches)
    assert out == stream.texts
    assert parser.message().content == stream.content


def test_issue_17_batch_template_then_another_shape(json_backend: str) -> None:
    others = [
        plain("x", usage=USAGE),
        plain(None),
        bench_chunk({"content": "x", "reasoning_content": "r"}),
        bench_chunk({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f"}}]}),
        plain("x", created=1700000001),  # a new template from here
        plain("x") + b": keep-alive\n",
        plain("x").replace(b"\n\n", b"\r\n\r\n"),
        plain("x")[:-1],  # an unfinished event: the next chunk continues it
        plain("x") + plain("y"),
        bench_chunk({"content": [{"type": "text", "text": "p"}]}),
    ]
    for other in others:
        chunks = [plain("a"), plain("b"), plain("c"), other, plain("d"), plain("e")]
        chunks += [bench_chunk({}, "stop", usage=USAGE), DONE]
        _, parser, runs = same([chunks])
        assert runs >= 3, other  # the run ended before `other`, which began the next one


@pytest.mark.parametrize(
    "content",
    ['say "hi"', "caf\u00e9 \\u00e9", "line\nbreak\ttab", "back\\slash\\", "\U0001f600", ""],
)
def test_issue_17_batch_escapes_in_content(content: str, json_backend: str) -> None:
    for ascii_only in (False, True):
        chunks = [plain("a"), plain("b"), plain(content), plain("c")]
        if ascii_only:  # \uXXXX escapes for everything that is not ASCII
            chunks = [
                b"data: " + json.dumps(json.loads(c[6:]), separators=(",", ":")).encode() + b"\n\n"
                for c in chunks
            ]
        out, _, _ = same([[*chunks, bench_chunk({}, "stop")]])
        assert out == ["a", "b", content, "c"] if content else ["a", "b", "c"]


@pytest.mark.parametrize("middle", [b"x\x01y", b"x\ny", b"x\\qy", b"x\xffy", b"x\\ud800y"])
def test_issue_17_batch_odd_bytes_in_content(middle: bytes, json_backend: str) -> None:
    odd = plain("a").replace(b'"content":"a"', b'"content":"' + middle + b'"')
    out, parser, _ = same([[plain("a"), plain("b"), odd, plain("c"), bench_chunk({}, "stop")]])
    if middle == b"x\x01y":  # a raw control character: invalid JSON, as chunk by chunk
        assert out == ["a", "b"] and isinstance(parser.error, ProtocolError)


def test_issue_17_batch_error_frame_mid_read(json_backend: str) -> None:
    error = b'data: {"error":{"message":"overloaded","type":"server_error","code":529}}\n\n'
    out, parser, _ = same([[plain("a"), plain("b"), error, plain("c"), DONE]])
    assert out == ["a", "b"]
    assert isinstance(parser.error, ts.APIError) and "overloaded" in str(parser.error)
    assert parser.message().content == "ab"  # nothing after the error frame is parsed


def test_issue_17_batch_done_mid_read(json_backend: str) -> None:
    out, parser, _ = same([[plain("a"), plain("b"), DONE, plain("c"), plain("d")]])
    assert out == ["a", "b"] and parser.done and parser.message().content == "ab"


def test_issue_17_batch_oversized_event(json_backend: str) -> None:
    limit = len(plain("ab")) - 8
    chunks = [plain("a"), plain("b"), plain("ab"), plain("c"), plain("abc"), plain("d")]
    out, parser, _ = same([chunks], max_event_bytes=limit)
    assert out == ["a", "b", "ab", "c"] and isinstance(parser.error, ProtocolError)


def test_issue_17_batch_empty_content_deltas(json_backend: str) -> None:
    # the template is learnt from an empty delta: the first token comes from a run
    chunks = [bench_chunk({"role": "assistant"}), plain(""), plain("a"), plain("b"), plain("")]
    chunks += [plain(""), plain("c"), plain("")]
    out, parser, _ = same([chunks, [plain(""), plain(""), plain(""), plain("")]])
    assert out == ["a", "b", "c"] and parser.delta_count == 3
    assert parser.first_token_at == 1001.0
    # a read of empty deltas only still counts as progress (the idle watch)
    assert parser.last_event_at == 1002.0
    assert isinstance(parser.error, ts.TruncatedStreamError)


# --- generated streams --------------------------------------------------------------------

_contents = st.one_of(
    st.text(max_size=8),
    st.sampled_from(['"', "\\", "\n", "\\u0041", "\ud800", "\U0001f600", "", "é"]),
)
_others = st.sampled_from(
    [
        bench_chunk({"role": "assistant", "content": ""}),
        bench_chunk({"reasoning_content": "hm"}),
        bench_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        bench_chunk({}, "stop", usage=USAGE),
        plain("u", usage=USAGE),
        b": keep-alive\n\n",
        b"data:\n\n",
        plain("a").replace(b'"a"', b'"a\x01"'),
        plain("a").replace(b'"a"', b'"a\xff"'),
        plain("crlf").replace(b"\n\n", b"\r\n\r\n"),
        b'data: {"error":{"message":"boom","code":500}}\n\n',
        b"data: {not json}\n\n",
        DONE,
    ]
)
# Mostly plain content chunks (runs of template hits), now and then something else.
_chunk_kinds: st.SearchStrategy[bytes] = st.one_of(
    _contents.map(plain),
    _contents.map(plain),
    _contents.map(plain),
    _contents.map(plain),
    _contents.map(lambda c: plain(c, created=1700000001)),
    _contents.map(
        lambda c: b"data: " + json.dumps(json.loads(plain(c)[6:])).encode() + b"\n\n"
    ),  # another layout, and every non-ASCII character escaped
    _others,
)


@st.composite
def _reads(draw: st.DrawFn) -> Batches:
    events = draw(st.lists(_chunk_kinds, max_size=30))
    if draw(st.integers(0, 3)) == 0:  # cut anywhere, not at event boundaries
        body = b"".join(events)
        points = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
        events = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    batches: Batches = []
    while events:
        size = draw(st.integers(1, 12))
        batches.append(events[:size])
        events = events[size:]
    return batches


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=_reads(), limit=st.sampled_from([None, 160, 200]))
def test_issue_17_batch_matches_chunk_by_chunk_on_generated_streams(
    json_backend: str, batches: Batches, limit: int | None
) -> None:
    kw = {} if limit is None else {"max_event_bytes": limit}
    same(batches, **kw)


# --- a consumer that stops part-way through a run -----------------------------------------


def stop_after_batched(batches: Batches, count: int) -> tuple[list[str], ChunkParser]:
    """Take `count` deltas from the runs, then stop (the iterator is left unfinished)."""
    clock = Clock()
    parser = ChunkParser(clock=clock)
    taken: list[str] = []
    for n, batch in enumerate(batches):
        clock.now = 1001.0 + n
        end = 0
        while end < len(batch) and not parser.stopped:
            deltas, end = parser.feed_text_batch(batch, end)
            for delta in deltas:
                taken.append(delta)
                if len(taken) == count:
                    return taken, parser
        if parser.stopped:
            break
    return taken, parser


def stop_after_per_chunk(batches: Batches, count: int) -> tuple[list[str], ChunkParser]:
    clock = Clock()
    parser = ChunkParser(clock=clock)
    taken: list[str] = []
    for n, batch in enumerate(batches):
        clock.now = 1001.0 + n
        for chunk in batch:
            for delta in parser.feed_text(chunk):
                taken.append(delta)
                if len(taken) == count:
                    return taken, parser
            if parser.stopped:
                return taken, parser
    return taken, parser


@settings(max_examples=200, deadline=None)
@given(batches=_reads(), data=st.data())
def test_issue_17_batch_consumer_stopping_mid_run_sees_what_it_took(
    batches: Batches, data: st.DataObject
) -> None:
    total = len(batched(batches)[0])
    count = data.draw(st.integers(1, max(total, 1)))
    taken, parser = stop_after_batched(batches, count)
    ref_taken, ref = stop_after_per_chunk(batches, count)
    assert taken == ref_taken
    assert state(parser) == state(ref)


def test_issue_17_batch_stop_mid_run_then_feed_again() -> None:
    chunks = bench_stream(20)
    parser = ChunkParser()
    deltas, end = parser.feed_text_batch(chunks, 0)  # the role chunk
    assert list(deltas) == [] and end == 1
    deltas, end = parser.feed_text_batch(chunks, end)  # learns the template, then a run
    first = [next(deltas), next(deltas)]
    assert parser.message().content == "".join(first) and parser.delivered == 2
    assert parser.delta_count == 2
    # fed again: the deltas never taken are gone for good
    rest, end = parser.feed_text_batch([plain("!"), plain("?")], 0)
    assert list(rest) == ["!", "?"]
    assert parser.message().content == "".join(first) + "!?" and parser.delta_count == 4


# --- the client's text consumer -------------------------------------------------------------


def _answer(parts: list[bytes]) -> Callable[[bytes, bytes], bytes]:
    body = chunked(b"200 OK", SSE_HEADERS, parts)  # one write: one read, most likely
    return lambda head, _body: body


@contextlib.contextmanager
def _counting_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    calls: list[int] = []
    original = ChunkParser.feed_text_batch

    def counted(self: ChunkParser, chunks: list[bytes], start: int = 0) -> Any:
        calls.append(len(chunks))
        return original(self, chunks, start)

    monkeypatch.setattr(ChunkParser, "feed_text_batch", counted)
    yield calls


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_issue_17_batch_client_break_after_the_first_delta(
    sync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TOKENHUB_STREAM_ENGINE", raising=False)
    chunks = bench_stream(300)
    with raw_server(_answer(chunks)) as server, _counting_runs(monkeypatch) as runs:
        if sync:
            with ts.Client(base_url=server.url, api_key="k", max_retries=0) as client:
                with client.stream_chat(MESSAGES) as stream:
                    first = next(iter(stream))
                    message = stream.message
                outcome = stream.outcome
        else:

            async def main() -> tuple[str, ts.ChatMessage, ts.Outcome | None]:
                with anyio.fail_after(10):
                    async with ts.AsyncClient(base_url=server.url, api_key="k") as client:
                        async with client.stream_chat(MESSAGES, max_retries=0) as stream:
                            first = await stream.__anext__()
                            message = stream.message
                        return first, message, stream.outcome

            first, message, outcome = anyio.run(main)
    assert first == " word0"
    # only what was handed out: no finish reason, no text of the chunks not taken
    assert message.content == " word0" and message.finish_reason is None
    assert outcome is not None and outcome.kind == "cancelled"
    assert runs and min(runs) >= 4  # reads of several chunks: the batch path was taken
    # read to the end, the same stream gives the whole text
    with raw_server(_answer(chunks)) as server:
        with ts.Client(base_url=server.url, api_key="k") as client:
            with client.stream_chat(MESSAGES) as stream:
                text = "".join(stream)
            assert stream.message.content == text and len(text) > 300 * 5
