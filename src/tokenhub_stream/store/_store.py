"""`ConversationStore`: conversations per principal on SQLAlchemy's async engine.

Every query filters on the principal: there is no call that reads, lists, appends to or
deletes a conversation without naming whose it is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime
from typing import cast

import anyio
from sqlalchemy import delete, event, insert, select, update
from sqlalchemy.engine import URL, Row, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ._exceptions import ConversationExists, ConversationNotFound
from ._models import (
    Conversation,
    Message,
    Turn,
    new_conversation_id,
    outcome_from_json,
    title_from,
    tool_calls_from_json,
    usage_from_json,
    usage_to_json,
    valid_conversation_id,
)
from ._recorder import ConversationRecorder
from ._schema import conversations, messages, migrate_sync, utcnow

__all__ = ["DEFAULT_STORE_URL", "ConversationStore"]

logger = logging.getLogger("tokenhub_stream.store")

DEFAULT_STORE_URL = "sqlite+aiosqlite:///tokenhub_conversations.db"
DEFAULT_LIST_LIMIT = 100
_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}
_MIGRATE_ATTEMPTS = 3


class ConversationStore:
    """Conversations and their messages, per principal, in SQLite or PostgreSQL.

    ```python
    async with ConversationStore("sqlite+aiosqlite:///chats.db") as store:
        conversation = await store.create_conversation("alice", title="Trip")
        await store.append_messages("alice", conversation.id, [Message("user", "Hi")])
        await store.list_conversations("alice")
    ```

    The schema is created (and migrated) on first use, or by `await store.migrate()`. A
    SQLite file and its folder are created on first use. Runs on asyncio (SQLAlchemy's
    async engine); `url` without a driver gets the async one (`sqlite` -> aiosqlite,
    `postgresql` -> asyncpg).

    Args:
        url: a SQLAlchemy URL: `sqlite+aiosqlite:///path.db` (the default is
            `tokenhub_conversations.db` in the working directory) or
            `postgresql+asyncpg://user:password@host/dbname`.
        echo: log every SQL statement (SQLAlchemy's `echo`).

    Raises:
        sqlalchemy.exc.ArgumentError: `url` is not a database URL.
        ImportError: the URL's driver is not installed.
    """

    def __init__(self, url: str = DEFAULT_STORE_URL, *, echo: bool = False) -> None:
        parsed = _async_url(make_url(url))
        self.url = parsed
        backend = parsed.get_backend_name()
        self._sqlite = backend == "sqlite"
        database = parsed.database or ""
        memory = self._sqlite and (database in ("", ":memory:") or "mode=memory" in str(parsed))
        self._sqlite_file = self._sqlite and not memory and not database.startswith("file:")
        try:
            self._engine: AsyncEngine = create_async_engine(parsed, echo=echo)
        except ImportError as exc:
            raise ImportError(
                f"ConversationStore needs the {parsed.drivername!r} driver: "
                "pip install 'tokenhub_stream[store]' (SQLite) or "
                "'tokenhub_stream[postgres]' (PostgreSQL)"
            ) from exc
        if self._sqlite:
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas(not memory))
        # SQLite has one writer at a time: queue our own writers here instead of in its
        # busy handler (which sleeps and backs off). An in-memory database is one shared
        # connection, so reads queue too.
        self._write_lock = anyio.Lock() if self._sqlite else None
        self._read_lock = self._write_lock if memory else None
        self._migrate_lock = anyio.Lock()
        self._migrated = False

    def __repr__(self) -> str:
        return f"ConversationStore(url={self.url.render_as_string(hide_password=True)!r})"

    async def __aenter__(self) -> ConversationStore:
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (a later call opens a new one)."""
        await self._engine.dispose()

    # --- schema -----------------------------------------------------------------------------

    async def migrate(self) -> int:
        """Create or upgrade the tables to this library's schema; return its version.

        Idempotent, and safe to run from several processes at once. Every other method
        runs it once, lazily.

        Raises:
            SchemaError: the database was migrated by a newer version of the library.
            sqlalchemy.exc.SQLAlchemyError: the database failed.
        """
        async with self._migrate_lock:
            version = await self._migrate()
            self._migrated = True
            return version

    async def _migrate(self) -> int:
        if self._sqlite_file and self.url.database:
            await anyio.Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, _MIGRATE_ATTEMPTS + 1):
            try:
                async with self._connection(write=True) as conn:
                    return await conn.run_sync(migrate_sync)
            except DBAPIError:
                # Two processes creating the same table: the loser sees the winner's
                # tables on the next attempt.
                if attempt == _MIGRATE_ATTEMPTS:
                    raise
                await anyio.sleep(0.05 * attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _ready(self) -> None:
        if self._migrated:
            return
        async with self._migrate_lock:
            if not self._migrated:
                await self._migrate()
                self._migrated = True

    @contextlib.asynccontextmanager
    async def _connection(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        lock = self._write_lock if write else self._read_lock
        async with lock or contextlib.nullcontext():
            async with self._engine.begin() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def _transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        await self._ready()
        async with self._connection(write=write) as conn:
            yield conn

    # --- conversations ----------------------------------------------------------------------

    async def create_conversation(
        self, principal: str, *, title: str = "", conversation_id: str | None = None
    ) -> Conversation:
        """Start an empty conversation owned by `principal`.

        ```python
        conversation = await store.create_conversation("alice", title="Trip planning")
        ```

        Args:
            principal: the owner (whatever `ChatProxy(authorize=...)` returned, as text).
            title: shown in a list of conversations.
            conversation_id: an id of the caller's choice (1-64 of `A-Z a-z 0-9 _ -`), for
                example one the browser made; default: a new random id.

        Raises:
            ValueError: `conversation_id` is not a valid id.
            ConversationExists: `conversation_id` is taken (by any principal).
        """
        if conversation_id is None:
            conversation_id = new_conversation_id()
        elif not valid_conversation_id(conversation_id):
            raise ValueError("conversation_id must be 1-64 characters of A-Z a-z 0-9 _ -")
        now = utcnow()
        try:
            async with self._transaction(write=True) as conn:
                await _insert_conversation(conn, conversation_id, principal, title, now)
        except IntegrityError:
            raise ConversationExists(f"conversation id {conversation_id!r} is taken") from None
        return Conversation(conversation_id, principal, title, now, now)

    async def get_conversation(self, principal: str, conversation_id: str) -> Conversation | None:
        """The conversation with its messages, oldest first; `None` unless `principal` owns it.

        ```python
        conversation = await store.get_conversation("alice", conversation_id)
        ```
        """
        if not valid_conversation_id(conversation_id):
            return None
        async with self._transaction(write=False) as conn:
            row = (
                await conn.execute(
                    select(conversations).where(
                        conversations.c.id == conversation_id,
                        conversations.c.principal == principal,
                    )
                )
            ).first()
            if row is None:
                return None
            rows = await conn.execute(
                select(messages)
                .where(messages.c.conversation_id == conversation_id)
                .order_by(messages.c.position)
            )
            stored = tuple(_message(r) for r in rows)
        return replace(_conversation(row), message_count=len(stored), messages=stored)

    async def list_conversations(
        self, principal: str, *, limit: int = DEFAULT_LIST_LIMIT
    ) -> list[Conversation]:
        """`principal`'s conversations, most recently updated first, without their messages.

        ```python
        for conversation in await store.list_conversations("alice"):
            print(conversation.title, conversation.message_count)
        ```

        Raises:
            ValueError: `limit` is not positive.
        """
        if limit < 1:
            raise ValueError("limit must be positive")
        async with self._transaction(write=False) as conn:
            rows = await conn.execute(
                select(conversations)
                .where(conversations.c.principal == principal)
                .order_by(conversations.c.updated.desc(), conversations.c.id.desc())
                .limit(limit)
            )
            return [_conversation(row) for row in rows]

    async def delete_conversation(self, principal: str, conversation_id: str) -> bool:
        """Delete the conversation and its messages; `False` unless `principal` owned it.

        ```python
        await store.delete_conversation("alice", conversation_id)
        ```
        """
        if not valid_conversation_id(conversation_id):
            return False
        async with self._transaction(write=True) as conn:
            result = await conn.execute(
                delete(conversations).where(
                    conversations.c.id == conversation_id,
                    conversations.c.principal == principal,
                )
            )
            if result.rowcount == 0:
                return False
            # Also done by ON DELETE CASCADE; explicit for a SQLite opened without
            # foreign keys by another program.
            await conn.execute(
                delete(messages).where(messages.c.conversation_id == conversation_id)
            )
        return True

    # --- messages ---------------------------------------------------------------------------

    async def append_messages(
        self, principal: str, conversation_id: str, new: Iterable[Message]
    ) -> list[Message]:
        """Append messages, in order, to `principal`'s conversation; return them as stored.

        ```python
        stored = await store.append_messages("alice", conversation.id, [Message("user", "Hi")])
        ```

        Concurrent appends to one conversation never interleave: each call's messages get
        consecutive positions.

        Raises:
            ConversationNotFound: `principal` has no such conversation.
        """
        items = list(new)
        async with self._transaction(write=True) as conn:
            stored = await _append(conn, principal, conversation_id, items, utcnow())
        if stored is None:
            raise ConversationNotFound(f"no conversation {conversation_id!r} for this principal")
        return stored

    async def record_turn(self, turn: Turn) -> str:
        """Write a `Turn` in one transaction; return the id of the conversation it went to.

        ```python
        conversation_id = await store.record_turn(Turn.from_json(logged_json))  # a replay
        ```

        The turn goes to `turn.conversation_id` when `turn.principal` owns it, or to a new
        conversation with that id when the id is free. Without an id, or when the id is
        invalid or belongs to another principal, it starts a new conversation.

        Raises:
            sqlalchemy.exc.SQLAlchemyError: the database failed.
        """
        try:
            return await self._record_turn(turn)
        except IntegrityError:
            # Two first turns raced to create the same id; the loser appends now.
            return await self._record_turn(turn)

    async def _record_turn(self, turn: Turn) -> str:
        wanted = turn.conversation_id
        if wanted is not None and not valid_conversation_id(wanted):
            logger.warning("invalid conversation id ignored: a new conversation starts")
            wanted = None
        now = utcnow()
        async with self._transaction(write=True) as conn:
            if wanted is not None:
                if await _append(conn, turn.principal, wanted, turn.messages, now) is not None:
                    return wanted
                owner = await conn.scalar(
                    select(conversations.c.principal).where(conversations.c.id == wanted)
                )
                if owner == turn.principal:
                    # Created by a concurrent first turn that committed after our UPDATE.
                    await _append(conn, turn.principal, wanted, turn.messages, now)
                    return wanted
                if owner is not None:
                    logger.warning(
                        "conversation id %r belongs to another principal: a new "
                        "conversation starts",
                        wanted,
                    )
                    wanted = None
            conversation_id = wanted or new_conversation_id()
            title = turn.title or title_from(turn.messages)
            await _insert_conversation(conn, conversation_id, turn.principal, title, now)
            await _append(conn, turn.principal, conversation_id, turn.messages, now)
        return conversation_id

    # --- the proxy hook ---------------------------------------------------------------------

    def recorder(
        self,
        *,
        header: str = "X-Conversation-Id",
        body_field: str = "conversation_id",
        principal: Callable[[object], str] | None = None,
        timeout: float = 10.0,
    ) -> ConversationRecorder:
        """Hooks for `ChatProxy` that write every turn here: `**store.recorder().hooks()`.

        ```python
        proxy = ChatProxy(api_key=key, base_url=url, **store.recorder().hooks())
        ```

        See `ConversationRecorder` for the arguments.
        """
        return ConversationRecorder(
            self, header=header, body_field=body_field, principal=principal, timeout=timeout
        )


# --- helpers ----------------------------------------------------------------------------------


def _async_url(url: URL) -> URL:
    driver = _ASYNC_DRIVERS.get(url.drivername)
    return url.set(drivername=driver) if driver else url


def _sqlite_pragmas(file: bool) -> Callable[[object, object], None]:
    def on_connect(dbapi_connection: object, record: object) -> None:
        cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            if file:
                # Readers no longer wait for the writer (and the writer not for readers).
                cursor.execute("PRAGMA journal_mode=WAL")
        finally:
            cursor.close()

    return on_connect


async def _insert_conversation(
    conn: AsyncConnection, conversation_id: str, principal: str, title: str, now: datetime
) -> None:
    await conn.execute(
        insert(conversations).values(
            id=conversation_id,
            principal=principal,
            title=title,
            created=now,
            updated=now,
            message_count=0,
        )
    )


async def _append(
    conn: AsyncConnection,
    principal: str,
    conversation_id: str,
    items: Sequence[Message],
    now: datetime,
) -> list[Message] | None:
    # The UPDATE both checks ownership and reserves the positions: it locks the row on
    # PostgreSQL and takes SQLite's write lock, so concurrent appenders queue behind it.
    if not valid_conversation_id(conversation_id):
        return None
    count = len(items)
    end = await conn.scalar(
        update(conversations)
        .where(conversations.c.id == conversation_id, conversations.c.principal == principal)
        .values(message_count=conversations.c.message_count + count, updated=now)
        .returning(conversations.c.message_count)
    )
    if end is None:
        return None
    start = int(end) - count
    stored = [replace(m, position=start + i, created=now) for i, m in enumerate(items)]
    if stored:
        await conn.execute(insert(messages), [_row(conversation_id, m) for m in stored])
    return stored


def _row(conversation_id: str, message: Message) -> dict[str, object]:
    return {
        "conversation_id": conversation_id,
        "position": message.position,
        "role": message.role,
        "content": message.content,
        "tool_calls": [dict(c) for c in message.tool_calls] if message.tool_calls else None,
        "tool_call_id": message.tool_call_id,
        "model": message.model,
        "finish_reason": message.finish_reason,
        "usage": None if message.usage is None else usage_to_json(message.usage),
        "ttfb": message.ttfb,
        "duration": message.duration,
        "outcome": message.outcome,
        "error": message.error,
        "request_id": message.request_id,
        "refusal": message.refusal,
        "created": message.created,
    }


def _message(row: Row[tuple[object, ...]]) -> Message:
    m = row._mapping
    return Message(
        role=cast(str, m["role"]),
        content=cast("str | None", m["content"]),
        tool_calls=tool_calls_from_json(m["tool_calls"]),
        tool_call_id=cast("str | None", m["tool_call_id"]),
        model=cast("str | None", m["model"]),
        finish_reason=cast("str | None", m["finish_reason"]),
        usage=usage_from_json(m["usage"]),
        ttfb=cast("float | None", m["ttfb"]),
        duration=cast("float | None", m["duration"]),
        outcome=outcome_from_json(m["outcome"]),
        error=cast("str | None", m["error"]),
        request_id=cast("str | None", m["request_id"]),
        position=cast(int, m["position"]),
        created=cast(datetime, m["created"]),
        refusal=cast("str | None", m["refusal"]),
    )


def _conversation(row: Row[tuple[object, ...]]) -> Conversation:
    m = row._mapping
    return Conversation(
        id=cast(str, m["id"]),
        principal=cast(str, m["principal"]),
        title=cast(str, m["title"]),
        created=cast(datetime, m["created"]),
        updated=cast(datetime, m["updated"]),
        message_count=cast(int, m["message_count"]),
    )
