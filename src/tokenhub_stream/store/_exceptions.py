"""The store's errors, under the package's one root `TokenHubError`.

```
TokenHubError
└── StoreError              base for the conversation store's own errors
    ├── ConversationNotFound  no such conversation for this principal
    ├── ConversationExists    a conversation id asked for is taken
    └── SchemaError           the database's schema is newer than this library
```
"""

from __future__ import annotations

from .._exceptions import TokenHubError

__all__ = ["ConversationExists", "ConversationNotFound", "SchemaError", "StoreError"]


class StoreError(TokenHubError):
    """Base class of the errors the conversation store raises on purpose."""


class ConversationNotFound(StoreError, LookupError):
    """Raised when a conversation does not exist for the principal asking (whoever owns it)."""


class ConversationExists(StoreError, ValueError):
    """Raised by `create_conversation(conversation_id=...)` when that id is already taken."""


class SchemaError(StoreError):
    """Raised by `migrate()` when the database was migrated by a newer version of the library."""
