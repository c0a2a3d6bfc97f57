"""The tool loop: stream a turn, run the tools it asked for, send the results, repeat.

The decisions (what a tool turn is, how a call becomes keyword arguments, what goes back
to the model) live in `_LoopCore`, written once; `AsyncToolLoop` and `ToolLoop` are the
I/O shells. They differ in how calls run side by side: an anyio task group (sync tools in
worker threads) for the async loop, a thread per call for the sync one.

Every turn streams, including the ones that end in tool calls: re-sending a prompt
without streaming to get the calls whole would pay for it twice (issue 5).
"""

from __future__ import annotations

import contextvars
import inspect
import json
import logging
import time
from collections.abc import AsyncGenerator, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Self

import anyio
import anyio.to_thread

from ._base import HeaderTypes, MessagesTypes, TimeoutTypes
from ._config import UNSET, UnsetType
from ._exceptions import StreamConsumed
from ._models import ChatMessage, ContentDelta, ReasoningDelta, ToolCall, Usage
from .tools import (
    MaxTurnsExceeded,
    Tool,
    ToolCallStarted,
    ToolLoopEvent,
    ToolResult,
    ToolSet,
    ToolsTypes,
    TurnFinished,
)

if TYPE_CHECKING:
    from ._async_client import AsyncClient
    from ._sync_client import Client

__all__ = ["DEFAULT_MAX_TURNS", "AsyncToolLoop", "ToolLoop", "arun_tools", "run_tools_sync"]

#: Model requests one loop may make before `MaxTurnsExceeded`.
DEFAULT_MAX_TURNS = 8

logger = logging.getLogger("tokenhub_stream.tools")


@dataclass(slots=True)
class _Invocation:
    """A call ready to run: its tool and decoded keyword arguments."""

    call: ToolCall
    tool: Tool[..., object]
    kwargs: dict[str, object]
    turn: int
    started: float = field(default=0.0)

    def start(self) -> None:
        self.started = time.perf_counter()

    def succeeded(self, value: object) -> ToolResult:
        return ToolResult(self.call, _output(value), False, self.turn, self._elapsed())

    def failed(self, exc: Exception) -> ToolResult:
        # The model reads this and can retry or explain; the developer gets the traceback.
        logger.warning("tool %r raised %s", self.call.name, type(exc).__name__, exc_info=exc)
        text = f"Error: {type(exc).__name__}: {exc}" if str(exc) else f"Error: {type(exc).__name__}"
        return ToolResult(self.call, text, True, self.turn, self._elapsed())

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started


def _output(value: object) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError):
        return str(value)


def _json_default(value: object) -> object:
    import dataclasses
    import enum

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError


class _LoopCore:
    """The pure part of the loop: the conversation, the turn count, the decisions."""

    def __init__(
        self,
        messages: MessagesTypes,
        tools: ToolsTypes,
        max_turns: int,
        params: Mapping[str, object],
        *,
        sync: bool,
    ) -> None:
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
            raise TypeError("messages must be a list of message objects")
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ValueError(f"max_turns must be an int >= 1, not {max_turns!r}")
        if "stream" in params:
            raise TypeError("the tool loop always streams; do not pass 'stream'")
        self.tools = ToolSet.coerce(tools)
        if not self.tools:
            raise ValueError("tools is empty; use stream_chat() for a turn without tools")
        if sync:
            for item in self.tools.values():
                if item.is_async:
                    raise TypeError(
                        f"tool {item.name!r} is a coroutine function; the sync Client "
                        "cannot await it: use AsyncClient.run_tools or a plain def"
                    )
        self.messages: list[dict[str, object]] = [dict(m) for m in messages]
        self.schemas = self.tools.to_openai()
        self.max_turns = max_turns
        self.turn = 0
        self.final: ChatMessage | None = None
        self._pending: tuple[ToolCall, ...] = ()

    def end_turn(self, message: ChatMessage, usage: Usage | None) -> TurnFinished:
        self.turn += 1
        self.final = message
        # A turn with tool calls is a tool turn whatever finish_reason says: Gemini
        # ends them with "stop" (PROVIDER_QUIRKS.md item 6).
        self._pending = message.tool_calls
        if not self._pending or self.turn < self.max_turns:
            # to_dict() keeps provider extras such as Gemini's extra_content.
            self.messages.append(message.to_dict())
        return TurnFinished(self.turn, message, usage)

    def calls(self) -> tuple[ToolCall, ...]:
        """The calls to run now; empty when the conversation is over.

        Raises:
            MaxTurnsExceeded: the last allowed turn still asked for tools.
        """
        if self._pending and self.turn >= self.max_turns:
            assert self.final is not None
            raise MaxTurnsExceeded(self.max_turns, self.final)
        return self._pending

    def prepare(self, call: ToolCall) -> _Invocation | ToolResult:
        """The call ready to run, or the error result the model gets instead."""
        found = self.tools.get(call.name)
        if found is None:
            names = ", ".join(self.tools)
            text = f"Error: unknown tool {call.name!r}; the available tools are: {names}"
            return ToolResult(call, text, True, self.turn)
        try:
            kwargs = found.parse_arguments(call.arguments)
        except (TypeError, ValueError) as exc:
            text = f"Error: invalid arguments for {call.name!r}: {exc}. Arguments: {call.arguments}"
            return ToolResult(call, text, True, self.turn)
        return _Invocation(call, found, kwargs, self.turn)

    def add_results(self, results: Sequence[ToolResult]) -> Sequence[ToolResult]:
        self.messages.extend(result.to_message() for result in results)
        return results


