"""Stream a chat completion to the terminal, sync: the smallest script.

Run it inside the project's virtualenv:

    python examples/stream_sync.py
    python examples/stream_sync.py "Write a haiku about streams." --model gpt-4o

It talks to token-hub when TOKENHUB_KEY is set, or to any OpenAI-compatible server named
by TOKENHUB_BASE_URL (e.g. http://localhost:11434/v1 for Ollama, no key needed). With
neither, it starts the local test upstream of `tokenhub_stream.testing` in-process (the
`cli` extra) and says so on stderr: no key, no network.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from tokenhub_stream import DEFAULT_MODEL, stream_chat_sync


@contextlib.contextmanager
def upstream_base_url() -> Iterator[str | None]:
    """None (the environment decides) or the base URL of a local upstream started here."""
    if os.environ.get("TOKENHUB_KEY") or os.environ.get("TOKENHUB_BASE_URL"):
        yield None
        return
    from tokenhub_stream.testing import run_upstream

    with run_upstream() as running:
        print(
            "No TOKENHUB_KEY or TOKENHUB_BASE_URL: "
            f"using the local test upstream at {running.base_url}",
            file=sys.stderr,
        )
        yield running.base_url


def main(prompt: str, model: str, base_url: str | None) -> None:
    messages = [{"role": "user", "content": prompt}]
    with stream_chat_sync(messages, model=model, base_url=base_url) as stream:
        for text in stream:
            print(text, end="", flush=True)
    print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Write a haiku about streams.")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    with upstream_base_url() as base_url:
        main(args.prompt, args.model, base_url)
