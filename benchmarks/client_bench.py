"""Client benchmark: streaming chat completions from a fast local SSE server.

    python benchmarks/client_bench.py [--quick] [--tls] [--memory]

Starts ``benchmarks/sse_server.py`` in its own process, then runs every consumer in a fresh
worker process of this script (so imports, the JSON-library choice and garbage never leak from
one consumer into the next) on two shapes:

* long:  one stream of 50,000 content chunks -> chunks/s and microseconds per delivered delta;
* short: 1,000 sequential streams of 50 chunks on ONE client -> milliseconds per request.

Consumers, each async and sync: ``raw-socket`` (the floor: the request's bytes sent on one
kept-alive socket, the answer's bytes counted until the chunked body's end, no parsing beyond
finding it), ``httpx-raw`` (``aiter_raw``/``iter_raw``, counting bytes: the floor for any
httpx-based client), ``httpx-sse`` (httpx + httpx_sse + ``json.loads``), ``openai`` (the
official SDK) and ``tokenhub_stream`` (stdlib json with orjson made unimportable, and with
``TOKENHUB_STREAM_JSON=orjson``). Every consumer's delivered text is checked against the
server's (characters, crc32, delta count); raw httpx by body bytes, the raw socket by wire
bytes. A wrong checksum or a failing consumer fails the run (exit 1); tokenhub_stream is
skipped, with a line saying so, while it cannot be imported.

``--tls`` runs the same over HTTPS: the server gets a self-signed certificate for 127.0.0.1
made for the run (the ``openssl`` command), which the workers trust through
``SSL_CERT_FILE`` (read by httpx, by tokenhub_stream's engine, and by Python's default
context). ``--memory`` reports tracemalloc figures instead: what one idle pooled connection
and one open stream cost, for tokenhub_stream over its engine and over httpx
(``TOKENHUB_STREAM_ENGINE=httpx``), and for httpx itself.

The Markdown table goes to stdout, progress to stderr. Medians over the repetitions.

Each repetition runs in its own worker, round-robin over the consumers (round 1: every
consumer once, then round 2, ...), so a change in the machine's load during the run (other
processes share its 2 cores) hits every consumer alike instead of whole rows. Besides wall
time, each worker reports its own CPU time (``time.process_time()``): the client's work,
which other processes disturb much less than the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"  # the checkout's tokenhub_stream, installed or not
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from sse_server import checksum, event_bytes, expected_checksum, wire_bytes  # noqa: E402

MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "Say something long."}]
MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
WARMUP_STREAMS = 20

# ---------------------------------------------------------------------------------------------
# Consumers. Each delivers either the concatenated content (checked by characters, crc32 and
# delta count) or, for raw httpx, a byte count (checked against the server's event bytes).
# ---------------------------------------------------------------------------------------------


class WireBytes(int):
    """What a raw socket received: head, chunk framing and body (checked by `wire_bytes`)."""


Delivered = tuple[str, int] | int  # (text, deltas), raw body bytes, or WireBytes


class AsyncConsumer(Protocol):
    async def stream(self, n: int) -> Delivered: ...
    async def aclose(self) -> None: ...


class SyncConsumer(Protocol):
    def stream(self, n: int) -> Delivered: ...
    def close(self) -> None: ...


def _body(n: int) -> dict[str, object]:
    return {"model": MODEL, "messages": MESSAGES, "stream": True, "max_tokens": n}


def _content(obj: object) -> str | None:
    """choices[0].delta.content of a parsed chunk, the way a careful hand-written client would."""
    if not isinstance(obj, dict):
        raise ValueError(f"chunk is not an object: {obj!r}")
    choices = obj.get("choices")
    if not choices:
        return None
    content = choices[0].get("delta", {}).get("content")
    return content if isinstance(content, str) else None


def _request_bytes(url: str, n: int) -> bytes:
    """The POST a client sends for `n` chunks, as bytes (built once per consumer and n)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    body = json.dumps(_body(n)).encode()
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nhost: {parts.netloc}\r\n"
        "content-type: application/json\r\naccept: text/event-stream\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


_END = b"0\r\n\r\n"  # the end of a chunked body (nothing follows it on this server)


def _raw_tls(url: str) -> tuple[str, int, object]:
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    context = ssl.create_default_context() if parts.scheme == "https" else None
    return parts.hostname or "127.0.0.1", parts.port or 80, context


