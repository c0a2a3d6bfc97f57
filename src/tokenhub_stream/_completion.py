"""Sans-I/O reader of a whole, non-streaming `chat.completion` body (`parse_completion`),
and of a message's `content` (`content_text`, `thinking_text`), which `ChunkParser`
(`_chunks.py`) shares to read streamed content parts the same way.

The one reader of a non-streaming answer, for the client's `chat()` and for the proxy's
turn record (`asgi/_record.py`). Internal interface: `parse_completion`, `content_text`,
`thinking_text`.
"""

from __future__ import annotations

from ._errors import error_from_frame
from ._exceptions import ProtocolError
from ._json import Redact, loads
from ._models import ChatMessage, ChatResult, ToolCall, Usage

__all__ = ["content_text", "parse_completion", "thinking_text"]


def thinking_text(value: object) -> str | None:
    """The text of a `thinking` part's `thinking` value (None if it has no text shape)."""
    # A `thinking` part holds a list of `text` parts. Read tolerantly: a plain string, or
    # strings and untyped `{"text": ...}` items in the list, are text too.
    if type(value) is str:
        return value
    if type(value) is not list:
        return None
    pieces: list[str] = []
    for item in value:
        if type(item) is str:
            pieces.append(item)
        elif type(item) is dict and item.get("type", "text") == "text":
            piece = item.get("text")
            if type(piece) is str:
                pieces.append(piece)
    return "".join(pieces)


def content_text(content: object) -> tuple[str, str | None]:
    """(text, reasoning) of a whole message's `content` (a non-streaming answer): a
    string, or a list of typed parts read as `ChunkParser` reads streamed ones."""
    if isinstance(content, str):
        return content, None
    texts: list[str] = []
    thoughts: list[str] = []
    if isinstance(content, list):
        for part in content:
            if type(part) is not dict:
                continue
            if part.get("type") == "text":
                piece = part.get("text")
                if type(piece) is str:
                    texts.append(piece)
            elif part.get("type") == "thinking":
                thought = thinking_text(part.get("thinking"))
                if thought:
                    thoughts.append(thought)
    return "".join(texts), "".join(thoughts) if thoughts else None


def parse_completion(body: bytes, redact: Redact | None = None) -> ChatResult:
    """Parse a non-streaming `chat.completion` JSON body: the one reader of it, for
    `chat()` and for the proxy's turn record (`asgi/_record.py`).

    Raises:
        ProtocolError: not JSON, not an object, no choices or message, a malformed tool call.
        APIError: the body is an error (`{"error": ...}`), `redact` applied to its text.
    """
    try:
        obj = loads(body)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON in the response: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("the response is not a JSON object")
    if "error" in obj or obj.get("object") == "error":
        raise error_from_frame(obj, redact=redact)
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ProtocolError("the response has no choices")
    choice = choices[0]
    raw = choice.get("message")
    if not isinstance(raw, dict):
        raise ProtocolError("the response's choice has no message")
    calls = []
    for item in raw.get("tool_calls") or ():
        if not isinstance(item, dict) or not isinstance(item.get("function"), dict):
            raise ProtocolError("malformed tool call in the response")
        function = item["function"]
        extra = {k: v for k, v in item.items() if k not in ("id", "type", "function", "index")}
        calls.append(
            ToolCall(
                str(item.get("id") or ""),
                str(function.get("name") or ""),
                str(function.get("arguments") or ""),
                str(item.get("type") or "function"),
                extra,
            )
        )
    reasoning = raw.get("reasoning_content") or raw.get("reasoning")
    refusal = raw.get("refusal")
    # Mistral's magistral answers `content` as a list of typed parts (docs/streaming.md#quirks).
    content, thinking = content_text(raw.get("content") or "")
    message = ChatMessage(
        role=str(raw.get("role") or "assistant"),
        content=content,
        reasoning=reasoning if isinstance(reasoning, str) else thinking,
        tool_calls=tuple(calls),
        finish_reason=choice.get("finish_reason"),
        # OpenAI's structured outputs: the model declined (`null` when it did not).
        refusal=refusal if isinstance(refusal, str) and refusal else None,
    )
    usage = obj.get("usage")
    return ChatResult(
        message,
        Usage.from_dict(usage) if isinstance(usage, dict) else None,
        obj.get("model") if isinstance(obj.get("model"), str) else None,
        obj.get("id") if isinstance(obj.get("id"), str) else None,
    )
