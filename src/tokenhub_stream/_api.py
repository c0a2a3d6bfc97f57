"""Module-level one-shot helpers: `stream_chat` (async) and `stream_chat_sync`."""

from __future__ import annotations

from typing import Any, TypeVar, overload

from ._async_client import AsyncChatStream, AsyncClient
from ._base import BaseClient, Call, HeaderTypes, MessagesTypes, TimeoutTypes, build_call
from ._config import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MODEL, UNSET, UnsetType
from ._sync_client import ChatStream, Client

__all__ = ["stream_chat", "stream_chat_sync"]

#: The type given as `response_format=`, and so the type of the stream's `parsed`.
_T = TypeVar("_T")


# The overloads type the stream's output as the clients' `stream_chat` do: a type as
# `response_format` gives a stream of that type, anything else a stream of `object`.
@overload
def stream_chat(
    messages: MessagesTypes,
    *,
    model: str = ...,
    api_key: str | None = ...,
    base_url: str | None = ...,
    timeout: TimeoutTypes | UnsetType = ...,
    max_retries: int | UnsetType = ...,
    include_usage: bool = ...,
    extra_headers: HeaderTypes | None = ...,
    max_event_bytes: int = ...,
    response_format: type[_T],
    strict_schemas: bool = ...,
    **params: object,
) -> AsyncChatStream[_T]: ...
@overload
def stream_chat(
    messages: MessagesTypes,
    *,
    model: str = ...,
    api_key: str | None = ...,
    base_url: str | None = ...,
    timeout: TimeoutTypes | UnsetType = ...,
    max_retries: int | UnsetType = ...,
    include_usage: bool = ...,
    extra_headers: HeaderTypes | None = ...,
    max_event_bytes: int = ...,
    response_format: object = ...,
    strict_schemas: bool = ...,
    **params: object,
) -> AsyncChatStream[object]: ...


def stream_chat(
    messages: MessagesTypes,
    *,
    model: str = DEFAULT_MODEL,
    api_key: str | None = None,
    base_url: str | None = None,
    timeout: TimeoutTypes | UnsetType = UNSET,
    max_retries: int | UnsetType = UNSET,
    include_usage: bool = False,
    extra_headers: HeaderTypes | None = None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    response_format: object = None,
    strict_schemas: bool = True,
    **params: object,
) -> AsyncChatStream[object]:
    """Stream a chat completion's text deltas (async).

    ```python
    async with stream_chat([{"role": "user", "content": "Hi"}]) as stream:
        async for text in stream:
            print(text, end="", flush=True)
    ```

    POSTs `{model, messages, stream: true, **params}` to `base_url + "/chat/completions"`.
    `api_key` defaults to env `TOKENHUB_KEY`, `base_url` to env `TOKENHUB_BASE_URL`, else
    `https://api.sandboxclaw.com/v1` (read at call time). The returned stream owns a
    private connection pool, closed when the stream ends.

    Args:
        messages: the conversation, OpenAI shape.
        model: the model name; picks the provider on token-hub.
        api_key, base_url: see above; a key is required only for the default URL.
        timeout: a `Timeout`, one number, or None (no timeouts).
        max_retries: retries before the first delta.
        include_usage: request a usage chunk (`stream_options.include_usage`).
        extra_headers: extra request headers.
        max_event_bytes: the largest SSE event accepted (`ProtocolError` beyond).
        response_format: a structured output: a pydantic model, any type pydantic's
            `TypeAdapter` takes, or a JSON schema (docs/structured.md); then
            `partials()`, `elements()` and `parsed`.
        strict_schemas: send `strict: true` with the `response_format` schema; False
            leaves it out, for servers that reject it (vLLM, SGLang).
        **params: other body fields (`temperature`, `max_tokens`, ...); not `stream`.

    Returns:
        An `AsyncChatStream`: async-iterate it for `str` deltas. For
        `response_format=Model` it is an `AsyncChatStream[Model]` (`parsed` is a
        `Model`), else an `AsyncChatStream[object]`.

    Raises:
        MissingAPIKeyError: the default URL and no key (before any request).
        TypeError: `stream` in params, or a `response_format` a strict schema cannot
            express.
        ImportError: a type as `response_format` without pydantic (`structured` extra).
    """
    call = _prepare(locals(), params)
    client = AsyncClient(
        api_key=api_key,
        base_url=base_url,
        max_event_bytes=max_event_bytes,
        strict_schemas=strict_schemas,
    )
    return AsyncChatStream(client, call, owns_client=True)


@overload
def stream_chat_sync(
    messages: MessagesTypes,
    *,
    model: str = ...,
    api_key: str | None = ...,
    base_url: str | None = ...,
    timeout: TimeoutTypes | UnsetType = ...,
    max_retries: int | UnsetType = ...,
    include_usage: bool = ...,
    extra_headers: HeaderTypes | None = ...,
    max_event_bytes: int = ...,
    response_format: type[_T],
    strict_schemas: bool = ...,
    **params: object,
) -> ChatStream[_T]: ...
@overload
def stream_chat_sync(
    messages: MessagesTypes,
    *,
    model: str = ...,
    api_key: str | None = ...,
    base_url: str | None = ...,
    timeout: TimeoutTypes | UnsetType = ...,
    max_retries: int | UnsetType = ...,
    include_usage: bool = ...,
    extra_headers: HeaderTypes | None = ...,
    max_event_bytes: int = ...,
    response_format: object = ...,
    strict_schemas: bool = ...,
    **params: object,
) -> ChatStream[object]: ...
def stream_chat_sync(
    messages: MessagesTypes,
    *,
    model: str = DEFAULT_MODEL,
    api_key: str | None = None,
    base_url: str | None = None,
    timeout: TimeoutTypes | UnsetType = UNSET,
    max_retries: int | UnsetType = UNSET,
    include_usage: bool = False,
    extra_headers: HeaderTypes | None = None,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    response_format: object = None,
    strict_schemas: bool = True,
    **params: object,
) -> ChatStream[object]:
    """Stream a chat completion's text deltas (sync); the same arguments as `stream_chat`.

    ```python
    with stream_chat_sync([{"role": "user", "content": "Hi"}]) as stream:
        for text in stream:
            print(text, end="", flush=True)
    ```

    Returns:
        A `ChatStream`: iterate it for `str` deltas; a `ChatStream[Model]` for
        `response_format=Model`, else a `ChatStream[object]`.

    Raises:
        MissingAPIKeyError: the default URL and no key (before any request).
        TypeError: `stream` in params, or a `response_format` a strict schema cannot
            express.
        ImportError: a type as `response_format` without pydantic (`structured` extra).
    """
    call = _prepare(locals(), params)
    client = Client(
        api_key=api_key,
        base_url=base_url,
        max_event_bytes=max_event_bytes,
        strict_schemas=strict_schemas,
    )
    return ChatStream(client, call, owns_client=True)


def _prepare(args: dict[str, Any], params: dict[str, object]) -> Call:
    # Validate (missing key, `stream` in params) before any connection pool exists.
    return build_call(
        BaseClient(
            api_key=args["api_key"],
            base_url=args["base_url"],
            strict_schemas=args["strict_schemas"],
        ),
        args["messages"],
        args["model"],
        params,
        stream=True,
        timeout=args["timeout"],
        max_retries=args["max_retries"],
        include_usage=args["include_usage"],
        extra_headers=args["extra_headers"],
        response_format=args["response_format"],
    )
