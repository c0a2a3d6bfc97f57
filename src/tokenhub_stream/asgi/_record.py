"""The turn record: `CompletionRecord`, assembled by `TurnCollector` from a copy of the
relayed bytes, for `on_complete` and a `UsageLimiter`.

A collector exists only when `on_complete` or a `UsageLimiter` is set, so the plain
passthrough never decodes JSON. Never raises from `feed*`: a frame it cannot read only
ends the copy-parsing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .._chunks import ChunkParser
from .._completion import parse_completion
from .._exceptions import APIError
from .._models import ChatMessage, Usage, add_usage

__all__ = [
    "CompletionRecord",
    "TurnCollector",
    "TurnOutcome",
    "TurnSummary",
    "add_usage",
    "estimate_usage",
]

#: How a forwarded turn ended (`CompletionRecord.outcome`).
TurnOutcome = Literal["completed", "upstream_error", "client_disconnect", "timeout"]

logger = logging.getLogger("tokenhub_stream.asgi")

# OpenAI's rule of thumb: a token is about 4 characters of English text.
CHARS_PER_TOKEN = 4
# About the size of one chat.completion.chunk event carrying one token, for a stream whose
# text could not be read.
BYTES_PER_EVENT = 200


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """One turn through the proxy, handed to `on_complete`.

    `message` (content, tool calls), `finish_reason` and `usage` are assembled from a copy of
    the stream (or the JSON body when `stream` was false); empty/`None` when nothing arrived.
    `usage` is only ever what the upstream reported. `estimated_usage` is set when that is
    missing or incomplete for a turn the upstream took on (a client that left early, a cut
    stream, an upstream that sends no usage): the proxy's estimate of the whole turn, the
    figure a `UsageLimiter` is charged instead (docs/proxy.md, "Usage of a turn that ends
    early"). `started_at` is wall-clock (`time.time()`); `ttfb` (request to first byte sent
    to the client) and `duration` are seconds.
    """

    request_id: str
    principal: object
    model: str
    messages: list[object]
    message: ChatMessage
    finish_reason: str | None
    usage: Usage | None
    outcome: TurnOutcome
    status: int
    error: str | None
    started_at: float
    ttfb: float | None
    duration: float
    bytes_sent: int
    estimated_usage: Usage | None = None

    def __repr__(self) -> str:
        return (
            f"CompletionRecord(request_id={self.request_id!r}, model={self.model!r}, "
            f"outcome={self.outcome!r}, finish_reason={self.finish_reason!r})"
        )


OnCompleteHook = Callable[[CompletionRecord], Awaitable[None] | None]


def estimate_usage(*, request_bytes: int, text_chars: int, event_bytes: int) -> Usage:
    """A turn's usage when the upstream did not report it (docs/proxy.md).

    prompt = ceil(request body bytes / 4); completion = ceil(text characters relayed / 4),
    or, when no text could be read from the events relayed, ceil(their bytes / 200): never
    0 for a turn that relayed anything.
    """
    prompt = math.ceil(request_bytes / CHARS_PER_TOKEN)
    if text_chars:
        completion = math.ceil(text_chars / CHARS_PER_TOKEN)
    else:
        completion = math.ceil(event_bytes / BYTES_PER_EVENT)
    return Usage(prompt, completion, prompt + completion)


def _text_chars(message: ChatMessage) -> int:
    # A refusal is output the upstream bills like content.
    chars = len(message.content) + len(message.reasoning or "") + len(message.refusal or "")
    for call in message.tool_calls:
        chars += len(call.name) + len(call.arguments)
    return chars


class TurnSummary(NamedTuple):
    """What a turn's copy shows, for the telemetry (`TurnCollector.summary`)."""

    message: ChatMessage
    usage: Usage | None  # as reported; None if the upstream sent none
    estimated: Usage | None  # the estimate when `usage` is None (as a UsageLimiter's)
    response_id: str | None
    response_model: str | None
    first_token_at: float | None  # time.monotonic()
    last_event_at: float | None
    chunks: int  # deltas relayed (0 for a JSON answer)


class TurnCollector:
    __slots__ = (
        "_broken",
        "_event_bytes",
        "_ids",
        "_message",
        "_parser",
        "_request_bytes",
        "_stream",
        "_usage",
        "unfinished",
    )

    def __init__(self, *, stream: bool, request_bytes: int = 0) -> None:
        self._stream = stream
        self._parser = ChunkParser() if stream else None
        self._message: ChatMessage | None = None
        self._usage: Usage | None = None
        self._ids: tuple[str | None, str | None] = (None, None)
        self._broken = False
        self._request_bytes = request_bytes
        self._event_bytes = 0
        # The tool loop's estimate of a turn cut before its usage arrived, added to the
        # usage of the turns that finished.
        self.unfinished: Usage | None = None

    def feed(self, data: bytes) -> None:
        self._event_bytes += len(data)
        parser = self._parser
        if parser is None or parser.stopped or self._broken:
            return
        try:
            parser.feed_text(data)
        except Exception:  # pragma: no cover - ChunkParser stores its errors
            self._broken = True
            logger.exception("on_complete copy-parser failed")

    def feed_json(self, raw: bytes) -> None:
        # The same reader as the client's `chat()`; `raw` comes redacted already, so
        # nothing of the key reaches the record. Never raises: an unreadable body (or an
        # error body) only logs, and the record keeps an empty message.
        self._event_bytes = len(raw)
        try:
            result = parse_completion(raw)
        except Exception as exc:
            logger.warning("on_complete could not read the JSON response: %s", type(exc).__name__)
            return
        self._message = result.message
        self._usage = result.usage
        self._ids = (result.id, result.model)

    def summary(self) -> TurnSummary:
        """What arrived so far (no estimate of a turn cut mid-way by the tool loop)."""
        parser = self._parser
        first: float | None = None
        last: float | None = None
        chunks = 0
        if parser is not None:
            message, usage = parser.message(), parser.usage
            ids = (parser.response_id, parser.response_model)
            first, last, chunks = parser.first_token_at, parser.last_event_at, parser.delta_count
        else:
            message, usage, ids = self._message or ChatMessage(), self._usage, self._ids
        estimated = None
        if usage is None and self._event_bytes:
            estimated = estimate_usage(
                request_bytes=self._request_bytes,
                text_chars=_text_chars(message),
                event_bytes=self._event_bytes,
            )
        return TurnSummary(message, usage, estimated, ids[0], ids[1], first, last, chunks)

    def record(
        self,
        *,
        request_id: str,
        principal: object,
        model: str,
        messages: list[object],
        outcome: TurnOutcome,
        status: int,
        error: str | None,
        started_at: float,
        ttfb: float | None,
        duration: float,
        bytes_sent: int,
    ) -> CompletionRecord:
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
        estimated: Usage | None = None
        if self.unfinished is not None:
            estimated = add_usage(usage, self.unfinished)
        elif usage is None and (200 <= status < 300 or status == 0):
            # The upstream took the turn on (a 2xx, or the client left before any status)
            # and its usage never came: charge what the relayed text shows it cost.
            estimated = estimate_usage(
                request_bytes=self._request_bytes,
                text_chars=_text_chars(message),
                event_bytes=self._event_bytes,
            )
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
            estimated_usage=estimated,
        )
