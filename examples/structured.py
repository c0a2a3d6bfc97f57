"""Structured output that streams: a list of cards filling in as the model writes them.

Run it inside the project's virtualenv (pydantic comes with the `structured` extra):

    python examples/structured.py
    python examples/structured.py "Cards for Jupiter, Saturn, Uranus and Neptune" --model gpt-4o

It talks to token-hub when TOKENHUB_KEY is set, or to any OpenAI-compatible server named
by TOKENHUB_BASE_URL that does structured outputs (add --no-strict for vLLM or SGLang,
which refuse the `strict` field). With neither, it starts the local test upstream of
`tokenhub_stream.testing` in-process (the `cli` extra), which answers a request with
`response_format` with JSON made from the schema and your words, and says so on stderr:
no key, no network.

On a terminal the cards are redrawn at each delta (`stream.partials()`: strings grow as
they arrive, numbers show once whole); piped, each card is printed once it is complete and
validated (`stream.elements()`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator, Mapping

from pydantic import BaseModel

from tokenhub_stream import DEFAULT_MODEL, Client


class Card(BaseModel):
    """One card about a planet.

    Attributes:
        title: the planet's name.
        description: two sentences about the planet.
        moons: how many moons it has.
    """

    title: str
    description: str
    moons: int


def card_lines(card: Mapping[str, object], width: int) -> list[str]:
    """A card, partial or whole, as lines of text (a field not there yet shows as '…')."""
    title = card.get("title", "…")
    moons = card.get("moons", "…")
    body = textwrap.wrap(str(card.get("description", "…")), width - 4) or [""]
    return [f"┌─ {title}", *(f"│  {line}" for line in body), f"└─ moons: {moons}", ""]


def on_terminal(client: Client, messages: list[dict[str, str]]) -> list[Card]:
    width = min(80, shutil.get_terminal_size().columns)
    shown = 0  # lines drawn last time, to draw over
    with client.stream_chat(messages, response_format=list[Card]) as stream:
        for cards in stream.partials():  # the same list each time, grown in place
            assert isinstance(cards, list)
            lines = [line for card in cards for line in card_lines(card, width)]
            up = f"\x1b[{shown}F" if shown else ""
            sys.stdout.write(up + "\x1b[J" + "\n".join(lines) + "\n")
            sys.stdout.flush()
            shown = len(lines)
        parsed = stream.parsed
    assert isinstance(parsed, list)
    return parsed


def piped(client: Client, messages: list[dict[str, str]]) -> list[Card]:
    with client.stream_chat(messages, response_format=list[Card]) as stream:
        for card in stream.elements():  # each card once complete, a validated Card
            assert isinstance(card, Card)
            print("\n".join(card_lines(card.model_dump(), 80)), flush=True)
        parsed = stream.parsed
    assert isinstance(parsed, list)
    return parsed


@contextlib.contextmanager
def upstream_base_url() -> Iterator[str | None]:
    """None (the environment decides) or the base URL of a local upstream started here."""
    if os.environ.get("TOKENHUB_KEY") or os.environ.get("TOKENHUB_BASE_URL"):
        yield None
        return
    from tokenhub_stream.testing import FakeChatUpstream, run_upstream

    with run_upstream(FakeChatUpstream()) as running:
        print(
            "No TOKENHUB_KEY or TOKENHUB_BASE_URL: "
            f"using the local test upstream at {running.base_url}",
            file=sys.stderr,
        )
        yield running.base_url


def main(prompt: str, model: str, strict: bool, base_url: str | None) -> None:
    messages = [{"role": "user", "content": prompt}]
    with Client(base_url=base_url, model=model, strict_schemas=strict) as client:
        show = on_terminal if sys.stdout.isatty() else piped
        cards = show(client, messages)
    print(f"{len(cards)} cards: " + ", ".join(card.title for card in cards))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Mercury, Venus and Mars, one card each")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-strict", action="store_true", help="leave out `strict: true`")
    args = parser.parse_args()
    with upstream_base_url() as base_url:
        main(args.prompt, args.model, not args.no_strict, base_url)