class RawSocketAsync:
    """The floor: an asyncio protocol that sends the request bytes and counts what comes
    back until the chunked body's end (no parsing beyond finding it). One connection,
    kept alive, as the clients keep theirs."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._requests: dict[int, bytes] = {}
        self._transport: asyncio.Transport | None = None
        self._protocol: _CountingProtocol | None = None

    async def stream(self, n: int) -> Delivered:
        request = self._requests.get(n)
        if request is None:
            request = self._requests[n] = _request_bytes(self._url, n)
        if self._transport is None:
            host, port, tls = _raw_tls(self._url)
            loop = asyncio.get_running_loop()
            transport, protocol = await loop.create_connection(
                _CountingProtocol,
                host,
                port,
                ssl=tls,  # type: ignore[arg-type]
                server_hostname=host if tls is not None else None,
            )
            self._transport, self._protocol = transport, protocol
        assert self._protocol is not None
        done = self._protocol.expect()
        self._transport.write(request)
        return WireBytes(await done)

    async def aclose(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _CountingProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._count = 0
        self._tail = b""
        self._done: asyncio.Future[int] | None = None

    def expect(self) -> asyncio.Future[int]:
        self._count, self._tail = 0, b""
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    def data_received(self, data: bytes) -> None:
        self._count += len(data)
        self._tail = (self._tail + data[-5:])[-5:]
        if self._tail == _END and self._done is not None:
            self._done.set_result(self._count)
            self._done = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("the server closed the connection"))


class RawSocketSync:
    """The floor for blocking sockets: sendall the request, recv and count until the
    chunked body's end."""

    def __init__(self, url: str) -> None:
        import socket

        host, port, tls = _raw_tls(url)
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)  # type: ignore[attr-defined]
        self._sock = sock
        self._url = url
        self._requests: dict[int, bytes] = {}

    def stream(self, n: int) -> Delivered:
        request = self._requests.get(n)
        if request is None:
            request = self._requests[n] = _request_bytes(self._url, n)
        sock = self._sock
        sock.sendall(request)
        count, tail = 0, b""
        recv = sock.recv
        while tail != _END:
            data = recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            count += len(data)
            tail = (tail + data[-5:])[-5:]
        return WireBytes(count)

    def close(self) -> None:
        self._sock.close()


class HttpxRawAsync:
    def __init__(self, url: str) -> None:
        import httpx

        self._client = httpx.AsyncClient(base_url=url, timeout=60.0)

    async def stream(self, n: int) -> Delivered:
        total = 0
        async with self._client.stream("POST", CHAT_PATH, json=_body(n)) as response:
            async for raw in response.aiter_raw():
                total += len(raw)
        return total

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpxRawSync:
    def __init__(self, url: str) -> None:
        import httpx

        self._client = httpx.Client(base_url=url, timeout=60.0)

    def stream(self, n: int) -> Delivered:
        total = 0
        with self._client.stream("POST", CHAT_PATH, json=_body(n)) as response:
            for raw in response.iter_raw():
                total += len(raw)
        return total

    def close(self) -> None:
        self._client.close()


class HttpxSSEAsync:
    def __init__(self, url: str) -> None:
        import httpx

        self._client = httpx.AsyncClient(base_url=url, timeout=60.0)

    async def stream(self, n: int) -> Delivered:
        from httpx_sse import aconnect_sse

        parts: list[str] = []
        loads = json.loads
        async with aconnect_sse(self._client, "POST", CHAT_PATH, json=_body(n)) as source:
            source.response.raise_for_status()
            async for event in source.aiter_sse():
                if event.data == "[DONE]":
                    continue  # read on to the end so the connection goes back to the pool
                content = _content(loads(event.data))
                if content:
                    parts.append(content)
        return "".join(parts), len(parts)

    async def aclose(self) -> None:
        await self._client.aclose()


class HttpxSSESync:
    def __init__(self, url: str) -> None:
        import httpx

        self._client = httpx.Client(base_url=url, timeout=60.0)

    def stream(self, n: int) -> Delivered:
        from httpx_sse import connect_sse

        parts: list[str] = []
        loads = json.loads
        with connect_sse(self._client, "POST", CHAT_PATH, json=_body(n)) as source:
            source.response.raise_for_status()
            for event in source.iter_sse():
                if event.data == "[DONE]":
                    continue
                content = _content(loads(event.data))
                if content:
                    parts.append(content)
        return "".join(parts), len(parts)

    def close(self) -> None:
        self._client.close()


class OpenAIAsync:
    def __init__(self, url: str) -> None:
        import openai

        self._client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    async def stream(self, n: int) -> Delivered:
        parts: list[str] = []
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "Say something long."}
        ]
        stream = await self._client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, max_tokens=n
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    content = chunk.choices[0].delta.content
                    if content:
                        parts.append(content)
        return "".join(parts), len(parts)

    async def aclose(self) -> None:
        await self._client.close()


class OpenAISync:
    def __init__(self, url: str) -> None:
        import openai

        self._client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

    def stream(self, n: int) -> Delivered:
        parts: list[str] = []
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": "Say something long."}
        ]
        stream = self._client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, max_tokens=n
        )
        with stream:
            for chunk in stream:
                if chunk.choices:
                    content = chunk.choices[0].delta.content
                    if content:
                        parts.append(content)
        return "".join(parts), len(parts)

    def close(self) -> None:
        self._client.close()


