"""#19, refusals: with a structured output, an OpenAI model that declines streams
`delta.refusal` fragments (or answers `message.refusal`) in place of the content. The
refusal lands in `ChatMessage.refusal` (and `RefusalDelta` events), never in the content,
and the structured output raises `OutputRefusedError` carrying it instead of failing as
invalid JSON. Sans-IO for the parser; loopback streams from the local upstream for the
client, sync and async; the proxy's turn record reads refusal chunks too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import anyio
import pytest
from pydantic import BaseModel

import tokenhub_stream as ts
from tokenhub_stream._chunks import ChunkParser
from tokenhub_stream._completion import parse_completion
from tokenhub_stream._structured import StructuredOutput, output_spec
from tokenhub_stream.asgi._record import TurnCollector
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

WAIT = 10.0  # seconds: the bound of every wait here
MESSAGES = [{"role": "user", "content": "Describe Mars"}]
REFUSAL = "I'm sorry, I can't help with that request."


class Card(BaseModel):
    title: str
    moons: int


def _event(delta: dict[str, object], finish_reason: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-19",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


# As OpenAI streams a refusal: a first chunk with `"refusal": ""`, then refusal fragments.
REFUSAL_STREAM = [
    _event({"role": "assistant", "content": None, "refusal": ""}),
    _event({"refusal": "I'm sorry, "}),
    _event({"refusal": "I can't help "}),
    _event({"refusal": "with that request."}),
    _event({}, "stop"),
    b"data: [DONE]\n\n",
]


# --- the parser (sans-IO) -----------------------------------------------------------------


def test_issue_19_refusal_parser_fragments_join_into_message_refusal() -> None:
    parser = ChunkParser()
    texts = [text for chunk in REFUSAL_STREAM for text in parser.feed_text(chunk)]
    parser.feed_eof()
    assert texts == []  # a refusal is never content
    assert parser.error is None
    message = parser.message()
    assert message.refusal == REFUSAL
    assert message.content == ""
    assert message.finish_reason == "stop"
    assert parser.first_token_at is not None
    assert message.to_dict() == {"role": "assistant", "content": "", "refusal": REFUSAL}


def test_issue_19_refusal_parser_events_are_refusal_deltas() -> None:
    parser = ChunkParser()
    events = [event for chunk in REFUSAL_STREAM for event in parser.feed_events(chunk)]
    assert events == [
        ts.RefusalDelta("I'm sorry, "),
        ts.RefusalDelta("I can't help "),
        ts.RefusalDelta("with that request."),
        ts.FinishEvent("stop"),
    ]
    assert parser.message().refusal == REFUSAL


def test_issue_19_refusal_parser_split_across_network_chunks_and_batches() -> None:
    # The same bytes cut at every 7th byte, and fed as one batch: the same message.
    body = b"".join(REFUSAL_STREAM)
    split = ChunkParser()
    for i in range(0, len(body), 7):
        assert split.feed_text(body[i : i + 7]) == []
    batched = ChunkParser()
    end = 0
    while end < len(REFUSAL_STREAM) and not batched.stopped:
        deltas, end = batched.feed_text_batch(REFUSAL_STREAM, end)
        assert list(deltas) == []
    for parser in (split, batched):
        assert parser.message().refusal == REFUSAL
        assert parser.done and parser.error is None


def test_issue_19_refusal_parser_after_a_learned_template_takes_the_general_path() -> None:
    # A plain content chunk teaches the fast path its envelope; a refusal chunk in the
    # same envelope must not be read as content by it.
    parser = ChunkParser()
    assert parser.feed_text(_event({"content": "{"})) == ["{"]
    assert parser.feed_text(_event({"content": '"a'})) == ['"a']
    assert parser.feed_text(_event({"refusal": "No."})) == []
    assert parser.feed_text(_event({"content": "", "refusal": " Sorry."})) == []
    message = parser.message()
    assert (message.content, message.refusal) == ('{"a', "No. Sorry.")


def test_issue_19_refusal_parser_no_refusal_is_none_and_bad_refusal_is_protocol_error() -> None:
    parser = ChunkParser()
    parser.feed_text(_event({"role": "assistant", "content": "", "refusal": None}))
    parser.feed_text(_event({"content": "hi"}, "stop"))
    assert parser.message().refusal is None
    assert "refusal" not in parser.message().to_dict()
    bad = ChunkParser()
    bad.feed_text(_event({"refusal": ["no"]}))
    assert isinstance(bad.error, ts.ProtocolError)
    assert "refusal" in str(bad.error)


def test_issue_19_refusal_parse_completion_reads_message_refusal() -> None:
    body = {
        "id": "chatcmpl-19",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "refusal": REFUSAL},
                "finish_reason": "stop",
            }
        ],
    }
    result = parse_completion(json.dumps(body).encode())
    assert result.message.refusal == REFUSAL
    assert result.message.content == ""
    body["choices"][0]["message"] = {"role": "assistant", "content": "{}", "refusal": None}  # type: ignore[index]
    assert parse_completion(json.dumps(body).encode()).message.refusal is None


def test_issue_19_refusal_structured_output_raises_refused_not_invalid_json() -> None:
    output = StructuredOutput(output_spec(Card))
    with pytest.raises(ts.OutputRefusedError) as info:
        output.finish_text("", "stop", REFUSAL)
    error = info.value
    assert error.refusal == REFUSAL and error.text == "" and error.errors == []
    assert isinstance(error, ts.OutputValidationError) and isinstance(error, ValueError)
    assert REFUSAL in str(error)
    with pytest.raises(ts.OutputRefusedError):  # the same error on every call
        output.finish("stop", REFUSAL)


# --- the client, on a loopback stream ----------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0)) as running:
        yield running


def test_issue_19_refusal_local_upstream_streams_openai_shape(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(refusal=REFUSAL))
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=Card) as stream:
            assert list(stream) == []  # text mode yields no refusal text
            assert stream.message.refusal == REFUSAL
            assert stream.message.content == ""
            assert stream.finish_reason == "stop"
            assert stream.outcome is not None and stream.outcome.ok
            with pytest.raises(ts.OutputRefusedError) as info:
                stream.parsed  # noqa: B018
    assert info.value.refusal == REFUSAL


def test_issue_19_refusal_partials_yield_nothing_then_raise_sync(
    upstream: RunningUpstream,
) -> None:
    upstream.app.enqueue(Script(refusal=REFUSAL), Script(refusal=REFUSAL))
    with ts.Client(base_url=upstream.base_url) as client:
        seen: list[object] = []
        with client.stream_chat(MESSAGES, response_format=Card) as stream:
            with pytest.raises(ts.OutputRefusedError) as info:
                for value in stream.partials():
                    seen.append(value)
            assert seen == []
            assert info.value.refusal == REFUSAL
            with pytest.raises(ts.OutputRefusedError):
                stream.parsed  # noqa: B018
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            with pytest.raises(ts.OutputRefusedError):
                list(stream.elements())


@pytest.mark.anyio
async def test_issue_19_refusal_partials_and_events_async(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(refusal=REFUSAL), Script(refusal=REFUSAL))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(WAIT):
            seen: list[object] = []
            async with client.stream_chat(MESSAGES, response_format=Card) as stream:
                with pytest.raises(ts.OutputRefusedError) as info:
                    async for value in stream.partials():
                        seen.append(value)
                assert seen == []
                assert info.value.refusal == REFUSAL
                assert stream.message.refusal == REFUSAL
            async with client.stream_chat(MESSAGES, response_format=Card) as stream:
                events = [event async for event in stream.events()]
                with pytest.raises(ts.OutputRefusedError):
                    stream.parsed  # noqa: B018
    assert not any(isinstance(e, ts.ContentDelta) for e in events)
    refused = "".join(e.text for e in events if isinstance(e, ts.RefusalDelta))
    assert refused == REFUSAL
    assert isinstance(events[-1], ts.FinishEvent | ts.UsageEvent)


def test_issue_19_refusal_after_some_content(upstream: RunningUpstream) -> None:
    # Unlikely, but defined: the content is content (text mode yields it, partials show
    # it), the refusal is the refusal, and the refusal wins over validating the content.
    start = '{"title": "Ma'
    upstream.app.enqueue(
        Script(deltas=[start[:6], start[6:]], refusal=REFUSAL),
        Script(deltas=[start[:6], start[6:]], refusal=REFUSAL),
    )
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=Card) as stream:
            assert "".join(stream) == start
            assert stream.message.refusal == REFUSAL
            with pytest.raises(ts.OutputRefusedError) as info:
                stream.parsed  # noqa: B018
        assert info.value.text == start
        seen: list[object] = []
        with client.stream_chat(MESSAGES, response_format=Card) as stream:
            with pytest.raises(ts.OutputRefusedError) as partial_info:
                for value in stream.partials():
                    seen.append(dict(value) if isinstance(value, dict) else value)
    assert seen and seen[-1] == {"title": "Ma"}
    assert partial_info.value.refusal == REFUSAL and partial_info.value.text == start


def test_issue_19_refusal_chat_sync(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(refusal=REFUSAL), Script(refusal=REFUSAL))
    with ts.Client(base_url=upstream.base_url) as client:
        with pytest.raises(ts.OutputRefusedError) as info:
            client.chat(MESSAGES, response_format=Card)
        result = client.chat(MESSAGES)  # no structured output: the refusal, no error
    assert info.value.refusal == REFUSAL
    assert result.message.refusal == REFUSAL and result.message.content == ""
    assert result.parsed is None
    assert upstream.app.requests[-1].json is not None
    assert upstream.app.requests[-1].json.get("stream") is not True


def test_issue_19_refusal_reaches_the_tool_loop_sync(upstream: RunningUpstream) -> None:
    @ts.tool
    def lookup(city: str) -> str:
        """Look a city up.

        Args:
            city: the city.
        """
        return city

    upstream.app.enqueue(Script(refusal=REFUSAL))
    with ts.Client(base_url=upstream.base_url) as client:
        events = list(client.run_tools(MESSAGES, tools=[lookup]))
    refused = [e.text for e in events if isinstance(e, ts.RefusalDelta)]
    assert "".join(refused) == REFUSAL
    assert not [e for e in events if isinstance(e, ts.ContentDelta)]
    (finished,) = [e for e in events if isinstance(e, ts.TurnFinished)]
    assert finished.message.refusal == REFUSAL


@pytest.mark.anyio
async def test_issue_19_refusal_chat_async(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(refusal=REFUSAL))
    async with ts.AsyncClient(base_url=upstream.base_url) as client:
        with anyio.fail_after(WAIT):
            with pytest.raises(ts.OutputValidationError) as info:  # the family catches it
                await client.chat(MESSAGES, response_format=list[Card])
    assert isinstance(info.value, ts.OutputRefusedError)
    assert info.value.refusal == REFUSAL


# --- the proxy's turn record ------------------------------------------------------------


def test_issue_19_refusal_turn_record_reads_refusal_chunks() -> None:
    collector = TurnCollector(stream=True, request_bytes=40)
    for chunk in REFUSAL_STREAM:
        collector.feed(chunk)
    record = collector.record(
        request_id="r",
        principal=None,
        model="gpt-4o",
        messages=[],
        outcome="completed",
        status=200,
        error=None,
        started_at=0.0,
        ttfb=None,
        duration=0.0,
        bytes_sent=sum(map(len, REFUSAL_STREAM)),
    )
    assert record.outcome == "completed" and record.error is None
    assert record.message.refusal == REFUSAL
    assert record.finish_reason == "stop"
    # No usage came: the estimate counts the refused text as output (4 characters a
    # token), not the events' bytes as for a turn with no text.
    assert record.estimated_usage is not None
    assert record.estimated_usage.completion_tokens == math.ceil(len(REFUSAL) / 4)
