"""`ConversationRecorder`: `ChatProxy`'s `on_request`/`on_complete` hooks, writing to the store.

`on_complete` sees only the `CompletionRecord`, not the request, so `on_request` reads the
conversation id and leaves it in a context variable: both hooks run in the request's own
task (`ChatProxy._chat`), one after the other.

The recorder knows its store only as `TurnStore`, the one method it calls: the store
(`store.recorder()`) imports the recorder, never the other way round.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypedDict

import anyio

from ._models import Message, MessageOutcome, Turn, title_from, valid_conversation_id

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..asgi import CompletionRecord

__all__ = ["ConversationRecorder", "ProxyHooks", "TurnStore"]

logger = logging.getLogger("tokenhub_stream.store")

_conversation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "tokenhub_stream_conversation_id", default=None
)

_OUTCOMES: dict[str, MessageOutcome] = {
    "completed": "completed",
    "client_disconnect": "client-disconnected",
    "upstream_error": "error",
    "timeout": "error",
}


class TurnStore(Protocol):
    """What the recorder calls on its store (a `ConversationStore`)."""

    async def record_turn(self, turn: Turn) -> str: ...


class ProxyHooks(TypedDict):
    """The keyword arguments `ConversationRecorder.hooks()` gives `ChatProxy`."""

    on_request: Callable[[Request, dict[str, object]], Awaitable[Mapping[str, object]]]
    on_complete: Callable[[CompletionRecord], Awaitable[None]]


class ConversationRecorder:
    """Writes every turn through a `ChatProxy` (completed, failed or interrupted) to a store.

    ```python
    recorder = store.recorder()
    proxy = ChatProxy(api_key=key, base_url=url, **recorder.hooks())
    ```

    A turn goes to the conversation whose id the browser sends, in the `X-Conversation-Id`
    header or a `conversation_id` body field (removed before forwarding); without one, each
    turn starts a new conversation. It writes the request's messages after its last
    assistant message (the new user message; the system prompt too on a first turn) and
    the assistant's answer, with the partial text when the client went away (and the
    model's `refusal`, when it declined a structured output). A turn that cannot be written
    is logged (logger `tokenhub_stream.store`, level ERROR) with its `Turn.to_json()` to
    replay, on one line (the record's `tokenhub_turn` and `tokenhub_error` attributes hold
    the replay JSON and the error text too); the hooks never raise into the proxy.

    Args:
        store: where to write (a `ConversationStore`).
        header: the request header carrying the conversation id.
        body_field: the request body field carrying it (stripped before forwarding).
        principal: maps `authorize`'s principal to the stored text (default: `str()`;
            no principal is `""`).
        timeout: seconds allowed for one write before it is logged as not stored.

    Raises:
        ValueError: a non-positive timeout.
    """

    def __init__(
        self,
        store: TurnStore,
        *,
        header: str = "X-Conversation-Id",
        body_field: str = "conversation_id",
        principal: Callable[[object], str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.store = store
        self.header = header
        self.body_field = body_field
        self.principal = principal or _principal_text
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ConversationRecorder(store={self.store!r}, header={self.header!r})"

    def hooks(self) -> ProxyHooks:
        """`on_request` and `on_complete` for `ChatProxy(**recorder.hooks())`."""
        return {"on_request": self.on_request, "on_complete": self.on_complete}

    async def on_request(self, request: Request, body: dict[str, object]) -> dict[str, object]:
        """Remember the turn's conversation id; return `body` without `body_field`.

        To combine with an `on_request` of your own, call this one from it.
        """
        from_body = body.pop(self.body_field, None)
        conversation_id = request.headers.get(self.header) or from_body
        _conversation_id.set(conversation_id if valid_conversation_id(conversation_id) else None)
        return body

    async def on_complete(self, record: CompletionRecord) -> None:
        """Write the turn; on failure log it with the JSON to replay. Never raises."""
        conversation_id = _conversation_id.get()
        _conversation_id.set(None)
        turn = self.turn(record, conversation_id)
        try:
            with anyio.fail_after(self.timeout):
                await self.store.record_turn(turn)
        except anyio.get_cancelled_exc_class():
            _log_lost(record.request_id, turn, "cancelled")
            raise
        except Exception as exc:
            _log_lost(record.request_id, turn, f"{type(exc).__name__}: {exc}")

    def turn(self, record: CompletionRecord, conversation_id: str | None = None) -> Turn:
        """The `Turn` that `on_complete` writes for `record` (pure; for tests and tools)."""
        new = [_request_message(m) for m in _after_last_answer(record.messages)]
        answer = record.message
        tool_calls = tuple(call.to_dict() for call in answer.tool_calls)
        new.append(
            Message(
                role="assistant",
                content=None if tool_calls and not answer.content else answer.content,
                tool_calls=tool_calls,
                model=record.model,
                finish_reason=record.finish_reason,
                usage=record.usage,
                ttfb=record.ttfb,
                duration=record.duration,
                outcome=_OUTCOMES.get(record.outcome, "error"),
                error=record.error,
                request_id=record.request_id,
                refusal=answer.refusal,
            )
        )
        return Turn(
            principal=self.principal(record.principal),
            conversation_id=conversation_id,
            messages=tuple(new),
            title=title_from(new),
        )


def _principal_text(principal: object) -> str:
    return "" if principal is None else str(principal)


def _after_last_answer(request_messages: list[object]) -> list[Mapping[str, object]]:
    out: list[Mapping[str, object]] = []
    for message in request_messages:
        if not isinstance(message, Mapping):
            continue
        if message.get("role") == "assistant":
            out.clear()
        else:
            out.append(message)
    return out


def _request_message(raw: Mapping[str, object]) -> Message:
    tool_call_id = raw.get("tool_call_id")
    return Message(
        role=str(raw.get("role")),
        content=_text(raw.get("content")),
        tool_call_id=tool_call_id if isinstance(tool_call_id, str) else None,
    )


def _text(content: object) -> str | None:
    # Content parts (text, images): keep the text; an image is not history we can show.
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        return "".join(p for p in parts if isinstance(p, str))
    return str(content)


# Every line boundary `str.splitlines` knows, as the JSON escape of the character: one
# failed write is one log line (SQLAlchemy's errors carry a multi-line `[SQL: ...]` block),
# and the replay JSON, which keeps non-ASCII text as is, still parses to the same turn.
_ONE_LINE = str.maketrans(
    {
        "\n": "\\n",
        "\r": "\\r",
        "\x0b": "\\u000b",
        "\x0c": "\\f",
        "\x1c": "\\u001c",
        "\x1d": "\\u001d",
        "\x1e": "\\u001e",
        "\x85": "\\u0085",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)


def _log_lost(request_id: str, turn: Turn, reason: str) -> None:
    text = turn.to_json().translate(_ONE_LINE)
    error = reason.translate(_ONE_LINE)
    logger.error(
        "conversation turn not stored request_id=%s error=%s replay=%s",
        request_id,
        error,
        text,
        extra={"tokenhub_turn": text, "tokenhub_error": error},
    )
