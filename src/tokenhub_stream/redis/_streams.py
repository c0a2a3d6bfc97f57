"""Resumable streams on Redis Streams, so a resume can reach any worker or machine.

Per stream two keys: `<prefix><id>` is a Redis Stream holding the tagged events (entry id
`0-<event id>`, field `d`) and, last, an end marker (an entry with field `end`, id `*`);
`<prefix><id>:meta` is a hash with the owner and the ended flag. While the stream is live
both expire `live_ttl` seconds after their last refresh (a worker that died mid-stream
leaves nothing behind for long), and `ttl` seconds after the end.

Per upstream chunk the relaying worker sends one `XADD` (a plain command, not a pipeline,
for a chunk of one event); the expiry is refreshed only every `live_ttl / 4` seconds. The
cost is measured in docs/proxy.md ("Stream buffers").

A resume reads the kept events with `XREAD` from `0-<Last-Event-ID>`, then waits for the
live ones, so it may run in another process than the upstream call. Waiting readers hold
no Redis connection each: one task per process (`_Tailer`) blocks in a single
`XREAD BLOCK` on every stream its readers wait on and wakes those whose stream moved; they
then fetch the new entries with a plain `XREAD`. (One blocking read per waiting reader let
80 resumes exhaust a Redis with `maxclients 60`, issue #14.) From a URL the connection pool
is bounded (`max_connections`, waiting at most `timeout` for a free connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence

import anyio

from ..asgi._buffers import StreamInfo
from ._connection import RedisBacked, RedisError, aioredis

__all__ = ["RedisStreamBuffer"]

DEFAULT_STREAM_PREFIX = "tokenhub:stream:"
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_LIVE_TTL = 900.0
DEFAULT_REDIS_TIMEOUT = 1.0
#: Connections a `RedisStreamBuffer` made from a URL opens at most (per process).
DEFAULT_MAX_CONNECTIONS = 32
#: Longest single `XREAD BLOCK`; between two, the reader checks the stream still exists.
_BLOCK = 4.0  # below redis-py's default socket_timeout (5 s) of a client passed in
_BATCH = 256
#: Streams whose expiry this process refreshes, at most this many remembered at once.
_MAX_REFRESH_ENTRIES = 100_000
#: How long the wake-up stream of a `_Tailer` outlives its last use, in ms.
_WAKE_TTL_MS = 60_000

logger = logging.getLogger("tokenhub_stream.redis")


class RedisStreamBuffer(RedisBacked):
    """A `StreamBuffer` on Redis Streams, shared by every proxy process using that Redis.

    ```python
    from tokenhub_stream.redis import RedisStreamBuffer

    buffer = RedisStreamBuffer("redis://localhost:6379/0")
    proxy = ChatProxy(api_key=key, base_url=url, stream_buffer=buffer, resume_ttl=300)
    ```

    Args:
        connection: a `redis://` URL (this object owns the connection pool and `aclose()`
            closes it), or a `redis.asyncio.Redis` you own, made with `decode_responses`
            off and a `socket_timeout` above 4 s or none (redis-py's default, 5 s, is fine):
            a resume blocks in `XREAD` for up to 4 s at a time.
        prefix: the key prefix.
        max_events: events kept per stream (`XADD MAXLEN ~`, so about that many); a resume
            from before the oldest kept one gets 410.
        live_ttl: seconds a live stream's keys outlive its last event.
        timeout: the limit of each Redis command (not of the blocking reads), waiting for
            a free connection included.
        max_connections: the most connections to Redis this object opens, when made from
            a URL (a client you pass keeps its own pool: bound it with
            `redis.asyncio.BlockingConnectionPool`). However many resumes wait, they share
            one of them; at least 2.

    Raises:
        ValueError: a non-positive option, `max_connections` below 2, or a client that
            decodes responses.
        TypeError: `connection` is neither a URL nor a `redis.asyncio.Redis`.
    """

    def __init__(
        self,
        connection: str | aioredis.Redis,
        *,
        prefix: str = DEFAULT_STREAM_PREFIX,
        max_events: int = DEFAULT_MAX_EVENTS,
        live_ttl: float = DEFAULT_LIVE_TTL,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_events < 1 or live_ttl <= 0 or timeout <= 0:
            raise ValueError("max_events, live_ttl and timeout must be positive")
        if isinstance(max_connections, bool) or max_connections < 2:
            # One of them is the shared blocking read's for up to 4 s at a time.
            raise ValueError("max_connections must be at least 2")
        if isinstance(connection, aioredis.Redis) and _decodes(connection):
            raise ValueError("RedisStreamBuffer needs a client with decode_responses off")
        # No socket timeout: each command is bounded here, and XREAD BLOCK waits longer.
        super().__init__(
            connection, max_connections=max_connections, timeout=timeout, socket_timeout=None
        )
        self.prefix = prefix
        self.max_events = max_events
        self.live_ttl = live_ttl
        self.timeout = timeout
        self.max_connections = max_connections
        # stream id -> when this process last refreshed its keys' expiry (monotonic).
        self._refreshed: dict[str, float] = {}
        wake = f"{prefix}wake:{secrets.token_urlsafe(12)}"
        self._tailer = _Tailer(self._redis, wake.encode(), timeout)

    def __repr__(self) -> str:
        # No URL: it may carry a password.
        return f"RedisStreamBuffer(prefix={self.prefix!r}, max_events={self.max_events!r})"

    async def aclose(self) -> None:
        """Stop the shared read; close the connection pool, if this object made it from a URL."""
        await self._tailer.aclose()
        await super().aclose()

    def _keys(self, stream_id: str) -> tuple[str, str]:
        key = self.prefix + stream_id
        return key, key + ":meta"

    async def _execute(self, pipe: aioredis.client.Pipeline) -> list[object]:
        try:
            with anyio.fail_after(self.timeout):
                return list(await pipe.execute())
        except TimeoutError:
            # Never a bare TimeoutError: to `read`'s caller that means "the stream is silent".
            raise RedisError("Redis did not answer in time") from None

    def _refresh_due(self, stream_id: str, *, peek: bool = False) -> bool:
        now = time.monotonic()
        last = self._refreshed.get(stream_id)
        if last is not None and now - last < self.live_ttl / 4:
            return False
        if peek:
            return True
        if last is None and len(self._refreshed) >= _MAX_REFRESH_ENTRIES:
            self._refreshed.pop(next(iter(self._refreshed)))
        self._refreshed[stream_id] = now
        return True

    async def create(self, stream_id: str, owner: str) -> None:
        events, meta = self._keys(stream_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(events)
        pipe.hset(meta, mapping={"owner": owner, "ended": 0})
        pipe.pexpire(meta, _ms(self.live_ttl))
        await self._execute(pipe)
        self._refreshed[stream_id] = time.monotonic() - self.live_ttl  # due at the first event

    async def append(self, stream_id: str, events: Sequence[tuple[int, bytes]]) -> None:
        if not events:
            return
        key, meta = self._keys(stream_id)
        if len(events) == 1 and not self._refresh_due(stream_id, peek=True):
            # The usual case, one event per upstream chunk: a plain command, cheaper for
            # redis-py than a pipeline of one.
            ((event_id, data),) = events
            try:
                with anyio.fail_after(self.timeout):
                    await self._redis.xadd(
                        key,
                        {"d": data},
                        id=f"0-{event_id}",
                        maxlen=self.max_events,
                        approximate=True,
                    )
            except TimeoutError:
                raise RedisError("Redis did not answer in time") from None
            return
        pipe = self._redis.pipeline(transaction=False)
        for event_id, data in events:
            pipe.xadd(
                key, {"d": data}, id=f"0-{event_id}", maxlen=self.max_events, approximate=True
            )
        if self._refresh_due(stream_id):
            pipe.pexpire(key, _ms(self.live_ttl))
            pipe.pexpire(meta, _ms(self.live_ttl))
        await self._execute(pipe)

    async def end(self, stream_id: str, ttl: float) -> None:
        key, meta = self._keys(stream_id)
        self._refreshed.pop(stream_id, None)
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(key, {"end": "1"})  # id `*`: after every `0-n`, wakes the XREAD BLOCKs
        pipe.hset(meta, "ended", 1)
        pipe.pexpire(key, _ms(ttl))
        pipe.pexpire(meta, _ms(ttl))
        await self._execute(pipe)

    async def info(self, stream_id: str) -> StreamInfo | None:
        key, meta = self._keys(stream_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(meta)
        pipe.xrange(key, "-", "+", count=1)
        pipe.xrevrange(key, "+", "-", count=2)  # the last event, and the end marker if any
        fields, first, newest = await self._execute(pipe)
        if not isinstance(fields, dict) or b"owner" not in fields:
            return None
        last = 0
        for entry_id, _ in newest if isinstance(newest, list) else ():
            ms, _, seq = entry_id.partition(b"-")
            if ms == b"0":
                last = int(seq)
                break
        first_id = last + 1  # nothing kept (or only the end marker)
        if isinstance(first, list) and first:
            ms, _, seq = first[0][0].partition(b"-")
            if ms == b"0":
                first_id = int(seq)
        return StreamInfo(
            owner=fields[b"owner"].decode(),
            first_id=min(first_id, last + 1) if last else 1,
            last_id=last,
            ended=fields.get(b"ended") == b"1",
        )

    async def read(
        self, stream_id: str, after: int, *, idle: float
    ) -> AsyncIterator[tuple[int, bytes]]:
        key, meta = self._keys(stream_id)
        watched = key.encode()
        cursor = f"0-{after}".encode()
        heard = time.monotonic()
        check = True  # whether the stream must be seen to exist before waiting on it
        while True:
            try:
                with anyio.fail_after(self.timeout):
                    entries = _entries(await self._redis.xread({key: cursor}, count=_BATCH))
                    if not entries and check:
                        if not await self._redis.exists(meta):
                            raise LookupError("the stream expired")
            except TimeoutError:
                # Never a bare TimeoutError: to the caller that means "the stream is silent".
                raise RedisError("Redis did not answer in time") from None
            if entries:
                heard = time.monotonic()
                for entry_id, fields in entries:
                    if b"end" in fields:
                        return
                    yield int(entry_id.partition(b"-")[2]), fields[b"d"]
                    cursor = entry_id
                if len(entries) == _BATCH:
                    continue  # more may be kept already
            left = idle - (time.monotonic() - heard)
            if left <= 0:
                raise TimeoutError("the stream went silent")
            # A wait that ends without news (after at most _BLOCK) looks again, and checks
            # that the stream still exists, on this reader's own short commands.
            check = not await self._tailer.wait(watched, cursor, min(_BLOCK, left))


class _Watch:
    """The readers of one stream waiting in this process, and the last entry seen of it."""

    __slots__ = ("cursor", "moved", "readers")

    def __init__(self, cursor: bytes) -> None:
        self.cursor = cursor
        self.moved = anyio.Event()
        self.readers = 0


class _Tailer:
    """One `XREAD BLOCK` for every stream this process's resumes wait on (see the module
    docstring): readers register a stream and the last entry id they hold; one task blocks
    on all of those streams at once and wakes a stream's readers when it moves.

    A reader that starts watching a stream the blocked read does not cover writes to a
    wake-up stream of this object's own, which is part of every read: the read returns at
    once and starts again with the new stream.
    """

    def __init__(self, redis: aioredis.Redis, wake_key: bytes, timeout: float) -> None:
        self._redis = redis
        self._wake_key = wake_key
        self._wake_cursor = b"0-0"
        self._timeout = timeout
        self._watches: dict[bytes, _Watch] = {}
        # The streams of the XREAD BLOCK in flight (None: none in flight).
        self._blocked_on: frozenset[bytes] | None = None
        self._woken = False
        # redis.asyncio runs on asyncio only, and this task outlives the reader that
        # started it (it serves every reader of the process): a plain asyncio task.
        self._task: asyncio.Task[None] | None = None
        self._failures = 0

    async def wait(self, key: bytes, cursor: bytes, timeout: float) -> bool:
        """Wait up to `timeout` for an entry after `cursor` in `key`; `True` if one came."""
        watch = self._watches.get(key)
        if watch is None:
            watch = self._watches[key] = _Watch(cursor)
        elif _after(watch.cursor, cursor):
            return True  # the shared read saw a newer entry already
        elif _after(cursor, watch.cursor):
            # This reader holds entries the watch has not seen: news to those waiting on it.
            watch.cursor = cursor
            moved, watch.moved = watch.moved, anyio.Event()
            moved.set()
        moved = watch.moved
        watch.readers += 1
        try:
            await self._cover(key)
            with anyio.move_on_after(timeout):
                await moved.wait()
            return moved.is_set()
        finally:
            watch.readers -= 1
            if not watch.readers and self._watches.get(key) is watch:
                del self._watches[key]

    async def _cover(self, key: bytes) -> None:
        # Make sure the shared read covers `key`: start it, or wake the one in flight.
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
            return
        blocked = self._blocked_on
        if blocked is None or key in blocked or self._woken:
            return  # the next read includes it
        self._woken = True
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
        pipe.pexpire(self._wake_key, _WAKE_TTL_MS)
        try:
            with anyio.fail_after(self._timeout):
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            # The reader still looks again after its wait (at most _BLOCK): late, not lost.
            logger.warning("could not wake the shared stream read: %s", type(exc).__name__)

    async def _run(self) -> None:
        try:
            while self._watches:
                streams = {self._wake_key: self._wake_cursor}
                streams.update((key, watch.cursor) for key, watch in self._watches.items())
                self._blocked_on = frozenset(self._watches)
                self._woken = False
                try:
                    with anyio.fail_after(_BLOCK + self._timeout):
                        found = await self._redis.xread(
                            streams,  # type: ignore[arg-type]
                            count=1,
                            block=int(_BLOCK * 1000),
                        )
                except (RedisError, OSError, TimeoutError) as exc:
                    # The readers look again on their own after each wait meanwhile.
                    self._failures += 1
                    if self._failures == 1:
                        logger.warning("the shared stream read failed: %s", type(exc).__name__)
                    await anyio.sleep(min(_BLOCK, 0.1 * 2**self._failures))
                    continue
                finally:
                    self._blocked_on = None
                self._failures = 0
                for key, entries in _entries_by_key(found).items():
                    last = entries[-1][0]
                    if key == self._wake_key:
                        self._wake_cursor = last
                        continue
                    watch = self._watches.get(key)
                    if watch is not None and _after(last, watch.cursor):
                        watch.cursor = last
                        moved, watch.moved = watch.moved, anyio.Event()
                        moved.set()
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _after(entry: bytes, cursor: bytes) -> bool:
    """Whether stream entry id `entry` comes after `cursor` (both `ms-seq`)."""
    ems, _, eseq = entry.partition(b"-")
    cms, _, cseq = cursor.partition(b"-")
    return (int(ems), int(eseq or 0)) > (int(cms), int(cseq or 0))


def _entries_by_key(found: object) -> dict[bytes, list[tuple[bytes, dict[bytes, bytes]]]]:
    # RESP2: [[key, [(id, fields), ...]], ...]; RESP3: {key: [[(id, fields), ...]], ...}.
    if not found:
        return {}
    if isinstance(found, dict):
        out = {}
        for key, value in found.items():
            out[key] = list(value[0] if value and isinstance(value[0], list) else value)
        return out
    assert isinstance(found, list)
    return {key: list(entries) for key, entries in found}


def _decodes(client: aioredis.Redis) -> bool:
    return bool(client.connection_pool.connection_kwargs.get("decode_responses"))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _entries(found: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    # RESP2: [[key, [(id, fields), ...]]]; RESP3: {key: [[(id, fields), ...]]}.
    if not found:
        return []
    if isinstance(found, dict):
        values = list(found.values())
        if not values:
            return []
        value = values[0]
        return list(value[0] if value and isinstance(value[0], list) else value)
    assert isinstance(found, list)
    return list(found[0][1])
