"""The engine behind httpx's API, for code that speaks httpx.

- `EngineTransport`: an httpx transport that sends over an `HttpEngine` (the proxy's
  server-side tool loop sends over the same pools as its relay this way).
- `as_httpx(response)`: an engine response (asyncio or blocking) as an `httpx.Response`,
  for a caller that shows one (the client's `stream.response`) or lets httpx decode a body
  the upstream compressed (`aiter_bytes()`/`iter_bytes()` through it).

Only what the engine does: POST with a body, HTTP/1.1, the engine's own timeouts and
limits (httpx's per-request timeouts are not read). The response is httpx's, with the
engine's body as its stream, so httpx decodes nothing the caller did not ask it to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx

from ._http import HttpEngine, HttpResponse
from ._sync import SyncResponse

__all__ = ["EngineTransport", "as_httpx"]

# Set by the engine itself (or meaningless on one connection the engine owns).
_DROPPED = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})


class EngineTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends through an `HttpEngine` (not closed by this transport:
    the engine belongs to whoever made it)."""

    def __init__(self, engine: HttpEngine) -> None:
        self._engine = engine

    def __repr__(self) -> str:
        return f"EngineTransport({self._engine!r})"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            raise httpx.UnsupportedProtocol(f"the engine only POSTs, not {request.method}")
        headers: dict[str, str] = {}
        for name, value in request.headers.raw:
            key = name.lower()
            if key not in _DROPPED:
                text = key.decode("latin-1")
                value_text = value.decode("latin-1")
                headers[text] = f"{headers[text]}, {value_text}" if text in headers else value_text
        content = await request.aread()
        response = await self._engine.send(str(request.url), headers, content)
        return as_httpx(response, request)

    async def aclose(self) -> None:
        return None


def as_httpx(
    response: HttpResponse | SyncResponse, request: httpx.Request | None = None
) -> httpx.Response:
    """`response` as an `httpx.Response`: its status, reason, headers, the engine's body as
    its stream (read through it, httpx decodes what the upstream compressed), whether it
    is closed, and httpcore's `network_stream` extension (`get_extra_info`)."""
    stream: httpx.AsyncByteStream | httpx.SyncByteStream = (
        _Body(response) if isinstance(response, HttpResponse) else _SyncBody(response)
    )
    return _EngineResponse(
        response,
        response.status_code,
        headers=list(response.headers.items()),
        stream=stream,
        extensions={
            "http_version": b"HTTP/1.1",
            "reason_phrase": response.reason_phrase.encode("latin-1"),
            "network_stream": _NetworkStream(response),
        },
        request=request,
    )


class _EngineResponse(httpx.Response):
    """An `httpx.Response` over an engine response: closed when the engine's is."""

    def __init__(self, engine_response: HttpResponse | SyncResponse, *args: object, **kw: object):
        self._engine_response = engine_response
        super().__init__(*args, **kw)  # type: ignore[arg-type]

    @property
    def is_closed(self) -> bool:
        return self._engine_response.is_closed

    @is_closed.setter
    def is_closed(self, value: bool) -> None:
        # httpx sets it as it closes the response, which closes the engine's.
        return None


class _NetworkStream:
    """What httpx's `network_stream` extension offers to read: `get_extra_info`."""

    __slots__ = ("_response",)

    def __init__(self, response: HttpResponse | SyncResponse) -> None:
        self._response = response

    def get_extra_info(self, name: str) -> object:
        return self._response.get_extra_info(name)


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: HttpResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        # Unfinished: the socket closes now (the upstream stops generating); read to its
        # end: the connection goes back to the pool.
        self._response.close()


class _SyncBody(httpx.SyncByteStream):
    def __init__(self, response: SyncResponse) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self._response.iter_raw()

    def close(self) -> None:
        self._response.close()
