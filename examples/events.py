"""Typed events of a stream, then what the stream leaves: message, usage, timings, outcome.

Run it inside the project's virtualenv:

    python examples/events.py
    python examples/events.py "What's the weather in Paris?" --model gpt-4o

It talks to token-hub when TOKENHUB_KEY is set, or to any OpenAI-compatible server named
by TOKENHUB_BASE_URL (e.g. http://localhost:11434/v1 for Ollama, no key needed). With
neither, it starts the local test upstream of `tokenhub_stream.testing` in-process (the
`cli` extra), scripted to answer with reasoning, text and a tool call, and says so on
stderr: no key, no network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator

from tokenhub_stream import (
    DEFAULT_MODEL,
    AsyncClient,
    ContentDelta,
    FinishEvent,
    ReasoningDelta,
    ToolCallDelta,
    UsageEvent,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@contextlib.contextmanager
def upstream_base_url() -> Iterator[str | None]:
    """None (the environment decides) or the base URL of a local upstream started here."""
    if os.environ.get("TOKENHUB_KEY") or os.environ.get("TOKENHUB_BASE_URL"):
        yield None
        return
    from tokenhub_stream.testing import FakeChatUpstream, Script, ScriptedToolCall, run_upstream

    upstream = FakeChatUpstream()
    upstream.enqueue(
        Script(
            reasoning="The user asks about the weather, so I should call the tool.",
            text="Let me check the weather in Paris.",
            tool_calls=[ScriptedToolCall(name="get_weather", arguments='{"city": "Paris"}')],
        )
    )
    with run_upstream(upstream) as running:
        print(
            "No TOKENHUB_KEY or TOKENHUB_BASE_URL: "
            f"using the local test upstream at {running.base_url}",
            file=sys.stderr,
        )
        yield running.base_url


async def main(prompt: str, model: str, base_url: str | None) -> None:
    messages = [{"role": "user", "content": prompt}]
    async with AsyncClient(base_url=base_url, model=model) as client:
        stream = client.stream_chat(messages, tools=[WEATHER_TOOL], include_usage=True)
        async with stream:
            async for event in stream.events():
                match event:
                    case ReasoningDelta(text):
                        print(f"[reasoning] {text!r}")
                    case ContentDelta(text):
                        print(f"[content]   {text!r}")
                    case ToolCallDelta(index, call_id, name, arguments):
                        print(f"[tool call] #{index} id={call_id} name={name} args={arguments!r}")
                    case FinishEvent(reason):
                        print(f"[finish]    {reason}")
                    case UsageEvent(usage):
                        print(f"[usage]     {usage}")

    message = stream.message
    print()
    print("message:  ", message.role, repr(message.content))
    print("reasoning:", repr(message.reasoning))
    for call in message.tool_calls:
        print("tool call:", call.id, call.name, call.arguments)
    print("finish:   ", message.finish_reason)
    print("usage:    ", stream.usage)
    timings = stream.timings
    if timings.time_to_first_token is not None:
        print(f"first token after {timings.time_to_first_token:.3f} s")
    if timings.rate is not None:
        print(f"rate: {timings.rate:.1f} {timings.rate_unit}")
    print("outcome:  ", stream.outcome)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What's the weather in Paris?")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    with upstream_base_url() as base_url:
        asyncio.run(main(args.prompt, args.model, base_url))
