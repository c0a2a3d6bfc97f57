"""The engine behind httpx's transport API: for code that speaks httpx (the client, and so
the proxy's server-side tool loop) to send over the same pools as the proxy's relay.

Only what the engine does: POST with a body, HTTP/1.1, the engine's own timeouts and
limits (httpx's per-request timeouts are not read). The response is httpx's, with the
engine's body as its stream, so httpx decodes nothing the caller did not ask it to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from ._http import HttpEngine, HttpResponse

__all__ = ["EngineTransport"]

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
        return httpx.Response(
            response.status_code,
            headers=list(response.headers.items()),
            stream=_Body(response),
            extensions={"http_version": b"HTTP/1.1"},
            request=request,
        )

    async def aclose(self) -> None:
        return None


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: HttpResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.aiter_raw():
            yield chunk

    async def aclose(self) -> None:
        # Unfinished: the socket closes now (the upstream stops generating); read to its
        # end: the connection went back to the pool already.
        self._response.close()
