"""The sync tool loop (threads for parallel calls) on a real loopback upstream."""

from __future__ import annotations

import contextvars
import threading

import pytest

from tokenhub_stream import Client, ContentDelta, StreamConsumed
from tokenhub_stream.testing import RunningUpstream, Script, ScriptedToolCall
from tokenhub_stream.tools import MaxTurnsExceeded, ToolResult, TurnFinished, tool
from tokenhub_stream.tools._loop_sync import run_tools_sync

from .conftest import sent_messages

USER = [{"role": "user", "content": "What's the weather in Paris?"}]
WAIT = 5.0
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("REQUEST_ID", default="-")


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"sunny in {city}"


def test_sync_loop_one_tool_call_then_the_answer(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(
        Script(
            text="Checking.",
            tool_calls=[
                ScriptedToolCall(name="get_weather", id="c1", arguments='{"city": "Oslo"}')
            ],
        ),
        Script(text="Sunny."),
    )
    with (
        Client(base_url=upstream.base_url) as client,
        run_tools_sync(client, USER, tools=[get_weather]) as loop,
    ):
        events = list(loop)
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == "Checking.Sunny."
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.output, r.error) for r in results] == [("sunny in Oslo", False)]
    assert sent_messages(upstream, 1)[-1] == {
        "role": "tool",
        "tool_call_id": "c1",
        "content": "sunny in Oslo",
    }
    assert loop.final is not None and loop.final.content == "Sunny."
    assert loop.turns == 2
    assert loop.messages[-1] == {"role": "assistant", "content": "Sunny."}


def test_sync_loop_parallel_calls_run_in_threads(upstream: RunningUpstream) -> None:
    # Each tool sets its own event and waits for the other's: run one after the other,
    # the first would time out and report an error.
    seen = {"a": threading.Event(), "b": threading.Event()}
    threads: dict[str, str] = {}

    @tool
    def meet(me: str, other: str) -> str:
        threads[me] = threading.current_thread().name
        seen[me].set()
        if not seen[other].wait(2):
            raise TimeoutError(f"{other} never came")
        return f"{me} met {other} (request {REQUEST_ID.get()})"

    upstream.app.enqueue(
        Script(
            deltas=[],
            tool_calls=[
                ScriptedToolCall(name="meet", arguments='{"me": "a", "other": "b"}'),
                ScriptedToolCall(name="meet", arguments='{"me": "b", "other": "a"}'),
            ],
        ),
        Script(text="Both met."),
    )
    token = REQUEST_ID.set("r-7")
    try:
        with Client(base_url=upstream.base_url) as client:
            events = list(run_tools_sync(client, USER, tools=[meet]))
    finally:
        REQUEST_ID.reset(token)
    results = [e for e in events if isinstance(e, ToolResult)]
    assert [(r.output, r.error) for r in results] == [
        ("a met b (request r-7)", False),  # the caller's context variables are copied
        ("b met a (request r-7)", False),
    ]
    assert len(set(threads.values())) == 2
    assert threading.current_thread().name not in threads.values()


def test_sync_loop_single_call_runs_in_the_calling_thread(upstream: RunningUpstream) -> None:
    ran_in: list[threading.Thread] = []

    @tool
    def where() -> str:
        ran_in.append(threading.current_thread())
        return "here"

    upstream.app.enqueue(
        Script(deltas=[], tool_calls=[ScriptedToolCall(name="where")]), Script(text="ok")
    )
    with Client(base_url=upstream.base_url) as client:
        answer = run_tools_sync(client, USER, tools=[where]).until_done()
    assert answer.content == "ok"
    assert ran_in == [threading.current_thread()]


def test_sync_loop_coroutine_tool_is_a_type_error_before_any_request(
    upstream: RunningUpstream,
) -> None:
    @tool
    async def fetch(url: str) -> str:
        return url

    class AsyncCallable:
        async def __call__(self) -> None:
            pass

    with Client(base_url=upstream.base_url) as client:
        with pytest.raises(TypeError, match="'fetch' is a coroutine function"):
            run_tools_sync(client, USER, tools=[get_weather, fetch])
        with pytest.raises(TypeError, match="coroutine function"):
            run_tools_sync(client, USER, tools=[tool(AsyncCallable(), name="later")])
    assert upstream.app.requests == []


def test_sync_loop_errors_go_back_to_the_model(upstream: RunningUpstream) -> None:
    async def later() -> None:
        pass

    @tool
    def broken(n: int) -> int:
        raise ValueError(f"bad n {n}")

    @tool
    def sneaky() -> object:
        return later()  # a plain def handing back a coroutine

    upstream.app.enqueue(
        Script(
            tool_calls=[
                ScriptedToolCall(name="broken", arguments='{"n": 3}'),
                ScriptedToolCall(name="sneaky"),
                ScriptedToolCall(name="get_weather", arguments="not json"),
                ScriptedToolCall(name="missing"),
            ]
        ),
        Script(text="Sorry."),
    )
    with Client(base_url=upstream.base_url) as client:
        events = list(run_tools_sync(client, USER, tools=[broken, sneaky, get_weather]))
    results = [e for e in events if isinstance(e, ToolResult)]
    assert all(r.error for r in results)
    outputs = [r.output for r in results]
    assert outputs[0] == "Error: ValueError: bad n 3"
    assert outputs[1] == "Error: TypeError: the tool is a plain function but returned an awaitable"
    assert "not valid JSON" in outputs[2]
    assert outputs[3].startswith("Error: unknown tool 'missing'")
    assert [m["content"] for m in sent_messages(upstream, 1) if m["role"] == "tool"] == outputs
    assert isinstance(events[-1], TurnFinished) and events[-1].message.content == "Sorry."


def test_sync_loop_max_turns(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(
        Script(tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city": "A"}')])
    )
    with Client(base_url=upstream.base_url) as client:
        loop = run_tools_sync(client, USER, tools=[get_weather], max_turns=1)
        with pytest.raises(MaxTurnsExceeded):
            loop.until_done()
    assert loop.messages == USER
    assert len(upstream.app.requests) == 1


def test_sync_loop_streams_text_before_the_turn_ends(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=["Hel", "lo"], end="stall"))
    texts: list[str] = []
    with Client(base_url=upstream.base_url, timeout=WAIT) as client:
        with run_tools_sync(client, USER, tools=[get_weather]) as loop:
            for event in loop:
                assert isinstance(event, ContentDelta)
                texts.append(event.text)
                if len(texts) == 2:
                    break
            request = upstream.app.requests[0]
            assert not request.finished
    assert texts == ["Hel", "lo"]
    assert request.wait_disconnected(WAIT)
    assert loop.turns == 0 and loop.final is None


def test_sync_loop_iterates_once(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(text="Hi."))
    with Client(base_url=upstream.base_url) as client:
        loop = run_tools_sync(client, USER, tools=[get_weather])
        first = next(loop)  # next() before for: the same iteration
        assert isinstance(first, ContentDelta)
        assert list(loop)
        with pytest.raises(StreamConsumed):
            list(loop)
        loop.close()
