"""The load test of issue #6: N concurrent streams at R events/s for T seconds, checksummed.

Three processes on loopback: a paced upstream (stdlib asyncio, this file), the target
(ChatProxy with its defaults, or a naive Starlette+httpx proxy written like the usual
tutorial, each under uvicorn, one worker; or nothing for "direct"), and this load
generator. Self-contained on purpose: `benchmarks/proxy_bench.py` is a separate benchmark
with its own life.

Each upstream event carries its stream id, its sequence number and the upstream's
`time.monotonic_ns()` at write; the last event before `[DONE]` carries the CRC-32 and
length of every byte the upstream wrote before it. The generator de-chunks the HTTP body,
checks the sequence (nothing lost, duplicated or reordered), compares the CRC of the bytes
it received with the upstream's, and records per-event latency (arrival minus write time;
CLOCK_MONOTONIC is shared by processes on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

MAX_EVENTS = 100_000  # upstream bound per stream, whatever a request asks
KEY = "sk-soak-not-a-real-key"
NAIVE_POOL = 2000  # connections the naive proxy's httpx client may open


# --- the paced upstream ---------------------------------------------------------------------


def _event(sid: str, seq: int) -> bytes:
    content = f"{sid}:{seq}:{time.monotonic_ns()}"
    payload = {
        "id": "chatcmpl-soak",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _upstream_main(port_file: str, pace: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = json.loads(await reader.readexactly(length)) if length else {}
                sid = str(body.get("user", "anon"))
                count = min(int(body.get("max_tokens", 10)), MAX_EVENTS)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                crc, size = 0, 0
                start = time.monotonic()
                for seq in range(count):
                    delay = start + seq * pace - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    data = _event(sid, seq)
                    crc, size = zlib.crc32(data, crc), size + len(data)
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                trailer = b'data: {"soak_crc32":%d,"soak_bytes":%d}\n\n' % (crc, size)
                done = b"data: [DONE]\n\n"
                writer.write(
                    b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(trailer), trailer, len(done), done)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    with open(port_file, "w") as f:  # noqa: ASYNC230 - once, before serving
        f.write(str(port))
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def start_upstream(pace: float) -> Iterator[tuple[int, int]]:
    """Run the paced upstream in its own process; yield (port, pid)."""
    with tempfile.NamedTemporaryFile("r", suffix=".port") as f:
        script = os.path.abspath(__file__)
        proc = subprocess.Popen([sys.executable, script, "_upstream", f.name, str(pace)])
        try:
            deadline = time.monotonic() + 10
            while not open(f.name).read().strip():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the soak upstream did not start")
                time.sleep(0.05)
            yield int(open(f.name).read()), proc.pid
        finally:
            proc.terminate()
            proc.wait(5)


# --- the targets: ChatProxy and the naive proxy, each in its own uvicorn process ---------------


def _naive_app(upstream: str) -> object:
    # Written like the usual tutorial: StreamingResponse over aiter_raw(), httpx's defaults
    # except the pool size. httpx's default pool of 100 would queue 900 of 1,000 streams
    # (and hold no memory for them); the naive figures are for 1,000 open streams.
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    limits = httpx.Limits(max_connections=NAIVE_POOL, max_keepalive_connections=NAIVE_POOL)
    client = httpx.AsyncClient(timeout=None, limits=limits)

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


def _chatproxy_app(upstream: str) -> object:
    from starlette.applications import Starlette

    from tokenhub_stream.asgi import ChatProxy

    proxy = ChatProxy(api_key=KEY, base_url=upstream + "/v1")  # every other option its default
    return Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)


def _log_gc_pauses(path: str) -> None:
    # SOAK_GC_LOG=FILE: every garbage collection of 5 ms or more, one line each.
    import gc

    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        if took >= 0.005:
            tracked = len(gc.get_objects())  # after the pause: not part of the measured time
            with open(path, "a") as f:
                f.write(
                    f"{time.monotonic():.3f} gen{info['generation']} {took * 1000:.1f} ms"
                    f" {tracked} tracked objects\n"
                )

    gc.callbacks.append(callback)


def _serve(kind: str, upstream_port: int, port: int) -> None:
    import uvicorn

    if os.environ.get("SOAK_GC_LOG"):
        _log_gc_pauses(f"{os.environ['SOAK_GC_LOG']}.{kind}")

    upstream = f"http://127.0.0.1:{upstream_port}"
    app = _naive_app(upstream) if kind == "naive" else _chatproxy_app(upstream)
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="asyncio",
        http="h11",
        backlog=4096,
    )


@dataclass
class Target:
    name: str
    port: int
    pids: list[int] = field(default_factory=list)
    path: str = "/api/chat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the soak target did not start listening on {port}")


@contextlib.contextmanager
def start_target(name: str, upstream_port: int) -> Iterator[Target]:
    """ "direct" (the upstream itself), "chatproxy" or "naive"; yield where to send load."""
    if name == "direct":
        yield Target(name, upstream_port, path="/v1/chat/completions")
        return
    if name not in ("chatproxy", "naive"):
        raise ValueError(f"unknown target {name!r}")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "_serve", name, str(upstream_port), str(port)]
    )
    try:
        _wait_port(port, proc)
        yield Target(name, port, [proc.pid])
    finally:
        proc.terminate()
        proc.wait(10)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already in user
    return total - idle, total


def _procs_running() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# --- the load generator ------------------------------------------------------------------------


@dataclass
class StreamResult:
    status: int = 0
    events: int = 0
    ok: bool = False
    problem: str = ""
    latencies_us: list[int] = field(default_factory=list)
    arrivals_ns: list[int] = field(default_factory=list)  # when each latency was measured
    gaps_us: list[int] = field(default_factory=list)


class _Dechunker:
    def __init__(self) -> None:
        self.buf = b""
        self.need = -1  # bytes of chunk data still expected (+2 for CRLF); -1: a size line
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = []
        while not self.ended:
            if self.need < 0:
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    break
                size = int(self.buf[:nl].split(b";")[0], 16)
                self.buf = self.buf[nl + 2 :]
                if size == 0:
                    self.ended = True
                    break
                self.need = size
            if len(self.buf) < self.need + 2:
                break
            out.append(self.buf[: self.need])
            self.buf = self.buf[self.need + 2 :]
            self.need = -1
        return b"".join(out)


async def _one_stream(
    port: int, path: str, sid: str, count: int, result: StreamResult, deadline: float
) -> None:
    body = json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "user": sid,
            "max_tokens": count,
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), deadline - time.monotonic())
        result.status = int(head.split(b" ", 2)[1])
        if result.status != 200 or b"chunked" not in head.lower():
            result.problem = f"status {result.status}"
            return
        dechunk = _Dechunker()
        pending = b""
        crc, size = 0, 0
        expect = 0
        last_arrival: int | None = None
        prefix = f'"content":"{sid}:'.encode()
        while not dechunk.ended:
            data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            if not data:
                result.problem = "connection closed early"
                return
            now = time.monotonic_ns()
            pending += dechunk.feed(data)
            while True:
                cut = pending.find(b"\n\n")
                if cut < 0:
                    break
                event, pending = pending[: cut + 2], pending[cut + 2 :]
                if event.startswith(b'data: {"soak_crc32"'):
                    trailer = json.loads(event[6:])
                    if (crc, size) != (trailer["soak_crc32"], trailer["soak_bytes"]):
                        result.problem = f"checksum mismatch after {expect} events"
                        return
                    continue
                if event == b"data: [DONE]\n\n":
                    result.ok = expect == count and not pending
                    if not result.ok:
                        result.problem = f"{expect} of {count} events"
                    continue
                crc, size = zlib.crc32(event, crc), size + len(event)
                at = event.find(prefix)
                if at < 0:
                    result.problem = f"foreign event {event[:80]!r}"
                    return
                seq_s, t_s = event[at + len(prefix) :].split(b'"', 1)[0].split(b":")
                if int(seq_s) != expect:
                    result.problem = f"event {int(seq_s)} where {expect} was due"
                    return
                expect += 1
                result.latencies_us.append((now - int(t_s)) // 1000)
                result.arrivals_ns.append(now)
                if last_arrival is not None:
                    result.gaps_us.append((now - last_arrival) // 1000)
                last_arrival = now
        result.events = expect
    except (TimeoutError, OSError, ValueError) as exc:
        result.problem = f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()


def _pct(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1000.0


@dataclass
class LoadReport:
    target: str
    streams: int
    ok: int
    errors: list[str]
    latency_p50_ms: float
    latency_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    # The same latency split by when the event arrived: while streams were still opening
    # (the ramp and 1 s after it), and after; and its p99 in each 5 s window of the run.
    latency_p99_ramp_ms: float
    latency_p99_steady_ms: float
    latency_p99_by_5s_ms: list[float]
    cpu_core_pct: float
    rss_kib_per_stream: float
    loadgen_cpu_core_pct: float
    upstream_cpu_core_pct: float
    # The machine during the run (other sessions share it): every CPU's busy time in % of
    # one core (200 = both cores busy), what of it was not this test's three processes, and
    # the mean number of runnable tasks (above 2, something waits for a core).
    machine_busy_core_pct: float
    others_busy_core_pct: float
    runnable_mean: float
    seconds: float
    run: int = 1  # which round of `compare`


def run_load(
    target: Target,
    streams: int,
    rate: float,
    duration: float,
    ramp: float,
    upstream_pid: int | None = None,
) -> LoadReport:
    count = int(rate * duration)
    pids = target.pids
    up_pids = [upstream_pid] if upstream_pid else []
    runnable: list[int] = []

    async def main() -> tuple[list[StreamResult], float, float, int, int, int]:
        rss0 = sum(_rss_kib(p) for p in pids)
        peak = rss0
        results = [StreamResult() for _ in range(streams)]
        deadline = time.monotonic() + ramp + duration + 30  # every wait is bounded
        stop = asyncio.Event()

        async def sampler() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, sum(_rss_kib(p) for p in pids))
                runnable.append(_procs_running())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

        async def launch(i: int) -> None:
            await asyncio.sleep(ramp * i / streams)
            await _one_stream(target.port, target.path, f"s{i}", count, results[i], deadline)

        sampling = asyncio.ensure_future(sampler())
        started = time.monotonic()
        started_ns = time.monotonic_ns()
        cpu0 = sum(_cpu_seconds(p) for p in pids)
        await asyncio.gather(*(launch(i) for i in range(streams)))
        wall = time.monotonic() - started
        cpu = sum(_cpu_seconds(p) for p in pids) - cpu0
        upstream_cpu[0] = sum(_cpu_seconds(p) for p in up_pids)
        stop.set()
        await sampling
        return results, wall, cpu, peak, rss0, started_ns

    upstream_cpu = [0.0]
    up0 = sum(_cpu_seconds(p) for p in up_pids)
    busy0, total0 = _machine_jiffies()
    self_cpu0 = time.process_time()
    results, wall, cpu, peak, rss0, started_ns = asyncio.run(main())
    self_cpu = time.process_time() - self_cpu0
    busy1, total1 = _machine_jiffies()
    ncpu = os.cpu_count() or 1
    machine = 100 * ncpu * (busy1 - busy0) / max(1, total1 - total0)
    up_cpu = upstream_cpu[0] - up0
    lat = [v for r in results for v in r.latencies_us]
    ramp_end = started_ns + int((ramp + 1.0) * 1e9)
    ramp_lat: list[int] = []
    steady_lat: list[int] = []
    windows: dict[int, list[int]] = {}
    for r in results:
        for value, at in zip(r.latencies_us, r.arrivals_ns, strict=True):
            (ramp_lat if at < ramp_end else steady_lat).append(value)
            windows.setdefault((at - started_ns) // 5_000_000_000, []).append(value)
    gaps = [v for r in results for v in r.gaps_us]
    problems = [f"s{i}: {r.problem}" for i, r in enumerate(results) if not r.ok]
    return LoadReport(
        target=target.name,
        streams=streams,
        ok=sum(r.ok for r in results),
        errors=problems[:10],
        latency_p50_ms=_pct(lat, 0.5),
        latency_p99_ms=_pct(lat, 0.99),
        gap_p50_ms=_pct(gaps, 0.5),
        gap_p99_ms=_pct(gaps, 0.99),
        latency_p99_ramp_ms=_pct(ramp_lat, 0.99),
        latency_p99_steady_ms=_pct(steady_lat, 0.99),
        latency_p99_by_5s_ms=[_pct(windows[k], 0.99) for k in sorted(windows)],
        cpu_core_pct=100 * cpu / wall if pids else float("nan"),
        rss_kib_per_stream=(peak - rss0) / streams if pids else float("nan"),
        loadgen_cpu_core_pct=100 * self_cpu / wall,
        upstream_cpu_core_pct=100 * up_cpu / wall,
        machine_busy_core_pct=machine,
        others_busy_core_pct=machine - 100 * (cpu + self_cpu + up_cpu) / wall,
        runnable_mean=sum(runnable) / len(runnable) if runnable else float("nan"),
        seconds=wall,
    )


def compare(
    targets: list[str],
    streams: int,
    rate: float,
    duration: float,
    ramp: float,
    rounds: int = 1,
) -> list[LoadReport]:
    """Run the load against each target in turn (same upstream), `rounds` times over.

    Rounds interleave the targets, so a burst of load from elsewhere on the machine lands
    on one run, not on every run of one target. Each run gets a fresh target process.
    """
    reports = []
    with start_upstream(1.0 / rate) as (upstream_port, upstream_pid):
        for run in range(1, rounds + 1):
            for name in targets:
                with start_target(name, upstream_port) as target:
                    # warm up: a few short streams (pools, imports)
                    run_load(target, 5, rate, 1.0, 0.0)
                    report = run_load(target, streams, rate, duration, ramp, upstream_pid)
                    report.run = run
                    print(json.dumps(report.__dict__), file=sys.stderr, flush=True)
                    reports.append(report)
    return reports


def markdown(reports: list[LoadReport]) -> str:
    lines = [
        "| target | run | streams ok | latency p50 ms | p99 ms | p99 after the ramp ms "
        "| added p50 ms | added p99 ms | CPU % of a core | RSS KiB/stream "
        "| others' CPU % of a core | runnable tasks |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in reports:
        direct = next((d for d in reports if d.target == "direct" and d.run == r.run), None)
        a50 = r.latency_p50_ms - direct.latency_p50_ms if direct else float("nan")
        a99 = r.latency_p99_ms - direct.latency_p99_ms if direct else float("nan")
        lines.append(
            f"| {r.target} | {r.run} | {r.ok}/{r.streams} | {r.latency_p50_ms:.1f} "
            f"| {r.latency_p99_ms:.1f} | {r.latency_p99_steady_ms:.1f} | {a50:+.1f} | {a99:+.1f} "
            f"| {r.cpu_core_pct:.0f} | {r.rss_kib_per_stream:.1f} | {r.others_busy_core_pct:.0f} "
            f"| {r.runnable_mean:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        asyncio.run(_upstream_main(sys.argv[2], float(sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "_serve":
        _serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:  # a smoke run: 50 streams for 5 s against each target
        print(markdown(compare(["direct", "chatproxy", "naive"], 50, 4.0, 5.0, 1.0)))