def _not_awaitable(value: object) -> object:
    # A plain def handing back a coroutine: it was registered as sync, so it is not
    # awaited (trio would refuse it in a worker thread anyway).
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: close it so Python does not warn
        raise TypeError("the tool is a plain function but returned an awaitable")
    return value


def _run_sync(invocation: _Invocation | ToolResult) -> ToolResult:
    if isinstance(invocation, ToolResult):
        return invocation
    invocation.start()
    try:
        value = _not_awaitable(invocation.tool.fn(**invocation.kwargs))
    except Exception as exc:
        return invocation.failed(exc)
    return invocation.succeeded(value)


async def _run_async(invocation: _Invocation | ToolResult) -> ToolResult:
    if isinstance(invocation, ToolResult):
        return invocation
    invocation.start()
    call = partial(invocation.tool.fn, **invocation.kwargs)
    try:
        if invocation.tool.is_async:
            coroutine = call()
            assert inspect.isawaitable(coroutine)
            value = await coroutine
        else:
            # In a worker thread, so it blocks neither the event loop nor sibling calls.
            value = _not_awaitable(await anyio.to_thread.run_sync(call))
    except Exception as exc:
        return invocation.failed(exc)
    return invocation.succeeded(value)


async def _run_all_async(invocations: Sequence[_Invocation | ToolResult]) -> list[ToolResult]:
    results: list[ToolResult | None] = [None] * len(invocations)

    async def run(i: int, invocation: _Invocation | ToolResult) -> None:
        results[i] = await _run_async(invocation)

    async with anyio.create_task_group() as group:
        for i, invocation in enumerate(invocations):
            group.start_soon(run, i, invocation)
    return [result for result in results if result is not None]


