"""Screenshots of the browser chat page for the docs, taken in the same chromium as the tests.

Run (inside the project's virtualenv, with Debian's chromium installed):

    python scripts/screenshots.py            # writes docs/img/chat.png and chat-phone.png
    python scripts/screenshots.py --out /tmp/img

It serves `tokenhub-stream serve`'s app on a random loopback port in front of the local
test upstream (no key, no network), with a history store in a temporary SQLite file: it
has a first short conversation, starts a new chat and has a second one with the keyboard,
then saves a desktop (1280x800, the history beside the chat) and a phone-size (390x844)
picture. Both show the server's stats panel (open streams, time to first token,
tokens/s). The tests never write these files; run this by hand when the page changes,
and commit the PNGs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from playwright.sync_api import Page, sync_playwright
from starlette.applications import Starlette

from tokenhub_stream.cli._serve import create_app
from tokenhub_stream.store import ConversationStore
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("TOKENHUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWERS = [
    "Each token is sent as a server-sent event the moment the model produces it. "
    "The page reads the response body with a ReadableStream reader and appends every "
    "delta, so the answer grows word by word instead of arriving all at once.",
    "Press Stop or Escape. The page aborts its fetch, the proxy notices the closed "
    "connection and closes the upstream request within a second, so no more tokens "
    "are generated (or billed) for nobody.",
]
QUESTIONS = ["How does the answer stream into the page?", "And if I stop it halfway?"]
EARLIER = ("What is a keep-alive comment?", "A line starting with a colon: the browser skips it.")


@contextlib.contextmanager
def serve(app: Starlette) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def ask(page: Page, upstream: FakeChatUpstream, n: int, question: str, answer: str) -> None:
    upstream.enqueue(Script(text=answer))  # about 50 deltas/s
    box = page.get_by_label("Message")
    box.fill(question)
    box.press("Enter")
    page.locator(".msg.assistant").nth(n).and_(page.locator('[data-state="done"]')).wait_for()


def converse(page: Page, url: str, upstream: FakeChatUpstream, wide: bool) -> None:
    page.goto(url)
    page.locator("#model:enabled").wait_for()
    ask(page, upstream, 0, *EARLIER)
    page.locator("#new-chat").click()
    page.locator(".msg").first.wait_for(state="detached")
    for n, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        ask(page, upstream, n, question, answer)
    page.locator("#stats:not([hidden])").wait_for()
    if wide:  # the list sits beside the chat; on a phone it folds behind "History"
        page.locator("#history-list li").nth(1).wait_for()
    page.get_by_label("Message").fill("Tell me about keep-alive comments")
    page.evaluate("() => document.activeElement.blur()")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    upstream = FakeChatUpstream()
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_upstream(upstream) as running,
        sync_playwright() as playwright,
    ):
        app = create_app(
            base_url=running.base_url,
            api_key=None,
            models=upstream.models,
            local=True,
            store=ConversationStore(f"sqlite+aiosqlite:///{tmp}/history.db"),
        )
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        # name, width, height, device pixel ratio, phone
        shots = [("chat.png", 1280, 800, 1, False), ("chat-phone.png", 390, 844, 2, True)]
        with serve(app) as url:
            for name, width, height, scale, phone in shots:
                context = browser.new_context(
                    color_scheme="light",
                    viewport={"width": width, "height": height},
                    device_scale_factor=scale,
                    is_mobile=phone,
                    has_touch=phone,
                )
                context.set_default_timeout(15_000)
                page = context.new_page()
                converse(page, url, upstream, wide=not phone)
                path = args.out / name
                page.screenshot(path=str(path))
                print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
                context.close()
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
