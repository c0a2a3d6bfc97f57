from __future__ import annotations

import gc
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenhub_stream import ProtocolError, ServerSentEvent, SSEDecoder


def decode(*chunks: bytes, **kwargs: object) -> list[ServerSentEvent]:
    decoder = SSEDecoder(**kwargs)  # type: ignore[arg-type]
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def datas(*chunks: bytes, **kwargs: object) -> list[str]:
    return [e.data for e in decode(*chunks, **kwargs)]


def test_sse_basic_frames() -> None:
    assert datas(b'data: {"a":1}\n\ndata: [DONE]\n\n') == ['{"a":1}', "[DONE]"]


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
def test_sse_line_endings(eol: bytes) -> None:
    body = b"data: one" + eol + eol + b"data: two" + eol + b"data: more" + eol + eol
    assert datas(body) == ["one", "two\nmore"]


def test_sse_mixed_line_endings() -> None:
    assert datas(b"data: a\r\n\ndata: b\r\rdata: c\n\r\n") == ["a", "b", "c"]


def test_sse_crlf_split_across_chunks_is_one_line_end() -> None:
    # "\r" then "\n" in the next chunk must not produce an extra blank line (which
    # would dispatch the multi-line event early).
    assert datas(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == ["a\nb"]


def test_sse_bom_ignored_even_when_split() -> None:
    body = b"\xef\xbb\xbfdata: first\n\ndata: second\n\n"
    assert datas(body) == ["first", "second"]
    assert datas(body[:1], body[1:2], body[2:]) == ["first", "second"]
    assert datas(b"", body) == ["first", "second"]


def test_sse_only_first_bom_is_stripped() -> None:
    assert datas(b"\xef\xbb\xbfdata: x\n\n\xef\xbb\xbfdata: y\n\n") == ["x"]


def test_sse_one_leading_space_stripped() -> None:
    assert datas(b"data:a\n\ndata:  b\n\ndata\n\n") == ["a", " b", ""]


def test_sse_fields_event_id_retry_and_unknown() -> None:
    events = decode(b"event: error\nid: 7\nretry: 1500\nfoo: bar\ndata: x\n\ndata: y\n\n")
    assert events[0] == ServerSentEvent("x", "error", "7", 1500)
    # the last event id persists; the event type resets after each dispatch
    assert events[1] == ServerSentEvent("y", "message", "7", 1500)
    assert decode(b"retry: soon\nid: a\x00b\ndata: z\n\n")[0] == ServerSentEvent("z")


def test_sse_comments_are_dropped() -> None:
    body = b": keep-alive\n\n: OPENROUTER PROCESSING\n\ndata: x\n: mid\ndata: y\n\n"
    assert datas(body) == ["x\ny"]


def test_sse_dispatch_only_at_blank_line_and_eof_discards() -> None:
    assert datas(b"data: complete\n\ndata: incomplete\n") == ["complete"]
    assert datas(b"data: no newline at all") == []
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n") == []
    assert decoder.has_pending
    assert decoder.feed(b"\n") == [ServerSentEvent("x")]
    assert not decoder.has_pending


def test_sse_blank_lines_without_data_dispatch_nothing() -> None:
    assert datas(b"\n\n\nevent: x\n\n\n") == []


def test_sse_invalid_utf8_replaced_or_strict() -> None:
    assert datas(b"data: a\xffb\n\n") == ["a\ufffdb"]
    with pytest.raises(ProtocolError):
        datas(b"data: a\xffb\n\n", strict=True)


def test_sse_multibyte_utf8_split_across_chunks() -> None:
    body = "data: héllo wörld 🎉 日本\n\n".encode()
    for cut in range(len(body) + 1):
        assert datas(body[:cut], body[cut:]) == ["héllo wörld 🎉 日本"], cut


def test_sse_every_split_offset_gives_same_events() -> None:
    body = b"\xef\xbb\xbfdata: a\r\n\r\n: ping\r\nevent: e\rdata: b\rdata: c\r\r\ndata: [DONE]\n\n"
    expected = decode(body)
    assert [e.data for e in expected] == ["a", "b\nc", "[DONE]"]
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            assert decode(body[:i], body[i:j], body[j:]) == expected, (i, j)


def test_sse_event_over_max_event_bytes_raises() -> None:
    with pytest.raises(ProtocolError, match="max_event_bytes"):
        datas(b"data: " + b"x" * 2000 + b"\n\n", max_event_bytes=1000)
    # split over many lines of one event
    with pytest.raises(ProtocolError, match="max_event_bytes"):
        datas(b"data: xxxxxxxxxx\n" * 200 + b"\n", max_event_bytes=1000)
    # an event just under the limit passes
    assert len(datas(b"data: " + b"x" * 900 + b"\n\n", max_event_bytes=1000)[0]) == 900


def test_sse_never_ending_line_is_bounded() -> None:
    decoder = SSEDecoder(max_event_bytes=10_000)
    with pytest.raises(ProtocolError, match="max_event_bytes"):
        for _ in range(100):
            decoder.feed(b"y" * 1000)


def test_sse_many_keepalive_comments_keep_no_state() -> None:
    decoder = SSEDecoder(max_event_bytes=1000)
    for _ in range(10_000):
        assert decoder.feed(b": keep-alive\n\n") == []
    assert not decoder.has_pending


def test_sse_bad_max_event_bytes() -> None:
    with pytest.raises(ValueError):
        SSEDecoder(max_event_bytes=0)


def test_sse_event_repr() -> None:
    assert repr(ServerSentEvent("x")) == "ServerSentEvent(data='x')"
    assert "event='e'" in repr(ServerSentEvent("x", "e", "1", 5))
    assert ServerSentEvent("x") != "x"


def _decode_cpu_time(size: int) -> float:
    """CPU seconds this thread spends decoding one `size`-byte event fed in 1 KiB pieces."""
    body = b"data: " + b"z" * size + b"\n\n"
    pieces = [body[i : i + 1024] for i in range(0, len(body), 1024)]
    decoder = SSEDecoder(max_event_bytes=64 * 1024 * 1024)
    # The thread's CPU clock, not the wall clock: time spent waiting for a core while other
    # test workers run is not counted. No collection mid-run either.
    gc.disable()
    try:
        start = time.thread_time()
        for piece in pieces:
            events = decoder.feed(piece)
        elapsed = time.thread_time() - start
    finally:
        gc.enable()
    assert len(events[0].data) == size
    return elapsed


def test_sse_large_event_decodes_in_linear_time() -> None:
    # 1 MiB and 8 MiB events fed in 1 KiB pieces (as a socket delivers them). Linear
    # decoding takes ~8x as long for 8x the bytes; a decoder that re-scans or re-joins
    # its buffer per piece takes ~64x. The bound sits far from both. The best of five
    # interleaved runs of each: a run slowed by a busy machine affects one sample, not the
    # ratio.
    small = large = float("inf")
    for _ in range(5):
        small = min(small, _decode_cpu_time(1 << 20))
        large = min(large, _decode_cpu_time(8 << 20))
    assert large / small < 24, (small, large)


frames = st.lists(
    st.one_of(
        st.text(max_size=20).map(lambda t: "data: " + t.replace("\r", "").replace("\n", "")),
        st.sampled_from([": keep-alive", "event: x", "id: 3", "retry: 10", "data", ""]),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(
    lines=frames,
    eol=st.sampled_from(["\n", "\r", "\r\n"]),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_sse_any_chunking_yields_same_events(
    lines: list[str], eol: str, bom: bool, cuts: list[int]
) -> None:
    body = (b"\xef\xbb\xbf" if bom else b"") + (eol.join(lines) + eol + eol).encode()
    whole = decode(body)
    # Repeated cut points make empty chunks: a transport can hand those over too, and
    # one between a CR and its LF must not split the CRLF (issue #15).
    points = sorted(min(c, len(body)) for c in cuts)
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert decode(*pieces) == whole
    assert decode(*[body[i : i + 1] for i in range(len(body))]) == whole
    assert decode(*[piece for i in range(len(body)) for piece in (b"", body[i : i + 1])]) == whole
