"""Issue 15, finding 6: the local upstream's tool-call trap.

`Script(tool_calls=[...])` without `text` used to stream the default "You said..." reply
before the calls, so a test of a tool turn tested a mixed one. And with no script left the
upstream never called a tool, so nothing could show tool use offline. Now a script with
tool calls has no default text, and a request with `tools` and no script gets a call made
by a documented rule, then a reply that quotes the tool's result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import httpx
import pytest

from tokenhub_stream import Client, ContentDelta
from tokenhub_stream.testing import (
    FakeChatUpstream,
    RunningUpstream,
    Script,
    ToolCall,
    run_upstream,
)
from tokenhub_stream.tools import ToolResult, tool

USER: list[dict[str, object]] = [
    {"role": "user", "content": "What is the weather in Oslo, in 2 days?"}
]

WEATHER: dict[str, object] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "hourly": {"type": "boolean"},
                "scale": {"anyOf": [{"type": "null"}, {"type": "number"}]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "where": {
                    "type": "object",
                    "properties": {"country": {"type": ["null", "string"]}, "x": {}},
                    "required": ["country"],
                },
                "optional": {"type": "string"},
            },
            "required": ["city", "days", "unit", "hourly", "scale", "tags", "where"],
        },
    },
}
CLOCK: dict[str, object] = {
    "type": "function",
    "function": {
        "name": "currentTime",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
    },
}


@pytest.fixture
def upstream() -> FakeChatUpstream:
    return FakeChatUpstream(delay=0.001)


@pytest.fixture
def running(upstream: FakeChatUpstream) -> Iterator[RunningUpstream]:
    with run_upstream(upstream) as running:
        yield running


def post(running: RunningUpstream, stream: bool = True, **body: object) -> list[dict[str, object]]:
    """The JSON frames of a streamed answer, or the one `chat.completion` object."""
    payload = {"model": "gpt-4o", "messages": USER, "stream": stream, **body}
    response = httpx.post(f"{running.base_url}/chat/completions", json=payload, timeout=5)
    assert response.status_code == 200
    if not stream:
        return [response.json()]
    lines = response.text.split("\n")
    assert "data: [DONE]" in lines
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def content_of(frames: list[dict[str, object]]) -> str:
    return "".join(
        str(choice["delta"].get("content") or "")
        for frame in frames
        for choice in frame["choices"]  # type: ignore[attr-defined]
    )


def calls_of(frames: list[dict[str, object]]) -> list[tuple[str, Mapping[str, object]]]:
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for frame in frames:
        for choice in frame["choices"]:  # type: ignore[attr-defined]
            for fragment in choice["delta"].get("tool_calls") or []:
                index = fragment["index"]
                function = fragment["function"]
                if function.get("name"):
                    names[index] = function["name"]
                arguments[index] = arguments.get(index, "") + function["arguments"]
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)]


def finish_of(frames: list[dict[str, object]]) -> object:
    reasons = [c["finish_reason"] for f in frames for c in f["choices"]]  # type: ignore[attr-defined]
    return [r for r in reasons if r is not None]


# --- a script with tool calls has no default text ---------------------------------------------


def test_issue_15_tool_trap_script_with_calls_has_no_text(
    upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    call = ToolCall(name="get_weather", arguments='{"city": "Paris"}')
    upstream.enqueue(Script(tool_calls=[call]), Script(tool_calls=[call]))
    frames = post(running)
    assert content_of(frames) == ""
    assert calls_of(frames) == [("get_weather", {"city": "Paris"})]
    assert finish_of(frames) == ["tool_calls"]
    [completion] = post(running, stream=False)
    message = completion["choices"][0]["message"]  # type: ignore[index]
    assert message["content"] is None and len(message["tool_calls"]) == 1


def test_issue_15_tool_trap_text_before_calls_is_asked_for(
    upstream: FakeChatUpstream, running: RunningUpstream
) -> None:
    call = ToolCall(name="get_weather", arguments="{}")
    upstream.enqueue(Script(text="Let me look.", tool_calls=[call]))
    frames = post(running)
    assert content_of(frames) == "Let me look."
    assert calls_of(frames) == [("get_weather", {})]


# --- no script: the documented rule -----------------------------------------------------------


def test_issue_15_tool_trap_unscripted_request_with_tools_calls_one(
    running: RunningUpstream,
) -> None:
    # "weather" is a word of get_weather's name: chosen over the first tool.
    frames = post(running, tools=[CLOCK, WEATHER])
    assert content_of(frames) == ""
    assert finish_of(frames) == ["tool_calls"]
    [(name, arguments)] = calls_of(frames)
    assert name == "get_weather"
    assert arguments == {
        "city": "days",  # a string: the last word of the user's message
        "days": 2,  # the next number in it
        "unit": "celsius",  # an enum: its first value
        "hourly": True,
        "scale": 1,  # no number left: 1
        "tags": [],
        "where": {"country": "days"},  # an object: its own required properties
    }


def test_issue_15_tool_trap_unscripted_choice_rules(running: RunningUpstream) -> None:
    # No word of a name in the message: the first tool.
    other = [{"role": "user", "content": "Oslo?"}]
    frames = post(running, messages=other, tools=[CLOCK, WEATHER])
    assert calls_of(frames) == [("currentTime", {})]
    # A case change splits a name too: "time" picks currentTime.
    timely = [{"role": "user", "content": "what time is it"}]
    assert [n for n, _ in calls_of(post(running, messages=timely, tools=[WEATHER, CLOCK]))] == [
        "currentTime"
    ]
    # tool_choice names a tool: that one.
    named = {"type": "function", "function": {"name": "currentTime"}}
    frames = post(running, tools=[WEATHER, CLOCK], tool_choice=named)
    assert [n for n, _ in calls_of(frames)] == ["currentTime"]
    # tool_choice "none": the default reply, no call.
    frames = post(running, tools=[WEATHER], tool_choice="none")
    assert calls_of(frames) == [] and content_of(frames).startswith("You said:")
    # No tools: the default reply, as before.
    assert content_of(post(running)).startswith("You said:")


def test_issue_15_tool_trap_unscripted_reply_quotes_the_results(running: RunningUpstream) -> None:
    messages: list[dict[str, object]] = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 degrees\nin Oslo"},
        {"role": "tool", "tool_call_id": "c2", "content": "windy"},
    ]
    frames = post(running, messages=messages, tools=[WEATHER])
    assert calls_of(frames) == []
    assert content_of(frames) == 'a returned "18 degrees in Oslo". b returned "windy".'
    assert finish_of(frames) == ["stop"]
    [completion] = post(running, stream=False, messages=messages)
    reply = completion["choices"][0]["message"]["content"]  # type: ignore[index]
    assert reply == 'a returned "18 degrees in Oslo". b returned "windy".'


def test_issue_15_tool_trap_a_tool_loop_runs_with_no_script(running: RunningUpstream) -> None:
    seen: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"18 degrees and sunny in {city}"

    events = []
    with Client(base_url=running.base_url, timeout=5) as client:
        with client.run_tools(
            [{"role": "user", "content": "Weather in Oslo?"}], tools=[get_weather]
        ) as loop:
            events = list(loop)
    assert seen == ["Oslo"]
    assert [e.output for e in events if isinstance(e, ToolResult)] == [
        "18 degrees and sunny in Oslo"
    ]
    text = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert text == 'get_weather returned "18 degrees and sunny in Oslo".'
    assert loop.turns == 2
