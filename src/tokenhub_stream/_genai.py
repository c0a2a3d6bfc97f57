"""The GenAI semantic conventions' names and attribute values (sans-I/O).

OpenTelemetry semantic conventions **v1.41.0** (`docs/gen-ai/`): the release followed, the
content opt-in switch, the histograms' advised buckets, `gen_ai.provider.name` by API host,
and the attributes made from a request body, a usage, an error and the messages. Used by
the clients' recorders (`_telemetry.py`) and the proxy's (`asgi/_telemetry.py`); nothing
here imports opentelemetry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from ._models import ChatMessage, Usage

    #: Span and metric attributes.
    Attrs = dict[str, AttributeValue]

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "DURATION_BUCKETS",
    "FIRST_CHUNK_BUCKETS",
    "PER_CHUNK_BUCKETS",
    "SCHEMA_URL",
    "SEMCONV_VERSION",
    "TOKEN_BUCKETS",
    "error_type",
    "input_messages",
    "output_messages",
    "provider_name",
    "request_attributes",
    "server_of",
    "usage_attributes",
]

#: The semantic conventions release the names and attributes follow.
SEMCONV_VERSION = "1.41.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
#: The conventions' opt-in switch for recording message content.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

# The conventions' advised bucket boundaries (ExplicitBucketBoundaries), per histogram.
DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
FIRST_CHUNK_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
PER_CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# gen_ai.provider.name by API host: the conventions' well-known values, for the hosts
# that are known to be that provider; any other OpenAI-compatible API is "openai" (the
# flavour of the API spoken, as the conventions allow).
_PROVIDERS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.deepseek.com": "deepseek",
    "api.groq.com": "groq",
    "api.mistral.ai": "mistral_ai",
    "api.x.ai": "x_ai",
    "api.perplexity.ai": "perplexity",
    "generativelanguage.googleapis.com": "gcp.gemini",
    "aiplatform.googleapis.com": "gcp.vertex_ai",
}


def server_of(url: str) -> tuple[str, int | None]:
    """`server.address` and `server.port` of a URL (the scheme's default port if none)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "", None
    if port is None:
        port = {"https": 443, "http": 80}.get(parts.scheme)
    return parts.hostname or "", port


def provider_name(address: str) -> str:
    """`gen_ai.provider.name` for an API host (see `_PROVIDERS`)."""
    if address.endswith(".openai.azure.com"):
        return "azure.ai.openai"
    return _PROVIDERS.get(address, "openai")


_REQUEST_NUMBERS = (
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
)


def request_attributes(params: Mapping[str, object]) -> Attrs:
    """The `gen_ai.request.*` attributes of a request body's parameters (no content)."""
    out: Attrs = {}
    limit = params.get("max_completion_tokens", params.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool):
        out["gen_ai.request.max_tokens"] = limit
    for name, attribute in _REQUEST_NUMBERS:
        value = params.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[attribute] = float(value)
    seed = params.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        out["gen_ai.request.seed"] = seed
    choices = params.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        out["gen_ai.request.choice.count"] = choices
    response_format = params.get("response_format")
    if isinstance(response_format, Mapping):
        kind = response_format.get("type")
        if kind in ("json_object", "json_schema"):
            out["gen_ai.output.type"] = "json"
        elif kind == "text":
            out["gen_ai.output.type"] = "text"
    stop = params.get("stop")
    if isinstance(stop, str):
        out["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop):
        out["gen_ai.request.stop_sequences"] = tuple(str(s) for s in stop)
    return out


def usage_attributes(usage: Usage | None) -> Attrs:
    """The `gen_ai.usage.*` attributes of a reported usage."""
    out: Attrs = {}
    if usage is None:
        return out
    if usage.prompt_tokens is not None:
        out["gen_ai.usage.input_tokens"] = usage.prompt_tokens
    if usage.completion_tokens is not None:
        out["gen_ai.usage.output_tokens"] = usage.completion_tokens
    if usage.cached_tokens is not None:
        out["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
    if usage.reasoning_tokens is not None:
        out["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
    return out


def error_type(error: BaseException) -> str:
    """`error.type`: the exception's class name (low-cardinality, never its message)."""
    return type(error).__name__


def input_messages(messages: Sequence[object]) -> str:
    """`gen_ai.input.messages`: OpenAI chat messages in the conventions' JSON shape."""
    out: list[dict[str, object]] = []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        role = str(message.get("role", "user"))
        parts: list[dict[str, object]] = []
        if role == "tool":
            parts.append(
                {
                    "type": "tool_call_response",
                    "id": message.get("tool_call_id"),
                    "response": message.get("content"),
                }
            )
        else:
            parts.extend(_content_parts(message.get("content")))
        for call in message.get("tool_calls") or ():
            if isinstance(call, Mapping):
                function = call.get("function")
                function = function if isinstance(function, Mapping) else {}
                parts.append(
                    {
                        "type": "tool_call",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "arguments": function.get("arguments"),
                    }
                )
        out.append({"role": role, "parts": parts})
    return _dumps(out)


def _content_parts(content: object) -> list[dict[str, object]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}] if content else []
    parts: list[dict[str, object]] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping):
                kind = str(part.get("type", ""))
                if kind == "text":
                    parts.append({"type": "text", "content": part.get("text", "")})
                else:  # an image or audio part: its kind, never its (possibly huge) data
                    parts.append({"type": kind or "unknown"})
    return parts


def output_messages(message: ChatMessage, finish_reason: str | None) -> str:
    """`gen_ai.output.messages`: the assembled answer in the conventions' JSON shape."""
    parts: list[dict[str, object]] = []
    if message.content:
        parts.append({"type": "text", "content": message.content})
    for call in message.tool_calls:
        parts.append(
            {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}
        )
    out = {"role": "assistant", "parts": parts, "finish_reason": finish_reason or ""}
    return _dumps([out])


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
