"""Issue #15, finding 7: `delta.content` as a list of typed parts.

Mistral's reasoning models (magistral), directly and through OpenAI-compatible gateways,
stream `content` as `[{"type": "thinking", "thinking": [{"type": "text", "text": ...}]}]`
and `[{"type": "text", "text": ...}]`, beside plain-string chunks. `text` parts are
content, `thinking` parts are reasoning, and any other part type is skipped; the bytes
themselves are relayed unchanged by the proxy.

The streams below are written by hand in the shapes of three recorded Mistral streams:
the native API (parts only), a gateway mixing parts and plain strings, and one with the
odd shapes a tolerant reader must survive.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import servers
import tokenhub_stream as ts
from tokenhub_stream import (
    ChunkParser,
    ContentDelta,
    FinishEvent,
    ReasoningDelta,
    StreamEvent,
    ToolCallDelta,
    Usage,
    UsageEvent,
)
from tokenhub_stream.asgi import ChatProxy, CompletionRecord
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream
from tokenhub_stream.tools import ToolCallStarted, TurnFinished, tool

KEY = "sk-canary-issue-15-7c2e91"
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
DONE = b"data: [DONE]\n\n"


def event(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    obj = {
        "id": "5d1f0c8e2a7b4e96",
        "object": "chat.completion.chunk",
        "created": 1760000000,
        "model": "magistral-medium-2509",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def thinking(*texts: str) -> list[dict[str, object]]:
    return [{"type": "thinking", "thinking": [{"type": "text", "text": t} for t in texts]}]


def text(t: str) -> list[dict[str, object]]:
    return [{"type": "text", "text": t}]


USAGE = {"prompt_tokens": 12, "total_tokens": 61, "completion_tokens": 49}


@dataclass(frozen=True)
class Recorded:
    name: str
    chunks: list[bytes]  # one event per network chunk, as the upstream wrote them
    texts: list[str]  # the text deltas (feed_text)
    events: list[StreamEvent]  # the typed events (feed_events)
    content: str
    reasoning: str | None


# 1. The native API: every content is a list; the first chunk has the role and a
#    thinking part; the last has content "" with the finish reason and usage.
NATIVE = Recorded(
    "native",
    [
        event({"role": "assistant", "content": thinking("The user asks")}),
        event({"content": thinking(" for 2+2. Basic arithmetic: 4.")}),
        event({"content": text("2 + 2")}),
        event({"content": text(" = 4.")}),
        event({"content": ""}, "stop", usage=USAGE),
        DONE,
    ],
    ["2 + 2", " = 4."],
    [
        ReasoningDelta("The user asks"),
        ReasoningDelta(" for 2+2. Basic arithmetic: 4."),
        ContentDelta("2 + 2"),
        ContentDelta(" = 4."),
        FinishEvent("stop"),
        UsageEvent(Usage(12, 49, 61)),
    ],
    "2 + 2 = 4.",
    "The user asks for 2+2. Basic arithmetic: 4.",
)

# 2. Through a gateway: a role chunk with "", thinking as parts, then the answer as plain
#    strings; usage in a last chunk with no choices.
MIXED = Recorded(
    "mixed",
    [
        event({"role": "assistant", "content": ""}),
        event({"content": thinking("Okay, ", "so 2+2.")}),
        event({"content": thinking("It is 4.")}),
        event({"content": "The answer"}),
        event({"content": " is 4."}),
        event({}, "stop"),
        b"data: " + json.dumps({"id": "x", "choices": [], "usage": USAGE}).encode() + b"\n\n",
        DONE,
    ],
    ["The answer", " is 4."],
    [
        ReasoningDelta("Okay, so 2+2."),
        ReasoningDelta("It is 4."),
        ContentDelta("The answer"),
        ContentDelta(" is 4."),
        FinishEvent("stop"),
        UsageEvent(Usage(12, 49, 61)),
    ],
    "The answer is 4.",
    "Okay, so 2+2.It is 4.",
)

# 3. The odd shapes: a thinking part whose value is a string, thinking and text parts in
#    one delta, part types this library does not know (a reference, an image), an empty
#    text part, nested parts of an unknown type, and a list with no usable part.
ODD = Recorded(
    "odd",
    [
        event({"role": "assistant", "content": [{"type": "thinking", "thinking": "Hmm."}]}),
        event(
            {
                "content": [
                    {"type": "thinking", "thinking": [{"type": "text", "text": " Four."}]},
                    {"type": "text", "text": "It is "},
                    {"type": "reference", "reference_ids": [1, 2]},
                    {"type": "text", "text": "4"},
                ]
            }
        ),
        event({"content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}),
        event({"content": [{"type": "text", "text": ""}, {"type": "text", "text": "."}]}),
        event(
            {
                "content": thinking()
                + [{"type": "thinking", "thinking": [{"type": "audio", "data": "x"}]}]
            }
        ),
        event({"content": []}),
        event({"content": text("")}, "stop", usage=USAGE),
        DONE,
    ],
    ["It is 4", "."],
    [
        ReasoningDelta("Hmm."),
        ReasoningDelta(" Four."),
        ContentDelta("It is 4"),
        ContentDelta("."),
        FinishEvent("stop"),
        UsageEvent(Usage(12, 49, 61)),
    ],
    "It is 4.",
    "Hmm. Four.",
)

RECORDED = [NATIVE, MIXED, ODD]


def parse(chunks: list[bytes], mode: str) -> tuple[list[object], ChunkParser]:
    parser = ChunkParser()
    out: list[object] = []
    for chunk in chunks:
        out.extend(parser.feed_text(chunk) if mode == "text" else parser.feed_events(chunk))
    parser.feed_eof()
    return out, parser


def check(stream: Recorded, chunks: list[bytes], mode: str) -> None:
    out, parser = parse(chunks, mode)
    assert parser.error is None, parser.error
    assert out == (stream.texts if mode == "text" else stream.events)
    message = parser.message()
    assert (message.content, message.reasoning) == (stream.content, stream.reasoning)
    assert message.finish_reason == "stop" and parser.done
    assert parser.usage == Usage(12, 49, 61)


@pytest.mark.parametrize("mode", ["text", "events"])
@pytest.mark.parametrize("stream", RECORDED, ids=[s.name for s in RECORDED])
def test_issue_15_content_parts_in_recorded_shapes(stream: Recorded, mode: str) -> None:
    body = b"".join(stream.chunks)
    check(stream, stream.chunks, mode)  # one event per chunk
    check(stream, [body], mode)  # all in one
    for cut in range(len(body) + 1):  # any one cut, and each byte alone
        check(stream, [body[:cut], body[cut:]], mode)
    check(stream, [body[i : i + 1] for i in range(len(body))], mode)


@st.composite
def _chunkings(draw: st.DrawFn) -> tuple[Recorded, list[bytes]]:
    stream = draw(st.sampled_from(RECORDED))
    body = b"".join(stream.chunks)
    points = sorted(draw(st.lists(st.integers(0, len(body)), max_size=12)))
    pieces, last = [], 0
    for point in [*points, len(body)]:
        pieces.append(body[last:point])  # repeated points: empty chunks
        last = point
    return stream, pieces


@settings(max_examples=300, deadline=None)
@given(_chunkings(), st.sampled_from(["text", "events"]))
def test_issue_15_content_parts_at_any_chunking(
    case: tuple[Recorded, list[bytes]], mode: str
) -> None:
    stream, pieces = case
    check(stream, pieces, mode)


def test_issue_15_thinking_part_is_the_first_token() -> None:
    ticks = iter(range(100))
    parser = ChunkParser(clock=lambda: float(next(ticks)))
    parser.feed_text(event({"role": "assistant", "content": [{"type": "reference"}]}))
    assert parser.first_token_at is None and parser.last_event_at == 1.0
    parser.feed_text(event({"content": thinking("Let me think")}))
    assert parser.first_token_at == 2.0
    assert parser.delivered == 0  # reasoning only: no text handed out yet


@pytest.mark.parametrize("content", [5, {"type": "text", "text": "x"}, True])
def test_issue_15_content_neither_a_string_nor_a_list_is_still_an_error(content: object) -> None:
    for mode in ("text", "events"):
        out, parser = parse([event({"content": "a"}), event({"content": content})], mode)
        assert isinstance(parser.error, ts.ProtocolError), (content, mode)
        assert "delta.content" in str(parser.error)
        assert parser.message().content == "a"


# --- through the client, the proxy and the tool loop, on loopback ---------------------------


@contextlib.contextmanager
def _upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(api_key=KEY, delay=0.001)) as running:
        yield running


@pytest.mark.anyio
async def test_issue_15_client_streams_content_parts() -> None:
    with _upstream() as up:
        async with ts.AsyncClient(base_url=up.base_url, api_key=KEY, max_retries=0) as client:
            for stream_shape in RECORDED:
                for mode in ("text", "events"):
                    up.app.enqueue(Script(raw=stream_shape.chunks, delay=0))
                    with anyio.fail_after(5):
                        async with client.stream_chat(MESSAGES) as stream:
                            if mode == "text":
                                got: list[object] = [t async for t in stream]
                            else:
                                got = [e async for e in stream.events()]
                    expected = stream_shape.texts if mode == "text" else stream_shape.events
                    assert got == expected, (stream_shape.name, mode)
                    assert stream.message.content == stream_shape.content
                    assert stream.message.reasoning == stream_shape.reasoning
                    assert stream.usage == Usage(12, 49, 61)
                    assert stream.outcome == ts.Outcome("completed", "done")


def test_issue_15_sync_client_streams_content_parts() -> None:
    with _upstream() as up:
        up.app.enqueue(Script(raw=NATIVE.chunks, delay=0))
        with (
            ts.Client(base_url=up.base_url, api_key=KEY, max_retries=0) as client,
            client.stream_chat(MESSAGES) as stream,
        ):
            assert list(stream) == NATIVE.texts
        assert stream.message.reasoning == NATIVE.reasoning
        assert stream.outcome == ts.Outcome("completed", "done")


_serve = servers.serve


@pytest.mark.anyio
async def test_issue_15_proxy_relays_content_parts_and_records_them() -> None:
    records: list[CompletionRecord] = []
    done = threading.Event()

    def on_complete(record: CompletionRecord) -> None:
        records.append(record)
        done.set()

    with _upstream() as up:
        proxy = ChatProxy(api_key=KEY, base_url=up.base_url, on_complete=on_complete)
        with _serve(proxy) as url:
            async with httpx.AsyncClient(timeout=10) as browser:
                for stream_shape in RECORDED:
                    done.clear()
                    up.app.enqueue(Script(raw=stream_shape.chunks, delay=0))
                    with anyio.fail_after(5):
                        response = await browser.post(url, json={"messages": MESSAGES})
                    assert await anyio.to_thread.run_sync(done.wait, 5)
                    # The raw events, unknown parts and all, reach the browser as sent.
                    assert response.content == b"".join(stream_shape.chunks)
                    record = records[-1]
                    assert record.outcome == "completed" and record.error is None
                    assert record.message.content == stream_shape.content
                    assert record.message.reasoning == stream_shape.reasoning
                    assert record.finish_reason == "stop"
                    assert record.usage == Usage(12, 49, 61)


@pytest.mark.anyio
async def test_issue_15_proxy_records_a_json_answer_with_content_parts() -> None:
    # stream=false: magistral answers with the same parts in `message.content`.
    answer = {
        "id": "5d1f0c8e2a7b4e96",
        "object": "chat.completion",
        "model": "magistral-medium-2509",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": [
                        *thinking("The user asks for 2+2.", " It is 4."),
                        {"type": "reference", "reference_ids": [3]},
                        *text("2 + 2 = 4."),
                    ],
                },
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    raw = json.dumps(answer).encode()
    records: list[CompletionRecord] = []
    done = threading.Event()

    def on_complete(record: CompletionRecord) -> None:
        records.append(record)
        done.set()

    with _upstream() as up:
        up.app.enqueue(Script(raw=[raw], delay=0, content_type="application/json"))
        proxy = ChatProxy(api_key=KEY, base_url=up.base_url, on_complete=on_complete)
        with _serve(proxy) as url:
            async with httpx.AsyncClient(timeout=10) as browser:
                with anyio.fail_after(5):
                    response = await browser.post(url, json={"messages": MESSAGES, "stream": False})
            assert await anyio.to_thread.run_sync(done.wait, 5)
    assert response.status_code == 200 and response.content == raw
    (record,) = records
    assert record.outcome == "completed"
    assert record.message.content == "2 + 2 = 4."
    assert record.message.reasoning == "The user asks for 2+2. It is 4."
    assert record.usage == Usage(12, 49, 61)


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first.
        b: the second.
    """
    return a + b


