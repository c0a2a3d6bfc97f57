"""The HTTP/1.1 engine on asyncio: a small client on httptools' C parser, the proxy's
default upstream.

Measured under `benchmarks/proxy_bench.py` (docs/performance.md, "Proxy benchmark"), the
relay's per-stream cost was mostly in the client layers: aiohttp's response, stream
readers and deques held about 10 KiB per open stream, and every chunk went through its
reader's wakeups. This client is one `asyncio.Protocol` per connection and one response
object per request: `data_received` feeds httptools (llhttp, what uvicorn uses) and hands
the bytes of each read straight to the future the relay is awaiting.

What it does, and nothing more (the proxy sends one POST to one fixed URL):

- keep-alive pools per (scheme, host, port), each bounded by `max_connections`; requests
  wait for a free connection up to `timeout.pool`; idle connections expire after httpx's
  5 s; the host's addresses are cached for 10 s (aiohttp's default), tried in order; TLS
  with httpx's default context (certifi's bundle);
- Content-Length, chunked and close-delimited bodies, passed through undecoded (the proxy
  sends `Accept-Encoding: identity`);
- the response head (status line and headers, interim 1xx heads included) bounded by
  `max_head_bytes` as it arrives, before the parser sees bytes past the limit: a larger
  head fails with `ResponseHeadTooLarge` and closes the socket at once, and repeated header
  names are joined once at the end of the head, so reading a head is linear in its size
  (issue #14: a flood of headers froze the worker and grew its memory without bound);
- `timeout.connect`, and `timeout.read` as an idle limit that only counts time the reader
  spends waiting, so time spent writing to a slow client is not upstream silence: one
  timer per client looks at every open response a few times per limit (`Sweep`; a timer
  per response was 0.5 KiB of each open stream);
- back-pressure: reading pauses once `_HIGH_WATER` bytes wait unread, so a slow client
  holds a bounded buffer;
- closing an unfinished response closes its socket at once (the upstream stops
  generating: nobody pays for tokens nobody reads); a response read to its end returns
  its connection to the pool.

Errors are httpx's exception classes (`ConnectError`, `ConnectTimeout`, `PoolTimeout`,
`ReadTimeout`, `ReadError`, `RemoteProtocolError`), so every error path of the proxy keeps
its status and log line. Neither the request head (it carries the key) nor any header
value appears in a repr or an exception message. A POST is never retried: a stale
keep-alive connection is an error, as with httpx and aiohttp.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import socket
import ssl
from collections.abc import Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx

from .._sweep import Sweep
from ._errors import DEFAULT_MAX_RESPONSE_HEAD_BYTES, ResponseHeadTooLarge

__all__ = ["HttpResponse", "HttpEngine"]

_KEEPALIVE_EXPIRY = httpx.Limits(max_connections=None).keepalive_expiry or 5.0  # httpx's 5 s
# Unread body bytes above which the socket stops being read until the reader catches up.
_HIGH_WATER = 64 * 1024
_DNS_TTL = 10.0  # aiohttp's default ttl_dns_cache
_Origin = tuple[str, str, int]


class HttpEngine:
    """Keep-alive HTTP/1.1 pools, one per origin, for the proxy's upstream POSTs."""

    def __init__(
        self,
        max_connections: int,
        timeout: httpx.Timeout,
        max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be positive")
        if max_head_bytes < 1:
            raise ValueError("max_head_bytes must be positive")
        self._limit = max_connections
        self._max_head = max_head_bytes
        self._timeout = timeout
        self._pools: dict[_Origin, _Pool] = {}
        # url -> (its pool, the request line and Host header); the proxy uses one url.
        self._routes: dict[str, tuple[_Pool, bytes]] = {}
        self._ssl: ssl.SSLContext | None = None
        read = timeout.read
        self._watch: Sweep[HttpResponse, None] | None = (
            None if read is None else Sweep(read, functools.partial(_expire_idle, read))
        )

    def __repr__(self) -> str:
        return f"HttpEngine(origins={sorted(self._pools)!r}, limit={self._limit})"

    async def send(self, url: str, headers: Mapping[str, str], content: bytes) -> HttpResponse:
        """POST `content` to `url`; return once the response's headers have arrived.

        Raises:
            httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout: no connection.
            httpx.ReadTimeout: no response headers within `timeout.read`.
            httpx.ReadError, httpx.RemoteProtocolError: the connection broke, or the
                response is not HTTP/1.1 (`ResponseHeadTooLarge`: its head is over
                `max_head_bytes`).
        """
        route = self._routes.get(url)
        if route is None:
            route = self._routes[url] = self._route(url)
        pool, start = route
        parts = [start]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise httpx.LocalProtocolError("a header contains a line break")
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        parts.append(b"content-length: %d\r\n\r\n" % len(content))
        connection = await pool.acquire()
        response = HttpResponse(connection, self._watch, self._max_head)
        try:
            await response.start(b"".join(parts), content)
        except BaseException:
            response.close()
            raise
        return response

    async def aclose(self) -> None:
        """Close every connection, idle or busy (their responses then fail)."""
        pools, self._pools = self._pools, {}
        self._routes.clear()
        for pool in pools.values():
            pool.close()

    def _route(self, url: str) -> tuple[_Pool, bytes]:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol("the upstream URL must be http:// or https://")
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
        origin = (scheme, host, port)
        pool = self._pools.get(origin)
        if pool is None:
            context = None
            if scheme == "https":
                if self._ssl is None:
                    self._ssl = httpx.create_ssl_context(trust_env=False)
                context = self._ssl
            pool = self._pools[origin] = _Pool(origin, self._limit, self._timeout, context)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]  # userinfo is never sent
        start = f"POST {target} HTTP/1.1\r\nhost: {authority}\r\n".encode("ascii")
        return pool, start


