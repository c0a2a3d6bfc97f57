"""One request as the upstream received it (`ReceivedRequest`) and the exchange answering it.

`ReceivedRequest` is public; its outcome (completed, disconnected, finished) is only ever set
from this module, by the `Exchange` that sends the response.

Documented internal interface, used by `_upstream.py` and `_reply.py`: the ASGI types
`Scope`, `Message`, `Receive` and `Send`; `read_request`, which reads one request's body;
`Exchange`, which writes the response and records its outcome.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import anyio

from ._script import Script

# The ASGI interface typed without `Any`: scopes and received messages are only read, and
# sent messages are plain dicts, so uvicorn, starlette, httpx.ASGITransport and hand-written
# test callables all fit.
Scope = Mapping[str, object]
Message = dict[str, object]
Receive = Callable[[], Awaitable[Mapping[str, object]]]
Send = Callable[[Message], Awaitable[None]]

_POLL = 0.05


class ReceivedRequest:
    """One request as the upstream received it, and what became of its response.

    The server runs in another thread; the waits are thread-safe and bounded.

    ```python
    with run_upstream(upstream) as running:
        ...  # a client opens a stream and closes it early
        request = upstream.requests[-1]
        assert request.wait_disconnected(1.0)
        assert request.json is not None and request.json["stream"] is True
    ```

    Attributes:
        method: the HTTP method.
        path: the request path, without the query string.
        query: the raw query string.
        headers: header names lower-cased; repeated headers joined with `", "`.
        body: the raw request body.
        json: the body parsed as a JSON object, or `None`.
        received_at: `time.monotonic()` when the whole body had arrived.
        script: the script that answered this request, if any.
    """

    def __init__(
        self,
        *,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        json: Mapping[str, object] | None,
        received_at: float,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.json = json
        self.received_at = received_at
        self.script: Script | None = None
        self._completed = False
        self._disconnected_at: float | None = None
        self._last_write_at: float | None = None
        self._disconnected = threading.Event()
        self._finished = threading.Event()

    def __repr__(self) -> str:
        # Never show headers: they carry the Authorization key.
        state = (
            "completed"
            if self._completed
            else "disconnected"
            if self._disconnected.is_set()
            else "finished"
            if self._finished.is_set()
            else "in progress"
        )
        return f"<ReceivedRequest {self.method} {self.path} {state}>"

    @property
    def completed(self) -> bool:
        """Whether the response was sent to its end (the final empty body message)."""
        return self._completed

    @property
    def disconnected(self) -> bool:
        """Whether the client went away before the response was complete."""
        return self._disconnected.is_set()

    @property
    def disconnected_at(self) -> float | None:
        """`time.monotonic()` when the disconnect was seen, or `None`."""
        return self._disconnected_at

    @property
    def last_write_at(self) -> float | None:
        """`time.monotonic()` when the response's last bytes (its headers, or its last body
        bytes: a keep-alive counts) were handed to the server, or `None` before any.

        A proxy's read timeout counts from here; a client-side clock would add the relay's
        latency.
        """
        return self._last_write_at

    @property
    def finished(self) -> bool:
        """Whether the app is done with this request (completed, cut, disconnected...)."""
        return self._finished.is_set()

    def wait_disconnected(self, timeout: float) -> bool:
        """Block until the client disconnects before the response completed.

        Args:
            timeout: the most seconds to wait.

        Returns:
            `True` if the disconnect was seen, `False` on timeout.
        """
        return self._disconnected.wait(timeout)

    def wait_finished(self, timeout: float) -> bool:
        """Block until the app has finished handling this request.

        Read `completed` after this: it is set just after the last byte was handed to the
        server, which can race with the client seeing that byte.

        Args:
            timeout: the most seconds to wait.

        Returns:
            `True` if the handler finished, `False` on timeout.
        """
        return self._finished.wait(timeout)

    def _mark_disconnected(self) -> None:
        if not self._completed and not self._disconnected.is_set():
            self._disconnected_at = time.monotonic()
            self._disconnected.set()


async def read_request(scope: Scope, receive: Receive) -> ReceivedRequest | None:
    """Read one request's whole body; `None` when the client left before it was sent."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        if isinstance(chunk, bytes):
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    parsed: Mapping[str, object] | None = None
    try:
        loaded = json.loads(body) if body else None
    except ValueError:
        loaded = None
    if isinstance(loaded, dict):
        parsed = loaded
    headers: dict[str, str] = {}
    raw_headers = scope.get("headers", [])
    if isinstance(raw_headers, list | tuple):
        for name, value in raw_headers:
            key = bytes(name).decode("latin-1").lower()
            text = bytes(value).decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
    query = scope.get("query_string", b"")
    return ReceivedRequest(
        method=str(scope.get("method", "GET")),
        path=str(scope.get("path", "/")),
        query=query.decode("latin-1") if isinstance(query, bytes) else "",
        headers=headers,
        body=body,
        json=parsed,
        received_at=time.monotonic(),
    )


class _Disconnected(Exception):
    pass


class Exchange:
    """Sends one response, tracks the last write for keep-alives, records the outcome.

    `FakeChatUpstream` makes one per request and hands it to `_reply.py`'s `Reply`.
    """

    def __init__(self, send: Send, record: ReceivedRequest, closing: threading.Event) -> None:
        self._send = send
        self._record = record
        self._closing = closing
        self.last_write = anyio.current_time()

    async def serve(self, receive: Receive, respond: Callable[[], Awaitable[None]]) -> None:
        """Run `respond()` until it returns or the client goes away, then mark the request
        finished. A disconnect cancels `respond()`; a write to a closed socket ends it."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                try:
                    await respond()
                except _Disconnected:
                    pass
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self._record._finished.set()

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message.get("type") == "http.disconnect":
                self._record._mark_disconnected()
                scope.cancel()
                return

    async def _raw_send(self, message: Message) -> None:
        try:
            await self._send(message)
        except OSError as exc:
            # Servers other than uvicorn raise when writing to a closed socket.
            self._record._mark_disconnected()
            raise _Disconnected from exc

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        encoded = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        # Stamped before the send: once the bytes are out, a client in another thread may
        # read `last_write_at` before this task runs again.
        self._record._last_write_at = time.monotonic()
        await self._raw_send({"type": "http.response.start", "status": status, "headers": encoded})
        self.last_write = anyio.current_time()

    async def write(self, data: bytes) -> None:
        self._record._last_write_at = time.monotonic()
        await self._raw_send({"type": "http.response.body", "body": data, "more_body": True})
        self.last_write = anyio.current_time()

    async def finish(self) -> None:
        await self._raw_send({"type": "http.response.body", "body": b"", "more_body": False})
        # No checkpoint between the last send and this flag, so the disconnect watcher
        # cannot mistake uvicorn's post-response `http.disconnect` for a client leaving.
        self._record._completed = True

    async def idle(self, seconds: float, keepalive: float | None, ping: bytes) -> None:
        """Wait `seconds`, writing `ping` whenever nothing was written for `keepalive`."""
        deadline = anyio.current_time() + seconds
        while not self._closing.is_set():
            now = anyio.current_time()
            if now >= deadline:
                return
            if keepalive is not None and now - self.last_write >= keepalive:
                await self.write(ping)
                continue
            wake = deadline if keepalive is None else min(deadline, self.last_write + keepalive)
            await anyio.sleep(max(0.0, min(wake, now + _POLL) - now))
