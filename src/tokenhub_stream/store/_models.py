"""What the store keeps: `Message`, `Conversation`, and the `Turn` a proxy turn writes.

Pure data and JSON conversion only; no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeAlias, TypeGuard, get_args

from .._models import Usage

__all__ = [
    "Conversation",
    "Message",
    "MessageOutcome",
    "Turn",
    "new_conversation_id",
    "valid_conversation_id",
]

MessageOutcome: TypeAlias = Literal["completed", "error", "client-disconnected"]
_OUTCOMES: frozenset[str] = frozenset(get_args(MessageOutcome))

# Ids travel in a header or a JSON field and end up in URLs: keep them plain.
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_USAGE_FIELDS: tuple[str, ...] = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "reasoning_tokens",
    "cached_tokens",
)
_SCALARS: tuple[str, ...] = (
    "content",
    "tool_call_id",
    "model",
    "finish_reason",
    "ttfb",
    "duration",
    "outcome",
    "error",
    "request_id",
    "refusal",
)


def new_conversation_id() -> str:
    import secrets

    return secrets.token_hex(16)


def valid_conversation_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Message:
    """One stored chat message: a request message (user, system, tool) or an assistant turn.

    ```python
    msg = Message("user", "Hello")
    [stored] = await store.append_messages("alice", conversation.id, [msg])
    stored.position, stored.created      # set by the store
    ```

    Only `role` is required. The assistant message of a proxied turn also carries `model`,
    `finish_reason`, `usage`, the timings `ttfb` and `duration` (seconds), the `outcome`
    (`completed`, `error`, `client-disconnected`), the `error` text and the proxy's
    `request_id`; `refusal` is the model's refusal of a structured output
    (`ChatMessage.refusal`), else None. `position` and `created` are set by the store and
    ignored on append.
    """

    role: str
    content: str | None = None
    tool_calls: tuple[Mapping[str, object], ...] = ()
    tool_call_id: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    ttfb: float | None = None
    duration: float | None = None
    outcome: MessageOutcome | None = None
    error: str | None = None
    request_id: str | None = None
    position: int | None = None
    created: datetime | None = None
    # Last, so that no positional construction written before it existed changes meaning.
    refusal: str | None = None

    def __repr__(self) -> str:
        text = self.content or ""
        shown = text if len(text) <= 40 else text[:37] + "..."
        return (
            f"Message(role={self.role!r}, content={shown!r}, position={self.position!r}, "
            f"outcome={self.outcome!r})"
        )

    def to_dict(self) -> dict[str, object]:
        """The OpenAI request shape, to send the history again on the next turn (with the
        `refusal` only when there was one, as `ChatMessage.to_dict()`)."""
        out: dict[str, object] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.refusal is not None:
            out["refusal"] = self.refusal
        return out

    def to_json_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"role": self.role}
        for name in _SCALARS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.tool_calls:
            out["tool_calls"] = [dict(call) for call in self.tool_calls]
        if self.usage is not None:
            out["usage"] = usage_to_json(self.usage)
        return out

    @classmethod
    def from_json_dict(cls, raw: Mapping[str, object]) -> Message:
        role = raw.get("role")
        if not isinstance(role, str):
            raise ValueError("a message needs a string 'role'")
        outcome = raw.get("outcome")
        usage = raw.get("usage")
        return cls(
            role=role,
            content=_opt_str(raw.get("content")),
            tool_calls=tool_calls_from_json(raw.get("tool_calls")),
            tool_call_id=_opt_str(raw.get("tool_call_id")),
            model=_opt_str(raw.get("model")),
            finish_reason=_opt_str(raw.get("finish_reason")),
            usage=usage_from_json(usage),
            ttfb=_opt_float(raw.get("ttfb")),
            duration=_opt_float(raw.get("duration")),
            outcome=outcome_from_json(outcome),
            error=_opt_str(raw.get("error")),
            request_id=_opt_str(raw.get("request_id")),
            refusal=_opt_str(raw.get("refusal")),
        )


@dataclass(frozen=True, slots=True)
class Conversation:
    """A conversation of one principal. `messages` is filled by `get_conversation()` only.

    ```python
    conversation = await store.get_conversation("alice", conversation_id)
    history = conversation.to_messages()   # OpenAI-shaped, to continue the chat
    ```
    """

    id: str
    principal: str
    title: str
    created: datetime
    updated: datetime
    message_count: int = 0
    messages: tuple[Message, ...] = ()

    def __repr__(self) -> str:
        return (
            f"Conversation(id={self.id!r}, principal={self.principal!r}, title={self.title!r}, "
            f"message_count={self.message_count!r})"
        )

    def to_messages(self) -> list[dict[str, object]]:
        """The messages in the OpenAI request shape, oldest first."""
        return [message.to_dict() for message in self.messages]


@dataclass(frozen=True, slots=True)
class Turn:
    """What one proxied turn writes: the new request messages and the assistant's answer.

    A turn that could not be written is logged as `turn.to_json()`; replay it with
    `await store.record_turn(Turn.from_json(text))`.
    """

    principal: str
    conversation_id: str | None
    messages: tuple[Message, ...] = field(default=())
    title: str = ""

    def __repr__(self) -> str:
        return (
            f"Turn(principal={self.principal!r}, conversation_id={self.conversation_id!r}, "
            f"messages={len(self.messages)})"
        )

    def to_json(self) -> str:
        """One line of JSON (no key ever: it holds only what the turn stores)."""
        data = {
            "principal": self.principal,
            "conversation_id": self.conversation_id,
            "title": self.title,
            "messages": [message.to_json_dict() for message in self.messages],
        }
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Turn:
        """Parse `to_json()`'s output.

        Raises:
            ValueError: not a turn's JSON.
        """
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a turn is a JSON object")
        principal = data.get("principal")
        conversation_id = data.get("conversation_id")
        messages = data.get("messages")
        title = data.get("title", "")
        if not isinstance(principal, str) or not isinstance(title, str):
            raise ValueError("a turn needs a string 'principal' and 'title'")
        if conversation_id is not None and not isinstance(conversation_id, str):
            raise ValueError("'conversation_id' must be a string or null")
        if not isinstance(messages, list):
            raise ValueError("'messages' must be a list")
        return cls(
            principal=principal,
            conversation_id=conversation_id,
            messages=tuple(Message.from_json_dict(_mapping(m)) for m in messages),
            title=title,
        )


def usage_to_json(usage: Usage) -> dict[str, int]:
    return {name: value for name in _USAGE_FIELDS if (value := getattr(usage, name)) is not None}


def usage_from_json(raw: object) -> Usage | None:
    if not isinstance(raw, Mapping):
        return None
    values = [raw.get(name) for name in _USAGE_FIELDS]
    ints = [v if isinstance(v, int) and not isinstance(v, bool) else None for v in values]
    return Usage(*ints)


def tool_calls_from_json(raw: object) -> tuple[Mapping[str, object], ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, str | bytes):
        return ()
    return tuple(dict(call) for call in raw if isinstance(call, Mapping))


def outcome_from_json(raw: object) -> MessageOutcome | None:
    if raw is None:
        return None
    if raw not in _OUTCOMES:
        raise ValueError(f"unknown outcome {raw!r}")
    return raw  # type: ignore[return-value]


def _mapping(raw: object) -> Mapping[str, object]:
    if not isinstance(raw, Mapping):
        raise ValueError("a message is a JSON object")
    return raw


def _opt_str(raw: object) -> str | None:
    return raw if isinstance(raw, str) else None


def _opt_float(raw: object) -> float | None:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    return None


def title_from(messages: Sequence[Message], limit: int = 80) -> str:
    """The first user message's text, on one line, cut to `limit` characters."""
    for message in messages:
        if message.role == "user" and message.content:
            text = " ".join(message.content.split())
            return text if len(text) <= limit else text[: limit - 1] + "…"
    return ""
