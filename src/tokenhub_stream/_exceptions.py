"""The one exception tree of tokenhub_stream.

```
TokenHubError            base for everything we raise on purpose
├── MissingAPIKeyError   no key for the default token-hub URL (also a ValueError)
├── StreamConsumed       a stream iterated a second time (also a RuntimeError)
├── MaxTurnsExceeded     the tool loop's last allowed turn still asked for tools
│                        (defined in tokenhub_stream.tools)
├── TransportError       connect/read/write failed; __cause__ is the httpx error
│   └── StreamTimeout    .kind: connect | first_token | idle | total
├── APIError             the upstream said no: an HTTP status before streaming OR an error
│   │                    frame inside a 200 stream; .status_code .code .message
│   │                    .param .body .request_id .retryable
│   ├── BadRequestError (400/422)  AuthenticationError (401/403)  NotFoundError (404)
│   └── RateLimitError (429, .retry_after)  ServerError (5xx)
├── ProtocolError        not text/event-stream, bad frame JSON, event over max_event_bytes
│   └── TruncatedStreamError   EOF with neither [DONE] nor a finish_reason
├── OutputValidationError  a structured output (response_format) is not valid JSON or does
│   │                    not fit its type (also a ValueError); .text .errors
│   ├── PartialJSONError   the JSON went wrong mid-stream; .msg .pos
│   └── OutputRefusedError  the model refused (OpenAI's `refusal`); .refusal .text
├── IncompleteOutputError  finish_reason length or content_filter cut a structured output
│                        short; .finish_reason .partial .text
└── StoreError           the conversation store (defined in tokenhub_stream.store)
    ├── ConversationNotFound (also a LookupError)  ConversationExists (also a ValueError)
    └── SchemaError      the database's schema is newer than this library
```

Siblings drawn on one line share their parent (tests/test_issue_16_core.py checks the
drawing against the classes).

An HTTP error status and an error frame with the same status or code raise the same
class, so retry logic reads the same before and after the first byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

__all__ = [
    "APIError",
    "AuthenticationError",
    "BadRequestError",
    "IncompleteOutputError",
    "MissingAPIKeyError",
    "NotFoundError",
    "OutputRefusedError",
    "OutputValidationError",
    "ProtocolError",
    "RateLimitError",
    "ServerError",
    "StreamConsumed",
    "StreamTimeout",
    "TimeoutKind",
    "TokenHubError",
    "TransportError",
    "TruncatedStreamError",
]

TimeoutKind = Literal["connect", "first_token", "idle", "total"]


class TokenHubError(Exception):
    """Base class of every error tokenhub_stream raises on purpose."""


class MissingAPIKeyError(TokenHubError, ValueError):
    """Raised before any request when the default token-hub URL is used without a key."""


class StreamConsumed(TokenHubError, RuntimeError):
    """Raised when a stream is iterated a second time (one consumer per stream)."""


class TransportError(TokenHubError):
    """Raised when connecting to, writing to or reading from the upstream failed.

    `.retryable` is True when no request reached the upstream (connect failures).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class StreamTimeout(TransportError):
    """Raised when one of the stream's timeouts expired; `.kind` says which one."""

    def __init__(self, kind: TimeoutKind, seconds: float | None = None) -> None:
        self.kind: TimeoutKind = kind
        self.seconds = seconds
        after = f" after {seconds:g} s" if seconds is not None else ""
        super().__init__(f"{kind} timeout{after}", retryable=kind == "connect")


class APIError(TokenHubError):
    """Raised when the upstream answered with an error status or sent an error frame.

    `.param` is the request field the upstream blamed (OpenAI's `error.param`, e.g.
    `"max_tokens"`), and `.body` the upstream's JSON as parsed (the error response's body,
    or the error frame), the client's key redacted from every string; each is `None`
    when the upstream sent none.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        body: Mapping[str, object] | None = None,
    ) -> None:
        self.message = message
        self.retry_after = retry_after
        self.status_code = status_code
        self.code = code
        self.param = param
        self.body = body
        self.request_id = request_id
        self.retryable = _is_retryable(status_code) if retryable is None else retryable
        super().__init__(message)

    def __str__(self) -> str:
        parts = [str(self.status_code)] if self.status_code is not None else []
        if self.code:
            parts.append(self.code)
        prefix = f"[{' '.join(parts)}] " if parts else ""
        return f"{prefix}{self.message}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r}, "
            f"code={self.code!r}, retryable={self.retryable!r})"
        )


class BadRequestError(APIError):
    """Raised for 400 and 422: the request itself was refused."""


class AuthenticationError(APIError):
    """Raised for 401 and 403: the key is missing, wrong, or not allowed."""


class NotFoundError(APIError):
    """Raised for 404: unknown model or endpoint."""


class RateLimitError(APIError):
    """Raised for 429; `.retry_after` holds the upstream's `Retry-After` in seconds."""


class ServerError(APIError):
    """Raised for 5xx: the upstream failed; usually worth a retry."""


class ProtocolError(TokenHubError):
    """Raised when the response is not a valid chat-completion event stream."""


class TruncatedStreamError(ProtocolError):
    """Raised when the stream ended with neither `[DONE]` nor a finish_reason."""


class OutputValidationError(TokenHubError, ValueError):
    """Raised when a structured output (`response_format=`) is not valid JSON, or does not
    fit the type it was asked for.

    Attributes:
        text: the model's whole output text (as far as it was read).
        errors: pydantic's errors (`ValidationError.errors()`, without URLs), one dict per
            problem with `type`, `loc`, `msg` and `input`; empty when the JSON itself was
            invalid.
    """

    def __init__(
        self, message: str, *, text: str = "", errors: Sequence[Mapping[str, object]] = ()
    ) -> None:
        super().__init__(message)
        self.text = text
        self.errors: list[Mapping[str, object]] = list(errors)


class OutputRefusedError(OutputValidationError):
    """Raised instead of a structured output when the model refused to give one (OpenAI's
    `refusal`, streamed in place of the content): there is no output to validate.

    A subclass of `OutputValidationError`, so code that catches a bad output catches a
    refusal too (before refusals were read, one failed as invalid JSON).

    Attributes:
        refusal: the model's refusal text.
        text: the output text the model sent besides (usually empty).
    """

    def __init__(self, refusal: str, *, text: str = "") -> None:
        super().__init__(f"the model refused to answer: {refusal}", text=text)
        self.refusal = refusal


class IncompleteOutputError(TokenHubError):
    """Raised when a structured output ended with finish_reason `length` (the token limit)
    or `content_filter`: its JSON is cut short.

    Attributes:
        finish_reason: `"length"` or `"content_filter"`.
        partial: the last partial value (plain dicts and lists; for a `list[...]` output
            the list), or None if nothing of it showed.
        text: the model's output text.
    """

    def __init__(self, finish_reason: str, partial: object, text: str) -> None:
        why = "the token limit" if finish_reason == "length" else "the content filter"
        super().__init__(
            f"the structured output was cut short by {why} (finish_reason={finish_reason!r}) "
            f"after {len(text)} characters"
        )
        self.finish_reason = finish_reason
        self.partial = partial
        self.text = text


def _is_retryable(status_code: int | None) -> bool:
    return status_code is not None and (status_code in (408, 429) or status_code >= 500)
