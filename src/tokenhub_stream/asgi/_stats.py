"""`ProxyStats`: what one proxy is doing now, for `GET <mount>/stats` (sans-I/O).

Counters of this process, kept without OpenTelemetry: open streams, turns by outcome
(and the statuses of the rejected ones), bytes relayed, keep-alives, tokens, and
percentiles of the time to first token and of each stream's tokens/s over the last
`RESERVOIR` turns. Updated once when a turn is forwarded and once when it ends, never per
chunk.

Internal interface of `tokenhub_stream.asgi` (used by `_telemetry.py` and `_proxy.py`).
"""

from __future__ import annotations

import time
from collections import deque

__all__ = ["RESERVOIR", "ProxyStats"]

#: The turns the percentiles are taken over (the most recent ones).
RESERVOIR = 1024

_OUTCOMES = ("completed", "client_disconnect", "upstream_error", "timeout", "rejected")


class ProxyStats:
    """The live counters of one `ChatProxy` in this process."""

    __slots__ = (
        "bytes_sent",
        "input_tokens",
        "keepalives",
        "open_streams",
        "output_tokens",
        "rejected",
        "since",
        "turns",
        "_rates",
        "_ttft",
    )

    def __init__(self) -> None:
        self.since = time.time()
        self.open_streams = 0
        self.turns = dict.fromkeys(_OUTCOMES, 0)
        self.rejected: dict[int, int] = {}
        self.bytes_sent = 0
        self.keepalives = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self._ttft: deque[float] = deque(maxlen=RESERVOIR)
        self._rates: deque[float] = deque(maxlen=RESERVOIR)

    def __repr__(self) -> str:
        return f"<ProxyStats open_streams={self.open_streams} turns={sum(self.turns.values())}>"

    def opened(self) -> None:
        """A turn was admitted and is being forwarded."""
        self.open_streams += 1

    def ended(
        self,
        *,
        outcome: str,
        status: int,
        opened: bool,
        ttft: float | None,
        output_seconds: float | None,
        input_tokens: int,
        output_tokens: int,
        bytes_sent: int,
        keepalives: int,
    ) -> None:
        """A turn ended (`opened`: `opened()` was called for it)."""
        if opened:
            self.open_streams -= 1
        self.turns[outcome] = self.turns.get(outcome, 0) + 1
        if outcome == "rejected":
            self.rejected[status] = self.rejected.get(status, 0) + 1
        self.bytes_sent += bytes_sent
        self.keepalives += keepalives
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if ttft is not None:
            self._ttft.append(ttft)
        if output_tokens and output_seconds is not None and output_seconds > 0:
            self._rates.append(output_tokens / output_seconds)

    def snapshot(self) -> dict[str, object]:
        """The counters as JSON-ready data (docs/proxy.md, "Live stats")."""
        return {
            "object": "proxy.stats",
            "since": round(self.since, 3),
            "open_streams": self.open_streams,
            "turns": dict(self.turns),
            "rejected": {str(status): n for status, n in sorted(self.rejected.items())},
            "time_to_first_token": _percentiles(self._ttft, 4),
            "tokens_per_second": _percentiles(self._rates, 1),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "bytes_sent": self.bytes_sent,
            "keepalives_sent": self.keepalives,
        }


def _percentiles(values: deque[float], digits: int) -> dict[str, object]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p95": None, "samples": 0}
    return {
        "p50": round(_rank(ordered, 50), digits),
        "p95": round(_rank(ordered, 95), digits),
        "samples": len(ordered),
    }


def _rank(ordered: list[float], percent: int) -> float:
    # Nearest rank: the smallest value with at least `percent`% of the samples at or
    # below it (integer arithmetic: ceil(percent * n / 100)).
    rank = -(-percent * len(ordered) // 100)
    return ordered[max(rank, 1) - 1]
