"""The HTTP/1.1 engine on blocking sockets: the twin of `_http.py` for the sync client.

The HTTP itself (request heads, the response state machine on httptools, head limits,
framing, the keep-alive decision) is `_h1.py`'s, shared with the asyncio engine; this
module only moves bytes: `sendall` the request, `recv` into `ResponseParser.parse` until
the head is in, then one `recv` per body read while the reader wants more.

The same pool behaviour as the asyncio engine and as httpx: keep-alive pools per origin,
at most `max_connections` each (a thread waits for a free one up to `timeout.pool`),
idle connections reused most recent first and dropped after httpx's 5 s, or when the
server closed them meanwhile (a readable idle socket, as httpcore checks); addresses
cached for 10 s; TLS with httpx's default context (`ssl.SSLContext.wrap_socket`). Safe to
share between threads, one request per connection at a time.

Timeouts: `timeout.connect` covers the lookup, the TCP connect and the TLS handshake; a
request's `timeout.read` bounds the wait for its head (a socket timeout), the engine's
each later read (None: the socket blocks; the client's watchdog enforces its deadlines by
shutting the socket down, which ends a blocked `recv` at once).
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping

import httpx

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

__all__ = ["SyncEngine", "SyncResponse"]

_READ_SIZE = 64 * 1024  # httpcore's


class SyncEngine(EngineBase["_SyncPool"]):
    """Keep-alive HTTP/1.1 pools, one per origin, for upstream POSTs on blocking sockets
    (the arguments are `HttpEngine`'s)."""

    def _setup(self) -> None:
        self._lock = threading.Lock()  # new routes and pools, from any thread

    def send(
        self,
        url: str,
        headers: Mapping[str, str] | bytes,
        content: bytes,
        timeout: httpx.Timeout | None = None,
    ) -> SyncResponse:
        """POST `content` to `url`; return once the response's headers have arrived (as
        `HttpEngine.send`, and with the same errors)."""
        found = self._routes.get(url)
        if found is None:
            with self._lock:
                found = self._route(url)
        pool, start = found
        head = request_head(start, headers, len(content))
        limits = self._timeout if timeout is None else timeout
        connection = pool.acquire(limits)
        response = SyncResponse(connection, self._timeout.read, self._max_head, self._hold)
        try:
            response.start(head + content, limits.read)
        except BaseException:
            response.close()
            raise
        return response

    def close(self) -> None:
        """Close every connection, idle or busy (their responses then fail)."""
        with self._lock:
            pools = self._forget_pools()
        for pool in pools:
            pool.close()

    def _new_pool(self, origin: Origin, context: ssl.SSLContext | None) -> _SyncPool:
        return _SyncPool(origin, self._limit, context)


class _SyncPool:
    """Connections to one origin: at most `limit` open, idle ones reused most recent first."""

    def __init__(self, origin: Origin, limit: int, context: ssl.SSLContext | None) -> None:
        self.origin = origin
        self._limit = limit
        self._ssl = context
        # Reentrant: closing an expired connection while taking one gives its slot back.
        self._cond = threading.Condition(threading.RLock())
        self._open = 0  # connections counted against the limit: connecting, busy or idle
        self._idle: list[_SyncConnection] = []  # in the order they became idle
        self._all: set[_SyncConnection] = set()
        self._closed = False
        self._resolved: list[tuple[int, str]] = []  # (family, address) for the host
        self._resolved_until = 0.0

    def acquire(self, timeout: httpx.Timeout) -> _SyncConnection:
        """An idle connection, or a new one within `timeout.connect` (waiting up to
        `timeout.pool` for a free slot)."""
        deadline = None if timeout.pool is None else time.monotonic() + timeout.pool
        with self._cond:
            while True:
                connection = self._take_idle()
                if connection is not None:
                    return connection
                if self._open < self._limit:
                    self._open += 1
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise httpx.PoolTimeout("timed out waiting for an upstream connection")
                self._cond.wait(remaining)
        try:
            connection = self._connect(timeout.connect)
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._all.add(connection)
            if self._closed:
                connection.close()
                raise httpx.ConnectError("the engine was closed")
        return connection

    def _take_idle(self) -> _SyncConnection | None:
        idle = self._idle
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue  # its slot came back when it closed
            if now - connection.idle_since < KEEPALIVE_EXPIRY and not connection.readable():
                return connection
            # Expired, or readable while idle: the server closed it (or sent bytes nobody
            # asked for). Its slot comes back as it closes.
            connection.close()
        return None

    def _connect(self, limit: float | None) -> _SyncConnection:
        _, host, port = self.origin
        deadline = None if limit is None else time.monotonic() + limit
        sock: socket.socket | None = None
        try:
            found = self._addresses()
            for i, (family, address) in enumerate(found):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.settimeout(_remaining(deadline))
                    sock.connect((address, port))
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if self._ssl is not None:
                        sock.settimeout(_remaining(deadline))
                        sock = self._ssl.wrap_socket(sock, server_hostname=host)
                    break
                except OSError:
                    sock.close()
                    sock = None
                    if i + 1 == len(found):
                        raise
        except TimeoutError as exc:
            raise httpx.ConnectTimeout("timed out connecting to the upstream") from exc
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError)
            raise httpx.ConnectError(f"could not connect to the upstream: {exc}") from exc
        assert sock is not None
        return _SyncConnection(self, sock)

    def _addresses(self) -> list[tuple[int, str]]:
        if self._resolved and time.monotonic() < self._resolved_until:
            return self._resolved
        _, host, port = self.origin
        found = addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), host)
        self._resolved, self._resolved_until = found, time.monotonic() + DNS_TTL
        return found

    def release(self, connection: _SyncConnection) -> None:
        """Take back a connection whose response was read to its end."""
        with self._cond:
            if self._closed:
                connection.close()
                return
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
            self._cond.notify()

    def lost(self, connection: _SyncConnection) -> None:
        """A connection closed: its slot is free again."""
        with self._cond:
            if connection in self._all:
                self._all.discard(connection)
                self._open -= 1
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._idle.clear()
            connections = list(self._all)
        for connection in connections:
            connection.close()


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _send(connection: _SyncConnection, request: bytes) -> None:
    """`sendall`, without the `poll` CPython makes before each send on a socket with a
    timeout: a plain socket's descriptor is then non-blocking, and one `write` mostly
    takes the whole request (the rest, if any, goes through `sendall` and its timeout).

    Raises:
        OSError: as `sendall` (TimeoutError: the rest did not go within the timeout).
    """
    sent = 0
    if connection.plain:
        try:
            sent = os.write(connection.fd, request)
        except BlockingIOError:
            pass
        if sent == len(request):
            return
    connection.sock.sendall(memoryview(request)[sent:] if sent else request)


