from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, TypeAlias

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MAX_RETRY_WAIT",
    "DEFAULT_MODEL",
    "DEFAULT_TIMEOUT",
    "Timeout",
]

DEFAULT_BASE_URL = "https://api.sandboxclaw.com/v1"
DEFAULT_MODEL = "claude-3-5-sonnet-20241022"
DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_RETRY_WAIT = 60.0
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT = 0.05
DRAIN_MAX_BYTES = 64 * 1024

ENV_API_KEY = "TOKENHUB_KEY"
ENV_BASE_URL = "TOKENHUB_BASE_URL"
#: "httpx" sends every client's requests through httpx instead of the engine.
ENV_ENGINE = "TOKENHUB_STREAM_ENGINE"


class _Unset(Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: "Not given" (None has a meaning of its own: no limit).
UNSET: Final = _Unset.UNSET
UnsetType: TypeAlias = Literal[_Unset.UNSET]


@dataclass(frozen=True, slots=True)
class Timeout:
    """The four timeouts of a stream, in seconds; `None` disables one.

    ```python
    Timeout(connect=5, first_token=30, idle=20, total=300)
    Timeout(10)  # connect, first_token and idle all 10 s, no total limit
    ```

    Args:
        default: the value for `connect`, `first_token` and `idle` when not given.
        connect: opening the TCP/TLS connection.
        first_token: from sending the request until the first delta of any kind
            (content, reasoning, tool call) or a finish_reason arrives.
        idle: the longest gap between two data events once tokens flow.
            Keep-alive comments and events with empty data are not progress: they
            reset no timeout.
        total: the whole stream, request to end.
    """

    connect: float | None = 10.0
    first_token: float | None = 120.0
    idle: float | None = 60.0
    total: float | None = None

    def __init__(
        self,
        default: float | None | UnsetType = UNSET,
        *,
        connect: float | None | UnsetType = UNSET,
        first_token: float | None | UnsetType = UNSET,
        idle: float | None | UnsetType = UNSET,
        total: float | None = None,
    ) -> None:
        base: dict[str, float | None] = {"connect": 10.0, "first_token": 120.0, "idle": 60.0}
        if default is not UNSET:
            base = dict.fromkeys(base, default)
        values = {"connect": connect, "first_token": first_token, "idle": idle}
        for name, value in values.items():
            if value is not UNSET:
                base[name] = value
        base["total"] = total
        for name, value in base.items():
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise ValueError(f"timeout {name} must be a positive number or None")
            object.__setattr__(self, name, None if value is None else float(value))

    @classmethod
    def coerce(cls, value: Timeout | float | None) -> Timeout:
        if isinstance(value, Timeout):
            return value
        return cls(value)


DEFAULT_TIMEOUT = Timeout()


def env_api_key() -> str | None:
    return os.environ.get(ENV_API_KEY) or None


def env_base_url() -> str | None:
    return os.environ.get(ENV_BASE_URL) or None


def env_engine() -> Literal["auto", "httpx"]:
    """`TOKENHUB_STREAM_ENGINE`: "auto" (unset or empty: the engine where it can send)
    or "httpx" (always httpx).

    Raises:
        ValueError: any other value.
    """
    value = os.environ.get(ENV_ENGINE, "").strip().lower() or "auto"
    if value == "auto":
        return "auto"
    if value == "httpx":
        return "httpx"
    raise ValueError(f"{ENV_ENGINE} must be 'auto' or 'httpx', not {value!r}")
