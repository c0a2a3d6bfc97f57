"""The HTTP/1.1 engine on asyncio: a small client on httptools' C parser, the proxy's
default upstream and the client's (`AsyncClient`) on asyncio.

Measured under `benchmarks/proxy_bench.py` (docs/performance.md, "Proxy benchmark"), the
relay's per-stream cost was mostly in the client layers: aiohttp's response, stream
readers and deques held about 10 KiB per open stream, and every chunk went through its
reader's wakeups. This client is one `asyncio.Protocol` per connection and one response
object per request: `data_received` feeds the response's parser (`_h1.ResponseParser`,
the sans-IO state machine the blocking twin `_sync.py` drives too) and hands the bytes of
each read, or each chunk body, straight to the future the reader is awaiting.

What it does, and nothing more (its callers POST to a few fixed URLs):

- keep-alive pools per (scheme, host, port), each bounded by `max_connections`; requests
  wait for a free connection up to `timeout.pool`; idle connections expire after httpx's
  5 s; the host's addresses are cached for 10 s (aiohttp's default), tried in order; TLS
  with httpx's default context (certifi's bundle);
- Content-Length, chunked and close-delimited bodies, passed through undecoded (the
  callers send `Accept-Encoding: identity`, or decode themselves);
- the response head (status line and headers, interim 1xx heads included) bounded by
  `max_head_bytes` as it arrives, before the parser sees bytes past the limit: a larger
  head fails with `ResponseHeadTooLarge` and closes the socket at once, and repeated header
  names are joined once at the end of the head, so reading a head is linear in its size
  (issue #14: a flood of headers froze the worker and grew its memory without bound);
- `timeout.connect`, and `timeout.read` as an idle limit that only counts time the reader
  spends waiting, so time spent writing to a slow client is not upstream silence: one
  timer per engine looks at every open response a few times per limit (`Sweep`; a timer
  per response was 0.5 KiB of each open stream); a request may bring its own connect,
  pool and head-wait limits (`send(timeout=)`), the head waits of a pool on one timer
  armed at the earliest of them (a timer made and cancelled per request was 1 µs of it);
- back-pressure: reading pauses once `_HIGH_WATER` bytes wait unread, so a slow reader
  holds a bounded buffer;
- closing an unfinished response closes its socket at once (the upstream stops
  generating: nobody pays for tokens nobody reads); a response read to its end returns
  its connection to the pool, at once or, with `release_at_close`, when it is closed.

Errors are httpx's exception classes (`ConnectError`, `ConnectTimeout`, `PoolTimeout`,
`ReadTimeout`, `ReadError`, `RemoteProtocolError`), so every error path of a caller keeps
its status and log line. Neither the request head (it carries the key) nor any header
value appears in a repr or an exception message. A POST is never retried: a stale
keep-alive connection is an error, as with httpx and aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import cast

import httpx

from .._sweep import Sweep
from ._errors import DEFAULT_MAX_RESPONSE_HEAD_BYTES
from ._h1 import (
    BODY,
    COMPLETE,
    DNS_TTL,
    FAILED,
    HEADERS,
    KEEPALIVE_EXPIRY,
    EngineBase,
    Origin,
    ResponseParser,
    addresses,
    request_head,
)
from ._shutdown import shutdown

__all__ = ["HttpEngine", "HttpResponse"]

# Unread body bytes above which the socket stops being read until the reader catches up.
_HIGH_WATER = 64 * 1024


class HttpEngine(EngineBase["_Pool"]):
    """Keep-alive HTTP/1.1 pools, one per origin, for upstream POSTs on asyncio.

    Args:
        max_connections: open connections per origin, at most.
        timeout: connect, pool, and read: the read limit bounds the wait for the
            response head and every wait for body bytes (None: no limit).
        max_head_bytes: the largest response head read (`ResponseHeadTooLarge` beyond).
        trust_env: read `SSL_CERT_FILE`/`SSL_CERT_DIR` for the TLS context, as httpx does.
        release_at_close: a response read to its end keeps its connection until it is
            closed (for a caller that still uses the socket, as the client's watchdog
            does), instead of handing it back to the pool at once.
    """

    def _setup(self) -> None:
        read = self._timeout.read
        self._watch: Sweep[HttpResponse, None] | None = (
            None if read is None else Sweep(read, functools.partial(_expire_idle, read))
        )
        self._loop: asyncio.AbstractEventLoop | None = None

    async def send(
        self,
        url: str,
        headers: Mapping[str, str] | bytes,
        content: bytes,
        timeout: httpx.Timeout | None = None,
    ) -> HttpResponse:
        """POST `content` to `url`; return once the response's headers have arrived.

        `headers`: a mapping, or its lines as `_h1.header_lines()` encoded them (for a
        caller that sends the same headers many times). `timeout`, for this request
        only: its connect and pool limits, and its read limit for the wait for the
        response head (the engine's read limit still applies).

        Raises:
            httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout: no connection.
            httpx.ReadTimeout: no response headers within the read timeout.
            httpx.ReadError, httpx.RemoteProtocolError: the connection broke, or the
                response is not HTTP/1.1 (`ResponseHeadTooLarge`: its head is over
                `max_head_bytes`).
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._move_to(loop)
        pool, start = self._route(url)
        head = request_head(start, headers, len(content))
        connection = await pool.acquire(timeout)
        response = HttpResponse(connection, self._watch, self._max_head, self._hold)
        try:
            await response.start(head, content, None if timeout is None else timeout.read)
        except BaseException:
            response.close()
            raise
        return response

    async def aclose(self) -> None:
        """Close every connection, idle or busy (their responses then fail)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._move_to(loop)
        for pool in self._forget_pools():
            pool.close()

    def _move_to(self, loop: asyncio.AbstractEventLoop) -> None:
        # Connections belong to the loop they were made on: a new loop starts afresh. The
        # old loop's close as it runs again; once it is closed, asyncio can only warn
        # about them as they are collected.
        old, self._loop = self._loop, loop
        pools = self._forget_pools()
        if old is not None and not old.is_closed():
            for pool in pools:
                pool.close()

    def _new_pool(self, origin: Origin, context: ssl.SSLContext | None) -> _Pool:
        return _Pool(origin, self._limit, self._timeout, context)


class _Pool:
    """Connections to one origin: at most `limit` open, idle ones reused most recent first."""

    def __init__(
        self,
        origin: Origin,
        limit: int,
        timeout: httpx.Timeout,
        context: ssl.SSLContext | None,
    ) -> None:
        self.origin = origin
        self._limit = limit
        self._timeout = timeout
        self._ssl = context
        self._open = 0  # connections counted against the limit: connecting, busy or idle
        self._idle: list[_Connection] = []  # in the order they became idle
        self._all: set[_Connection] = set()
        # Each waiter is handed an idle connection, or None: a slot to connect in.
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._resolved: list[tuple[int, str]] = []  # (family, address) for the host
        self._resolved_until = 0.0
        self._resolving: asyncio.Task[list[tuple[int, str]]] | None = None
        # Responses waiting for their head, with the loop time each may wait until, and
        # the one timer for them all, armed at `_heads_when`: at the earliest of those
        # deadlines, or earlier (a head that came in since does not move it). When it
        # fires it fails the responses whose deadline came and arms itself for the next,
        # so each fails at its own deadline, as with a timer of its own.
        self._heads: dict[HttpResponse, float] = {}
        self._heads_timer: asyncio.TimerHandle | None = None
        self._heads_when = 0.0

    async def acquire(self, timeout: httpx.Timeout | None = None) -> _Connection:
        """An idle connection, or a new one (`timeout`: its connect and pool limits; the
        pool's own when None)."""
        timeout = self._timeout if timeout is None else timeout
        while True:
            connection = self._take_idle()
            if connection is not None:
                return connection
            if self._open < self._limit and not self._waiters:
                self._open += 1
                return await self._connect(timeout.connect)
            handed = await self._wait(timeout.pool)
            if handed is None:
                return await self._connect(timeout.connect)
            if not handed.closed:
                return handed
            # It closed while being handed over; its slot came back then: try again.

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue  # its slot came back when it closed
            if now - connection.idle_since < KEEPALIVE_EXPIRY:
                return connection
            connection.close()  # expired; its slot comes back when it has closed
        return None

    async def _wait(self, limit: float | None) -> _Connection | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = None if limit is None else loop.call_later(limit, _expire, waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(waiter.result())  # handed over just as we were cancelled
            with contextlib.suppress(ValueError):  # still queued: timed out or cancelled
                self._waiters.remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _give_back(self, connection: _Connection | None) -> None:
        if connection is None:
            self._open -= 1
            self._free_slot()
        else:
            self.release(connection)

    async def _connect(self, limit: float | None) -> _Connection:
        # The caller holds a slot (self._open was counted for it). Once connected, the
        # connection gives it back when it closes (lost()).
        loop = asyncio.get_running_loop()
        _, host, port = self.origin
        connection = _Connection(self)
        try:
            async with asyncio.timeout(limit):
                found = await self._addresses()
                for i, (family, address) in enumerate(found):
                    try:
                        await loop.create_connection(
                            lambda: connection,
                            address,
                            port,
                            family=family,
                            ssl=self._ssl,
                            server_hostname=host if self._ssl is not None else None,
                        )
                        break
                    except OSError:
                        if i + 1 == len(found):
                            raise
        except BaseException as exc:
            if connection.transport is None:
                self._open -= 1
                self._free_slot()
            else:
                connection.close()
            if isinstance(exc, TimeoutError):
                raise httpx.ConnectTimeout("timed out connecting to the upstream") from exc
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS (ssl.SSLError)
                raise httpx.ConnectError(f"could not connect to the upstream: {exc}") from exc
            raise
        if connection.closed:
            raise httpx.ConnectError("the upstream closed the connection at once")
        return connection

    async def _addresses(self) -> list[tuple[int, str]]:
        # Cached for DNS_TTL, and one lookup shared by concurrent connects (as aiohttp
        # does): the opening burst of hundreds of streams makes one getaddrinfo call, not
        # one per connection in the default executor.
        loop = asyncio.get_running_loop()
        if self._resolved and loop.time() < self._resolved_until:
            return self._resolved
        resolving = self._resolving
        if resolving is None or resolving.done():
            resolving = self._resolving = loop.create_task(self._resolve())
            resolving.add_done_callback(_retrieve)
        return await asyncio.shield(resolving)

    async def _resolve(self) -> list[tuple[int, str]]:
        loop = asyncio.get_running_loop()
        _, host, port = self.origin
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        self._resolved = found = addresses(infos, host)
        self._resolved_until = loop.time() + DNS_TTL
        return found

    def wait_head(self, response: HttpResponse, deadline: float) -> None:
        """`response` waits for its head until `deadline` (loop time), then fails with
        `ReadTimeout` (`head_arrived` ends the wait)."""
        self._heads[response] = deadline
        if self._heads_timer is None or deadline < self._heads_when:
            self._arm_heads(deadline)

    def head_arrived(self, response: HttpResponse) -> None:
        self._heads.pop(response, None)

    def _arm_heads(self, when: float) -> None:
        if self._heads_timer is not None:
            self._heads_timer.cancel()
        self._heads_when = when
        # An empty context: the timer outlives the request that armed it, and must not
        # keep that request's context variables alive.
        self._heads_timer = asyncio.get_running_loop().call_at(
            when, self._heads_due, context=contextvars.Context()
        )

    def _heads_due(self) -> None:
        self._heads_timer = None
        # asyncio runs a timer up to its clock's resolution early: what is due is what
        # was due when the timer was armed to fire.
        now = max(asyncio.get_running_loop().time(), self._heads_when)
        due = [response for response, deadline in self._heads.items() if deadline <= now]
        for response in due:
            del self._heads[response]
            response._head_expired()
        if self._heads and not self._closed:
            self._arm_heads(min(self._heads.values()))

    def release(self, connection: _Connection) -> None:
        """Take back a connection whose response was read to its end."""
        if self._closed:
            connection.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = asyncio.get_running_loop().time()
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE_EXPIRY, self._sweep)

    def made(self, connection: _Connection) -> None:
        self._all.add(connection)

    def lost(self, connection: _Connection) -> None:
        """A connection closed (either side): its slot is free again."""
        if connection in self._all:
            self._all.discard(connection)
            self._open -= 1
            self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters and self._open < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
                waiter.set_result(None)

    def _sweep(self) -> None:
        # Idle connections past the expiry are closed, so the server never sees us
        # send on a connection it may be closing.
        self._sweeper = None
        now = asyncio.get_running_loop().time()
        keep: list[_Connection] = []
        for connection in self._idle:
            if connection.closed:
                continue
            if now - connection.idle_since >= KEEPALIVE_EXPIRY:
                connection.close()
            else:
                keep.append(connection)
        self._idle = keep
        if keep:
            delay = keep[0].idle_since + KEEPALIVE_EXPIRY - now
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._heads_timer is not None:
            self._heads_timer.cancel()
            self._heads_timer = None
        self._idle.clear()
        for connection in list(self._all):
            connection.close()


def _retrieve(task: asyncio.Task[list[tuple[int, str]]]) -> None:
    # A lookup whose callers were all cancelled: its error must not be logged as lost.
    if not task.cancelled():
        task.exception()


def _expire(waiter: asyncio.Future[_Connection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.PoolTimeout("timed out waiting for an upstream connection"))


class _Connection(asyncio.Protocol):
    """One upstream socket; bytes go to the response being read, if any."""

    __slots__ = ("_pool", "closed", "idle_since", "response", "transport")

    def __init__(self, pool: _Pool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: HttpResponse | None = None
        self.closed = False
        self.idle_since = 0.0

    def __repr__(self) -> str:
        return f"<_Connection origin={self._pool.origin!r} closed={self.closed}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self._pool.made(self)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
        else:
            response.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response, self.response = self.response, None
        if response is not None:
            response.lost(exc)
        self._pool.lost(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close without waiting for the event loop: the socket is shut down now, so the
        peer sees the disconnect even if the caller blocks before the loop turns again."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            shutdown(sock)
        transport.abort()

    def get_extra_info(self, name: str) -> object:
        """httpcore's network-stream names ("socket", "client_addr", "server_addr",
        "ssl_object") answered from the transport."""
        if self.transport is None:
            return None
        return self.transport.get_extra_info(_EXTRA_NAMES.get(name, name))

    def release(self) -> None:
        self.response = None
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self._pool.release(self)


_EXTRA_NAMES = {"client_addr": "sockname", "server_addr": "peername"}


def _expire_idle(idle: float, responses: list[tuple[HttpResponse, None]]) -> None:
    # The read timeout's look (a Sweep per client): fail each response whose reader has
    # been waiting for `idle` seconds. Time spent elsewhere (writing to a slow client) is
    # not waiting.
    now = asyncio.get_running_loop().time()
    for response, _ in responses:
        since = response._waiting_since
        if since and now - since >= idle:
            response.fail(httpx.ReadTimeout("the upstream sent nothing within the read timeout"))


class HttpResponse(ResponseParser):
    """An upstream response shaped like the parts of `httpx.Response` a reader uses.

    It is its own body iterator: `__anext__` returns a future that `data_received` sets
    with everything that arrived in one read (`aiter_raw`) or one chunk body
    (`aiter_batches`: lists of chunk bodies), so a chunk costs no coroutine of ours.
    """

    __slots__ = (
        "_connection",
        "_loop",
        "_paused",
        "_transport",
        "_waiter",
        "_waiting_since",
        "_watch",
    )

    def __init__(
        self,
        connection: _Connection,
        watch: Sweep[HttpResponse, None] | None,
        max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
        hold: bool = False,
    ) -> None:
        super().__init__(max_head_bytes, hold)
        self._connection: _Connection | None = connection
        self._transport = connection.transport  # kept for get_extra_info once released
        self._loop = asyncio.get_running_loop()
        self._watch = watch
        self._waiter: asyncio.Future[bytes] | None = None
        self._waiting_since = 0.0  # loop time the reader began waiting; 0: not waiting
        self._paused = False
        connection.response = self

    @property
    def content(self) -> bytes:
        raise httpx.ResponseNotRead()

    def get_extra_info(self, name: str) -> object:
        """The connection's "socket", "client_addr", "server_addr" or "ssl_object" (as
        httpcore's network stream names them), or None."""
        transport = self._transport
        if transport is None:
            return None
        return transport.get_extra_info(_EXTRA_NAMES.get(name, name))

    # --- the reader's side ------------------------------------------------------------------

    async def start(self, head: bytes, content: bytes, head_timeout: float | None = None) -> None:
        connection = self._connection
        assert connection is not None and connection.transport is not None
        connection.transport.write(head + content)
        waiter = self._waiter = self._loop.create_future()
        self._waiting_since = now = self._loop.time()
        if self._watch is not None:
            self._watch.add(self, None)
        if head_timeout is None:
            await waiter  # set (with b"") when the headers are in, or failed
            return
        pool = connection._pool
        pool.wait_head(self, now + head_timeout)
        try:
            await waiter
        finally:
            pool.head_arrived(self)

    def _head_expired(self) -> None:
        if self.state == HEADERS:
            self.fail(httpx.ReadTimeout("no response head within the read timeout"))

    def aiter_raw(self) -> HttpResponse:
        """The body, all that one read delivered at a time."""
        self.consume(join=True)
        return self

    def aiter_batches(self) -> AsyncIterator[list[bytes]]:
        """The body as lists of chunk bodies (one per HTTP chunk, or per read of a body
        that is not chunked): each list all that arrived since the last, so a reader that
        takes one chunk body at a time (a parser whose fast path is one event per chunk)
        awaits once per read, not once per chunk (see `consume`)."""
        self.consume(join=False)
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[bytes]]:
        pending = self._pending
        while True:
            if pending:
                batch = list(pending)
                pending.clear()
                self.pending_size = 0
                if self._paused:
                    self._resume()
                yield batch
                continue
            state = self.state
            if state == COMPLETE:  # read to its end: no future to wait on for that
                return
            if state != BODY:
                raise self._end()
            try:  # caught up: wait for the next read (or the end, or the failure)
                chunk = await self.__anext__()
            except StopAsyncIteration:
                return
            pending.insert(0, chunk)

    def __aiter__(self) -> HttpResponse:
        return self

    def __anext__(self) -> asyncio.Future[bytes]:
        # Not a coroutine: a future, already done when bytes are waiting, else set by
        # data_received. The end of the body is StopAsyncIteration set as its exception.
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        if self._pending:
            waiter.set_result(self._take())
        elif self.state == BODY:
            self._waiter = waiter
            self._waiting_since = self._loop.time()
        else:
            waiter.set_exception(self._end())
        return waiter

    async def aread(self) -> bytes:
        parts = [chunk async for chunk in self.aiter_raw()]
        return b"".join(parts)

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        # Unfinished: the socket closes now, so the upstream sees the disconnect and stops
        # generating. Finished: the connection is back in the pool (at once, or now when
        # it was held until this close).
        self._settle()
        self._waiter = None
        connection, self._connection = self._connection, None
        if self.shut():
            if connection is not None:
                connection.response = None
                connection.abort()
        elif connection is not None:  # read to its end, and held until now
            self._hand_back(connection)

    def _take(self) -> bytes:
        data = self.take()
        if self._paused and not self._pending:
            self._resume()
        return data

    def _resume(self) -> None:
        self._paused = False
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.transport.resume_reading()

    def _end(self) -> BaseException:
        if self.state == COMPLETE:
            return StopAsyncIteration()
        assert self.error is not None
        return self.error

    # --- the connection's side --------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.parse(data)
        if self.pending_size > _HIGH_WATER and not self._paused and self.state == BODY:
            connection = self._connection
            if connection is not None and connection.transport is not None:
                self._paused = True
                connection.transport.pause_reading()
        self._wake()

    def lost(self, exc: Exception | None) -> None:
        self._connection = None
        self.ended(exc)
        self._wake()

    def _failed(self) -> None:
        self._settle()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.response = None
            connection.close()
        self._wake()

    def _completed(self) -> None:
        # Read to its end: the connection goes back to the pool (or closes), unless the
        # reader holds it until close().
        self._settle()
        if self._hold:
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            self._hand_back(connection)

    def _hand_back(self, connection: _Connection) -> None:
        if self._paused:
            self._paused = False
            if connection.transport is not None:
                connection.transport.resume_reading()
        if self.keep_alive:
            connection.release()
        else:
            connection.response = None
            connection.close()

    def _settle(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.discard(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        body = self.is_stream_consumed  # else start() is waiting for the headers
        if self.state == (BODY if body else HEADERS) and not (body and self._pending):
            return
        self._waiter = None
        self._waiting_since = 0.0
        if waiter.done():  # the reader was cancelled
            return
        if body and self._pending:
            waiter.set_result(self._take())
        elif self.state == FAILED:
            waiter.set_exception(self._end())
        elif body:
            waiter.set_exception(StopAsyncIteration())
        else:
            waiter.set_result(b"")