class TokenHubAsync:
    def __init__(self, url: str) -> None:
        import tokenhub_stream as ts

        self._client = ts.AsyncClient(base_url=url + "/v1", api_key="x")

    async def stream(self, n: int) -> Delivered:
        parts: list[str] = []
        async with self._client.stream_chat(MESSAGES, model=MODEL, max_tokens=n) as stream:
            async for delta in stream:
                parts.append(delta)
        return "".join(parts), len(parts)

    async def aclose(self) -> None:
        await self._client.aclose()


class TokenHubSync:
    def __init__(self, url: str) -> None:
        import tokenhub_stream as ts

        self._client = ts.Client(base_url=url + "/v1", api_key="x")

    def stream(self, n: int) -> Delivered:
        parts: list[str] = []
        with self._client.stream_chat(MESSAGES, model=MODEL, max_tokens=n) as stream:
            for delta in stream:
                parts.append(delta)
        return "".join(parts), len(parts)

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class Spec:
    """One row of the table: a consumer of one kind, maybe with a JSON-library setting."""

    label: str
    family: str  # httpx-raw | httpx-sse | openai | tokenhub_stream
    kind: str  # async | sync
    json: str = ""  # tokenhub_stream only: stdlib | orjson
    src: str = ""  # tokenhub_stream only: another checkout's src/ (--baseline), else ours
    engine: str = ""  # tokenhub_stream only: "httpx" forces the httpx path
    no_otel: bool = False  # tokenhub_stream only: opentelemetry made unimportable (--otel)

    @property
    def key(self) -> str:
        return f"{self.label}/{self.kind}"


ASYNC_CONSUMERS: dict[str, Callable[[str], AsyncConsumer]] = {
    "raw-socket": RawSocketAsync,
    "httpx-raw": HttpxRawAsync,
    "httpx-sse": HttpxSSEAsync,
    "openai": OpenAIAsync,
    "tokenhub_stream": TokenHubAsync,
}
SYNC_CONSUMERS: dict[str, Callable[[str], SyncConsumer]] = {
    "raw-socket": RawSocketSync,
    "httpx-raw": HttpxRawSync,
    "httpx-sse": HttpxSSESync,
    "openai": OpenAISync,
    "tokenhub_stream": TokenHubSync,
}


def all_specs(baselines: list[tuple[str, str]] | None = None, otel: bool = False) -> list[Spec]:
    specs: list[Spec] = []
    for kind in ("async", "sync"):
        specs.append(Spec("raw-socket", "raw-socket", kind))
        specs.append(Spec("httpx-raw", "httpx-raw", kind))
        specs.append(Spec("httpx-sse", "httpx-sse", kind))
        specs.append(Spec("openai", "openai", kind))
        specs.append(Spec("tokenhub_stream (stdlib json)", "tokenhub_stream", kind, "stdlib"))
        specs.append(Spec("tokenhub_stream (orjson)", "tokenhub_stream", kind, "orjson"))
        if otel:
            # The rows above run with opentelemetry-api importable and no provider set
            # (telemetry off); these without it at all (the otel extra not installed).
            for json_name, shown in (("stdlib", "stdlib json"), ("orjson", "orjson")):
                label = f"tokenhub_stream ({shown}, no opentelemetry)"
                specs.append(Spec(label, "tokenhub_stream", kind, json_name, no_otel=True))
        for rev, src in baselines or ():
            for json_name, shown in (("stdlib", "stdlib json"), ("orjson", "orjson")):
                label = f"tokenhub_stream@{rev} ({shown})"
                specs.append(Spec(label, "tokenhub_stream", kind, json_name, src))
    return specs