class _SyncConnection:
    """One upstream socket."""

    __slots__ = (
        "_info",
        "_poller",
        "_pool",
        "closed",
        "fd",
        "idle_since",
        "plain",
        "sock",
        "timeout",
    )

    def __init__(self, pool: _SyncPool, sock: socket.socket) -> None:
        self._pool = pool
        self.sock = sock
        self.closed = False
        self.idle_since = 0.0
        # The socket's timeout as last set: `settimeout` is a system call (ioctl), so it
        # is made only when a request needs another one.
        self.timeout = sock.gettimeout()
        self.fd = sock.fileno()
        self.plain = not isinstance(sock, ssl.SSLSocket)  # `_send` writes to `fd` directly
        self._poller: select.poll | None = None  # for `readable`, made once
        self._info: dict[str, object] = {
            "socket": sock,
            "client_addr": sock.getsockname(),
            "server_addr": sock.getpeername(),
            "ssl_object": sock if isinstance(sock, ssl.SSLSocket) else None,
        }

    def __repr__(self) -> str:
        return f"<_SyncConnection origin={self._pool.origin!r} closed={self.closed}>"

    def get_extra_info(self, name: str) -> object:
        """httpcore's network-stream names: "socket", "client_addr", "server_addr",
        "ssl_object"."""
        return self._info.get(name)

    def readable(self) -> bool:
        """Whether the idle socket has something to read (or was closed by the server):
        what httpcore asks of an idle socket before reusing it. Poll where there is one
        (select cannot take a descriptor past FD_SETSIZE)."""
        try:
            if hasattr(select, "poll"):
                poller = self._poller
                if poller is None:
                    poller = self._poller = select.poll()
                    poller.register(self.fd, select.POLLIN)
                return bool(poller.poll(0))
            return bool(select.select([self.sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        finally:
            self._pool.lost(self)

    def release(self) -> None:
        if not self.closed:
            self._pool.release(self)


class SyncResponse(ResponseParser):
    """An upstream response read from a blocking socket: the same interface as
    `HttpResponse`, with `iter_*`, `read()` and `close()` for `aiter_*`, `aread()` and
    `aclose()`. It is its own body iterator."""

    __slots__ = ("_connection", "_info", "_read_timeout", "_sock")

    def __init__(
        self,
        connection: _SyncConnection,
        read_timeout: float | None,
        max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
        hold: bool = False,
    ) -> None:
        super().__init__(max_head_bytes, hold)
        self._connection: _SyncConnection | None = connection
        self._info = connection  # kept for get_extra_info once released
        self._sock = connection.sock
        self._read_timeout = read_timeout

    def get_extra_info(self, name: str) -> object:
        """The connection's "socket", "client_addr", "server_addr" or "ssl_object"."""
        return self._info.get_extra_info(name)

    # --- the reader's side ------------------------------------------------------------------

    def start(self, request: bytes, head_timeout: float | None = None) -> None:
        sock = self._sock
        connection = self._connection
        assert connection is not None
        try:
            if connection.timeout != head_timeout:
                sock.settimeout(head_timeout)
                connection.timeout = head_timeout
            _send(connection, request)
        except TimeoutError as exc:
            raise httpx.WriteTimeout("timed out sending the request") from exc
        except OSError as exc:
            raise httpx.WriteError(f"sending the request failed: {exc}") from exc
        while self.state == HEADERS:
            self._receive()
        if self.state == FAILED:
            assert self.error is not None
            raise self.error
        read_timeout = self._read_timeout
        if self.state == BODY and read_timeout is not None and head_timeout != read_timeout:
            sock.settimeout(read_timeout)
            connection.timeout = read_timeout
        # With no read limit the socket keeps the head's (two system calls per request
        # saved): a body read that times out just reads again (`_receive`).

    def iter_raw(self) -> SyncResponse:
        """The body, all that one read delivered at a time."""
        self.consume(join=True)
        return self

    def iter_batches(self) -> Iterator[list[bytes]]:
        """The body as lists of chunk bodies (see `HttpResponse.aiter_batches`)."""
        self.consume(join=False)
        return self._batches()

    def _batches(self) -> Iterator[list[bytes]]:
        pending = self._pending
        while True:
            if pending:
                batch = list(pending)
                pending.clear()
                self.pending_size = 0
                yield batch
            if self.state != BODY:
                if self.state == COMPLETE:
                    return
                assert self.error is not None
                raise self.error
            self._receive()

    def __iter__(self) -> SyncResponse:
        return self

    def __next__(self) -> bytes:
        while not self._pending:
            if self.state != BODY:
                if self.state == COMPLETE:
                    raise StopIteration
                assert self.error is not None
                raise self.error
            self._receive()
        return self.take()

    def read(self) -> bytes:
        return b"".join(list(self.iter_raw()))

    def close(self) -> None:
        # Unfinished: the socket closes now, so the upstream sees the disconnect and stops
        # generating. Finished: the connection is back in the pool (at once, or now when
        # it was held until this close).
        connection, self._connection = self._connection, None
        if self.shut():
            if connection is not None:
                connection.close()
        elif connection is not None:  # read to its end, and held until now
            self._hand_back(connection)

    # --- the socket's side ------------------------------------------------------------------

    def _receive(self) -> None:
        try:
            data = self._sock.recv(_READ_SIZE)
        except TimeoutError:
            if self.state == BODY and self._read_timeout is None:
                return  # the head's limit, still on the socket: no limit for the body
            self.fail(httpx.ReadTimeout("the upstream sent nothing within the read timeout"))
            return
        except OSError as exc:
            self._lost(exc)
            return
        if data:
            self.parse(data)
        else:
            self._lost(None)

    def _lost(self, exc: OSError | None) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
        self.ended(exc)

    def _failed(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _completed(self) -> None:
        if self._hold:
            return
        connection, self._connection = self._connection, None
        if connection is not None:
            self._hand_back(connection)

    def _hand_back(self, connection: _SyncConnection) -> None:
        if self.keep_alive:
            connection.release()
        else:
            connection.close()
