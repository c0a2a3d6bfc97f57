"""#19, types: what a type checker sees of a structured output. `response_format=Model`
makes a `ChatStream[Model]` whose `parsed` is a `Model`; `list[Model]` makes
`elements()` yield `Model`; a JSON schema or no `response_format` gives `object`; a
partial value is `object` whatever was asked for.

The `assert_type`s below are checked by mypy (`test_issue_19_types_checked_by_mypy`
runs it on this file, and the project's `mypy` covers it too); the tests run the same code
on the local upstream, so the runtime values are shown to be what mypy was told.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import assert_type

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

import tokenhub_stream as ts
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, run_upstream

MESSAGES = [{"role": "user", "content": "Mercury, Venus and Mars"}]
SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {"title": {"type": "string"}},
    "required": ["title"],
    "additionalProperties": False,
}


class Card(BaseModel):
    title: str
    moons: int


@dataclass
class Planet:
    name: str


class Moon(TypedDict):
    name: str


@pytest.fixture(scope="module")
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0)) as running:
        yield running


def show(stream: ts.ChatStream) -> str:
    # Code written against the bare class (before it was generic) takes any stream.
    return repr(stream)


def test_issue_19_types_model_sync(upstream: RunningUpstream) -> None:
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=Card) as stream:
            assert_type(stream, ts.ChatStream[Card])
            for partial in stream.partials():
                assert_type(partial, object)  # a dict that grows: not a Card
                assert isinstance(partial, dict)
        card = assert_type(stream.parsed, Card)
        assert isinstance(card, Card)
        assert show(stream)

        result = client.chat(MESSAGES, response_format=Card)
        assert isinstance(assert_type(result, ts.ChatResult[Card]).parsed, Card)
        assert_type(result.parsed.moons, int)


def test_issue_19_types_list_sync(upstream: RunningUpstream) -> None:
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            assert_type(stream, ts.ChatStream[list[Card]])
            elements = stream.elements()
            assert_type(elements, Iterator[Card])
            titles = [assert_type(card, Card).title for card in elements]
        parsed = assert_type(stream.parsed, list[Card])
        assert titles == [card.title for card in parsed]
        assert titles and all(isinstance(card, Card) for card in parsed)


def test_issue_19_types_other_types_sync(upstream: RunningUpstream) -> None:
    with ts.Client(base_url=upstream.base_url) as client:
        planet = client.chat(MESSAGES, response_format=Planet).parsed
        assert isinstance(assert_type(planet, Planet), Planet)
        moon = client.chat(MESSAGES, response_format=Moon).parsed
        assert isinstance(assert_type(moon["name"], str), str)
        number = client.chat(MESSAGES, response_format=int).parsed
        assert isinstance(assert_type(number, int), int)
        with client.stream_chat(MESSAGES, response_format=list[Planet]) as stream:
            names = [assert_type(planet, Planet).name for planet in stream.elements()]
        assert names and all(isinstance(name, str) for name in names)


def test_issue_19_types_schema_and_none_sync(upstream: RunningUpstream) -> None:
    with ts.Client(base_url=upstream.base_url) as client:
        with client.stream_chat(MESSAGES, response_format=SCHEMA) as stream:
            assert_type(stream, ts.ChatStream[object])
            assert "".join(stream)
        decoded = assert_type(stream.parsed, object)  # the decoded JSON: narrow it
        assert isinstance(decoded, dict) and isinstance(decoded["title"], str)
        listed = {"type": "array", "items": SCHEMA}
        with client.stream_chat(MESSAGES, response_format=listed) as items:
            elements = [assert_type(item, object) for item in items.elements()]
        assert elements and all(isinstance(item, dict) for item in elements)

        result = client.chat(MESSAGES)
        assert_type(result, ts.ChatResult[object])
        assert result.parsed is None
        with client.stream_chat(MESSAGES) as plain:
            assert_type(plain, ts.ChatStream[object])
            assert "".join(plain)


def test_issue_19_types_module_functions(upstream: RunningUpstream) -> None:
    url = upstream.base_url
    with ts.stream_chat_sync(MESSAGES, base_url=url, response_format=Card) as stream:
        assert "".join(stream)
    assert isinstance(assert_type(stream.parsed, Card), Card)
    with ts.stream_chat_sync(MESSAGES, base_url=url, response_format=SCHEMA) as loose:
        assert_type(loose, ts.ChatStream[object])
    with ts.stream_chat_sync(MESSAGES, base_url=url) as plain:
        assert_type(plain, ts.ChatStream[object])


@pytest.mark.anyio
async def test_issue_19_types_async(upstream: RunningUpstream) -> None:
    url = upstream.base_url
    async with ts.AsyncClient(base_url=url) as client:
        async with client.stream_chat(MESSAGES, response_format=list[Card]) as stream:
            assert_type(stream, ts.AsyncChatStream[list[Card]])
            elements = stream.elements()
            assert_type(elements, AsyncIterator[Card])
            cards = [assert_type(card, Card) async for card in elements]
        assert cards == assert_type(stream.parsed, list[Card])
        async with client.stream_chat(MESSAGES, response_format=Card) as single:
            async for partial in single.partials():
                assert_type(partial, object)
        assert isinstance(assert_type(single.parsed, Card), Card)

        result = await client.chat(MESSAGES, response_format=Card)
        assert isinstance(assert_type(result, ts.ChatResult[Card]).parsed, Card)
        async with client.stream_chat(MESSAGES, response_format=SCHEMA) as loose:
            assert_type(loose, ts.AsyncChatStream[object])
        async with client.stream_chat(MESSAGES) as plain:
            assert_type(plain, ts.AsyncChatStream[object])

    async with ts.stream_chat(MESSAGES, base_url=url, response_format=Card) as module:
        async for _ in module:
            pass
    assert isinstance(assert_type(module.parsed, Card), Card)
    async with ts.stream_chat(MESSAGES, base_url=url) as bare:
        assert_type(bare, ts.AsyncChatStream[object])


@pytest.mark.timeout(180)  # a cold mypy cache: the whole package and pydantic
def test_issue_19_types_checked_by_mypy(monkeypatch: pytest.MonkeyPatch) -> None:
    # mypy --strict with the project's settings, on this file against this tree's source
    # (not an installed copy): every assert_type above holds, nothing is Any.
    api = pytest.importorskip("mypy.api")
    root = Path(__file__).resolve().parent.parent
    monkeypatch.setenv("MYPYPATH", str(root / "src"))
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(root / "pyproject.toml"),
            "--cache-dir",
            str(root / ".mypy_cache"),
            "--no-error-summary",
            str(Path(__file__)),
        ]
    )
    assert status == 0, stdout + stderr
    assert stdout == stderr == ""
