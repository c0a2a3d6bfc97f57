"""ChatProxy behind a real uvicorn on loopback, in front of FakeChatUpstream (also uvicorn)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Literal, cast

import anyio
import anyio.to_thread
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from tokenhub_stream.asgi import ChatProxy
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script

from .conftest import KEY, assert_no_key, serve, text_of

pytestmark = pytest.mark.anyio

Upstream = tuple[FakeChatUpstream, RunningUpstream]
MESSAGES = [{"role": "user", "content": "hi"}]


def _raw_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    return cast("AsyncGenerator[bytes, None]", response.aiter_raw())


Mounting = Literal["routes", "middleware", "bare"]


async def other_page(request: Request) -> PlainTextResponse:
    return PlainTextResponse("the app's own page")


def starlette_app(proxy: ChatProxy, path: str, mount: Mounting = "routes") -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.aclose()  # the pool belongs to the server's event loop

    other = Route("/other", other_page)
    if mount == "middleware":
        return Starlette(routes=[other], middleware=[proxy.middleware(path)], lifespan=lifespan)
    routes = [Mount(path, app=proxy)] if mount == "bare" else proxy.routes(path)
    return Starlette(routes=[other, *routes], lifespan=lifespan)


@pytest.fixture(params=["routes", "middleware"])
def mount(request: pytest.FixtureRequest) -> Mounting:
    """The two documented ways into a Starlette app: proxy.routes() and proxy.middleware()."""
    return cast(Mounting, request.param)


@contextlib.contextmanager
def proxied(
    upstream: Upstream, path: str = "/api/chat", mount: Mounting = "routes", **kw: object
) -> Iterator[str]:
    _, running = upstream
    options: dict[str, object] = {"base_url": running.base_url}
    options.update(kw)
    proxy = ChatProxy(api_key=KEY, **options)  # type: ignore[arg-type]
    with serve(starlette_app(proxy, path, mount)) as url:
        yield url


def browser_headers(url: str) -> dict[str, str]:
    # What `fetch("/api/chat", {method: "POST", body: JSON.stringify(...)})` sends.
    return {
        "content-type": "text/plain;charset=UTF-8",
        "origin": url,
        "sec-fetch-site": "same-origin",
        "sec-fetch-mode": "cors",
        "cookie": "session=browser-secret",
        "accept": "*/*",
    }


async def wait_disconnected(upstream: Upstream, index: int, timeout: float) -> bool:
    request = upstream[0].requests[index]
    return await anyio.to_thread.run_sync(request.wait_disconnected, timeout)


async def test_uvicorn_browser_request_streams_incrementally(
    upstream: Upstream, mount: Mounting
) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["one", " two", " three", " four"], delay=0.2))
    with proxied(upstream, mount=mount) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(5):
                body = json.dumps({"messages": MESSAGES}).encode()
                async with client.stream(
                    "POST", f"{url}/api/chat", content=body, headers=browser_headers(url)
                ) as response:
                    assert response.status_code == 200  # not a 307 to /api/chat/
                    assert response.headers["content-type"] == "text/event-stream"
                    assert response.headers["x-accel-buffering"] == "no"
                    arrivals: list[tuple[float, str]] = []
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            delta = json.loads(line[6:])["choices"]
                            if delta and delta[0]["delta"].get("content"):
                                arrivals.append((time.monotonic(), delta[0]["delta"]["content"]))
                        assert_no_key(line)
    assert "".join(text for _, text in arrivals) == "one two three four"
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # Each event arrived on its own (the upstream paces them 200 ms apart), not in a burst;
    # the bounds are loose because other processes share the CPU. One gap may be short:
    # when a busy machine delays one event, it arrives just before the next one (a relay
    # that holds events back makes every other gap short, or all of them).
    assert sum(gap <= 0.04 for gap in gaps) <= 1, gaps
    assert arrivals[-1][0] - arrivals[0][0] > 0.4, gaps
    received = app.requests[0]
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.headers["accept-encoding"] == "identity"
    assert "cookie" not in received.headers and "origin" not in received.headers
    assert received.json is not None and received.json["stream"] is True


async def test_uvicorn_cross_site_post_is_refused(upstream: Upstream) -> None:
    with proxied(upstream) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            headers = {**browser_headers(url), "origin": "https://evil.example"}
            headers["sec-fetch-site"] = "cross-site"
            response = await client.post(
                f"{url}/api/chat", json={"messages": MESSAGES}, headers=headers
            )
    assert response.status_code == 403
    assert "access-control-allow-origin" not in response.headers
    assert upstream[0].requests == []


async def test_uvicorn_disconnect_closes_upstream_20_trials(
    upstream: Upstream, mount: Mounting
) -> None:
    app, _ = upstream
    trials = 20
    app.enqueue(*[Script(text="word " * 400, delay=0.01) for _ in range(trials)])
    with proxied(upstream, mount=mount) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            for i in range(trials):
                with anyio.fail_after(5):
                    async with client.stream(
                        "POST", f"{url}/api/chat", json={"messages": MESSAGES}
                    ) as response:
                        async with contextlib.aclosing(_raw_chunks(response)) as chunks:
                            async for chunk in chunks:
                                if b"word" in chunk:
                                    break
                    closed_at = time.monotonic()
                    assert await wait_disconnected(upstream, i, 1.0), f"trial {i}"
                    seen = app.requests[i].disconnected_at
                    assert seen is not None and seen - closed_at < 1.0
                    assert not app.requests[i].completed


async def test_uvicorn_disconnect_before_first_token(upstream: Upstream, mount: Mounting) -> None:
    app, _ = upstream
    app.enqueue(Script(text="late", first_delay=30))
    with proxied(upstream, mount=mount, keepalive_interval=None) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(5):
                async with client.stream(
                    "POST", f"{url}/api/chat", json={"messages": MESSAGES}
                ) as response:
                    assert response.status_code == 200  # headers only: no token yet
                assert await wait_disconnected(upstream, 0, 1.0)


async def test_uvicorn_keepalive_before_slow_first_token(
    upstream: Upstream, mount: Mounting
) -> None:
    app, _ = upstream
    app.enqueue(Script(text="hi", first_delay=0.6))
    with proxied(upstream, mount=mount, keepalive_interval=0.1) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
    body = response.content
    first_data = body.index(b"data:")
    assert body[:first_data].count(b": keep-alive\n\n") >= 3
    assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("end", ["cut", "stall"])
async def test_uvicorn_failure_mid_stream_error_frame(upstream: Upstream, end: str) -> None:
    app, _ = upstream
    app.enqueue(Script(text="partial answer", end=end))  # type: ignore[arg-type]
    timeout = httpx.Timeout(5.0, read=0.5)
    with proxied(upstream, timeout=timeout, keepalive_interval=None) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
    assert response.status_code == 200
    events = [e for e in response.content.split(b"\n\n") if e]
    assert b"[DONE]" not in response.content
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == ("upstream_error" if end == "cut" else "upstream_timeout")
    assert_no_key(response.content)


@pytest.mark.parametrize(
    ("script", "status"),
    [
        (Script(status=429, headers={"Retry-After": "3"}), 429),
        (
            Script(
                status=400,
                error={"error": {"message": "bad tools", "type": "invalid_request_error"}},
            ),
            400,
        ),
        (Script(status=500), 502),
        (Script(status=200, content_type="application/json"), 502),
    ],
)
async def test_uvicorn_upstream_status(upstream: Upstream, script: Script, status: int) -> None:
    upstream[0].enqueue(script)
    with proxied(upstream) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
    assert response.status_code == status
    assert "error" in response.json()
    if status == 429:
        assert response.headers["retry-after"] == "3"
    if status == 400:
        assert response.json()["error"]["message"] == "bad tools"
    assert_no_key(response.content, response.headers)


async def test_uvicorn_wrong_server_key_is_502(upstream: Upstream) -> None:
    _, running = upstream
    proxy = ChatProxy(api_key="sk-wrong", base_url=running.base_url)
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
    assert response.status_code == 502
    assert b"sk-wrong" not in response.content


async def test_uvicorn_connection_refused_is_502() -> None:
    with serve(Starlette()) as dead:
        pass  # the port is now closed
    proxy = ChatProxy(api_key=KEY, base_url=f"{dead}/v1")
    with serve(starlette_app(proxy, "/api/chat")) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
    assert response.status_code == 502
    assert_no_key(response.content)


# The SDK's async streams are written for asyncio (under trio they leak async generators).
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_uvicorn_openai_sdk_streams_through_proxy(
    upstream: Upstream, mount: Mounting
) -> None:
    app, _ = upstream
    app.enqueue(Script(text="Hello from upstream"), Script(text="cut short", end="cut"))
    with proxied(upstream, path="/v1/chat/completions", mount=mount) as url:
        client = openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="browser-has-no-key", max_retries=0
        )
        try:
            with anyio.fail_after(10):
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
                assert "".join(parts) == "Hello from upstream"
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                with pytest.raises(openai.APIError):
                    async for _ in stream:
                        pass
        finally:
            await client.close()
    assert app.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_uvicorn_models_route(upstream: Upstream, mount: Mounting) -> None:
    with proxied(upstream, mount=mount, allowed_models=["gpt-4o-mini"]) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{url}/api/chat/models")
    assert response.json()["data"][0]["id"] == "gpt-4o-mini"


async def test_uvicorn_bare_mount_redirects_exact_path(upstream: Upstream) -> None:
    # Why routes() exists: a bare Mount answers the exact path with a 307.
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url)
    app = starlette_app(proxy, "/api/chat", "bare")
    with serve(app) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{url}/api/chat", json={"messages": MESSAGES})
            assert response.status_code == 307
            slash = await client.post(f"{url}/api/chat/", json={"messages": MESSAGES})
            assert slash.status_code == 200


async def test_uvicorn_fastapi_mount(upstream: Upstream, mount: Mounting) -> None:
    import fastapi

    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url)
    if mount == "routes":
        api = fastapi.FastAPI(routes=proxy.routes("/api/chat"), lifespan=proxy.lifespan)
    else:
        api = fastapi.FastAPI(middleware=[proxy.middleware("/api/chat")], lifespan=proxy.lifespan)

    @api.get("/other")
    async def other() -> dict[str, str]:
        return {"page": "fastapi's own"}

    upstream[0].enqueue(Script(text="via fastapi"))
    with serve(api) as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            body = json.dumps({"messages": MESSAGES}).encode()
            response = await client.post(
                f"{url}/api/chat", content=body, headers=browser_headers(url)
            )
            models = await client.get(f"{url}/api/chat/models")
            page = await client.get(f"{url}/other")
    assert response.status_code == 200
    assert text_of(response.content) == "via fastapi"
    assert response.content.endswith(b"data: [DONE]\n\n")
    assert models.status_code == 200
    assert page.json() == {"page": "fastapi's own"}


async def test_uvicorn_middleware_passes_the_rest_to_the_app(upstream: Upstream) -> None:
    upstream[0].enqueue(Script(text="slash"))
    with proxied(upstream, mount="middleware") as url, anyio.fail_after(5):
        async with httpx.AsyncClient(timeout=5) as client:
            page = await client.get(f"{url}/other")
            slash = await client.post(f"{url}/api/chat/", json={"messages": MESSAGES})
            below = await client.get(f"{url}/api/chat/nothing-here")
            beside = await client.post(f"{url}/api/chatty", json={"messages": MESSAGES})
            wrong = await client.get(f"{url}/api/chat")
    assert page.text == "the app's own page"
    assert slash.status_code == 200 and text_of(slash.content) == "slash"
    # Below the path the proxy answers (its own JSON 404); beside it, the app does.
    assert below.status_code == 404 and below.json()["error"]["code"] == "not_found"
    assert beside.status_code == 404 and beside.text == "Not Found"
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert len(upstream[0].requests) == 1


async def test_middleware_honours_root_path(upstream: Upstream) -> None:
    # Behind a path-stripping proxy (uvicorn --root-path), as Starlette's own routing does.
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url, allowed_models=["m1"])
    app = Starlette(middleware=[proxy.middleware("/api/chat")])
    transport = httpx.ASGITransport(app, root_path="/prefix")
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        models = await client.get("/prefix/api/chat/models")
        beside = await client.get("/prefix/api/chatty/models")
    assert models.json()["data"][0]["id"] == "m1"
    assert beside.status_code == 404 and beside.text == "Not Found"


async def test_middleware_at_the_root_takes_every_path(upstream: Upstream) -> None:
    # As Mount("/", app=proxy) does: the proxy is the app, its /models included.
    proxy = ChatProxy(api_key=KEY, base_url=upstream[1].base_url, allowed_models=["m1"])
    app = Starlette(routes=[Route("/other", other_page)], middleware=[proxy.middleware("/")])
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        models = await client.get("/models")
        other = await client.get("/other")
        wrong = await client.get("/")
    assert models.json()["data"][0]["id"] == "m1"
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert wrong.status_code == 405
