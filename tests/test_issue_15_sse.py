"""Issue #15, findings 1 and 3, and the differential check of `SSEDecoder`.

1. An empty chunk must not break a CRLF in two: the transport's chunks reach the decoder
   as they are, empty ones included.
3. An event whose data is empty or only whitespace carries no chunk: it is passed over
   like a keep-alive comment, and like one it is no progress for the timeouts.

Also: generated streams go to `SSEDecoder` and to `spec_events()` below, a plain reading
of the WHATWG "event stream interpretation" algorithm, line by line, on the whole
stream at once; both must give the same events, however the bytes are chunked.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import servers
import tokenhub_stream as ts
from tokenhub_stream import ChunkParser, ContentDelta, ServerSentEvent, SSEDecoder
from tokenhub_stream.asgi import ChatProxy, CompletionRecord
from tokenhub_stream.asgi._wire import EventSplitter
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

KEY = "sk-canary-issue-15-3b9d0c"
MESSAGES = [{"role": "user", "content": "hi"}]
DONE = b"data: [DONE]\n\n"


def content(text: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    obj = {"id": "c1", "object": "chat.completion.chunk", "choices": [choice]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def decode(chunks: list[bytes], *, fast: bool = False) -> list[ServerSentEvent] | list[str]:
    decoder = SSEDecoder()
    if fast:  # the chat parser's path: data only
        datas: list[str] = []
        for chunk in chunks:
            datas.extend(decoder.feed_data(chunk))
        decoder.flush()
        return datas
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def datas(chunks: list[bytes], *, fast: bool) -> list[str]:
    out = decode(chunks, fast=fast)
    return [e if isinstance(e, str) else e.data for e in out]


# --- finding 1: an empty chunk breaks a CRLF in two ------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["feed", "feed_data"])
@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        # the issue's two cases
        ([b"data: a\r", b"", b"\ndata: b\n\n"], ["a\nb"]),
        ([b"data\r", b"", b"\n"], []),
        # several empty chunks, and a CRLF that ends the event
        ([b"data: a\r", b"", b"", b"\n", b"\r", b"", b"\n"], ["a"]),
        ([b"data: a\r\n\r", b"", b"\ndata: b\r\n\r\n"], ["a", "b"]),
        # empty chunks around a BOM split in three
        ([b"", b"\xef", b"", b"\xbb", b"", b"\xbf", b"", b"data: x\r", b"", b"\n\r\n"], ["x"]),
        ([b"\xef\xbb", b"", b"\xbfdata: x\r", b"", b"\ndata: y\r\n\r\n"], ["x\ny"]),
        # an empty chunk before anything else leaves the BOM check undone
        ([b"", b"\xef\xbb\xbfdata: x\n\n"], ["x"]),
    ],
)
def test_issue_15_empty_chunk_keeps_a_crlf_whole(
    chunks: list[bytes], expected: list[str], fast: bool
) -> None:
    assert datas(chunks, fast=fast) == expected
    assert datas([b"".join(chunks)], fast=fast) == expected


def test_issue_15_empty_chunk_leaves_the_decoder_clean() -> None:
    # After a CR at a chunk's end and an empty chunk, the state is unchanged: the next
    # LF is still the CR's, and only then may the fast path run again.
    decoder = SSEDecoder()
    assert decoder.feed_data(b"data: a\r") == []
    assert decoder.feed_data(b"") == []
    assert decoder.feed_data(b"\n") == []
    assert decoder.feed_data(b"\n") == ["a"]
    assert decoder.feed_data(b"") == []
    assert decoder.feed_data(b"data: b\n\n") == ["b"]
    assert decoder.at_event_start and not decoder.has_pending


@pytest.mark.parametrize("mode", ["text", "events"])
def test_issue_15_parser_empty_chunk_inside_a_crlf_multiline_event(mode: str) -> None:
    # A JSON object spread over two `data` lines, CRLF line ends, and the transport hands
    # over an empty chunk between a CR and its LF: one event, one delta, no error.
    obj = {"choices": [{"index": 0, "delta": {"content": "whole"}, "finish_reason": None}]}
    text = json.dumps(obj)
    half = text.index('"finish_reason"')  # the "\n" that joins the lines is JSON whitespace
    chunks = [
        b"data: " + text[:half].encode() + b"\r",
        b"",
        b"\ndata: " + text[half:].encode() + b"\r\n\r\n",
        content("", "stop"),
        DONE,
    ]
    parser = ChunkParser()
    out: list[str] = []
    for chunk in chunks:
        if mode == "text":
            out.extend(parser.feed_text(chunk))
        else:
            out.extend(e.text for e in parser.feed_events(chunk) if isinstance(e, ContentDelta))
    parser.feed_eof()
    assert parser.error is None, parser.error
    assert out == ["whole"] and parser.done and parser.finish_reason == "stop"


def test_issue_15_event_splitter_empty_chunk_after_a_cr() -> None:
    # The proxy's event cutter waits for the byte after a trailing CR; an empty chunk is
    # no byte, so it must not cut there (it did not: this pins it).
    splitter = EventSplitter()
    pieces = [b"data: a\r", b"", b"\ndata: b\r", b"", b"\n\r", b"", b"\n", b"", b"data: c\r"]
    out = [splitter.feed(p) for p in pieces]
    assert out == [b""] * 6 + [b"data: a\r\ndata: b\r\n\r\n", b"", b""]
    assert splitter.flush() == b"data: c\r"


class _Body(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body handed to the client exactly as these chunks, empty ones too."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def _crlf_stream_with_empty_chunks() -> tuple[list[bytes], str]:
    # Every event's JSON over two data lines and every CRLF cut by an empty chunk.
    chunks: list[bytes] = []
    words = ["one ", "two ", "three"]
    for i, word in enumerate(words):
        finish = "stop" if i == len(words) - 1 else None
        choice = {"index": 0, "delta": {"content": word}, "finish_reason": finish}
        text = json.dumps({"choices": [choice]})
        half = text.index('"finish_reason"')
        chunks += [b"data: " + text[:half].encode() + b"\r", b"", b"\n"]
        chunks += [b"data: " + text[half:].encode() + b"\r", b"", b"\n\r", b"", b"\n"]
    chunks += [b"data: [DONE]\r", b"", b"\n\r", b"", b"\n"]
    return chunks, "".join(words)


def test_issue_15_client_gets_empty_chunks_and_keeps_crlf_whole() -> None:
    # The clients read the transport's chunks directly, empty ones included.
    chunks, expected = _crlf_stream_with_empty_chunks()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_Body(chunks)
        )

    transport = httpx.MockTransport(handler)
    with (
        httpx.Client(transport=transport) as http,
        ts.Client(base_url="http://upstream.test/v1", api_key=KEY, http_client=http) as client,
        client.stream_chat(MESSAGES) as stream,
    ):
        assert "".join(stream) == expected
    assert stream.outcome == ts.Outcome("completed", "done")

    async def main() -> None:
        async with (
            httpx.AsyncClient(transport=transport) as http,
            ts.AsyncClient(base_url="http://upstream.test/v1", api_key=KEY, http_client=http) as c,
            c.stream_chat(MESSAGES) as stream,
        ):
            assert "".join([t async for t in stream]) == expected
        assert stream.outcome == ts.Outcome("completed", "done")

    anyio.run(main)


# --- finding 3: an event with empty data kills the stream ------------------------------------

BLANKS = [
    b"data:\n\n",
    b"data\n\n",
    b"data: \n\n",
    b"data:  \t \n\n",
    b"data\ndata\n\n",  # data "\n"
    b"data: \r\n\r\n",
    b"event: ping\ndata:\n\n",
]


def _parse(chunks: list[bytes], mode: str, **kw: object) -> tuple[list[str], ChunkParser]:
    parser = ChunkParser(**kw)  # type: ignore[arg-type]
    out: list[str] = []
    for chunk in chunks:
        if mode == "text":
            out.extend(parser.feed_text(chunk))
        else:
            out.extend(e.text for e in parser.feed_events(chunk) if isinstance(e, ContentDelta))
    parser.feed_eof()
    return out, parser


@pytest.mark.parametrize("mode", ["text", "events"])
@pytest.mark.parametrize("blank", BLANKS)
def test_issue_15_empty_data_event_is_passed_over(blank: bytes, mode: str) -> None:
    stream = [blank, content("a"), blank, blank, content("b"), content("", "stop"), blank, DONE]
    for chunks in (stream, [b"".join(stream)], [b"".join(stream[:3]), b"".join(stream[3:])]):
        out, parser = _parse(chunks, mode)
        assert parser.error is None, (chunks, parser.error)
        assert "".join(out) == "ab" and parser.message().content == "ab"
        assert parser.done and parser.finish_reason == "stop"


@pytest.mark.parametrize("mode", ["text", "events"])
def test_issue_15_empty_data_event_is_no_progress(mode: str) -> None:
    ticks = iter(range(100))
    parser = ChunkParser(clock=lambda: float(next(ticks)))  # started_at = 0.0
    feed = parser.feed_text if mode == "text" else parser.feed_events
    for blank in BLANKS:
        feed(blank)
    assert parser.last_event_at is None and parser.first_token_at is None
    feed(b"".join(BLANKS))
    assert parser.last_event_at is None and parser.first_token_at is None
    feed(content("a"))
    at = parser.last_event_at
    assert at is not None and parser.first_token_at == at
    for blank in BLANKS:
        feed(blank)
    feed(b"".join(BLANKS))
    assert parser.last_event_at == at and parser.first_token_at == at
    assert parser.error is None and parser.message().content == "a"


def test_issue_15_invalid_json_is_still_an_error() -> None:
    # Only blank data is passed over: anything else that is no JSON still ends the stream.
    for bad in (b"data: x\n\n", b"data: \x0c\n\n", b"data: {\n\n"):
        for mode in ("text", "events"):
            out, parser = _parse([content("a"), bad, content("b")], mode)
            assert out == ["a"], (bad, mode)
            assert isinstance(parser.error, ts.ProtocolError), (bad, mode)


@contextlib.contextmanager
def _upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(api_key=KEY, delay=0.001)) as running:
        yield running


def _client(up: RunningUpstream, **kw: object) -> ts.AsyncClient:
    options: dict[str, object] = {"base_url": up.base_url, "api_key": KEY, "max_retries": 0}
    options.update(kw)
    return ts.AsyncClient(**options)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_issue_15_client_passes_over_empty_data_events() -> None:
    raw = [b"data:\n\n", content("Hel"), b"data\n\n", content("lo"), b"data: \n\n"]
    raw += [content("", "stop"), b"data:\n\n", DONE]
    with _upstream() as up:
        async with _client(up) as client:
            for text_mode in (True, False):
                up.app.enqueue(Script(raw=raw, delay=0))
                with anyio.fail_after(5):
                    async with client.stream_chat(MESSAGES) as stream:
                        if text_mode:
                            got = [t async for t in stream]
                        else:
                            got = [
                                e.text async for e in stream.events() if isinstance(e, ContentDelta)
                            ]
                assert got == ["Hel", "lo"]
                assert stream.outcome == ts.Outcome("completed", "done")


SETTING = 0.5


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["first_token", "idle"])
async def test_issue_15_empty_data_events_do_not_hold_off_a_timeout(kind: str) -> None:
    # Blank data events every 50 ms for 2 s: like keep-alive comments they are no
    # progress, so the deadline fires SETTING after the request (first_token) or after
    # the last delta (idle), not after the last blank event.
    head = [content("t0")] if kind == "idle" else []
    raw = [*head, *[b"data:\n\n"] * 40]
    timeout = ts.Timeout(connect=5, first_token=SETTING, idle=SETTING)
    with _upstream() as up:
        up.app.enqueue(Script(raw=raw, delay=0.05, end="stall"))
        async with _client(up, timeout=timeout) as client:
            got: list[str] = []
            start = last = time.monotonic()
            with anyio.fail_after(5), pytest.raises(ts.StreamTimeout) as info:
                async with client.stream_chat(MESSAGES) as stream:
                    async for text in stream:
                        got.append(text)
                        last = time.monotonic()
            elapsed = time.monotonic() - (start if kind == "first_token" else last)
    assert info.value.kind == kind
    assert got == (["t0"] if kind == "idle" else [])
    # 40 blank events span 2 s; progress would push the deadline past 2.5 s
    assert SETTING <= elapsed < SETTING + 0.75, elapsed


# --- the proxy's record ------------------------------------------------------------------


_serve = servers.serve


class _Records:
    def __init__(self) -> None:
        self.items: list[CompletionRecord] = []
        self._cond = threading.Condition()

    def add(self, record: CompletionRecord) -> None:
        with self._cond:
            self.items.append(record)
            self._cond.notify_all()

    async def wait(self, n: int) -> list[CompletionRecord]:
        def waiter() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: len(self.items) >= n, 5)

        assert await anyio.to_thread.run_sync(waiter)
        return list(self.items)


@pytest.mark.anyio
async def test_issue_15_proxy_record_passes_over_empty_data_events() -> None:
    raw = [b"data:\n\n", content("Hel"), b"data:  \n\n", content("lo"), content("", "stop")]
    raw += [b"data\n\n", DONE]
    records = _Records()
    with _upstream() as up:
        up.app.enqueue(Script(raw=raw, delay=0))
        proxy = ChatProxy(api_key=KEY, base_url=up.base_url, on_complete=records.add)
        with _serve(proxy) as url:
            async with httpx.AsyncClient(timeout=10) as browser:
                with anyio.fail_after(5):
                    response = await browser.post(url, json={"messages": MESSAGES})
            (record,) = await records.wait(1)
    # The browser gets the upstream's bytes as they were; the record reads past the blanks.
    assert response.status_code == 200 and response.content == b"".join(raw)
    assert record.outcome == "completed" and record.error is None
    assert record.message.content == "Hello" and record.finish_reason == "stop"


# --- the differential check: SSEDecoder against a reading of the spec ------------------------


def spec_events(stream: bytes) -> list[tuple[str, str, str, int | None]]:
    """The events the WHATWG algorithm dispatches for the whole `stream`, read as it
    is written: decode, split lines, process each field, dispatch at a blank line.

    Each event is (type, data, last event id, reconnection time when dispatched).
    """
    # "The stream must then be decoded using the UTF-8 decode algorithm", which drops
    # one leading BOM; invalid bytes become U+FFFD.
    text = stream.decode("utf-8", "replace").removeprefix("\ufeff")
    events: list[tuple[str, str, str, int | None]] = []
    data = ""
    event_type = ""
    last_id = ""
    retry: int | None = None
    # Lines end in CRLF, a lone LF or a lone CR; characters after the last line end
    # are no line: "any pending data must be discarded" at EOF.
    lines: list[str] = []
    line = ""
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\r":
            lines.append(line)
            line = ""
            if i + 1 < len(text) and text[i + 1] == "\n":
                i += 1
        elif char == "\n":
            lines.append(line)
            line = ""
        else:
            line += char
        i += 1
    for line in lines:
        if line == "":
            # Dispatch the event.
            if data == "":
                event_type = ""
                continue
            if data.endswith("\n"):
                data = data[:-1]
            events.append((event_type or "message", data, last_id, retry))
            data = ""
            event_type = ""
            continue
        if line.startswith(":"):
            continue  # a comment
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data += value + "\n"
        elif field == "id":
            if "\0" not in value:
                last_id = value
        elif field == "retry":
            if value and all("0" <= c <= "9" for c in value):
                retry = int(value)
        # any other field is ignored
    return events


_value = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=8),
    st.sampled_from(["", " ", "  x", ":", "a:b", "\0", "12", "007", " 5", "x\0y", "[DONE]"]),
)
_field = st.sampled_from(["data", "event", "id", "retry", "", "foo", "dat", "data ", "DATA"])
_line = st.one_of(
    st.builds(lambda f, v: (f + ":" + v).encode(), _field, _value),
    st.builds(lambda f, v: (f + ": " + v).encode(), _field, _value),
    _field.map(str.encode),  # a field name alone
    _value.map(lambda v: (":" + v).encode()),  # a comment
    st.just(b""),  # a blank line: dispatch
    st.sampled_from([b"\xff", b"data: \xe2\x82", b"data: \xc3", b"\xef\xbb\xbf"]),
)
_eol = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def _spec_streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(_line, _eol), max_size=14))
    body = b"".join(line + eol for line, eol in lines)
    if draw(st.booleans()):
        body = b"\xef\xbb\xbf" + body
    if draw(st.booleans()):  # an unfinished last line, discarded at EOF
        body += draw(_line)
    return body


@st.composite
def _chunked(draw: st.DrawFn, body: bytes) -> list[bytes]:
    # Cut points may repeat and sit at either end: empty chunks are part of the input.
    points = sorted(draw(st.lists(st.integers(0, len(body)), max_size=10)))
    pieces, last = [], 0
    for point in [*points, len(body)]:
        pieces.append(body[last:point])
        last = point
    return pieces


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), _spec_streams())
def test_issue_15_decoder_matches_a_reading_of_the_spec(data: st.DataObject, body: bytes) -> None:
    expected = spec_events(body)
    chunks = data.draw(_chunked(body))
    got = [(e.event, e.data, e.id, e.retry) for e in decode(chunks)]  # type: ignore[union-attr]
    assert got == expected, chunks
    fast = datas(data.draw(_chunked(body)), fast=True)
    assert fast == [e[1] for e in expected]
    one_by_one = [body[i : i + 1] for i in range(len(body))]
    assert datas(one_by_one, fast=False) == [e[1] for e in expected]


def test_issue_15_the_spec_reading_itself() -> None:
    # The reference must be right for the differential test to mean anything: the
    # spec's own examples (WHATWG HTML, 9.2.6) and the cases of finding 1.
    assert spec_events(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [
        ("message", "YHOO\n+2\n10", "", None)
    ]
    example = b": test stream\n\ndata: first event\nid: 1\n\n"
    example += b"data:second event\nid\n\ndata:  third event\n\n"
    assert spec_events(example) == [
        ("message", "first event", "1", None),
        ("message", "second event", "", None),
        ("message", " third event", "", None),
    ]
    assert spec_events(b"data\n\ndata\ndata\n\ndata:") == [
        ("message", "", "", None),
        ("message", "\n", "", None),
    ]
    assert spec_events(b"data:test\n\ndata: test\n\n") == [("message", "test", "", None)] * 2
    assert spec_events(b"data: a\r\ndata: b\n\n") == [("message", "a\nb", "", None)]
    assert spec_events(b"data\r\n") == []
    assert spec_events(b"\xef\xbb\xbfevent: e\rretry: 7\rid: x\0\rdata: \xff\r\r") == [
        ("e", "\ufffd", "", 7)
    ]
