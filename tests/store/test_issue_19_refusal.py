"""#19 in the store: a model's refusal (`ChatMessage.refusal`) is kept with its turn.

Before, a turn whose answer was a refusal was stored as an assistant message with no
content and nothing else: the refusal was lost. Schema version 2 adds the nullable
`tokenhub_messages.refusal` column; a version 1 database is upgraded in place, rows kept.
Every test that touches a database runs on SQLite and on a real PostgreSQL server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import anyio
import httpx
import pytest
from sqlalchemy import Connection, insert, inspect, select
from sqlalchemy.ext.asyncio import create_async_engine

from tokenhub_stream import ChatMessage, Usage
from tokenhub_stream.store import (
    SCHEMA_VERSION,
    ConversationRecorder,
    ConversationStore,
    Message,
    SchemaError,
    Turn,
    _schema,
)
from tokenhub_stream.store._schema import conversations, messages, schema, utcnow
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream
from tokenhub_stream.tools import ToolSet, tool

from .test_recorder import KEY, Upstream, completion, proxied, wait_for_answer

pytestmark = pytest.mark.anyio

REFUSAL = "I'm sorry, I can't help with that request."
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TOOL_CALL: dict[str, object] = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "lookup", "arguments": '{"q": "x"}'},
}
# What version 1 of the library created, in its order.
V1_MESSAGE_COLUMNS = [
    "conversation_id",
    "position",
    "role",
    "content",
    "tool_calls",
    "tool_call_id",
    "model",
    "finish_reason",
    "usage",
    "ttfb",
    "duration",
    "outcome",
    "error",
    "request_id",
    "created",
]


# --- a version 1 database, as the library before #19 left it ---------------------------------


def _as_v1(conn: Connection) -> None:
    schema.create(conn)
    _schema._MIGRATIONS[0](conn)
    conn.execute(insert(schema).values(version=1, applied=WHEN))
    conn.execute(
        insert(conversations).values(
            id="old-chat",
            principal="alice",
            title="Old chat",
            created=WHEN,
            updated=WHEN,
            message_count=2,
        )
    )
    rows = [
        {"position": 0, "role": "user", "content": "Hi"},
        {
            "position": 1,
            "role": "assistant",
            "content": None,
            "tool_calls": [TOOL_CALL],
            "model": "gpt-4o",
            "finish_reason": "tool_calls",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            "ttfb": 0.25,
            "duration": 1.5,
            "outcome": "completed",
            "request_id": "req-old",
        },
    ]
    for row in rows:
        conn.execute(insert(messages).values(conversation_id="old-chat", created=WHEN, **row))


async def _run(url: str, step: Callable[[Connection], object]) -> object:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(step)
    finally:
        await engine.dispose()


def _state(conn: Connection) -> tuple[list[int], list[str]]:
    versions = sorted(conn.execute(select(schema.c.version)).scalars())
    columns = [c["name"] for c in inspect(conn).get_columns("tokenhub_messages")]
    return versions, columns


async def _assert_old_rows_intact(store: ConversationStore) -> None:
    old = await store.get_conversation("alice", "old-chat")
    assert old is not None
    assert (old.title, old.message_count, old.created) == ("Old chat", 2, WHEN)
    user, answer = old.messages
    assert (user.role, user.content, user.position, user.created) == ("user", "Hi", 0, WHEN)
    assert answer.tool_calls == (TOOL_CALL,) and answer.content is None
    assert answer.usage == Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
    assert (answer.model, answer.finish_reason, answer.outcome) == (
        "gpt-4o",
        "tool_calls",
        "completed",
    )
    assert (answer.ttfb, answer.duration, answer.request_id) == (0.25, 1.5, "req-old")
    assert user.refusal is None and answer.refusal is None  # a v1 row had none


# --- the migration ----------------------------------------------------------------------------


async def test_issue_19_refusal_v1_database_migrates_in_place(store_url: str) -> None:
    await _run(store_url, _as_v1)
    assert await _run(store_url, _state) == ([1], V1_MESSAGE_COLUMNS)  # v1, as it was
    async with ConversationStore(store_url) as store:
        assert await store.migrate() == SCHEMA_VERSION == 2
        assert await store.migrate() == 2  # idempotent
        await _assert_old_rows_intact(store)
        [stored] = await store.append_messages(
            "alice", "old-chat", [Message("assistant", "", refusal=REFUSAL)]
        )
        assert stored.position == 2
        again = await store.get_conversation("alice", "old-chat")
        assert again is not None and again.messages[2].refusal == REFUSAL
    assert await _run(store_url, _state) == ([1, 2], [*V1_MESSAGE_COLUMNS, "refusal"])


async def test_issue_19_refusal_fresh_database_is_created_at_v2(store_url: str) -> None:
    async with ConversationStore(store_url) as store:
        assert await store.migrate() == 2
    # The same table as an upgraded v1 database: the steps, not today's shape, built it.
    assert await _run(store_url, _state) == ([1, 2], [*V1_MESSAGE_COLUMNS, "refusal"])


async def test_issue_19_refusal_concurrent_upgrade_of_a_v1_database(store_url: str) -> None:
    await _run(store_url, _as_v1)
    stores = [ConversationStore(store_url) for _ in range(3)]
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for s in stores:
                    tg.start_soon(s.migrate)
        await _assert_old_rows_intact(stores[0])
    finally:
        for s in stores:
            await s.aclose()
    assert await _run(store_url, _state) == ([1, 2], [*V1_MESSAGE_COLUMNS, "refusal"])


async def test_issue_19_refusal_failed_upgrade_rolls_back_whole(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On SQLite DDL outside a transaction commits at once: a step that failed after its
    # ALTER would have left the column without the version row, and every later start
    # would fail on "duplicate column". The step runs inside the version row's transaction.
    await _run(store_url, _as_v1)
    real = _schema._MIGRATIONS

    def v2_then_fail(conn: Connection) -> None:
        real[1](conn)
        raise RuntimeError("the process died here")

    monkeypatch.setattr(_schema, "_MIGRATIONS", (real[0], v2_then_fail))
    async with ConversationStore(store_url) as store:
        with pytest.raises(RuntimeError, match="died"):
            await store.migrate()
    assert await _run(store_url, _state) == ([1], V1_MESSAGE_COLUMNS)
    monkeypatch.setattr(_schema, "_MIGRATIONS", real)
    async with ConversationStore(store_url) as store:
        assert await store.migrate() == 2
        await _assert_old_rows_intact(store)


async def test_issue_19_refusal_newer_database_than_v2_is_refused(store_url: str) -> None:
    async with ConversationStore(store_url) as store:
        await store.migrate()
    await _run(
        store_url, lambda conn: conn.execute(insert(schema).values(version=3, applied=utcnow()))
    )
    async with ConversationStore(store_url) as store:
        with pytest.raises(SchemaError, match="version 3, newer than this library's 2"):
            await store.list_conversations("alice")


# --- the message, stored and read back --------------------------------------------------------


async def test_issue_19_refusal_round_trips_through_the_store(store: ConversationStore) -> None:
    conversation = await store.create_conversation("alice")
    refused = Message("assistant", "", model="gpt-4o", outcome="completed", refusal=REFUSAL)
    plain = Message("assistant", "Sure.")
    await store.append_messages("alice", conversation.id, [Message("user", "Q"), refused, plain])
    got = await store.get_conversation("alice", conversation.id)
    assert got is not None
    assert [m.refusal for m in got.messages] == [None, REFUSAL, None]
    # The history to send again: the refusal as OpenAI's assistant message carries it
    # (as `ChatMessage.to_dict()` does), and no `refusal` key where there was none.
    assert got.to_messages() == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "refusal": REFUSAL},
        {"role": "assistant", "content": "Sure."},
    ]
    # A turn written by record_turn (the proxy's path, or a replayed log line) keeps it.
    turn = Turn("alice", conversation.id, (Message("user", "Again?"), refused))
    assert await store.record_turn(Turn.from_json(turn.to_json())) == conversation.id
    again = await store.get_conversation("alice", conversation.id)
    assert again is not None and again.messages[-1].refusal == REFUSAL


def test_issue_19_refusal_in_the_turn_json_and_the_recorders_turn() -> None:
    line = Turn("alice", "c1", (Message("assistant", "", refusal=REFUSAL),)).to_json()
    assert json.loads(line)["messages"][0]["refusal"] == REFUSAL
    assert Turn.from_json(line).messages[0].refusal == REFUSAL
    assert "refusal" not in json.loads(Turn("a", None, (Message("user", "x"),)).to_json())

    recorder = ConversationRecorder(ConversationStore("sqlite+aiosqlite://"))
    record = completion(message=ChatMessage(content="", refusal=REFUSAL, finish_reason="stop"))
    answer = recorder.turn(record).messages[-1]
    assert (answer.role, answer.content, answer.refusal) == ("assistant", "", REFUSAL)
    assert recorder.turn(completion()).messages[-1].refusal is None


# --- through ChatProxy: streamed, whole, and through its own tool loop ------------------------


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    app = FakeChatUpstream(api_key=KEY, delay=0.001)
    with run_upstream(app) as running:
        yield app, running


@tool
def lookup(q: str) -> str:
    """Look something up.

    Args:
        q: what to look up.
    """
    return f"found {q}"


@pytest.mark.parametrize(
    ("stream", "tools"),
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["streamed", "whole", "tool-loop-streamed", "tool-loop-whole"],
)
async def test_issue_19_refusal_recorded_by_the_proxy(
    upstream: Upstream, store_url: str, stream: bool, tools: bool
) -> None:
    app, _ = upstream
    app.enqueue(Script(refusal=REFUSAL))
    options: dict[str, object] = {"tools": ToolSet([lookup])} if tools else {}
    with proxied(upstream, store_url, **options) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                asked = [{"role": "user", "content": "Describe Mars"}]
                body = {"messages": asked, "stream": stream}
                headers = {"x-user": "alice", "x-conversation-id": "chat-refused"}
                response = await client.post(f"{url}/api/chat", json=body, headers=headers)
                assert response.status_code == 200
                assert REFUSAL.split()[-1] in response.text  # it reached the client
                got = await wait_for_answer(store_url, "alice", "chat-refused", 2)
    question, answer = got.messages
    assert (question.role, question.content) == ("user", "Describe Mars")
    assert answer.role == "assistant" and answer.outcome == "completed"
    assert answer.refusal == REFUSAL
    assert not answer.content  # the refusal is never stored as content
    assert got.to_messages()[1]["refusal"] == REFUSAL
