"""Stream deadlines without per-chunk cost.

A cancel scope around every network read costs ~7 µs on asyncio (measured: more than
half of the per-chunk floor), and httpx's own read timeout is per socket read, so
keep-alive comments would reset it. Instead, one daemon thread per process watches
the deadlines of all open streams. The hot loop only stores a timestamp per data event
(`ChunkParser.last_event_at`); when a deadline passes, the watchdog records which one
and shuts the stream's socket down, so the blocked read (sync or async, asyncio or trio)
returns at once and the shell raises `StreamTimeout(kind)`.

Deadlines are checked under one lock, and `StreamTimer.stop()` takes it too, so a
socket that has gone back to the pool is never touched.

This module owns the sockets and the thread: the rest of the package holds a
`StreamTimer` per response and calls its five methods (`watch`, `drain`, `stop`,
`release`, `shutdown`) and reads `fired`; it never sees a socket.

Waking the thread costs the streaming thread a futex call and a GIL hand-off, so a new
deadline wakes it only when it falls before the time the thread already sleeps until.
While streams are open the thread sleeps at most `_TICK` at a time; a stream's next
deadline (first token, idle, or the drain after `[DONE]`, 50 ms by default) then rarely
needs a wake-up of its own, and none is ever missed or late: the thread waits exactly
until the earliest deadline whenever that comes before its next tick.

A stream watched meanwhile whose first check is not due before the thread wakes is only
noted (`_new`); the thread heaps it when it wakes, unless the stream has ended by then,
as a short one mostly has: its timer never enters the heap, where it would have stayed
until its check came due (up to the idle timeout, a minute by default, later).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
import weakref
from typing import TYPE_CHECKING, Protocol

from ._engine import shutdown

if TYPE_CHECKING:
    import httpx

    from ._chunks import ChunkParser


class HasSocket(Protocol):
    """A response that names its socket: the engine's (`_engine/`)."""

    def get_extra_info(self, name: str) -> object: ...


__all__ = ["HasSocket", "StreamTimer"]

_TICK = 0.05  # the longest sleep while deadlines are pending or were lately
_IDLE_EXIT = 30.0  # the thread ends after this long without a deadline


