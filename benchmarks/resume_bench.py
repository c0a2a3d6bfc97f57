"""What resumable streams add to the relaying worker: CPU per event of tagging and buffering.

Run (inside the project's virtualenv; on a shared machine under the benchmark lock):

    flock /tmp/bench.lock python benchmarks/resume_bench.py
    flock /tmp/bench.lock python benchmarks/resume_bench.py --redis redis://127.0.0.1:6379/0

Drives `ResumableStream.tag()` (split into events, insert `id:`, append to the buffer) the
way ChatProxy does for every upstream chunk of a resumable stream, one ~160-byte
`chat.completion.chunk` event per chunk, 100 per stream: `--streams` streams in memory
(one after the other, round robin), and, with `--redis`, concurrent streams on
`RedisStreamBuffer` (redis-py's asyncio client). Reports this process's CPU time per event
and per 100-event stream (`time.process_time()`), which is what ChatProxy's own cost per
stream (docs/performance.md) grows by.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from tokenhub_stream.asgi._resume import InMemoryStreamBuffer, ResumableStream, StreamBuffer

EVENTS = 100
_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [{"index": 0, "delta": {"content": "word "}, "finish_reason": None}],
}
EVENT = b"data: " + json.dumps(_CHUNK, separators=(",", ":")).encode() + b"\n\n"


async def run(buffer: StreamBuffer, streams: int, concurrent: bool) -> tuple[float, float]:
    relays = [ResumableStream(buffer, "principal:bench", 300) for _ in range(streams)]
    for relay in relays:
        assert await relay.open()
    cpu, wall = time.process_time(), time.perf_counter()
    if concurrent:

        async def one(relay: ResumableStream) -> None:
            for _ in range(EVENTS):
                await relay.tag(EVENT)

        await asyncio.gather(*(one(r) for r in relays))
    else:
        for _ in range(EVENTS):
            for relay in relays:
                await relay.tag(EVENT)
    events = streams * EVENTS
    return (time.process_time() - cpu) / events, events / (time.perf_counter() - wall)


def report(name: str, per_event: float, rate: float) -> None:
    print(
        f"{name}: {per_event * 1e6:.1f} us CPU per event, "
        f"{per_event * EVENTS * 1e3:.2f} ms per {EVENTS}-event stream, {rate:,.0f} events/s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--redis", help="a redis:// URL: also measure RedisStreamBuffer")
    parser.add_argument("--redis-streams", type=int, default=50)
    args = parser.parse_args()
    memory = InMemoryStreamBuffer(max_streams=args.streams, max_stream_bytes=1 << 30)
    print(f"event of {len(EVENT)} bytes, {EVENTS} per stream")
    report(f"in memory, {args.streams} streams", *await run(memory, args.streams, False))
    if args.redis:
        from tokenhub_stream.redis import RedisStreamBuffer

        async with RedisStreamBuffer(args.redis, prefix="tokenhub-bench:") as redis:
            report(
                f"Redis, {args.redis_streams} concurrent streams",
                *await run(redis, args.redis_streams, True),
            )


if __name__ == "__main__":
    asyncio.run(main())
