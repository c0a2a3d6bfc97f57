"""The watchdog's lock is re-entrant: a dropped stream's finalizer may run under it.

A stream dropped without being closed shuts its socket down from a weakref callback
(`StreamTimer.shutdown`, which stops the timer under the watchdog's lock). The garbage
collector runs such callbacks wherever it happens to run: also in a thread that holds that
lock at that moment (the watchdog's own thread in its loop, or a client's in `watch()`),
when the dropped stream was part of a reference cycle. With a plain lock that thread
deadlocked, and with it every later stream of the process (seen as test workers that hung
until their timeout).
"""

from __future__ import annotations

import gc
import socket
import threading
import weakref

from tokenhub_stream._chunks import ChunkParser
from tokenhub_stream._watchdog import StreamTimer, watchdog


def test_watchdog_a_timer_stops_inside_the_watchdogs_lock() -> None:
    # What a finalizer run by the garbage collector under the lock does.
    left, right = socket.socketpair()
    timer = StreamTimer(ChunkParser(), first_token=60.0, idle=60.0)
    try:
        assert timer.watch(_HasSocket(left), None)
        done = threading.Event()

        def finalizer_under_the_lock() -> None:
            with watchdog.lock:
                timer.shutdown()
            done.set()

        thread = threading.Thread(target=finalizer_under_the_lock, daemon=True)
        thread.start()
        assert done.wait(5), "stopping a timer inside the watchdog's lock deadlocked"
        assert right.recv(1) == b""  # the socket was shut down: the peer sees the end
    finally:
        left.close()
        right.close()


def test_watchdog_a_cycle_collected_under_the_lock_shuts_its_stream_down() -> None:
    # The same through the garbage collector itself: a timer whose only owner is a cycle
    # with a weakref callback that shuts it down, collected while the lock is held.
    left, right = socket.socketpair()
    timer = StreamTimer(ChunkParser(), first_token=60.0, idle=60.0)
    try:
        assert timer.watch(_HasSocket(left), None)
        done = threading.Event()

        def collect_under_the_lock() -> None:
            owner = _Cycle()
            owner.me = owner
            weakref.finalize(owner, timer.shutdown)
            del owner
            with watchdog.lock:
                gc.collect()
            done.set()

        thread = threading.Thread(target=collect_under_the_lock, daemon=True)
        thread.start()
        assert done.wait(5), "a finalizer run by the collector under the lock deadlocked"
        assert right.recv(1) == b""
    finally:
        left.close()
        right.close()


class _Cycle:
    me: object


class _HasSocket:
    """What the engine's responses give the watchdog: their socket, by name."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, name: str) -> object:
        return self._sock if name == "socket" else None
