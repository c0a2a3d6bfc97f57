"""The frame layer under fuzzing and memory pressure (sans-I/O, no sockets).

`SSEDecoder`, `ChunkParser` and the proxy's `EventSplitter` get arbitrary, SSE-shaped
byte streams cut at arbitrary points. Properties:

- nothing escapes but the library's own `ProtocolError` (the decoder) or nothing at all
  (the parser stores its error; the splitter never fails);
- the result does not depend on where the network cut the bytes;
- deltas decoded before a bad frame are handed out, whatever the chunking;
- the splitter is lossless: what it returns plus what it holds is what it was fed.

Memory is measured with tracemalloc: 1 million keep-alive comments, a never-ending line
and a frame over `max_event_bytes` keep the decoder under `max_event_bytes` plus a
small constant.
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenhub_stream import ContentDelta, ProtocolError, SSEDecoder, TokenHubError
from tokenhub_stream._chunks import ChunkParser
from tokenhub_stream._config import DEFAULT_MAX_EVENT_BYTES
from tokenhub_stream.asgi._wire import EventSplitter

from .conftest import EXAMPLES, figure

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 1000,  # the short form is reproducible in CI
)

# --- strategies --------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=12)


def _frame(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _content(text: str) -> bytes:
    return _frame({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


def _delta(delta: dict[str, object]) -> bytes:
    return _frame({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


_good_frames = st.one_of(
    _text.map(_content),
    st.just(_frame({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})),
    st.just(_frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
    st.just(_frame({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})),
    st.just(_frame({"choices": [], "prompt_filter_results": []})),  # Azure
    _text.map(lambda t: _frame({"choices": [{"index": 0, "delta": {"reasoning_content": t}}]})),
    # Mistral's content parts, and events with empty data (issue #15)
    _text.map(lambda t: _delta({"content": [{"type": "text", "text": t}]})),
    _text.map(lambda t: _delta({"content": [{"type": "thinking", "thinking": [{"text": t}]}]})),
    st.sampled_from([b"data:\n\n", b"data\n\n", b"data: \r\n\r\n"]),
    st.just(b": keep-alive\n\n"),
    st.just(b": OPENROUTER PROCESSING\n\n"),
    st.just(b'event: ping\ndata: {"choices":[]}\n\n'),
    st.just(b"id: 7\nretry: 100\n\n"),
)

_bad_frames = st.one_of(
    st.just(b"data: [DONE]\n\n"),
    st.just(b"data: {not json\n\n"),
    st.just(b"data: [1, 2]\n\n"),
    st.just(b'data: {"choices": 5}\n\n'),
    st.just(b'data: {"choices": [{"delta": {"content": 5}}]}\n\n'),
    st.just(b'data: {"error": {"message": "boom", "code": "server_error"}}\n\n'),
    st.just(b'data: {"object": "error", "message": "vllm says no"}\n\n'),
    st.just(b'data: {"choices": [{"delta": {"content": "\xff\xfe"}}]}\n\n'),  # invalid UTF-8
    st.just(b"data: " + b"[" * 5000 + b"\n\n"),  # deeply nested
)

_noise = st.one_of(
    st.binary(max_size=16),
    st.sampled_from(
        [b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf", b"data:", b"data: ", b":", b"\xc3", b"\xe2\x82"]
    ),
)

# Well-formed streams (each event whole), possibly with one bad frame in them.
_streams = st.lists(st.one_of(_good_frames, _good_frames, _bad_frames), max_size=12)
# Anything at all, biased towards SSE syntax.
_soup = st.lists(st.one_of(_good_frames, _bad_frames, _noise), max_size=16).map(b"".join)


@st.composite
def _cuts(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """`body` cut into network chunks at arbitrary offsets, empty chunks included (a
    repeated offset): a transport may hand those over too (issue #15)."""
    if not body:
        return [body]
    points = sorted(draw(st.lists(st.integers(0, len(body)), max_size=8)))
    pieces, last = [], 0
    for p in [*points, len(body)]:
        pieces.append(body[last:p])
        last = p
    return pieces


def _split(frames: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    return _cuts(b"".join(frames))


# --- SSEDecoder ----------------------------------------------------------------------------


def _decode(chunks: list[bytes], **kw: object) -> tuple[list[tuple[str, str]], str | None]:
    decoder = SSEDecoder(**kw)  # type: ignore[arg-type]
    out: list[tuple[str, str]] = []
    try:
        for chunk in chunks:
            out.extend((e.event, e.data) for e in decoder.feed(chunk))
        decoder.flush()
    except ProtocolError as exc:  # the only exception allowed
        return out, type(exc).__name__
    return out, None


@FUZZ
@given(st.data(), _soup, st.booleans())
def test_fuzz_sse_decoder_raises_only_protocol_error_and_ignores_chunking(
    data: st.DataObject, body: bytes, strict: bool
) -> None:
    whole = _decode([body], strict=strict)
    split = _decode(data.draw(_cuts(body)), strict=strict)
    assert split == whole


@FUZZ
@given(st.data(), _soup, st.integers(1, 200))
def test_fuzz_sse_decoder_small_max_event_bytes(
    data: st.DataObject, body: bytes, limit: int
) -> None:
    # With a small limit the decoder may refuse the stream, but only with ProtocolError.
    _decode(data.draw(_cuts(body)), max_event_bytes=limit)


# --- ChunkParser ----------------------------------------------------------------------------


def _parse_text(chunks: list[bytes], strict: bool) -> tuple[list[str], str | None]:
    parser = ChunkParser(strict=strict)
    out: list[str] = []
    for chunk in chunks:
        out.extend(parser.feed_text(chunk))
        if parser.stopped:
            break
    else:
        parser.feed_eof()
    error = parser.error
    assert error is None or isinstance(error, TokenHubError)
    return out, None if error is None else type(error).__name__


def _parse_events(chunks: list[bytes], strict: bool) -> tuple[list[str], str | None]:
    parser = ChunkParser(strict=strict)
    out: list[str] = []
    for chunk in chunks:
        out.extend(e.text for e in parser.feed_events(chunk) if isinstance(e, ContentDelta))
        if parser.stopped:
            break
    else:
        parser.feed_eof()
    error = parser.error
    assert error is None or isinstance(error, TokenHubError)
    return out, None if error is None else type(error).__name__


@FUZZ
@given(st.data(), _streams, st.booleans())
def test_fuzz_chunk_parser_deltas_before_a_bad_frame_survive_any_chunking(
    data: st.DataObject, frames: list[bytes], strict: bool
) -> None:
    # One event per network chunk is how real upstreams write: every delta before a bad
    # frame is certainly decodable there. Coalesced or cut chunks must give the same.
    reference = _parse_text(frames, strict)
    assert _parse_text([b"".join(frames)], strict) == reference
    assert _parse_text(data.draw(_split(frames)), strict) == reference
    assert _parse_events(data.draw(_split(frames)), strict) == reference


@FUZZ
@given(st.data(), _soup, st.booleans())
def test_fuzz_chunk_parser_never_raises(data: st.DataObject, body: bytes, strict: bool) -> None:
    chunks = data.draw(_cuts(body))
    assert _parse_text(chunks, strict) == _parse_events(chunks, strict)


# --- EventSplitter (the proxy) ----------------------------------------------------------------

# Every (line end, empty line end) pair; a CR is a line end alone when no LF follows it.
_BOUNDARIES = (
    *(b"\n\n", b"\n\r", b"\n\r\n"),
    *(b"\r\r", b"\r\r\n"),
    *(b"\r\n\n", b"\r\n\r", b"\r\n\r\n"),
)


@FUZZ
@given(st.data(), _soup)
def test_fuzz_event_splitter_is_lossless_and_cuts_at_boundaries(
    data: st.DataObject, body: bytes
) -> None:
    splitter = EventSplitter()
    out: list[bytes] = []
    for chunk in data.draw(_cuts(body)):
        piece = splitter.feed(chunk)
        if piece:
            assert piece.endswith(_BOUNDARIES), piece[-8:]
        out.append(piece)
    out.append(splitter.flush())
    assert b"".join(out) == body


# --- memory: tracemalloc over the sans-I/O layer -----------------------------------------------

LIMIT = 64 * 1024  # max_event_bytes for the memory tests
CONSTANT = 256 * 1024  # "a small constant": chunk copies, lists, interpreter noise
CHUNK = 16 * 1024


def _peak_growth(run: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _comment_chunks(count: int) -> Iterator[bytes]:
    # 1,000,000 comments are 14 MB: sent as 16 KiB network chunks cut mid-line, built
    # once, so only the decoder's own memory shows.
    comment = b": keep-alive\n\n"
    blob = comment * (CHUNK // len(comment) + 1)
    cut = [blob[: CHUNK - 5], blob[CHUNK - 5 : 2 * CHUNK - 5]]
    total = len(comment) * count
    sent = 0
    i = 0
    while sent < total:
        piece = cut[i % 2]
        i += 1
        sent += len(piece)
        yield piece


def test_memory_million_keepalives_decoder_and_parser_stay_small() -> None:
    decoder = SSEDecoder(max_event_bytes=LIMIT)
    parser = ChunkParser(max_event_bytes=LIMIT)
    chunks = list(_comment_chunks(1_000_000))
    assert sum(map(len, chunks)) >= 14_000_000

    def run() -> None:
        for chunk in chunks:
            assert not decoder.feed(chunk)
            assert not parser.feed_text(chunk)

    growth = _peak_growth(run)
    figure("frame layer: traced peak growth over 1M keep-alives (bytes)", growth)
    assert growth < LIMIT + CONSTANT, growth
    assert parser.error is None and not decoder.has_pending


@pytest.mark.parametrize("where", ["decoder", "parser"])
def test_memory_never_ending_line_is_refused_within_the_limit(where: str) -> None:
    chunk = b"x" * CHUNK
    fed = 0
    error: Exception | None = None

    def run() -> None:
        nonlocal fed, error
        decoder = SSEDecoder(max_event_bytes=LIMIT)
        parser = ChunkParser(max_event_bytes=LIMIT)
        head = b"data: "
        for _ in range(1024):  # 16 MiB at most; the error must come long before
            fed += CHUNK
            if where == "decoder":
                try:
                    decoder.feed(head + chunk if fed == CHUNK else chunk)
                except ProtocolError as exc:
                    error = exc
                    return
            else:
                parser.feed_text(head + chunk if fed == CHUNK else chunk)
                if parser.stopped:
                    error = parser.error
                    return

    growth = _peak_growth(run)
    figure(f"frame layer ({where}): never-ending line, bytes fed before the error", fed)
    figure(f"frame layer ({where}): never-ending line, traced peak growth (bytes)", growth)
    assert isinstance(error, ProtocolError) and "max_event_bytes" in str(error)
    assert fed <= LIMIT + CHUNK
    assert growth < LIMIT + CONSTANT, growth


@pytest.mark.parametrize("pieces", [1, 7, 64])
def test_memory_one_frame_over_max_event_bytes(pieces: int) -> None:
    content = "y" * (4 * LIMIT)
    frame = _content(content)
    step = -(-len(frame) // pieces)
    chunks = [frame[i : i + step] for i in range(0, len(frame), step)]
    parser = ChunkParser(max_event_bytes=LIMIT)
    before = _content("before")

    def run() -> None:
        parser.feed_text(before)
        for chunk in chunks:
            parser.feed_text(chunk)
            if parser.stopped:
                return

    growth = _peak_growth(run)
    figure(f"frame layer: one frame over the limit in {pieces} piece(s), growth (bytes)", growth)
    assert isinstance(parser.error, ProtocolError)
    assert parser.message().content == "before"
    # Beyond the frame itself (already in memory when it arrives as one chunk):
    assert growth < LIMIT + CONSTANT + (len(frame) if pieces == 1 else 0), growth


def test_event_splitter_million_keepalives_forwarded_not_held() -> None:
    splitter = EventSplitter()
    chunks = list(_comment_chunks(1_000_000))
    held = 0

    def run() -> None:
        nonlocal held
        for chunk in chunks:
            splitter.feed(chunk)
            held = max(held, len(splitter.pending))

    growth = _peak_growth(run)
    figure("proxy splitter: bytes held over 1M keep-alives", held)
    figure("proxy splitter: traced peak growth over 1M keep-alives (bytes)", growth)
    assert held < CHUNK and growth < CONSTANT, (held, growth)


def test_event_splitter_never_ending_line_is_bounded() -> None:
    # The client refuses an event over max_event_bytes (16 MiB by default); the proxy's
    # splitter should hold no more than that either (or refuse: either fix passes).
    splitter = EventSplitter()
    chunk = b"z" * (1 << 20)
    splitter.feed(b"data: ")
    held = 0
    for _ in range(DEFAULT_MAX_EVENT_BYTES // len(chunk) + 4):  # 20 MiB without a line end
        try:
            splitter.feed(chunk)
        except TokenHubError:
            break
        held = max(held, len(splitter.pending))
    figure("proxy splitter: never-ending line, most bytes held", held)
    assert held <= DEFAULT_MAX_EVENT_BYTES, held


def test_event_splitter_large_single_event_is_linear() -> None:
    def cost(size: int) -> float:
        splitter = EventSplitter()
        chunk = b"q" * 4096
        # This thread's CPU clock, not the wall clock: time spent waiting for a core while
        # other test workers run is not counted. No collection mid-run either.
        gc.disable()
        try:
            start = time.thread_time()
            splitter.feed(b"data: ")
            for _ in range(size // 4096):
                splitter.feed(chunk)
            assert splitter.feed(b"\n\n").endswith(b"\n\n")
            return time.thread_time() - start
        finally:
            gc.enable()

    # The best of five interleaved runs of each: a slowed run affects one sample only.
    small = large = float("inf")
    for _ in range(5):
        small, large = min(small, cost(1 << 20)), min(large, cost(8 << 20))
    # Linear: 8x the bytes cost about 8x the time; quadratic about 64x.
    assert large < 20 * max(small, 1e-3), (small, large)


# --- regressions found by the fuzzing above ----------------------------------------------------


def test_issue_6_events_before_a_bad_line_in_the_same_chunk_are_returned() -> None:
    # Found by test_fuzz_sse_decoder_...: one network chunk holding a good event and then
    # an invalid one lost the good event (the error was raised before it was returned).
    decoder = SSEDecoder(strict=True)
    assert [e.data for e in decoder.feed(b"data: good\n\ndata: \xff\n\n")] == ["good"]
    with pytest.raises(ProtocolError, match="UTF-8"):
        decoder.feed(b"data: more\n\n")
    with pytest.raises(ProtocolError, match="UTF-8"):
        decoder.flush()
    decoder = SSEDecoder(max_event_bytes=8)
    assert [e.data for e in decoder.feed(b"data: ok\n\ndata: 123456789")] == ["ok"]
    with pytest.raises(ProtocolError, match="max_event_bytes"):
        decoder.feed(b"\n\n")


@pytest.mark.parametrize("events", [False, True])
def test_issue_6_parser_delivers_deltas_before_a_bad_frame_in_the_same_chunk(events: bool) -> None:
    parser = ChunkParser(strict=True)
    chunk = _content("kept") + b'data: {"choices":[{"delta":{"content":"\xff"}}]}\n\n'
    if events:
        out = [e.text for e in parser.feed_events(chunk) if isinstance(e, ContentDelta)]
    else:
        out = parser.feed_text(chunk)
    assert out == ["kept"]
    assert parser.stopped and isinstance(parser.error, ProtocolError)
    parser.feed_eof()  # never raises
    assert parser.message().content == "kept"


def test_issue_6_cr_then_crlf_ends_an_event_for_the_splitter_and_the_decoder() -> None:
    # Found by benchmarks/soak/fuzz_atheris.py: "\r" ends a line and "\r\n" the empty line
    # after it. The splitter cut there correctly; the fuzz checks' list of event endings
    # lacked it.
    assert EventSplitter().feed(b"data: x\r\r\ndata: y") == b"data: x\r\r\n"
    assert [e.data for e in SSEDecoder().feed(b"data: x\r\r\n")] == ["x"]
    assert b"data: x\r\r\n".endswith(_BOUNDARIES)
