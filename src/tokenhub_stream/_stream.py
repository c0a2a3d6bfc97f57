"""The bookkeeping of one stream, shared by both shells: its parser and deadlines, its
retries, who still owns it, how it ended (`Outcome`) and its timings. No I/O here: the
shells (`_async_client.py`, `_sync_client.py`) read the body and call in."""

from __future__ import annotations

import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Generic, Literal, Self, TypeAlias, TypeVar, cast

import httpx

from ._base import BaseClient, Call, engine_headers, loosen_read_timeout, read_error
from ._chunks import ChunkParser
from ._errors import request_id_of
from ._exceptions import (
    StreamConsumed,
    StreamTimeout,
    TokenHubError,
    TransportError,
    TruncatedStreamError,
)
from ._models import ChatMessage, Outcome, OutputT, Timings, ToolCall, Usage
from ._retry import Retries
from ._structured import StructuredOutput
from ._telemetry import ChatRecorder
from ._watchdog import StreamTimer

if TYPE_CHECKING:
    from ._engine._http import HttpResponse
    from ._engine._sync import SyncResponse

    #: A stream's answer: httpx's, or the engine's (asyncio or blocking).
    Response: TypeAlias = httpx.Response | HttpResponse | SyncResponse

__all__ = [
    "ConsumeMode",
    "ElementT",
    "StreamState",
    "StreamView",
    "observer_of",
    "outcome_for",
]

#: An element of a `list[...]` structured output, as `elements()` yields it.
ElementT = TypeVar("ElementT")

#: What a stream's consumer yields: text deltas, typed events, the partial value of a
#: structured output each time it changes, or the completed elements of a list output.
ConsumeMode: TypeAlias = Literal["text", "events", "partials", "elements"]


