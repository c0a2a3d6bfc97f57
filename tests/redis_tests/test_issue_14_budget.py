"""Issue 14, finding 4, with a real RedisBudget behind a real uvicorn: leaving early is charged.

The issue measured, with the documented usage hook, 61 tokens for a whole answer and 0 for
59 of 60 words read before the tab closed. Here no hook is needed: the proxy asks the
upstream for usage itself, and charges an estimate when the turn ends without it.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette

from tokenhub_stream import Usage
from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.redis import RedisBudget
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

from .conftest import serve

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KEY = "sk-redis-canary-0c4f9b2e7a1d"
BODY = {"messages": [{"role": "user", "content": "Count to sixty, please."}]}
ANSWER = " ".join(f"w{i:02d}" for i in range(60))
USAGE = {"prompt_tokens": 12, "completion_tokens": 60, "total_tokens": 72}
LIMIT_KEY = "address:127.0.0.1"


def app_for(proxy: ChatProxy, budget: RedisBudget) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with budget, proxy:
            yield

    return Starlette(routes=proxy.routes("/api/chat"), lifespan=lifespan)


async def read(url: str, words: int | None) -> str:
    """Read the answer (until `words` words arrived, if given), then close the connection."""
    text = ""
    async with httpx.AsyncClient(timeout=5) as client:
        async with client.stream("POST", f"{url}/api/chat", json=BODY) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        text += choice["delta"].get("content") or ""
                if words is not None and len(text.split()) >= words:
                    break
    return text


class WatchedBudget(RedisBudget):
    """A RedisBudget that says when the proxy charged it (from the server's thread)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.charges: list[Usage] = []
        self.charged = threading.Event()

    async def record(self, key: str, usage: Usage) -> None:
        await super().record(key, usage)
        self.charges.append(usage)
        self.charged.set()


@pytest.mark.parametrize("words", [None, 57], ids=["whole", "57_of_60"])
async def test_issue_14_leaving_early_is_charged_to_the_redis_budget(
    redis_url: str, words: int | None
) -> None:
    # 50 ms between words: the close after word 57 reaches the upstream before word 60
    # (and the usage after it) with room to spare on a loaded machine.
    upstream = FakeChatUpstream(api_key=KEY, delay=0.05)
    upstream.enqueue(Script(text=ANSWER, usage=USAGE))
    budget = WatchedBudget(redis_url, requests=10, tokens=10_000, window=3600)
    checker = RedisBudget(redis_url, requests=10, tokens=10_000, window=3600)
    with run_upstream(upstream) as running:
        # No on_request hook: the proxy asks for usage because the limiter needs it.
        proxy = ChatProxy(api_key=KEY, base_url=running.base_url, rate_limiter=budget)
        with serve(app_for(proxy, budget)) as url:
            async with checker:
                with anyio.fail_after(20):
                    text = await read(url, words)
                    # The proxy charges after the turn, maybe after the browser's last byte.
                    assert await anyio.to_thread.run_sync(budget.charged.wait, 10)
                    tokens = (await checker.spent(LIMIT_KEY)).tokens
    assert len(budget.charges) == 1 and budget.charges[0].total_tokens == tokens
    request = upstream.requests[0]
    assert request.json is not None
    assert request.json["stream_options"] == {"include_usage": True}
    if words is None:
        assert text == ANSWER
        assert tokens == USAGE["total_tokens"]  # the upstream's own count
        return
    assert len(text.split()) >= 57
    assert not request.completed  # the proxy closed the upstream: no usage came
    # The estimate: ceil(request body bytes / 4) + ceil(text relayed / 4); the proxy may
    # have relayed a little more than the browser read before it noticed the close.
    prompt = math.ceil(len(request.body) / 4)
    assert prompt + math.ceil(len(text) / 4) <= tokens <= prompt + math.ceil(len(ANSWER) / 4)
