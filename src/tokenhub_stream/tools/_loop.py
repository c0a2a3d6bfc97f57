"""The async tool loop: stream a turn, run the tools it asked for, send the results, repeat.

The async I/O shell; edit this file, then run scripts/unasync.py.
The decisions live in `LoopCore` (`_core.py`), written once for both shells.

Every turn streams, including the ones that end in tool calls: re-sending a prompt
without streaming to get the calls whole would pay for it twice (issue 5).

The loop knows its client only as `AsyncStreamingClient`, the one method it calls: the
client imports the loop, never the other way round.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import AsyncGenerator, AsyncIterator
from types import TracebackType
from typing import Protocol, Self

from .._base import HeaderTypes, MessagesTypes, TimeoutTypes
from .._config import UNSET, UnsetType
from .._exceptions import StreamConsumed
from .._models import (
    ChatMessage,
    ContentDelta,
    ReasoningDelta,
    RefusalDelta,
    StreamEvent,
    ToolCallDelta,
    Usage,
)
from .._stream import observer_of
from ._core import DEFAULT_MAX_TURNS, LoopCore, StreamOptions, arun_calls, dropped_warning
from ._events import ToolCallStarted, ToolLoopEvent
from ._tool import ToolsTypes

__all__ = [
    "DEFAULT_MAX_TURNS",
    "AsyncStreamingClient",
    "AsyncToolLoop",
    "AsyncTurnStream",
    "arun_tools",
]


class AsyncTurnStream(Protocol):
    """What the loop uses of one turn's stream (`AsyncChatStream`)."""

    @property
    def message(self) -> ChatMessage: ...

    @property
    def usage(self) -> Usage | None: ...

    def events(self) -> AsyncIterator[StreamEvent]: ...

    async def aclose(self) -> None: ...


class AsyncStreamingClient(Protocol):
    """What the loop uses of its client (`AsyncClient`): one stream per turn, and whether
    tool schemas say `strict: true`."""

    strict_schemas: bool

    def stream_chat(
        self,
        messages: MessagesTypes,
        *,
        model: str | UnsetType = ...,
        timeout: TimeoutTypes | UnsetType = ...,
        max_retries: int | UnsetType = ...,
        include_usage: bool | UnsetType = ...,
        extra_headers: HeaderTypes | None = ...,
        **params: object,
    ) -> AsyncTurnStream: ...


class _Reading:
    """The stream a loop is reading now, and its events iterator.

    The loop's generator reaches them only through this object, never through a local
    variable or a loop statement's own iterator, so that dropping the loop can let go of
    them at once (`__del__`).
    """

    __slots__ = ("events", "stream")

    def __init__(self) -> None:
        self.stream: AsyncTurnStream | None = None
        self.events: AsyncIterator[StreamEvent] | None = None


