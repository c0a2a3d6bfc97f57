from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence

import pytest

from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    """A fresh local upstream per test, so no script leaks into the next test."""
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        yield running
        assert running.app.pending_scripts == 0, "a scripted turn was never requested"


def frames(*chunks: Mapping[str, object], done: bool = True) -> list[bytes]:
    """Raw SSE body chunks: one `data:` event per chunk object, then `[DONE]`."""
    out = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
    return out + [b"data: [DONE]\n\n"] if done else out


def chunk(delta: Mapping[str, object], finish_reason: str | None = None) -> dict[str, object]:
    """A `chat.completion.chunk` with one choice."""
    return {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gemini-2.0-flash",
        "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish_reason}],
    }


def sent_messages(running: RunningUpstream, n: int) -> Sequence[Mapping[str, object]]:
    """The `messages` of the n-th request (0-based) the upstream received."""
    body = running.app.requests[n].json
    assert body is not None
    messages = body["messages"]
    assert isinstance(messages, list)
    return messages
