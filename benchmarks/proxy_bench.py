"""Proxy benchmark: direct vs nginx vs a naive Starlette+httpx proxy vs ChatProxy.

Run (inside the project's virtualenv; nginx is used if it is on PATH):

    python benchmarks/proxy_bench.py                       # 1, 100 and 500 streams
    python benchmarks/proxy_bench.py --streams 1 100 --targets direct chatproxy
    python benchmarks/proxy_bench.py --streams 500 --targets chatproxy --profile /tmp/prof
    python benchmarks/proxy_bench.py --streams 100 --targets chatproxy --tracemalloc /tmp/tm
    python benchmarks/proxy_bench.py --burst 500 --targets direct nginx bare chatproxy

Targets: direct, nginx, naive, chatproxy-httpx (ChatProxy over httpx's own transport),
chatproxy (its default: our HTTP/1.1 engine on httptools, mounted with `proxy.routes()` in
Starlette), chatproxy-mw (the same proxy as `proxy.middleware()` of a Starlette app) and
chatproxy-asgi (the same proxy as uvicorn's whole app, no Starlette). (The aiohttp
targets went with the aiohttp code, 2026-12-06; `--baseline` compares a revision with
this one.) A target named `NAME!nootel` is NAME with opentelemetry made unimportable in its
process (without the `otel` extra); NAME itself runs with opentelemetry-api importable and
no provider configured, telemetry off. `--profile` and `--tracemalloc` slow the proxy
they watch, so their runs' columns are not comparable with plain runs.

`--deciles` also prints, for the largest `--streams` step, the TTFB p50 of each tenth of the
streams in the order they were opened.

`--burst N` measures only the opening burst: N one-chunk streams at once, five times.

Two targets have no upstream at all: `bare`, an ASGI app under uvicorn that writes the
events itself, and `bare-starlette`, the same app inside Starlette. They measure what
uvicorn and Starlette cost before any proxying: in `--burst` one event per request, and in
the paced runs the same 100 events, 20 ms apart, each after an `asyncio.sleep`.

Every process runs on this machine, on loopback only:

- a paced upstream (asyncio protocols, on uvloop when it is installed): per stream 100
  chunks, 20 ms apart, each SSE event one HTTP chunk; it records when it sees a client
  close its connection;
- the proxies under test, each in its own uvicorn process (one worker), so their CPU time
  (utime+stime from /proc) and RSS can be read per process;
- the load generator (asyncio protocols over raw sockets, on uvloop when it is installed),
  which measures time to first byte, the gaps between events, and whether each stream
  arrived complete.

The upstream and the load generator share the two cores with the target, so they are kept
lean: the last column, "harness", is the CPU they spent per stream, CPU the target did not
get. (Until 2026-11-29 they were stdlib asyncio streams and took 5.4–7.2 ms per stream at
500 streams, most of the box; now 2.0–2.8.)

Reported per target and concurrency: CPU ms per stream, RSS KiB per stream (peak minus idle),
TTFB p50/p99, the p99 inter-event gap minus the direct run's p99, complete streams and the
harness's CPU per stream. Then
one stream "as fast as the upstream can send" (no pacing, 5,000 chunks), the time from a
client abort to the upstream seeing its connection closed, and each proxy against nginx in
the same run (CPU and KiB as ratios, the TTFB p50 added to direct's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNKS = 100
FAST_CHUNKS = 5000
PACE = 0.02
KEY = "sk-bench-not-a-real-key"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _event(i: int) -> bytes:
    payload = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- the paced upstream -----------------------------------------------------------------------
#
# Protocols with call_later pacing, on uvloop when it is installed: the harness's own CPU is
# CPU the target does not get on this 2-core box, so the upstream and the load generator are
# written to spend as little as they can (their CPU is printed per step, column "harness").

_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
_END = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _uvloop() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def _run(main: Any) -> Any:
    # The harness's event loop: uvloop when installed, asyncio's own otherwise.
    uvloop = _uvloop()
    if uvloop is None:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class _Upstream(asyncio.Protocol):
    """One connection to the paced upstream: requests one after another (keep-alive)."""

    closed: dict[str, float] = {}  # bench id -> when its client's close was seen
    events: list[bytes] = []  # built once the upstream process starts, not on import

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.streaming = False
        self.paused = False
        self.fast = False
        self.sent = 0
        self.count = 0
        self.bench_id: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.streaming:
            self._next_request()

    def eof_received(self) -> bool | None:
        self._gone()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.streaming and self.fast:
            self._pump()

    def _gone(self) -> None:
        if self.streaming:
            self.streaming = False
            if self.timer is not None:
                self.timer.cancel()
            if isinstance(self.bench_id, str):
                self.closed[self.bench_id] = time.monotonic()
        if self.transport is not None:
            self.transport.close()

    def _next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self.buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        raw, self.buffer = self.buffer[end + 4 : end + 4 + length], self.buffer[end + 4 + length :]
        assert self.transport is not None
        if lines[0].split(" ")[1].startswith("/closed"):
            payload = json.dumps(self.closed).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            return self._next_request()
        body: dict[str, object] = {}
        with contextlib.suppress(ValueError):
            body = json.loads(raw) if raw else {}
        # Proxies forward only allow-listed body fields: "user" names an abort trial,
        # "max_tokens" asks for an unpaced stream of that many chunks, "seed" for a longer
        # paced stream (the --tracemalloc probe).
        self.bench_id = body.get("user")
        self.fast = isinstance(body.get("max_tokens"), int)
        seed = body.get("seed")
        self.count = CHUNKS
        if self.fast:
            self.count = int(body["max_tokens"])  # type: ignore[call-overload]
        elif isinstance(seed, int):
            self.count = seed
        self.sent = 0
        self.streaming = True
        self.transport.write(_HEAD)
        if self.fast:
            self._pump()
        else:
            self.timer = self.loop.call_later(PACE, self._tick)

    def _tick(self) -> None:
        # One paced event, 20 ms after the one before it.
        self.timer = None
        assert self.transport is not None
        self.transport.write(self.events[self.sent % FAST_CHUNKS])
        self.sent += 1
        if self.sent < self.count:
            self.timer = self.loop.call_later(PACE, self._tick)
        else:
            self._finish()

    def _pump(self) -> None:
        assert self.transport is not None
        while self.sent < self.count and not self.paused and self.streaming:
            self.transport.write(self.events[self.sent % FAST_CHUNKS])
            self.sent += 1
        if self.sent >= self.count and self.streaming:
            self._finish()

    def _finish(self) -> None:
        assert self.transport is not None
        self.transport.write(_END)
        self.streaming = False
        self._next_request()


async def _upstream_main(port_file: str) -> None:
    _Upstream.events = [_chunk(_event(i)) for i in range(FAST_CHUNKS)]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    with open(port_file, "w") as f:  # noqa: ASYNC230 - once, before serving
        f.write(str(port))
    async with server:
        await server.serve_forever()


# --- the apps under test ----------------------------------------------------------------------


def _naive_app(upstream: str) -> object:
    # Written like the usual tutorial: StreamingResponse over aiter_raw(), httpx's defaults.
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=None)

    async def chat(request: Request) -> StreamingResponse:
        body = await request.body()
        req = client.build_request(
            "POST",
            upstream + "/v1/chat/completions",
            content=body,
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        )
        response = await client.send(req, stream=True)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            finally:
                await response.aclose()

        return StreamingResponse(relay(), media_type="text/event-stream")

    return Starlette(routes=[Route("/api/chat", chat, methods=["POST"])])


def _chatproxy_app(upstream: str, transport_name: str = "default") -> object:
    import httpx
    from starlette.applications import Starlette

    from tokenhub_stream.asgi import ChatProxy

    transport: httpx.AsyncBaseTransport | None = None  # the default: ours on httptools
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    if transport_name == "httpx":
        transport = httpx.AsyncHTTPTransport(limits=limits)
    proxy = ChatProxy(
        api_key=KEY, base_url=upstream + "/v1", keepalive_interval=None, transport=transport
    )
    if transport_name == "asgi":  # ChatProxy itself is the app, answering POST /
        return proxy
    if transport_name == "mw":  # proxy.middleware(): ahead of the app's routing
        from starlette.responses import PlainTextResponse
        from starlette.routing import Route

        async def page(request: Any) -> PlainTextResponse:
            return PlainTextResponse("the app's own page")

        middleware = [proxy.middleware("/api/chat")]
        return Starlette(routes=[Route("/", page)], middleware=middleware, lifespan=proxy.lifespan)
    return Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)


def _bare_app(kind: str) -> Any:
    # An app with no upstream that writes the events and [DONE] itself: what uvicorn (and
    # Starlette) cost before any proxying. In --burst (the body asks for "max_tokens") one
    # event at once; otherwise the paced upstream's 100 events, 20 ms apart, from a sleep.
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        count = 1 if b"max_tokens" in message.get("body", b"") else CHUNKS
        start = {"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS}
        await send(start)
        for i in range(count):
            if count > 1:
                await asyncio.sleep(PACE)
            await send({"type": "http.response.body", "body": _event(i), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    if kind == "bare":
        return bare
    from starlette.applications import Starlette
    from starlette.routing import Route

    class Endpoint:  # an ASGI app as the endpoint, as ChatProxy.routes() mounts it
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await bare(scope, receive, send)

    return Starlette(routes=[Route("/api/chat", Endpoint())])


_SSE_HEADERS = [(b"content-type", b"text/event-stream")]


def _serve_app(kind: str, upstream: str, port: int, loop: str, http: str, probe: str) -> None:
    import uvicorn

    if kind == "naive":
        app = _naive_app(upstream)
    elif kind.startswith("bare"):
        app = _bare_app(kind)
    else:
        app = _chatproxy_app(upstream, kind.partition("-")[2] or "default")
    threshold = os.environ.get("PROXY_BENCH_GC_THRESHOLD")
    if threshold or os.environ.get("PROXY_BENCH_GC_FREEZE"):
        # --gc-freeze: what a deployment following docs/deployment.md does once its app
        # has started. What is alive now (modules, classes, functions: tens of thousands
        # of objects) moves to the permanent generation, which full collections skip.
        # uvicorn's own modules are imported first, as they would be by then.
        import gc
        import importlib

        for name in (
            "uvicorn.server",
            "uvicorn.lifespan.on",
            f"uvicorn.protocols.http.{http}_impl",
            loop,  # uvloop, or asyncio (already loaded)
        ):
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        gc.collect()
        gc.freeze()
        if threshold:  # --gc-threshold N: also a generation-0 threshold of N
            gc.set_threshold(int(threshold))
    with _probe(probe):
        uvicorn.run(
            app,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            loop=loop,
            http=http,
            backlog=2048,
        )


@contextlib.contextmanager
def _probe(spec: str) -> Iterator[None]:
    # "-": none. "profile:FILE": cProfile of the whole serving process, dumped to FILE at
    # exit. "tracemalloc:BASE": the k-th SIGUSR1 writes the allocations alive at that
    # moment, by file and by traceback, to BASE-k.txt (the load generator sends it while
    # the streams of its k-th run are open).
    kind, _, path = spec.partition(":")
    if kind == "profile":
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            profiler.dump_stats(path)
        return
    if kind == "tracemalloc":
        import tracemalloc

        tracemalloc.start(12)
        taken = 0
        baseline: list[tracemalloc.Snapshot] = []

        def snapshot(signum: int, frame: object) -> None:
            # Odd signals take the idle baseline, even ones write what grew since.
            nonlocal taken
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            if not baseline:
                baseline.append(snap)
                return
            taken += 1
            before = baseline.pop()
            with open(f"{path}-{taken}.txt", "w") as f:
                for by, top in (("filename", 30), ("lineno", 40), ("traceback", 25)):
                    stats = snap.compare_to(before, by)
                    total = sum(s.size_diff for s in stats)
                    f.write(f"== grew by {by}: {total / 1024:.0f} KiB\n")
                    for stat in stats[:top]:
                        f.write(f"{stat.size_diff / 1024:9.1f} KiB {stat.count_diff:7d} blocks\n")
                        lines = stat.traceback.format(limit=12 if by == "traceback" else 1)
                        f.write("\n".join("    " + line for line in lines) + "\n")

        signal.signal(signal.SIGUSR1, snapshot)
    yield


# --- process helpers --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Target:
    name: str
    port: int
    pids: list[int] = field(default_factory=list)
    path: str = "/api/chat"


@contextlib.contextmanager
def _start_upstream() -> Iterator[Target]:
    with tempfile.NamedTemporaryFile("r", suffix=".port") as f:
        proc = subprocess.Popen([sys.executable, __file__, "_upstream", f.name])
        try:
            deadline = time.monotonic() + 10
            while not open(f.name).read().strip():
                if time.monotonic() > deadline:
                    raise RuntimeError("upstream did not start")
                time.sleep(0.05)
            yield Target("upstream", int(open(f.name).read()), [proc.pid])
        finally:
            proc.terminate()
            proc.wait(5)


@contextlib.contextmanager
def _start_target(
    name: str, upstream_port: int, loop: str, http: str, probe: str = "-"
) -> Iterator[Target]:
    if name == "direct":
        yield Target(name, upstream_port, path="/v1/chat/completions")
        return
    port = _free_port()
    if name == "nginx":
        tmp = tempfile.mkdtemp()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(_NGINX_CONF % {"tmp": tmp, "port": port, "upstream": upstream_port})
        proc = subprocess.Popen(["nginx", "-c", conf, "-p", tmp, "-g", "daemon off;"])
        try:
            _wait_port(port)
            time.sleep(0.2)
            children = _children(proc.pid)
            yield Target(name, port, [proc.pid, *children], path="/v1/chat/completions")
        finally:
            proc.send_signal(signal.SIGQUIT)
            proc.wait(5)
            shutil.rmtree(tmp, ignore_errors=True)
        return
    kind, _, rev = name.partition("@")
    kind, _, without = kind.partition("!")
    env = None
    if rev:  # NAME@REV: the same target on another revision's src/ (--baseline)
        env = dict(os.environ, PYTHONPATH=_BASELINES[rev])
    if without == "nootel":  # NAME!nootel: as if the otel extra were not installed
        env = dict(env or os.environ, PROXY_BENCH_BLOCK="opentelemetry")
    cmd = [sys.executable, __file__, "_serve", kind, str(upstream_port), str(port), loop, http]
    cmd.append(probe)
    proc = subprocess.Popen(cmd, env=env)
    try:
        _wait_port(port)
        yield Target(name, port, [proc.pid], path="/" if kind == "chatproxy-asgi" else "/api/chat")
    finally:
        # SIGINT, not SIGTERM: uvicorn re-raises the signal after its shutdown, and only
        # SIGINT (KeyboardInterrupt) lets the profiler's finally write its file.
        proc.send_signal(signal.SIGINT)
        proc.wait(5)


# --baseline REV: REV -> the src/ of a `git archive` of it, for targets named NAME@REV.
_BASELINES: dict[str, str] = {}


@contextlib.contextmanager
def _checkout(rev: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        archive = subprocess.run(
            ["git", "-C", os.path.dirname(HERE), "archive", rev, "src"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield os.path.join(tmp, "src")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


_NGINX_CONF = """
worker_processes 1;
error_log %(tmp)s/error.log error;
pid %(tmp)s/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(tmp)s;
    proxy_temp_path %(tmp)s;
    upstream up { server 127.0.0.1:%(upstream)d; keepalive 600; }
    server {
        listen 127.0.0.1:%(port)d backlog=2048;
        location / {
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }
    }
}
"""


# --- the load generator -----------------------------------------------------------------------


@dataclass
class StreamResult:
    ttfb: float | None = None
    gaps: list[float] = field(default_factory=list)
    events: int = 0
    complete: bool = False


def _request(port: int, path: str, **fields: object) -> bytes:
    body = json.dumps({**json.loads(BODY), **fields}).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Stream(asyncio.Protocol):
    """One stream of the load generator: times each read that completes an event."""

    def __init__(self, request: bytes, result: StreamResult, abort: bool) -> None:
        self.request = request
        self.result = result
        self.abort = abort
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.start = 0.0
        self.last: float | None = None
        self.seen = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.start = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        result = self.result
        seen, self.seen = self.seen, data[-1:]
        n = data.count(b"\n\n") + (1 if seen == b"\n" and data.startswith(b"\n") else 0)
        if n:
            if result.ttfb is None:
                result.ttfb = now - self.start
            elif self.last is not None:
                result.gaps.append(now - self.last)
            self.last = now
            result.events += n
            if self.abort:
                return self._end()
        if b"[DONE]" in data or (result.events >= CHUNKS + 1 and b"0\r\n\r\n" in data):
            result.complete = result.events >= CHUNKS + 1
            self._end()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


async def _one_stream(
    port: int, path: str, result: StreamResult, abort_id: str | None = None, chunks: int = 0
) -> None:
    fields: dict[str, object] = {"user": abort_id} if abort_id else {}
    if chunks:
        fields["seed"] = chunks
    request = _request(port, path, **fields)
    loop = asyncio.get_running_loop()
    _, stream = await loop.create_connection(
        lambda: _Stream(request, result, abort_id is not None), "127.0.0.1", port
    )
    try:
        await stream.done
    finally:
        stream._end()


async def _run_load(target: Target, streams: int) -> list[StreamResult]:
    results = [StreamResult() for _ in range(streams)]
    await asyncio.gather(*(_one_stream(target.port, target.path, r) for r in results))
    return results


def _burst(target: Target, streams: int) -> tuple[float, float]:
    # Streams of one chunk ("max_tokens": 1, unpaced), all opened at once: the CPU per
    # request and the TTFB p50 of the opening burst, without the relay of paced chunks.
    async def one() -> float | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        start = time.monotonic()
        writer.write(_request(target.port, target.path, max_tokens=1))
        seen = b""
        first: float | None = None
        while b"[DONE]" not in seen:
            data = await reader.read(65536)
            if not data:
                break
            if first is None and b"data:" in data:
                first = time.monotonic() - start
            seen += data
        writer.close()
        return first

    async def main() -> list[float | None]:
        return await asyncio.gather(*(one() for _ in range(streams)))

    cpu0 = sum(_cpu_seconds(p) for p in target.pids)
    ttfbs = _run(main())
    cpu = sum(_cpu_seconds(p) for p in target.pids) - cpu0
    cpu_ms = 1000 * cpu / streams if target.pids else float("nan")
    return cpu_ms, 1000 * _pct([t for t in ttfbs if t is not None], 0.5)


def _burst_main(args: argparse.Namespace, targets: list[str]) -> None:
    print(f"# bursts of {args.burst} one-chunk streams, 5 per target; loop={args.loop}")
    print("| target | CPU ms/request (5 bursts) | TTFB p50 ms (5 bursts) |")
    print("| --- | ---: | ---: |")
    with _start_upstream() as upstream:
        for name in targets:
            with _start_target(name, upstream.port, args.loop, args.http) as target:
                _burst(target, 50)  # warm up
                runs = [_burst(target, args.burst) for _ in range(5)]
                cpu = " / ".join(f"{c:.2f}" for c, _ in runs)
                ttfb = " / ".join(f"{t:.0f}" for _, t in runs)
                print(f"| {name} | {cpu} | {ttfb} |", flush=True)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _measure(
    target: Target,
    streams: int,
    snapshot: bool = False,
    order: list[float] | None = None,
    upstream: Target | None = None,
) -> dict[str, float]:
    # `order`, if given, receives the TTFB median of each tenth of the streams, in the
    # order they were opened (--deciles). With `upstream`, "harness_ms" is the CPU the
    # upstream and this load generator spent per stream: CPU the target did not get.
    harness = upstream.pids if upstream is not None else []
    harness0 = time.process_time() + sum(_cpu_seconds(p) for p in harness)
    cpu0 = sum(_cpu_seconds(p) for p in target.pids)
    rss0 = sum(_rss_kib(p) for p in target.pids)
    peak = rss0
    stop = False

    async def sampler() -> None:
        nonlocal peak
        while not stop:
            peak = max(peak, sum(_rss_kib(p) for p in target.pids))
            await asyncio.sleep(0.05)

    async def snapshot_load() -> list[StreamResult]:
        # Long streams (60 s); the allocation diff is taken once every stream has begun.
        results = [StreamResult() for _ in range(streams)]
        for pid in target.pids:
            os.kill(pid, signal.SIGUSR1)  # the idle baseline
        load = asyncio.gather(
            *(_one_stream(target.port, target.path, r, chunks=3000) for r in results)
        )
        for _ in range(1200):
            await asyncio.sleep(0.1)
            if all(r.ttfb is not None for r in results):
                break
        await asyncio.sleep(0.5)
        for pid in target.pids:
            os.kill(pid, signal.SIGUSR1)
        await asyncio.sleep(1.0)  # the snapshot blocks the proxy while it is taken
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
        return results

    async def main() -> list[StreamResult]:
        nonlocal stop
        task = asyncio.ensure_future(sampler())
        try:
            if snapshot:
                return await snapshot_load()
            return await _run_load(target, streams)
        finally:
            stop = True
            await task

    results = _run(main())
    cpu = sum(_cpu_seconds(p) for p in target.pids) - cpu0
    harness_cpu = time.process_time() + sum(_cpu_seconds(p) for p in harness) - harness0
    gaps = [g for r in results for g in r.gaps]
    ttfbs = [r.ttfb for r in results if r.ttfb is not None]
    if order is not None:
        tenth = max(1, streams // 10)
        for i in range(0, streams, tenth):
            part = [r.ttfb for r in results[i : i + tenth] if r.ttfb is not None]
            order.append(1000 * _pct(part, 0.5))
    return {
        "cpu_ms": 1000 * cpu / streams if target.pids else float("nan"),
        "kib": (peak - rss0) / streams if target.pids else float("nan"),
        "ttfb_p50": 1000 * _pct(ttfbs, 0.5),
        "ttfb_p99": 1000 * _pct(ttfbs, 0.99),
        "gap_p99": 1000 * _pct(gaps, 0.99),
        "complete": sum(r.complete for r in results),
        "harness_ms": 1000 * harness_cpu / streams,
    }


def _fast_stream(target: Target) -> float:
    async def main() -> float:
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        writer.write(_request(target.port, target.path, max_tokens=FAST_CHUNKS))
        start = time.monotonic()
        while True:
            data = await reader.read(65536)
            if not data or b"[DONE]" in data:
                break
        writer.close()
        return time.monotonic() - start

    return _run(main())


def _abort_latency(target: Target, upstream_port: int, trials: int = 5) -> float:
    async def main() -> float:
        delays = []
        for i in range(trials):
            bench_id = f"abort-{target.name}-{i}-{time.monotonic_ns()}"
            await _one_stream(target.port, target.path, StreamResult(), abort_id=bench_id)
            aborted = time.monotonic()
            closed_at = None
            for _ in range(200):
                await asyncio.sleep(0.01)
                reader, writer = await asyncio.open_connection("127.0.0.1", upstream_port)
                writer.write(b"GET /closed HTTP/1.1\r\nhost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                closed = json.loads(await reader.readexactly(length))
                writer.close()
                if bench_id in closed:
                    closed_at = closed[bench_id]
                    break
            delays.append((closed_at - aborted) if closed_at else float("inf"))
        return statistics.median(delays)

    return _run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 100, 500])
    parser.add_argument(
        "--targets", nargs="+", default=["direct", "nginx", "naive", "chatproxy-httpx", "chatproxy"]
    )
    parser.add_argument("--loop", default="asyncio", help="uvicorn --loop for the Python proxies")
    parser.add_argument("--http", default="h11", help="uvicorn --http for the Python proxies")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="run each Python proxy under cProfile; write DIR/<target>.prof and print its top",
    )
    parser.add_argument(
        "--tracemalloc",
        metavar="DIR",
        help="trace each Python proxy's allocations: the k-th --streams run opens 60 s "
        "streams and writes DIR/<target>-<k>.txt, what grew from idle to all streams open "
        "(slows the proxy; the other columns are then meaningless)",
    )
    parser.add_argument(
        "--burst",
        type=int,
        metavar="N",
        help="instead: bursts of N one-chunk streams, CPU per request and TTFB p50 "
        "(targets bare and bare-starlette, uvicorn with no upstream, work here too)",
    )
    parser.add_argument(
        "--deciles",
        action="store_true",
        help="also print, per target, the TTFB p50 of each tenth of the streams of the "
        "largest --streams step, in the order they were opened",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="in every Python target: gc.freeze() once the app is built (docs/deployment.md)",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        metavar="N",
        help="in the Python proxies: gc.freeze() after startup and generation 0 threshold N",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        nargs="+",
        default=[],
        help="also run each ChatProxy target as of git revision REV (NAME@REV, from a "
        "`git archive` of its src/), right after the same target: before/after in one run",
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        for rev in args.baseline:
            _BASELINES[rev] = stack.enter_context(_checkout(rev))
        if args.baseline:
            paired: list[str] = []
            for name in args.targets:
                paired.append(name)
                if name.startswith("chatproxy"):
                    paired.extend(f"{name}@{rev}" for rev in args.baseline)
            args.targets = paired
        _main(args)


def _main(args: argparse.Namespace) -> None:
    if args.gc_threshold:
        os.environ["PROXY_BENCH_GC_THRESHOLD"] = str(args.gc_threshold)
    if args.gc_freeze:
        os.environ["PROXY_BENCH_GC_FREEZE"] = "1"
    targets = [t for t in args.targets if t != "nginx" or shutil.which("nginx")]
    if args.burst:
        _burst_main(args, targets)
        return
    harness = "asyncio" if _uvloop() is None else "uvloop"
    print(
        f"# {CHUNKS} chunks x {PACE * 1000:.0f} ms per stream; loop={args.loop} "
        f"http={args.http}; harness on {harness}"
    )
    print(
        "| target | streams | CPU ms/stream | KiB/stream | TTFB p50 ms | TTFB p99 ms "
        "| gap p99 ms | added gap p99 ms | complete | harness CPU ms/stream |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    extra: list[str] = []
    by_order: list[str] = []
    with _start_upstream() as upstream:
        direct_gap: dict[int, float] = {}
        rows: dict[tuple[str, int], dict[str, float]] = {}
        for name in targets:
            probe = "-"
            if args.profile and name not in ("direct", "nginx"):
                os.makedirs(args.profile, exist_ok=True)
                probe = "profile:" + os.path.join(args.profile, f"{name}.prof")
            elif args.tracemalloc and name not in ("direct", "nginx"):
                os.makedirs(args.tracemalloc, exist_ok=True)
                probe = "tracemalloc:" + os.path.join(args.tracemalloc, name)
            with _start_target(name, upstream.port, args.loop, args.http, probe) as target:
                _measure(target, 5)  # warm up
                for n in args.streams:
                    order: list[float] | None = None
                    if args.deciles and n == max(args.streams):
                        order = []
                    m = _measure(target, n, probe.startswith("tracemalloc:"), order, upstream)
                    if order:
                        cells = " | ".join(f"{t:.0f}" for t in order)
                        by_order.append(f"| {name} | {cells} |")
                    rows[name, n] = m
                    if name == "direct":
                        direct_gap[n] = m["gap_p99"]
                    added = m["gap_p99"] - direct_gap.get(n, float("nan"))
                    print(
                        f"| {name} | {n} | {m['cpu_ms']:.2f} | {m['kib']:.1f} | "
                        f"{m['ttfb_p50']:.1f} | {m['ttfb_p99']:.1f} | {m['gap_p99']:.1f} | "
                        f"{added:+.1f} | {int(m['complete'])}/{n} | {m['harness_ms']:.2f} |",
                        flush=True,
                    )
                if name.startswith("bare"):  # no upstream: nothing to relay or to close
                    extra.append(f"| {name} | – | – |")
                    continue
                fast = _fast_stream(target)
                abort = _abort_latency(target, upstream.port)
                extra.append(
                    f"| {name} | {FAST_CHUNKS / fast:,.0f} chunks/s | {abort * 1000:.1f} ms |"
                )
    if args.profile:
        import pstats

        for name in targets:
            path = os.path.join(args.profile, f"{name}.prof")
            if os.path.exists(path):
                print(f"\n# {name}: cProfile, top 30 by own time ({path})")
                pstats.Stats(path).sort_stats("tottime").print_stats(30)
    print()
    print("| target | one unpaced stream (5,000 chunks) | upstream closed after abort (median) |")
    print("| --- | ---: | ---: |")
    print("\n".join(extra))
    _print_ratios(rows, targets, args.streams)
    if by_order:
        print(f"\n# TTFB p50 ms of each tenth of the {max(args.streams)} streams, in opening order")
        print("| target | " + " | ".join(f"{k}" for k in range(1, 11)) + " |")
        print("| --- |" + " ---: |" * 10)
        print("\n".join(by_order))


def _print_ratios(
    rows: dict[tuple[str, int], dict[str, float]], targets: list[str], streams: list[int]
) -> None:
    # The same run's figures as ratios to nginx, and the TTFB p50 each target adds to the
    # direct one: the columns that move between runs move together, the ratios less.
    proxies = [t for t in targets if t not in ("direct", "nginx")]
    if not proxies or not any(("nginx", n) in rows for n in streams):
        return
    print("\n# against nginx and direct in this run")
    print("| target | streams | CPU / nginx | KiB / nginx | added TTFB p50 ms (nginx) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in proxies:
        for n in streams:
            m, ref, direct = rows.get((name, n)), rows.get(("nginx", n)), rows.get(("direct", n))
            if m is None or ref is None or n < 100:  # 1 stream: 10 ms ticks, noise
                continue
            added = ref_added = float("nan")
            if direct is not None:
                added = m["ttfb_p50"] - direct["ttfb_p50"]
                ref_added = ref["ttfb_p50"] - direct["ttfb_p50"]
            cpu = m["cpu_ms"] / ref["cpu_ms"] if ref["cpu_ms"] > 0 else float("nan")
            kib = m["kib"] / ref["kib"] if ref["kib"] > 0 else float("nan")
            print(f"| {name} | {n} | {cpu:.2f} | {kib:.2f} | {added:+.1f} ({ref_added:+.1f}) |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        _run(_upstream_main(sys.argv[2]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve":
        for module in filter(None, os.environ.get("PROXY_BENCH_BLOCK", "").split(",")):
            sys.modules[module] = None  # type: ignore[assignment]
        _, _, kind, up, port, loop, http, probe = sys.argv
        _serve_app(kind, f"http://127.0.0.1:{up}", int(port), loop, http, probe)
    else:
        main()
