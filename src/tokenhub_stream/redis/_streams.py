"""Resumable streams on Redis Streams, so a resume can reach any worker or machine.

Per stream two keys: `<prefix><id>` is a Redis Stream holding the tagged events (entry id
`0-<event id>`, field `d`) and, last, an end marker (an entry with field `end`, id `*`);
`<prefix><id>:meta` is a hash with the owner and the ended flag. While the stream is live
both expire `live_ttl` seconds after their last refresh (a worker that died mid-stream
leaves nothing behind for long), and `ttl` seconds after the end.

Per upstream chunk the relaying worker sends one `XADD` (a plain command, not a pipeline,
for a chunk of one event); the expiry is refreshed only every `live_ttl / 4` seconds. The
cost is measured in docs/proxy.md ("Stream buffers").

A resume reads the kept events with `XREAD` from `0-<Last-Event-ID>`, then blocks in
`XREAD BLOCK` for the live ones, so it may run in another process than the upstream call.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import Self

import anyio

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub_stream.redis needs redis-py: pip install 'tokenhub_stream[redis]'"
    ) from exc

from .._proxy_resume import StreamInfo

__all__ = ["RedisStreamBuffer"]

DEFAULT_STREAM_PREFIX = "tokenhub:stream:"
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_LIVE_TTL = 900.0
DEFAULT_REDIS_TIMEOUT = 1.0
#: Longest single `XREAD BLOCK`; between two, the reader checks the stream still exists.
_BLOCK = 4.0  # below redis-py's default socket_timeout (5 s) of a client passed in
_BATCH = 256
#: Streams whose expiry this process refreshes, at most this many remembered at once.
_MAX_REFRESH_ENTRIES = 100_000


class RedisStreamBuffer:
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
        timeout: the limit of each Redis command (not of the blocking reads).

    Raises:
        ValueError: a non-positive option, or a client that decodes responses.
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
    ) -> None:
        if max_events < 1 or live_ttl <= 0 or timeout <= 0:
            raise ValueError("max_events, live_ttl and timeout must be positive")
        if isinstance(connection, str):
            # No socket timeout: each command is bounded here, and XREAD BLOCK waits longer.
            self._redis: aioredis.Redis = aioredis.Redis.from_url(
                connection, socket_timeout=None, socket_connect_timeout=timeout
            )
            self._owns_client = True
        elif isinstance(connection, aioredis.Redis):
            if connection.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError("RedisStreamBuffer needs a client with decode_responses off")
            self._redis = connection
            self._owns_client = False
        else:
            raise TypeError("connection must be a redis:// URL or a redis.asyncio.Redis")
        self.prefix = prefix
        self.max_events = max_events
        self.live_ttl = live_ttl
        self.timeout = timeout
        # stream id -> when this process last refreshed its keys' expiry (monotonic).
        self._refreshed: dict[str, float] = {}

    def __repr__(self) -> str:
        # No URL: it may carry a password.
        return f"RedisStreamBuffer(prefix={self.prefix!r}, max_events={self.max_events!r})"

    async def aclose(self) -> None:
        """Close the Redis connection pool, if this object created it from a URL."""
        if self._owns_client:
            await self._redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *args: object) -> None:
        await self.aclose()

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
        cursor = f"0-{after}".encode()
        heard = time.monotonic()
        checked = False
        while True:
            left = idle - (time.monotonic() - heard)
            if left <= 0:
                raise TimeoutError("the stream went silent")
            # Without anything new, check the stream still exists before blocking on it.
            block = min(_BLOCK, left) if checked else 0.0
            try:
                with anyio.fail_after(block + self.timeout):
                    found = await self._redis.xread(
                        {key: cursor}, count=_BATCH, block=int(block * 1000) or None
                    )
                entries = _entries(found)
                if not entries:
                    with anyio.fail_after(self.timeout):
                        exists = await self._redis.exists(meta)
            except TimeoutError:
                raise RedisError("Redis did not answer in time") from None
            if not entries:
                if not exists:
                    raise LookupError("the stream expired")
                checked = True
                continue
            checked = False
            heard = time.monotonic()
            for entry_id, fields in entries:
                if b"end" in fields:
                    return
                yield int(entry_id.partition(b"-")[2]), fields[b"d"]
                cursor = entry_id


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
