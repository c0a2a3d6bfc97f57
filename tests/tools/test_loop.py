"""The async tool loop end to end, on a real loopback upstream with scripted turns."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import pytest

from tokenhub_stream import AsyncClient, ContentDelta, ReasoningDelta, StreamConsumed
from tokenhub_stream.testing import RunningUpstream, Script, ScriptedToolCall
from tokenhub_stream.tools import (
    MaxTurnsExceeded,
    ToolCallStarted,
    ToolLoopEvent,
    ToolResult,
    ToolSet,
    TurnFinished,
    tool,
)
from tokenhub_stream.tools._loop import AsyncToolLoop, arun_tools

from .conftest import chunk, frames, sent_messages

pytestmark = pytest.mark.anyio

USER = [{"role": "user", "content": "What's the weather in Paris?"}]
WAIT = 5.0  # seconds: the bound of every wait in this module


@tool
def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: the city name.
    """
    return f"18 degrees and sunny in {city}"


async def _collect(loop: AsyncToolLoop) -> list[ToolLoopEvent]:
    with anyio.fail_after(WAIT):
        async with loop:
            return [event async for event in loop]


def _weather_call(city: str = "Paris", id: str | None = None) -> ScriptedToolCall:
    return ScriptedToolCall(name="get_weather", arguments=json.dumps({"city": city}), id=id)


async def test_loop_one_tool_call_then_the_answer(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(
        Script(text="Let me check.", tool_calls=[_weather_call(id="call_1")]),
        Script(text="It is sunny in Paris."),
    )
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[get_weather], model="gpt-4o")
        events = await _collect(loop)

    kinds = [type(event).__name__ for event in events]
    assert kinds == [
        *["ContentDelta"] * 3,
        "TurnFinished",
        "ToolCallStarted",
        "ToolResult",
        *["ContentDelta"] * 5,
        "TurnFinished",
    ]
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert text == "Let me check.It is sunny in Paris."
    started = next(e for e in events if isinstance(e, ToolCallStarted))
    assert (started.call.id, started.call.name, started.turn) == ("call_1", "get_weather", 1)
    result = next(e for e in events if isinstance(e, ToolResult))
    assert (result.output, result.error, result.turn) == ("18 degrees and sunny in Paris", False, 1)
    assert result.elapsed >= 0

    assert len(upstream.app.requests) == 2
    first, second = (upstream.app.requests[i].json for i in (0, 1))
    assert first is not None and second is not None
    assert first["stream"] is True and second["stream"] is True
    assert first["tools"] == second["tools"] == [get_weather.to_openai()]
    assert first["model"] == "gpt-4o"
    assert sent_messages(upstream, 1) == [
        *USER,
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny in Paris"},
    ]
    assert loop.messages == [
        *sent_messages(upstream, 1),
        {"role": "assistant", "content": "It is sunny in Paris."},
    ]
    assert loop.final is not None and loop.final.content == "It is sunny in Paris."
    assert loop.turns == 2


async def test_loop_without_tool_calls_is_one_turn(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(text="Hello.", reasoning="Nothing to look up."))
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[get_weather], include_usage=True)
        events = await _collect(loop)
    assert any(isinstance(e, ReasoningDelta) for e in events)
    finished = events[-1]
    assert isinstance(finished, TurnFinished)
    assert finished.message.content == "Hello."
    assert finished.usage is not None and finished.usage.completion_tokens
    assert len(upstream.app.requests) == 1
    body = upstream.app.requests[0].json
    assert body is not None and body["stream_options"] == {"include_usage": True}


