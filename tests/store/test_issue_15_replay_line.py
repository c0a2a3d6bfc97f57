"""Issue 15, finding 8: a failed store write is logged on one line, the replay JSON in it.

SQLAlchemy's errors carry a multi-line `[SQL: ...]` block; logged as-is, the record was
four lines with `replay=` only on the last, so one grep for the message found no replay.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest

from tokenhub_stream import ChatMessage
from tokenhub_stream.asgi import CompletionRecord
from tokenhub_stream.store import ConversationRecorder, ConversationStore, Turn

pytestmark = pytest.mark.anyio

LOGGER = "tokenhub_stream.store"


def completion() -> CompletionRecord:
    return CompletionRecord(
        request_id="req-15",
        principal="alice",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hi\nthere"}],
        message=ChatMessage(content="Hello!\nTwo lines.", finish_reason="stop"),
        finish_reason="stop",
        usage=None,
        outcome="completed",
        status=200,
        error=None,
        started_at=1_700_000_000.0,
        ttfb=0.01,
        duration=0.2,
        bytes_sent=12,
    )


async def test_issue_15_replay_line_sqlalchemy_error_logs_one_line(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    path = tmp_path / "c.db"
    url = f"sqlite+aiosqlite:///{path}"
    async with ConversationStore(url) as store:
        await store.migrate()
        # A real database failure: the table the write needs is gone.
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE tokenhub_messages")
        recorder = ConversationRecorder(store)
        with caplog.at_level(logging.ERROR, logger=LOGGER):
            await recorder.on_complete(completion())  # does not raise
    [logged] = [r for r in caplog.records if r.name == LOGGER]
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    line = handler.format(logged)
    assert "\n" not in line and "\r" not in line, line
    assert "OperationalError" in line and "no such table" in line
    assert "[SQL:" in line  # the statement is kept, escaped onto the same line
    assert "request_id=req-15" in line
    replay = line.split(" replay=", 1)[1]
    turn = Turn.from_json(replay)
    assert turn.principal == "alice"
    assert [m.content for m in turn.messages] == ["Hi\nthere", "Hello!\nTwo lines."]
    assert turn == Turn.from_json(cast(str, logged.__dict__["tokenhub_turn"]))
    assert "no such table" in cast(str, logged.__dict__["tokenhub_error"])


async def test_issue_15_replay_line_every_line_break_is_escaped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(ConversationStore):
        async def record_turn(self, turn: Turn) -> str:
            raise RuntimeError("a\r\nb\rc\nd\x0be\x85f\u2028g")

    # The replay JSON keeps non-ASCII text as is, so a line separator in the answer
    # would reach the log raw without the escaping too.
    answer = ChatMessage(content="one\u2028two\x85three", finish_reason="stop")
    recorder = ConversationRecorder(Broken("sqlite+aiosqlite://"))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        await recorder.on_complete(replace(completion(), message=answer))
    [logged] = [r for r in caplog.records if r.name == LOGGER]
    message = logged.getMessage()
    assert len(message.splitlines()) == 1, message
    head, replay = message.split(" replay=", 1)
    assert head.endswith(r"error=RuntimeError: a\r\nb\rc\nd\u000be\u0085f\u2028g")
    turn = Turn.from_json(replay)  # the escapes are JSON's own: the replay is unchanged
    assert turn.messages[-1].content == "one\u2028two\x85three"