@pytest.mark.anyio
async def test_issue_15_tool_loop_takes_content_parts() -> None:
    call = {
        "id": "D681PevKs",
        "type": "function",
        "index": 0,
        "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'},
    }
    tool_turn = [
        event({"role": "assistant", "content": thinking("I should use the tool.")}),
        event({"content": "", "tool_calls": [call]}),
        event({"content": ""}, "tool_calls", usage=USAGE),
        DONE,
    ]
    answer_turn = [
        event({"role": "assistant", "content": thinking("The tool said 4.")}),
        event({"content": text("2 + 2 ")}),
        event({"content": "= 4."}),
        event({"content": ""}, "stop", usage=USAGE),
        DONE,
    ]
    with _upstream() as up:
        up.app.enqueue(Script(raw=tool_turn, delay=0), Script(raw=answer_turn, delay=0))
        async with ts.AsyncClient(base_url=up.base_url, api_key=KEY, max_retries=0) as client:
            with anyio.fail_after(5):
                async with client.run_tools(MESSAGES, tools=[add]) as loop:
                    events = [e async for e in loop]
        second = up.app.requests[1].json
    assert [type(e).__name__ for e in events] == [
        "ReasoningDelta",
        "ToolCallDelta",  # the loop's own since #19, with the arguments decoded so far
        "TurnFinished",
        "ToolCallStarted",
        "ToolResult",
        "ReasoningDelta",
        "ContentDelta",
        "ContentDelta",
        "TurnFinished",
    ]
    deltas = [e for e in events if isinstance(e, ContentDelta | ReasoningDelta)]
    assert [e.text for e in deltas] == [
        "I should use the tool.",
        "The tool said 4.",
        "2 + 2 ",
        "= 4.",
    ]
    started = next(e for e in events if isinstance(e, ToolCallStarted))
    assert (started.call.id, started.call.name) == ("D681PevKs", "add")
    final = events[-1]
    assert isinstance(final, TurnFinished) and final.message.content == "2 + 2 = 4."
    assert final.message.reasoning == "The tool said 4."
    assert loop.messages[-1] == {"role": "assistant", "content": "2 + 2 = 4."}
    # What went back to the model: the tool turn as an assistant message with its call,
    # then the result; never a list of parts it would have to parse again.
    assert second is not None
    sent = second["messages"]
    assert isinstance(sent, list)
    assert sent[1]["role"] == "assistant" and sent[1]["content"] is None
    assert sent[1]["tool_calls"][0]["id"] == "D681PevKs"
    assert sent[2] == {"role": "tool", "tool_call_id": "D681PevKs", "content": "4"}


