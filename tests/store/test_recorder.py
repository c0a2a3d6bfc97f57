"""ConversationRecorder: the hooks alone, then ChatProxy under a real uvicorn on loopback."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request

from tokenhub_stream import ChatMessage, ToolCall, Usage
from tokenhub_stream.asgi import ChatProxy, CompletionRecord
from tokenhub_stream.store import (
    Conversation,
    ConversationRecorder,
    ConversationStore,
    Message,
    Turn,
)
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

from .conftest import serve

pytestmark = pytest.mark.anyio

KEY = "sk-canary-store-7d1e0b9c2a"
LOGGER = "tokenhub_stream.store"


def completion(**overrides: object) -> CompletionRecord:
    record = CompletionRecord(
        request_id="req-1",
        principal="alice",
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Hi"}],
        message=ChatMessage(content="Hello!", finish_reason="stop"),
        finish_reason="stop",
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        outcome="completed",
        status=200,
        error=None,
        started_at=1_700_000_000.0,
        ttfb=0.01,
        duration=0.2,
        bytes_sent=123,
    )
    return replace(record, **overrides)  # type: ignore[arg-type]


def request(headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw})


class FailingStore(ConversationStore):
    def __init__(self, error: BaseException | None = None, *, hang: bool = False) -> None:
        super().__init__("sqlite+aiosqlite://")
        self.error = error
        self.hang = hang

    async def record_turn(self, turn: Turn) -> str:
        if self.hang:
            await anyio.sleep_forever()
        assert self.error is not None
        raise self.error


# --- the Turn a record becomes ----------------------------------------------------------------


def test_recorder_turn_takes_new_request_messages_and_the_answer() -> None:
    recorder = ConversationRecorder(ConversationStore("sqlite+aiosqlite://"))
    record = completion(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "old question"},
            {"role": "assistant", "content": "old answer"},
            {"role": "tool", "content": "21C", "tool_call_id": "call_9"},
            "not a message",
            {
                "role": "user",
                "content": [{"type": "text", "text": "Look: "}, {"type": "image_url"}],
            },
        ]
    )
    turn = recorder.turn(record, "chat-1")
    assert turn.principal == "alice" and turn.conversation_id == "chat-1"
    assert [(m.role, m.content, m.tool_call_id) for m in turn.messages] == [
        ("tool", "21C", "call_9"),
        ("user", "Look: ", None),
        ("assistant", "Hello!", None),
    ]
    answer = turn.messages[-1]
    assert answer.outcome == "completed" and answer.finish_reason == "stop"
    assert answer.usage == record.usage and answer.model == "gpt-4o-mini"
    assert (answer.ttfb, answer.duration, answer.request_id) == (0.01, 0.2, "req-1")
    assert turn.title == "Look:"


def test_recorder_turn_first_turn_keeps_the_system_prompt() -> None:
    recorder = ConversationRecorder(ConversationStore("sqlite+aiosqlite://"))
    messages: list[object] = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q"},
    ]
    turn = recorder.turn(completion(messages=messages))
    assert [m.role for m in turn.messages] == ["system", "user", "assistant"]
    assert turn.conversation_id is None and turn.title == "q"


@pytest.mark.parametrize(
    ("outcome", "stored"),
    [
        ("completed", "completed"),
        ("client_disconnect", "client-disconnected"),
        ("upstream_error", "error"),
        ("timeout", "error"),
    ],
)
def test_recorder_turn_maps_outcomes(outcome: str, stored: str) -> None:
    recorder = ConversationRecorder(ConversationStore("sqlite+aiosqlite://"))
    turn = recorder.turn(completion(outcome=outcome, error="boom"))
    assert turn.messages[-1].outcome == stored
    assert turn.messages[-1].error == "boom"


def test_recorder_turn_tool_calls_and_principals() -> None:
    calls = (ToolCall(id="c1", name="f", arguments="{}", extra={"extra_content": {"x": 1}}),)
    message = ChatMessage(content="", tool_calls=calls, finish_reason="tool_calls")
    recorder = ConversationRecorder(
        ConversationStore("sqlite+aiosqlite://"), principal=lambda p: f"user:{p}"
    )
    turn = recorder.turn(completion(message=message, principal=42))
    assert turn.principal == "user:42"
    answer = turn.messages[-1]
    assert answer.content is None
    assert answer.tool_calls == (
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "f", "arguments": "{}"},
            "extra_content": {"x": 1},
        },
    )
    anonymous = ConversationRecorder(ConversationStore("sqlite+aiosqlite://"))
    assert anonymous.turn(completion(principal=None)).principal == ""


def test_recorder_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError):
        ConversationRecorder(ConversationStore("sqlite+aiosqlite://"), timeout=0)


# --- the hooks --------------------------------------------------------------------------------


async def test_recorder_on_request_reads_header_or_body_field(tmp_path: Path) -> None:
    async with ConversationStore(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}") as store:
        recorder = store.recorder()
        assert set(recorder.hooks()) == {"on_request", "on_complete"}

        body: dict[str, object] = {"messages": [], "conversation_id": "from-body"}
        out = await recorder.on_request(request({"X-Conversation-Id": "from-header"}), body)
        assert "conversation_id" not in out  # never forwarded upstream
        await recorder.on_complete(completion())
        assert await store.get_conversation("alice", "from-header") is not None

        await recorder.on_request(request(), {"conversation_id": "from-body"})
        await recorder.on_complete(completion())
        assert await store.get_conversation("alice", "from-body") is not None

        # An invalid id, or none: a new conversation each turn.
        await recorder.on_request(request({"X-Conversation-Id": "../etc"}), {})
        await recorder.on_complete(completion())
        await recorder.on_complete(completion())  # on_request not called: no stale id
        assert len(await store.list_conversations("alice")) == 4
        assert "conversation_id" not in repr(recorder) and "X-Conversation-Id" in repr(recorder)


async def test_recorder_failure_is_logged_with_replay_json(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    recorder = ConversationRecorder(FailingStore(RuntimeError("disk full")))
    await recorder.on_request(request({"X-Conversation-Id": "chat-9"}), {})
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        await recorder.on_complete(completion())  # does not raise
    [logged] = [r for r in caplog.records if r.name == LOGGER]
    assert "request_id=req-1" in logged.getMessage()
    assert "RuntimeError: disk full" in logged.getMessage()
    turn = Turn.from_json(cast(str, logged.__dict__["tokenhub_turn"]))
    assert turn.conversation_id == "chat-9"
    assert logged.getMessage().endswith("replay=" + turn.to_json())
    async with ConversationStore(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}") as store:
        assert await store.record_turn(turn) == "chat-9"
        got = await store.get_conversation("alice", "chat-9")
        assert got is not None and [m.content for m in got.messages] == ["Hi", "Hello!"]


async def test_recorder_slow_store_times_out_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    recorder = ConversationRecorder(FailingStore(hang=True), timeout=0.05)
    with caplog.at_level(logging.ERROR, logger=LOGGER), anyio.fail_after(5):
        await recorder.on_complete(completion())
    assert "TimeoutError" in caplog.text and "replay=" in caplog.text


async def test_recorder_cancelled_write_is_logged_and_reraised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = ConversationRecorder(FailingStore(hang=True))
    with caplog.at_level(logging.ERROR, logger=LOGGER), anyio.fail_after(5):
        with anyio.move_on_after(0.05) as scope:
            await recorder.on_complete(completion())
    assert scope.cancelled_caught
    assert "error=cancelled" in caplog.text and "replay=" in caplog.text


# --- end to end: ChatProxy under uvicorn, FakeChatUpstream behind it ---------------------------


Upstream = tuple[FakeChatUpstream, RunningUpstream]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    app = FakeChatUpstream(api_key=KEY, delay=0.001)
    with run_upstream(app) as running:
        yield app, running


@contextlib.contextmanager
def proxied(upstream: Upstream, store_url: str, **options: object) -> Iterator[str]:
    """ChatProxy + the recorder in one line, served by uvicorn; the store lives in its loop."""
    store = ConversationStore(store_url)
    proxy = ChatProxy(
        api_key=KEY,
        base_url=upstream[1].base_url,
        authorize=lambda request: request.headers.get("x-user"),
        **options,  # type: ignore[arg-type]
        **store.recorder().hooks(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.aclose()
        await store.aclose()

    with serve(Starlette(routes=proxy.routes("/api/chat"), lifespan=lifespan)) as url:
        yield url


def _raw_chunks(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    return cast("AsyncGenerator[bytes, None]", response.aiter_raw())


async def wait_for_answer(
    store_url: str, principal: str, conversation_id: str, count: int
) -> Conversation:
    """Poll (bounded) until the conversation holds `count` messages."""
    async with ConversationStore(store_url) as reader:
        with anyio.fail_after(10):
            while True:
                got = await reader.get_conversation(principal, conversation_id)
                if got is not None and len(got.messages) >= count:
                    return got
                await anyio.sleep(0.02)


async def test_recorder_proxy_writes_completed_turns(upstream: Upstream, store_url: str) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["Bon", "jour", "!"]), Script(deltas=["Hola"]))
    history: list[dict[str, object]] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello in French"},
    ]
    with proxied(upstream, store_url) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                body = {"messages": history, "stream_options": {"include_usage": True}}
                headers = {"x-user": "alice", "x-conversation-id": "chat-fr"}
                response = await client.post(f"{url}/api/chat", json=body, headers=headers)
                assert response.status_code == 200
                assert "data: [DONE]" in response.text
                request_id = response.headers["x-request-id"]
                got = await wait_for_answer(store_url, "alice", "chat-fr", 3)

                history += [{"role": "assistant", "content": "Bonjour!"}]
                history += [{"role": "user", "content": "And in Spanish?"}]
                body = {"messages": history, "conversation_id": "chat-fr"}  # the body field
                response = await client.post(
                    f"{url}/api/chat", json=body, headers={"x-user": "alice"}
                )
                assert response.status_code == 200
                got = await wait_for_answer(store_url, "alice", "chat-fr", 5)

    # The upstream never saw our field.
    assert all(r.json is not None and "conversation_id" not in r.json for r in app.requests)
    assert [(m.role, m.content) for m in got.messages] == [
        ("system", "Be brief."),
        ("user", "Say hello in French"),
        ("assistant", "Bonjour!"),
        ("user", "And in Spanish?"),
        ("assistant", "Hola"),
    ]
    first = got.messages[2]
    assert first.finish_reason == "stop" and first.error is None
    assert first.request_id == request_id and first.model
    assert first.usage is not None and first.usage.completion_tokens
    assert first.ttfb is not None and first.duration is not None and first.duration >= first.ttfb
    assert got.title == "Say hello in French"
    async with ConversationStore(store_url) as reader:
        assert await reader.list_conversations("bob") == []
        assert await reader.get_conversation("bob", "chat-fr") is None


async def test_recorder_proxy_client_disconnect_keeps_partial_text(
    upstream: Upstream, store_url: str
) -> None:
    app, _ = upstream
    words = [f"w{i} " for i in range(100)]
    app.enqueue(Script(deltas=words, delay=0.05))
    with proxied(upstream, store_url) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                body = json.dumps({"messages": [{"role": "user", "content": "count"}]})
                headers = {"x-user": "alice", "x-conversation-id": "chat-cut"}
                async with client.stream(
                    "POST", f"{url}/api/chat", content=body, headers=headers
                ) as response:
                    seen = b""
                    async with contextlib.aclosing(_raw_chunks(response)) as chunks:
                        async for chunk in chunks:
                            seen += chunk
                            if seen.count(b'"content"') >= 3:
                                break
            got = await wait_for_answer(store_url, "alice", "chat-cut", 2)
    answer = got.messages[1]
    assert answer.outcome == "client-disconnected"
    assert answer.content and "".join(words).startswith(answer.content)
    assert len(answer.content) < len("".join(words))
    assert got.messages[0].content == "count"


async def test_recorder_proxy_failing_store_logs_and_stream_completes(
    upstream: Upstream,
    store_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["All ", "of ", "it"]))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    broken = f"sqlite+aiosqlite:///{blocker / 'chats.db'}"  # cannot be created
    caplog.set_level(logging.DEBUG)
    with proxied(upstream, broken) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                body = {"messages": [{"role": "user", "content": "hi"}]}
                headers = {"x-user": "alice", "x-conversation-id": "chat-lost"}
                response = await client.post(f"{url}/api/chat", json=body, headers=headers)
                assert response.status_code == 200
                assert response.text.rstrip().endswith("data: [DONE]")
                while True:  # on_complete runs after the response's last byte
                    records = [r for r in caplog.records if r.name == LOGGER]
                    if records:
                        break
                    await anyio.sleep(0.02)
    [logged] = records
    assert logged.levelno == logging.ERROR
    assert KEY not in caplog.text
    turn = Turn.from_json(cast(str, logged.__dict__["tokenhub_turn"]))
    async with ConversationStore(store_url) as store:  # replay into a working store
        assert await store.record_turn(turn) == "chat-lost"
        got = await store.get_conversation("alice", "chat-lost")
    assert got is not None
    assert [(m.role, m.content) for m in got.messages] == [
        ("user", "hi"),
        ("assistant", "All of it"),
    ]


# uvicorn answers receive() with http.disconnect as soon as the response is complete; a
# streamed turn read to its end must still be recorded as completed, not client_disconnect.
async def test_recorder_proxy_completed_turn_outcome(upstream: Upstream, store_url: str) -> None:
    app, _ = upstream
    app.enqueue(Script(deltas=["Done", "."]))
    with proxied(upstream, store_url) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                body = {"messages": [{"role": "user", "content": "hi"}]}
                headers = {"x-user": "alice", "x-conversation-id": "chat-ok"}
                response = await client.post(f"{url}/api/chat", json=body, headers=headers)
                assert response.text.rstrip().endswith("data: [DONE]")
                got = await wait_for_answer(store_url, "alice", "chat-ok", 2)
    assert got.messages[1].content == "Done."
    assert got.messages[1].outcome == "completed"


async def test_recorder_proxy_upstream_error_is_written(upstream: Upstream, store_url: str) -> None:
    app, _ = upstream
    app.enqueue(Script(status=500))
    with proxied(upstream, store_url) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            with anyio.fail_after(10):
                body = {"messages": [{"role": "user", "content": "hi"}]}
                headers = {"x-user": "alice", "x-conversation-id": "chat-err"}
                response = await client.post(f"{url}/api/chat", json=body, headers=headers)
                assert response.status_code == 502
                got = await wait_for_answer(store_url, "alice", "chat-err", 2)
    answer = got.messages[1]
    assert answer.outcome == "error" and answer.error and answer.content == ""


def test_recorder_messages_are_plain_messages() -> None:
    assert Message("user", "x").to_dict() == {"role": "user", "content": "x"}
