"""The tool loop's events: what `run_tools()` yields besides the text deltas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from .._exceptions import TokenHubError
from .._models import (
    ChatMessage,
    ContentDelta,
    ReasoningDelta,
    RefusalDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = ["MaxTurnsExceeded", "ToolCallStarted", "ToolLoopEvent", "ToolResult", "TurnFinished"]


@dataclass(frozen=True, slots=True)
class ToolCallStarted:
    """The model's turn asked for this call; it runs next (show "calling name(args)")."""

    call: ToolCall
    turn: int


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool call's result, as sent back to the model in a `tool` message.

    `error` is True when the tool raised, the arguments were not valid JSON (or did not
    fit the function), or no tool has that name; `output` then holds the error text the
    model reads. `elapsed` is the tool's run time in seconds (0 if it did not run).
    """

    call: ToolCall
    output: str
    error: bool
    turn: int
    elapsed: float = 0.0

    def to_message(self) -> dict[str, object]:
        """The `{"role": "tool", "tool_call_id", "content"}` message for the next request."""
        return {"role": "tool", "tool_call_id": self.call.id, "content": self.output}


@dataclass(frozen=True, slots=True)
class TurnFinished:
    """One model response ended; `message` is the assembled assistant message.

    It is a tool turn when `message.tool_calls` is not empty, whatever
    `message.finish_reason` says (Gemini ends tool turns with "stop").
    """

    turn: int
    message: ChatMessage
    usage: Usage | None


ToolLoopEvent: TypeAlias = (
    ContentDelta
    | ReasoningDelta
    | RefusalDelta
    | ToolCallDelta
    | ToolCallStarted
    | ToolResult
    | TurnFinished
)


class MaxTurnsExceeded(TokenHubError):
    """Raised when the model still asks for tools in the last turn `max_turns` allows.

    The unanswered calls are not run. `message` is that last assistant message; the
    loop's `messages` stop before it, so they can be sent again as they are (for example
    to a new loop with a higher `max_turns`).
    """

    def __init__(self, max_turns: int, message: ChatMessage) -> None:
        names = ", ".join(call.name for call in message.tool_calls)
        super().__init__(
            f"the model still asked for tools ({names}) after max_turns={max_turns} turns"
        )
        self.max_turns = max_turns
        self.message = message
