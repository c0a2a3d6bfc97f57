"""Sans-IO HTTP/1.1 for the engine's two I/O shells: the asyncio protocol (`_http.py`) and
the blocking socket reader (`_sync.py`) drive this one state machine.

- `route(url)`: what a URL is to a pool (its origin) and the request line and Host header
  sent to it; `request_head()` adds the headers (or their lines as `header_lines()`
  encoded them once, for a caller that sends the same ones many times) and the
  Content-Length.
- `ResponseParser`: one response on httptools' C parser (llhttp, what uvicorn uses):
  the head bounded by `max_head_bytes` as it arrives, interim 1xx heads skipped, repeated
  header names joined once at the end of the head, Content-Length, chunked and
  close-delimited bodies (passed through undecoded), each HTTP chunk body kept apart
  (`take_chunk`) or all that arrived joined (`take_all`), and the keep-alive decision.
  A shell feeds it what its socket delivers (`parse`), says when the socket closed
  (`ended`), and implements two hooks: `_completed()` (read to its end: release or close
  the connection) and `_failed()` (drop the connection, wake the reader).
- `addresses()`: the (family, address) pairs of a `getaddrinfo` answer, in order, for the
  DNS cache both pools keep for `DNS_TTL`.

Errors are httpx's exception classes. No header value appears in an exception message.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import httptools
import httpx

from ._errors import DEFAULT_MAX_RESPONSE_HEAD_BYTES, ResponseHeadTooLarge

__all__ = [
    "BODY",
    "COMPLETE",
    "DNS_TTL",
    "FAILED",
    "EngineBase",
    "HEADERS",
    "KEEPALIVE_EXPIRY",
    "Origin",
    "ResponseParser",
    "addresses",
    "broken",
    "header_lines",
    "request_head",
    "route",
]

KEEPALIVE_EXPIRY = httpx.Limits(max_connections=None).keepalive_expiry or 5.0  # httpx's 5 s
DNS_TTL = 10.0  # aiohttp's default ttl_dns_cache
Origin = tuple[str, str, int]  # (scheme, host, port)

P = TypeVar("P")

# A response's states: reading the head, reading the body, read to its end, failed/closed.
HEADERS, BODY, COMPLETE, FAILED = range(4)


def route(url: str) -> tuple[Origin, bytes]:
    """The origin `url` is sent to, and the start of its POST head (request line, Host).

    Raises:
        httpx.UnsupportedProtocol: not an http:// or https:// URL with a host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise httpx.UnsupportedProtocol("the upstream URL must be http:// or https://")
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]  # userinfo is never sent
    start = f"POST {target} HTTP/1.1\r\nhost: {authority}\r\n".encode("ascii")
    return (scheme, parts.hostname, port), start