def test_issue_15_tool_call_delta_in_a_parts_stream() -> None:
    # A tool-call fragment beside list content in one delta: both are read.
    call = {"id": "c1", "index": 0, "function": {"name": "add", "arguments": "{}"}}
    out, parser = parse(
        [event({"content": text("ok"), "tool_calls": [call]}), event({}, "tool_calls")],
        "events",
    )
    assert out == [
        ContentDelta("ok"),
        ToolCallDelta(0, "c1", "add", "{}"),
        FinishEvent("tool_calls"),
    ]
    assert parser.error is None


@pytest.mark.parametrize(
    ("value", "reasoning"),
    [
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab"),
        ("plain", "plain"),
        (["bare ", "strings"], "bare strings"),
        ([{"text": "untyped"}], "untyped"),
        ([{"type": "text", "text": 5}, {"type": "image"}, None, 3, {"type": "text"}], None),
        ({"type": "text", "text": "a dict"}, None),
        (None, None),
        ([], None),
    ],
)
def test_issue_15_thinking_values_read_tolerantly(value: object, reasoning: str | None) -> None:
    part = {"type": "thinking", "thinking": value}
    for mode in ("text", "events"):
        out, parser = parse(
            [event({"content": [part, {"type": "text", "text": "x"}]}), event({}, "stop")], mode
        )
        assert parser.error is None
        assert parser.message().reasoning == reasoning
        assert parser.message().content == "x"
        if mode == "events":
            expected = [ReasoningDelta(reasoning)] if reasoning else []
            assert out == [*expected, ContentDelta("x"), FinishEvent("stop")]