@contextlib.contextmanager
def checkout_of(rev: str) -> Iterator[str]:
    """`git archive` of `rev` in a temporary directory; yields its `src/`."""
    with tempfile.TemporaryDirectory(prefix="client-bench-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(HERE.parent), "archive", rev, "src"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield os.path.join(tmp, "src")


# ---------------------------------------------------------------------------------------------
# Worker: runs one consumer in this (fresh) process and prints one JSON line.
# ---------------------------------------------------------------------------------------------


class ChecksumError(AssertionError):
    pass


def verify(family: str, n: int, delivered: Delivered) -> None:
    if isinstance(delivered, WireBytes):
        want_wire = wire_bytes(n)
        if delivered != want_wire:
            raise ChecksumError(f"{family}: {delivered} bytes for n={n}, expected {want_wire}")
        return
    if isinstance(delivered, int):
        want_bytes = event_bytes(n)
        if delivered != want_bytes:
            raise ChecksumError(f"{family}: {delivered} bytes for n={n}, expected {want_bytes}")
        return
    text, deltas = delivered
    got = checksum(text, deltas)
    want = expected_checksum(n)
    if got != want:
        raise ChecksumError(
            f"{family}: checksum (chars, crc32, deltas) {got} for n={n}, expected {want}"
        )


@dataclass
class Plan:
    long_chunks: int
    short_streams: int
    short_chunks: int
    reps: int


@dataclass
class Timings:
    long_s: list[float] = field(default_factory=list)
    short_s: list[float] = field(default_factory=list)
    long_cpu: list[float] = field(default_factory=list)  # the worker's CPU seconds
    short_cpu: list[float] = field(default_factory=list)


async def run_async(
    factory: Callable[[str], AsyncConsumer], family: str, url: str, plan: Plan
) -> Timings:
    timings = Timings()
    consumer = factory(url)
    try:
        for _ in range(WARMUP_STREAMS):
            verify(family, plan.short_chunks, await consumer.stream(plan.short_chunks))
        for _ in range(plan.reps):
            start, cpu = time.perf_counter(), time.process_time()
            delivered = await consumer.stream(plan.long_chunks)
            timings.long_s.append(time.perf_counter() - start)
            timings.long_cpu.append(time.process_time() - cpu)
            verify(family, plan.long_chunks, delivered)

            results: list[Delivered] = []
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(plan.short_streams):
                results.append(await consumer.stream(plan.short_chunks))
            timings.short_s.append(time.perf_counter() - start)
            timings.short_cpu.append(time.process_time() - cpu)
            for delivered in results:
                verify(family, plan.short_chunks, delivered)
    finally:
        await consumer.aclose()
    return timings


def run_sync(factory: Callable[[str], SyncConsumer], family: str, url: str, plan: Plan) -> Timings:
    timings = Timings()
    consumer = factory(url)
    try:
        for _ in range(WARMUP_STREAMS):
            verify(family, plan.short_chunks, consumer.stream(plan.short_chunks))
        for _ in range(plan.reps):
            start, cpu = time.perf_counter(), time.process_time()
            delivered = consumer.stream(plan.long_chunks)
            timings.long_s.append(time.perf_counter() - start)
            timings.long_cpu.append(time.process_time() - cpu)
            verify(family, plan.long_chunks, delivered)

            results: list[Delivered] = []
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(plan.short_streams):
                results.append(consumer.stream(plan.short_chunks))
            timings.short_s.append(time.perf_counter() - start)
            timings.short_cpu.append(time.process_time() - cpu)
            for delivered in results:
                verify(family, plan.short_chunks, delivered)
    finally:
        consumer.close()
    return timings


def worker(spec: Spec, url: str, plan: Plan) -> dict[str, object]:
    if spec.family == "tokenhub_stream":
        sys.path.insert(0, spec.src or str(SRC))
    if os.environ.get("BENCH_MEMORY"):
        if spec.kind == "async":
            return asyncio.run(memory_async(spec, url))
        return memory_sync(spec, url)
    if spec.family == "tokenhub_stream":
        sys.path.insert(0, spec.src or str(SRC))
        if spec.json == "stdlib":
            # "Without the extra": orjson cannot be imported at all.
            sys.modules["orjson"] = None  # type: ignore[assignment]
        if spec.no_otel:
            sys.modules["opentelemetry"] = None  # type: ignore[assignment]
        try:
            import tokenhub_stream
        except ImportError as exc:
            if spec.json == "stdlib" and exc.name == "orjson":
                raise RuntimeError(
                    "tokenhub_stream needs orjson even with TOKENHUB_STREAM_JSON=stdlib; "
                    "orjson must stay an optional extra"
                ) from exc
            return {"status": "skip", "reason": f"tokenhub_stream not importable yet: {exc!r}"}
        except Exception as exc:  # a half-written package fails in many ways
            return {"status": "skip", "reason": f"tokenhub_stream not importable yet: {exc!r}"}
        for name in ("AsyncClient", "Client"):
            if not hasattr(tokenhub_stream, name):
                return {
                    "status": "skip",
                    "reason": f"tokenhub_stream not importable yet: no {name}",
                }
    if spec.kind == "async":
        timings = asyncio.run(run_async(ASYNC_CONSUMERS[spec.family], spec.family, url, plan))
    else:
        timings = run_sync(SYNC_CONSUMERS[spec.family], spec.family, url, plan)
    return {
        "status": "ok",
        "long_s": timings.long_s,
        "short_s": timings.short_s,
        "long_cpu": timings.long_cpu,
        "short_cpu": timings.short_cpu,
        "orjson_loaded": sys.modules.get("orjson") is not None,
    }


# ---------------------------------------------------------------------------------------------
# Memory (--memory): what one idle pooled connection and one open stream cost (tracemalloc).
# ---------------------------------------------------------------------------------------------

MEMORY_STREAMS = 16  # under httpx's 20 kept-alive connections
STALL = {"x-bench-stall": "1"}


def _opener(spec: Spec, url: str) -> tuple[object, Callable[..., object]]:
    """The client and a function opening one stream: (context manager, its iterator)."""
    if spec.family == "tokenhub_stream":
        import tokenhub_stream as ts

        client: object = (ts.AsyncClient if spec.kind == "async" else ts.Client)(
            base_url=url + "/v1", api_key="x"
        )

        def open_ts(stall: bool) -> object:
            return client.stream_chat(  # type: ignore[attr-defined]
                MESSAGES, model=MODEL, max_tokens=5, extra_headers=STALL if stall else None
            )

        return client, open_ts
    import httpx

    http = (httpx.AsyncClient if spec.kind == "async" else httpx.Client)(base_url=url)

    def open_httpx(stall: bool) -> object:
        return http.stream("POST", CHAT_PATH, json=_body(5), headers=STALL if stall else None)

    return http, open_httpx


async def memory_async(spec: Spec, url: str) -> dict[str, object]:
    import gc
    import tracemalloc

    client, open_stream = _opener(spec, url)
    is_ts = spec.family == "tokenhub_stream"

    async def entered(stall: bool) -> tuple[object, object, object]:
        cm = open_stream(stall)
        target = await cm.__aenter__()  # type: ignore[attr-defined]
        it = target.__aiter__() if is_ts else target.aiter_raw()
        return cm, target, it

    tracemalloc.start()
    cm, _, it = await entered(False)  # warm-up: imports, the pool, caches
    async for _ in it:  # type: ignore[attr-defined]
        pass
    await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    opened = [await entered(False) for _ in range(MEMORY_STREAMS)]
    for cm, _, it in opened:
        async for _ in it:  # type: ignore[attr-defined]
            pass
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
    del opened, cm, it
    gc.collect()
    idle = tracemalloc.get_traced_memory()[0]
    stalled = []
    for _ in range(MEMORY_STREAMS):
        cm, target, it = await entered(True)
        await it.__anext__()  # type: ignore[attr-defined]
        stalled.append((cm, target, it))
    gc.collect()
    open_ = tracemalloc.get_traced_memory()[0]
    for cm, _, _ in stalled:
        await cm.__aexit__(None, None, None)  # type: ignore[attr-defined]
    await client.aclose()  # type: ignore[attr-defined]
    return {
        "status": "ok",
        "idle": (idle - base) / (MEMORY_STREAMS - 1),  # one connection was pooled already
        "open": (open_ - idle) / MEMORY_STREAMS,
    }


def memory_sync(spec: Spec, url: str) -> dict[str, object]:
    import gc
    import tracemalloc

    client, open_stream = _opener(spec, url)
    is_ts = spec.family == "tokenhub_stream"

    def entered(stall: bool) -> tuple[object, object, object]:
        cm = open_stream(stall)
        target = cm.__enter__()  # type: ignore[attr-defined]
        it = iter(target) if is_ts else target.iter_raw()
        return cm, target, it

    tracemalloc.start()
    cm, _, it = entered(False)
    for _ in it:  # type: ignore[attr-defined]
        pass
    cm.__exit__(None, None, None)  # type: ignore[attr-defined]
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    opened = [entered(False) for _ in range(MEMORY_STREAMS)]
    for cm, _, it in opened:
        for _ in it:  # type: ignore[attr-defined]
            pass
        cm.__exit__(None, None, None)  # type: ignore[attr-defined]
    del opened, cm, it
    gc.collect()
    idle = tracemalloc.get_traced_memory()[0]
    stalled = []
    for _ in range(MEMORY_STREAMS):
        cm, target, it = entered(True)
        next(it)  # type: ignore[call-overload]
        stalled.append((cm, target, it))
    gc.collect()
    open_ = tracemalloc.get_traced_memory()[0]
    for cm, _, _ in stalled:
        cm.__exit__(None, None, None)  # type: ignore[attr-defined]
    client.close()  # type: ignore[attr-defined]
    return {
        "status": "ok",
        "idle": (idle - base) / (MEMORY_STREAMS - 1),
        "open": (open_ - idle) / MEMORY_STREAMS,
    }


def memory_specs() -> list[Spec]:
    specs = []
    for kind in ("async", "sync"):
        specs.append(Spec("httpx-raw", "httpx-raw", kind))
        specs.append(Spec("tokenhub_stream (engine)", "tokenhub_stream", kind))
        specs.append(Spec("tokenhub_stream (httpx path)", "tokenhub_stream", kind, engine="httpx"))
    return specs


def memory(args: argparse.Namespace) -> int:
    reps = 3 if args.quick else args.reps
    got: dict[str, dict[str, list[float]]] = {}
    failures = []
    with sse_server([5]) as url:
        for _ in range(reps):
            for spec in memory_specs():
                result = run_worker(spec, url, Plan(0, 0, 0, 1), 120.0, {"BENCH_MEMORY": "1"})
                if result["status"] != "ok":
                    failures.append(f"{spec.key}: {result.get('reason')}")
                    continue
                for name in ("idle", "open"):
                    value = result[name]
                    assert isinstance(value, int | float)
                    got.setdefault(spec.key, {}).setdefault(name, []).append(float(value))
    print(f"Command: `python benchmarks/client_bench.py {' '.join(sys.argv[1:])}`  ")
    print(
        f"tracemalloc, medians of {reps} workers; {MEMORY_STREAMS} connections made idle in "
        "the pool (read to their end), then as many streams opened on them and held after "
        "their first delta"
    )
    print()
    print("| consumer | kind | one idle pooled connection (KiB) | one open stream (KiB) |")
    print("|---|---|--:|--:|")
    for spec in memory_specs():
        values = got.get(spec.key)
        if values:
            idle = statistics.median(values["idle"]) / 1024
            open_ = statistics.median(values["open"]) / 1024
            print(f"| {spec.label} | {spec.kind} | {idle:.1f} | {open_:.1f} |")
    if failures:
        print("\nFAILED:\n" + "\n".join(failures))
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# Orchestrator: server subprocess, one worker subprocess per row, the table.
# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def sse_server(
    prebuild: list[int], start_timeout: float = 30.0, tls: tuple[str, str] | None = None
) -> Iterator[str]:
    cmd = [sys.executable, str(HERE / "sse_server.py"), "--port", "0", "--prebuild"]
    cmd += [str(n) for n in prebuild]
    if tls is not None:
        cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=start_timeout):
                raise RuntimeError(f"sse_server did not start within {start_timeout} s")
        url = proc.stdout.readline().strip()
        if not url.startswith(("http://", "https://")):
            raise RuntimeError(f"sse_server printed {url!r} instead of its URL")
        yield url
    finally:
        proc.kill()  # always: whatever happened above
        proc.wait(timeout=10)


