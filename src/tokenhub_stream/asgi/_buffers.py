"""Resumable streams' storage: the `StreamBuffer` protocol, `InMemoryStreamBuffer`, and
`ResumableStream`, which tags a live stream's events with ids and keeps them in a buffer.

Opt-in per request: a POST with `X-Resumable: 1` to a proxy built with `resumable=True`
(or a `stream_buffer=`) gets an `X-Stream-Id` header, and every event the proxy forwards
carries an `id:` line with its sequence number (1, 2, 3, ...). The tagged events go to a
`StreamBuffer` before they are written to the client, so any id a client has seen is in
the buffer; `_resume.py` serves `GET <mount>/streams/{id}` from it. Plain requests are
untouched: their bytes stay exactly the upstream's.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import anyio

from ._wire import EVENT_BOUNDARY, error_frame

__all__ = ["InMemoryStreamBuffer", "StreamBuffer", "StreamInfo"]


class Stoppable(Protocol):
    """The turn a resumable stream belongs to, as `stop()` sees it (`_turn.Turn`)."""

    def stop(self) -> None: ...


logger = logging.getLogger("tokenhub_stream.asgi")

#: How long a finished stream's events stay resumable, in seconds.
DEFAULT_RESUME_TTL = 300.0


#: `InMemoryStreamBuffer` defaults: at most about 1,000 x 256 KiB = 250 MiB per process.
DEFAULT_MAX_STREAMS = 1000


DEFAULT_MAX_STREAM_BYTES = 256 * 1024


DEFAULT_MAX_STREAMS_PER_OWNER = 16


# What one kept event costs beyond its bytes: the tuple, the bytes and int objects' headers,
# the deque slot (measured with tracemalloc: about 130 bytes for a 170-byte event).
_EVENT_OVERHEAD = 128


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a `StreamBuffer` knows of one stream.

    `first_id` is the lowest event id still kept (ids start at 1; a buffer that trimmed the
    oldest events of a long stream reports a higher one), `last_id` the highest appended
    (0 before the first), `ended` whether the end marker was written.
    """

    owner: str
    first_id: int
    last_id: int
    ended: bool


@runtime_checkable
class StreamBuffer(Protocol):
    """Where `ChatProxy` keeps the events of resumable streams.

    The proxy calls `create` once when a resumable stream starts, `append` with the tagged
    events of each upstream chunk (ids consecutive, in order) before it writes them to the
    client, and `end` once when the stream is over (also when it failed or was cut), after
    which the stream may be forgotten `ttl` seconds later. `read` serves a resume.

    ```python
    proxy = ChatProxy(api_key=key, base_url=url, stream_buffer=InMemoryStreamBuffer())
    ```

    Implementations: `InMemoryStreamBuffer` (one process) and
    `tokenhub_stream.redis.RedisStreamBuffer` (Redis Streams, shared by every process).
    """

    async def create(self, stream_id: str, owner: str) -> None:
        """Register a new, live stream belonging to `owner`."""
        ...

    async def append(self, stream_id: str, events: Sequence[tuple[int, bytes]]) -> None:
        """Keep `events` (`(id, bytes)` pairs, ids consecutive) and wake the readers."""
        ...

    async def end(self, stream_id: str, ttl: float) -> None:
        """Write the end marker; the stream may be forgotten `ttl` seconds from now."""
        ...

    async def info(self, stream_id: str) -> StreamInfo | None:
        """The stream's owner and ids, or `None` if it is unknown or expired."""
        ...

    def read(self, stream_id: str, after: int, *, idle: float) -> AsyncIterator[tuple[int, bytes]]:
        """Yield the events with an id above `after`, then the live ones, until the end marker.

        Raises `LookupError` if the stream disappears meanwhile (expired, evicted), and
        `TimeoutError` if the stream is live but nothing arrived for `idle` seconds.
        """
        ...


class _MemoryStream:
    __slots__ = ("changed", "ended", "events", "expires", "first_id", "last_id", "owner", "size")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.events: deque[tuple[int, bytes]] = deque()
        self.size = 0
        self.first_id = 1
        self.last_id = 0
        self.ended = False
        self.expires: float | None = None
        self.changed: anyio.Event | None = None

    def wake(self) -> None:
        changed, self.changed = self.changed, None
        if changed is not None:
            changed.set()


class StreamBufferFull(RuntimeError):
    """Raised by `InMemoryStreamBuffer.create` when every kept stream is another owner's, live.

    The proxy then relays the stream without `X-Stream-Id` (not resumable), as for any
    buffer that fails to create one.
    """


