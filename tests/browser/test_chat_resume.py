"""The chat page resumes an answer after its connection drops (issue #7), in a real chromium.

The page is served through `Cutter`, a TCP relay in front of uvicorn that resets the first
chat answer's connection after a few events, as a phone losing its network would: the
browser sees a network error, the proxy sees its client go.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script

from .conftest import serve

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.timeout(30)


class Cutter:
    """Relays loopback TCP to `port`; resets the first chat answer after `events` event ids."""

    def __init__(self, port: int, events: int) -> None:
        self.port = port
        self.events = events
        self.cut = threading.Event()
        self.loop = asyncio.new_event_loop()
        # IPPROTO_TCP: asyncio sets TCP_NODELAY only then (else Nagle delays the relay).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _serve(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, sock=self.sock)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return
        chat = False

        async def upstream_bound() -> None:
            nonlocal chat
            while data := await reader.read(65536):
                if b"POST /api/chat " in data and not self.cut.is_set():
                    chat = True
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def client_bound() -> None:
            seen = 0
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
                if chat and not self.cut.is_set():
                    seen += data.count(b"\nid: ")
                    if seen >= self.events:
                        self.cut.set()
                        writer.transport.abort()  # RST: a network error in the browser
                        up_writer.transport.abort()  # and a gone client for the proxy
                        return
            writer.close()

        try:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await asyncio.gather(upstream_bound(), client_bound())
        finally:
            writer.close()
            up_writer.close()

    def __enter__(self) -> Cutter:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(5)
        return self

    async def _close(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __exit__(self, *args: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@contextlib.contextmanager
def chat_page(page: Page, upstream: RunningUpstream, events: int) -> Iterator[Cutter]:
    from tokenhub_stream.cli._serve import create_app

    app = create_app(
        base_url=upstream.base_url, api_key=None, models=upstream.app.models, local=True
    )
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with serve(app) as url, Cutter(int(url.rsplit(":", 1)[1]), events) as cutter:
        page.goto(cutter.url + "/")
        page.locator("#model:enabled").wait_for()
        yield cutter
    assert errors == [], f"uncaught errors in the page: {errors}"


def send(page: Page, text: str) -> None:
    box = page.get_by_label("Message")
    box.fill(text)
    box.press("Enter")


def test_chat_page_resumes_after_a_dropped_connection(
    page: Page, upstream: RunningUpstream
) -> None:
    fake: FakeChatUpstream = upstream.app
    deltas = [f"word{i} " for i in range(20)]
    fake.enqueue(Script(deltas=deltas, delay=0.05))
    with chat_page(page, upstream, events=4) as cutter:
        send(page, "a long answer, please")
        answer = page.locator(".msg.assistant").last
        answer.and_(page.locator('.msg.assistant[data-state="done"]')).wait_for()
        assert cutter.cut.is_set()  # the connection was really cut mid-answer
        assert answer.locator("p.text").last.inner_text().strip() == "".join(deltas).strip()
        assert answer.get_by_role("alert").count() == 0
        assert "resumed" in answer.locator(".meta").inner_text()
    assert len(fake.requests) == 1  # the rest came from the proxy's buffer
    assert fake.requests[0].completed


def test_chat_page_stop_is_not_resumed(page: Page, upstream: RunningUpstream) -> None:
    fake: FakeChatUpstream = upstream.app
    fake.enqueue(Script(deltas=["Let me think"], end="stall"))
    with chat_page(page, upstream, events=100):
        send(page, "a long question")
        page.get_by_text("Let me think").wait_for()
        page.get_by_role("button", name="Stop").click()
        assert fake.requests[-1].wait_disconnected(1.0)
        answer = page.locator(".msg.assistant").last
        answer.and_(page.locator('.msg.assistant[data-state="stopped"]')).wait_for()
        page.wait_for_timeout(600)  # longer than the first resume pause
    assert len(fake.requests) == 1


def test_chat_page_sse_parser_last_event_id_counts_complete_events(
    page: Page, upstream: RunningUpstream
) -> None:
    with chat_page(page, upstream, events=100):
        result = page.evaluate(
            """async () => {
                const {SSEParser} = await import("/chat.js");
                const p = new SSEParser();
                const seen = [];
                p.feed("data: a\\nid: 1\\n\\ndata: b\\nid: 2\\n");
                seen.push(p.lastEventId);  // event 2 is not complete: still 1
                p.feed("\\n: keep-alive\\n\\n");
                seen.push(p.lastEventId);  // complete now; a comment keeps it
                p.feed("data: c\\r\\nid: 3\\n\\r\\n");
                seen.push(p.lastEventId);
                const resumed = new SSEParser("3");
                seen.push(resumed.lastEventId);
                return seen;
            }"""
        )
    assert result == ["1", "2", "3", "3"]