@contextlib.contextmanager
def self_signed() -> Iterator[tuple[str, str]]:
    """A certificate and key for 127.0.0.1, made now with the openssl command (the
    clients trust it through SSL_CERT_FILE, which httpx, our engine and Python's default
    context all read)."""
    with tempfile.TemporaryDirectory(prefix="client-bench-tls-") as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"]
            + ["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
            + ["-keyout", key, "-out", cert, "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True,
            capture_output=True,
        )
        yield cert, key


def run_worker(
    spec: Spec, url: str, plan: Plan, timeout: float, env_extra: dict[str, str] | None = None
) -> dict[str, object]:
    env = dict(os.environ)
    env.update(env_extra or {})
    if spec.json:
        env["TOKENHUB_STREAM_JSON"] = spec.json
    if spec.engine:
        env["TOKENHUB_STREAM_ENGINE"] = spec.engine
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec.__dict__), "--url", url]
    cmd += ["--plan", json.dumps(plan.__dict__)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout:.0f} s"}
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode != 0 or not last:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        return {"status": "error", "reason": f"exit {proc.returncode}\n{tail}"}
    result: dict[str, object] = json.loads(last[0])
    return result


@dataclass
class Row:
    spec: Spec
    long_s: float  # median seconds for one long stream
    short_s: float  # median seconds for all short streams
    long_cpu: float = 0.0  # median CPU seconds of the client for one long stream
    short_cpu: float = 0.0  # ... for all short streams
    long_best: float = 0.0  # the fastest repetition (least disturbed by other processes)
    short_best: float = 0.0
    note: str = ""


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def _by_kind(rows: list[Row], family: str) -> dict[str, Row]:
    return {r.spec.kind: r for r in rows if r.spec.family == family}