class InMemoryStreamBuffer:
    """Resumable streams in this process's memory: the default of `ChatProxy(resumable=True)`.

    ```python
    proxy = ChatProxy(api_key=key, base_url=url,
                      stream_buffer=InMemoryStreamBuffer(max_streams=500))
    ```

    Bounded, and one owner cannot push out another's streams:

    - at most `max_streams_per_owner` streams per owner (the `authorize` principal, else
      the client address); a new one beyond that forgets the owner's own oldest stream
      (a finished one first);
    - at most `max_streams` in all; a new one beyond that forgets the stream that finished
      first, else the owner's own oldest. A live stream is never forgotten for another
      owner's new one: when every kept stream is live and someone else's, `create` raises
      a `RuntimeError` and the proxy relays the new stream without `X-Stream-Id`;
    - at most `max_stream_bytes` per stream, counting 128 bytes of bookkeeping per event
      (its oldest events are dropped first; a resume from before them gets 410).

    So the buffer holds at most about `max_streams` x `max_stream_bytes` per process: 250 MiB
    with the defaults (1,000 x 256 KiB), 4 MiB per owner. Finished streams are forgotten
    after the proxy's `resume_ttl`. One process only: a resume must reach the worker that
    ran the stream; use `RedisStreamBuffer` behind several workers.

    Args:
        max_streams: streams kept at once.
        max_stream_bytes: bytes of events kept per stream.
        max_streams_per_owner: streams kept at once per owner.

    Raises:
        ValueError: a non-positive bound.
    """

    def __init__(
        self,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_stream_bytes: int = DEFAULT_MAX_STREAM_BYTES,
        max_streams_per_owner: int = DEFAULT_MAX_STREAMS_PER_OWNER,
    ) -> None:
        if max_streams < 1 or max_stream_bytes < 1 or max_streams_per_owner < 1:
            raise ValueError(
                "max_streams, max_stream_bytes and max_streams_per_owner must be positive"
            )
        self.max_streams = max_streams
        self.max_stream_bytes = max_stream_bytes
        self.max_streams_per_owner = max_streams_per_owner
        self._streams: OrderedDict[str, _MemoryStream] = OrderedDict()
        # Per owner, their streams' ids, oldest first; and every finished stream, in the
        # order they finished: what may be forgotten for someone else's new stream.
        self._owned: dict[str, OrderedDict[str, None]] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._swept = 0.0

    def __repr__(self) -> str:
        return (
            f"InMemoryStreamBuffer(max_streams={self.max_streams!r}, "
            f"max_stream_bytes={self.max_stream_bytes!r}, "
            f"max_streams_per_owner={self.max_streams_per_owner!r}, "
            f"streams={len(self._streams)})"
        )

    def __len__(self) -> int:
        self._sweep(force=True)
        return len(self._streams)

    def _sweep(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._swept < 1.0:
            return
        self._swept = now
        gone = [k for k, s in self._streams.items() if s.expires is not None and s.expires <= now]
        for key in gone:
            self._forget(key)

    def _forget(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id)
        owned = self._owned.get(stream.owner)
        if owned is not None:
            owned.pop(stream_id, None)
            if not owned:
                del self._owned[stream.owner]
        self._finished.pop(stream_id, None)
        stream.wake()

    def _get(self, stream_id: str) -> _MemoryStream | None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream.expires is not None and stream.expires <= time.monotonic():
            self._forget(stream_id)
            return None
        return stream

    def _own_oldest(self, owned: OrderedDict[str, None]) -> str:
        # The owner's oldest finished stream, else their oldest.
        return next((k for k in owned if k in self._finished), next(iter(owned)))

    async def create(self, stream_id: str, owner: str) -> None:
        self._sweep()
        if stream_id in self._streams:
            self._forget(stream_id)
        owned = self._owned.get(owner)
        if owned is not None and len(owned) >= self.max_streams_per_owner:
            self._forget(self._own_oldest(owned))
        if len(self._streams) >= self.max_streams:
            # Full: the first stream to finish goes, else the owner's own oldest; another
            # owner's live stream never does.
            if self._finished:
                self._forget(next(iter(self._finished)))
            elif owned:
                self._forget(self._own_oldest(owned))
            else:
                raise StreamBufferFull("every kept stream is live and another owner's")
        self._streams[stream_id] = _MemoryStream(owner)
        self._owned.setdefault(owner, OrderedDict())[stream_id] = None

    async def append(self, stream_id: str, events: Sequence[tuple[int, bytes]]) -> None:
        stream = self._get(stream_id)
        if stream is None or stream.ended:
            return
        for event_id, data in events:
            stream.events.append((event_id, data))
            stream.size += len(data) + _EVENT_OVERHEAD
            stream.last_id = event_id
        while stream.size > self.max_stream_bytes and len(stream.events) > 1:
            _, dropped = stream.events.popleft()
            stream.size -= len(dropped) + _EVENT_OVERHEAD
            stream.first_id = stream.events[0][0]
        stream.wake()

    async def end(self, stream_id: str, ttl: float) -> None:
        stream = self._get(stream_id)
        if stream is None:
            return
        stream.ended = True
        stream.expires = time.monotonic() + ttl
        self._finished[stream_id] = None
        stream.wake()

    async def info(self, stream_id: str) -> StreamInfo | None:
        stream = self._get(stream_id)
        if stream is None:
            return None
        return StreamInfo(stream.owner, stream.first_id, stream.last_id, stream.ended)

    async def read(
        self, stream_id: str, after: int, *, idle: float
    ) -> AsyncIterator[tuple[int, bytes]]:
        cursor = after
        while True:
            stream = self._get(stream_id)
            if stream is None or self._streams.get(stream_id) is not stream:
                raise LookupError("the stream expired")
            # Events are consecutive: the one after `cursor` sits at a known offset.
            start = max(0, cursor + 1 - stream.first_id)
            batch = [stream.events[i] for i in range(start, len(stream.events))]
            for event in batch:
                yield event
                cursor = event[0]
            if batch:
                continue  # the reader may have been slow: look again before waiting
            if stream.ended:
                return
            if stream.changed is None:
                stream.changed = anyio.Event()
            changed = stream.changed
            with anyio.move_on_after(idle) as waited:
                await changed.wait()
            if waited.cancelled_caught:
                raise TimeoutError("the stream went silent")


def tag_events(data: bytes, next_id: int) -> list[tuple[int, bytes]]:
    """Split `data` (whole events, as `EventSplitter` hands them out) and give each an `id:`.

    The `id:` line goes just before the blank line that ends the event, so it belongs to
    the event whatever lines precede it; the event's own bytes are kept as they are.
    """
    out: list[tuple[int, bytes]] = []
    start = 0
    for match in EVENT_BOUNDARY.finditer(data):
        end = match.end()
        # The boundary is the last field line's terminator, then the blank line.
        blank = end - 2 if data[end - 2 : end] == b"\r\n" else end - 1
        event = data[start:blank] + b"id: %d\n" % next_id + data[blank:end]
        out.append((next_id, event))
        next_id += 1
        start = end
    if start < len(data):
        # The upstream's unfinished last bytes at EOF: kept as they are (a client drops an
        # unfinished event), under an id of their own so a resume replays them too.
        out.append((next_id, data[start:]))
    return out


class ResumableStream:
    """One resumable stream while the proxy relays it (created per request)."""

    __slots__ = (
        "_buffer",
        "_complete",
        "_ended",
        "_next",
        "_opened",
        "_registry",
        "_ttl",
        "_turn",
        "announced",
        "owner",
        "stream_id",
    )

    def __init__(self, buffer: StreamBuffer, owner: str, ttl: float) -> None:
        self._buffer = buffer
        self._ttl = ttl
        self.owner = owner
        self.stream_id = secrets.token_urlsafe(18)  # 144 random bits, 24 characters
        self._next = 1
        self._opened = False
        self._complete = False
        self._ended = False
        # The client got X-Stream-Id and an event: from now on a gone client means "finish".
        self.announced = False
        self._turn: Stoppable | None = None
        self._registry: dict[str, ResumableStream] | None = None

    def announce(self, turn: Stoppable, registry: dict[str, ResumableStream]) -> None:
        """The response with X-Stream-Id has started: `DELETE` may stop it from now on."""
        self._turn, self._registry = turn, registry
        registry[self.stream_id] = self

    def stop(self) -> None:
        """Stop this stream's upstream now (`DELETE <mount>/streams/{id}`: the user's Stop)."""
        if self._turn is not None:
            self._turn.stop()

    async def open(self) -> bool:
        try:
            await self._buffer.create(self.stream_id, self.owner)
        except Exception as exc:
            # The stream still flows, just not resumable (no X-Stream-Id tells the client).
            logger.warning("stream buffer failed to create a stream: %s", type(exc).__name__)
            return False
        self._opened = True
        return True

    async def tag(self, data: bytes) -> bytes:
        events = tag_events(data, self._next)
        if not events:
            return data
        # Before its first event a gone client has nothing to resume (and an Escape while
        # waiting cannot know the id yet): the usual on_disconnect policy applies until here.
        self.announced = self._turn is not None
        self._next = events[-1][0] + 1
        if self._opened:
            try:
                await self._buffer.append(self.stream_id, events)
            except Exception as exc:
                self._opened = False  # later resumes get a gap (410), never wrong text
                logger.warning("stream buffer failed to append: %s", type(exc).__name__)
        return b"".join(event for _, event in events)

    def mark_complete(self) -> None:
        """The relay ended the stream itself ([DONE], a bare close or an error frame)."""
        self._complete = True

    async def close(self) -> None:
        """Write the end marker (once); a stream cut short first gets an error frame."""
        if self._registry is not None:
            self._registry.pop(self.stream_id, None)
        if self._ended or not self._opened:
            return
        self._ended = True
        try:
            if not self._complete:
                frame = error_frame("The answer was interrupted.", code="stream_interrupted")
                await self.tag(frame)
            await self._buffer.end(self.stream_id, self._ttl)
        except Exception as exc:
            logger.warning("stream buffer failed to end a stream: %s", type(exc).__name__)