@pytest.mark.parametrize(
    "parts",
    [
        [None, 3, "loose string", ["nested"], {"no": "type"}, {"type": 7, "text": "x"}],
        [{"type": "text", "text": 5}, {"type": "text", "text": None}, {"type": "text"}],
        [{"type": "Text", "text": "case matters"}, {"type": "tool_use", "id": "t"}],
    ],
)
def test_issue_15_unusable_parts_are_skipped(parts: list[object]) -> None:
    for mode in ("text", "events"):
        out, parser = parse(
            [event({"content": "a"}), event({"content": parts}), event({"content": "b"}, "stop")],
            mode,
        )
        assert parser.error is None
        assert parser.message().content == "ab" and parser.message().reasoning is None
        assert len(out) == (2 if mode == "text" else 3)


def test_issue_15_content_text_of_a_whole_message() -> None:
    from tokenhub_stream._completion import content_text

    assert content_text("plain") == ("plain", None)
    assert content_text(None) == ("", None)
    assert content_text(5) == ("", None)
    parts = [*thinking("a", "b"), {"type": "x"}, *text("c"), "loose", *text("d")]
    assert content_text(parts) == ("cd", "ab")


def test_issue_15_client_chat_reads_a_json_answer_with_content_parts() -> None:
    # The client's non-streaming chat(): the same parts in `message.content`.
    answer = {
        "id": "5d1f0c8e2a7b4e96",
        "object": "chat.completion",
        "model": "magistral-medium-2509",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": [*thinking("It is 4."), {"type": "ref"}, *text("2 + 2 = 4.")],
                },
                "finish_reason": "stop",
            }
        ],
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answer)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    with ts.Client(base_url="http://upstream.test/v1", http_client=http) as client:
        result = client.chat(MESSAGES)
    assert result.message.content == "2 + 2 = 4."
    assert result.message.reasoning == "It is 4."
