"""The tool loop's core, written once for both shells (`_loop.py`, `_loop_sync.py`).

`LoopCore` is the pure part: the conversation, the turn count, what a tool turn is, how a
call becomes keyword arguments, what goes back to the model. The shells differ only in
how one turn's calls run side by side, and that is here too, as two small runners:
`arun_calls` (an anyio task group; sync tools in worker threads) for the async loop,
`run_calls` (a thread per call) for the sync one.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from .._base import HeaderTypes, MessagesTypes, TimeoutTypes
from .._config import UnsetType
from .._models import ChatMessage, ToolCall, ToolCallDelta, Usage
from .._partial_json import PartialJSON, PartialJSONError
from ._events import MaxTurnsExceeded, ToolResult, TurnFinished
from ._tool import Tool, ToolSet, ToolsTypes

if TYPE_CHECKING:
    from .._telemetry import ChatRecorder, ToolRecorder

__all__ = [
    "DEFAULT_MAX_TURNS",
    "Invocation",
    "LoopCore",
    "StreamOptions",
    "arun_calls",
    "dropped_warning",
    "run_calls",
]

#: Model requests one loop may make before `MaxTurnsExceeded`.
DEFAULT_MAX_TURNS = 8

logger = logging.getLogger("tokenhub_stream.tools")


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """What each turn's `stream_chat` gets besides the conversation (both shells)."""

    model: str | UnsetType
    timeout: TimeoutTypes | UnsetType
    max_retries: int | UnsetType
    include_usage: bool | UnsetType
    extra_headers: HeaderTypes | None
    params: dict[str, object]


@dataclass(slots=True)
class Invocation:
    """A call ready to run: its tool and decoded keyword arguments (made by
    `LoopCore.prepare`, run by `arun_calls`/`run_calls`)."""

    call: ToolCall
    tool: Tool[..., object]
    kwargs: dict[str, object]
    turn: int
    started: float = field(default=0.0)
    #: The telemetry of the turn that asked for this call (None when off).
    trace: ChatRecorder | None = None
    span: ToolRecorder | None = None

    def start(self) -> None:
        if self.trace is not None:
            self.span = self.trace.tool(self.call, self.tool.description)
        self.started = time.perf_counter()

    def succeeded(self, value: object) -> ToolResult:
        result = ToolResult(self.call, _output(value), False, self.turn, self._elapsed())
        if self.span is not None:
            self.span.ended(result.output, None)
        return result

    def failed(self, exc: Exception) -> ToolResult:
        # The model reads this and can retry or explain; the developer gets the traceback.
        logger.warning("tool %r raised %s", self.call.name, type(exc).__name__, exc_info=exc)
        text = f"Error: {type(exc).__name__}: {exc}" if str(exc) else f"Error: {type(exc).__name__}"
        result = ToolResult(self.call, text, True, self.turn, self._elapsed())
        if self.span is not None:
            self.span.ended(text, exc)
        return result

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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    try:  # pydantic models and whatever else pydantic can serialise (UUID, datetime, ...)
        from pydantic_core import to_jsonable_python
    except ImportError:
        raise TypeError from None
    return to_jsonable_python(value)


