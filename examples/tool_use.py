"""Tool use that still streams: the model calls Python functions, then answers.

Run it inside the project's virtualenv:

    python examples/tool_use.py
    python examples/tool_use.py "Weather in Oslo and Lima?" --model gpt-4o

It talks to token-hub when TOKENHUB_KEY is set, or to any OpenAI-compatible server named
by TOKENHUB_BASE_URL (e.g. http://localhost:11434/v1 for Ollama, no key needed). With
neither, it starts the local test upstream of `tokenhub_stream.testing` in-process (the
`cli` extra), scripted to call `get_weather` twice in one turn and then answer, and says
so on stderr: no key, no network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
from collections.abc import Iterator
from typing import Literal

from tokenhub_stream import DEFAULT_MODEL, AsyncClient, ContentDelta
from tokenhub_stream.tools import ToolCallStarted, ToolResult, TurnFinished, tool


@tool
async def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> str:
    """The current weather in a city.

    Args:
        city: the city name, e.g. "Paris".
        unit: the temperature unit.
    """
    await asyncio.sleep(0.3)  # a slow weather service; both calls wait at the same time
    degrees = 18 if unit == "celsius" else 64
    return f"{degrees} degrees {unit}, {random.choice(['sunny', 'cloudy'])} in {city}"


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
            text="Let me look up both cities.",
            tool_calls=[
                ScriptedToolCall(name="get_weather", arguments='{"city": "Paris"}'),
                ScriptedToolCall(
                    name="get_weather", arguments='{"city": "Tokyo", "unit": "celsius"}'
                ),
            ],
        ),
        Script(text="Paris and Tokyo are both mild today: a good day for a walk."),
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
        async with client.run_tools(messages, tools=[get_weather]) as loop:
            async for event in loop:
                match event:
                    case ContentDelta(text):
                        print(text, end="", flush=True)
                    case TurnFinished():
                        print()
                    case ToolCallStarted(call):
                        print(f"calling {call.name}({call.arguments})")
                    case ToolResult(call, output, error):
                        print(f"  {call.name} {'failed' if error else 'returned'}: {output}")
    print(f"({loop.turns} turns, {len(loop.messages)} messages in the conversation)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What's the weather in Paris and Tokyo?")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    with upstream_base_url() as base_url:
        asyncio.run(main(args.prompt, args.model, base_url))
