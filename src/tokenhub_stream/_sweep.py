"""One timer for many streams: what the proxy checks of every open stream every so often.

Two limits need a look at each open stream now and then: the upstream read timeout (has
this reader waited too long?) and the keep-alive interval (has this client heard nothing
for too long?). A timer or a sleeping task per stream cost about 0.5 and 1.5 KiB of every
open stream (docs/performance.md). `Sweep` keeps the members of one event loop in a dict
and looks at all of them on one timer, armed only while there are members: a limit of
`limit` seconds is noticed between `limit` and `limit + min(limit / 4, 1 s)`.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Sweep"]

K = TypeVar("K")
V = TypeVar("V")

_MAX_PERIOD = 1.0


class Sweep(Generic[K, V]):
    """Calls `look(members)` every `min(limit / 4, 1)` seconds while there are members.

    `look` gets a snapshot list of `(key, value)` pairs, so it may discard members.
    """

    __slots__ = ("_look", "_loop", "_members", "_period", "_timer")

    def __init__(self, limit: float, look: Callable[[list[tuple[K, V]]], None]) -> None:
        self._period = min(_MAX_PERIOD, limit / 4)
        self._look = look
        self._members: dict[K, V] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, key: K, value: V) -> None:
        self._members[key] = value
        loop = asyncio.get_running_loop()
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

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        # An empty context: not a copy of the first request's context variables.
        context = contextvars.Context()
        self._timer = loop.call_later(self._period, self._run, loop, context=context)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._members:
            self._look(list(self._members.items()))
        if self._members and not loop.is_closed():
            self._arm(loop)
