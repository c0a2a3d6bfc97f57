"""A local OpenAI-compatible upstream for tests, examples and demos.

```python
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

upstream = FakeChatUpstream()
upstream.enqueue(Script(text="Hello!", end="cut"))
with run_upstream(upstream) as running:
    ...  # point a client at running.base_url
```

`FakeChatUpstream` is a plain ASGI app (no starlette) serving `POST /v1/chat/completions`
(streaming SSE and plain JSON) and `GET /v1/models`. Each chat request pops the next
`Script` from a FIFO queue; with no script left it answers deterministically: a reply that
quotes the last user message, or, when the request carries `tools`, a call to one of them
and then a reply that quotes the tool's result, or, with `response_format`, JSON made from
the schema and the user's words (see `FakeChatUpstream`). Scripts reproduce
the upstream quirks listed in
`PROVIDER_QUIRKS.md`: keep-alive comments, stalls, cut bodies, in-band error frames,
tool-call fragments without `index`, `reasoning` vs `reasoning_content`, Azure's empty
`choices`, Groq's `x_groq.usage`, OpenAI's structured-output refusals (`Script(refusal=...)`)
and raw byte streams.

`run_upstream` serves it with uvicorn (the `cli` extra) on a random loopback port in a
daemon thread, so it works from sync tests and from asyncio or trio tests alike.

Deliberate choices:

- Every SSE event is sent as its own `http.response.body` message, so with uvicorn's h11
  protocol each event is one HTTP chunk on the wire.
- `end="cut"` returns from the app without the final `more_body=False` message; uvicorn
  then closes the socket without the terminating zero-length chunk, which httpx reports
  as `httpx.RemoteProtocolError`. `run_upstream` hides uvicorn's one log line about it.
- A client disconnect is only recorded when it happens before the response is complete
  (uvicorn's `receive()` reports `http.disconnect` for every finished response too).
"""

from __future__ import annotations

import types
import warnings

from ._requests import ReceivedRequest
from ._script import Script, ScriptedToolCall, ScriptEnd, UsageStyle
from ._server import RunningUpstream, run_upstream
from ._upstream import DEFAULT_MODELS, FakeChatUpstream

__all__ = [
    "DEFAULT_MODELS",
    "FakeChatUpstream",
    "ReceivedRequest",
    "RunningUpstream",
    "Script",
    "ScriptEnd",
    "ScriptedToolCall",
    "UsageStyle",
    "run_upstream",
]

for _name in __all__:  # shown as tokenhub_stream.testing.X, as httpx does for its names
    _value = globals()[_name]
    if isinstance(_value, type | types.FunctionType):
        _value.__module__ = __name__
del _name, _value


def __getattr__(name: str) -> type[ScriptedToolCall]:
    # `ToolCall` was this module's name for a scripted call until it clashed with
    # `tokenhub_stream.ToolCall`, the assembled call of a result. The old name stays for
    # one release, with a warning, and then goes.
    if name == "ToolCall":
        warnings.warn(
            "tokenhub_stream.testing.ToolCall is deprecated; use ScriptedToolCall "
            "(tokenhub_stream.ToolCall is the assembled call of a result)",
            DeprecationWarning,
            stacklevel=2,
        )
        return ScriptedToolCall
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