async def test_loop_parallel_calls_run_concurrently(upstream: RunningUpstream) -> None:
    # Each tool sets its own event, then waits for the other's: run one after the other,
    # the first would time out and report an error instead of "met".
    seen = {"a": anyio.Event(), "b": anyio.Event()}

    @tool
    async def meet(me: str, other: str) -> str:
        seen[me].set()
        with anyio.fail_after(2):
            await seen[other].wait()
        return f"{me} met {other}"

    upstream.app.enqueue(
        Script(
            tool_calls=[
                ScriptedToolCall(name="meet", arguments='{"me": "a", "other": "b"}'),
                ScriptedToolCall(name="meet", arguments='{"me": "b", "other": "a"}'),
            ]
        ),
        Script(text="Both met."),
    )
    async with AsyncClient(base_url=upstream.base_url) as client:
        events = await _collect(arun_tools(client, USER, tools=[meet]))
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.output, r.error) for r in results] == [("a met b", False), ("b met a", False)]
    tool_messages = [m for m in sent_messages(upstream, 1) if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["a met b", "b met a"]
    assert [m["tool_call_id"] for m in tool_messages] == [r.call.id for r in results]


async def test_loop_sync_tools_run_in_worker_threads_concurrently(
    upstream: RunningUpstream,
) -> None:
    barrier = threading.Barrier(2, timeout=2)
    threads: list[str] = []

    @tool
    def wait_for_peer(n: int) -> int:
        threads.append(threading.current_thread().name)
        barrier.wait()  # BrokenBarrierError (an error result) unless both run at once
        return n

    upstream.app.enqueue(
        Script(
            tool_calls=[
                ScriptedToolCall(name="wait_for_peer", arguments='{"n": 1}'),
                ScriptedToolCall(name="wait_for_peer", arguments='{"n": 2}'),
            ]
        ),
        Script(text="Done."),
    )
    async with AsyncClient(base_url=upstream.base_url) as client:
        events = await _collect(arun_tools(client, USER, tools=[wait_for_peer]))
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.output, r.error) for r in results] == [("1", False), ("2", False)]
    assert threading.current_thread().name not in threads


async def test_loop_gemini_tool_turn_without_index_ending_in_stop(
    upstream: RunningUpstream,
) -> None:
    # PROVIDER_QUIRKS.md item 6: no `index` (absent or null), `id: ""`, arguments split
    # over fragments without an index, finish_reason "stop", and a thought signature in
    # `extra_content` that has to go back on the next request.
    signature = {"google": {"thought_signature": "c2lnLWE="}}
    weather_start = {
        "id": "",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":'},
        "extra_content": signature,
    }
    upstream.app.enqueue(
        Script(
            raw=frames(
                chunk({"role": "assistant", "content": "Checking."}),
                chunk({"tool_calls": [weather_start]}),
                chunk({"tool_calls": [{"index": None, "function": {"arguments": ' "Par'}}]}),
                chunk({"tool_calls": [{"function": {"arguments": 'is"}'}}]}),
                chunk({"tool_calls": [{"id": "", "function": {"name": "get_weather"}}]}),
                chunk({"tool_calls": [{"function": {"arguments": '{"city": "Rome"}'}}]}),
                chunk({}, finish_reason="stop"),
            )
        ),
        Script(text="Sunny in both."),
    )
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[get_weather], model="gemini-2.0-flash")
        events = await _collect(loop)

    first_turn = next(e for e in events if isinstance(e, TurnFinished))
    assert first_turn.message.finish_reason == "stop"
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.output for r in results] == [
        "18 degrees and sunny in Paris",
        "18 degrees and sunny in Rome",
    ]
    assert len(upstream.app.requests) == 2, "a tool turn ending in 'stop' must not end the loop"
    assistant, *tools = sent_messages(upstream, 1)[1:]
    assert assistant == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {
                "id": "",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                "extra_content": signature,
            },
            {
                "id": "",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    }
    assert tools == [
        {"role": "tool", "tool_call_id": "", "content": "18 degrees and sunny in Paris"},
        {"role": "tool", "tool_call_id": "", "content": "18 degrees and sunny in Rome"},
    ]


async def test_loop_interleaved_parallel_calls(upstream: RunningUpstream) -> None:
    # PROVIDER_QUIRKS.md item 13: fragments told apart only by `index`, the id on the
    # first only, the name late.
    def call(index: int, **fields: object) -> dict[str, object]:
        return {"tool_calls": [{"index": index, **fields}]}

    upstream.app.enqueue(
        Script(
            raw=frames(
                chunk(call(0, id="call_a", type="function", function={"arguments": ""})),
                chunk(call(1, id="call_b", type="function", function={"arguments": '{"ci'})),
                chunk(call(0, function={"arguments": '{"city": "Os'})),
                chunk(call(1, function={"name": "get_weather", "arguments": 'ty": "Lima"}'})),
                chunk(call(0, function={"name": "get_weather", "arguments": 'lo"}'})),
                chunk({}, finish_reason="tool_calls"),
            )
        ),
        Script(text="Done."),
    )
    async with AsyncClient(base_url=upstream.base_url) as client:
        events = await _collect(arun_tools(client, USER, tools=[get_weather]))
    results = [(e.call.id, e.output) for e in events if isinstance(e, ToolResult)]
    assert results == [
        ("call_a", "18 degrees and sunny in Oslo"),
        ("call_b", "18 degrees and sunny in Lima"),
    ]


