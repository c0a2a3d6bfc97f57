"""Client benchmark: streaming chat completions from a fast local SSE server.

    python benchmarks/client_bench.py [--quick]

Starts ``benchmarks/sse_server.py`` in its own process, then runs every consumer in a fresh
worker process of this script (so imports, the JSON-library choice and garbage never leak from
one consumer into the next) on two shapes:

* long:  one stream of 50,000 content chunks -> chunks/s and microseconds per delivered delta;
* short: 1,000 sequential streams of 50 chunks on ONE client -> milliseconds per request.

Consumers, each async and sync: ``httpx-raw`` (``aiter_raw``/``iter_raw``, counting bytes: the
floor for any httpx-based client), ``httpx-sse`` (httpx + httpx_sse + ``json.loads``), ``openai``
(the official SDK) and ``tokenhub_stream`` (stdlib json with orjson made unimportable, and with
``TOKENHUB_STREAM_JSON=orjson``). Every consumer's delivered text is checked against the
server's (characters, crc32, delta count); raw httpx is checked by byte count. A wrong checksum
or a failing consumer fails the run (exit 1); tokenhub_stream is skipped, with a line saying so,
while it cannot be imported.

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

from sse_server import checksum, event_bytes, expected_checksum  # noqa: E402

MESSAGES: list[dict[str, str]] = [{"role": "user", "content": "Say something long."}]
MODEL = "bench-model"
CHAT_PATH = "/v1/chat/completions"
WARMUP_STREAMS = 20

# ---------------------------------------------------------------------------------------------
# Consumers. Each delivers either the concatenated content (checked by characters, crc32 and
# delta count) or, for raw httpx, a byte count (checked against the server's event bytes).
# ---------------------------------------------------------------------------------------------

Delivered = tuple[str, int] | int  # (text, deltas) or raw byte count


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
    no_otel: bool = False  # tokenhub_stream only: opentelemetry made unimportable (--otel)

    @property
    def key(self) -> str:
        return f"{self.label}/{self.kind}"


ASYNC_CONSUMERS: dict[str, Callable[[str], AsyncConsumer]] = {
    "httpx-raw": HttpxRawAsync,
    "httpx-sse": HttpxSSEAsync,
    "openai": OpenAIAsync,
    "tokenhub_stream": TokenHubAsync,
}
SYNC_CONSUMERS: dict[str, Callable[[str], SyncConsumer]] = {
    "httpx-raw": HttpxRawSync,
    "httpx-sse": HttpxSSESync,
    "openai": OpenAISync,
    "tokenhub_stream": TokenHubSync,
}


def all_specs(baseline: tuple[str, str] | None = None, otel: bool = False) -> list[Spec]:
    specs: list[Spec] = []
    for kind in ("async", "sync"):
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
        if baseline is not None:
            rev, src = baseline
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
# Orchestrator: server subprocess, one worker subprocess per row, the table.
# ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def sse_server(prebuild: list[int], start_timeout: float = 30.0) -> Iterator[str]:
    cmd = [sys.executable, str(HERE / "sse_server.py"), "--port", "0", "--prebuild"]
    cmd += [str(n) for n in prebuild]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=start_timeout):
                raise RuntimeError(f"sse_server did not start within {start_timeout} s")
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"sse_server printed {url!r} instead of its URL")
        yield url
    finally:
        proc.kill()  # always: whatever happened above
        proc.wait(timeout=10)


def run_worker(spec: Spec, url: str, plan: Plan, timeout: float) -> dict[str, object]:
    env = dict(os.environ)
    if spec.json:
        env["TOKENHUB_STREAM_JSON"] = spec.json
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


def render(rows: list[Row], plan: Plan) -> str:
    floor = {r.spec.kind: r for r in rows if r.spec.family == "httpx-raw"}
    sdk = {r.spec.kind: r for r in rows if r.spec.family == "openai"}
    lines = [
        "| consumer | kind | long: chunks/s | long: µs/delta | long: × floor "
        "| long: openai ÷ this | short: ms/request | short: × floor | short: openai ÷ this |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        kind = r.spec.kind
        per_delta = r.long_s / plan.long_chunks
        per_request = r.short_s / plan.short_streams
        cells = [
            r.spec.label + (f" ({r.note})" if r.note else ""),
            kind,
            f"{plan.long_chunks / r.long_s:,.0f}",
            f"{per_delta * 1e6:.2f}",
        ]
        cells.append(_fmt_ratio(r.long_s / floor[kind].long_s) if kind in floor else "–")
        cells.append(_fmt_ratio(sdk[kind].long_s / r.long_s) if kind in sdk else "–")
        cells.append(f"{per_request * 1e3:.3f}")
        cells.append(_fmt_ratio(r.short_s / floor[kind].short_s) if kind in floor else "–")
        cells.append(_fmt_ratio(sdk[kind].short_s / r.short_s) if kind in sdk else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_cpu(rows: list[Row], plan: Plan) -> str:
    """The client's own CPU time (the worker process, watchdog thread included)."""
    floor = {r.spec.kind: r for r in rows if r.spec.family == "httpx-raw"}
    lines = [
        "| consumer | kind | long: CPU µs/delta | long: CPU × floor "
        "| short: CPU ms/request | short: CPU × floor |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        base = floor.get(r.spec.kind)
        cells = [
            r.spec.label,
            r.spec.kind,
            f"{r.long_cpu / plan.long_chunks * 1e6:.2f}",
            _fmt_ratio(r.long_cpu / base.long_cpu) if base and base.long_cpu else "–",
            f"{r.short_cpu / plan.short_streams * 1e3:.3f}",
            _fmt_ratio(r.short_cpu / base.short_cpu) if base and base.short_cpu else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(rows: list[Row]) -> list[str]:
    """The issue's goal per tokenhub_stream row: ≤1.3x the floor (orjson) or ≤1.5x (stdlib),
    and ≥6x faster than the openai SDK, on both shapes."""
    floor = {r.spec.kind: r for r in rows if r.spec.family == "httpx-raw"}
    sdk = {r.spec.kind: r for r in rows if r.spec.family == "openai"}
    out = [
        "| tokenhub_stream | kind | shape | × floor | limit | ok | openai ÷ this | ≥6x "
        "| CPU × floor | best ÷ best floor |",
        "|---|---|---|--:|--:|---|--:|---|--:|--:|",
    ]
    bounds: list[str] = []
    for r in rows:
        kind = r.spec.kind
        if r.spec.family != "tokenhub_stream" or kind not in floor or kind not in sdk:
            continue
        limit = 1.3 if r.spec.json == "orjson" else 1.5
        for shape, mine, base, slow, cpu, cpu_base, best, best_base in (
            (
                "long",
                r.long_s,
                floor[kind].long_s,
                sdk[kind].long_s,
                r.long_cpu,
                floor[kind].long_cpu,
                r.long_best,
                floor[kind].long_best,
            ),
            (
                "short",
                r.short_s,
                floor[kind].short_s,
                sdk[kind].short_s,
                r.short_cpu,
                floor[kind].short_cpu,
                r.short_best,
                floor[kind].short_best,
            ),
        ):
            ratio, speedup = mine / base, slow / mine
            variant = r.spec.label.removeprefix("tokenhub_stream").strip()
            cpu_ratio = _fmt_ratio(cpu / cpu_base) if cpu_base else "–"
            best_ratio = _fmt_ratio(best / best_base) if best_base else "–"
            out.append(
                f"| {variant} | {kind} | {shape} | {ratio:.2f}x | {limit}x "
                f"| {'yes' if ratio <= limit else 'NO'} | {speedup:.1f}x "
                f"| {'yes' if speedup >= 6.0 else 'NO'} | {cpu_ratio} | {best_ratio} |"
            )
    for kind in floor:
        if kind in sdk:
            long_x = sdk[kind].long_s / floor[kind].long_s
            short_x = sdk[kind].short_s / floor[kind].short_s
            bounds.append(
                f"{kind}: the httpx-raw floor itself is {long_x:.1f}x (long) and "
                f"{short_x:.1f}x (short) faster than openai"
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
        baseline = None
        if args.baseline:
            baseline = (args.baseline, stack.enter_context(checkout_of(args.baseline)))
        specs = [s for s in all_specs(baseline, args.otel) if wanted is None or s.family in wanted]
        return _orchestrate(args, plan, specs)


def _orchestrate(args: argparse.Namespace, plan: Plan, specs: list[Spec]) -> int:
    timeout = 120.0 if args.quick else 900.0

    notes: list[str] = []
    failures: list[str] = []
    samples: dict[str, dict[str, list[float]]] = {}  # spec key -> long_s/short_s/... lists
    dropped: set[str] = set()  # skipped, failed or without orjson: no row
    one_rep = dataclasses.replace(plan, reps=1)
    started = time.perf_counter()
    with sse_server([plan.long_chunks, plan.short_chunks]) as url:
        log(f"sse_server at {url}; plan {plan}")
        for round_no in range(1, plan.reps + 1):
            for spec in specs:
                if spec.key in dropped:
                    continue
                t0 = time.perf_counter()
                result = run_worker(spec, url, one_rep, timeout)
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
        f"long = 1 stream of {plan.long_chunks:,} chunks; short = {plan.short_streams:,} "
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
        print("Goal: ≤1.3x the httpx-raw floor with orjson, ≤1.5x without; ≥6x faster than openai.")
        print("`× floor` compares medians (the goal's measure); `best ÷ best floor` compares the")
        print("fastest repetitions, the least disturbed by other processes on the machine.")
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
        help="also run tokenhub_stream as of git revision REV (a `git archive` of its src/), "
        "side by side in the same rounds: before/after figures from one run",
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
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
