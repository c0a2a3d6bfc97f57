"""Issue 15, finding 6: the local upstream's tool-call trap.

`Script(tool_calls=[...])` without `text` used to stream the default "You said..." reply
before the calls, so a test of a tool turn tested a mixed one. And with no script left the
upstream never called a tool, so nothing could show tool use offline. Now a script with
tool calls has no default text, and a request with `tools` and no script gets a call made
by a documented rule, then a reply that quotes the tool's result.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from tokenhub_stream import Client, ContentDelta
from tokenhub_stream.cli import main
from tokenhub_stream.cli._tools import load_tools
from tokenhub_stream.testing import (
    FakeChatUpstream,
    RunningUpstream,
    Script,
    ScriptedToolCall,
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
    call = ScriptedToolCall(name="get_weather", arguments='{"city": "Paris"}')
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
    call = ScriptedToolCall(name="get_weather", arguments="{}")
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


# --- the terminal: `tokenhub-stream ask/chat --tools FILE` with no key ------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "terminal_tools.py"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOKENHUB_KEY", "TOKENHUB_BASE_URL", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def test_issue_15_tool_trap_ask_with_tools_and_no_key(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ask", "--tools", str(EXAMPLE), "Weather in Oslo?"]) == 0
    captured = capsys.readouterr()
    assert captured.out == 'get_weather returned "18 degrees and sunny in Oslo".\n'
    assert "using the local test upstream" in captured.err
    assert '[tool] get_weather({"city": "Oslo"})\n' in captured.err
    assert "[tool] get_weather returned: 18 degrees and sunny in Oslo\n" in captured.err
    assert re.search(r"^\S+ · 2 turns · stop · \d+\+\d+ tokens$", captured.err, re.M)


def test_issue_15_tool_trap_chat_with_tools_keeps_the_tool_turns(
    running: RunningUpstream, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("add 2 and 3\nweather in Lima\n"))
    argv = ["chat", "--tools", str(EXAMPLE), "--base-url", running.base_url]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        'add returned "5.0".',  # the tool's float hints make floats of 2 and 3
        'get_weather returned "18 degrees and sunny in Lima".',
    ]
    assert '[tool] add({"a": 2, "b": 3})' in captured.err
    assert len(running.app.requests) == 4
    last = json.loads(running.app.requests[3].body)
    assert [t["function"]["name"] for t in last["tools"]] == ["get_weather", "add"]
    roles = [m["role"] for m in last["messages"]]
    # The first turn's call and result stay in the conversation.
    assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant", "tool"]


def test_issue_15_tool_trap_chat_subprocess(clean_env: None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHUB_")}
    result = subprocess.run(
        [sys.executable, "-m", "tokenhub_stream", "chat", "--tools", str(EXAMPLE)],
        input="Weather in Rome?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'get_weather returned "18 degrees and sunny in Rome".\n'
    assert '[tool] get_weather({"city": "Rome"})' in result.stderr


@pytest.mark.parametrize(
    ("source", "error"),
    [
        (None, "no such file"),
        ("x = 1\n", "defines no @tool function"),
        (
            "from tokenhub_stream.tools import tool\n\n"
            "@tool\nasync def slow() -> str:\n    return 'x'\n",
            "'slow' is an async def",
        ),
        ("raise RuntimeError('broken module')\n", "RuntimeError: broken module"),
    ],
)
def test_issue_15_tool_trap_bad_tools_file_is_a_usage_error(
    clean_env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    source: str | None,
    error: str,
) -> None:
    path = tmp_path / "my_tools.py"
    if source is not None:
        path.write_text(source)
    assert main(["ask", "--tools", str(path), "hi"]) == 2
    assert error in capsys.readouterr().err


def test_issue_15_tool_trap_tools_file_with_a_toolset(tmp_path: Path) -> None:
    path = tmp_path / "chosen.py"
    path.write_text(
        "from tokenhub_stream.tools import ToolSet, tool\n\n"
        "@tool\ndef a() -> str:\n    return 'a'\n\n"
        "@tool\ndef b() -> str:\n    return 'b'\n\n"
        "tools = ToolSet([b])\n"
    )
    assert list(load_tools(str(path))) == ["b"]
    assert list(load_tools(str(EXAMPLE))) == ["get_weather", "add"]
