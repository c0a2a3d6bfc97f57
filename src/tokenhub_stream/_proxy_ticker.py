"""Keep-alive comments for the native relay: one task per event loop, not one per stream.

A task per open stream that sleeps until its stream has been silent for the interval cost
about 1.5 KiB per stream (its coroutine, its task and its timer). `KeepaliveTicker` keeps a
dict of the open streams instead and wakes a few times per interval; a stream silent for
the whole interval gets its comment from a short task started then, and stops only a few
times a minute. The relay removes its stream when it ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .asgi import Send, _Turn

__all__ = ["KeepaliveTicker"]

logger = logging.getLogger("tokenhub_stream.asgi")

# At most this long between two looks: a comment goes out between `interval` and
# `interval + tick` seconds after the last write.
_MAX_TICK = 1.0


class KeepaliveTicker:
    """Sends `: keep-alive` to the streams of one event loop that fell silent."""

    def __init__(
        self, send_one: Callable[[Send, _Turn], Coroutine[Any, Any, None]], interval: float
    ) -> None:
        self._send_one = send_one
        self._interval = interval
        self._tick = min(_MAX_TICK, interval / 4)
        self._streams: dict[_Turn, Send] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, turn: _Turn, send: Send) -> None:
        self._streams[turn] = send
        if self._task is None:
            # Its own empty context: not a copy of the first request's context variables.
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._run(), context=contextvars.Context())

    def discard(self, turn: _Turn) -> None:
        self._streams.pop(turn, None)

    async def _run(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            streams = self._streams
            while streams:
                await asyncio.sleep(self._tick)
                due = time.monotonic() - self._interval
                for turn, send in list(streams.items()):
                    if turn.last_write > due or turn.client_gone:
                        continue
                    if turn.writing or turn.ticker_task is not None and not turn.ticker_task.done():
                        continue  # the relay is writing; look again next tick
                    turn.ticker_task = loop.create_task(self._send(send, turn))
        finally:
            self._task = None

    async def _send(self, send: Send, turn: _Turn) -> None:
        if turn.writing or turn.client_gone:
            return  # the relay began a write since the last look: no comment needed
        try:
            await self._send_one(send, turn)
        except Exception as exc:  # a gone client: the relay's watcher sees it
            logger.debug("keep-alive not sent: %s", type(exc).__name__)
