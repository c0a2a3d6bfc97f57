"""The one way the tests serve an ASGI app on a real socket.

`serve(app)` runs uvicorn on a random loopback port in a daemon thread with its own event
loop, so sync tests and asyncio or trio tests alike can talk to it over TCP:

```python
with serve(proxy) as base_url:
    httpx.get(f"{base_url}/healthz")
```

The conftests re-export it under their old names (`from .conftest import serve` keeps
working), with the options their tests rely on. The local upstream has its own
`tokenhub_stream.testing.run_upstream`, a public API on the same server
(`wakeable_server`: stopped at once instead of at uvicorn's next 0.1 s tick).

Importable as `servers`: pytest puts `tests/` on `sys.path` (tests/conftest.py sits there
without an `__init__.py`), as mypy does for the `tests` files.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

from tokenhub_stream.testing._server import stop_server, wakeable_server

#: Anything uvicorn serves as an ASGI 3 app: ChatProxy, Starlette, FastAPI, a plain callable.
ASGIApp = Callable[..., Awaitable[None]]

_STARTUP_TIMEOUT = 10.0


@contextlib.contextmanager
def serve(
    app: ASGIApp,
    *,
    lifespan: Literal["auto", "on", "off"] = "on",
    http: Literal["h11", "httptools"] = "h11",
    loop: Literal["asyncio", "uvloop"] = "asyncio",
    log_level: str = "warning",
    timeout_graceful_shutdown: int | None = None,
    stop_timeout: float = 10.0,
) -> Iterator[str]:
    """Serve `app` with uvicorn on a random loopback port; yield `http://127.0.0.1:<port>`.

    The socket is bound before the server starts, so there is no port race; the block
    runs once uvicorn serves, and the server is stopped (its thread joined) at exit.

    Args:
        app: the ASGI app.
        lifespan: uvicorn's `lifespan` ("on" fails the start if the app's startup fails;
            "auto" also serves apps that do not speak lifespan).
        http: the HTTP/1.1 implementation; h11 sends each body message as its own chunk.
        loop: the event loop of the server's thread.
        log_level: uvicorn's log level.
        timeout_graceful_shutdown: seconds uvicorn waits for open responses at exit
            (`None`: until they end).
        stop_timeout: the most seconds to wait for the server thread at exit.

    Raises:
        RuntimeError: uvicorn did not start within 10 s (or its thread died).
    """
    import uvicorn

    def run() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            serving.set()  # a failed start wakes the waiter too; `started` tells them apart

    serving = threading.Event()
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only then (else Nagle adds 40 ms per response).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            lifespan=lifespan,
            http=http,
            loop=loop,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=timeout_graceful_shutdown,
        )
        server = wakeable_server(config, serving)
        thread = threading.Thread(target=run, name=f"test-server-{port}", daemon=True)
        thread.start()
        try:
            if not serving.wait(_STARTUP_TIMEOUT) or not server.started:
                raise RuntimeError("uvicorn did not start")
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_server(server)
            thread.join(stop_timeout)
    finally:
        sock.close()