@dataclass
class Forecast:
    city: str
    days: int


async def test_loop_tool_errors_go_back_to_the_model(upstream: RunningUpstream) -> None:
    @tool
    async def explode(reason: str) -> str:
        raise RuntimeError(f"boom: {reason}")

    @tool
    def silent_failure() -> None:
        raise KeyError

    @tool
    def forecast(city: str, days: int = 3) -> Forecast:
        return Forecast(city, days)

    upstream.app.enqueue(
        Script(
            tool_calls=[
                ScriptedToolCall(name="explode", arguments='{"reason": "disk full"}'),
                ScriptedToolCall(name="get_weather", arguments='{"city": "Par'),
                ScriptedToolCall(name="no_such_tool", arguments="{}"),
                ScriptedToolCall(name="get_weather", arguments='{"town": "Paris"}'),
                ScriptedToolCall(name="silent_failure"),
                ScriptedToolCall(name="forecast", arguments='{"city": "Oslo"}'),
            ]
        ),
        Script(text="Sorry about that."),
    )
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[explode, get_weather, silent_failure, forecast])
        events = await _collect(loop)

    results = [e for e in events if isinstance(e, ToolResult)]
    assert [r.error for r in results] == [True, True, True, True, True, False]
    outputs = [r.output for r in results]
    assert outputs[0] == "Error: RuntimeError: boom: disk full"
    assert outputs[1].startswith("Error: invalid arguments for 'get_weather': the arguments")
    assert "not valid JSON" in outputs[1] and '{"city": "Par' in outputs[1]
    assert outputs[2] == (
        "Error: unknown tool 'no_such_tool'; the available tools are: "
        "explode, get_weather, silent_failure, forecast"
    )
    assert outputs[3].startswith("Error: TypeError: ") and "'town'" in outputs[3]
    assert outputs[4] == "Error: KeyError"
    assert json.loads(outputs[5]) == {"city": "Oslo", "days": 3}
    tool_messages = [m["content"] for m in sent_messages(upstream, 1) if m["role"] == "tool"]
    assert tool_messages == outputs
    assert loop.final is not None and loop.final.content == "Sorry about that."


async def test_loop_max_turns_raises_without_running_the_last_calls(
    upstream: RunningUpstream,
) -> None:
    runs: list[str] = []

    @tool
    def record(city: str) -> str:
        runs.append(city)
        return "ok"

    upstream.app.enqueue(
        Script(tool_calls=[ScriptedToolCall(name="record", arguments='{"city": "A"}')]),
        Script(tool_calls=[ScriptedToolCall(name="record", arguments='{"city": "B"}')]),
    )
    events: list[ToolLoopEvent] = []
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[record], max_turns=2)
        with anyio.fail_after(WAIT), pytest.raises(MaxTurnsExceeded) as info:
            async with loop:
                async for event in loop:
                    events.append(event)

    assert runs == ["A"]
    assert info.value.max_turns == 2
    assert info.value.message.tool_calls[0].arguments == '{"city": "B"}'
    assert "record" in str(info.value) and "max_turns=2" in str(info.value)
    assert isinstance(events[-1], TurnFinished) and events[-1].turn == 2
    assert len(upstream.app.requests) == 2
    # The conversation stops before the unanswered call, so it can be sent again as is.
    assert loop.messages == sent_messages(upstream, 1)
    assert loop.messages[-1]["role"] == "tool"
    assert loop.final is info.value.message


async def test_loop_max_turns_one_with_a_plain_answer(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(text="No tools needed."))
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[get_weather], max_turns=1)
        with anyio.fail_after(WAIT):
            message = await loop.until_done()
    assert message.content == "No tools needed."
    assert loop.messages[-1] == {"role": "assistant", "content": "No tools needed."}