class StreamState:
    """Bookkeeping of one stream, shared by its public object (`ChatStream`,
    `AsyncChatStream`) and the generators that consume it.

    Those are its owners, and it never refers back to them: a stream nobody reads any
    more is then freed by reference counting, not by a later garbage collection, and when
    the last owner goes while the response is still open, `_abandon()` shuts the
    connection down from the weakref callback itself, with no event loop turn (issue 15).
    """

    _public_name = "ChatStream"

    def __init__(self, client: BaseClient, call: Call) -> None:
        self._base = client
        self._call = call
        self._sent_at: float | None = None
        self._parser = self._new_parser()
        self._timer: StreamTimer | None = None  # the open response's deadlines and socket
        self._response: Response | None = None  # open, and not yet released
        self._owners: list[_OwnerRef] = []
        # Where the caller made the stream, for the warning if it is dropped unclosed
        # (tracemalloc cannot tell on Python 3.11 for an object with a `__dict__`).
        made = _outside_frame(sys._getframe(1))
        self._made_at = (made.f_code.co_filename, made.f_lineno)
        self._total_deadline: float | None = None
        self._retries = Retries(call.max_retries, client.max_retry_wait, call.observer)
        self._claimed = False
        self._closed = False
        self._outcome: Outcome | None = None
        self._had_response = False
        self._output: StructuredOutput | None = None
        # The answer once its headers arrived: httpx's, or the engine's (then shown as an
        # `httpx.Response` only when asked: `response`).
        self._answer: Response | None = None
        self._view: httpx.Response | None = None

    def _new_parser(self, request_id: str | None = None) -> ChunkParser:
        return ChunkParser(
            max_event_bytes=self._base.max_event_bytes,
            strict=self._base.strict_utf8,
            started_at=self._sent_at,
            request_id=request_id,
            redact=self._call.redact,
        )

    def _structured(self, mode: ConsumeMode) -> StructuredOutput:
        """The stream's structured output, for `partials()` / `elements()` / `parsed`.

        Raises:
            TypeError: the stream has no `response_format`, or (`elements`) its output is
                not a list.
        """
        spec = self._call.output
        if spec is None:
            what = "parsed" if mode == "text" else f"{mode}()"
            raise TypeError(f"{what} needs a stream started with response_format=...")
        if mode == "elements" and not spec.is_list:
            raise TypeError(f"elements() needs a list output, such as list[Model], not {spec.name}")
        if self._output is None:
            self._output = StructuredOutput(spec)
        return self._output

    def _feed(self, mode: ConsumeMode) -> Callable[[bytes], Sequence[object]]:
        """What turns the current parser's chunks into the items `mode` yields."""
        parser = self._parser
        if mode == "text":
            return parser.feed_text
        if mode == "events":
            return parser.feed_events
        output = self._structured(mode)
        if mode == "partials":
            return output.partials_feed(parser.feed_text)
        return output.elements_feed(parser.feed_text)

    def _end(self, mode: ConsumeMode) -> None:
        """The stream completed: check a structured output read delta by delta.

        Raises:
            OutputRefusedError: the model refused.
            OutputValidationError, IncompleteOutputError: the output is bad.
        """
        if mode == "partials" or mode == "elements":
            parser = self._parser
            self._structured(mode).finish(parser.finish_reason, parser.refusal)

    def _parsed(self) -> object:
        output = self._structured("text")
        outcome = self._outcome
        if outcome is None:
            raise RuntimeError("parsed is set once the stream has been read to its end")
        if not outcome.ok:
            if outcome.error is not None:
                raise outcome.error
            raise RuntimeError(f"the stream did not complete ({outcome.kind}): nothing parsed")
        message = self._parser.message()
        return output.finish_text(message.content, message.finish_reason, message.refusal)

    def _claim(self) -> None:
        if self._claimed:
            raise StreamConsumed("this stream has already been iterated (one consumer each)")
        self._claimed = True

    def _before_send(self) -> None:
        self._sent_at = time.monotonic()
        if self._total_deadline is None and self._call.timeout.total is not None:
            self._total_deadline = self._sent_at + self._call.timeout.total
        observer = self._call.observer
        if observer is not None:
            observer.sending(self._call.headers)

    @property
    def response(self) -> httpx.Response | None:
        """The `httpx.Response` of the stream once its headers arrived (closed after)."""
        answer = self._answer
        if answer is None or isinstance(answer, httpx.Response):
            return answer
        view = self._view
        if view is None:  # the engine's answer: an httpx.Response over it, made once
            from ._engine._transport import as_httpx

            call = self._call
            request = httpx.Request("POST", call.url, headers=engine_headers(call))
            view = self._view = as_httpx(answer, request)
        return view

    def _start(self, response: Response) -> None:
        """The upstream answered 2xx with an event stream: set up parsing and deadlines."""
        request_id = request_id_of(response.headers)
        parser = self._parser
        sent_at = self._sent_at
        if (
            sent_at is None
            or self._had_response
            or parser.last_event_at is not None
            or parser.ended_at is not None
            or parser.error is not None
        ):
            self._parser = self._new_parser(request_id)  # a retry: start afresh
        else:  # the parser made with the stream has seen nothing yet: reuse it
            parser.started_at = sent_at
            parser.request_id = request_id
        self._had_response = True
        self._answer = response
        self._view = None
        t = self._call.timeout
        if isinstance(response, httpx.Response):
            loosen_read_timeout(response, t.first_token, t.idle, t.total)
        self._timer = StreamTimer(self._parser, first_token=t.first_token, idle=t.idle)
        self._timer.watch(response, self._total_deadline)

    def _read_error(self, exc: Exception) -> TokenHubError:
        """Translate an httpx error raised while reading the body."""
        timeout = None
        if isinstance(exc, httpx.TimeoutException):
            t = self._call.timeout
            started = self._parser.first_token_at is not None
            timeout = StreamTimeout(
                *(("idle", t.idle) if started else ("first_token", t.first_token))
            )
        return read_error(exc, "stream", timeout)

    def _start_drain(self) -> bool:
        """After [DONE]: drain only if a watchdog can bound the time it takes, or if there
        is nothing left to wait for (the engine's response came in whole with the last
        read, as a short stream's mostly does: draining reads only what it holds)."""
        response = self._response
        if (
            response is not None
            and not isinstance(response, httpx.Response)
            and response.is_complete
        ):
            return True
        return self._timer is not None and self._timer.drain(self._base.drain_timeout)

    def _settle(self) -> TokenHubError | None:
        """Decide the stream's result once the body loop ended; returns the error to raise."""
        parser = self._parser
        timer = self._timer
        if timer is not None:
            timer.stop()
        error = parser.error
        fired = timer.fired if timer is not None else None
        if fired and fired != "drain" and not parser.done:
            if error is None or isinstance(error, TruncatedStreamError | TransportError):
                seconds = {
                    "first_token": self._call.timeout.first_token,
                    "idle": self._call.timeout.idle,
                    "total": self._call.timeout.total,
                }[fired]
                error = StreamTimeout(fired, seconds)  # type: ignore[arg-type]
        if isinstance(error, StreamTimeout) and error.kind == "idle" and parser.finish_reason:
            error = None  # finished, then the upstream kept the connection open: a normal end
        parser.error = error
        if parser.ended_at is None:
            parser.ended_at = time.monotonic()
        if error is None:
            self._outcome = Outcome("completed", "done" if parser.done else "finish_reason")
            self._observed()
        else:  # final unless _retry_after_failure grants a retry
            self._outcome = outcome_for(error, self._had_response)
        return error

    def _retry_after_failure(self, error: TokenHubError) -> float | None:
        delay = self._retries.next_delay(error, delivered=bool(self._parser.delivered))
        if delay is not None:
            self._outcome = None
        else:
            self._observed()
        return delay

    def _fail(self, error: TokenHubError) -> None:
        self._outcome = outcome_for(error, self._had_response)
        self._observed()

    def _observed(self) -> None:
        # The outcome is final: the telemetry reads the stream's results once, now.
        observer = self._call.observer
        if observer is not None:
            observer.stream_ended(self._parser, self._outcome)

    def _record_exit(self, exc: BaseException | None) -> None:
        if self._outcome is not None:
            return
        if isinstance(exc, TokenHubError):
            self._outcome = outcome_for(exc, self._had_response)
        else:  # consumer left early, task cancelled, KeyboardInterrupt, consumer's own error
            self._outcome = Outcome("cancelled", type(exc).__name__ if exc else None)
        if self._parser.ended_at is None:
            self._parser.ended_at = time.monotonic()
        self._observed()

    # --- owners ------------------------------------------------------------------

    def _adopt(self, owner: object) -> None:
        """Count `owner` (the public stream, or a consuming generator) as keeping this
        stream in use; per stream, never per chunk."""
        self._owners.append(_OwnerRef(owner, self))

    def _on_owner_gone(self) -> None:
        if self._response is None:  # not open (the usual end: closed): nothing to shut
            return
        for ref in self._owners:
            if ref() is not None:
                return
        self._abandon()  # opened, and nobody closed it

    def _abandon(self) -> None:
        """Every owner is gone and the response is open: close the connection now.

        This runs inside a weakref callback, so it must not await: it shuts the socket
        down (`StreamTimer.shutdown`: the pending or next read ends at once, and the
        upstream sees the disconnect), and leaves the rest of the cleanup to the
        consuming generator's `finally` (run at once in sync code, and by the event
        loop's async-generator finalizer in async code).
        """
        if self._timer is not None:
            self._timer.shutdown()
        filename, line = self._made_at
        message = (
            f"unclosed stream {self!r} made at {filename}:{line}: its connection was shut "
            "down when it was dropped (use a with block, or close the stream)"
        )
        self._record_exit(None)
        # As CPython's own unclosed files and sockets, the warning points at the code
        # that dropped the stream, and `source` lets tracemalloc show where it was made.
        warnings.warn(message, ResourceWarning, stacklevel=_outside_stacklevel(), source=self)

    def __repr__(self) -> str:
        state = self._outcome.kind if self._outcome else ("open" if self._claimed else "new")
        return f"<{self._public_name} model={self._call.model!r} {state}>"


