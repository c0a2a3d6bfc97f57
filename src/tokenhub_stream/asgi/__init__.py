"""A key-hiding streaming proxy for OpenAI-compatible chat completions, as a pure ASGI app.

```python
from starlette.applications import Starlette
from tokenhub_stream.asgi import ChatProxy

proxy = ChatProxy(api_key=os.environ["TOKENHUB_KEY"], base_url="https://api.sandboxclaw.com/v1")
app = Starlette(middleware=[proxy.middleware("/api/chat")])  # or routes=proxy.routes(...)
```

Deliberate divergences from the usual Starlette streaming endpoint, with reasons:

- Pure ASGI, not a `StreamingResponse`: the relay races the upstream against
  `http.disconnect` itself, also while waiting for the first token, because recent servers no
  longer make `StreamingResponse` notice a gone client before a write fails (the billing
  gotcha: tokens streamed to nobody).
- The upstream's SSE bytes are forwarded unchanged, cut only at event boundaries; the JSON is
  decoded (from a copy) only when `on_complete` or a `UsageLimiter` is set.
- The HTTP status is sent only once the upstream's 2xx headers arrive. After that the status
  is fixed, so a failure ends the stream with an OpenAI-shaped error frame and no `[DONE]`
  instead of a truncated answer that looks complete.
- `ChatProxy.routes(path)` instead of a bare `Mount`: Starlette's `Mount` answers an exact
  `POST /api/chat` with a 307 to `/api/chat/`, which `fetch` follows as a GET.
  `ChatProxy.middleware(path)` serves the same requests ahead of the app's routing: every
  open stream holds the coroutine chain above the proxy, and this one is shorter.
- No CORS headers at all; cross-site requests are refused (403) instead.
- The one exception to byte-exact passthrough: with `tools=`, the proxy runs the tool loop
  itself and writes its own `chat.completion.chunk` frames (content deltas only, tool
  progress as SSE comments, one `[DONE]`), so the browser never sees tool plumbing
  (`_tools.py`).
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "tokenhub_stream.asgi needs Starlette: pip install 'tokenhub_stream[asgi]'"
    ) from exc

from .._engine import DEFAULT_MAX_RESPONSE_HEAD_BYTES
from ._body import DEFAULT_ALLOWED_FIELDS
from ._buffers import DEFAULT_RESUME_TTL, InMemoryStreamBuffer, StreamBuffer, StreamInfo
from ._limits import InMemoryRateLimiter, RateLimiter, UsageLimiter
from ._proxy import (
    DEFAULT_FINISH_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_RESUMES_PER_PRINCIPAL,
    DEFAULT_PROXY_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    ChatProxy,
)
from ._record import CompletionRecord, TurnOutcome

__all__ = [
    "DEFAULT_ALLOWED_FIELDS",
    "DEFAULT_FINISH_TIMEOUT",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_MAX_RESPONSE_HEAD_BYTES",
    "DEFAULT_MAX_RESUMES_PER_PRINCIPAL",
    "DEFAULT_PROXY_TIMEOUT",
    "DEFAULT_RESUME_TTL",
    "DEFAULT_TOTAL_TIMEOUT",
    "ChatProxy",
    "CompletionRecord",
    "InMemoryRateLimiter",
    "InMemoryStreamBuffer",
    "RateLimiter",
    "StreamBuffer",
    "StreamInfo",
    "TurnOutcome",
    "UsageLimiter",
]

for _name in __all__:  # shown as tokenhub_stream.asgi.X (reprs, docs), as httpx does
    _value = globals()[_name]
    if isinstance(_value, type):
        _value.__module__ = __name__
del _name, _value


def __getattr__(name: str) -> object:
    # 0.x: `Outcome` was renamed `TurnOutcome` (it clashed with `tokenhub_stream.Outcome`,
    # the client's dataclass); the old name stays for one release.
    if name == "Outcome":
        import warnings

        warnings.warn(
            "tokenhub_stream.asgi.Outcome is deprecated: use tokenhub_stream.asgi.TurnOutcome",
            DeprecationWarning,
            stacklevel=2,
        )
        return TurnOutcome
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
