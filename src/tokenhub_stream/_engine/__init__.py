"""The HTTP/1.1 upstream engine: keep-alive pools of asyncio protocols over httptools'
C parser (`_http.py`), for callers that POST and stream the answer. It knows nothing of
its callers (the proxy and the clients).

`HttpEngine` and `HttpResponse` live in `_http.py`, their blocking twins `SyncEngine` and
`SyncResponse` in `_sync.py` (both on the sans-IO `_h1.py`), imported by callers only
when httptools is installed; the errors, limits and `shutdown` here import without it.
"""

from __future__ import annotations

from ._errors import DEFAULT_MAX_RESPONSE_HEAD_BYTES, ResponseHeadTooLarge
from ._shutdown import shutdown

__all__ = ["DEFAULT_MAX_RESPONSE_HEAD_BYTES", "ResponseHeadTooLarge", "shutdown"]