class _OwnerRef(weakref.ref[object]):
    """A weak reference to one owner of a stream that tells the stream when the owner is
    gone. It holds the stream weakly too, so it adds no reference cycle."""

    __slots__ = ("state",)

    def __new__(cls, owner: object, state: StreamState) -> Self:
        return super().__new__(cls, owner, _owner_gone)

    def __init__(self, owner: object, state: StreamState) -> None:
        self.state = weakref.ref(state)


def _owner_gone(ref: weakref.ref[object]) -> None:
    # Runs inside the owner's deallocation, where an exception can only be printed and
    # ignored; at interpreter exit the process is about to drop its sockets anyway.
    state = ref.state() if isinstance(ref, _OwnerRef) else None
    if state is not None and not sys.is_finalizing():
        state._on_owner_gone()


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_frame(frame: FrameType) -> FrameType:
    """`frame`, or the innermost of its callers outside this package."""
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return frame


def _outside_stacklevel() -> int:
    """The `stacklevel` that points `warn()`, called by our caller, at the innermost frame
    outside this package."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


class StreamView(Generic[OutputT]):
    """The results of a stream, as its public object shows them (read from its state).

    Generic in the type of its structured output (`parsed`), as the public streams are.
    """

    _state: StreamState

    @property
    def response(self) -> httpx.Response | None:
        """The `httpx.Response` of the stream once its headers arrived (closed after)."""
        return self._state.response

    @property
    def message(self) -> ChatMessage:
        """The assistant message assembled so far (content, reasoning, tool calls)."""
        return self._state._parser.message()

    @property
    def usage(self) -> Usage | None:
        """The last usage the upstream reported, normalised; None if it sent none."""
        return self._state._parser.usage

    @property
    def finish_reason(self) -> str | None:
        return self._state._parser.finish_reason

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self._state._parser.message().tool_calls

    @property
    def parsed(self) -> OutputT:
        """The validated value of a structured output (`response_format=`), once the stream
        has been read to its end: an instance of the type asked for (a model, a dataclass,
        a list of models, ...), or the decoded JSON for a JSON schema.

        Typed as what was asked for: a `Card` on the `ChatStream[Card]` that
        `response_format=Card` makes, `object` for a JSON schema (docs/structured.md#types).

        Raises:
            TypeError: the stream has no `response_format`.
            RuntimeError: the stream has not been read to its end yet, or was left early.
            OutputRefusedError: the model refused (`message.refusal`); checked first.
            OutputValidationError: the output is not valid JSON or does not fit the type.
            IncompleteOutputError: finish_reason `length` or `content_filter` cut it short.
            TokenHubError: the error the stream ended with (`TruncatedStreamError`, ...).
        """
        # The value was validated into the type the stream was made generic in.
        return cast(OutputT, self._state._parsed())

    @property
    def outcome(self) -> Outcome | None:
        """How the stream ended; None while it is still open."""
        return self._state._outcome

    @property
    def request_id(self) -> str | None:
        return self._state._parser.request_id

    @property
    def timings(self) -> Timings:
        """Time to first token, total time and rate (tokens/s from usage, else deltas/s)."""
        p = self._state._parser
        if self._state._sent_at is None:
            return Timings()
        start = p.started_at
        end = p.ended_at if p.ended_at is not None else time.monotonic()
        ttft = None if p.first_token_at is None else p.first_token_at - start
        rate = unit = None
        if p.first_token_at is not None:
            span = end - p.first_token_at
            usage = p.usage
            if usage is not None and usage.completion_tokens is not None:
                count, unit = usage.completion_tokens, "tokens/s"
            else:
                count, unit = p.delta_count, "deltas/s"
            rate = count / span if span > 0 else None
            if rate is None:
                unit = None
        return Timings(ttft, end - start, rate, unit)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return repr(self._state)


def outcome_for(error: TokenHubError, had_response: bool) -> Outcome:
    if isinstance(error, StreamTimeout):
        return Outcome("timeout", error.kind, error)
    if isinstance(error, TruncatedStreamError):
        return Outcome("truncated", None, error)
    if isinstance(error, TransportError):
        return Outcome("truncated" if had_response else "upstream_error", None, error)
    return Outcome("upstream_error", None, error)


def observer_of(stream: object) -> ChatRecorder | None:
    """The telemetry of a stream made by our clients (None for any other object, or when
    telemetry is off). Used by the tool loop: a turn's tool calls get spans under it."""
    return stream._state._call.observer if isinstance(stream, StreamView) else None
