"""The proxy's way to its upstream: our engine on asyncio, httpx for everything else.

`Upstreams` chooses once, on first use: with no `transport=` and on asyncio, the engine
(`tokenhub_stream._engine`, HTTP/1.1 over httptools' C parser, measured in
docs/performance.md, "Proxy benchmark"); under trio, or with a `transport=` (a test's
`httpx.MockTransport`, another HTTP stack), httpx. The relay reads either answer through
the few `httpx.Response` members `UpstreamResponse` names, and both raise httpx's
exception classes, so every error path of the proxy keeps its status and log line. The
server-side tool loop speaks httpx: on asyncio it gets an httpx client whose transport is
the same engine, so a tool turn and a plain stream share one pool.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Protocol

import httpx

from .._engine import ResponseHeadTooLarge

__all__: list[str] = []


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


def head_size(status_line: int, fields: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of a response head as sent: status line, `name: value` lines, blank line."""
    return status_line + 4 + sum(len(name) + len(value) + 4 for name, value in fields)


def httpx_head_size(response: httpx.Response) -> int:
    """`head_size` of an httpx response ("HTTP/1.1 200 " is 13 bytes before the reason)."""
    return head_size(13 + len(response.reason_phrase), response.headers.raw)


def is_h11_head_overflow(exc: httpx.RemoteProtocolError) -> bool:
    """h11's error for a head over its buffer (httpcore sets 100 KiB), raised by httpx."""
    return str(exc) == "Receive buffer too long"


async def check_head(response: httpx.Response, limit: int) -> httpx.Response:
    """`response`, or `ResponseHeadTooLarge` (the response closed) if its head is over
    `limit`: httpx's own bound is h11's buffer (100 KiB in httpcore)."""
    if httpx_head_size(response) > limit:
        await response.aclose()
        raise ResponseHeadTooLarge(limit)
    return response


class HttpxUpstream:
    """httpx as the proxy's upstream (a client on `transport`), its head bounded as the
    engine's."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout, max_head_bytes: int
    ) -> None:
        self.transport = transport
        self.client = httpx.AsyncClient(
            timeout=timeout, transport=transport, follow_redirects=False, trust_env=False
        )
        self._limit = max_head_bytes

    async def send(self, url: str, headers: Mapping[str, str], content: bytes) -> httpx.Response:
        request = self.client.build_request("POST", url, headers=headers, content=content)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.RemoteProtocolError as exc:
            if is_h11_head_overflow(exc):
                raise ResponseHeadTooLarge(self._limit) from exc
            raise
        return await check_head(response, self._limit)

    async def aclose(self) -> None:
        await self.client.aclose()


class Upstreams:
    """The proxy's upstream, chosen on first use (see the module's docstring)."""

    __slots__ = (
        "_connections",
        "_engine",
        "_engine_transport",
        "_head",
        "_httpx",
        "_timeout",
        "_transport",
        "native",
    )

    def __init__(
        self,
        *,
        max_connections: int,
        timeout: httpx.Timeout,
        max_head_bytes: int,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        self._connections = max_connections
        self._timeout = timeout
        self._head = max_head_bytes
        self._transport = transport
        self._engine: Upstream | None = None
        self._httpx: HttpxUpstream | None = None
        self._engine_transport: httpx.AsyncBaseTransport | None = None
        # True once the engine is chosen: its responses close synchronously, and the
        # relay needs no shielded cleanup for them.
        self.native = False

    def __repr__(self) -> str:
        chosen = "engine" if self._engine is not None else "httpx" if self._httpx else "none"
        return f"<Upstreams {chosen}>"

    @property
    def chosen(self) -> Upstream | None:
        """The upstream the relay sends through once one was chosen (for tests)."""
        return self._engine if self._engine is not None else self._httpx

    def get(self) -> Upstream:
        """The relay's upstream, chosen now if not yet."""
        engine = self._engine
        if engine is not None:
            return engine
        if self._httpx is None and self._transport is None and _engine_fits():
            from .._engine._http import HttpEngine

            self._engine = engine = HttpEngine(self._connections, self._timeout, self._head)
            self.native = True
            return engine
        return self._httpx_upstream()

    def tool_transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport on the same pool as the relay, for code that speaks httpx
        (the tool loop): the engine behind httpx's API when the relay uses the engine."""
        engine = self.get()
        if not self.native:
            return self._httpx_upstream().transport
        transport = self._engine_transport
        if transport is None:
            from .._engine._http import HttpEngine
            from .._engine._transport import EngineTransport

            assert isinstance(engine, HttpEngine)
            transport = self._engine_transport = EngineTransport(engine)
        return transport

    async def aclose(self) -> None:
        """Close every connection; the next request chooses again."""
        engine, self._engine = self._engine, None
        client, self._httpx = self._httpx, None
        self._engine_transport = None  # it leaves the engine to us
        self.native = False
        if engine is not None:
            await engine.aclose()
        if client is not None:
            await client.aclose()

    def _httpx_upstream(self) -> HttpxUpstream:
        upstream = self._httpx
        if upstream is None:
            transport = self._transport
            if transport is None:
                limits = httpx.Limits(
                    max_connections=self._connections,
                    max_keepalive_connections=self._connections,
                )
                transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
            upstream = self._httpx = HttpxUpstream(transport, self._timeout, self._head)
        return upstream


def _engine_fits() -> bool:
    # The engine runs on asyncio and needs httptools (the `asgi` extra).
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: trio
        return False
    return importlib.util.find_spec("httptools") is not None
