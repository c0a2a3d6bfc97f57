"""The engine's own errors and limits (no httptools needed to import them)."""

from __future__ import annotations

import httpx

__all__ = ["DEFAULT_MAX_RESPONSE_HEAD_BYTES", "ResponseHeadTooLarge"]


#: The largest upstream response head (status line and headers, interim 1xx heads included)
#: the proxy reads: h11's default limit for an incomplete event; nginx's proxy buffer is 4-8 KiB.
DEFAULT_MAX_RESPONSE_HEAD_BYTES = 16 * 1024


class ResponseHeadTooLarge(httpx.RemoteProtocolError):
    """The upstream's response head went past `max_response_head_bytes` (issue #14)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upstream's response head exceeds {limit} bytes")
        self.limit = limit
