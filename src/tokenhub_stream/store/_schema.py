"""The tables and their versioned migrations, in SQLAlchemy Core (one schema, every backend).

`tokenhub_schema` holds one row per applied version. Version 1 is the initial schema;
version 2 adds `tokenhub_messages.refusal` (#19). A later version appends a function to
`_MIGRATIONS` that alters the tables from the shape the previous version left, and its
columns to the table definition; never change what an existing step does, a database out
there ran it.
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
from sqlalchemy.schema import CreateColumn, SchemaItem

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


def _conversations_table(meta: MetaData, *added: SchemaItem) -> Table:
    """The conversations table: its version 1 columns, then `added`, the later versions'."""
    return Table(
        "tokenhub_conversations",
        meta,
        Column("id", String(64), primary_key=True),
        Column("principal", Text, nullable=False),
        Column("title", Text, nullable=False, default=""),
        Column("created", UTCDateTime, nullable=False),
        Column("updated", UTCDateTime, nullable=False),
        Column("message_count", Integer, nullable=False, default=0),
        Index("ix_tokenhub_conversations_principal_updated", "principal", "updated"),
        *added,
    )


def _messages_table(meta: MetaData, *added: SchemaItem) -> Table:
    """The messages table: its version 1 columns, then `added`, the later versions'."""
    return Table(
        "tokenhub_messages",
        meta,
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
        *added,
    )


# The tables as this version of the library reads and writes them.
conversations = _conversations_table(metadata)
messages = _messages_table(
    metadata,
    Column("refusal", Text),  # v2: the model's refusal of a structured output (#19)
)


# --- the steps --------------------------------------------------------------------------------
# Each step creates or alters the shape of its own version, never today's: a fresh database
# runs them all in order, and must end exactly where an old one that ran them one by one did.


def _v1_initial(conn: Connection) -> None:
    v1 = MetaData()
    _conversations_table(v1)
    _messages_table(v1)
    v1.create_all(conn)


def _v2_refusal(conn: Connection) -> None:
    _add_column(conn, messages, messages.c.refusal)


def _add_column(conn: Connection, table: Table, column: Column[object]) -> None:
    # SQLAlchemy Core has no ALTER; a nullable column without a default is added in place
    # (no table rewrite) with the same statement on SQLite and PostgreSQL.
    preparer = conn.dialect.identifier_preparer
    spec = CreateColumn(column).compile(dialect=conn.dialect)
    conn.exec_driver_sql(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {spec}")


_MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_v1_initial, _v2_refusal)
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
        # The version row first: SQLite's driver opens its transaction only at an INSERT,
        # and DDL run before that commits at once, so an ALTER that fails half-way (or a
        # process killed after it) would leave a column without its version row. After
        # the INSERT, the step commits or rolls back with it there too, as on PostgreSQL.
        # Two processes migrating at once also collide on this row before any DDL.
        conn.execute(insert(schema).values(version=target, applied=utcnow()))
        _MIGRATIONS[target - 1](conn)
    return SCHEMA_VERSION
