from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field

import anyio
import httpx
import pytest

import servers
from tokenhub_stream import SSEDecoder
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream

# The server key of every proxy under test. Tests grep responses, headers and logs for it.
KEY = "sk-canary-5f1c0e7d9a2b4c3e8f6a1b0c"

Message = MutableMapping[str, object]
ASGIApp = Callable[
    [
        MutableMapping[str, object],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]


def text_of(data: bytes) -> str:
    """The assistant text carried by the `chat.completion.chunk` events in `data`."""
    out = []
    for event in SSEDecoder().feed(data):
        if event.data.startswith("{"):
            for choice in json.loads(event.data).get("choices", []):
                out.append(choice["delta"].get("content") or "")
    return "".join(out)


def assert_no_key(*texts: object) -> None:
    """Fail if the server key (or its bytes) appears in any of `texts`."""
    for text in texts:
        blob = text if isinstance(text, bytes) else str(text).encode()
        assert KEY.encode() not in blob, "the server key leaked"


def serve(app: ASGIApp) -> contextlib.AbstractContextManager[str]:
    """Serve `app` with uvicorn (h11) on a random loopback port; yield its base URL.

    `servers.serve` with lifespan "auto": some tests here serve bare ASGI callables.
    """
    return servers.serve(app, lifespan="auto")


@pytest.fixture
def upstream() -> Iterator[tuple[FakeChatUpstream, RunningUpstream]]:
    app = FakeChatUpstream(api_key=KEY, delay=0.001)
    with run_upstream(app) as running:
        yield app, running


@pytest.fixture
def key_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every log record at DEBUG and check none carries the key."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    assert_no_key(caplog.text, *(r.getMessage() for r in caplog.records))


# --- an httpx.MockTransport upstream for the pure-ASGI tests ------------------------------------


@dataclass
class FakeStream(httpx.AsyncByteStream):
    """A response body we control: chunks, then optionally a wait that never ends."""

    chunks: list[bytes]
    delay: float = 0.0
    hang: bool = False
    error: Exception | None = None
    closed: bool = False
    yielded: int = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if self.delay:
                await anyio.sleep(self.delay)
            self.yielded += 1
            yield chunk
        if self.error is not None:
            raise self.error
        if self.hang:
            await anyio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True

    async def wait_closed(self, timeout: float = 1.0) -> None:
        with anyio.fail_after(timeout):
            while True:
                if self.closed:
                    return
                await anyio.sleep(0.005)


@dataclass
class MockUpstream:
    """Records requests; answers each with the next queued response (or an SSE default)."""

    responses: list[httpx.Response | Exception] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    before_headers: float = 0.0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.before_headers:
            await anyio.sleep(self.before_headers)
        if self.responses:
            item = self.responses.pop(0)
            if isinstance(item, Exception):
                raise item
            return item
        return sse_response([b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n"])

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


def sse_response(
    chunks: list[bytes] | FakeStream, *, content_type: str = "text/event-stream"
) -> httpx.Response:
    stream = chunks if isinstance(chunks, FakeStream) else FakeStream(list(chunks))
    return httpx.Response(200, headers={"content-type": content_type}, stream=stream)


@pytest.fixture
def mock_upstream() -> MockUpstream:
    return MockUpstream()