class StreamTimer:
    """The deadlines of one response (first token, idle, total, and the drain after
    `[DONE]`) and the socket under it: the one handle the clients have on the watchdog.

    ```python
    timer = StreamTimer(parser, first_token=10.0, idle=30.0)
    timer.watch(response, total_deadline)  # the watchdog now enforces the deadlines
    ...                                    # read the body, feeding `parser`
    timer.stop()                           # the body ended; timer.fired says if a deadline did it
    timer.release()                        # the response is closed or back in the pool
    ```

    Used by `StreamState` (`_stream.py`) and `CompletionDeadline` (`_base.py`). The
    deadlines are read from `parser`'s timestamps (`started_at`, `first_token_at`,
    `last_event_at`), so the hot loop does no timing work of its own.
    """

    __slots__ = (
        "_held",
        "_sock",
        "_stopped",
        "_total",
        "_watched",
        "drain_deadline",
        "fired",
        "first_token",
        "idle",
        "parser",
    )

    def __init__(
        self, parser: ChunkParser, *, first_token: float | None, idle: float | None
    ) -> None:
        # None once stopped: the watchdog's heap keeps a stopped timer until its next
        # check comes due (up to `idle` later), and must not keep the stream's parser,
        # with all the text it assembled, alive with it.
        self.parser: ChunkParser | None = parser
        self.first_token = first_token
        self.idle = idle
        self.drain_deadline: float | None = None
        #: Which deadline passed: "first_token" | "idle" | "total" | "drain"; None if none.
        self.fired: str | None = None
        self._sock: socket.socket | None = None  # the watchdog's: cleared when it fires
        self._held: object | None = None  # the response's socket, until `release()`
        self._total: float | None = None
        self._watched = False
        self._stopped = False

    def watch(self, response: httpx.Response | HasSocket, total_deadline: float | None) -> bool:
        """Hand the response's socket to the watchdog, which shuts it down when a deadline
        passes (`total_deadline` is a `time.monotonic()` time, or None). The socket is
        httpx's (its `network_stream` extension) or the engine's (the response's
        `get_extra_info("socket")`: the connection's transport's). Returns False when the
        response has no socket (a mock transport): nothing is then enforced beyond
        httpx's own timeouts."""
        sock = _socket_of(response)
        self._held = sock
        self._total = total_deadline
        self._watched = sock is not None and watchdog.watch(self, sock, total_deadline)
        return self._watched

    def drain(self, seconds: float) -> bool:
        """After `[DONE]`: give the rest of the body `seconds` to arrive. False when no
        watchdog can bound that time (then do not read on)."""
        if not self._watched:
            return False
        self.drain_deadline = time.monotonic() + seconds
        watchdog.reschedule(self, self._total)
        return True

    def stop(self) -> None:
        """Stop watching: no deadline fires after this, and the watchdog never touches the
        socket again."""
        if self._stopped:  # only ever set to True, under the lock
            return
        with watchdog.lock:
            self._stopped = True
            self._sock = None
            self.parser = None

    def release(self) -> None:
        """The response is closed or back in the pool: its socket is no longer ours."""
        self.stop()
        self._held = None

    def shutdown(self) -> None:
        """Stop, then shut the socket down now, as the watchdog does: the pending or next
        read ends at once and the upstream sees the disconnect. Safe inside a weakref
        callback (it neither awaits nor blocks for long). The socket is not closed: its
        descriptor still belongs to the event loop's transport."""
        sock, self._held = self._held, None
        self.stop()  # the watchdog forgets the socket first
        if sock is not None:
            shutdown(sock)

    def next_deadline(self, total_deadline: float | None) -> tuple[float, str] | None:
        parser = self.parser
        if parser is None:  # stopped: no deadline any more
            return None
        best: tuple[float, str] | None = None
        if self.drain_deadline is not None:
            best = (self.drain_deadline, "drain")
        elif parser.first_token_at is None:
            if self.first_token is not None:
                best = (parser.started_at + self.first_token, "first_token")
        elif self.idle is not None:
            last = parser.last_event_at or parser.first_token_at
            best = (last + self.idle, "idle")
        if total_deadline is not None and (best is None or total_deadline < best[0]):
            best = (total_deadline, "total")
        return best

    def next_check(self, total_deadline: float | None, now: float) -> float | None:
        """When to look again. Before the first token the idle deadline does not exist
        yet, but once a token arrives it can fall before the first-token deadline: never
        sleep longer than `idle` in that phase."""
        nxt = self.next_deadline(total_deadline)
        when = None if nxt is None else nxt[0]
        parser = self.parser
        if parser is not None and parser.first_token_at is None and self.idle is not None:
            soon = now + self.idle
            when = soon if when is None else min(when, soon)
        return when


