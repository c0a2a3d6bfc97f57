"""Tools for the terminal: `tokenhub-stream ask` and `chat` run them with `--tools`.

Run it inside the project's virtualenv:

    python examples/terminal_tools.py "Weather in Oslo?"
    tokenhub-stream chat --tools examples/terminal_tools.py

Each call and its result are shown on stderr, the answer on stdout. It talks to token-hub
when TOKENHUB_KEY is set, or to the server named by TOKENHUB_BASE_URL; with neither, the
local test upstream of `tokenhub_stream.testing` answers, in-process: with no script it
calls one of the request's tools by a fixed rule (docs/testing.md), so a whole tool turn
runs with no key and no network. Running this file is `tokenhub-stream ask --tools` on it.
"""

from __future__ import annotations

import sys

from tokenhub_stream.tools import tool


@tool
def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: the city name, e.g. "Paris".
    """
    return f"18 degrees and sunny in {city}"


@tool
def add(a: float, b: float) -> float:
    """Add two numbers.

    Args:
        a: the first number.
        b: the second number.
    """
    return a + b


if __name__ == "__main__":
    from tokenhub_stream.cli import main

    question = sys.argv[1:] or ["What's the weather in Paris?"]
    sys.exit(main(["ask", "--tools", __file__, *question]))
