"""`run_upstream`: serves a `FakeChatUpstream` with uvicorn in a daemon thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._upstream import FakeChatUpstream, closing_event

if TYPE_CHECKING:
    import uvicorn

_CUT_LOG_MESSAGE = "ASGI callable returned without completing response."


@dataclass(frozen=True, slots=True)
class RunningUpstream:
    """A `FakeChatUpstream` being served by `run_upstream`.

    ```python
    with run_upstream() as running:
        httpx.get(f"{running.base_url}/models")
    ```

    Attributes:
        app: the upstream being served.
        host: the address it listens on.
        port: the bound port.
        base_url: `http://<host>:<port>/v1`, ready for an OpenAI-style client.
    """

    app: FakeChatUpstream
    host: str
    port: int

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in `/v1`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"


class _DropCutLog(logging.Filter):
    """Hide uvicorn's error line for our own deliberate `cut`, from our thread only."""

    def __init__(self) -> None:
        super().__init__()
        self.thread_id: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.thread == self.thread_id and record.msg == _CUT_LOG_MESSAGE)


def wakeable_server(
    config: uvicorn.Config, serving: threading.Event | None = None
) -> uvicorn.Server:
    """A uvicorn server that `stop_server()` stops at once, and that sets `serving` (if
    given) once it serves.

    uvicorn looks at `should_exit` every 0.1 s; a test suite starts and stops hundreds of
    servers, so its loop waits on an event that `stop_server()` sets. (The subclass is
    made here, not at import: uvicorn is optional, and it derives from whatever
    `uvicorn.Server` is at call time.) The tests' own `serve()` uses it too.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if serving is not None:
                serving.set()

        async def main_loop(self) -> None:
            wake = asyncio.Event()
            self._wake = (asyncio.get_running_loop(), wake)
            ticks = 0
            while not await self.on_tick(ticks):
                ticks += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 0.1)

    return _Server(config)


def stop_server(server: uvicorn.Server) -> None:
    """Ask `server` (from `wakeable_server`) to exit, and wake its loop now."""
    server.should_exit = True
    found: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = getattr(server, "_wake", None)
    if found is not None:
        loop, wake = found
        with contextlib.suppress(RuntimeError):  # its loop has already closed
            loop.call_soon_threadsafe(wake.set)


@contextlib.contextmanager
def run_upstream(
    app: FakeChatUpstream | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 5.0,
) -> Iterator[RunningUpstream]:
    """Serve a `FakeChatUpstream` with uvicorn in a daemon thread.

    The socket is bound before the server starts (port 0 picks a free one), so there is
    no port race; the context manager waits until uvicorn serves and stops it on exit.
    It is a plain `with`, usable from sync tests and from asyncio or trio tests.

    ```python
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        with httpx.stream("POST", f"{running.base_url}/chat/completions", json=body) as r:
            for line in r.iter_lines():
                ...
    ```

    Args:
        app: the upstream to serve; a default `FakeChatUpstream()` when `None`.
        host: the address to bind.
        port: the port to bind; 0 picks a free one.
        log_level: uvicorn's log level.
        startup_timeout: the most seconds to wait for uvicorn to start.
        shutdown_timeout: the most seconds to wait for it to stop (then it is forced).

    Returns:
        A context manager yielding the `RunningUpstream`.

    Raises:
        ImportError: uvicorn is not installed (`pip install 'tokenhub_stream[cli]'`).
        RuntimeError: the server did not start in time.
        OSError: the address could not be bound.
    """
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(
            "run_upstream needs uvicorn; install it with: pip install 'tokenhub_stream[cli]'"
        ) from exc

    upstream = FakeChatUpstream() if app is None else app
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose protocol says TCP.
    # Without it, Nagle holds a response's second small write until the client's delayed
    # ACK, 40 ms later: every request would take 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        bound_port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            upstream,
            lifespan="off",
            log_level=log_level,
            log_config=None,
            ws="none",
            http="h11",
            loop="asyncio",
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(shutdown_timeout / 2)),
        )
        server = wakeable_server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"tokenhub-fake-upstream-{bound_port}",
            daemon=True,
        )
        log_filter = _DropCutLog()
        uvicorn_logger = logging.getLogger("uvicorn.error")
        uvicorn_logger.addFilter(log_filter)
        closing_event(upstream).clear()
        try:
            thread.start()
            log_filter.thread_id = thread.ident
            deadline = time.monotonic() + startup_timeout
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the fake upstream did not start")
                time.sleep(0.005)
            yield RunningUpstream(app=upstream, host=host, port=bound_port)
        finally:
            closing_event(upstream).set()
            stop_server(server)
            thread.join(shutdown_timeout)
            if thread.is_alive():  # pragma: no cover - only when a handler ignores shutdown
                server.force_exit = True
                thread.join(shutdown_timeout)
            uvicorn_logger.removeFilter(log_filter)
    finally:
        sock.close()
