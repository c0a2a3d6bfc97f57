"""One timer for many streams: what is checked of every open stream every so often.

Three limits need a look at each open stream now and then: the upstream read timeout (has
this reader waited too long?), the keep-alive interval (has this client heard nothing for
too long?) and a turn's total deadline. A timer or a sleeping task per stream cost about
0.5 and 1.5 KiB of every open stream (docs/performance.md). `Sweep` keeps the members in a
dict and looks at all of them on one timer, armed only while there are members: a limit of
`limit` seconds is noticed between `limit` and `limit + min(limit / 4, 1 s)`.

It runs on asyncio (a `call_later` handle) and on trio (a system task that sleeps), so the
proxy has one keep-alive and deadline mechanism on both; `spawn` starts the short task a
look may need (a keep-alive write) the same way.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["Sweep", "spawn"]

K = TypeVar("K")
V = TypeVar("V")

_MAX_PERIOD = 1.0
logger = logging.getLogger("tokenhub_stream")
# Tasks started by spawn() on asyncio, held until they end: the loop keeps only weak
# references to its tasks.
_RUNNING: set[asyncio.Task[None]] = set()


def spawn(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Start `fn(*args)` as a task of its own on the running event loop (asyncio or trio).

    For short work started from a timer (no task group to hold it): its errors are logged.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: trio
        import trio

        trio.lowlevel.spawn_system_task(_logged, fn, *args, context=contextvars.Context())
        return
    task = loop.create_task(_logged(fn, *args), context=contextvars.Context())
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


async def _logged(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    try:
        await fn(*args)
    except Exception:  # a trio system task's error would end the whole run
        logger.exception("background task failed")


class Sweep(Generic[K, V]):
    """Calls `look(members)` every `min(limit / 4, 1)` seconds while there are members.

    `look` gets a snapshot list of `(key, value)` pairs, so it may discard members.
    """

    __slots__ = ("_look", "_loop", "_members", "_period", "_timer", "_trio")

    def __init__(self, limit: float, look: Callable[[list[tuple[K, V]]], None]) -> None:
        self._period = min(_MAX_PERIOD, limit / 4)
        self._look = look
        self._members: dict[K, V] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._trio: object | None = None  # the trio run whose system task looks

    def add(self, key: K, value: V) -> None:
        self._members[key] = value
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: trio
            self._arm_trio()
            return
        if self._timer is not None and self._loop is not loop:
            # Used from a new event loop: the old loop's timer may never fire.
            if self._loop is not None and not self._loop.is_closed():
                self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._loop = loop
            self._arm(loop)

    def discard(self, key: K) -> None:
        self._members.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    @property
    def busy(self) -> bool:
        """Whether there are members (the timer is armed, or about to be)."""
        return bool(self._members)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        # An empty context: not a copy of the first request's context variables.
        context = contextvars.Context()
        self._timer = loop.call_later(self._period, self._run, loop, context=context)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._members:
            self._look_safely()
        if self._members and not loop.is_closed():
            self._arm(loop)

    def _look_safely(self) -> None:
        # One member's failure must not stop the looks at all the others.
        try:
            self._look(list(self._members.items()))
        except Exception:
            logger.exception("a timer's look failed")

    def _arm_trio(self) -> None:
        import trio

        token = trio.lowlevel.current_trio_token()
        if self._trio is token:
            return  # this run's system task is looking already
        self._trio = token
        trio.lowlevel.spawn_system_task(self._run_trio, token, context=contextvars.Context())

    async def _run_trio(self, token: object) -> None:
        import trio

        while self._trio is token:
            await trio.sleep(self._period)
            if self._trio is not token:
                return  # armed again by a newer run
            if self._members:
                self._look_safely()
            if not self._members:
                self._trio = None
                return
