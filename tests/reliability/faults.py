"""Byte streams that break in scripted ways, shared by the client and proxy fault tests."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

# Multi-byte characters of every UTF-8 length, so a cut can land inside each.
WIDE = ["é", "€", "日", "🙂"]


def content_frame(text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    obj = {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def finish_frame() -> bytes:
    choice = {"index": 0, "delta": {}, "finish_reason": "stop"}
    return b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n"


@dataclass(frozen=True)
class Broken:
    """A stream of whole frames, then `tail` (part of a frame, or nothing), then a cut."""

    deltas: list[str]
    tail: bytes
    where: str

    @property
    def chunks(self) -> list[bytes]:
        frames = [content_frame(d) for d in self.deltas]
        return [*frames, self.tail] if self.tail else frames

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def broken_stream(where: str, rng: random.Random) -> Broken:
    """`where`: mid_stream (between events), mid_frame, or mid_utf8 (inside a character)."""
    deltas = [
        rng.choice(["Hello", " wörld", " 🙂", " ok", " 日本"]) for _ in range(rng.randint(1, 4))
    ]
    if where == "mid_stream":
        return Broken(deltas, b"", where)
    if where == "mid_frame":
        frame = content_frame("never delivered")
        return Broken(deltas, frame[: rng.randint(1, len(frame) - 3)], where)
    if where == "mid_utf8":
        wide = rng.choice(WIDE)
        frame = content_frame("x" + wide)
        start = frame.index(wide.encode())
        cut = start + rng.randint(1, len(wide.encode()) - 1)
        return Broken(deltas, frame[:cut], where)
    raise ValueError(where)


WHERE = ["mid_stream", "mid_frame", "mid_utf8"]
