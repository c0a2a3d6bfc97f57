"""What a script says: `Script`, `ScriptedToolCall` and the literal types of their fields.

Pure data, validated on construction; `_reply.py` plays a script, `_rules.py` builds one for
a request no script answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

ScriptEnd = Literal["done", "close", "cut", "stall"]
UsageStyle = Literal["final", "every_chunk", "x_groq"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScriptedToolCall:
    """One scripted tool call, streamed as a first fragment plus argument fragments.

    ```python
    Script(tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city":"Paris"}')])
    Script(tool_calls=[ScriptedToolCall(name="f", pieces=['{"a":', "1}"], id="")])  # Gemini-like id
    ```

    Args:
        name: the function name, sent in the first fragment.
        arguments: the JSON arguments text, split into 8-character pieces.
        pieces: an explicit split of the arguments; overrides `arguments`.
        id: the call id sent in the first fragment; `None` generates `call_<n>`.
    """

    name: str
    arguments: str = ""
    pieces: Sequence[str] | None = None
    id: str | None = None

    def argument_pieces(self) -> list[str]:
        """Return the argument fragments in the order they are streamed."""
        if self.pieces is not None:
            return list(self.pieces)
        return [self.arguments[i : i + 8] for i in range(0, len(self.arguments), 8)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Script:
    """How the upstream answers one chat request; every field is optional.

    ```python
    upstream.enqueue(Script(deltas=["Hel", "lo"], end="close"))  # no [DONE]
    upstream.enqueue(Script(status=429, headers={"Retry-After": "2"}))
    upstream.enqueue(Script(text="thinking...", keepalive=0.01, end="stall"))
    upstream.enqueue(Script(raw=[b"data: {}\\r\\n", b"\\r\\n"]))
    upstream.enqueue(Script(refusal="I can't help with that."))  # OpenAI's refusal
    ```

    Args:
        text: the reply, split into small word-ish deltas. Without `text` or `deltas` the
            reply is the default one, or none at all when `tool_calls` or `refusal` are
            given (a tool turn with text before its calls says so: `text="Let me look."`).
        deltas: the reply as explicit content deltas; overrides `text`.
        delay: seconds before each content-bearing chunk; `None` uses the upstream default.
        first_delay: seconds after the headers and before the first chunk.
        keepalive: send `: keep-alive` comments when nothing was written for this long,
            during delays and stalls (a blank line for non-streaming requests).
        end: `done` finish chunk then `[DONE]`; `close` finish chunk then a bare close;
            `cut` stop without finish chunk or `[DONE]` and drop the connection mid-body;
            `stall` send nothing more (but keep-alives) until the client goes away or 60 s.
        finish_reason: the reason in the final chunk; `"auto"` means `"tool_calls"` when
            `tool_calls` is given and `"stop"` otherwise; `None` sends no finish chunk.
        status: the HTTP status; at 400 or above the body is `error` as JSON.
        error: the JSON body of an error status; `None` builds an OpenAI-shaped one.
        error_frame: a frame sent as `data: <json>` after the deltas, before `end`.
        tool_calls: tool calls streamed after the content.
        tool_call_index: `False` drops `index` from tool-call fragments (Gemini, Ollama).
        reasoning: reasoning text, streamed as deltas before the content.
        reasoning_field: the delta key for reasoning; vLLM uses `reasoning`.
        refusal: the model refuses, as OpenAI's structured outputs do: this text is
            streamed as `delta.refusal` word-ish deltas after any content (the first
            chunk says `"content": null, "refusal": ""`), or sent as `message.refusal`
            (with `"content": null` when there is no content); finish_reason `stop`.
        usage: overrides the computed usage object.
        usage_style: `final` a `choices: []` chunk when `stream_options.include_usage` is
            true; `every_chunk` cumulative usage on every chunk (Gemini, vLLM continuous
            stats); `x_groq` usage under `x_groq` on the finish chunk, plus the final chunk
            when asked for.
        empty_choices: Azure-style: a first chunk with `choices: []` and
            `prompt_filter_results`, and a filter frame with empty choices after each
            content chunk.
        raw: send exactly these body chunks (with `delay` between) and nothing else.
        content_type: the response content type.
        headers: extra response headers.
    """

    text: str | None = None
    deltas: Sequence[str] | None = None
    delay: float | None = None
    first_delay: float = 0.0
    keepalive: float | None = None
    end: ScriptEnd = "done"
    finish_reason: str | None = "auto"
    status: int = 200
    error: Mapping[str, object] | None = None
    error_frame: Mapping[str, object] | None = None
    tool_calls: Sequence[ScriptedToolCall] = ()
    tool_call_index: bool = True
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"
    refusal: str | None = None
    usage: Mapping[str, object] | None = None
    usage_style: UsageStyle = "final"
    empty_choices: bool = False
    raw: Sequence[bytes] | None = None
    content_type: str = "text/event-stream"
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.end not in ("done", "close", "cut", "stall"):
            raise ValueError(f"end must be done, close, cut or stall, not {self.end!r}")
        if self.usage_style not in ("final", "every_chunk", "x_groq"):
            raise ValueError(f"unknown usage_style {self.usage_style!r}")
        for name in ("delay", "keepalive"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.keepalive == 0:
            raise ValueError("keepalive must be > 0")
        if self.first_delay < 0:
            raise ValueError("first_delay must be >= 0")
        if not 100 <= self.status <= 599:
            raise ValueError(f"status must be an HTTP status code, not {self.status}")
