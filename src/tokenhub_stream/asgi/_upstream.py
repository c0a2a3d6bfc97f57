"""The proxy's upstream clients on asyncio, and the choice between them.

`default_upstream` picks, when no `transport=` was given and the server runs on asyncio:
our HTTP/1.1 client on httptools' C parser (`_proxy_http.py`) when httptools is installed,
else aiohttp called directly (`AiohttpUpstream`, below), else none (the proxy then uses
httpx). Both hand the relay an object with the few `httpx.Response` members it reads
(`UpstreamResponse`) and raise httpx's exception classes, so every error path of the proxy
keeps its status and log line. Measured in docs/performance.md ("Proxy benchmark").

`AiohttpUpstream` replaced httpx-aiohttp's `AiohttpTransport` behind an `httpx.AsyncClient`,
which cost per request an `httpx.Request`, an `httpx.Response` and two parsed header lists,
and per chunk three more async generators. Its errors are mapped exactly as httpx-aiohttp
maps them.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from .._engine import DEFAULT_MAX_RESPONSE_HEAD_BYTES, ResponseHeadTooLarge

if TYPE_CHECKING:
    import aiohttp

__all__: list[str] = []

_KEEPALIVE_EXPIRY = httpx.Limits(max_connections=None).keepalive_expiry  # httpx's 5 s


class UpstreamResponse(Protocol):
    """What the relay reads of an upstream response; `httpx.Response` has all of it."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def is_stream_consumed(self) -> bool: ...

    @property
    def content(self) -> bytes: ...

    def aiter_raw(self) -> AsyncIterator[bytes]: ...

    async def aread(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    """A pool the proxy POSTs through; `send` returns once the headers are in."""

    async def send(
        self, url: str, headers: Mapping[str, str], content: bytes
    ) -> UpstreamResponse: ...

    async def aclose(self) -> None: ...


def default_upstream(
    max_connections: int,
    timeout: httpx.Timeout,
    max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
) -> Upstream | None:
    """Our httptools client, else aiohttp, on asyncio; None: use httpx (trio, neither)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not on asyncio (trio)
        return None
    if importlib.util.find_spec("httptools") is not None:
        from .._engine._http import HttpUpstream

        return HttpUpstream(max_connections, timeout, max_head_bytes)
    return AiohttpUpstream.create(max_connections, timeout, max_head_bytes)


def head_size(status_line: int, fields: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a response head as sent: status line, `name: value` lines, blank line."""
    return status_line + 4 + sum(len(name) + len(value) + 4 for name, value in fields)


def httpx_head_size(response: httpx.Response) -> int:
    """`head_size` of an httpx response ("HTTP/1.1 200 " is 13 bytes before the reason)."""
    return head_size(13 + len(response.reason_phrase), response.headers.raw)


def is_h11_head_overflow(exc: httpx.RemoteProtocolError) -> bool:
    """h11's error for a head over its buffer (httpcore sets 100 KiB), raised by httpx."""
    return str(exc) == "Receive buffer too long"


class AiohttpUpstream:
    """One aiohttp session (its pool of `max_connections`) for the proxy's upstream calls."""

    def __init__(
        self,
        max_connections: int,
        timeout: httpx.Timeout,
        module: Any,
        max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    ) -> None:
        self._aiohttp = module
        self._map = importlib.import_module("httpx_aiohttp.transport").map_aiohttp_exceptions
        self._limit = max_connections
        self._max_head = max_head_bytes
        self._idle = timeout.read
        self._timeout = module.ClientTimeout(
            sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
        )
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def create(
        cls,
        max_connections: int,
        timeout: httpx.Timeout,
        max_head_bytes: int = DEFAULT_MAX_RESPONSE_HEAD_BYTES,
    ) -> AiohttpUpstream | None:
        """The upstream if this runs on asyncio with aiohttp and httpx-aiohttp installed."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not on asyncio (trio)
            return None
        try:
            module = importlib.import_module("aiohttp")
            importlib.import_module("httpx_aiohttp.transport")
        except ImportError:
            return None
        return cls(max_connections, timeout, module, max_head_bytes)

    def _get_session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            aiohttp = self._aiohttp
            # httpx's create_ssl_context() is what httpx-aiohttp used: certifi's bundle.
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                keepalive_timeout=_KEEPALIVE_EXPIRY,
                ssl=httpx.create_ssl_context(trust_env=False),
            )
            # aiohttp bounds each head line and the number of headers (128), not the total:
            # a line may not exceed the whole head's limit, and send() checks the total.
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                trust_env=False,
                max_line_size=self._max_head,
                max_field_size=self._max_head,
            )
        return session

    async def send(self, url: str, headers: Mapping[str, str], content: bytes) -> AiohttpResponse:
        session = self._get_session()
        aiohttp = self._aiohttp
        try:
            with self._map():
                response = await session.post(
                    url, data=content, headers=headers, allow_redirects=False, compress=False
                )
        except aiohttp.ClientResponseError as exc:
            # The head did not parse (httpx-aiohttp leaves this one unmapped): a line over
            # the limit or more than 128 headers is a head too large, anything else a
            # broken response; aiohttp has closed the connection. Its client re-raises
            # parser errors as a plain HttpProcessingError: only the message tells them.
            text = str(exc.__cause__ or exc)
            if "Got more than" in text or "Too many headers" in text:
                raise ResponseHeadTooLarge(self._max_head) from exc
            raise httpx.RemoteProtocolError("invalid HTTP response from the upstream") from exc
        reason = response.reason or ""
        if head_size(13 + len(reason), response.raw_headers) > self._max_head:
            response.close()
            raise ResponseHeadTooLarge(self._max_head)
        return AiohttpResponse(response, self._map, self._idle)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class AiohttpResponse:
    """An aiohttp response shaped like the parts of `httpx.Response` the relay uses."""

    __slots__ = ("_idle", "_map", "_response", "_timer", "_waiting_since", "is_stream_consumed")

    def __init__(
        self, response: aiohttp.ClientResponse, map_errors: Any, idle: float | None
    ) -> None:
        self._response = response
        self._map = map_errors
        self._idle = idle
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0  # loop time the relay began waiting for data; 0: not waiting
        self.is_stream_consumed = False

    @property
    def status_code(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def content(self) -> bytes:
        raise httpx.ResponseNotRead()

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        # readany(): whatever the socket delivered since the last call, one chunk per wakeup.
        self.is_stream_consumed = True
        reader = self._response.content
        loop = asyncio.get_running_loop()
        if self._idle is not None:
            self._watch_idle(loop)
        with self._map():
            while True:
                self._waiting_since = loop.time()
                chunk = await reader.readany()
                self._waiting_since = 0.0
                if not chunk:
                    return
                yield chunk

    def _watch_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        # The idle limit of the body (timeout.read). aiohttp's sock_read re-arms a timer on
        # every socket read (a cancel and a call_later per chunk, ~5% of the proxy's CPU at
        # 500 streams); this one timer fires once per `read` seconds and looks at when the
        # relay began waiting. Time spent writing to a slow client is not upstream silence.
        connection = self._response.connection
        protocol = None if connection is None else connection.protocol
        if protocol is None:
            return  # the body is already complete: nothing to wait for
        protocol.read_timeout = None  # its timer armed for the headers lapses at the next read
        assert self._idle is not None
        self._timer = loop.call_later(self._idle, self._check_idle, loop)

    def _check_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._idle is not None
        since = self._waiting_since
        now = loop.time()
        if since and now - since >= self._idle:
            self._timer = None
            timeout_error = self._aiohttp_timeout_error()
            self._response.content.set_exception(timeout_error)
            return
        self._timer = loop.call_at((since or now) + self._idle, self._check_idle, loop)

    def _aiohttp_timeout_error(self) -> BaseException:
        # The error aiohttp's own sock_read raises; mapped to httpx.ReadTimeout.
        module = importlib.import_module("aiohttp")
        error: BaseException = module.SocketTimeoutError("Timeout on reading data from socket")
        return error

    async def aread(self) -> bytes:
        self.is_stream_consumed = True
        with self._map():
            return await self._response.read()

    async def aclose(self) -> None:
        # Released to the pool when read to its end; an unfinished body closes the
        # connection (aiohttp's should_close), so the upstream stops generating.
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        with self._map():
            await self._response.__aexit__(None, None, None)
