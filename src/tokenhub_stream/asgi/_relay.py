"""The relay: what every streamed answer of the proxy shares, written once.

- **The race.** A turn's exchange (the passthrough, the tool loop, a resume's tail) runs
  against the client's `http.disconnect`: whichever ends first ends the other, so the
  upstream connection never outlives the client's (the billing gotcha: tokens streamed to
  nobody) and the client never waits on a dead upstream. The watcher also listens while
  the upstream is still thinking, before any write could fail. On asyncio the race is two
  plain tasks (`_race_asyncio`): anyio's task group, its cancel scopes and task-state
  entries were about 5 KiB of each open stream (docs/performance.md); under trio it is an
  anyio task group (`_race_anyio`). That choice is the only difference between backends.
- **Keep-alives.** A stream silent for `keepalive_interval` gets a `: keep-alive` comment,
  always between two events. One timer per proxy looks at every open stream (`Sweep`),
  on asyncio and trio alike.
- **Deadlines.** A turn past `total_timeout` is cancelled by the same kind of timer, and
  answered with a 504, or an error frame and no `[DONE]` once the status was sent.
- **Writes and failures.** One write at a time per response (a keep-alive waits for the
  relay's write and the other way round); before the status a failure is a JSON error
  with the right status, after it an error frame, key-free either way.

Internal interface of `tokenhub_stream.asgi`, used by `_passthrough.py`, `_tools.py`,
`_resume.py` and `_proxy.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio

from .._sweep import Sweep, spawn
from ._record import TurnOutcome
from ._redact import KeyRedactor
from ._turn import STREAM_HEADERS, Receive, Send, Turn, send_simple
from ._wire import ProxyRejection, error_body, error_frame

__all__: list[str] = []

logger = logging.getLogger("tokenhub_stream.asgi")

_KEEPALIVE = b": keep-alive\n\n"
#: The largest error body the proxy sends (an upstream's error object included).
MAX_ERROR_BODY = 64 * 1024

#: Called when the client has gone before the answer ended: `None` to cancel the exchange
#: at once, or the seconds it may still run (on_disconnect="finish", a resumable stream).
LeavePolicy = Callable[[Turn], "float | None"]


class Relay:
    """The race, keep-alives, deadlines and writes of one proxy (see the module)."""

    __slots__ = ("_deadlines", "_keepalives", "_redactor", "interval", "total_timeout")

    def __init__(
        self,
        *,
        keepalive_interval: float | None,
        total_timeout: float | None,
        redactor: KeyRedactor | None,
    ) -> None:
        self.interval = keepalive_interval
        self.total_timeout = total_timeout
        self._redactor = redactor
        # One timer each for every open stream of this proxy (_sweep.py).
        self._keepalives: Sweep[Turn, Send] | None = (
            None if keepalive_interval is None else Sweep(keepalive_interval, self._tick)
        )
        self._deadlines: Sweep[Turn, None] | None = (
            None if total_timeout is None else Sweep(total_timeout, self._expire)
        )

    def __repr__(self) -> str:
        return f"<Relay keepalive_interval={self.interval} total_timeout={self.total_timeout}>"

    @property
    def idle(self) -> bool:
        """No stream is open (no keep-alive or deadline is being watched)."""
        return not (self._keepalives and self._keepalives.busy) and not (
            self._deadlines and self._deadlines.busy
        )

    # --- the race -------------------------------------------------------------------------

    def race(
        self,
        turn: Turn,
        exchange: Coroutine[Any, Any, None],
        receive: Receive,
        send: Send,
        leave: LeavePolicy,
    ) -> Coroutine[Any, Any, None]:
        """Run `exchange` against the client's leaving (await the coroutine returned).

        Not a coroutine itself: the caller awaits the race's own coroutine, one frame less
        on the request's task for the whole stream. The exchange's exception (not an
        exception group) is raised from it.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: trio
            return self._race_anyio(turn, exchange, receive, send, leave)
        return self._race_asyncio(turn, exchange, receive, send, leave)

    async def _race_asyncio(
        self,
        turn: Turn,
        exchange: Coroutine[Any, Any, None],
        receive: Receive,
        send: Send,
        leave: LeavePolicy,
    ) -> None:
        # The exchange runs in a child task, this task watches for `http.disconnect`. The
        # child's end wakes this task with a cancel that is taken back (uncancel), as
        # asyncio.timeout does.
        host = asyncio.current_task()
        assert host is not None
        wake = _WakeHost(host)
        child = asyncio.get_running_loop().create_task(exchange)
        child.add_done_callback(wake)
        turn.canceller = child
        deadlines = self._deadlines
        if deadlines is not None:
            deadlines.add(turn, None)
        try:
            # The watcher, inline (one frame less per open stream).
            while (await receive())["type"] != "http.disconnect":
                pass
            # After a complete response uvicorn answers receive() with http.disconnect:
            # that is not the client leaving.
            if not turn.response_done:
                turn.client_gone = True
                finish = leave(turn)
                if finish is not None:
                    await asyncio.sleep(finish)  # cut short when the exchange ends
                    turn.outcome = "timeout"
                child.cancel()
        except BaseException as exc:
            wake.watching = False
            ours = isinstance(exc, asyncio.CancelledError) and wake.woke and host.uncancel() == 0
            if not ours:
                # Cancelled from outside (server shutdown), or receive() failed: the
                # exchange goes too.
                child.cancel()
                await _join(child)
                raise
        finally:
            wake.watching = False
            turn.canceller = None
            if deadlines is not None:
                deadlines.discard(turn)
        await _join(child)
        if not child.cancelled():
            failure = child.exception()
            if failure is not None:
                raise failure
        elif turn.expired:
            await self.deadline_passed(send, turn)

    async def _race_anyio(
        self,
        turn: Turn,
        exchange: Coroutine[Any, Any, None],
        receive: Receive,
        send: Send,
        leave: LeavePolicy,
    ) -> None:
        # The same race in one anyio task group. The exchange runs in the child task:
        # every upstream chunk resumes it, and a child's coroutine chain is a handful of
        # frames deep where this task's runs through the server and every middleware.
        failure: list[Exception] = []

        async def run(scope: anyio.CancelScope) -> None:
            try:
                await exchange
            except Exception as exc:
                failure.append(exc)
            finally:
                scope.cancel()

        deadlines = self._deadlines
        async with anyio.create_task_group() as tg:
            turn.canceller = tg.cancel_scope
            if deadlines is not None:
                deadlines.add(turn, None)
            try:
                tg.start_soon(run, tg.cancel_scope)
                while (await receive())["type"] != "http.disconnect":
                    pass
                if not turn.response_done:
                    turn.client_gone = True
                    finish = leave(turn)
                    if finish is not None:
                        await anyio.sleep(finish)  # cut short when the exchange ends
                        turn.outcome = "timeout"
                    tg.cancel_scope.cancel()
            finally:
                turn.canceller = None
                if deadlines is not None:
                    deadlines.discard(turn)
        if failure:
            raise failure[0]
        if turn.expired:
            await self.deadline_passed(send, turn)

    def _expire(self, turns: list[tuple[Turn, None]]) -> None:
        # The total_timeout look: the exchange of a turn past it is cancelled (its
        # upstream closes), and the race answers for it (deadline_passed).
        limit = self.total_timeout
        if limit is None:
            return
        due = time.perf_counter() - limit
        for turn, _ in turns:
            if turn.started <= due and not turn.expired:
                turn.expired = True
                turn.cancel()

    # --- the stream -----------------------------------------------------------------------

    async def start(
        self, send: Send, turn: Turn, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        """Send the 200 of an event stream (the status is fixed from here on) and watch the
        stream for keep-alives."""
        # Set just before the start goes out: a status of 0 means none was sent.
        turn.status = 200
        headers = [*STREAM_HEADERS, (b"x-request-id", turn.request_id.encode()), *extra]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        turn.last_write = time.monotonic()
        keepalives = self._keepalives
        if keepalives is not None:
            keepalives.add(turn, send)

    def stop_keepalives(self, turn: Turn) -> None:
        """The stream's last event was written (or it failed): no more keep-alives."""
        keepalives = self._keepalives
        if keepalives is not None:
            keepalives.discard(turn)

    async def write(self, send: Send, turn: Turn, data: bytes) -> None:
        """Write `data` (whole events) to the client, after a keep-alive in flight."""
        ticker = turn.ticker_writing
        if ticker is not None:
            await ticker.wait()
        turn.writing = True
        try:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            turn.writing = False
        if turn.ttfb is None:
            turn.ttfb = time.perf_counter() - turn.started
        turn.bytes_sent += len(data)
        turn.last_write = time.monotonic()

    async def end(self, send: Send, turn: Turn) -> None:
        """End the response body (after a keep-alive in flight), unless the client left."""
        self.stop_keepalives(turn)
        if turn.client_gone:
            return
        ticker = turn.ticker_writing
        if ticker is not None:
            await ticker.wait()
        turn.response_done = True  # the server's http.disconnect after this is no leaving
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _tick(self, streams: list[tuple[Turn, Send]]) -> None:
        # The keep-alive look: a stream silent for the whole interval gets its comment
        # from a short task. Load balancers cut idle connections (often after 60 s); a
        # comment between two events keeps them open and probes for a gone client.
        assert self.interval is not None
        due = time.monotonic() - self.interval
        for turn, send in streams:
            if turn.last_write > due or turn.writing or turn.ticking or _over(turn):
                continue  # writing: the relay is on it; look again next time
            turn.ticking = True
            spawn(self._tick_one, send, turn)

    async def _tick_one(self, send: Send, turn: Turn) -> None:
        try:
            if turn.writing or _over(turn):
                return  # the relay began a write, or the stream ended, since the look
            done = turn.ticker_writing = anyio.Event()
            try:
                await send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})
            finally:
                turn.ticker_writing = None
                done.set()
            turn.bytes_sent += len(_KEEPALIVE)
            turn.keepalives += 1
            turn.last_write = time.monotonic()
        except Exception as exc:  # a gone client: the race's watcher sees it
            logger.debug("keep-alive not sent: %s", type(exc).__name__)
        finally:
            turn.ticking = False

    # --- failures -------------------------------------------------------------------------

    def redact(self, data: bytes) -> bytes:
        """A whole body (an error, a JSON answer) without the key; streams use a
        `StreamRedactor` of their own."""
        redactor = self._redactor
        return data if redactor is None else redactor(data)

    async def fail_before(
        self, send: Send, turn: Turn, status: int, message: str, code: str
    ) -> None:
        """The upstream failed before any status was sent: a JSON error with `status`."""
        turn.status = status
        turn.outcome = "timeout" if status == 504 else "upstream_error"
        turn.error = message
        rejection = ProxyRejection(status, message, code=code, error_type="api_error")
        await self.send_start_error(send, turn, rejection)

    async def send_start_error(self, send: Send, turn: Turn, rejection: ProxyRejection) -> None:
        """`rejection` as the whole response (its status, a key-free JSON body)."""
        if turn.client_gone:
            return
        body = error_body(
            rejection.message,
            error_type=rejection.error_type,
            code=rejection.code,
            param=rejection.param,
            upstream=rejection.upstream,
        )
        if len(body) > MAX_ERROR_BODY:  # an upstream object the redaction made larger
            body = error_body(
                rejection.message,
                error_type=rejection.error_type,
                code=rejection.code,
                param=rejection.param,
            )
        body = self.redact(body)
        headers = [
            (b"content-type", b"application/json"),
            (b"x-request-id", turn.request_id.encode()),
        ]
        headers += [(k.encode(), v.encode()) for k, v in rejection.headers.items()]
        turn.response_done = True
        await send_simple(send, rejection.status, body, headers)
        turn.bytes_sent += len(body)
        turn.ttfb = time.perf_counter() - turn.started

    async def fail_after(
        self,
        send: Send,
        turn: Turn,
        outcome: TurnOutcome,
        message: str,
        code: str,
        upstream: Mapping[str, object] | None = None,
    ) -> None:
        """The stream failed after its status: an error frame (no `[DONE]` follows)."""
        if turn.outcome == "completed":
            turn.outcome = outcome
        turn.error = message
        frame = self.redact(error_frame(message, code=code, upstream=upstream))
        if turn.resume is not None:
            frame = await turn.resume.tag(frame)
        if not turn.client_gone:
            await self.write(send, turn, frame)

    async def deadline_passed(self, send: Send, turn: Turn) -> None:
        """The turn ran past `total_timeout` (issue #14: an upstream trickling a byte a
        second never ended); its exchange was cancelled and the upstream closed."""
        if turn.response_done:
            return  # it ended just as the deadline came
        logger.warning("turn exceeded total_timeout request_id=%s", turn.request_id)
        message = "The answer took longer than the proxy allows."
        if turn.status == 0:
            await self.fail_before(send, turn, 504, message, "upstream_timeout")
            return
        turn.outcome = "timeout"
        turn.error = message
        if turn.client_gone:
            return
        # After the start the status is fixed: an error frame, and no [DONE].
        await self.write(send, turn, error_frame(message, code="upstream_timeout"))
        await self.end(send, turn)


class _WakeHost:
    """The exchange task's done callback: cancels the watching task once.

    A slotted object rather than a closure over three cells: it lives as long as the stream.
    """

    __slots__ = ("host", "watching", "woke")

    def __init__(self, host: asyncio.Task[Any]) -> None:
        self.host = host
        self.watching = True
        self.woke = False

    def __call__(self, _: object) -> None:
        if self.watching:
            self.woke = True
            self.host.cancel()


def _over(turn: Turn) -> bool:
    # No keep-alive after the stream: the client left, the body ended, or the race is over.
    return turn.client_gone or turn.response_done or turn.canceller is None


async def _join(task: asyncio.Task[None]) -> None:
    # Wait for a task's end without taking its result or exception.
    if not task.done():
        await asyncio.wait((task,))
