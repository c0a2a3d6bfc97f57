"""Assemble the turn for `ChatProxy(on_complete=...)` from a copy of the relayed bytes.

Imported only when `on_complete` is set, so the plain passthrough never decodes JSON.
Never raises from `feed*`: a frame it cannot read only ends the copy-parsing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._chunks import ChunkParser, content_text
from ._exceptions import APIError
from ._models import ChatMessage, ToolCall, Usage

if TYPE_CHECKING:
    from .asgi import CompletionRecord, Outcome

__all__ = ["TurnCollector"]

logger = logging.getLogger("tokenhub_stream.asgi")


class TurnCollector:
    __slots__ = ("_broken", "_message", "_parser", "_stream", "_usage")

    def __init__(self, *, stream: bool) -> None:
        self._stream = stream
        self._parser = ChunkParser() if stream else None
        self._message: ChatMessage | None = None
        self._usage: Usage | None = None
        self._broken = False

    def feed(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or parser.stopped or self._broken:
            return
        try:
            parser.feed_text(data)
        except Exception:  # pragma: no cover - ChunkParser stores its errors
            self._broken = True
            logger.exception("on_complete copy-parser failed")

    def feed_json(self, raw: bytes) -> None:
        try:
            data = json.loads(raw)
            choice = data["choices"][0]
            msg = choice.get("message") or {}
            calls = tuple(
                ToolCall(
                    id=str(c.get("id") or ""),
                    name=str(c["function"].get("name") or ""),
                    arguments=str(c["function"].get("arguments") or ""),
                )
                for c in msg.get("tool_calls") or ()
            )
            # Mistral's reasoning models answer with a list of typed parts (issue #15).
            content, reasoning = content_text(msg.get("content"))
            self._message = ChatMessage(
                role=str(msg.get("role") or "assistant"),
                content=content,
                reasoning=reasoning,
                tool_calls=calls,
                finish_reason=choice.get("finish_reason"),
            )
            usage = data.get("usage")
            if isinstance(usage, Mapping):
                self._usage = Usage.from_dict(usage)
        except Exception as exc:
            logger.warning("on_complete could not read the JSON response: %s", type(exc).__name__)

    def record(
        self,
        *,
        request_id: str,
        principal: object,
        model: str,
        messages: list[object],
        outcome: Outcome,
        status: int,
        error: str | None,
        started_at: float,
        ttfb: float | None,
        duration: float,
        bytes_sent: int,
    ) -> CompletionRecord:
        from .asgi import CompletionRecord

        parser = self._parser
        if parser is not None:
            if not parser.stopped and outcome == "completed":
                parser.feed_eof()
            message = parser.message()
            usage = parser.usage
            if parser.error is not None:
                if isinstance(parser.error, APIError):
                    error = error or parser.error.message
                    if outcome == "completed":
                        outcome = "upstream_error"
                elif outcome == "completed":
                    # Ended with neither [DONE] nor a finish_reason, or an unreadable frame.
                    outcome = "upstream_error"
                    error = error or str(parser.error)
        else:
            message = self._message or ChatMessage()
            usage = self._usage
        return CompletionRecord(
            request_id=request_id,
            principal=principal,
            model=model,
            messages=messages,
            message=message,
            finish_reason=message.finish_reason,
            usage=usage,
            outcome=outcome,
            status=status,
            error=error,
            started_at=started_at,
            ttfb=ttfb,
            duration=duration,
            bytes_sent=bytes_sent,
        )