class LoopCore:
    """The pure part of the loop: the conversation, the turn count, the decisions.

    Shared by a loop object and the generator that runs it; it never refers to either.
    """

    def __init__(
        self,
        messages: MessagesTypes,
        tools: ToolsTypes,
        max_turns: int,
        params: Mapping[str, object],
        *,
        sync: bool,
        strict: bool = True,
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
        self.schemas = self.tools.to_openai(strict)
        self._arguments: dict[int, PartialJSON | None] = {}  # this turn's, by call index
        self.max_turns = max_turns
        self.turn = 0
        self.final: ChatMessage | None = None
        self._pending: tuple[ToolCall, ...] = ()
        self._trace: ChatRecorder | None = None  # the last turn's telemetry
        # Where the loop was made, for the warning if it is dropped mid-stream.
        self.made_at = _outside_place()

    def tool_call_delta(self, delta: ToolCallDelta) -> ToolCallDelta:
        """`delta` with the call's arguments decoded so far (`partial_arguments`): one
        incremental parser per call, so each fragment costs its own length. Arguments
        that stop being JSON show no more (the call's error goes back to the model when
        it runs)."""
        if delta.index not in self._arguments:
            self._arguments[delta.index] = PartialJSON(elements_at=None)
        parser = self._arguments[delta.index]
        if parser is None:
            return delta
        try:
            parser.feed(delta.arguments)
        except PartialJSONError:
            self._arguments[delta.index] = None
            return delta
        if not parser.has_value:
            return delta
        return dataclasses.replace(delta, partial_arguments=parser.value)

    def end_turn(
        self, message: ChatMessage, usage: Usage | None, trace: ChatRecorder | None = None
    ) -> TurnFinished:
        """The turn's stream ended with `message`; `trace` is its telemetry (its tool
        calls' spans are children of its span)."""
        self._arguments.clear()
        self.turn += 1
        self.final = message
        self._trace = trace
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

    def prepare(self, call: ToolCall) -> Invocation | ToolResult:
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
        return Invocation(call, found, kwargs, self.turn, trace=self._trace)

    def add_results(self, results: Sequence[ToolResult]) -> Sequence[ToolResult]:
        self.messages.extend(result.to_message() for result in results)
        return results


def dropped_warning(name: str, core: LoopCore) -> str:
    """The `ResourceWarning` text for a loop dropped mid-stream (both shells' `__del__`)."""
    filename, line = core.made_at
    return (
        f"unclosed tool loop <{name} in turn {core.turn + 1} of at most {core.max_turns}> "
        f"made at {filename}:{line}: its stream's "
        "connection was shut down when it was dropped (use a with block, or close the loop)"
    )


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _outside_place() -> tuple[str, int]:
    """File and line of the innermost caller outside this package."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno


# --- how one turn's calls run ----------------------------------------------------------


def _not_awaitable(value: object) -> object:
    # A plain def handing back a coroutine: it was registered as sync, so it is not
    # awaited (trio would refuse it in a worker thread anyway).
    if inspect.isawaitable(value):
        if inspect.iscoroutine(value):
            value.close()  # never awaited: close it so Python does not warn
        raise TypeError("the tool is a plain function but returned an awaitable")
    return value


def _run_sync(invocation: Invocation | ToolResult) -> ToolResult:
    if isinstance(invocation, ToolResult):
        return invocation
    invocation.start()
    try:
        value = _not_awaitable(invocation.tool.fn(**invocation.kwargs))
    except Exception as exc:
        return invocation.failed(exc)
    return invocation.succeeded(value)


async def _run_async(invocation: Invocation | ToolResult) -> ToolResult:
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


async def arun_calls(invocations: Sequence[Invocation | ToolResult]) -> list[ToolResult]:
    """Run one turn's calls side by side in a task group; results in call order."""
    results: list[ToolResult | None] = [None] * len(invocations)

    async def run(i: int, invocation: Invocation | ToolResult) -> None:
        results[i] = await _run_async(invocation)

    async with anyio.create_task_group() as group:
        for i, invocation in enumerate(invocations):
            group.start_soon(run, i, invocation)
    return [result for result in results if result is not None]


def run_calls(invocations: Sequence[Invocation | ToolResult]) -> list[ToolResult]:
    """Run one turn's calls side by side, a thread each (one call: in this thread)."""
    if len(invocations) == 1:
        return [_run_sync(invocations[0])]
    with ThreadPoolExecutor(len(invocations), "tokenhub-tool") as pool:
        futures = [
            pool.submit(contextvars.copy_context().run, _run_sync, invocation)
            for invocation in invocations
        ]
        return [future.result() for future in futures]