class _Watchdog:
    def __init__(self) -> None:
        # Re-entrant: a stream dropped without being closed shuts its socket down from a
        # weakref callback (`StreamTimer.shutdown` -> `stop`, which takes this lock), and
        # such callbacks run wherever the garbage collector happens to run, also inside
        # this lock, in the watchdog's own thread or in a client's (`watch`, `reschedule`
        # allocate while holding it). With a plain lock that thread deadlocked, and every
        # stream of the process after it.
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, StreamTimer, float | None]] = []
        # (first check, timer, total deadline) of the timers watched since the thread last
        # looked, none due before its current wait ends: heaped when it wakes, unless
        # stopped by then.
        self._new: list[tuple[float, StreamTimer, float | None]] = []
        self._counter = itertools.count()
        # The running thread, or None: the thread clears it as it ends (and a forked
        # child, which has no thread, starts with None).
        self._thread: threading.Thread | None = None
        # When the thread's current wait ends (only read under the lock; stale while the
        # thread runs, which is harmless: it looks at the heap before it waits again; 0
        # while no thread runs).
        self._sleep_until = 0.0

    def watch(self, timer: StreamTimer, sock: object, total_deadline: float | None) -> bool:
        """Start watching; False when there is no socket to interrupt (mock transports)."""
        if not isinstance(sock, socket.socket) and not hasattr(sock, "shutdown"):
            return False
        with self.lock:
            timer._sock = sock  # type: ignore[assignment]
            when = timer.next_check(total_deadline, time.monotonic())
            if when is not None:
                if when < self._sleep_until:  # due before the thread wakes: wake it
                    heapq.heappush(self._heap, (when, next(self._counter), timer, total_deadline))
                    self._wake.notify()
                else:
                    self._new.append((when, timer, total_deadline))
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, name="tokenhub_stream-watchdog", daemon=True
                )
                thread.start()  # it waits for the lock, held here until it is recorded
                self._thread = thread
        return True

    def _forked(self) -> None:
        # A forked child has only the thread that forked: no watchdog thread, and the lock
        # may be held by a thread that is not there (the watchdog's, mid-check; a client's
        # in `watch`), so it starts with a new lock. The heap's timers are the parent's
        # streams, on sockets the child shares with it: shutting one down when its deadline
        # passed would end the parent's stream, so the child forgets them: it starts with
        # a watchdog of its own, as a new process would.
        self.__init__()  # type: ignore[misc]

    def reschedule(self, timer: StreamTimer, total_deadline: float | None) -> None:
        with self.lock:
            if not timer._stopped and timer._sock is not None:
                self._push(timer, total_deadline)

    def _push(self, timer: StreamTimer, total_deadline: float | None) -> None:
        when = timer.next_check(total_deadline, time.monotonic())
        if when is None:
            return
        heapq.heappush(self._heap, (when, next(self._counter), timer, total_deadline))
        if when < self._sleep_until:
            self._wake.notify()

    def _run(self) -> None:
        with self.lock:
            try:
                self._loop()
            finally:
                self._thread = None
                self._sleep_until = 0.0

    def _loop(self) -> None:
        heap = self._heap
        idle_since: float | None = None
        while True:
            now = time.monotonic()
            if self._new:
                idle_since = None
                new, self._new = self._new, []
                for when, timer, total in new:
                    if not timer._stopped:  # else ended before its first check: forgotten
                        heapq.heappush(heap, (when, next(self._counter), timer, total))
            if not heap:
                if idle_since is None:
                    idle_since = now
                elif now - idle_since >= _IDLE_EXIT:
                    return
                self._sleep_until = now + _TICK
                self._wake.wait(_TICK)
                continue
            idle_since = None
            when, _, timer, total = heap[0]
            if timer._stopped:
                heapq.heappop(heap)
                continue
            if when > now:
                wait = min(when - now, _TICK)
                self._sleep_until = now + wait
                self._wake.wait(wait)
                continue
            heapq.heappop(heap)
            nxt = timer.next_deadline(total)
            if nxt is None or nxt[0] > now:  # progress moved it: look again later
                again = timer.next_check(total, now)
                if again is not None:
                    heapq.heappush(heap, (again, next(self._counter), timer, total))
                continue
            timer.fired = nxt[1]
            sock, timer._sock = timer._sock, None
            if sock is not None:
                shutdown(sock)


watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=watchdog._forked)


def _socket_of(response: httpx.Response | HasSocket) -> object | None:
    # The socket under a response (httpx's `network_stream` extension, or the engine's
    # own), or None.
    extensions = getattr(response, "extensions", None)
    if extensions is None:
        get_info = getattr(response, "get_extra_info", None)
        return None if get_info is None else get_info("socket")
    stream = extensions.get("network_stream")
    if stream is None:
        return None
    try:
        sock = _SOCKETS.get(stream)
    except TypeError:  # not weak-referenceable
        sock = None
    if sock is None:
        get_info = getattr(stream, "get_extra_info", None)
        sock = get_info("socket") if get_info is not None else None
        if sock is None:
            return None
        # A network stream keeps its socket for life and is reused by every request on
        # its pooled connection; anyio's lookup builds a dict of attributes each time.
        with contextlib.suppress(TypeError):
            _SOCKETS[stream] = sock
    return sock


_SOCKETS: weakref.WeakKeyDictionary[object, object] = weakref.WeakKeyDictionary()
