"""Issue #16, "one completion parser": the proxy's turn record reads a non-streaming answer
with the client's own reader (`parse_completion`), so `on_complete` sees what `chat()` returns,
and an answer it cannot read still only logs."""

from __future__ import annotations

import json
import logging

import pytest

from tokenhub_stream import ChatMessage
from tokenhub_stream._completion import parse_completion
from tokenhub_stream.asgi._record import CompletionRecord, TurnCollector


def _answer(message: dict[str, object], **extra: object) -> bytes:
    body = {
        "id": "chatcmpl-16",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        **extra,
    }
    return json.dumps(body).encode()


def _record(raw: bytes) -> CompletionRecord:
    collector = TurnCollector(stream=False, request_bytes=40)
    collector.feed_json(raw)
    return collector.record(
        request_id="r",
        principal=None,
        model="m",
        messages=[],
        outcome="completed",
        status=200,
        error=None,
        started_at=0.0,
        ttfb=None,
        duration=0.0,
        bytes_sent=len(raw),
    )


ANSWERS = {
    "plain": _answer(
        {"role": "assistant", "content": "4"},
        usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    ),
    # DeepSeek's reasoner answers its reasoning beside the content.
    "reasoning_content": _answer(
        {"role": "assistant", "content": "4", "reasoning_content": "2 + 2 is 4."}
    ),
    "content_parts": _answer(
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": [{"type": "text", "text": "sum"}]},
                {"type": "text", "text": "4"},
            ],
        }
    ),
    # A tool call's type and the provider's extra fields (Gemini's thought signature).
    "tool_call_extras": _answer(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'},
                    "extra_content": {"google": {"thought_signature": "c2ln"}},
                }
            ],
        }
    ),
}


@pytest.mark.parametrize("raw", ANSWERS.values(), ids=ANSWERS.keys())
def test_issue_16_json_record_reads_the_answer_as_chat_does(raw: bytes) -> None:
    expected = parse_completion(raw)
    record = _record(raw)
    assert record.message == expected.message
    assert record.usage == expected.usage
    assert record.finish_reason == "stop"


UNREADABLE = {
    "not_json": b"<html>busy</html>",
    "not_an_object": b"[1, 2]",
    "no_choices": b'{"choices": []}',
    "error_body": b'{"error": {"message": "overloaded", "type": "server_error"}}',
    "bad_tool_call": _answer({"role": "assistant", "tool_calls": [{"function": 3}]}),
}


@pytest.mark.parametrize("raw", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_issue_16_json_record_only_logs_an_unreadable_answer(
    raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenhub_stream.asgi"):
        record = _record(raw)
    assert record.message == ChatMessage()
    assert record.usage is None and record.estimated_usage is not None
    assert "could not read the JSON response" in caplog.text
