"""The async I/O shell; edit this file, then run scripts/unasync.py."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeAlias, TypeVar, overload

import httpx

from ._base import (
    ENGINE_MAX_CONNECTIONS,
    ENGINE_MAX_HEAD_BYTES,
    ERROR_BODY_LIMIT,
    AsyncShield,
    BaseClient,
    Call,
    CompletionDeadline,
    HeaderTypes,
    MessagesTypes,
    TimeoutTypes,
    answered,
    async_sleep,
    build_call,
    direct_request,
    direct_transport_ok,
    engine_fits,
    engine_runs_async,
    generator_done,
    is_encoded,
    parsed_result,
    raw_chunks,
    send_error,
    status_error,
)
from ._completion import parse_completion
from ._config import (
    DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_MAX_RETRY_WAIT,
    DEFAULT_MODEL,
    DEFAULT_TIMEOUT,
    DRAIN_MAX_BYTES,
    UNSET,
    UnsetType,
)
from ._exceptions import TokenHubError
from ._models import ChatResult, OutputT, StreamEvent
from ._retry import Retries
from ._stream import ConsumeMode, ElementT, StreamState, StreamView
from .tools import ToolsTypes
from .tools._loop import DEFAULT_MAX_TURNS, AsyncToolLoop, arun_tools

if TYPE_CHECKING:
    from ._engine._http import HttpEngine, HttpResponse

    #: What `_send` returns: httpx's response, or the engine's.
    AsyncAnswer: TypeAlias = httpx.Response | HttpResponse

__all__ = ["AsyncChatStream", "AsyncClient"]

#: The type given as `response_format=`, and so the type of the stream's `parsed`.
_T = TypeVar("_T")


class AsyncChatStream(StreamView[OutputT]):
    """One streamed chat completion: an async iterator of text deltas and an async
    context manager. The request is sent on enter, or on first iteration.

    ```python
    async with client.stream_chat(messages) as stream:
        async for text in stream:
            print(text, end="", flush=True)
    print(stream.message.finish_reason, stream.usage, stream.timings)
    ```

    Iterate it once, either directly (text deltas) or through `events()` (typed
    events); `message`, `usage`, `timings` and `outcome` are filled either way.
    Generic in the type of its structured output: `stream_chat(...,
    response_format=Card)` makes an `AsyncChatStream[Card]`, whose `parsed` is a `Card`;
    a JSON schema or no `response_format` makes an `AsyncChatStream[object]`
    (docs/structured.md#types).
    Leaving the `async with` block, `aclose()`, or cancelling the task closes the
    upstream connection at once. So does dropping an unfinished stream (a bare `break`
    with no `async with`), with a `ResourceWarning`, as for an unclosed file.
    """

    _state: _AsyncStreamCore

    def __init__(self, client: AsyncClient, call: Call, *, owns_client: bool = False) -> None:
        # The state is shared with the consuming generators; it never points back at
        # this object or at them, so nothing here is a reference cycle and a dropped
        # stream is noticed at once (see `StreamState._adopt`).
        self._state = state = _AsyncStreamCore(client, call, owns_client)
        state._adopt(self)
        self._consumer: AsyncIterator[Any] | None = None
        self._next_consumer: AsyncIterator[str] | None = None

    async def __aenter__(self) -> Self:
        state = self._state
        try:
            if state._response is None:
                await state._open()
        except BaseException as exc:
            state._record_exit(exc)
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._state._record_exit(exc)
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[str]:
        if self._next_consumer is not None:  # reading already began with anext()
            return self._next_consumer
        self._consumer = self._state._consumer("text")
        return self._consumer

    async def __anext__(self) -> str:
        if self._next_consumer is None:
            self._next_consumer = self._consumer = self._state._consumer("text")
        return await self._next_consumer.__anext__()

    def events(self) -> AsyncIterator[StreamEvent]:
        """Iterate typed events: content, reasoning and tool-call deltas, finish, usage."""
        self._consumer = self._state._consumer("events")
        return self._consumer

    def partials(self) -> AsyncIterator[object]:
        """Iterate the partial value of a structured output (`response_format=`) each time
        it changes: plain dicts and lists grown in place (the same object each time: copy
        it to keep a snapshot), strings as they grow, numbers once complete; for a
        `list[...]` output, the list (see docs/structured.md).

        Typed `object`, whatever the stream's output type: a partial value is JSON that
        is not complete yet (a `Card` with no `moons` so far), never an instance of the
        type; narrow it with `isinstance` (a dict, a list, ...).

        At the end `parsed` holds the validated value; a bad output raises here.

        Raises:
            TypeError: no `response_format` (at the call).
            OutputValidationError: not valid JSON (at once), or not the type (at the end).
            IncompleteOutputError: finish_reason `length` or `content_filter`.
            OutputRefusedError: the model refused (at the end; nothing was yielded).
        """
        self._state._structured("partials")
        self._consumer = self._state._consumer("partials")
        return self._consumer

    @overload
    def elements(self: AsyncChatStream[list[ElementT]]) -> AsyncIterator[ElementT]: ...
    @overload
    def elements(self) -> AsyncIterator[object]: ...
    def elements(self) -> AsyncIterator[object]:
        """Iterate the elements of a `list[...]` output, each once complete and validated
        (a model instance for `list[Model]`, typed so: the stream is an
        `AsyncChatStream[list[Model]]`; `object` for a JSON schema).

        Raises:
            TypeError: no `response_format`, or its output is not a list (at the call).
            OutputValidationError: not valid JSON, or an element not the type.
            IncompleteOutputError: finish_reason `length` or `content_filter`.
            OutputRefusedError: the model refused (at the end; nothing was yielded).
        """
        self._state._structured("elements")
        self._consumer = self._state._consumer("elements")
        return self._consumer

    async def aclose(self) -> None:
        """Close the upstream connection (at once if the body was not read to its end)."""
        state = self._state
        state._record_exit(None)
        consumer, self._consumer = self._consumer, None
        if consumer is not None and not generator_done(consumer):
            with AsyncShield():
                await _close_generator(consumer)
        await state._release()


#: The fewest chunks in one read that `_consume` parses with `feed_text_batch` (measured:
#: from 4 chunks a run is cheaper per delta than `feed_text` chunk by chunk).
_BATCH_MIN = 4


class _AsyncStreamCore(StreamState):
    """What the public stream (`AsyncChatStream`) and its consuming generators share:
    the response, the parser and the I/O that reads it."""

    _public_name = "AsyncChatStream"

    def __init__(self, client: AsyncClient, call: Call, owns_client: bool) -> None:
        super().__init__(client, call)
        self._client = client
        self._owns_client = owns_client
        self._response: AsyncAnswer | None = None
        # The body as lists of chunk bodies (the engine's, or one httpx chunk at a time).
        self._chunks: AsyncIterator[list[bytes]] | None = None

    def _consumer(self, mode: ConsumeMode) -> AsyncIterator[Any]:
        consumer = self._consume(mode)
        self._adopt(consumer)
        return consumer

    async def _open(self) -> None:
        client = self._client
        try:
            response = await client._send_retrying(self._call, self._retries, self._before_send)
        except TokenHubError as error:
            self._fail(error)
            raise
        self._response = response
        self._start(response)
        self._chunks = _body(response)

    async def _consume(self, mode: ConsumeMode) -> AsyncIterator[Any]:
        self._claim()
        try:
            while True:
                if self._response is None:
                    await self._open()
                parser = self._parser
                feed = self._feed(mode)
                assert self._chunks is not None
                try:
                    # In text mode a read of several chunks is parsed in runs
                    # (`feed_text_batch`: one call for all the chunks that differ only in
                    # their content); below _BATCH_MIN chunks a run costs more than it saves.
                    runs = parser.feed_text_batch if mode == "text" else None
                    async for batch in self._chunks:
                        if runs is None or len(batch) < _BATCH_MIN:
                            for chunk in batch:
                                for item in feed(chunk):
                                    yield item
                                if parser.stopped:
                                    break
                        else:
                            end = 0
                            while end < len(batch) and not parser.stopped:
                                deltas, end = runs(batch, end)
                                for item in deltas:
                                    yield item
                        if parser.stopped:
                            break
                    else:
                        parser.feed_eof()
                except httpx.HTTPError as exc:
                    parser.error = self._read_error(exc)
                if parser.done and self._start_drain():
                    await self._drain()
                error = self._settle()
                if error is None:
                    self._end(mode)
                    return
                delay = self._retry_after_failure(error)
                if delay is None:
                    raise error
                await self._release_response()
                await async_sleep(delay)
        except BaseException as exc:
            self._record_exit(exc)
            raise
        finally:
            await self._release()

    async def _drain(self) -> None:
        # Read what follows [DONE] (the chunked terminator, a proxy heartbeat) so the
        # connection can go back to the pool; the watchdog bounds the time it takes.
        received = 0
        assert self._chunks is not None
        try:
            async for batch in self._chunks:
                received += sum(len(chunk) for chunk in batch)
                if received > DRAIN_MAX_BYTES:
                    break
        except httpx.HTTPError:
            pass

    async def _release_response(self) -> None:
        if self._timer is not None:
            self._timer.release()  # closed, or back in the pool: never ours to shut down
        response, self._response = self._response, None
        chunks, self._chunks = self._chunks, None
        if chunks is not None and generator_done(chunks):
            chunks = None  # read to its end: nothing to close
        if response is not None and not isinstance(response, httpx.Response):
            # The engine's: closed at once (or handed back to the pool), no await.
            response.close()
            response = None
        if chunks is None and (response is None or response.is_closed):
            return
        with AsyncShield():
            if chunks is not None:
                await _close_generator(chunks)
            if response is not None:
                await response.aclose()

    async def _release(self) -> None:
        if self._closed and self._response is None and self._chunks is None:
            return  # released already (the consumer's end, then the stream's close)
        await self._release_response()
        if self._owns_client and not self._closed:
            self._closed = True
            with AsyncShield():
                await self._client.aclose()
        self._closed = True


def _body(response: AsyncAnswer) -> AsyncIterator[list[bytes]]:
    """The stream's body as it should be parsed: lists of the engine's chunk bodies, each
    fed to the parser on its own; httpx's chunks one at a time."""
    if not isinstance(response, httpx.Response):
        if not is_encoded(response.headers):
            return response.aiter_batches()
        return _one_by_one(_decoded(response))
    raw = raw_chunks(response)
    if isinstance(raw, AsyncIterable):
        return _one_by_one(aiter(raw))
    return _one_by_one(response.aiter_bytes())


async def _one_by_one(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    async for chunk in chunks:
        yield [chunk]


def _decoded(response: AsyncAnswer) -> AsyncIterator[bytes]:
    """The body decoded as httpx decodes it (gzip, deflate, ...): the engine passes bodies
    as they come, so a compressed one is read through httpx's `Response`."""
    if isinstance(response, httpx.Response):
        return response.aiter_bytes()
    if not is_encoded(response.headers):
        return response.aiter_raw()
    from ._engine._transport import as_httpx

    return as_httpx(response).aiter_bytes()


async def _read(response: AsyncAnswer) -> bytes:
    """The whole body, decoded (`_decoded`)."""
    if isinstance(response, httpx.Response) or not is_encoded(response.headers):
        return await response.aread()
    return b"".join([chunk async for chunk in _decoded(response)])


async def _close_generator(generator: AsyncIterator[Any]) -> None:
    close = getattr(generator, "aclose", None)
    if close is not None:
        try:
            await close()
        except (RuntimeError, ValueError):  # already running: it is closing itself
            pass


class AsyncClient(BaseClient):
    """An async client for OpenAI-compatible chat completions, reusing one connection pool.

    ```python
    async with tokenhub_stream.AsyncClient() as client:
        async with client.stream_chat([{"role": "user", "content": "Hi"}]) as stream:
            async for text in stream:
                print(text, end="")
    ```

    Args:
        api_key: the bearer key; default env `TOKENHUB_KEY`. Needed only for the
            default token-hub URL.
        base_url: default env `TOKENHUB_BASE_URL`, else `https://api.sandboxclaw.com/v1`.
        model: the model used when a call names none.
        timeout: a `Timeout`, one number for connect/first-token/idle, or None.
        max_retries: retries before the first delta (connect errors, 408, 429, 5xx,
            retryable error frames).
        max_retry_wait: the longest `Retry-After` honoured; beyond it the error is raised.
        include_usage: ask for a final usage chunk (`stream_options.include_usage`) on
            every stream; a call's `include_usage` overrides it.
        max_event_bytes: the largest SSE event accepted (`ProtocolError` beyond).
        strict_utf8: raise `ProtocolError` on invalid UTF-8 instead of U+FFFD.
        drain_timeout: how long to read on after `[DONE]` to keep the connection.
        headers: extra headers sent with every request.
        http_client: an `httpx.AsyncClient` to send with instead of our engine (not
            closed by us). Without one, the client sends over its own HTTP/1.1 engine, or
            over httpx where the engine does not go (a proxy from the environment,
            credentials in the URL, trio, `TOKENHUB_STREAM_ENGINE=httpx`: see
            docs/configuration.md).
        strict_schemas: send `strict: true` with `response_format=` schemas and tool
            schemas (both are always strict-ready); False leaves the field out, for
            servers that reject it (vLLM, SGLang).

    Raises:
        ValueError: a bad option, or `TOKENHUB_STREAM_ENGINE` neither "auto" nor "httpx".
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        model: str = DEFAULT_MODEL,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT,
        include_usage: bool = False,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        strict_utf8: bool = False,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        headers: HeaderTypes | None = None,
        http_client: httpx.AsyncClient | None = None,
        strict_schemas: bool = True,
    ) -> None:
        super().__init__(
            api_key=api_key,
            base_url=base_url,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            max_retry_wait=max_retry_wait,
            include_usage=include_usage,
            max_event_bytes=max_event_bytes,
            strict_utf8=strict_utf8,
            drain_timeout=drain_timeout,
            headers=headers,
            strict_schemas=strict_schemas,
        )
        self._owns_http = http_client is None
        # Our own pool is our engine (`_engine/`) when nothing needs httpx (see
        # `engine_fits`); made on first use, as is an httpx client it may still need (the
        # async client under trio).
        self._use_engine = http_client is None and engine_fits(self.base_url)
        self._engine: HttpEngine | None = None
        self._http: httpx.AsyncClient | None = http_client
        self._transport: httpx.AsyncHTTPTransport | None = None
        self._default_headers: dict[str, str] = {}
        if http_client is not None:
            self._default_headers = dict(http_client.headers)
        elif not self._use_engine:
            self._own_httpx()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (not an `http_client` that was passed in)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.aclose()
        if self._owns_http and self._http is not None:
            await self._http.aclose()

    def _own_httpx(self) -> httpx.AsyncClient:
        """Our own httpx client: requests go straight to its transport when nothing that
        `send()` adds could apply (see `direct_transport_ok`)."""
        if direct_transport_ok(self.base_url):
            self._transport = httpx.AsyncHTTPTransport()
            self._http = httpx.AsyncClient(transport=self._transport)
        else:
            self._http = httpx.AsyncClient()
        self._default_headers = dict(self._http.headers)
        return self._http

    def _own_engine(self) -> HttpEngine:
        from ._engine._http import HttpEngine

        # Its own limits: a request brings its connect, pool and head-wait timeouts, and
        # the watchdog enforces the body's deadlines on the engine's socket.
        self._engine = HttpEngine(
            ENGINE_MAX_CONNECTIONS,
            httpx.Timeout(None),
            ENGINE_MAX_HEAD_BYTES,
            trust_env=True,
            release_at_close=True,  # the watchdog lets go of the socket first
        )
        return self._engine

    # A type as `response_format` (a model, `list[Model]`, a dataclass, `int`, ...) types
    # the stream's `parsed`; anything else (a JSON schema, None, a union, `Annotated`) is
    # `object`. A `TypeForm` (PEP 747) would take the unions too, once type checkers do.
    @overload
    def stream_chat(
        self,
        messages: MessagesTypes,
        *,
        model: str | UnsetType = ...,
        timeout: TimeoutTypes | UnsetType = ...,
        max_retries: int | UnsetType = ...,
        include_usage: bool | UnsetType = ...,
        extra_headers: HeaderTypes | None = ...,
        response_format: type[_T],
        **params: object,
    ) -> AsyncChatStream[_T]: ...
    @overload
    def stream_chat(
        self,
        messages: MessagesTypes,
        *,
        model: str | UnsetType = ...,
        timeout: TimeoutTypes | UnsetType = ...,
        max_retries: int | UnsetType = ...,
        include_usage: bool | UnsetType = ...,
        extra_headers: HeaderTypes | None = ...,
        response_format: object = ...,
        **params: object,
    ) -> AsyncChatStream[object]: ...
    def stream_chat(
        self,
        messages: MessagesTypes,
        *,
        model: str | UnsetType = UNSET,
        timeout: TimeoutTypes | UnsetType = UNSET,
        max_retries: int | UnsetType = UNSET,
        include_usage: bool | UnsetType = UNSET,
        extra_headers: HeaderTypes | None = None,
        response_format: object = None,
        **params: object,
    ) -> AsyncChatStream[object]:
        """Start a streamed chat completion (sent on enter or first iteration).

        Args:
            messages: the conversation, OpenAI shape.
            model: the model; default the client's.
            timeout, max_retries: override the client's for this call.
            include_usage: ask for a final usage chunk (`stream_options.include_usage`);
                default the client's.
            extra_headers: headers for this request only.
            response_format: a structured output: a pydantic model, any type pydantic's
                `TypeAdapter` takes (`list[Model]`, a dataclass, a TypedDict), or a JSON
                schema; then `partials()`, `elements()` and `parsed` (docs/structured.md).
            **params: other body fields (`temperature`, `max_tokens`, `tools`, ...).

        Returns:
            An `AsyncChatStream`: an `AsyncChatStream[Model]` for `response_format=Model`
            (`parsed` is a `Model`), else an `AsyncChatStream[object]`.

        Raises:
            TypeError: `stream` given in `params`, messages not a list, or a
                `response_format` a strict schema cannot express.
            ImportError: a type as `response_format` without pydantic (the
                `structured` extra).
            MissingAPIKeyError: no key for the default token-hub URL.
        """
        call = build_call(
            self,
            messages,
            model,
            params,
            stream=True,
            timeout=timeout,
            max_retries=max_retries,
            include_usage=include_usage,
            extra_headers=extra_headers,
            response_format=response_format,
        )
        return AsyncChatStream(self, call)

    def run_tools(
        self,
        messages: MessagesTypes,
        *,
        tools: ToolsTypes,
        model: str | UnsetType = UNSET,
        max_turns: int = DEFAULT_MAX_TURNS,
        timeout: TimeoutTypes | UnsetType = UNSET,
        max_retries: int | UnsetType = UNSET,
        include_usage: bool | UnsetType = UNSET,
        extra_headers: HeaderTypes | None = None,
        **params: object,
    ) -> AsyncToolLoop:
        """Stream a conversation that may call tools, running them until a turn ends
        without tool calls (see docs/tools.md).

        ```python
        @tool
        def get_weather(city: str) -> str:  # hints and docstring make the schema
            return "sunny"

        async for event in client.run_tools(messages, tools=[get_weather]):
            if isinstance(event, ContentDelta):
                print(event.text, end="")
        ```

        Returns:
            `AsyncToolLoop`: iterate its events; `.messages` and `.final` afterwards.

        Raises:
            TypeError: `stream` in params, messages not a list, or (sync client) a
                coroutine-function tool; before any request.
            ValueError: no tools, duplicate tool names, or `max_turns < 1`.
            MaxTurnsExceeded: the last allowed turn still asked for tools.
        """
        return arun_tools(
            self,
            messages,
            tools=tools,
            model=model,
            max_turns=max_turns,
            timeout=timeout,
            max_retries=max_retries,
            include_usage=include_usage,
            extra_headers=extra_headers,
            **params,
        )

    @overload
    async def chat(
        self,
        messages: MessagesTypes,
        *,
        model: str | UnsetType = ...,
        timeout: TimeoutTypes | UnsetType = ...,
        max_retries: int | UnsetType = ...,
        extra_headers: HeaderTypes | None = ...,
        response_format: type[_T],
        **params: object,
    ) -> ChatResult[_T]: ...
    @overload
    async def chat(
        self,
        messages: MessagesTypes,
        *,
        model: str | UnsetType = ...,
        timeout: TimeoutTypes | UnsetType = ...,
        max_retries: int | UnsetType = ...,
        extra_headers: HeaderTypes | None = ...,
        response_format: object = ...,
        **params: object,
    ) -> ChatResult[object]: ...
    async def chat(
        self,
        messages: MessagesTypes,
        *,
        model: str | UnsetType = UNSET,
        timeout: TimeoutTypes | UnsetType = UNSET,
        max_retries: int | UnsetType = UNSET,
        extra_headers: HeaderTypes | None = None,
        response_format: object = None,
        **params: object,
    ) -> ChatResult[object]:
        """A non-streaming completion (`stream: false`): the assembled message and usage;
        with `response_format=` (as `stream_chat`), the validated value in `.parsed`: a
        `ChatResult[Model]` for `response_format=Model`, else a `ChatResult[object]`.

        Raises:
            APIError: the upstream refused (subclass by status).
            TransportError: the upstream could not be reached.
            ProtocolError: the response was not a chat completion.
            OutputRefusedError: the model refused (`message.refusal`).
            OutputValidationError, IncompleteOutputError: a bad structured output.
        """
        call = build_call(
            self,
            messages,
            model,
            params,
            stream=False,
            timeout=timeout,
            max_retries=max_retries,
            include_usage=False,  # no usage chunk without a stream
            extra_headers=extra_headers,
            response_format=response_format,
        )
        observer = call.observer
        if observer is None:
            return await self._complete(call)
        try:
            result = await self._complete(call)
        except BaseException as exc:
            observer.completion_ended(None, exc)
            raise
        observer.completion_ended(result, None)
        return result

    async def _complete(self, call: Call) -> ChatResult:
        deadline = CompletionDeadline(call)
        retries = Retries(call.max_retries, self.max_retry_wait, call.observer)
        response = await self._send_retrying(call, retries, deadline.restart)
        deadline.watch(response)
        try:
            body = await _read(response)
        except httpx.HTTPError as exc:
            raise deadline.error(exc) from exc
        finally:
            deadline.stop()
            with AsyncShield():
                await response.aclose()
        return parsed_result(call, parse_completion(body, call.redact))

    async def _send_retrying(
        self, call: Call, retries: Retries, on_send: Callable[[], None]
    ) -> AsyncAnswer:
        """Send `call` until it is `answered`, waiting between attempts as `retries`
        decides (`on_send` runs before each); raises the error it gives up on."""
        while True:
            on_send()
            try:
                response = await self._send(call)
            except httpx.HTTPError as exc:
                error = send_error(exc, call)
            else:
                if answered(call, response):
                    return response
                error = await self._error_of(call, response)
            delay = retries.next_delay(error)
            if delay is None:
                raise error
            await async_sleep(delay)

    async def _send(self, call: Call) -> AsyncAnswer:
        if self._use_engine and engine_runs_async():
            engine = self._engine or self._own_engine()
            return await engine.send(
                call.url, self._engine_headers(call), call.body, call.engine_timeout()
            )
        http = self._http or self._own_httpx()
        url = self._httpx_url(call.url)
        if self._transport is not None:
            request = direct_request(url, call, self._default_headers)
            try:
                response = await self._transport.handle_async_request(request)
            except httpx.RequestError as exc:
                exc.request = request  # as `send()` does
                raise
            response.request = request
            return response
        request = http.build_request(
            "POST",
            url,
            content=call.body,
            headers=call.headers,
            extensions=call.request_extensions(),
        )
        return await http.send(request, stream=True)

    async def _error_of(self, call: Call, response: AsyncAnswer) -> TokenHubError:
        body = b""
        try:
            async for chunk in _decoded(response):
                body += chunk
                if len(body) >= ERROR_BODY_LIMIT:
                    break
        except httpx.HTTPError:
            pass
        finally:
            with AsyncShield():
                await response.aclose()
        return status_error(call, response, body)