async def test_loop_streams_text_before_the_turn_ends(upstream: RunningUpstream) -> None:
    # The second turn stalls after its text: the deltas must reach us while its request
    # is still open (no finish_reason, no [DONE]), and closing the loop closes it.
    upstream.app.enqueue(
        Script(deltas=[], tool_calls=[_weather_call()]),
        Script(deltas=["It is ", "sunny."], end="stall"),
    )
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[get_weather])
        texts: list[str] = []
        with anyio.fail_after(WAIT):
            async with loop:
                async for event in loop:
                    if isinstance(event, ContentDelta):
                        texts.append(event.text)
                        if len(texts) == 2:
                            break
                second = upstream.app.requests[1]
                assert not second.finished
    assert texts == ["It is ", "sunny."]
    assert second.wait_disconnected(WAIT)
    assert loop.turns == 1


async def test_loop_passes_params_and_never_modifies_the_input(
    upstream: RunningUpstream,
) -> None:
    messages = [dict(m) for m in USER]
    upstream.app.enqueue(Script(tool_calls=[_weather_call()]), Script(text="Done."))
    tools = ToolSet([get_weather])
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(
            client,
            messages,
            tools=tools,
            tool_choice="auto",
            parallel_tool_calls=True,
            temperature=0,
            extra_headers={"X-Trace": "t-1"},
        )
        await _collect(loop)
    assert messages == USER
    for request in upstream.app.requests:
        assert request.json is not None
        assert request.json["tool_choice"] == "auto"
        assert request.json["parallel_tool_calls"] is True
        assert request.json["temperature"] == 0
        assert request.headers["x-trace"] == "t-1"


async def test_loop_iterates_once(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(text="Hi."))
    async with AsyncClient(base_url=upstream.base_url) as client:
        loop = arun_tools(client, USER, tools=[get_weather])
        with anyio.fail_after(WAIT):
            first = await loop.__anext__()  # anext() before async for: the same iteration
            rest = [event async for event in loop]
        assert isinstance(first, ContentDelta) and rest
        with pytest.raises(StreamConsumed):
            async for _ in loop:
                pass
        with pytest.raises(StreamConsumed):
            await loop.until_done()
        await loop.aclose()


async def test_loop_closing_before_iterating_sends_nothing(upstream: RunningUpstream) -> None:
    async with AsyncClient(base_url=upstream.base_url) as client:
        async with arun_tools(client, USER, tools=[get_weather]):
            pass
    assert upstream.app.requests == []


async def test_loop_tool_results_as_json(upstream: RunningUpstream) -> None:
    @tool
    async def nothing() -> None:
        return None

    @tool
    def several() -> dict[str, object]:
        return {"set": {1}, "text": "ü"}

    @tool
    def opaque() -> object:
        return threading.Lock()

    class AsyncCallable:
        async def __call__(self, n: int) -> int:
            return n * 2

    @tool
    def returns_awaitable(n: int) -> object:
        return AsyncCallable()(n)  # a plain def handing back a coroutine is an error

    upstream.app.enqueue(
        Script(
            tool_calls=[
                ScriptedToolCall(name="nothing"),
                ScriptedToolCall(name="several"),
                ScriptedToolCall(name="opaque"),
                ScriptedToolCall(name="double", arguments='{"n": 21}'),
                ScriptedToolCall(name="returns_awaitable", arguments='{"n": 4}'),
            ]
        ),
        Script(text="ok"),
    )
    double = tool(AsyncCallable(), name="double")
    tools: list[Callable[..., object]] = [nothing, several, opaque, double, returns_awaitable]
    async with AsyncClient(base_url=upstream.base_url) as client:
        events = await _collect(arun_tools(client, USER, tools=tools))
    outputs = [e.output for e in events if isinstance(e, ToolResult)]
    assert outputs[:2] == ["null", '{"set": [1], "text": "ü"}']
    assert outputs[2].startswith("<unlocked _thread.lock object")
    assert outputs[3] == "42"
    assert outputs[4].startswith("Error: TypeError: ")


def test_loop_arguments_are_checked_before_any_request() -> None:
    client = AsyncClient(base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="tools is empty"):
        arun_tools(client, USER, tools=[])
    with pytest.raises(ValueError, match="max_turns must be an int >= 1"):
        arun_tools(client, USER, tools=[get_weather], max_turns=0)
    with pytest.raises(ValueError, match="max_turns"):
        arun_tools(client, USER, tools=[get_weather], max_turns=True)
    with pytest.raises(TypeError, match="always streams"):
        arun_tools(client, USER, tools=[get_weather], stream=False)
    with pytest.raises(TypeError, match="messages must be a list"):
        arun_tools(client, "hello", tools=[get_weather])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two tools are named"):
        arun_tools(client, USER, tools=[get_weather, get_weather])
