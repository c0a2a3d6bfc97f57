"""The tables and their versioned migrations, in SQLAlchemy Core (one schema, every backend).

`tokenhub_schema` holds one row per applied version. Version 1 is the initial schema. A
later version appends a function to `_MIGRATIONS` that alters the tables from the shape
the previous version left; never edit an existing step, a database out there ran it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    func,
    insert,
    select,
)

from ._exceptions import SchemaError

__all__ = ["SCHEMA_VERSION", "conversations", "messages", "migrate_sync", "schema", "utcnow"]


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC on every backend, read back as aware UTC."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


metadata = MetaData()

schema = Table(
    "tokenhub_schema",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied", UTCDateTime, nullable=False),
)

conversations = Table(
    "tokenhub_conversations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("principal", Text, nullable=False),
    Column("title", Text, nullable=False, default=""),
    Column("created", UTCDateTime, nullable=False),
    Column("updated", UTCDateTime, nullable=False),
    Column("message_count", Integer, nullable=False, default=0),
    Index("ix_tokenhub_conversations_principal_updated", "principal", "updated"),
)

messages = Table(
    "tokenhub_messages",
    metadata,
    Column(
        "conversation_id",
        String(64),
        ForeignKey("tokenhub_conversations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("role", String(32), nullable=False),
    Column("content", Text),
    Column("tool_calls", JSON(none_as_null=True)),
    Column("tool_call_id", Text),
    Column("model", Text),
    Column("finish_reason", String(64)),
    Column("usage", JSON(none_as_null=True)),
    Column("ttfb", Float),
    Column("duration", Float),
    Column("outcome", String(32)),
    Column("error", Text),
    Column("request_id", String(64)),
    Column("created", UTCDateTime, nullable=False),
)


def _v1_initial(conn: Connection) -> None:
    metadata.create_all(conn, tables=[conversations, messages])


_MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_v1_initial,)
SCHEMA_VERSION = len(_MIGRATIONS)


def current_version(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(schema.c.version), 0))).scalar_one())


def migrate_sync(conn: Connection) -> int:
    """Bring the schema to `SCHEMA_VERSION` inside the caller's transaction; return it."""
    schema.create(conn, checkfirst=True)
    version = current_version(conn)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"the database's conversation schema is version {version}, newer than this "
            f"library's {SCHEMA_VERSION}: upgrade tokenhub_stream"
        )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        _MIGRATIONS[target - 1](conn)
        conn.execute(insert(schema).values(version=target, applied=utcnow()))
    return SCHEMA_VERSION
