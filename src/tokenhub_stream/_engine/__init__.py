"""The HTTP/1.1 upstream engine: keep-alive pools of asyncio protocols over httptools'
C parser (`_http.py`), for callers that POST and stream the answer. It knows nothing of
its callers (the proxy today).

`HttpEngine` and `HttpResponse` live in `_http.py`, imported by callers only when
httptools is installed; the errors and limits here import without it.
"""

from __future__ import annotations

from ._errors import DEFAULT_MAX_RESPONSE_HEAD_BYTES, ResponseHeadTooLarge

__all__ = ["DEFAULT_MAX_RESPONSE_HEAD_BYTES", "ResponseHeadTooLarge"]
