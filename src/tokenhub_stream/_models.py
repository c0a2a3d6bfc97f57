"""Typed results of a stream: events, the assembled message, usage, timings, outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, TypeAlias

from ._exceptions import TimeoutKind, TokenHubError

if TYPE_CHECKING:
    # A TypeVar default (PEP 696) is in `typing` from Python 3.13 only, and typing_extensions
    # is not one of our dependencies; the default matters to a type checker only.
    from typing_extensions import TypeVar

    #: The value of a structured output (`response_format=`): the type asked for, or
    #: `object` for a JSON schema or none (also what a bare `ChatStream` means).
    #: Covariant: it is only ever read, so a `ChatStream[Card]` is a `ChatStream[object]`.
    OutputT = TypeVar("OutputT", covariant=True, default=object)
else:
    from typing import TypeVar

    OutputT = TypeVar("OutputT", covariant=True)

__all__ = [
    "ChatMessage",
    "ChatResult",
    "ContentDelta",
    "FinishEvent",
    "Outcome",
    "OutcomeKind",
    "ReasoningDelta",
    "RefusalDelta",
    "StreamEvent",
    "Timings",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    "UsageEvent",
    "add_usage",
]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts, normalised across providers. A count the upstream did not send is None."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> Usage:
        prompt = _int(raw.get("prompt_tokens", raw.get("input_tokens")))
        completion = _int(raw.get("completion_tokens", raw.get("output_tokens")))
        total = _int(raw.get("total_tokens"))
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        details = raw.get("completion_tokens_details")
        reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, Mapping) else None
        prompt_details = raw.get("prompt_tokens_details")
        cached = (
            _int(prompt_details.get("cached_tokens"))
            if isinstance(prompt_details, Mapping)
            else None
        )
        return cls(prompt, completion, total, reasoning, cached)


def add_usage(total: Usage | None, usage: Usage | None) -> Usage | None:
    """The sum of two usages, a count `None` only when `None` in both (the proxy's turn
    record and the terminal's status line add up a tool loop's turns with it)."""
    if usage is None:
        return total
    if total is None:
        return usage

    def plus(a: int | None, b: int | None) -> int | None:
        return None if a is None and b is None else (a or 0) + (b or 0)

    return Usage(
        plus(total.prompt_tokens, usage.prompt_tokens),
        plus(total.completion_tokens, usage.completion_tokens),
        plus(total.total_tokens, usage.total_tokens),
        plus(total.reasoning_tokens, usage.reasoning_tokens),
        plus(total.cached_tokens, usage.cached_tokens),
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One assembled tool call. `extra` keeps provider fields that must go back
    on the next request (e.g. Gemini's `extra_content` thought signature)."""

    id: str
    name: str
    arguments: str
    type: str = "function"
    extra: Mapping[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The OpenAI request shape of this call, for the next turn's `messages`."""
        out: dict[str, object] = {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.name, "arguments": self.arguments},
        }
        out.update(self.extra)
        return out


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """The assembled assistant message of a stream (or of a non-streaming call).

    `refusal` is the model's refusal text when it declined to answer a structured output
    (OpenAI's `delta.refusal` / `message.refusal`; docs/structured.md#refusals), else None.
    """

    role: str = "assistant"
    content: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: str | None = None
    refusal: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The OpenAI request shape, to append to the conversation history (with the
        `refusal` only when there was one: only a server that sends it knows the key)."""
        out: dict[str, object] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.to_dict() for call in self.tool_calls]
            if not self.content:
                out["content"] = None
        if self.refusal is not None:
            out["refusal"] = self.refusal
        return out


@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock figures of a stream, in seconds, measured from sending the request.

    `rate` is tokens/s when the upstream sent usage (completion tokens over the time
    from first token to end), otherwise deltas/s; `rate_unit` says which.
    """

    time_to_first_token: float | None = None
    total: float | None = None
    rate: float | None = None
    rate_unit: Literal["tokens/s", "deltas/s"] | None = None


OutcomeKind: TypeAlias = Literal["completed", "truncated", "upstream_error", "cancelled", "timeout"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a stream ended.

    - `completed`: `detail` is "done" (`[DONE]` seen) or "finish_reason" (closed after one);
    - `truncated`: the connection ended early; `error` is the raised error;
    - `upstream_error`: an error status or frame; `error` is the `APIError`;
    - `cancelled`: the consumer left early or its task was cancelled;
    - `timeout`: `detail` is the timeout kind (connect, first_token, idle, total).
    """

    kind: OutcomeKind
    detail: str | None = None
    error: TokenHubError | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "completed"

    @property
    def timeout_kind(self) -> TimeoutKind | None:
        return self.detail if self.kind == "timeout" else None  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """A piece of the answer's text (`choices[0].delta.content`)."""

    text: str


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """A piece of reasoning text (DeepSeek `reasoning_content`, vLLM `reasoning`)."""

    text: str


@dataclass(frozen=True, slots=True)
class RefusalDelta:
    """A piece of the model's refusal (`choices[0].delta.refusal`, OpenAI's structured
    outputs): the model declined to answer; never part of the content."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of a tool call; `index` is the call's position in `message.tool_calls`.

    In the tool loop's events, `partial_arguments` is the call's arguments decoded so far
    (a dict grown in place as fragments arrive, as `partials()` shows a structured output;
    None before any shows, or once the arguments stopped being valid JSON); a stream's own
    `events()` leave it None.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str
    partial_arguments: object = None


@dataclass(frozen=True, slots=True)
class FinishEvent:
    """The upstream's finish_reason for choice 0 ("stop", "length", "tool_calls", ...)."""

    reason: str


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """Usage reported by the upstream (may come more than once; the last one counts)."""

    usage: Usage


StreamEvent: TypeAlias = (
    ContentDelta | ReasoningDelta | RefusalDelta | ToolCallDelta | FinishEvent | UsageEvent
)


@dataclass(frozen=True, slots=True)
class ChatResult(Generic[OutputT]):
    """The answer of a non-streaming `chat()` call; `parsed` is the validated structured
    output when the call had a `response_format` (else None).

    Generic in that output's type: `chat(..., response_format=Card)` returns a
    `ChatResult[Card]`, whose `parsed` a type checker knows is a `Card`; without a type
    (a JSON schema, or no `response_format`) it is a `ChatResult[object]`.
    """

    message: ChatMessage
    usage: Usage | None
    model: str | None = None
    id: str | None = None
    parsed: OutputT = None  # type: ignore[assignment]  # None is an `object`: no output
