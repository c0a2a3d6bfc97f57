"""ChatProxy with the Redis limits: a budget charged from real streamed turns under uvicorn,
and the issue's proof, one limit held by two proxy processes sharing one Redis."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from tokenhub_stream._models import Usage
from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.redis import RedisBudget
from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

from .conftest import proxy_process, serve

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

KEY = "sk-redis-canary-0c4f9b2e7a1d"
MESSAGES = [{"role": "user", "content": "hi"}]
USAGE = {"prompt_tokens": 30, "completion_tokens": 45, "total_tokens": 75}


def ask_usage(request: Request, body: dict[str, object]) -> Mapping[str, object]:
    # Streamed turns report usage only when asked; the budget needs it.
    if body.get("stream") is not False:
        body["stream_options"] = {"include_usage": True}
    return body


def by_header(request: Request) -> str | None:
    return request.headers.get("x-user")


def app_for(proxy: ChatProxy, budget: RedisBudget) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with budget, proxy:  # both belong to the server's event loop
            yield

    return Starlette(routes=proxy.routes("/api/chat"), lifespan=lifespan)


def content_of(body: str) -> str:
    text = ""
    for line in body.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


async def wait_tokens(checker: RedisBudget, key: str, tokens: int) -> None:
    # The proxy records usage after the turn, when the last byte may already be out.
    with anyio.fail_after(5):
        while True:
            if (await checker.spent(key)).tokens >= tokens:
                return
            await anyio.sleep(0.01)


async def test_redis_budget_charges_streamed_turns_through_the_proxy(redis_url: str) -> None:
    upstream = FakeChatUpstream(api_key=KEY, delay=0.0)
    upstream.enqueue(*[Script(deltas=["Hi", " there"], usage=USAGE) for _ in range(3)])
    budget = RedisBudget(redis_url, requests=10, tokens=100, window=3600)
    with run_upstream(upstream) as running:
        proxy = ChatProxy(
            api_key=KEY,
            base_url=running.base_url,
            authorize=by_header,
            rate_limiter=budget,
            on_request=ask_usage,
        )
        with serve(app_for(proxy, budget)) as url:
            async with (
                httpx.AsyncClient(base_url=url, timeout=10) as client,
                RedisBudget(redis_url, requests=10, tokens=100, window=3600) as checker,
            ):
                alice = {"x-user": "alice"}
                first = await client.post("/api/chat", json={"messages": MESSAGES}, headers=alice)
                assert first.status_code == 200 and content_of(first.text) == "Hi there"
                assert first.text.endswith("data: [DONE]\n\n")
                await wait_tokens(checker, "principal:alice", 75)
                second = await client.post("/api/chat", json={"messages": MESSAGES}, headers=alice)
                assert second.status_code == 200  # 75 < 100: allowed, then charged to 150
                await wait_tokens(checker, "principal:alice", 150)
                third = await client.post("/api/chat", json={"messages": MESSAGES}, headers=alice)
                assert third.status_code == 429
                assert 1 <= int(third.headers["retry-after"]) <= 3600
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
                spent = await checker.spent("principal:alice")
                assert (spent.requests, spent.tokens) == (2, 150)
                bob = await client.post(
                    "/api/chat", json={"messages": MESSAGES}, headers={"x-user": "bob"}
                )
                assert bob.status_code == 200  # another principal, another budget
                await wait_tokens(checker, "principal:bob", 75)
    assert len(upstream.requests) == 3  # the refused turn never reached the upstream
    for response in (first, second, third, bob):
        assert KEY not in response.text and KEY not in str(response.headers)


async def test_redis_budget_charges_a_non_streamed_turn(redis_url: str) -> None:
    upstream = FakeChatUpstream(delay=0.0)
    upstream.enqueue(Script(text="plain answer", usage=USAGE))
    budget = RedisBudget(redis_url, tokens=1000, window=60)
    with run_upstream(upstream) as running:
        proxy = ChatProxy(api_key=None, base_url=running.base_url, rate_limiter=budget)
        with serve(app_for(proxy, budget)) as url:
            async with (
                httpx.AsyncClient(base_url=url, timeout=10) as client,
                RedisBudget(redis_url, tokens=1000, window=60) as checker,
            ):
                body = {"messages": MESSAGES, "stream": False}
                response = await client.post("/api/chat", json=body)
                assert response.status_code == 200
                assert response.json()["choices"][0]["message"]["content"] == "plain answer"
                await wait_tokens(checker, "address:127.0.0.1", 75)


class FailingRecorder:
    """A UsageLimiter whose `record` raises: the proxy logs it, the answer stays whole."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, Usage]] = []

    async def acquire(self, key: str) -> float | None:
        return None

    async def record(self, key: str, usage: Usage) -> None:
        self.recorded.append((key, usage))
        raise RuntimeError("the usage store is down")


async def test_proxy_logs_a_failing_usage_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    upstream = FakeChatUpstream(api_key=KEY, delay=0.0)
    upstream.enqueue(Script(deltas=["ok"], usage=USAGE))
    limiter = FailingRecorder()
    with run_upstream(upstream) as running:
        proxy = ChatProxy(
            api_key=KEY, base_url=running.base_url, rate_limiter=limiter, on_request=ask_usage
        )
        app = Starlette(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
        with serve(app) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                response = await client.post("/api/chat", json={"messages": MESSAGES})
            with anyio.fail_after(5):
                while True:
                    if any("record failed" in r.getMessage() for r in caplog.records):
                        break
                    await anyio.sleep(0.01)
    assert response.status_code == 200 and content_of(response.text) == "ok"
    assert response.text.endswith("data: [DONE]\n\n")
    assert limiter.recorded == [("address:127.0.0.1", Usage.from_dict(USAGE))]
    assert KEY not in caplog.text


# --- the issue's proof: two proxy processes, one limit ----------------------------------------


@pytest.mark.parametrize("kind", ["bucket", "budget"])
async def test_issue_7_limit_holds_across_two_proxy_processes(redis_url: str, kind: str) -> None:
    n = 5
    upstream = FakeChatUpstream(api_key=KEY, delay=0.005)
    with run_upstream(upstream) as running:
        env = {
            "UPSTREAM_URL": running.base_url,
            "UPSTREAM_KEY": KEY,
            "REDIS_URL": redis_url,
            "LIMIT_KIND": kind,
            "LIMIT_REQUESTS": str(n),
        }
        factory = "redis_tests.apps:limited_proxy"
        with proxy_process(factory, env) as first, proxy_process(factory, env) as second:
            assert first != second
            results: list[tuple[str, httpx.Response]] = []

            async def post(client: httpx.AsyncClient, base: str, go: anyio.Event) -> None:
                await go.wait()
                response = await client.post(base + "/api/chat", json={"messages": MESSAGES})
                results.append((base, response))

            limits = httpx.Limits(max_connections=3 * n)
            async with httpx.AsyncClient(timeout=20, limits=limits) as client:
                go = anyio.Event()
                async with anyio.create_task_group() as tg:
                    for i in range(3 * n):
                        tg.start_soon(post, client, (first, second)[i % 2], go)
                    await anyio.sleep(0.1)  # every request ready, then all at once
                    go.set()
    statuses = sorted(r.status_code for _, r in results)
    assert statuses == [200] * n + [429] * (2 * n)
    assert {base for base, _ in results} == {first, second}
    for _, response in results:
        assert KEY not in response.text and KEY not in str(response.headers)
        if response.status_code == 200:
            assert response.text.endswith("data: [DONE]\n\n")  # every allowed stream complete
        else:
            assert int(response.headers["retry-after"]) >= 1
    assert len(upstream.requests) == n
