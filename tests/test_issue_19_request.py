"""#19, the request: what `response_format=` sends (respx: no sockets), and what it refuses.

A pydantic model, any type pydantic's `TypeAdapter` takes (a non-object root wrapped as
`{"items": [...]}` or `{"value": ...}`), or a JSON schema, sent as a strict-ready
`json_schema`; an OpenAI response_format object sent as given; `strict_schemas=False`
leaving the field out; a schema strict mode cannot express refused before any request;
pydantic needed only for types, and never imported by the plain client.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
import respx
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

import tokenhub_stream as ts

URL = "http://upstream.test/v1"
MESSAGES = [{"role": "user", "content": "cards"}]


class Card(BaseModel):
    """A card.

    Attributes:
        title: the card's title.
    """

    title: str
    rank: int = 3
    note: str | None = None


@dataclasses.dataclass
class Point:
    x: float
    y: float = 0.0


class Pair(TypedDict):
    left: str
    right: int


CARD_SCHEMA: dict[str, object] = {
    "type": "object",
    "description": "A card.",
    "properties": {
        "title": {"type": "string", "description": "the card's title."},
        "rank": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["title", "rank", "note"],
    "additionalProperties": False,
}


def sse(text: str, finish: str = "stop") -> bytes:
    frames = [{"choices": [{"index": 0, "delta": {"content": text}}]}]
    frames.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    return b"".join(b"data: " + json.dumps(f).encode() + b"\n\n" for f in frames) + (
        b"data: [DONE]\n\n"
    )


def completion(text: str) -> dict[str, object]:
    message = {"role": "assistant", "content": text}
    return {
        "id": "c1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


@pytest.fixture
def mock(monkeypatch: pytest.MonkeyPatch) -> Iterator[respx.MockRouter]:
    # respx mocks httpx, so these clients send through httpx, not through our engine
    # (the engine's request bytes are the same: test_issue_17_engine.py).
    monkeypatch.setenv("TOKENHUB_STREAM_ENGINE", "httpx")
    with respx.mock(assert_all_called=False) as router:
        yield router


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENHUB_KEY", raising=False)
    monkeypatch.delenv("TOKENHUB_BASE_URL", raising=False)


def sent(route: respx.Route) -> dict[str, Any]:
    body = json.loads(route.calls.last.request.content)
    assert isinstance(body, dict)
    return body


def stream_once(sync: bool, answer: str, **call: Any) -> object:
    """Stream one answer with `response_format` through Client or AsyncClient; `parsed`."""
    strict = call.pop("strict_schemas", True)
    if sync:
        with ts.Client(base_url=URL, strict_schemas=strict) as client:
            with client.stream_chat(MESSAGES, **call) as stream:
                assert "".join(stream) == answer  # the text deltas, as ever
                return stream.parsed

    async def main() -> object:
        async with ts.AsyncClient(base_url=URL, strict_schemas=strict) as client:
            async with client.stream_chat(MESSAGES, **call) as stream:
                assert "".join([t async for t in stream]) == answer
                return stream.parsed

    return anyio.run(main)


both = pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])


@both
def test_issue_19_request_model_is_a_strict_json_schema(mock: respx.MockRouter, sync: bool) -> None:
    answer = '{"title": "Ada", "rank": null, "note": null}'
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, content=sse(answer))
    )
    parsed = stream_once(sync, answer, response_format=Card)
    assert sent(route)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Card", "schema": CARD_SCHEMA, "strict": True},
    }
    # A null for a field with a default becomes the default.
    assert parsed == Card(title="Ada", rank=3, note=None)


@both
def test_issue_19_request_list_is_wrapped_and_unwrapped(mock: respx.MockRouter, sync: bool) -> None:
    answer = '{"items": [{"title": "A", "rank": 1, "note": null}]}'
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, content=sse(answer))
    )
    parsed = stream_once(sync, answer, response_format=list[Card])
    assert sent(route)["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "list_Card",
            "schema": {
                "type": "object",
                "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Card"}}},
                "required": ["items"],
                "additionalProperties": False,
                "$defs": {"Card": CARD_SCHEMA},
            },
            "strict": True,
        },
    }
    assert parsed == [Card(title="A", rank=1)]


@pytest.mark.parametrize(
    ("response_format", "answer", "schema", "parsed"),
    [
        (
            Point,
            '{"x": 1, "y": null}',
            {
                "type": "object",
                "properties": {
                    "x": {"type": "number"},
                    "y": {"anyOf": [{"type": "number"}, {"type": "null"}]},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            Point(1.0, 0.0),
        ),
        (
            Pair,
            '{"left": "a", "right": 2}',
            {
                "type": "object",
                "properties": {"left": {"type": "string"}, "right": {"type": "integer"}},
                "required": ["left", "right"],
                "additionalProperties": False,
            },
            {"left": "a", "right": 2},
        ),
        (
            int,
            '{"value": 7}',
            {
                "type": "object",
                "properties": {"value": {"type": "integer"}},
                "required": ["value"],
                "additionalProperties": False,
            },
            7,
        ),
    ],
    ids=["dataclass", "typeddict", "int"],
)
def test_issue_19_request_any_type_adapter_type(
    mock: respx.MockRouter, response_format: object, answer: str, schema: object, parsed: object
) -> None:
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, content=sse(answer))
    )
    assert stream_once(True, answer, response_format=response_format) == parsed
    assert sent(route)["response_format"]["json_schema"]["schema"] == schema


def test_issue_19_request_json_schema_dict_is_made_strict_and_not_changed(
    mock: respx.MockRouter,
) -> None:
    schema: dict[str, object] = {
        "title": "Answer",
        "type": "object",
        "properties": {
            "city": {"type": "string", "title": "City"},
            "days": {"type": "integer", "default": 3},
        },
        "required": ["city"],
    }
    before = json.dumps(schema)
    answer = '{"city": "Oslo", "days": null}'
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, content=sse(answer))
    )
    # A JSON schema's answer is the decoded JSON; a null for an optional property takes
    # the schema's default.
    assert stream_once(True, answer, response_format=schema) == {"city": "Oslo", "days": 3}
    assert json.dumps(schema) == before  # the caller's schema is not modified
    assert sent(route)["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "Answer",
            "schema": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {"name": "open", "schema": {"type": "object"}},  # not strict-ready
        },
    ],
    ids=["json_object", "json_schema"],
)
def test_issue_19_request_openai_format_is_sent_as_given(
    mock: respx.MockRouter, raw: dict[str, object]
) -> None:
    answer = '{"anything": [1, 2]}'
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, content=sse(answer))
    )
    assert stream_once(True, answer, response_format=raw) == {"anything": [1, 2]}
    assert sent(route)["response_format"] == raw


def test_issue_19_request_text_format_has_no_structured_output(mock: respx.MockRouter) -> None:
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, content=sse("plain"))
    )
    with ts.Client(base_url=URL) as client:
        with client.stream_chat(MESSAGES, response_format={"type": "text"}) as stream:
            with pytest.raises(TypeError, match="partials\\(\\) needs a stream started with"):
                stream.partials()
            assert list(stream) == ["plain"]
    assert sent(route)["response_format"] == {"type": "text"}


@both
def test_issue_19_request_strict_off_leaves_the_field_out(
    mock: respx.MockRouter, sync: bool
) -> None:
    answer = '{"title": "A", "rank": 1, "note": "n"}'
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, content=sse(answer))
    )
    stream_once(sync, answer, response_format=Card, strict_schemas=False)
    assert sent(route)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Card", "schema": CARD_SCHEMA},
    }


def test_issue_19_request_module_helpers(mock: respx.MockRouter) -> None:
    answer = '{"title": "A", "rank": 1, "note": null}'
    route = mock.post(URL + "/chat/completions").mock(
        side_effect=lambda request: httpx.Response(200, content=sse(answer))
    )
    with ts.stream_chat_sync(
        MESSAGES, base_url=URL, response_format=Card, strict_schemas=False
    ) as stream:
        list(stream)
        assert stream.parsed == Card(title="A", rank=1)
    assert "strict" not in sent(route)["response_format"]["json_schema"]

    async def main() -> object:
        async with ts.stream_chat(MESSAGES, base_url=URL, response_format=Card) as stream:
            async for _ in stream.partials():
                pass
            return stream.parsed

    assert anyio.run(main) == Card(title="A", rank=1)
    assert sent(route)["response_format"]["json_schema"]["strict"] is True


@both
def test_issue_19_request_chat_parses(mock: respx.MockRouter, sync: bool) -> None:
    answer = '{"items": [{"title": "A", "rank": null, "note": null}]}'
    route = mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, json=completion(answer))
    )
    if sync:
        with ts.Client(base_url=URL) as client:
            result = client.chat(MESSAGES, response_format=list[Card])
    else:

        async def main() -> ts.ChatResult[list[Card]]:
            async with ts.AsyncClient(base_url=URL) as client:
                return await client.chat(MESSAGES, response_format=list[Card])

        result = anyio.run(main)
    assert result.parsed == [Card(title="A")]
    assert result.message.content == answer
    body = sent(route)
    assert body["stream"] is False
    assert body["response_format"]["json_schema"]["name"] == "list_Card"


def test_issue_19_request_chat_bad_output_raises(mock: respx.MockRouter) -> None:
    mock.post(URL + "/chat/completions").mock(
        return_value=httpx.Response(200, json=completion('{"title": 5}'))
    )
    with ts.Client(base_url=URL) as client, pytest.raises(ts.OutputValidationError) as info:
        client.chat(MESSAGES, response_format=Card)
    assert info.value.text == '{"title": 5}'
    assert [e["loc"] for e in info.value.errors] == [("title",)]


class Tagged(BaseModel):
    tags: set[str]


class Short(BaseModel):
    name: str = Field(max_length=20)


class Open(BaseModel):
    scores: dict[str, int]


@pytest.mark.parametrize(
    ("response_format", "match"),
    [
        (Tagged, "'uniqueItems' at \\$.tags"),
        (Short, "'maxLength' at \\$.name"),
        (Open, "an object without properties at \\$.scores"),
        (tuple[int, str], "'prefixItems'"),
        (Any, "a schema without a type"),
        ({"type": "object", "properties": {"a": {"type": "string", "minLength": 1}}}, "minLength"),
        ({"type": "object"}, "an object without properties"),
    ],
    ids=["set", "max_length", "dict", "tuple", "Any", "schema-minLength", "schema-open"],
)
def test_issue_19_request_inexpressible_schema_is_refused_before_sending(
    mock: respx.MockRouter, response_format: object, match: str
) -> None:
    route = mock.post(URL + "/chat/completions").mock(return_value=httpx.Response(500))
    with ts.Client(base_url=URL) as client:
        with pytest.raises(TypeError, match=match) as info:
            client.stream_chat(MESSAGES, response_format=response_format)
        with pytest.raises(TypeError, match=match):
            client.chat(MESSAGES, response_format=response_format)
    assert "cannot be expressed in a strict schema" in str(info.value)
    assert "docs/structured.md#strict" in str(info.value)
    assert not route.called


def test_issue_19_request_type_pydantic_cannot_validate_is_a_type_error() -> None:
    class Opaque:
        pass

    with ts.Client(base_url=URL) as client, pytest.raises(TypeError, match="pydantic cannot"):
        client.stream_chat(MESSAGES, response_format=Opaque)


def test_issue_19_request_without_pydantic_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenhub_stream import _pydantic, _structured

    _structured._cached_type_spec.cache_clear()
    _pydantic._cached.cache_clear()
    monkeypatch.setitem(sys.modules, "pydantic", None)  # `import pydantic` now fails
    try:
        with ts.Client(base_url=URL) as client:
            with pytest.raises(ImportError, match=r"pip install 'tokenhub_stream\[structured\]'"):
                client.stream_chat(MESSAGES, response_format=Card)
            # A JSON schema needs no pydantic.
            client.stream_chat(MESSAGES, response_format={"type": "json_object"})
    finally:
        _structured._cached_type_spec.cache_clear()
        _pydantic._cached.cache_clear()


def test_issue_19_request_plain_client_does_not_import_pydantic() -> None:
    code = (
        "import sys, tokenhub_stream, tokenhub_stream.tools, tokenhub_stream.testing\n"
        "from tokenhub_stream.asgi import ChatProxy\n"
        "with tokenhub_stream.Client(base_url='http://127.0.0.1:9/v1') as client:\n"
        "    client.stream_chat([{'role': 'user', 'content': 'hi'}])\n"
        "roots = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(roots & {'pydantic', 'pydantic_core'}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "[]"
