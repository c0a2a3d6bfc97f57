"""Smoke tests: the examples run against FakeChatUpstream behind a real uvicorn."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
from types import ModuleType

import anyio
import httpx
import pytest

from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script

from .conftest import KEY, assert_no_key, serve

pytestmark = pytest.mark.anyio

EXAMPLES = pathlib.Path(__file__).parents[2] / "examples"
BODY = {"messages": [{"role": "user", "content": "hi"}]}


def load(name: str, monkeypatch: pytest.MonkeyPatch, base_url: str) -> ModuleType:
    monkeypatch.setenv("TOKENHUB_KEY", KEY)
    monkeypatch.setenv("TOKENHUB_BASE_URL", base_url)
    monkeypatch.setenv("APP_TOKENS", "t-1,t-2")
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


async def test_example_starlette_app(
    upstream: tuple[FakeChatUpstream, RunningUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, running = upstream
    fake.enqueue(Script(text="from the page"), Script(text="from curl"))
    module = load("starlette_app", monkeypatch, running.base_url)
    with serve(module.app) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            assert (await client.post("/api/chat", json=BODY)).status_code == 401
            page = await client.get("/")
            assert "fetch(" in page.text and "obj.error" in page.text
            # The browser: session cookie, text/plain, same-origin.
            response = await client.post(
                "/api/chat",
                content=json.dumps(BODY).encode(),
                headers={"content-type": "text/plain;charset=UTF-8", "origin": url},
            )
            assert response.status_code == 200
            assert b"from" in response.content and response.content.endswith(b"[DONE]\n\n")
            client.cookies.clear()
            by_token = await client.post(
                "/api/chat", json=BODY, headers={"authorization": "Bearer t-2"}
            )
            assert by_token.status_code == 200
    assert_no_key(response.content, by_token.content, page.text)


async def test_example_fastapi_app(
    upstream: tuple[FakeChatUpstream, RunningUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("fastapi")
    fake, running = upstream
    module = load("fastapi_app", monkeypatch, running.base_url)
    with serve(module.app) as url, anyio.fail_after(10):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            assert (await client.post("/api/chat", json=BODY)).status_code == 401
            bad = await client.post("/api/chat", json=BODY, headers={"authorization": "Bearer x"})
            assert bad.status_code == 403
            auth = {"authorization": "Bearer t-1"}
            ok = await client.post("/v1/chat/completions", json=BODY, headers=auth)
            assert ok.status_code == 200 and ok.content.endswith(b"[DONE]\n\n")
            assert (await client.get("/healthz")).json() == {"status": "ok"}
    sent = fake.requests[-1].json
    assert sent is not None
    assert sent["messages"] == [{"role": "system", "content": "Be concise."}, *BODY["messages"]]
