"""`tokenhub-stream ask` and `tokenhub-stream chat`: streaming answers in a terminal.

Both use the sync `Client` on purpose: the terminal blocks on `input()` anyway, and a
Ctrl-C is a `KeyboardInterrupt` raised where the main thread is, which inside
`with client.stream_chat(...)` closes the upstream connection at once. No event loop has
to be taught to turn SIGINT into the cancellation of one answer only.

stdout carries only answer text; prompts, notices, errors and the status line go to
stderr, so `ask` can be piped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from .._exceptions import TokenHubError
from .._models import ContentDelta, Timings, Usage, add_usage
from .._sync_client import Client
from ..tools import ToolCallStarted, ToolResult, ToolSet, TurnFinished

__all__ = [
    "Answer",
    "format_status",
    "run_ask",
    "run_chat",
    "stream_answer",
    "stream_tool_answer",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

_HELP = (
    "/model NAME  switch model (the conversation is kept)\n"
    "/model       show the current model\n"
    "/help        this help\n"
    "/quit        leave (or Ctrl-D)\n"
    "Ctrl-C stops an answer and keeps what arrived; at the prompt it clears the line.\n"
)


def format_status(
    model: str,
    timings: Timings,
    finish_reason: str | None,
    usage: Usage | None,
    turns: int | None = None,
) -> str:
    """The status line shown after an answer, e.g.
    `gpt-4o · first token 0.21 s · 48.3 tokens/s · stop · 12+57 tokens`
    (`gpt-4o · 2 turns · stop · 30+12 tokens` after a tool loop)."""
    parts = [model]
    if turns is not None:
        parts.append(f"{turns} turn{'s' if turns != 1 else ''}")
    if timings.time_to_first_token is not None:
        parts.append(f"first token {timings.time_to_first_token:.2f} s")
    if timings.rate is not None and timings.rate_unit is not None:
        parts.append(f"{timings.rate:.1f} {timings.rate_unit}")
    if finish_reason:
        parts.append(finish_reason)
    if usage is not None:
        if usage.prompt_tokens is not None and usage.completion_tokens is not None:
            parts.append(f"{usage.prompt_tokens}+{usage.completion_tokens} tokens")
        elif usage.total_tokens is not None:
            parts.append(f"{usage.total_tokens} tokens")
    return " · ".join(parts)


def _dim(text: str, stream: TextIO) -> str:
    # https://no-color.org: a non-empty NO_COLOR turns colour off; never colour a pipe.
    if os.environ.get("NO_COLOR") or not stream.isatty():
        return text
    return f"\x1b[2m{text}\x1b[0m"


@dataclass(frozen=True, slots=True)
class Answer:
    """What one streamed answer produced: its text (partial if it was cut short)."""

    text: str
    error: TokenHubError | None = None
    interrupted: bool = False


def stream_answer(
    client: Client,
    messages: list[Mapping[str, object]],
    *,
    model: str,
    stdout: TextIO,
    stderr: TextIO,
) -> Answer:
    """Stream one answer to `stdout` token by token, then the status line (or the
    error) to `stderr`. Ctrl-C stops it: the upstream connection is closed on the way
    out of the `with` block and the text received so far is returned."""
    parts: list[str] = []
    error: TokenHubError | None = None
    interrupted = False
    stream = client.stream_chat(messages, model=model, include_usage=True)
    try:
        with stream:
            for text in stream:
                parts.append(text)
                stdout.write(text)
                stdout.flush()
    except TokenHubError as exc:
        error = exc
    except KeyboardInterrupt:
        interrupted = True
    answer = Answer("".join(parts), error, interrupted)
    reason = "interrupted" if interrupted else stream.finish_reason
    status = format_status(model, stream.timings, reason, stream.usage)
    _end(answer, status, stdout=stdout, stderr=stderr)
    return answer


def _end(answer: Answer, status: str, *, stdout: TextIO, stderr: TextIO) -> None:
    """After an answer: the newline that ends its text, then its error, else `status`."""
    if answer.text or answer.error is None:
        stdout.write("\n")
        stdout.flush()
    if answer.error is not None:
        # Messages never contain the key: the client redacts it (STYLE.md section 5).
        stderr.write(f"tokenhub-stream: {type(answer.error).__name__}: {answer.error}\n")
    else:
        stderr.write(_dim(status, stderr) + "\n")
    stderr.flush()


def stream_tool_answer(
    client: Client,
    messages: list[Mapping[str, object]],
    tools: ToolSet,
    *,
    model: str,
    stdout: TextIO,
    stderr: TextIO,
) -> tuple[Answer, list[dict[str, object]]]:
    """`stream_answer` with a tool loop: the text of every turn streams to `stdout`; each
    call and its result go to `stderr` as `[tool] name(arguments)` and `[tool] name
    returned: output`; the status line counts the turns and sums the usage.

    Returns:
        The answer, and the conversation after it (the tool calls and results included)
        when the loop ended normally, else `[]`.
    """
    parts: list[str] = []
    error: TokenHubError | None = None
    interrupted = False
    usage: Usage | None = None
    reason: str | None = None
    loop = client.run_tools(list(messages), tools=tools, model=model, include_usage=True)
    try:
        with loop:
            for event in loop:
                if isinstance(event, ContentDelta):
                    parts.append(event.text)
                    stdout.write(event.text)
                    stdout.flush()
                elif isinstance(event, ToolCallStarted):
                    call = event.call
                    stderr.write(_dim(f"[tool] {call.name}({call.arguments})", stderr) + "\n")
                    stderr.flush()
                elif isinstance(event, ToolResult):
                    verb = "failed" if event.error else "returned"
                    line = f"[tool] {event.call.name} {verb}: {event.output}"
                    stderr.write(_dim(line, stderr) + "\n")
                    stderr.flush()
                elif isinstance(event, TurnFinished):
                    usage = add_usage(usage, event.usage)
                    reason = event.message.finish_reason
    except TokenHubError as exc:
        error = exc
    except KeyboardInterrupt:
        interrupted = True
    answer = Answer("".join(parts), error, interrupted)
    reason = "interrupted" if interrupted else reason
    status = format_status(model, Timings(), reason, usage, turns=loop.turns)
    _end(answer, status, stdout=stdout, stderr=stderr)
    done = error is None and not interrupted
    return answer, (loop.messages if done else [])


def _answer(
    client: Client,
    messages: list[Mapping[str, object]],
    tools: ToolSet | None,
    *,
    model: str,
    stdout: TextIO,
    stderr: TextIO,
) -> tuple[Answer, list[dict[str, object]]]:
    if tools is None:
        answer = stream_answer(client, messages, model=model, stdout=stdout, stderr=stderr)
        return answer, []
    return stream_tool_answer(client, messages, tools, model=model, stdout=stdout, stderr=stderr)


def _start(system: str | None) -> list[Mapping[str, object]]:
    return [{"role": "system", "content": system}] if system else []


def run_ask(
    client: Client,
    question: str,
    *,
    model: str,
    system: str | None,
    stdout: TextIO,
    stderr: TextIO,
    tools: ToolSet | None = None,
) -> int:
    """Answer one question: only the answer text (and a final newline) on `stdout`.

    Args:
        tools: run these tools when the model asks for them (`--tools`).

    Returns:
        0, 1 on any `TokenHubError` (message on `stderr`), 130 on Ctrl-C.
    """
    messages = [*_start(system), {"role": "user", "content": question}]
    answer, _ = _answer(client, messages, tools, model=model, stdout=stdout, stderr=stderr)
    if answer.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if answer.error is None else EXIT_ERROR


def _read_line(stdin: TextIO, interactive: bool) -> str:
    if interactive:
        # input() gives line editing (readline) and writes its prompt to stdout.
        return input("> ")
    line = stdin.readline()
    if not line:
        raise EOFError
    return line


def run_chat(
    client: Client,
    *,
    model: str,
    system: str | None,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    interactive: bool = False,
    tools: ToolSet | None = None,
) -> int:
    """An interactive chat: each line is a user turn, each answer streams to `stdout`.

    The conversation is kept (the optional system prompt first). Ctrl-C during an answer
    stops it and keeps the partial text as the assistant turn; a turn that got no text
    at all (stopped early or failed) is dropped, so the history never holds an empty
    assistant message. Ctrl-C at the prompt clears the line; Ctrl-D (EOF) or `/quit`
    leaves.

    Args:
        interactive: read with `input()` (prompt, line editing) instead of
            `stdin.readline()`; for a terminal.
        tools: run these tools when the model asks for them (`--tools`); a turn that
            ends normally keeps its tool calls and results in the conversation.

    Returns:
        0 when the user leaves.
    """
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() then has line editing and history)
    messages = _start(system)
    banner = f"chatting with {model} at {client.base_url}; /help for commands, Ctrl-D quits"
    stderr.write(_dim(banner, stderr) + "\n")
    stderr.flush()
    while True:
        try:
            line = _read_line(stdin, interactive).strip()
        except KeyboardInterrupt:
            stdout.write("\n")
            stdout.flush()
            continue
        except EOFError:
            if interactive:
                stdout.write("\n")
                stdout.flush()
            return EXIT_OK
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            argument = argument.strip()
            if command == "/model":
                if argument:
                    model = argument
                stderr.write(f"model: {model}\n")
            elif command in ("/quit", "/exit"):
                return EXIT_OK
            elif command == "/help":
                stderr.write(_HELP)
            else:
                stderr.write(f"unknown command {command} (/help lists them)\n")
            stderr.flush()
            continue
        messages.append({"role": "user", "content": line})
        conversation: list[dict[str, object]] = []
        try:
            answer, conversation = _answer(
                client, messages, tools, model=model, stdout=stdout, stderr=stderr
            )
        except KeyboardInterrupt:  # a second Ctrl-C while the status line was written
            answer = Answer("", interrupted=True)
        if conversation:
            messages[:] = conversation
        elif answer.text:
            messages.append({"role": "assistant", "content": answer.text})
        else:
            messages.pop()
