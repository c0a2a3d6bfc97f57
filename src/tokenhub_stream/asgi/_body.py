"""The request body, sans-I/O: its content type and charset, the checks on what the
browser sent, and the body forwarded upstream with the owner's caps applied last.

Internal interface of `tokenhub_stream.asgi` (used by `_proxy.py`).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ._wire import ProxyRejection

__all__: list[str] = []


# OpenAI chat-completions request parameters that may reach the upstream. Anything else the
# browser sends is dropped (after `on_request`), so a page cannot set provider-specific knobs
# the server owner did not choose to expose.
DEFAULT_ALLOWED_FIELDS: frozenset[str] = frozenset(
    {
        "audio",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "max_tokens",
        "messages",
        "metadata",
        "modalities",
        "model",
        "n",
        "parallel_tool_calls",
        "prediction",
        "presence_penalty",
        "reasoning_effort",
        "response_format",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "temperature",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "user",
    }
)


_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


# Fields that multiply the answer: `n` choices, and vLLM's `best_of` candidates (billed
# though not returned). Not multipliers: `logprobs`/`top_logprobs` (bigger frames, the same
# tokens), `audio`/`modalities` and `reasoning_effort` (output tokens, bounded by the token
# limit), `prediction` (its rejected tokens count as output too, bounded the same way).
_CHOICE_FIELDS = ("n", "best_of")


def parse_content_type(value: str | None) -> str:
    """Return the charset to decode the body with (always UTF-8), or raise a 415 rejection.

    Browsers label `fetch(url, {body: JSON.stringify(...)})` as `text/plain;charset=UTF-8`,
    so that is accepted next to `application/json`. A charset other than UTF-8 is a 415.
    """
    if not value:
        return "utf-8"
    media, _, params = value.partition(";")
    media = media.strip().lower()
    if media not in ("application/json", "text/plain"):
        raise ProxyRejection(
            415,
            f"Unsupported content type {media!r}: send application/json or text/plain.",
            code="unsupported_media_type",
        )
    for param in params.split(";"):
        name, _, val = param.partition("=")
        if name.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
            # UTF-8 only (RFC 8259 section 8.1): a body in UTF-7 or UTF-16 reads differently
            # to a filter in front of the app than to the upstream (issue 14).
            if charset not in ("", "utf-8", "utf8"):
                raise ProxyRejection(
                    415,
                    f"Unsupported charset {charset[:40]!r}: send the body as UTF-8.",
                    code="unsupported_charset",
                )
    return "utf-8"


def parse_body(raw: bytes, charset: str) -> dict[str, object]:
    try:
        text = raw.decode(charset)
    except (LookupError, UnicodeDecodeError):
        raise ProxyRejection(
            400, "The request body is not valid text.", code="invalid_body"
        ) from None
    try:
        # NaN and Infinity are Python's extension, not JSON: the upstream would refuse them.
        body = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
        raise ProxyRejection(
            400, "The request body is not valid JSON.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ProxyRejection(400, "The request body must be a JSON object.", code="invalid_body")
    return body


def _not_json(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def validate_body(
    body: dict[str, object],
    *,
    default_model: str,
    allowed_models: Collection[str] | None,
    max_tokens_cap: int | None,
) -> tuple[dict[str, object], bool]:
    """Check the browser's body and return (body with model and clamps applied, stream)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ProxyRejection(
            400, "'messages' must be a non-empty list.", code="invalid_messages", param="messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ProxyRejection(
                400,
                f"messages[{i}] must be an object with a string 'role'.",
                code="invalid_messages",
                param=f"messages[{i}]",
            )
    out = dict(body)
    model = body.get("model")
    if model is None or model == "":
        model = default_model
    if not isinstance(model, str):
        raise ProxyRejection(400, "'model' must be a string.", code="invalid_model", param="model")
    if allowed_models is not None and model not in allowed_models:
        raise ProxyRejection(
            400,
            f"The model {model!r} is not available here.",
            code="model_not_allowed",
            param="model",
        )
    out["model"] = model
    stream = body.get("stream", True)
    if stream is None:
        stream = True
    if not isinstance(stream, bool):
        raise ProxyRejection(
            400, "'stream' must be a boolean.", code="invalid_stream", param="stream"
        )
    for field in _TOKEN_FIELDS:
        if field not in body or body[field] is None:
            continue
        value = body[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProxyRejection(
                400, f"'{field}' must be a non-negative integer.", code="invalid_value", param=field
            )
        if max_tokens_cap is not None and value > max_tokens_cap:
            out[field] = max_tokens_cap
    choices = body.get("n")
    if choices is not None and (
        isinstance(choices, bool) or not isinstance(choices, int) or choices < 1
    ):
        # A lenient upstream (pydantic in lax mode) would read "128" as 128.
        raise ProxyRejection(
            400, "'n' must be a positive integer.", code="invalid_value", param="n"
        )
    return out, stream


# One encoder, not one per json.dumps() call with these options (~4 us per request).
_ENCODE_BODY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


@dataclass(frozen=True, slots=True)
class OutputCaps:
    """The bounds every forwarded body is brought within, applied last (after `on_request`
    and the allow-list), so that they hold whatever the browser or a hook wrote."""

    max_tokens: int | None = None
    max_tokens_field: str = "max_tokens"
    max_choices: int = 1


def apply_caps(out: dict[str, object], caps: OutputCaps) -> None:
    """Clamp the output limits of `out` in place.

    With a token cap, each of `max_tokens` / `max_completion_tokens` that is present gets
    clamped to it, a `null` one is dropped, and when neither is left `max_tokens_field` is
    set to the cap: the upstream's default (often the model's whole context) never
    applies. A value that is not an integer from 0 to the cap (only `on_request` can
    produce one: the browser's gets a 400 first) becomes the cap. `n` and `best_of` above
    `max_choices`, or not positive integers, become `max_choices`; a `null` is dropped.
    """
    cap = caps.max_tokens
    if cap is not None:
        limited = False
        for field in _TOKEN_FIELDS:
            if field not in out:
                continue
            value = out[field]
            if value is None:
                del out[field]
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= cap:
                out[field] = cap
            limited = True
        if not limited:
            out[caps.max_tokens_field] = cap
    most = caps.max_choices
    for field in _CHOICE_FIELDS:
        if field not in out:
            continue
        value = out[field]
        if value is None:
            del out[field]
        elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            out[field] = most


def outgoing_body(
    body: Mapping[str, object],
    allowed: Collection[str],
    stream: bool,
    *,
    caps: OutputCaps | None = None,
    include_usage: bool = False,
) -> bytes:
    """The upstream request body: the allow-listed fields, `stream`, then the caps.

    `include_usage` (streams only) sets `stream_options.include_usage`, keeping the other
    stream options: a `UsageLimiter` needs the turn's usage.
    """
    out = {k: v for k, v in body.items() if k in allowed}
    out["stream"] = stream
    if not stream:
        # OpenAI rejects stream_options on a non-streaming request.
        out.pop("stream_options", None)
    elif include_usage:
        options = out.get("stream_options")
        merged = dict(options) if isinstance(options, Mapping) else {}
        merged["include_usage"] = True
        out["stream_options"] = merged
    if caps is not None:
        apply_caps(out, caps)
    try:
        return _ENCODE_BODY(out).encode()
    except UnicodeEncodeError:  # a lone surrogate escape such as "\\ud800" parses, but is no text
        raise ProxyRejection(
            400, "The request body contains invalid Unicode.", code="invalid_body"
        ) from None
    except ValueError:  # 1e999 parses as infinity, which JSON cannot carry
        raise ProxyRejection(
            400, "The request body contains a number out of range.", code="invalid_body"
        ) from None
