"""The store's pure data: Message, Conversation, Turn and its replay JSON (no database)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import DBAPIError

from tokenhub_stream import ChatMessage, Usage
from tokenhub_stream.asgi import CompletionRecord
from tokenhub_stream.store import (
    Conversation,
    ConversationRecorder,
    ConversationStore,
    Message,
    Turn,
)

TOOL_CALL: dict[str, object] = {
    "id": "c1",
    "type": "function",
    "function": {"name": "f", "arguments": "{}"},
}


def test_turn_json_round_trips_every_field() -> None:
    answer = Message(
        role="assistant",
        content="partial",
        tool_calls=(TOOL_CALL,),
        model="m",
        finish_reason=None,
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3, cached_tokens=1),
        ttfb=0.5,
        duration=2.0,
        outcome="client-disconnected",
        error="gone",
        request_id="r1",
    )
    turn = Turn("alice", "chat-1", (Message("tool", "42", tool_call_id="c1"), answer), "T")
    text = turn.to_json()
    assert "\n" not in text
    assert Turn.from_json(text) == turn
    assert Turn.from_json(text.encode()) == turn
    assert repr(turn) == "Turn(principal='alice', conversation_id='chat-1', messages=2)"


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        '{"principal": 1, "conversation_id": null, "messages": []}',
        '{"principal": "a", "conversation_id": 5, "messages": []}',
        '{"principal": "a", "conversation_id": null, "messages": {}}',
        '{"principal": "a", "conversation_id": null, "messages": [1]}',
        '{"principal": "a", "conversation_id": null, "messages": [{"content": "x"}]}',
        '{"principal": "a", "conversation_id": null, "messages": [{"role": "x", "outcome": "?"}]}',
        "not json",
    ],
)
def test_turn_from_json_rejects_bad_shapes(text: str) -> None:
    with pytest.raises(ValueError):
        Turn.from_json(text)


def test_message_from_json_ignores_wrong_types() -> None:
    raw: dict[str, object] = {
        "role": "assistant",
        "content": 5,
        "tool_calls": "nope",
        "usage": {"prompt_tokens": True, "completion_tokens": 2},
        "ttfb": "fast",
        "duration": 1,
    }
    message = Message.from_json_dict(raw)
    assert message.content is None and message.tool_calls == ()
    assert message.usage == Usage(completion_tokens=2)
    assert message.ttfb is None and message.duration == 1.0


def test_message_repr_and_to_dict() -> None:
    long = Message("user", "x" * 100, position=3)
    assert repr(long) == (
        f"Message(role='user', content='{'x' * 37}...', position=3, outcome=None)"
    )
    assert Message("assistant", None, tool_calls=(TOOL_CALL,)).to_dict() == {
        "role": "assistant",
        "content": None,
        "tool_calls": [TOOL_CALL],
    }


def test_conversation_repr_and_history() -> None:
    now = datetime.now(UTC)
    conversation = Conversation(
        "c", "alice", "Title", now, now, 2, (Message("user", "q"), Message("assistant", "a"))
    )
    assert repr(conversation) == (
        "Conversation(id='c', principal='alice', title='Title', message_count=2)"
    )
    assert conversation.to_messages() == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_recorder_turn_odd_content_and_no_user_message() -> None:
    recorder = ConversationRecorder(ConversationStore("sqlite+aiosqlite://"))
    record = CompletionRecord(
        request_id="r",
        principal="p",
        model="m",
        messages=[{"role": "user", "content": 42}, {"role": "user"}],
        message=ChatMessage(),
        finish_reason=None,
        usage=None,
        outcome="upstream_error",
        status=502,
        error="The upstream answered 500.",
        started_at=0.0,
        ttfb=None,
        duration=0.1,
        bytes_sent=0,
    )
    turn = recorder.turn(record)
    assert [m.content for m in turn.messages] == ["42", None, ""]
    assert turn.title == "42"
    assert recorder.turn(replace(record, messages=[])).title == ""


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_store_migrate_gives_up_on_a_broken_database(tmp_path: Path) -> None:
    path = tmp_path / "not-a-database.db"
    path.write_bytes(b"this is not SQLite" * 100)
    async with ConversationStore(f"sqlite+aiosqlite:///{path}") as store:
        with pytest.raises(DBAPIError):
            await store.migrate()
        with pytest.raises(DBAPIError):
            await store.list_conversations("alice")


def test_store_times_are_naive_utc_in_the_database_and_aware_utc_out() -> None:
    from datetime import timedelta, timezone

    from sqlalchemy.dialects import sqlite

    from tokenhub_stream.store._schema import UTCDateTime

    kind, dialect = UTCDateTime(), sqlite.dialect()
    paris = datetime(2026, 7, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert kind.process_bind_param(paris, dialect) == datetime(2026, 7, 1, 12, 0)
    assert kind.process_bind_param(None, dialect) is None
    naive = datetime(2026, 7, 1, 12, 0)
    assert kind.process_result_value(naive, dialect) == datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
    assert kind.process_result_value(paris, dialect) == paris
    assert kind.process_result_value(paris, dialect).tzinfo == UTC  # type: ignore[union-attr]
    assert kind.process_result_value(None, dialect) is None


def test_store_exports_are_sorted_and_report_the_public_module() -> None:
    import inspect

    from tokenhub_stream import store

    assert store.__all__ == sorted(store.__all__)
    for name in store.__all__:
        value = getattr(store, name)
        if inspect.isclass(value):
            assert value.__module__ == "tokenhub_stream.store", name
