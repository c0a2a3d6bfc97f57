"""The upstream's fixed rules: how reply text is split, and what answers a request no script
answers (the rule is spelled out in `FakeChatUpstream`'s docstring).

Pure functions of the request body. Documented internal interface: `split_wordish`,
`default_reply`, `prompt_tokens` and `include_usage` are used by `_reply.py`, `unscripted`
by `_upstream.py`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping

from ._script import Script, ScriptedToolCall

_WORDISH = re.compile(r"\s*\S+|\s+")


def split_wordish(text: str) -> list[str]:
    """Split reply text into the small word-ish deltas a script streams."""
    return _WORDISH.findall(text)


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _messages(body: Mapping[str, object]) -> list[Mapping[str, object]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, dict)]


def default_reply(body: Mapping[str, object]) -> str:
    """The reply to a plain chat request: it quotes the last user message."""
    users = [m for m in _messages(body) if m.get("role") == "user"]
    said = " ".join(_content_text(users[-1].get("content")).split()) if users else ""
    if not said:
        return "Hello! I am the local tokenhub upstream. Say something and I will answer."
    if len(said) > 200:
        said = said[:199] + "…"
    words = len(said.split())
    return (
        f'You said: "{said}". That is {words} word{"s" if words != 1 else ""}. '
        "I am a local test upstream, so this reply is deterministic and streams word by word."
    )


# --- the answer to a request no script answers (the rule is in FakeChatUpstream's docstring)


def unscripted(body: Mapping[str, object]) -> Script:
    """The script that answers a chat request when no queued script is left."""
    messages = _messages(body)
    last = messages[-1] if messages else {}
    if last.get("role") == "user":
        call = _tool_call_for(body, _content_text(last.get("content")))
        return Script(tool_calls=[call]) if call is not None else Script()
    if last.get("role") == "tool":
        return Script(text=_tool_results_reply(messages))
    return Script()


def _functions(body: Mapping[str, object]) -> list[Mapping[str, object]]:
    tools = body.get("tools")
    out: list[Mapping[str, object]] = []
    for item in tools if isinstance(tools, list) else []:
        function = item.get("function") if isinstance(item, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            if function["name"]:
                out.append(function)
    return out


_NAME_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_TEXT_WORDS = re.compile(r"\w+")
_NUMBERS = re.compile(r"-?\d+(?:\.\d+)?")


def _tool_call_for(body: Mapping[str, object], said: str) -> ScriptedToolCall | None:
    functions = _functions(body)
    choice = body.get("tool_choice")
    if not functions or choice == "none":
        return None
    chosen = functions[0]
    named = choice.get("function") if isinstance(choice, dict) else None
    said_words = {w.lower() for w in _TEXT_WORDS.findall(said)}
    if isinstance(named, dict) and isinstance(named.get("name"), str):
        chosen = next((f for f in functions if f["name"] == named["name"]), chosen)
    else:
        for function in functions:
            name_words = {w.lower() for w in _NAME_WORDS.findall(str(function["name"]))}
            if name_words & said_words:
                chosen = function
                break
    numbers = iter(_NUMBERS.findall(said))
    words = _TEXT_WORDS.findall(said)
    last_word = words[-1] if words else ""
    arguments = _schema_value(chosen.get("parameters") or {"type": "object"}, last_word, numbers, 0)
    return ScriptedToolCall(name=str(chosen["name"]), arguments=json.dumps(arguments))


def _schema_value(schema: object, word: str, numbers: Iterator[str], depth: int) -> object:
    if not isinstance(schema, dict) or depth > 16:
        return None
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            for branch in branches:
                if isinstance(branch, dict) and branch.get("type") != "null":
                    return _schema_value(branch, word, numbers, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "string":
        return word
    if kind in ("integer", "number"):
        text = next(numbers, "1")
        value = float(text)
        return int(value) if kind == "integer" or value.is_integer() else value
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else []
        return {n: _schema_value(properties.get(n), word, numbers, depth + 1) for n in names}
    return None


def _tool_results_reply(messages: list[Mapping[str, object]]) -> str:
    results: list[Mapping[str, object]] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, message)
    names: dict[str, str] = {}
    asked = messages[-len(results) - 1] if len(messages) > len(results) else {}
    calls = asked.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(call.get("id"), str):
            names[call["id"]] = str(function.get("name"))
    parts = []
    for result in results:
        name = names.get(str(result.get("tool_call_id")), "the tool")
        text = " ".join(_content_text(result.get("content")).split())
        if len(text) > 200:
            text = text[:199] + "…"
        parts.append(f'{name} returned "{text}".')
    return " ".join(parts)


def prompt_tokens(body: Mapping[str, object]) -> int:
    """The prompt's token count as the upstream reports it: its words, at least 1."""
    words = sum(len(_content_text(m.get("content")).split()) for m in _messages(body))
    return max(1, words)


def include_usage(body: Mapping[str, object]) -> bool:
    """Whether the request asked for a usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
