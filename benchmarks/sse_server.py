"""A fast local OpenAI-compatible streaming server, for the client benchmark.

Run it in its own process so it never competes with the measured client in one event loop:

    python benchmarks/sse_server.py [--port 0] [--tls-cert CERT --tls-key KEY]

It prints its base URL (``http://127.0.0.1:PORT``) as the first line on stdout, then serves
until SIGTERM/SIGINT, until its stdin reaches EOF (the parent went away), or until
``--lifetime`` seconds have passed.

``POST /v1/chat/completions`` (any path ending in ``/chat/completions``) answers with
``Transfer-Encoding: chunked`` and ``content-type: text/event-stream``, writing each SSE event
(``data: {chat.completion.chunk}\\n\\n``) as one HTTP chunk, as real servers do: a role-only
first chunk, N content chunks, a ``finish_reason`` chunk, ``data: [DONE]``, then the
``0\\r\\n\\r\\n`` terminator. N comes from, in order: the ``chunks`` query parameter, the
``x-bench-chunks`` header, the JSON body's ``max_tokens`` / ``max_completion_tokens``, else 50.

Every response body is built once per N and cached, so the server costs one ``write()`` per
request and is much faster than any client. The content of delta ``i`` is ``token(i)``;
``expected_text(n)`` and ``event_bytes(n)`` give what a client must deliver, and
``wire_bytes(n)`` what a raw socket receives (head, chunk framing and all).

With ``stall`` in the query (``?stall=1``) or an ``x-bench-stall`` header the answer is
the head and the first N events,
and then nothing: the connection stays open until the client leaves (an open stream, for
the memory figures). With ``--tls-cert``/``--tls-key`` it serves HTTPS.

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import zlib
from functools import lru_cache
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DEFAULT_CHUNKS",
    "wire_bytes",
    "MAX_CHUNKS",
    "Checksum",
    "checksum",
    "event_bytes",
    "expected_checksum",
    "expected_text",
    "response_body",
    "token",
]

DEFAULT_CHUNKS = 50
MAX_CHUNKS = 2_000_000
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1024 * 1024

Checksum = tuple[int, int, int]  # (characters, crc32 of the UTF-8 text, deltas)


def token(i: int) -> str:
    """Content of delta ``i``: a short realistic token, non-ASCII every 100th."""
    if i % 100 == 99:
        return " naïve"
    return f" word{i % 1000}"


def expected_text(n: int) -> str:
    return "".join(token(i) for i in range(n))


def checksum(text: str, deltas: int) -> Checksum:
    return (len(text), zlib.crc32(text.encode()), deltas)


@lru_cache(maxsize=64)
def expected_checksum(n: int) -> Checksum:
    return checksum(expected_text(n), n)


def _chunk_json(delta: dict[str, str], finish_reason: str | None) -> bytes:
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _events(n: int) -> list[bytes]:
    """The SSE events of one stream, each ``data: ...\\n\\n``."""
    payloads = [_chunk_json({"role": "assistant", "content": ""}, None)]
    payloads.extend(_chunk_json({"content": token(i)}, None) for i in range(n))
    payloads.append(_chunk_json({}, "stop"))
    payloads.append(b"[DONE]")
    return [b"data: " + p + b"\n\n" for p in payloads]


@lru_cache(maxsize=16)
def event_bytes(n: int) -> int:
    """Bytes a raw (de-chunked) reader of a stream of ``n`` content deltas receives."""
    return sum(len(e) for e in _events(n))


@lru_cache(maxsize=16)
def response_body(n: int) -> bytes:
    """The chunked body: one HTTP chunk per SSE event, then the terminator."""
    parts = [b"%x\r\n%s\r\n" % (len(e), e) for e in _events(n)]
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def wire_bytes(n: int) -> int:
    """Bytes a raw socket receives for a stream of ``n`` content deltas: head and body."""
    return len(_STREAM_HEAD) + len(response_body(n))


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\n"
    b"x-request-id: req-bench\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)


def _plain(status: str, message: str, *, close: bool = False) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "bench"}}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n" + ("connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode("latin-1") + body


def _chunk_count(target: str, headers: dict[str, str], body: bytes) -> int:
    query = parse_qs(urlsplit(target).query)
    if "chunks" in query:
        return int(query["chunks"][0])
    if "x-bench-chunks" in headers:
        return int(headers["x-bench-chunks"])
    if body:
        obj = json.loads(body)
        if isinstance(obj, dict):
            for key in ("max_tokens", "max_completion_tokens"):
                value = obj.get(key)
                if isinstance(value, int):
                    return value
    return DEFAULT_CHUNKS


class _HTTPProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1 keep-alive server: Content-Length bodies, any packet boundaries."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        # Bounded: each pass consumes one whole request or returns.
        for _ in range(1024):
            if self._transport is None or not self._handle_one():
                return

    def _fail(self, status: str, message: str) -> bool:
        assert self._transport is not None
        self._transport.write(_plain(status, message, close=True))
        self._transport.close()
        self._buffer.clear()
        return False

    def _handle_one(self) -> bool:
        """Answer one complete request from the buffer; False if more bytes are needed."""
        assert self._transport is not None
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                return self._fail("431 Request Header Fields Too Large", "head too large")
            return False
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._fail("400 Bad Request", "bad request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                return self._fail("400 Bad Request", "bad header line")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            return self._fail("501 Not Implemented", "request bodies need content-length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return self._fail("400 Bad Request", "bad content-length")
        if not 0 <= length <= MAX_BODY_BYTES:
            return self._fail("413 Content Too Large", "body too large")
        start = end + 4
        if len(self._buffer) < start + length:
            return False  # the body arrives in a later packet
        body = bytes(self._buffer[start : start + length])
        del self._buffer[: start + length]

        close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
        path = urlsplit(target).path
        if method != "POST" or not path.endswith("/chat/completions"):
            self._transport.write(_plain("404 Not Found", f"no route {method} {path}", close=close))
        else:
            try:
                n = _chunk_count(target, headers, body)
            except ValueError:
                return self._fail("400 Bad Request", "bad chunk count or JSON body")
            if not 0 <= n <= MAX_CHUNKS:
                return self._fail("400 Bad Request", f"chunk count must be 0..{MAX_CHUNKS}")
            if "stall" in parse_qs(urlsplit(target).query) or "x-bench-stall" in headers:
                events = _events(n)[:-3]  # no finish chunk, no [DONE], no terminator
                parts = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
                self._transport.write(_STREAM_HEAD + b"".join(parts))
                return False  # nothing more on this connection
            self._transport.write(_STREAM_HEAD + response_body(n))
        if close:
            self._transport.close()
            return False
        return True


async def serve(host: str, port: int, lifetime: float, tls: ssl.SSLContext | None = None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_HTTPProtocol, host, port, backlog=1024, ssl=tls)
    bound = server.sockets[0].getsockname()
    scheme = "https" if tls is not None else "http"
    print(f"{scheme}://{bound[0]}:{bound[1]}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not sys.stdin.isatty():
        fd = sys.stdin.fileno()

        def _on_stdin() -> None:
            if not os.read(fd, 4096):  # EOF: the parent is gone
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, _on_stdin)
    async with server:
        try:
            await asyncio.wait_for(stop.wait(), timeout=lifetime)
        except TimeoutError:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--lifetime", type=float, default=3600.0, help="exit after this many s")
    parser.add_argument(
        "--prebuild", type=int, nargs="*", default=[], help="chunk counts to build up front"
    )
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="... and this private key (PEM)")
    args = parser.parse_args(argv)
    for n in args.prebuild:
        response_body(n)
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    asyncio.run(serve(args.host, args.port, args.lifetime, tls))


if __name__ == "__main__":
    main()
