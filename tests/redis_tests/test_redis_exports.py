"""tokenhub_stream.redis: a sorted __all__, names reporting the public module, in api.md."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from tokenhub_stream import redis as th_redis

API = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_redis_exports_all_is_sorted_and_public() -> None:
    assert th_redis.__all__ == sorted(th_redis.__all__)
    for name in th_redis.__all__:
        value = getattr(th_redis, name)
        if inspect.isclass(value):
            assert value.__module__ == "tokenhub_stream.redis", name


def test_redis_exports_are_in_the_api_table() -> None:
    table = API.read_text(encoding="utf-8")
    for name in th_redis.__all__:
        row = re.compile(
            rf"^\| `redis\.{re.escape(name)}` \| [^|]*\S[^|]* \| \[[^\]]+\]\([^)]+\) \|$", re.M
        )
        assert row.search(table), f"docs/api.md has no table row for `redis.{name}`"
