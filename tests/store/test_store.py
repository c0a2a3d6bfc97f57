"""ConversationStore against SQLite and a real PostgreSQL server (every test runs on both)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from sqlalchemy import insert, inspect, select
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import create_async_engine

from tokenhub_stream import TokenHubError, Usage
from tokenhub_stream.store import (
    DEFAULT_STORE_URL,
    SCHEMA_VERSION,
    ConversationExists,
    ConversationNotFound,
    ConversationStore,
    Message,
    SchemaError,
    StoreError,
    Turn,
)
from tokenhub_stream.store._schema import schema, utcnow

pytestmark = pytest.mark.anyio

TOOL_CALL: dict[str, object] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "days": [1, 2]}'},
    "extra_content": {"google": {"thought_signature": "c2ln"}},
}


async def _tables(url: str) -> tuple[set[str], list[int]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            versions = list((await conn.execute(select(schema.c.version))).scalars())
    finally:
        await engine.dispose()
    return names, versions


# --- schema and migrations --------------------------------------------------------------------


async def test_store_migrate_creates_schema_and_is_idempotent(store_url: str) -> None:
    async with ConversationStore(store_url) as store:
        assert await store.migrate() == SCHEMA_VERSION == 2
        assert await store.migrate() == SCHEMA_VERSION
    async with ConversationStore(store_url) as again:  # another process, same database
        assert await again.migrate() == SCHEMA_VERSION
    names, versions = await _tables(store_url)
    assert {"tokenhub_schema", "tokenhub_conversations", "tokenhub_messages"} <= names
    assert versions == [1, 2]


async def test_store_migrates_lazily_on_first_use(store_url: str) -> None:
    async with ConversationStore(store_url) as store:
        assert await store.list_conversations("alice") == []
    names, versions = await _tables(store_url)
    assert "tokenhub_messages" in names
    assert versions == [1, 2]


async def test_store_concurrent_first_use_migrates_once(store_url: str) -> None:
    stores = [ConversationStore(store_url) for _ in range(3)]
    try:
        async with anyio.create_task_group() as tg:
            for s in stores:
                tg.start_soon(s.migrate)
                tg.start_soon(s.list_conversations, "alice")
    finally:
        for s in stores:
            await s.aclose()
    assert (await _tables(store_url))[1] == [1, 2]


async def test_store_refuses_a_newer_schema(store_url: str) -> None:
    async with ConversationStore(store_url) as store:
        await store.migrate()
    engine = create_async_engine(store_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(schema).values(version=SCHEMA_VERSION + 1, applied=utcnow()))
    finally:
        await engine.dispose()
    async with ConversationStore(store_url) as newer:
        with pytest.raises(SchemaError, match="newer") as info:
            await newer.migrate()
    assert isinstance(info.value, StoreError)
    assert isinstance(info.value, TokenHubError)


# --- conversations and messages ---------------------------------------------------------------


async def test_store_append_list_get(store: ConversationStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    first = await store.create_conversation("alice", title="Trip")
    second = await store.create_conversation("alice")
    assert first.id != second.id
    assert first.principal == "alice" and first.title == "Trip" and first.message_count == 0

    stored = await store.append_messages(
        "alice", first.id, [Message("system", "Be brief."), Message("user", "Hi")]
    )
    assert [m.position for m in stored] == [0, 1]
    more = await store.append_messages("alice", first.id, [Message("assistant", "Hello!")])
    assert more[0].position == 2

    got = await store.get_conversation("alice", first.id)
    assert got is not None
    assert [(m.position, m.role, m.content) for m in got.messages] == [
        (0, "system", "Be brief."),
        (1, "user", "Hi"),
        (2, "assistant", "Hello!"),
    ]
    assert got.message_count == 3
    assert got.to_messages()[1] == {"role": "user", "content": "Hi"}
    for message in got.messages:
        assert message.created is not None and message.created.tzinfo is not None
        assert message.created > before
    assert got.created.tzinfo is not None and got.created > before

    listed = await store.list_conversations("alice")
    assert [c.id for c in listed] == [first.id, second.id]  # most recently updated first
    assert listed[0].message_count == 3 and listed[0].messages == ()
    assert [c.id for c in await store.list_conversations("alice", limit=1)] == [first.id]
    with pytest.raises(ValueError):
        await store.list_conversations("alice", limit=0)


async def test_store_json_fields_round_trip(store: ConversationStore) -> None:
    conversation = await store.create_conversation("alice")
    answer = Message(
        role="assistant",
        content=None,
        tool_calls=(TOOL_CALL,),
        model="gpt-4o-mini",
        finish_reason="tool_calls",
        usage=Usage(prompt_tokens=12, completion_tokens=7, total_tokens=19, reasoning_tokens=3),
        ttfb=0.125,
        duration=1.5,
        outcome="completed",
        request_id="abc123",
    )
    tool = Message("tool", '{"temp": 21}', tool_call_id="call_1")
    unicode = Message("user", "naïve — 日本語 🙂\nline two")
    await store.append_messages("alice", conversation.id, [answer, tool, unicode])
    got = await store.get_conversation("alice", conversation.id)
    assert got is not None
    back, tool_back, unicode_back = got.messages
    assert back.tool_calls == (TOOL_CALL,)
    assert back.usage == answer.usage
    assert (back.model, back.finish_reason, back.outcome) == (
        "gpt-4o-mini",
        "tool_calls",
        "completed",
    )
    assert (back.ttfb, back.duration, back.request_id, back.content) == (0.125, 1.5, "abc123", None)
    assert back.error is None and back.tool_call_id is None
    assert tool_back.tool_call_id == "call_1"
    assert unicode_back.content == unicode.content
    assert got.to_messages()[:2] == [
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"},
    ]


async def test_store_concurrent_appends_keep_order(store: ConversationStore) -> None:
    conversation = await store.create_conversation("alice")
    turns = 25

    async def turn(i: int) -> None:
        await store.append_messages(
            "alice",
            conversation.id,
            [Message("user", f"q{i}"), Message("assistant", f"a{i}")],
        )

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(turns):
                tg.start_soon(turn, i)
    got = await store.get_conversation("alice", conversation.id)
    assert got is not None
    assert [m.position for m in got.messages] == list(range(2 * turns))
    pairs = [(got.messages[i].content, got.messages[i + 1].content) for i in range(0, 2 * turns, 2)]
    assert all(q == "q" + a[1:] for q, a in pairs if q and a), pairs  # each turn stays together
    assert sorted(q for q, _ in pairs if q) == sorted(f"q{i}" for i in range(turns))
    assert got.message_count == 2 * turns


async def test_store_delete(store: ConversationStore) -> None:
    conversation = await store.create_conversation("alice")
    await store.append_messages("alice", conversation.id, [Message("user", "x")])
    assert await store.delete_conversation("alice", conversation.id) is True
    assert await store.get_conversation("alice", conversation.id) is None
    assert await store.delete_conversation("alice", conversation.id) is False
    assert await store.delete_conversation("alice", "not a valid id!") is False
    # The id is free again, and nothing of the old messages comes back.
    again = await store.create_conversation("alice", conversation_id=conversation.id)
    got = await store.get_conversation("alice", again.id)
    assert got is not None and got.messages == ()


async def test_store_create_with_chosen_id(store: ConversationStore) -> None:
    made = await store.create_conversation("alice", conversation_id="browser-made_id-1")
    assert made.id == "browser-made_id-1"
    with pytest.raises(ConversationExists):
        await store.create_conversation("alice", conversation_id="browser-made_id-1")
    with pytest.raises(ConversationExists):  # taken by anyone: nobody learns whose
        await store.create_conversation("bob", conversation_id="browser-made_id-1")
    for bad in ("", "x" * 65, "has space", "slash/", "dot."):
        with pytest.raises(ValueError):
            await store.create_conversation("alice", conversation_id=bad)


async def test_store_append_to_missing_conversation(store: ConversationStore) -> None:
    with pytest.raises(ConversationNotFound):
        await store.append_messages("alice", "nope", [Message("user", "x")])
    with pytest.raises(ConversationNotFound):
        await store.append_messages("alice", "in/valid", [Message("user", "x")])
    conversation = await store.create_conversation("alice")
    assert await store.append_messages("alice", conversation.id, []) == []
    assert await store.get_conversation("alice", "in/valid") is None


# --- principal isolation ----------------------------------------------------------------------


async def test_store_principals_cannot_list_or_read_each_other(store: ConversationStore) -> None:
    alice = await store.create_conversation("alice", title="alice's secret")
    await store.append_messages("alice", alice.id, [Message("user", "my secret")])
    bob = await store.create_conversation("bob", title="bob's")

    assert [c.id for c in await store.list_conversations("alice")] == [alice.id]
    assert [c.id for c in await store.list_conversations("bob")] == [bob.id]
    assert await store.list_conversations("mallory") == []
    assert await store.list_conversations("") == []
    assert await store.list_conversations("%") == []  # not a pattern

    assert await store.get_conversation("bob", alice.id) is None
    assert await store.get_conversation("ALICE", alice.id) is None
    with pytest.raises(ConversationNotFound):
        await store.append_messages("bob", alice.id, [Message("user", "injected")])
    assert await store.delete_conversation("bob", alice.id) is False

    got = await store.get_conversation("alice", alice.id)
    assert got is not None
    assert [m.content for m in got.messages] == ["my secret"]


async def test_store_record_turn_never_writes_into_anothers_conversation(
    store: ConversationStore, caplog: pytest.LogCaptureFixture
) -> None:
    alice = await store.create_conversation("alice")
    turn = Turn("bob", alice.id, (Message("user", "hello?"), Message("assistant", "hi")))
    with caplog.at_level(logging.WARNING, logger="tokenhub_stream.store"):
        written = await store.record_turn(turn)
    assert written != alice.id
    assert "another principal" in caplog.text
    alice_view = await store.get_conversation("alice", alice.id)
    assert alice_view is not None and alice_view.messages == ()
    bob_view = await store.get_conversation("bob", written)
    assert bob_view is not None
    assert [m.content for m in bob_view.messages] == ["hello?", "hi"]


# --- record_turn ------------------------------------------------------------------------------


async def test_store_record_turn_creates_then_appends(store: ConversationStore) -> None:
    first = Turn(
        "alice",
        "chat-1",
        (Message("system", "sys"), Message("user", "  What is\nthe capital of France? " * 5)),
    )
    assert await store.record_turn(first) == "chat-1"
    second = Turn(
        "alice", "chat-1", (Message("user", "And Spain?"), Message("assistant", "Madrid"))
    )
    assert await store.record_turn(second) == "chat-1"
    got = await store.get_conversation("alice", "chat-1")
    assert got is not None
    assert [m.role for m in got.messages] == ["system", "user", "user", "assistant"]
    assert got.title.startswith("What is the capital of France?")
    assert len(got.title) == 80 and got.title.endswith("…")


async def test_store_record_turn_without_id_starts_a_new_conversation(
    store: ConversationStore,
) -> None:
    turn = Turn("alice", None, (Message("user", "hi"),), title="Greeting")
    a = await store.record_turn(turn)
    b = await store.record_turn(turn)
    assert a != b
    got = await store.get_conversation("alice", a)
    assert got is not None and got.title == "Greeting"
    invalid = Turn("alice", "bad id!", (Message("user", "hi"),))
    c = await store.record_turn(invalid)
    assert c not in (a, b, "bad id!")


async def test_store_record_turn_concurrent_first_turns_share_the_id(
    store: ConversationStore,
) -> None:
    turns = [Turn("alice", "same", (Message("user", f"q{i}"),)) for i in range(5)]
    results: list[str] = []

    async def record(turn: Turn) -> None:
        results.append(await store.record_turn(turn))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for turn in turns:
                tg.start_soon(record, turn)
    assert results == ["same"] * 5
    got = await store.get_conversation("alice", "same")
    assert got is not None and len(got.messages) == 5


# --- construction -----------------------------------------------------------------------------


async def test_store_default_url_creates_the_file_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = ConversationStore()
    assert DEFAULT_STORE_URL.endswith("tokenhub_conversations.db")
    assert not (tmp_path / "tokenhub_conversations.db").exists()
    async with store:
        await store.create_conversation("alice")
    assert (tmp_path / "tokenhub_conversations.db").is_file()


async def test_store_creates_missing_folders_and_accepts_plain_sqlite_url(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "chats.db"
    async with ConversationStore(f"sqlite:///{path}") as store:
        assert store.url.drivername == "sqlite+aiosqlite"
        conversation = await store.create_conversation("alice")
    assert path.is_file()
    async with ConversationStore(f"sqlite+aiosqlite:///{path}") as reopened:
        assert await reopened.get_conversation("alice", conversation.id) is not None


async def test_store_in_memory_sqlite() -> None:
    async with ConversationStore("sqlite+aiosqlite://") as store:
        conversation = await store.create_conversation("alice")
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(
                    store.append_messages, "alice", conversation.id, [Message("user", str(i))]
                )
                tg.start_soon(store.list_conversations, "alice")
        got = await store.get_conversation("alice", conversation.id)
        assert got is not None and len(got.messages) == 5


def test_store_repr_hides_the_password() -> None:
    store = ConversationStore("postgresql://user:hunter2@db.internal:5432/chats")
    assert store.url.drivername == "postgresql+asyncpg"
    assert "hunter2" not in repr(store)
    assert (
        repr(store)
        == "ConversationStore(url='postgresql+asyncpg://user:***@db.internal:5432/chats')"
    )


def test_store_bad_urls_fail_early() -> None:
    with pytest.raises(ArgumentError):
        ConversationStore("not a url")
    with pytest.raises(ArgumentError):
        ConversationStore("mysql+nosuchdriver://u@h/db")
    with pytest.raises(ImportError, match="tokenhub_stream\\[store\\]"):
        ConversationStore("mysql+aiomysql://u@h/db")  # a known dialect, driver not installed