class EngineBase(Generic[P]):
    """What both engines hold apart from their I/O: the settings, a pool (of type `P`, the
    shell's) per origin, the routes already parsed, and the TLS context."""

    def __init__(
        self,
        max_connections: int,
        timeout: httpx.Timeout,
        max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
        *,
        trust_env: bool = False,
        release_at_close: bool = False,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be positive")
        if max_head_bytes < 1:
            raise ValueError("max_head_bytes must be positive")
        self._limit = max_connections
        self._max_head = max_head_bytes
        self._timeout = timeout
        self._trust_env = trust_env
        self._hold = release_at_close
        self._pools: dict[Origin, P] = {}
        # url -> (its pool, the request line and Host header); a caller uses few urls.
        self._routes: dict[str, tuple[P, bytes]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._setup()

    def _setup(self) -> None:
        """Hook: the I/O shell's own state."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(origins={sorted(self._pools)!r}, limit={self._limit})"

    def _route(self, url: str) -> tuple[P, bytes]:
        found = self._routes.get(url)
        if found is not None:
            return found
        origin, start = route(url)
        pool = self._pools.get(origin)
        if pool is None:
            context = None
            if origin[0] == "https":
                if self._ssl is None:
                    # httpx's default context: certifi's bundle (or SSL_CERT_FILE/DIR with
                    # trust_env, as an httpx client reads them).
                    self._ssl = httpx.create_ssl_context(trust_env=self._trust_env)
                context = self._ssl
            pool = self._pools[origin] = self._new_pool(origin, context)
        if len(self._routes) >= 64:  # many urls: keep the cache small
            self._routes.clear()
        found = self._routes[url] = (pool, start)
        return found

    def _new_pool(self, origin: Origin, context: ssl.SSLContext | None) -> P:
        raise NotImplementedError

    def _forget_pools(self) -> list[P]:
        pools = list(self._pools.values())
        self._pools = {}
        self._routes.clear()
        return pools


def request_head(start: bytes, headers: Mapping[str, str] | bytes, length: int) -> bytes:
    """The whole request head: `start` (from `route`), the headers and the Content-Length.

    `headers`: a mapping, or its lines as `header_lines()` encoded them.

    Raises:
        httpx.LocalProtocolError: a header name or value holds a line break.
    """
    lines = headers if isinstance(headers, bytes) else header_lines(headers)
    return b"%s%scontent-length: %d\r\n\r\n" % (start, lines, length)


def header_lines(headers: Mapping[str, str]) -> bytes:
    """`headers` as the lines of a request head, for `request_head`: a caller that sends the
    same headers on many requests encodes them once. The lines carry whatever the headers
    do (the upstream key): keep them as the headers are kept, never shown.

    Raises:
        httpx.LocalProtocolError: a header name or value holds a line break.
    """
    parts = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise httpx.LocalProtocolError("a header contains a line break")
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(parts)


def addresses(infos: Iterable[tuple[Any, ...]], host: str) -> list[tuple[int, str]]:
    """(family, address) of each `getaddrinfo` answer, in order, without repeats.

    Raises:
        OSError: no address at all.
    """
    found: list[tuple[int, str]] = list(
        dict.fromkeys((int(info[0]), str(info[4][0])) for info in infos)
    )
    if not found:
        raise OSError(f"no address for {host}")
    return found


def broken(exc: BaseException | None, message: str) -> Exception:
    """The error for a connection that broke (`exc`: the socket's error, if any)."""
    if isinstance(exc, OSError):
        error: Exception = httpx.ReadError(f"{message}: {exc.strerror or type(exc).__name__}")
        error.__cause__ = exc
        return error
    return httpx.RemoteProtocolError(message)


class ResponseParser:
    """One HTTP/1.1 response as bytes arrive: the state machine both shells share.

    `parse()` never raises: a response that cannot be read is `fail()`ed (state FAILED,
    `error` set, the `_failed()` hook run), one read to its end runs `_completed()`.
    """

    __slots__ = (
        "_closed",
        "_framed",
        "_head_limit",
        "_head_room",
        "_hold",
        "_informational",
        "_join",
        "_parser",
        "_pending",
        "_reason",
        "_repeated",
        "error",
        "headers",
        "is_stream_consumed",
        "keep_alive",
        "on_body",
        "pending_size",
        "state",
        "status_code",
    )

    def __init__(
        self, max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES, hold: bool = False
    ) -> None:
        # Chunk bodies not yet handed out, and about how many bytes they are (what was read
        # since the reader last emptied them: for back-pressure). A list, not a deque: an
        # empty deque is 760 bytes of every open stream (a list 56), and the readers take
        # them all at once (`take_all`, the batches) or the first of a few (`take_chunk`).
        self._pending: list[bytes] = []
        self.pending_size = 0
        # httptools' body callback is the deque's own append: no Python call per chunk.
        self.on_body = self._pending.append
        # Dropped once the response is settled: it holds this object (a reference cycle).
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.state = HEADERS
        self.error: Exception | None = None
        self._framed = False
        self._informational = False
        #: Whether the connection may carry another request (known once COMPLETE).
        self.keep_alive = False
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self._reason = b""
        # Head bytes the parser may still be fed; a head that needs more is refused.
        self._head_limit = self._head_room = max_head_bytes
        # Values of header names seen more than once, joined at the end of the head.
        self._repeated: dict[str, list[str]] | None = None
        self._hold = hold  # keep the connection when read to its end, until close()
        self._join = True  # hand out all that one read delivered, joined
        self.is_stream_consumed = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [{self.status_code}]>"

    @property
    def is_closed(self) -> bool:
        """Whether `close()` was called (as `httpx.Response.is_closed`)."""
        return self._closed

    def consume(self, join: bool) -> None:
        """The reader starts on the body: all that one read delivered joined (`join`), or
        one chunk body at a time (each HTTP chunk, or each read of a body that is not
        chunked; a parser that takes whole events per chunk then takes its fast path).

        Raises:
            httpx.StreamConsumed: the body was already being read.
        """
        if self.is_stream_consumed:
            raise httpx.StreamConsumed()
        self.is_stream_consumed = True
        self._join = join

    def take(self) -> bytes:
        """What the reader gets next (there must be a pending chunk body)."""
        return self.take_all() if self._join else self.take_chunk()

    def shut(self) -> bool:
        """The reader closes the response; True when it was unfinished (now failed with
        `httpx.StreamClosed`): its connection must then close at once."""
        self._closed = True
        self.drop_pending()
        if self.state not in (HEADERS, BODY):
            return False
        self.state = FAILED
        self.error = httpx.StreamClosed()
        self._parser = None
        return True

    @property
    def reason_phrase(self) -> str:
        """The status line's reason, or the standard one for the status if it sent none."""
        if self._reason:
            return self._reason.decode("latin-1")
        return httpx.codes.get_reason_phrase(self.status_code)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    @property
    def is_complete(self) -> bool:
        """Whether the whole response has been received (its unread part is pending)."""
        return self.state == COMPLETE

    def take_chunk(self) -> bytes:
        """The oldest chunk body not handed out yet (there must be one)."""
        pending = self._pending
        data = pending.pop(0)
        if not pending:
            self.pending_size = 0
        return data

    def take_all(self) -> bytes:
        """Every chunk body not handed out yet, joined (there must be one)."""
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.pending_size = 0
        return data

    def drop_pending(self) -> None:
        self._pending.clear()
        self.pending_size = 0

    # --- what the shells call -----------------------------------------------------------

    def parse(self, data: bytes) -> None:
        """Feed bytes read from the connection."""
        parser = self._parser
        if parser is None:
            if self.state == COMPLETE:
                self.keep_alive = False  # bytes after the response: do not reuse
            return
        try:
            if self.state == HEADERS:
                # The head is counted before the parser sees it (llhttp buffers nothing,
                # but httptools grows a header value split across reads by concatenation):
                # only the bytes the limit allows are parsed while the head is unfinished.
                room = self._head_room
                if len(data) > room:
                    self._head_room = 0
                    parser.feed_data(data[:room])
                    if self.state == HEADERS:
                        self.fail(ResponseHeadTooLarge(self._head_limit))
                        return
                    data = data[room:]
                else:
                    self._head_room = room - len(data)
            parser.feed_data(data)
            if self._pending:
                self.pending_size += len(data)
        except httptools.HttpParserUpgrade:
            self.fail(httpx.RemoteProtocolError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            if self.state != COMPLETE:
                self.fail(httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))
                return
            self.keep_alive = False  # bytes after the response: do not reuse
        if self.state == COMPLETE:
            self._parser = None
            self._completed()

    def ended(self, exc: BaseException | None) -> None:
        """The connection closed (`exc`: why, if it failed)."""
        if self.state == BODY and not self._framed and exc is None:
            # A close-delimited body ends with the connection.
            self.state = COMPLETE
            self.keep_alive = False
            self._parser = None
            self._completed()
        elif self.state == HEADERS:
            self.fail(broken(exc, "the upstream closed the connection without a response"))
        elif self.state == BODY:
            self.fail(broken(exc, "the upstream closed the connection mid-body"))

    def fail(self, error: Exception) -> None:
        """The response cannot be read on: `error` is what its reader gets."""
        if self.state in (COMPLETE, FAILED):
            return
        self.state = FAILED
        self.error = error
        self._parser = None
        self._failed()

    def _completed(self) -> None:
        """Hook: the response was read to its end (`keep_alive` says if the connection may
        be reused)."""

    def _failed(self) -> None:
        """Hook: the response failed (`error`)."""

    # --- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state == COMPLETE:
            raise httpx.RemoteProtocolError("bytes after the response")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

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
            self._reason = b""
            return
        self.status_code = status
        headers = self.headers
        if repeated is not None:
            for key, values in repeated.items():
                headers[key] = ", ".join(values)
        self._framed = (
            "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        )
        self.state = BODY

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        assert self._parser is not None
        self.keep_alive = self._parser.should_keep_alive()
        self.state = COMPLETE
