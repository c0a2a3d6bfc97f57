"""Shared state on Redis, for several workers or machines: rate limits, budgets, streams.

```python
from tokenhub_stream.redis import RedisBudget, RedisRateLimiter

limiter = RedisRateLimiter("redis://localhost:6379/0", rate=1 / 6, burst=10)
proxy = ChatProxy(api_key=key, base_url=url, rate_limiter=limiter)
```

`RedisStreamBuffer` keeps resumable streams (`ChatProxy(stream_buffer=...)`) in Redis Streams.

Needs the `redis` extra (redis-py): `pip install 'tokenhub_stream[redis]'`. Uses
`redis.asyncio`, so it runs on asyncio event loops (uvicorn's and gunicorn's default).
"""

from __future__ import annotations

# Without redis-py, the first import below raises an ImportError naming the extra.
from ._limits import BudgetUsage, OnRedisError, RedisBudget, RedisRateLimiter
from ._streams import RedisStreamBuffer

__all__ = [
    "BudgetUsage",
    "OnRedisError",
    "RedisBudget",
    "RedisRateLimiter",
    "RedisStreamBuffer",
]

for _name in __all__:  # shown as tokenhub_stream.redis.X (reprs, docs), as httpx does
    _value = globals()[_name]
    if isinstance(_value, type):
        _value.__module__ = __name__
del _name, _value