class _Pool:
    """Connections to one origin: at most `limit` open, idle ones reused most recent first."""

    def __init__(
        self,
        origin: _Origin,
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

    async def acquire(self) -> _Connection:
        while True:
            connection = self._take_idle()
            if connection is not None:
                return connection
            if self._open < self._limit and not self._waiters:
                self._open += 1
                return await self._connect()
            handed = await self._wait()
            if handed is None:
                return await self._connect()
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
            if now - connection.idle_since < _KEEPALIVE_EXPIRY:
                return connection
            connection.close()  # expired; its slot comes back when it has closed
        return None

    async def _wait(self) -> _Connection | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        limit = self._timeout.pool
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

    async def _connect(self) -> _Connection:
        # The caller holds a slot (self._open was counted for it). Once connected, the
        # connection gives it back when it closes (lost()).
        loop = asyncio.get_running_loop()
        _, host, port = self.origin
        connection = _Connection(self)
        try:
            async with asyncio.timeout(self._timeout.connect):
                addresses = await self._addresses()
                for i, (family, address) in enumerate(addresses):
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
                        if i + 1 == len(addresses):
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
        # Cached for _DNS_TTL, and one lookup shared by concurrent connects (as aiohttp
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
        addresses: list[tuple[int, str]] = list(
            dict.fromkeys((int(info[0]), str(info[4][0])) for info in infos)
        )
        if not addresses:
            raise OSError(f"no address for {host}")
        self._resolved = addresses
        self._resolved_until = loop.time() + _DNS_TTL
        return addresses

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
            self._sweeper = asyncio.get_running_loop().call_later(_KEEPALIVE_EXPIRY, self._sweep)

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
            if now - connection.idle_since >= _KEEPALIVE_EXPIRY:
                connection.close()
            else:
                keep.append(connection)
        self._idle = keep
        if keep:
            delay = keep[0].idle_since + _KEEPALIVE_EXPIRY - now
            self._sweeper = asyncio.get_running_loop().call_later(delay, self._sweep)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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

    def release(self) -> None:
        self.response = None
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self._pool.release(self)


_HEADERS, _BODY, _COMPLETE, _FAILED = range(4)


def _expire_idle(idle: float, responses: list[tuple[HttpResponse, None]]) -> None:
    # The read timeout's look (a Sweep per client): fail each response whose reader has
    # been waiting for `idle` seconds. Time spent elsewhere (writing to a slow client) is
    # not waiting.
    now = asyncio.get_running_loop().time()
    for response, _ in responses:
        since = response._waiting_since
        if since and now - since >= idle:
            response._fail(httpx.ReadTimeout("the upstream sent nothing within the read timeout"))


class HttpResponse:
    """An upstream response shaped like the parts of `httpx.Response` the relay reads.

    It is its own body iterator: `__anext__` returns a future that `data_received` sets
    with everything that arrived in one read, so a chunk costs no coroutine of ours.
    """

    __slots__ = (
        "_connection",
        "_error",
        "_framed",
        "_head_limit",
        "_head_room",
        "_informational",
        "_join",
        "_keep_alive",
        "_loop",
        "_parser",
        "_paused",
        "_pending",
        "_pending_size",
        "_repeated",
        "_state",
        "_waiter",
        "_watch",
        "_waiting_since",
        "headers",
        "is_stream_consumed",
        "status_code",
    )

    def __init__(
        self,
        connection: _Connection,
        watch: Sweep[HttpResponse, None] | None,
        max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    ) -> None:
        self._connection: _Connection | None = connection
        self._loop = asyncio.get_running_loop()
        # Dropped once the response is settled: it holds this object (a reference cycle).
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._watch = watch
        self._waiter: asyncio.Future[bytes] | None = None
        self._waiting_since = 0.0  # loop time the reader began waiting; 0: not waiting
        self._state = _HEADERS
        self._error: Exception | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._paused = False
        self._framed = False
        self._informational = False
        self._join = True  # hand out everything one read delivered (aiter_raw)
        self._keep_alive = False
        self.status_code = 0
        self.headers: dict[str, str] = {}
        # Head bytes the parser may still be fed; a head that needs more is refused.
        self._head_limit = self._head_room = max_head_bytes
        # Values of header names seen more than once, joined at the end of the head.
        self._repeated: dict[str, list[str]] | None = None
        self.is_stream_consumed = False
        connection.response = self

    def __repr__(self) -> str:
        return f"<HttpResponse [{self.status_code}]>"

    @property
    def content(self) -> bytes:
        raise httpx.ResponseNotRead()

    # --- the reader's side ------------------------------------------------------------------

    async def start(self, head: bytes, content: bytes) -> None:
        connection = self._connection
        assert connection is not None and connection.transport is not None
        connection.transport.write(head + content)
        waiter = self._waiter = self._loop.create_future()
        self._waiting_since = self._loop.time()
        if self._watch is not None:
            self._watch.add(self, None)
        await waiter  # set (with b"") when the headers are in, or failed

    def aiter_raw(self) -> HttpResponse:
        if self.is_stream_consumed:
            raise httpx.StreamConsumed()
        self.is_stream_consumed = True
        return self

    def aiter_chunks(self) -> HttpResponse:
        """The body one chunk body at a time (an HTTP chunk, or one read of a body that is
        not chunked), where `aiter_raw` hands out all that one read delivered, joined: a
        parser that takes whole events per chunk then takes its fast path."""
        self._join = False
        return self.aiter_raw()

    def __aiter__(self) -> HttpResponse:
        return self

    def __anext__(self) -> asyncio.Future[bytes]:
        # Not a coroutine: a future, already done when bytes are waiting, else set by
        # data_received. The end of the body is StopAsyncIteration set as its exception.
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        if self._pending:
            waiter.set_result(self._take())
        elif self._state == _BODY:
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
        # generating. Finished: the connection is back in the pool already.
        self._settle()
        self._waiter = None
        self._pending.clear()
        connection, self._connection = self._connection, None
        if self._state in (_HEADERS, _BODY):
            self._state = _FAILED
            self._error = httpx.StreamClosed()
            if connection is not None:
                connection.response = None
                connection.close()

    def _take(self) -> bytes:
        pending = self._pending
        if len(pending) == 1 or self._join:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._pending_size = 0
        else:
            data = pending.pop(0)
            self._pending_size -= len(data)
        if self._paused and not pending:
            self._paused = False
            connection = self._connection
            if connection is not None and connection.transport is not None:
                connection.transport.resume_reading()
        return data

    def _end(self) -> BaseException:
        if self._state == _COMPLETE:
            return StopAsyncIteration()
        assert self._error is not None
        return self._error

    # --- the connection's side --------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return
        try:
            if self._state == _HEADERS:
                # The head is counted before the parser sees it (llhttp buffers nothing,
                # but httptools grows a header value split across reads by concatenation):
                # only the bytes the limit allows are parsed while the head is unfinished.
                room = self._head_room
                if len(data) > room:
                    self._head_room = 0
                    parser.feed_data(data[:room])
                    if self._state == _HEADERS:
                        self._fail(ResponseHeadTooLarge(self._head_limit))
                        return
                    data = data[room:]
                else:
                    self._head_room = room - len(data)
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            if self._state != _COMPLETE:
                self._fail(httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))
                return
            self._keep_alive = False  # bytes after the response: do not reuse
        if self._state == _COMPLETE:
            self._finish()
        self._wake()

    def lost(self, exc: Exception | None) -> None:
        self._connection = None
        if self._state == _BODY and not self._framed and exc is None:
            self._state = _COMPLETE  # a close-delimited body ends with the connection
            self._settle()
        elif self._state == _HEADERS:
            self._fail(_broken(exc, "the upstream closed the connection without a response"))
        elif self._state == _BODY:
            self._fail(_broken(exc, "the upstream closed the connection mid-body"))
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self._state in (_COMPLETE, _FAILED):
            return
        self._state = _FAILED
        self._error = error
        self._settle()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.response = None
            connection.close()
        self._wake()

    def _finish(self) -> None:
        # Read to its end: the connection goes back to the pool (or closes).
        self._settle()
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._paused:
            self._paused = False
            assert connection.transport is not None
            connection.transport.resume_reading()
        if self._keep_alive:
            connection.release()
        else:
            connection.response = None
            connection.close()

    def _settle(self) -> None:
        self._parser = None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.discard(self)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        body = self.is_stream_consumed  # else start() is waiting for the headers
        if self._state == (_BODY if body else _HEADERS) and not (body and self._pending):
            return
        self._waiter = None
        self._waiting_since = 0.0
        if waiter.done():  # the reader was cancelled
            return
        if body and self._pending:
            waiter.set_result(self._take())
        elif self._state == _FAILED:
            waiter.set_exception(self._end())
        elif body:
            waiter.set_exception(StopAsyncIteration())
        else:
            waiter.set_result(b"")

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._state == _COMPLETE:
            raise httpx.RemoteProtocolError("bytes after the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self.headers
        previous = headers.get(key)
        if previous is None:
            headers[key] = text
            return
        # Joined once at the end of the head: joining on every repeat is quadratic.
        repeated = self._repeated
        if repeated is None:
            repeated = self._repeated = {}
        values = repeated.get(key)
        if values is None:
            repeated[key] = [previous, text]
        else:
            values.append(text)

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        repeated, self._repeated = self._repeated, None
        if 100 <= status < 200:  # an interim answer (103 Early Hints): the real one follows
            self._informational = True
            self.headers = {}
            return
        self.status_code = status
        headers = self.headers
        if repeated is not None:
            for key, values in repeated.items():
                headers[key] = ", ".join(values)
        self._framed = (
            "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        )
        self._state = _BODY

    def on_body(self, body: bytes) -> None:
        self._pending.append(body)
        self._pending_size += len(body)
        if self._pending_size > _HIGH_WATER and not self._paused:
            connection = self._connection
            if connection is not None and connection.transport is not None:
                self._paused = True
                connection.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()
        self._state = _COMPLETE


def _broken(exc: Exception | None, message: str) -> Exception:
    if isinstance(exc, OSError):
        error: Exception = httpx.ReadError(f"{message}: {exc.strerror or type(exc).__name__}")
        error.__cause__ = exc
        return error
    return httpx.RemoteProtocolError(message)