def _ratio(mine: float, base: Row | None, attr: str) -> str:
    value = getattr(base, attr) if base is not None else 0.0
    return _fmt_ratio(mine / value) if value else "–"


def _speedup(slow: Row | None, attr: str, mine: float) -> str:
    value = getattr(slow, attr) if slow is not None else 0.0
    return _fmt_ratio(value / mine) if value and mine else "–"


def render(rows: list[Row], plan: Plan) -> str:
    """Wall time: per delta (long) and per request (short), against the raw socket (the
    floor), httpx's raw bytes and the openai SDK of the same kind."""
    socket_ = _by_kind(rows, "raw-socket")
    floor = _by_kind(rows, "httpx-raw")
    sdk = _by_kind(rows, "openai")
    lines = [
        "| consumer | kind | long: chunks/s | long: µs/delta | long: × socket "
        "| long: × httpx-raw | long: openai ÷ this | short: ms/request | short: × socket "
        "| short: × httpx-raw | short: openai ÷ this |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        kind = r.spec.kind
        cells = [
            r.spec.label + (f" ({r.note})" if r.note else ""),
            kind,
            f"{plan.long_chunks / r.long_s:,.0f}",
            f"{r.long_s / plan.long_chunks * 1e6:.2f}",
            _ratio(r.long_s, socket_.get(kind), "long_s"),
            _ratio(r.long_s, floor.get(kind), "long_s"),
            _speedup(sdk.get(kind), "long_s", r.long_s),
            f"{r.short_s / plan.short_streams * 1e3:.3f}",
            _ratio(r.short_s, socket_.get(kind), "short_s"),
            _ratio(r.short_s, floor.get(kind), "short_s"),
            _speedup(sdk.get(kind), "short_s", r.short_s),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_cpu(rows: list[Row], plan: Plan) -> str:
    """The client's own CPU time (the worker process, watchdog thread included)."""
    socket_ = _by_kind(rows, "raw-socket")
    lines = [
        "| consumer | kind | long: CPU µs/delta | long: CPU × socket "
        "| short: CPU ms/request | short: CPU × socket |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        base = socket_.get(r.spec.kind)
        cells = [
            r.spec.label,
            r.spec.kind,
            f"{r.long_cpu / plan.long_chunks * 1e6:.2f}",
            _ratio(r.long_cpu, base, "long_cpu"),
            f"{r.short_cpu / plan.short_streams * 1e3:.3f}",
            _ratio(r.short_cpu, base, "short_cpu"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: The issue's goals (#17): per delta within LONG_LIMIT x the raw socket on a long stream
#: and SHORT_LIMIT x on short streams, and at least SDK_SPEEDUP x faster than openai.
LONG_LIMIT, SHORT_LIMIT, SDK_SPEEDUP = 5.0, 3.0, 30.0


def goals(rows: list[Row]) -> list[str]:
    """The issue's goals per tokenhub_stream row, both shapes."""
    socket_ = _by_kind(rows, "raw-socket")
    sdk = _by_kind(rows, "openai")
    out = [
        "| tokenhub_stream | kind | shape | × socket | limit | ok | openai ÷ this "
        f"| ≥{SDK_SPEEDUP:.0f}x | CPU × socket | best ÷ best socket |",
        "|---|---|---|--:|--:|---|--:|---|--:|--:|",
    ]
    for r in rows:
        kind = r.spec.kind
        base = socket_.get(kind)
        if r.spec.family != "tokenhub_stream" or base is None:
            continue
        slow = sdk.get(kind)
        variant = r.spec.label.removeprefix("tokenhub_stream").strip()
        for shape, limit in (("long", LONG_LIMIT), ("short", SHORT_LIMIT)):
            mine = getattr(r, f"{shape}_s")
            ratio = mine / getattr(base, f"{shape}_s")
            cpu = _ratio(getattr(r, f"{shape}_cpu"), base, f"{shape}_cpu")
            best = _ratio(getattr(r, f"{shape}_best"), base, f"{shape}_best")
            if slow is not None:
                speedup = getattr(slow, f"{shape}_s") / mine
                sdk_cells = f"{speedup:.1f}x | {'yes' if speedup >= SDK_SPEEDUP else 'NO'}"
            else:
                sdk_cells = "– | –"
            out.append(
                f"| {variant} | {kind} | {shape} | {ratio:.2f}x | {limit:.0f}x "
                f"| {'yes' if ratio <= limit else 'NO'} | {sdk_cells} | {cpu} | {best} |"
            )
    bounds = []
    for kind, base in socket_.items():
        slow = sdk.get(kind)
        if slow is not None:
            bounds.append(
                f"{kind}: the raw socket itself is {slow.long_s / base.long_s:.0f}x (long) and "
                f"{slow.short_s / base.short_s:.0f}x (short) faster than openai"
            )
    table = out if len(out) > 2 else []
    return table + ([""] if table else []) + [f"- {b}" for b in bounds]


def orchestrate(args: argparse.Namespace) -> int:
    if args.quick:
        plan = Plan(long_chunks=5_000, short_streams=100, short_chunks=50, reps=3)
    else:
        plan = Plan(long_chunks=50_000, short_streams=1_000, short_chunks=50, reps=args.reps)
    wanted = set(args.only.split(",")) if args.only else None
    with contextlib.ExitStack() as stack:
        baselines = [(rev, stack.enter_context(checkout_of(rev))) for rev in args.baseline]
        specs = [s for s in all_specs(baselines, args.otel) if wanted is None or s.family in wanted]
        return _orchestrate(args, plan, specs)


def _orchestrate(args: argparse.Namespace, plan: Plan, specs: list[Spec]) -> int:
    if args.tls:
        with self_signed() as (cert, key):
            return _run(args, plan, specs, (cert, key))
    return _run(args, plan, specs, None)


def _run(
    args: argparse.Namespace, plan: Plan, specs: list[Spec], tls: tuple[str, str] | None
) -> int:
    timeout = 120.0 if args.quick else 900.0
    env_extra = {"SSL_CERT_FILE": tls[0]} if tls is not None else {}

    notes: list[str] = []
    failures: list[str] = []
    samples: dict[str, dict[str, list[float]]] = {}  # spec key -> long_s/short_s/... lists
    dropped: set[str] = set()  # skipped, failed or without orjson: no row
    one_rep = dataclasses.replace(plan, reps=1)
    started = time.perf_counter()
    with sse_server([plan.long_chunks, plan.short_chunks], tls=tls) as url:
        log(f"sse_server at {url}; plan {plan}")
        for round_no in range(1, plan.reps + 1):
            for spec in specs:
                if spec.key in dropped:
                    continue
                t0 = time.perf_counter()
                result = run_worker(spec, url, one_rep, timeout, env_extra)
                status = result["status"]
                if status == "skip":
                    log(f"{spec.key}: skipped: {result['reason']}")
                    notes.append(f"{spec.family} skipped: {result['reason']}")
                    dropped.add(spec.key)
                    continue
                if status != "ok":
                    failures.append(f"{spec.key}: {result['reason']}")
                    log(f"{spec.key}: FAILED: {result['reason']}")
                    dropped.add(spec.key)
                    continue
                if spec.json == "orjson" and not result.get("orjson_loaded"):
                    notes.append(
                        f"{spec.kind} tokenhub_stream did not load orjson with "
                        "TOKENHUB_STREAM_JSON=orjson; only the stdlib row is shown"
                    )
                    dropped.add(spec.key)
                    continue
                got = samples.setdefault(spec.key, {})
                for name in ("long_s", "short_s", "long_cpu", "short_cpu"):
                    values = result[name]
                    assert isinstance(values, list)
                    got.setdefault(name, []).extend(float(x) for x in values)
                log(
                    f"round {round_no}/{plan.reps} {spec.key}: long "
                    f"{plan.long_chunks / got['long_s'][-1]:,.0f} chunks/s, short "
                    f"{got['short_s'][-1] / plan.short_streams * 1e3:.3f} ms/request "
                    f"[{time.perf_counter() - t0:.1f} s]"
                )

    def median(key: str, name: str) -> float:
        return statistics.median(samples[key][name])

    rows = [
        Row(
            spec,
            median(spec.key, "long_s"),
            median(spec.key, "short_s"),
            long_cpu=median(spec.key, "long_cpu"),
            short_cpu=median(spec.key, "short_cpu"),
            long_best=min(samples[spec.key]["long_s"]),
            short_best=min(samples[spec.key]["short_s"]),
        )
        for spec in specs
        if spec.key in samples and spec.key not in dropped
    ]

    shown = " ".join(sys.argv[1:]) if sys.argv[0].endswith("client_bench.py") else ""
    print(f"Command: `python benchmarks/client_bench.py{' ' + shown if shown else ''}`  ")
    print(
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {_versions()}  "
    )
    print(
        (
            "Over TLS (HTTPS to a local server, a self-signed certificate made for the run). "
            if tls
            else ""
        )
        + f"long = 1 stream of {plan.long_chunks:,} chunks; short = {plan.short_streams:,} "
        f"sequential streams of {plan.short_chunks} chunks on one client; "
        f"medians of {plan.reps} repetitions, each in its own worker, round-robin over the "
        f"consumers (after {WARMUP_STREAMS} warm-up streams per worker); "
        f"total {time.perf_counter() - started:.0f} s"
    )
    print()
    print(render(rows, plan))
    print()
    print("Client CPU time (the worker process's `time.process_time()`; less disturbed by")
    print("other processes than the wall time above):")
    print()
    print(render_cpu(rows, plan))
    met = goals(rows)
    if met:
        print()
        print(
            f"Goal (#17): per delta ≤{LONG_LIMIT:.0f}x the raw socket on a long stream, "
            f"≤{SHORT_LIMIT:.0f}x on short streams; ≥{SDK_SPEEDUP:.0f}x faster than openai."
        )
        print("`× socket` compares medians (the goal's measure); `best ÷ best socket` compares")
        print("the fastest repetitions, the least disturbed by other processes on the machine.")
        print()
        print("\n".join(met))
    if notes:
        print()
        print("\n".join(f"- {n}" for n in dict.fromkeys(notes)))
    if failures:
        print()
        print("FAILED:\n" + "\n".join(failures))
        log("FAILED: " + "; ".join(f.splitlines()[0] for f in failures))
        return 1
    return 0


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("httpx", "httpx-sse", "openai", "orjson"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    about: dict[str, str] = {}
    with contextlib.suppress(OSError):
        exec((SRC / "tokenhub_stream" / "__version__.py").read_text(), about)
    found.append(f"tokenhub_stream {about.get('__version__', '?')} (checkout)")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run, under ~30 s")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per shape (full run)")
    parser.add_argument("--only", help="comma-separated families, e.g. httpx-raw,tokenhub_stream")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        nargs="+",
        default=[],
        help="also run tokenhub_stream as of git revision REV (a `git archive` of its src/), "
        "side by side in the same rounds: before/after figures from one run",
    )
    parser.add_argument(
        "--tls", action="store_true", help="over HTTPS: a local server, a self-signed certificate"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="tracemalloc figures instead: one idle pooled connection, one open stream",
    )
    parser.add_argument(
        "--otel",
        action="store_true",
        help="also run tokenhub_stream with opentelemetry made unimportable; the usual rows "
        "have it importable with no provider configured (telemetry off)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = Spec(**json.loads(args.worker))
        plan = Plan(**json.loads(args.plan))
        print(json.dumps(worker(spec, args.url, plan)), flush=True)
        return 0
    if not 1 <= args.reps <= 100:
        parser.error("--reps must be 1..100")
    if args.memory:
        return memory(args)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
