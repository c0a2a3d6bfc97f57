"""`FakeChatUpstream`: the scriptable upstream as a plain ASGI app (no starlette).

Documented internal interface, used by `_server.py`: `closing_event(upstream)`, the event
`run_upstream` sets on shutdown so stalls and delays end at once.
"""

from __future__ import annotations

import collections
import hmac
import itertools
import threading
from collections.abc import Sequence

from ._reply import Reply, error_body, send_json
from ._requests import Exchange, Receive, ReceivedRequest, Scope, Send, read_request
from ._rules import unscripted
from ._script import Script

DEFAULT_MODELS: tuple[str, ...] = (
    "claude-3-5-sonnet-20241022",
    "gpt-4o",
    "gpt-4o-mini",
    "gemini-2.0-flash",
    "deepseek-chat",
)


class FakeChatUpstream:
    """A scriptable OpenAI-compatible chat upstream, as a plain ASGI app.

    ```python
    upstream = FakeChatUpstream(api_key="sk-test", delay=0.001)
    upstream.enqueue(Script(deltas=["Hi", "!"]), Script(status=503))
    with run_upstream(upstream) as running:
        ...  # requests to running.base_url get the scripts in order, then the default reply
    ```

    Routes: `POST /v1/chat/completions` and `GET /v1/models`; anything else is a 404 with
    an OpenAI-shaped error body.

    A chat request with no script left is answered by a fixed rule, so a demo shows a
    chat, and a tool turn, with no key and no network:

    - the last message is the user's, and the request has `tools` (and `tool_choice` is
      not `"none"`): one call to the tool `tool_choice` names, else to the first tool with
      a word of its name (split at `_`, `-`, `.` and case changes) among the words of the
      user's message, else to the first tool. Its arguments are the schema's required
      properties: an `enum` or `const` gives its first value, a string the last word of
      the user's message, an integer or number the next number in the message (1 when
      none is left), a boolean `true`, an array `[]`, an object its own required
      properties, anything else `null`;
    - the last messages are tool results: a reply quoting each, as
      `get_weather returned "18 degrees in Paris".`;
    - otherwise a reply quoting the last user message (`You said: "..."`).

    Args:
        api_key: when given, requests need `Authorization: Bearer <api_key>` or get a 401
            (the key is never echoed).
        models: the ids listed by `GET /v1/models`; the first is used when a request
            names no model.
        delay: default seconds between streamed chunks (0.02 is about 50 tokens/s).

    Raises:
        ValueError: `delay` is negative or `models` is empty.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        delay: float = 0.02,
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        if isinstance(models, str) or not models:
            raise ValueError("models must be a non-empty sequence of model ids")
        self._api_key = api_key
        self.models: tuple[str, ...] = tuple(models)
        self.delay = delay
        self._lock = threading.Condition()
        self._scripts: collections.deque[Script] = collections.deque()
        self._requests: list[ReceivedRequest] = []
        self._ids = itertools.count(1)
        self._closing = threading.Event()

    def __repr__(self) -> str:
        return (
            f"<FakeChatUpstream models={len(self.models)} scripts={self.pending_scripts} "
            f"requests={len(self.requests)}>"
        )

    def enqueue(self, *scripts: Script) -> None:
        """Queue scripts; each chat request takes the oldest one left.

        Args:
            *scripts: the scripts, in the order requests will get them.

        Raises:
            TypeError: something other than a `Script` was given.
        """
        for script in scripts:
            if not isinstance(script, Script):
                raise TypeError(f"expected a Script, got {type(script).__name__}")
        with self._lock:
            self._scripts.extend(scripts)

    @property
    def pending_scripts(self) -> int:
        """How many queued scripts no request has taken yet."""
        with self._lock:
            return len(self._scripts)

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least `n` requests were received.

        Args:
            n: the number of requests to wait for.
            timeout: the most seconds to wait.

        Returns:
            `True` once `len(requests) >= n`, `False` on timeout.
        """
        with self._lock:
            return self._lock.wait_for(lambda: len(self._requests) >= n, timeout)

    # ASGI entry point

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection scope (`http`; `lifespan` is acknowledged).

        Raises:
            RuntimeError: the scope type is neither `http` nor `lifespan`.
        """
        if scope.get("type") == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope.get("type") != "http":
            raise RuntimeError(f"FakeChatUpstream serves http only, not {scope.get('type')!r}")
        record = await read_request(scope, receive)
        if record is None:
            return
        with self._lock:
            self._requests.append(record)
            self._lock.notify_all()
        writer = Exchange(send, record, self._closing)
        await writer.serve(receive, lambda: self._route(record, writer))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message.get("type") == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message.get("type") == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, record: ReceivedRequest) -> bool:
        if self._api_key is None:
            return True
        scheme, _, token = record.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self._api_key.encode()
        )

    async def _route(self, record: ReceivedRequest, writer: Exchange) -> None:
        path = record.path.rstrip("/") or "/"
        if path not in ("/v1/chat/completions", "/v1/models"):
            message = f"Unknown request URL: {record.method} {record.path}."
            await send_json(writer, 404, error_body(message, "invalid_request_error", None))
        elif not self._authorized(record):
            # Like OpenAI, but the key is never echoed back, not even masked.
            message = "Incorrect or missing API key. Send 'Authorization: Bearer <key>'."
            body = error_body(message, "invalid_request_error", "invalid_api_key")
            await send_json(writer, 401, body)
        elif path == "/v1/models":
            if record.method != "GET":
                await send_json(writer, 405, _method_not_allowed(record))
                return
            data = [{"id": m, "object": "model", "owned_by": "tokenhub-local"} for m in self.models]
            await send_json(writer, 200, {"object": "list", "data": data})
        elif record.method != "POST":
            await send_json(writer, 405, _method_not_allowed(record))
        elif record.json is None:
            message = "We could not parse the JSON body of your request."
            await send_json(writer, 400, error_body(message, "invalid_request_error", None))
        else:
            with self._lock:
                queued = self._scripts.popleft() if self._scripts else None
            script = queued if queued is not None else unscripted(record.json or {})
            record.script = script
            reply = Reply(
                record,
                writer,
                script,
                number=next(self._ids),
                default_model=self.models[0],
                default_delay=self.delay,
            )
            await reply.run()


def closing_event(upstream: FakeChatUpstream) -> threading.Event:
    """The event that tells `upstream`'s handlers the server is stopping (`_server.py`)."""
    return upstream._closing


def _method_not_allowed(record: ReceivedRequest) -> dict[str, object]:
    message = f"Method {record.method} not allowed for {record.path}."
    return error_body(message, "invalid_request_error", "method_not_allowed")
