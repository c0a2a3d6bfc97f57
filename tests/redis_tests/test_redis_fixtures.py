"""The fixtures themselves: a private Redis that is empty for every test, a proxy process."""

from __future__ import annotations

import json

import httpx
import pytest
import redis

from tokenhub_stream.testing import FakeChatUpstream, Script, run_upstream

from .conftest import RedisServer, proxy_process, run_redis

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("attempt", [1, 2])
def test_redis_url_is_private_and_empty_for_each_test(redis_url: str, attempt: int) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping() is True
        assert client.dbsize() == 0  # the previous round's key was flushed
        client.set("tokenhub-test:left-behind", str(attempt))
        info = client.info("persistence")
        assert info["aof_enabled"] == 0
        assert client.config_get("save") == {"save": ""}


def test_run_redis_stops_its_server() -> None:
    with run_redis() as server:
        assert isinstance(server, RedisServer)
        assert server.ping()
    assert server.process.poll() is not None
    assert not server.ping(timeout=0.2)


def test_proxy_process_serves_a_proxy_in_another_process() -> None:
    upstream = FakeChatUpstream(api_key="sk-fixture-key", delay=0.0)
    upstream.enqueue(Script(deltas=["Hel", "lo"]))
    with run_upstream(upstream) as running:
        env = {"UPSTREAM_URL": running.base_url, "UPSTREAM_KEY": "sk-fixture-key"}
        with proxy_process("redis_tests.apps:plain_proxy", env) as base_url:
            body = {"messages": [{"role": "user", "content": "hi"}]}
            with httpx.Client(timeout=10) as client:
                response = client.post(base_url + "/api/chat", json=body)
    assert response.status_code == 200
    frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    text = "".join(
        json.loads(f)["choices"][0]["delta"].get("content") or ""
        for f in frames[:-1]
        if json.loads(f)["choices"]
    )
    assert text == "Hello"
    assert "sk-fixture-key" not in response.text
