"""Conversation history for the proxy: an async store on SQLite (default) or PostgreSQL.

```python
from tokenhub_stream.store import ConversationStore

store = ConversationStore("sqlite+aiosqlite:///chats.db")    # or postgresql+asyncpg://...
proxy = ChatProxy(api_key=key, base_url=url, **store.recorder().hooks())
```

Needs the `store` extra (SQLAlchemy, aiosqlite); PostgreSQL also needs `postgres` (asyncpg).
"""

from __future__ import annotations

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub_stream.store needs SQLAlchemy: pip install 'tokenhub_stream[store]'"
    ) from exc

from ._exceptions import ConversationExists, ConversationNotFound, SchemaError, StoreError
from ._models import Conversation, Message, MessageOutcome, Turn
from ._recorder import ConversationRecorder, ProxyHooks
from ._schema import SCHEMA_VERSION
from ._store import DEFAULT_STORE_URL, ConversationStore

__all__ = [
    "Conversation",
    "ConversationExists",
    "ConversationNotFound",
    "ConversationRecorder",
    "ConversationStore",
    "DEFAULT_STORE_URL",
    "Message",
    "MessageOutcome",
    "ProxyHooks",
    "SCHEMA_VERSION",
    "SchemaError",
    "StoreError",
    "Turn",
]

for _name in __all__:  # shown as tokenhub_stream.store.X (reprs, docs), as httpx does
    _value = globals()[_name]
    if isinstance(_value, type):
        _value.__module__ = __name__
del _name, _value