def _run_all_sync(invocations: Sequence[_Invocation | ToolResult]) -> list[ToolResult]:
    if len(invocations) == 1:
        return [_run_sync(invocations[0])]
    with ThreadPoolExecutor(len(invocations), "tokenhub-tool") as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, _run_sync, invocation)
            for invocation in invocations
        ]
        return [future.result() for future in futures]


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

    Events, in order, per turn: `ContentDelta`/`ReasoningDelta` as they stream,
    `TurnFinished`, then for a tool turn one `ToolCallStarted` per call and, once all
    calls of the turn are done, one `ToolResult` per call (in call order).

    Iterate it once; `until_done()` iterates for you. Leaving the `async with` block or
    `aclose()` closes the current stream.
    """

    def __init__(
        self,
        client: AsyncClient,
        core: _LoopCore,
        model: str | UnsetType,
        options: _StreamOptions,
    ) -> None:
        self._client = client
        self._core = core
        self._model = model
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
            self._events = self._run()
        return self

    async def __anext__(self) -> ToolLoopEvent:
        if self._events is None:
            self._events = self._run()
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

    async def _run(self) -> AsyncGenerator[ToolLoopEvent, None]:
        core, opts = self._core, self._options
        while True:
            async with self._client.stream_chat(
                core.messages,
                model=self._model,
                timeout=opts.timeout,
                max_retries=opts.max_retries,
                include_usage=opts.include_usage,
                extra_headers=opts.extra_headers,
                tools=core.schemas,
                **opts.params,
            ) as stream:
                async for event in stream.events():
                    if isinstance(event, ContentDelta | ReasoningDelta):
                        yield event
            yield core.end_turn(stream.message, stream.usage)
            calls = core.calls()
            if not calls:
                return
            for call in calls:
                yield ToolCallStarted(call, core.turn)
            results = await _run_all_async([core.prepare(call) for call in calls])
            for result in core.add_results(results):
                yield result


class ToolLoop:
    """A running tool loop (sync `Client`): an iterator of events, and the conversation.

    ```python
    with client.run_tools(messages, tools=[get_weather]) as loop:
        for event in loop:
            if isinstance(event, ContentDelta):
                print(event.text, end="")
    answer = loop.final
    ```

    The same events as `AsyncToolLoop`. Several calls of one turn run in threads, one per
    call; a single call runs in the calling thread.
    """

    def __init__(
        self,
        client: Client,
        core: _LoopCore,
        model: str | UnsetType,
        options: _StreamOptions,
    ) -> None:
        self._client = client
        self._core = core
        self._model = model
        self._options = options
        self._events: Generator[ToolLoopEvent, None, None] | None = None
        self._iterated = False  # `for` began (next() alone may come first)

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

    def __iter__(self) -> Self:
        if self._iterated:
            raise StreamConsumed("a tool loop can be iterated only once")
        self._iterated = True
        if self._events is None:
            self._events = self._run()
        return self

    def __next__(self) -> ToolLoopEvent:
        if self._events is None:
            self._events = self._run()
        return next(self._events)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the loop, closing the stream in progress."""
        if self._events is not None:
            self._events.close()

    def until_done(self) -> ChatMessage:
        """Run the loop to its end, ignoring the events; return the final message.

        Raises:
            MaxTurnsExceeded: the model still asked for tools in the last turn.
            StreamConsumed: the loop was already iterated.
            TokenHubError: as `stream_chat` (API, transport and protocol errors).
        """
        for _ in self:
            pass
        assert self.final is not None
        return self.final

    def _run(self) -> Generator[ToolLoopEvent, None, None]:
        core, opts = self._core, self._options
        while True:
            with self._client.stream_chat(
                core.messages,
                model=self._model,
                timeout=opts.timeout,
                max_retries=opts.max_retries,
                include_usage=opts.include_usage,
                extra_headers=opts.extra_headers,
                tools=core.schemas,
                **opts.params,
            ) as stream:
                for event in stream.events():
                    if isinstance(event, ContentDelta | ReasoningDelta):
                        yield event
            yield core.end_turn(stream.message, stream.usage)
            calls = core.calls()
            if not calls:
                return
            for call in calls:
                yield ToolCallStarted(call, core.turn)
            results = _run_all_sync([core.prepare(call) for call in calls])
            for result in core.add_results(results):  # noqa: UP028 - the twin of the async shell
                yield result


@dataclass(frozen=True, slots=True)
class _StreamOptions:
    timeout: TimeoutTypes | UnsetType
    max_retries: int | UnsetType
    include_usage: bool | UnsetType
    extra_headers: HeaderTypes | None
    params: dict[str, object]


def arun_tools(
    client: AsyncClient,
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
    """Start a tool loop on an `AsyncClient` (nothing is sent before iteration).

    Args:
        client: the client whose `stream_chat` each turn uses.
        messages: the conversation, OpenAI shape (copied; not modified).
        tools: a `ToolSet`, or `Tool`s and plain functions (sync or async).
        model: the model; default the client's.
        max_turns: the most model requests; a last turn still asking for tools raises
            `MaxTurnsExceeded`.
        timeout, max_retries, include_usage, extra_headers: per request, as `stream_chat`.
        **params: other body fields sent with every turn (`tool_choice`,
            `parallel_tool_calls`, `temperature`, ...).

    Returns:
        An `AsyncToolLoop`.

    Raises:
        TypeError: `stream` in `params`; messages not a list; a tool cannot be made.
        ValueError: `tools` is empty, two tools share a name, or `max_turns` < 1.
    """
    core = _LoopCore(messages, tools, max_turns, params, sync=False)
    options = _StreamOptions(timeout, max_retries, include_usage, extra_headers, dict(params))
    return AsyncToolLoop(client, core, model, options)


def run_tools_sync(
    client: Client,
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
) -> ToolLoop:
    """Start a tool loop on a sync `Client`; as `arun_tools`, for sync tools only.

    Raises:
        TypeError: a tool is a coroutine function (checked before any request); as
            `arun_tools` otherwise.
        ValueError: as `arun_tools`.
    """
    core = _LoopCore(messages, tools, max_turns, params, sync=True)
    options = _StreamOptions(timeout, max_retries, include_usage, extra_headers, dict(params))
    return ToolLoop(client, core, model, options)
