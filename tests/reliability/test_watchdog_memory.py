"""A finished stream's parser is not kept alive by the watchdog.

The watchdog thread keeps each stream's timer in a heap until its next check comes due,
up to the idle timeout later (60 s by default), whether or not the stream has ended. The
timer used to hold the stream's `ChunkParser`, and with it all the text and tool calls the
stream assembled: a busy client held about a minute's worth of finished answers. A stopped
timer now lets go of its parser.
"""

from __future__ import annotations

import gc

import pytest

import tokenhub_stream as ts
from tokenhub_stream._chunks import ChunkParser
from tokenhub_stream.testing import RunningUpstream, Script

from .conftest import KEY, MESSAGES

pytestmark = pytest.mark.anyio

ANSWER = "a finished answer " * 20


def live_parsers() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, ChunkParser)}


def test_finished_streams_parsers_are_freed_sync(upstream: RunningUpstream) -> None:
    before = live_parsers()
    timeout = ts.Timeout(first_token=60.0, idle=60.0)
    with ts.Client(base_url=upstream.base_url, api_key=KEY, timeout=timeout) as client:
        for _ in range(3):
            upstream.app.enqueue(Script(text=ANSWER))
            with client.stream_chat(MESSAGES) as stream:
                assert "".join(stream) == ANSWER
            del stream
        # The watchdog still holds the three timers (their checks are a minute away).
        assert live_parsers() - before == set()


async def test_finished_streams_parsers_are_freed_async(upstream: RunningUpstream) -> None:
    before = live_parsers()
    timeout = ts.Timeout(first_token=60.0, idle=60.0)
    async with ts.AsyncClient(base_url=upstream.base_url, api_key=KEY, timeout=timeout) as client:
        for _ in range(3):
            upstream.app.enqueue(Script(text=ANSWER))
            async with client.stream_chat(MESSAGES) as stream:
                assert "".join([text async for text in stream]) == ANSWER
            del stream
        assert live_parsers() - before == set()
