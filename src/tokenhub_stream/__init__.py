"""tokenhub_stream: typed streaming for OpenAI-compatible chat completions."""

from __future__ import annotations

from .__version__ import __version__
from ._api import stream_chat, stream_chat_sync
from ._async_client import AsyncChatStream, AsyncClient
from ._chunks import ChunkParser
from ._config import DEFAULT_BASE_URL, DEFAULT_MODEL, DEFAULT_TIMEOUT, Timeout
from ._exceptions import (
    APIError,
    AuthenticationError,
    BadRequestError,
    IncompleteOutputError,
    MissingAPIKeyError,
    NotFoundError,
    OutputRefusedError,
    OutputValidationError,
    ProtocolError,
    RateLimitError,
    ServerError,
    StreamConsumed,
    StreamTimeout,
    TokenHubError,
    TransportError,
    TruncatedStreamError,
)
from ._json import JSON_BACKEND
from ._models import (
    ChatMessage,
    ChatResult,
    ContentDelta,
    FinishEvent,
    Outcome,
    ReasoningDelta,
    RefusalDelta,
    StreamEvent,
    Timings,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)
from ._sse import ServerSentEvent, SSEDecoder
from ._sync_client import ChatStream, Client
from ._telemetry import instrument, uninstrument
from .tools import (
    MaxTurnsExceeded,
    Tool,
    ToolCallStarted,
    ToolLoopEvent,
    ToolResult,
    ToolSet,
    TurnFinished,
    tool,
)
from .tools._loop import DEFAULT_MAX_TURNS, AsyncToolLoop
from .tools._loop_sync import ToolLoop

__all__ = [
    "APIError",
    "AsyncChatStream",
    "AsyncClient",
    "AsyncToolLoop",
    "AuthenticationError",
    "BadRequestError",
    "ChatMessage",
    "ChatResult",
    "ChatStream",
    "ChunkParser",
    "Client",
    "ContentDelta",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_TURNS",
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT",
    "FinishEvent",
    "IncompleteOutputError",
    "JSON_BACKEND",
    "MaxTurnsExceeded",
    "MissingAPIKeyError",
    "NotFoundError",
    "Outcome",
    "OutputRefusedError",
    "OutputValidationError",
    "ProtocolError",
    "RateLimitError",
    "ReasoningDelta",
    "RefusalDelta",
    "SSEDecoder",
    "ServerError",
    "ServerSentEvent",
    "StreamConsumed",
    "StreamEvent",
    "StreamTimeout",
    "Timeout",
    "Timings",
    "TokenHubError",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallStarted",
    "ToolLoop",
    "ToolLoopEvent",
    "ToolResult",
    "ToolSet",
    "TransportError",
    "TruncatedStreamError",
    "TurnFinished",
    "Usage",
    "UsageEvent",
    "__version__",
    "instrument",
    "stream_chat",
    "stream_chat_sync",
    "tool",
    "uninstrument",
]

# Public names report the public module, like httpx does.
__locals = locals()
for __name in __all__:
    if not __name.startswith("__") and hasattr(__locals[__name], "__module__"):
        try:
            __locals[__name].__module__ = "tokenhub_stream"
        except (AttributeError, TypeError):
            pass
