"""The clients' one retry policy, pure: after a failed attempt, whether to send again and
how long to wait first. Both shells drive it, for `stream_chat` (opening the stream, and
after a failure before its first delta) and for `chat()`; they only sleep and resend.

- Only an error marked `.retryable` is retried (a failed connect, 408, 429, 5xx, a
  retryable error frame), at most `max_retries` times per call.
- Never once a stream handed out a delta: its consumer has seen output a retry would
  repeat.
- A `Retry-After` (`RateLimitError.retry_after`) is waited out when it is at most
  `max_retry_wait` seconds; a longer one raises the error at once.
- Otherwise exponential backoff: 0.5 s, 1 s, 2 s, ... capped at 8 s, each times a random
  0.5 to 1 (jitter, so that clients refused together do not come back together).
"""

from __future__ import annotations

import random
from typing import Protocol

from ._exceptions import TokenHubError

__all__ = ["Retries", "RetryObserver"]


class RetryObserver(Protocol):
    """Told of each retry granted (the request's telemetry: `_telemetry.ChatRecorder`)."""

    def retrying(self, error: BaseException, attempt: int, delay: float) -> None: ...


class Retries:
    """The retries of one call.

    ```python
    retries = Retries(max_retries=2, max_wait=60.0)
    while True:
        error = try_once()  # None on success
        if error is None:
            break
        delay = retries.next_delay(error)
        if delay is None:
            raise error
        sleep(delay)
    ```
    """

    __slots__ = ("attempt", "max_retries", "max_wait", "observer")

    def __init__(
        self, max_retries: int, max_wait: float, observer: RetryObserver | None = None
    ) -> None:
        self.max_retries = max_retries
        self.max_wait = max_wait
        self.observer = observer
        #: Retries granted so far.
        self.attempt = 0

    def next_delay(self, error: TokenHubError, *, delivered: bool = False) -> float | None:
        """Seconds to wait before sending again after `error`, or None to raise it.

        Args:
            error: why the last attempt failed.
            delivered: the stream already handed out a delta (then never retry).
        """
        if delivered or self.attempt >= self.max_retries:
            return None
        if not getattr(error, "retryable", False):
            return None
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float):
            if retry_after > self.max_wait:
                return None
            delay = float(retry_after)
        else:
            delay = min(8.0, 0.5 * 2.0**self.attempt) * (0.5 + random.random() / 2)
        self.attempt += 1
        if self.observer is not None:
            self.observer.retrying(error, self.attempt, delay)
        return delay
