"""What a second uvicorn worker adds: ChatProxy behind `uvicorn --workers 1` and `--workers 2`.

Run (inside the project's virtualenv; on a shared machine under the benchmark lock):

    flock /tmp/bench.lock python benchmarks/workers_bench.py
    flock /tmp/bench.lock python benchmarks/workers_bench.py --streams 500 1000 --repeat 3

Every process runs on this machine, over loopback:

- a paced upstream (asyncio on uvloop when installed, raw sockets): per stream 100 chunks,
  20 ms apart, each SSE event one HTTP chunk, then `[DONE]`;
- ChatProxy (default settings, pool of 4,000 so one worker is never pool-bound) served by
  `uvicorn --workers N --loop uvloop --http httptools` (asyncio/h11 when those are missing);
- the load generator (same loop, raw sockets), which opens all streams at once and measures
  time to first event, the gaps between reads that carried events, and completeness.

Reported per worker count and concurrency (median of `--repeat` runs): the proxy's CPU ms per
stream (utime+stime of the uvicorn processes, from /proc), the cores the proxy used while the
streams ran, how busy the whole machine was (from /proc/stat, all processes, other sessions
included), TTFB p50/p99, the p99 gap minus the 20 ms pace, and complete streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNKS = 100
PACE = 0.02
KEY = "sk-bench-not-a-real-key"
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
TICK = os.sysconf("SC_CLK_TCK")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _events() -> list[bytes]:
    out = []
    for i in range(CHUNKS):
        payload = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
        }
        out.append(
            _chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
        )
    return out


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# --- the paced upstream -----------------------------------------------------------------------


async def _upstream_main(port_file: str) -> None:
    events = _events()
    done = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                )
                # A warm-up request (it carries max_tokens, which the proxy forwards) gets
                # one unpaced event.
                for event in events[:1] if b'"max_tokens"' in body else events:
                    await asyncio.sleep(PACE)
                    writer.write(event)
                writer.write(done)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
    with open(port_file, "w") as f:  # noqa: ASYNC230 - once, before serving
        f.write(str(server.sockets[0].getsockname()[1]))
    async with server:
        await server.serve_forever()


# --- the app under test -----------------------------------------------------------------------


def proxy_app() -> object:
    """`uvicorn --factory workers_bench:proxy_app`: ChatProxy at /v1/chat/completions."""
    from starlette.applications import Starlette

    from tokenhub_stream.asgi import ChatProxy

    proxy = ChatProxy(api_key=KEY, base_url=os.environ["BENCH_UPSTREAM"], max_connections=4000)
    return Starlette(routes=proxy.routes("/v1/chat/completions"), lifespan=proxy.lifespan)


# --- processes --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def _machine() -> tuple[float, float]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) / TICK, idle / TICK


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def _start_upstream() -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = os.path.join(tmp, "port")
        process = subprocess.Popen([sys.executable, __file__, "--upstream", port_file])
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(port_file) or not open(port_file).read():
                if time.monotonic() > deadline:
                    raise RuntimeError("the upstream did not start")
                time.sleep(0.02)
            yield int(open(port_file).read())
        finally:
            _stop(process)


@contextlib.contextmanager
def _start_proxy(
    upstream_port: int, workers: int, loop: str, http: str
) -> Iterator[tuple[int, int]]:
    port = _free_port()
    env = {**os.environ, "BENCH_UPSTREAM": f"http://127.0.0.1:{upstream_port}/v1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "workers_bench:proxy_app"]
        + ["--app-dir", HERE, "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", str(workers), "--loop", loop, "--http", http]
        + ["--backlog", "4096", "--no-access-log", "--log-level", "warning"],
        env=env,
    )
    try:
        _wait_port(port)
        deadline = time.monotonic() + 20
        while len(_children(process.pid)) < workers:  # --workers 1 runs in the master itself
            if workers == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # every worker listening
        yield port, process.pid
    finally:
        _stop(process)


# --- the load generator -----------------------------------------------------------------------


async def _warm_up(port: int, workers: int) -> None:
    # A fresh worker pays for lazy imports and its first upstream connections on its first
    # requests; several rounds of concurrent short requests reach every worker.
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        answer = await reader.read()
        writer.close()
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"warm-up failed: {answer[:200]!r}")

    for _ in range(5):
        await asyncio.gather(*(one() for _ in range(20 * workers)))


@dataclass
class StreamResult:
    ttfb: float | None
    gaps: list[float]
    complete: bool


async def _one_stream(port: int, start: asyncio.Event) -> StreamResult:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )
    await start.wait()
    sent = time.perf_counter()
    writer.write(request)
    ttfb: float | None = None
    last = 0.0
    gaps: list[float] = []
    events = 0
    tail = b""
    seen_done = False
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            now = time.perf_counter()
            n = data.count(b"data: ")
            if n:
                if ttfb is None:
                    ttfb = now - sent
                else:
                    gaps.append(now - last)
                last = now
                events += n
            tail = (tail + data)[-32:]
            seen_done = seen_done or b"[DONE]" in tail
            if seen_done and tail.endswith(b"\r\n0\r\n\r\n"):
                break
    finally:
        writer.close()
    return StreamResult(ttfb, gaps, events == CHUNKS + 1)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _measure(port: int, pids: list[int], streams: int) -> dict[str, float]:
    async def main() -> list[StreamResult]:
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(_one_stream(port, start)) for _ in range(streams)]
        await asyncio.sleep(0.5)  # every connection open
        start.set()
        return await asyncio.gather(*tasks)

    loop = _new_loop()
    try:
        if pids:
            loop.run_until_complete(_warm_up(port, len(pids)))
        cpu0 = [_cpu_seconds(p) for p in pids]
        total0, idle0 = _machine()
        wall0 = time.perf_counter()
        results = loop.run_until_complete(main())
        wall = time.perf_counter() - wall0 - 0.5
        total1, idle1 = _machine()
    finally:
        loop.close()
    per_process = [_cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
    cpu = sum(per_process)
    cores = os.cpu_count() or 1
    ttfbs = [r.ttfb for r in results if r.ttfb is not None]
    gaps = [g for r in results for g in r.gaps]
    return {
        "cpu_ms": cpu * 1000 / streams,
        "proxy_cores": cpu / wall,
        "machine_busy": 1 - (idle1 - idle0) / max(total1 - total0, 1e-9),
        "ttfb_p50": _pct(ttfbs, 0.5) * 1000,
        "ttfb_p99": _pct(ttfbs, 0.99) * 1000,
        "gap_p99": (_pct(gaps, 0.99) - PACE) * 1000,
        "complete": sum(r.complete for r in results),
        "wall": wall,
        "cores": cores,
        "busiest_share": max(per_process, default=0) / cpu if cpu else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[500, 1000, 1500])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--http", default="httptools")
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        loop = _new_loop()
        with contextlib.suppress(KeyboardInterrupt):
            loop.run_until_complete(_upstream_main(args.upstream))
        return
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().split()[:3]}", flush=True)
    header = (
        "| workers | streams | CPU ms/stream | proxy cores | machine busy | TTFB p50 | TTFB p99 "
        "| added p99 gap | complete |"
    )
    rows = [header, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with _start_upstream() as upstream_port:
        for streams in args.streams:
            for workers in [0, *args.workers]:  # 0: straight to the upstream (the baseline)
                runs = []
                for _ in range(args.repeat):
                    if workers == 0:
                        runs.append(_measure(upstream_port, [], streams))
                        continue
                    with _start_proxy(upstream_port, workers, args.loop, args.http) as (port, pid):
                        # The master of --workers 2 only supervises; count it anyway.
                        pids = [pid, *_children(pid)]
                        runs.append(_measure(port, pids, streams))
                    time.sleep(1)
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                complete = min(r["complete"] for r in runs)
                row = (
                    f"| {workers or 'direct'} | {streams} | {med['cpu_ms']:.2f} "
                    f"| {med['proxy_cores']:.2f} "
                    f"| {med['machine_busy'] * 100:.0f}% | {med['ttfb_p50']:.0f} ms "
                    f"| {med['ttfb_p99']:.0f} ms | {med['gap_p99']:+.1f} ms "
                    f"| {int(complete)}/{streams} |"
                )
                print(row, f"(busiest process: {med['busiest_share']:.0%} of the CPU)", flush=True)
                print(
                    "    runs: "
                    + "; ".join(
                        f"ttfb p50 {r['ttfb_p50']:.0f} ms, gap {r['gap_p99']:+.1f} ms, "
                        f"cpu {r['cpu_ms']:.2f} ms, busy {r['machine_busy'] * 100:.0f}%"
                        for r in runs
                    ),
                    flush=True,
                )
                rows.append(row)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