class AsyncToolLoop:
    """A running tool loop: an async iterator of events, and the conversation it builds.

    ```python
    async with client.run_tools(messages, tools=[get_weather]) as loop:
        async for event in loop:
            if isinstance(event, ContentDelta):
                print(event.text, end="")
            elif isinstance(event, ToolCallStarted):
                print(f"calling {event.call.name}({event.call.arguments})")
    messages = loop.messages  # the whole conversation, to continue it
    ```

    Events, in order, per turn: `ContentDelta`/`ReasoningDelta`/`RefusalDelta`/
    `ToolCallDelta` as they stream (a `ToolCallDelta` carries the call's arguments decoded so far in
    `partial_arguments`), `TurnFinished`, then for a tool turn one `ToolCallStarted` per
    call and, once all calls of the turn are done, one `ToolResult` per call (in call
    order).

    The calls of one turn run side by side, in a task group (sync tools in worker threads).

    Iterate it once; `until_done()` iterates for you. Leaving the `async with` block or
    `aclose()` closes the current stream. So does dropping an unfinished loop (a bare
    `break` with no `async with`), with a `ResourceWarning`, as for an unclosed file.
    """

    def __init__(
        self, client: AsyncStreamingClient, core: LoopCore, options: StreamOptions
    ) -> None:
        self._reading = _Reading()
        self._client = client
        self._core = core
        self._options = options
        self._events: AsyncGenerator[ToolLoopEvent, None] | None = None
        self._iterated = False  # `async for` began (anext() alone may come first)

    @property
    def messages(self) -> list[dict[str, object]]:
        """The conversation so far: the input, then each assistant message and its tool
        results (after `MaxTurnsExceeded`, without the unanswered assistant message)."""
        return self._core.messages

    @property
    def final(self) -> ChatMessage | None:
        """The last assistant message (the answer, once the loop is done)."""
        return self._core.final

    @property
    def turns(self) -> int:
        """Model requests finished so far."""
        return self._core.turn

    def __aiter__(self) -> Self:
        if self._iterated:
            raise StreamConsumed("a tool loop can be iterated only once")
        self._iterated = True
        if self._events is None:
            self._events = self._start()
        return self

    async def __anext__(self) -> ToolLoopEvent:
        if self._events is None:
            self._events = self._start()
        return await self._events.__anext__()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the loop, closing the stream in progress (tools already running finish)."""
        if self._events is not None:
            await self._events.aclose()

    async def until_done(self) -> ChatMessage:
        """Run the loop to its end, ignoring the events; return the final message.

        Raises:
            MaxTurnsExceeded: the model still asked for tools in the last turn.
            StreamConsumed: the loop was already iterated.
            TokenHubError: as `stream_chat` (API, transport and protocol errors).
        """
        async for _ in self:
            pass
        assert self.final is not None
        return self.final

    def _start(self) -> AsyncGenerator[ToolLoopEvent, None]:
        # The generator gets what it needs, not `self`: a loop object and its generator
        # referring to each other would live on until a garbage collection.
        return _run(self._client, self._core, self._options, self._reading)

    def __del__(self) -> None:
        # Dropped while a stream is open (a bare `break`): let go of the stream now, and
        # its own finalizer shuts the connection down at once, awaiting nothing (issue 15
        # finding 2). The generator itself is closed later (by the event loop, for an
        # async one), and finds nothing left to close.
        reading = self._reading
        if reading.stream is None or sys.is_finalizing():
            return
        try:
            message = dropped_warning(type(self).__name__, self._core)
            warnings.warn(message, ResourceWarning, stacklevel=2, source=self._core)
        finally:  # even when warnings are errors
            reading.stream = reading.events = None


async def _run(
    client: AsyncStreamingClient, core: LoopCore, opts: StreamOptions, reading: _Reading
) -> AsyncGenerator[ToolLoopEvent, None]:
    while True:
        reading.stream = client.stream_chat(
            core.messages,
            model=opts.model,
            timeout=opts.timeout,
            max_retries=opts.max_retries,
            include_usage=opts.include_usage,
            extra_headers=opts.extra_headers,
            tools=core.schemas,
            **opts.params,
        )
        try:
            reading.events = reading.stream.events()
            while True:
                try:  # what `async for` does, without holding the iterator on the frame
                    event = await reading.events.__anext__()
                except StopAsyncIteration:
                    break
                if isinstance(event, ContentDelta | ReasoningDelta | RefusalDelta):
                    yield event
                elif isinstance(event, ToolCallDelta):
                    yield core.tool_call_delta(event)
            turn = reading.stream
            finished = core.end_turn(turn.message, turn.usage, observer_of(turn))
        finally:
            stream, reading.stream, reading.events = reading.stream, None, None
            if stream is not None:
                await stream.aclose()
        yield finished
        calls = core.calls()
        if not calls:
            return
        for call in calls:
            yield ToolCallStarted(call, core.turn)
        results = await arun_calls([core.prepare(call) for call in calls])
        for result in core.add_results(results):
            yield result


def arun_tools(
    client: AsyncStreamingClient,
    messages: MessagesTypes,
    *,
    tools: ToolsTypes,
    model: str | UnsetType = UNSET,
    max_turns: int = DEFAULT_MAX_TURNS,
    timeout: TimeoutTypes | UnsetType = UNSET,
    max_retries: int | UnsetType = UNSET,
    include_usage: bool | UnsetType = UNSET,
    extra_headers: HeaderTypes | None = None,
    **params: object,
) -> AsyncToolLoop:
    """Start a tool loop on a client (nothing is sent before iteration).

    Args:
        client: the client whose `stream_chat` each turn uses.
        messages: the conversation, OpenAI shape (copied; not modified).
        tools: a `ToolSet`, or `Tool`s and plain functions (sync or async; the sync
            loop takes sync ones only).
        model: the model; default the client's.
        max_turns: the most model requests; a last turn still asking for tools raises
            `MaxTurnsExceeded`.
        timeout, max_retries, include_usage, extra_headers: per request, as `stream_chat`.
        **params: other body fields sent with every turn (`tool_choice`,
            `parallel_tool_calls`, `temperature`, ...).

    Returns:
        The loop, `AsyncToolLoop`.

    Raises:
        TypeError: `stream` in `params`; messages not a list; a tool cannot be made; (the
            sync loop) a tool is a coroutine function. All before any request.
        ValueError: `tools` is empty, two tools share a name, or `max_turns` < 1.
    """
    core = LoopCore(messages, tools, max_turns, params, sync=False, strict=client.strict_schemas)
    options = StreamOptions(model, timeout, max_retries, include_usage, extra_headers, params)
    return AsyncToolLoop(client, core, options)
