"""`tokenhub-stream ask` / `chat` against the local upstream: in-process and as a real
subprocess (pipes, exit codes, SIGINT). Every wait is bounded."""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

import pytest

from tokenhub_stream import DEFAULT_BASE_URL, DEFAULT_MODEL, Client, Timings, Usage
from tokenhub_stream.__main__ import main
from tokenhub_stream.cli import resolve_upstream
from tokenhub_stream.cli._terminal import format_status, run_ask, run_chat
from tokenhub_stream.testing import FakeChatUpstream, RunningUpstream, Script, run_upstream

TIMEOUT = 10.0
LOCAL_LINE = re.compile(
    r"^tokenhub-stream: no TOKENHUB_KEY and no base URL: "
    r"using the local test upstream at http://127\.0\.0\.1:\d+/v1$",
    re.MULTILINE,
)
STATUS_LINE = re.compile(
    r"^(?P<model>\S+) · first token \d+\.\d\d s · \d+\.\d (?:tokens|deltas)/s · "
    r"(?P<reason>\w+) · \d+\+\d+ tokens$",
    re.MULTILINE,
)


def reply_to(said: str) -> str:
    """The local upstream's default answer (see tokenhub_stream.testing)."""
    words = len(said.split())
    return (
        f'You said: "{said}". That is {words} word{"s" if words != 1 else ""}. '
        "I am a local test upstream, so this reply is deterministic and streams word by word."
    )


@pytest.fixture
def upstream() -> Iterator[RunningUpstream]:
    with run_upstream(FakeChatUpstream(delay=0.001)) as running:
        yield running


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOKENHUB_KEY", "TOKENHUB_BASE_URL", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHUB_")}
    env.pop("NO_COLOR", None)
    env.update(extra)
    return env


def _cli(
    *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenhub_stream", *args],
        input=input,
        capture_output=True,
        text=True,
        env=_env() if env is None else env,
        timeout=30,
    )


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- ask, as a subprocess --------------------------------------------------------------


def test_ask_local_upstream_subprocess() -> None:
    result = _cli("ask", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply_to("hello") + "\n"
    assert len(LOCAL_LINE.findall(result.stderr)) == 1
    status = STATUS_LINE.search(result.stderr)
    assert status is not None, result.stderr
    assert status["model"] == "claude-3-5-sonnet-20241022"
    assert status["reason"] == "stop"
    assert " tokens/s " in result.stderr  # usage was asked for, so the rate is in tokens
    assert "\x1b[" not in result.stderr  # stderr is a pipe: no colour


@pytest.mark.parametrize("argv", [["ask"], ["ask", "-"]])
def test_ask_reads_question_from_stdin(upstream: RunningUpstream, argv: list[str]) -> None:
    result = _cli(*argv, "--base-url", upstream.base_url, input="what  is\nup?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply_to("what is up?") + "\n"
    assert upstream.app.requests[-1].json is not None
    messages = upstream.app.requests[-1].json["messages"]
    assert messages == [{"role": "user", "content": "what  is\nup?"}]
    assert LOCAL_LINE.search(result.stderr) is None


def test_ask_scripted_error_exits_1_with_message_on_stderr(upstream: RunningUpstream) -> None:
    error = {"error": {"message": "scripted failure", "type": "invalid_request_error"}}
    upstream.app.enqueue(Script(status=400, error=error))
    result = _cli("ask", "--base-url", upstream.base_url, "hello")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "BadRequestError" in result.stderr
    assert "scripted failure" in result.stderr


def test_ask_error_never_shows_the_key() -> None:
    with run_upstream(FakeChatUpstream(api_key="sk-right", delay=0.001)) as running:
        env = _env(TOKENHUB_KEY="sk-wrong-0123456789")
        result = _cli("ask", "--base-url", running.base_url, "hello", env=env)
    assert result.returncode == 1
    assert "AuthenticationError" in result.stderr
    assert "sk-wrong-0123456789" not in result.stderr + result.stdout


def test_ask_error_after_partial_text_keeps_stdout_text_only(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=["Hel", "lo"], end="cut"))
    result = _cli("ask", "--base-url", upstream.base_url, "hello")
    assert result.returncode == 1
    assert result.stdout == "Hello\n"
    assert "tokenhub-stream: " in result.stderr


def test_ask_base_url_without_key_sends_no_authorization(upstream: RunningUpstream) -> None:
    result = _cli("ask", "--base-url", upstream.base_url, "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout == reply_to("hello") + "\n"
    request = upstream.app.requests[-1]
    assert "authorization" not in request.headers
    assert request.json is not None
    assert request.json["model"] == DEFAULT_MODEL
    assert request.json["stream_options"] == {"include_usage": True}


def test_ask_base_url_from_env(upstream: RunningUpstream) -> None:
    result = _cli("ask", "--model", "gpt-4o", "hi", env=_env(TOKENHUB_BASE_URL=upstream.base_url))
    assert result.returncode == 0, result.stderr
    assert upstream.app.requests[-1].json is not None
    assert upstream.app.requests[-1].json["model"] == "gpt-4o"
    assert "gpt-4o · first token" in result.stderr


# --- SIGINT, as a subprocess -------------------------------------------------------------


class _Reader:
    """Collects a pipe in a thread so a test can wait, bounded, for some text."""

    def __init__(self, pipe: io.BufferedReader | None) -> None:
        assert pipe is not None
        self._pipe = pipe
        self._data = b""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while chunk := os.read(self._pipe.fileno(), 4096):
            with self._changed:
                self._data += chunk
                self._changed.notify_all()

    def join(self) -> None:
        self._thread.join(TIMEOUT)

    @property
    def text(self) -> str:
        with self._changed:
            return self._data.decode("utf-8", "replace")

    def wait_for(self, needle: str, timeout: float = TIMEOUT) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: needle in self._data.decode("utf-8", "replace"), timeout
            )


def _restore_sigint() -> None:
    # A shell may start background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored; the child must get the default KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _popen(args: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenhub_stream", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        preexec_fn=_restore_sigint,
    )


@contextlib.contextmanager
def _spawn(args: Sequence[str]) -> Iterator[tuple[subprocess.Popen[bytes], _Reader, _Reader]]:
    proc = _popen(args)
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)  # type: ignore[arg-type]
    try:
        yield proc, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(TIMEOUT)
        out.join()  # EOF reached: the pipes can be closed now
        err.join()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_chat_ctrl_c_stops_answer_closes_upstream_and_keeps_partial(
    upstream: RunningUpstream,
) -> None:
    upstream.app.enqueue(Script(deltas=["partial ", "answer"], end="stall"))
    with _spawn(["chat", "--base-url", upstream.base_url, "--model", "gpt-4o"]) as (proc, out, err):
        assert proc.stdin is not None
        proc.stdin.write(b"first question\n")
        proc.stdin.flush()
        assert out.wait_for("partial answer"), (out.text, err.text)
        proc.send_signal(signal.SIGINT)
        assert upstream.app.requests[-1].wait_disconnected(1.0)
        assert err.wait_for("interrupted"), err.text
        assert proc.poll() is None  # back at the prompt, not gone

        proc.stdin.write(b"second question\n")
        proc.stdin.flush()
        assert upstream.app.wait_for_requests(2, TIMEOUT)
        assert out.wait_for(reply_to("second question")), out.text
        second = upstream.app.requests[1].json
        assert second is not None
        assert second["messages"] == [
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "partial answer"},
            {"role": "user", "content": "second question"},
        ]
        proc.stdin.close()  # Ctrl-D
        assert proc.wait(TIMEOUT) == 0
        assert "Traceback" not in err.text


def test_ask_ctrl_c_exits_130_and_closes_upstream(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=["thinking"], end="stall"))
    with _spawn(["ask", "--base-url", upstream.base_url, "hello"]) as (proc, out, err):
        assert out.wait_for("thinking"), err.text
        proc.send_signal(signal.SIGINT)
        assert upstream.app.requests[-1].wait_disconnected(1.0)
        assert proc.wait(TIMEOUT) == 130
        assert err.wait_for("interrupted")
        assert "Traceback" not in err.text


# --- chat, in-process ----------------------------------------------------------------------


def _chat(
    running: RunningUpstream,
    lines: str,
    *,
    model: str = "gpt-4o",
    system: str | None = None,
) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with Client(base_url=running.base_url, api_key=None) as client:
        code = run_chat(
            client,
            model=model,
            system=system,
            stdin=io.StringIO(lines),
            stdout=stdout,
            stderr=stderr,
        )
    return code, stdout.getvalue(), stderr.getvalue()


def test_chat_two_turns_keep_history_and_model_switch(upstream: RunningUpstream) -> None:
    code, out, err = _chat(
        upstream,
        "hello\n\n/model gpt-4o-mini\n/model\nagain please\n",
        system="Be brief.",
    )
    assert code == 0
    assert out == reply_to("hello") + "\n" + reply_to("again please") + "\n"
    first, second = (r.json for r in upstream.app.requests)
    assert first is not None and second is not None
    assert first["model"] == "gpt-4o"
    assert second["model"] == "gpt-4o-mini"
    assert second["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": reply_to("hello")},
        {"role": "user", "content": "again please"},
    ]
    assert err.count("model: gpt-4o-mini\n") == 2  # switched, then shown
    assert [m["model"] for m in STATUS_LINE.finditer(err)] == ["gpt-4o", "gpt-4o-mini"]


def test_chat_failed_turn_is_dropped_and_partial_kept(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(status=400), Script(deltas=["Hal", "f"], end="cut"))
    code, out, err = _chat(upstream, "one\ntwo\nthree\n")
    assert code == 0
    assert err.count("BadRequestError") == 1
    assert "TruncatedStreamError" in err or "TransportError" in err
    assert out.startswith("Half\n")
    third = upstream.app.requests[2].json
    assert third is not None
    assert third["messages"] == [
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "Half"},
        {"role": "user", "content": "three"},
    ]


def test_chat_commands_help_unknown_quit(upstream: RunningUpstream) -> None:
    code, out, err = _chat(upstream, "/help\n/nope\n/quit\nnever sent\n")
    assert code == 0
    assert out == ""
    assert "/model NAME" in err
    assert "unknown command /nope" in err
    assert upstream.app.requests == []


def test_chat_interactive_ctrl_c_at_prompt_clears_line_and_eof_exits(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str | BaseException] = [KeyboardInterrupt(), "hi", EOFError()]
    prompts: list[str] = []

    def fake_input(prompt: str = "") -> str:
        prompts.append(prompt)
        event = events.pop(0)
        if isinstance(event, BaseException):
            raise event
        return event

    monkeypatch.setattr(builtins, "input", fake_input)
    stdout, stderr = io.StringIO(), io.StringIO()
    with Client(base_url=upstream.base_url) as client:
        code = run_chat(
            client,
            model="gpt-4o",
            system=None,
            stdin=io.StringIO(),
            stdout=stdout,
            stderr=stderr,
            interactive=True,
        )
    assert code == 0
    assert prompts == ["> "] * 3
    assert stdout.getvalue() == "\n" + reply_to("hi") + "\n\n"


def test_chat_main_reads_stdin(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hey\n"))
    assert main(["chat", "--base-url", upstream.base_url, "--system", "S"]) == 0
    captured = capsys.readouterr()
    assert captured.out == reply_to("hey") + "\n"
    assert f"chatting with {DEFAULT_MODEL} at {upstream.base_url}" in captured.err
    request = upstream.app.requests[-1].json
    assert request is not None
    assert request["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hey"},
    ]


# --- ask, in-process -------------------------------------------------------------------------


def test_ask_main_local_upstream(clean_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ask", "hello"]) == 0
    captured = capsys.readouterr()
    assert captured.out == reply_to("hello") + "\n"
    assert len(LOCAL_LINE.findall(captured.err)) == 1
    assert "claude-3-5-sonnet-20241022 · first token" in captured.err


def test_ask_main_empty_question_is_a_usage_error(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("  \n"))
    assert main(["ask"]) == 2
    assert "no question" in capsys.readouterr().err


def test_ask_status_line_is_dim_on_a_tty_unless_no_color(
    upstream: RunningUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    with Client(base_url=upstream.base_url) as client:
        stdout, stderr = io.StringIO(), _Tty()
        assert run_ask(client, "hi", model="m", system=None, stdout=stdout, stderr=stderr) == 0
        assert stderr.getvalue().startswith("\x1b[2mm · first token ")
        assert stderr.getvalue().endswith("\x1b[0m\n")
        assert "\x1b[" not in stdout.getvalue()

        monkeypatch.setenv("NO_COLOR", "1")
        stderr = _Tty()
        assert run_ask(client, "hi", model="m", system=None, stdout=stdout, stderr=stderr) == 0
        assert "\x1b[" not in stderr.getvalue()


# --- pieces ---------------------------------------------------------------------------------


def test_format_status_full_and_sparse() -> None:
    timings = Timings(time_to_first_token=0.214, total=1.5, rate=48.26, rate_unit="tokens/s")
    usage = Usage(prompt_tokens=12, completion_tokens=57, total_tokens=69)
    line = format_status("gpt-4o", timings, "stop", usage)
    assert line == "gpt-4o · first token 0.21 s · 48.3 tokens/s · stop · 12+57 tokens"
    assert format_status("m", Timings(), None, None) == "m"
    assert (
        format_status("m", Timings(rate=3.0, rate_unit="deltas/s"), "length", Usage(total_tokens=9))
        == "m · 3.0 deltas/s · length · 9 tokens"
    )


def test_resolve_upstream_rules(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with resolve_upstream("http://localhost:11434/v1/") as (url, key, local):
        assert (url, key, local) == ("http://localhost:11434/v1", None, False)
    monkeypatch.setenv("TOKENHUB_KEY", "sk-x")
    with resolve_upstream(None) as (url, key, local):
        assert (url, key, local) == (DEFAULT_BASE_URL, "sk-x", False)
    monkeypatch.setenv("TOKENHUB_BASE_URL", "http://env.example/v1")
    with resolve_upstream(None) as (url, key, local):
        assert (url, key, local) == ("http://env.example/v1", "sk-x", False)
    monkeypatch.delenv("TOKENHUB_KEY")
    monkeypatch.delenv("TOKENHUB_BASE_URL")
    notice = io.StringIO()
    with resolve_upstream(None, stderr=notice) as (url, key, local):
        assert local and key is None and url.startswith("http://127.0.0.1:")
    assert LOCAL_LINE.fullmatch(notice.getvalue().rstrip("\n"))


def test_main_usage_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("tokenhub-stream ")


def test_serve_passes_options_to_run_serve(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, object]] = []

    def fake_run_serve(
        *,
        host: str,
        port: int,
        base_url: str | None,
        api_key: str | None,
        model: str | None,
        store_url: str | None,
        history: bool,
        allowed_hosts: list[str],
        require_token: bool,
    ) -> int:
        calls.append(
            {"host": host, "port": port, "base_url": base_url, "api_key": api_key, "model": model}
        )
        assert (store_url, history) == (None, True)  # the store flags: test_serve_history.py
        assert (allowed_hosts, require_token) == ([], False)  # test_issue_14_hosts.py
        return 0

    monkeypatch.setattr("tokenhub_stream.cli._serve.run_serve", fake_run_serve)
    monkeypatch.setenv("TOKENHUB_KEY", "sk-x")
    assert main(["serve", "--port", "0", "--model", "gpt-4o"]) == 0
    assert main(["serve", "--host", "0.0.0.0", "--base-url", "http://h/v1"]) == 0
    assert calls == [
        {"host": "127.0.0.1", "port": 0, "base_url": None, "api_key": "sk-x", "model": "gpt-4o"},
        {
            "host": "0.0.0.0",
            "port": 8000,
            "base_url": "http://h/v1",
            "api_key": "sk-x",
            "model": None,
        },
    ]


def test_serve_missing_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tokenhub_stream.cli._serve", None)
    assert main(["serve"]) == 2
    assert "pip install 'tokenhub_stream[cli]'" in capsys.readouterr().err


class _InterruptingWrite(io.StringIO):
    """A stream whose first write containing `needle` raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, needle: str) -> None:
        super().__init__()
        self._needle: str | None = needle

    def write(self, text: str) -> int:
        if self._needle is not None and self._needle in text:
            self._needle = None
            raise KeyboardInterrupt
        return super().write(text)


def test_ask_ctrl_c_in_process_closes_upstream(upstream: RunningUpstream) -> None:
    upstream.app.enqueue(Script(deltas=["one", " two", " three"], end="stall"))
    stdout, stderr = _InterruptingWrite(" two"), io.StringIO()
    with Client(base_url=upstream.base_url) as client:
        code = run_ask(client, "hi", model="m", system=None, stdout=stdout, stderr=stderr)
    assert code == 130
    assert upstream.app.requests[-1].wait_disconnected(1.0)
    assert stdout.getvalue() == "one\n"
    assert stderr.getvalue().startswith("m · first token ")
    assert "interrupted" in stderr.getvalue()


def test_chat_second_ctrl_c_during_status_line_keeps_chat_alive(
    upstream: RunningUpstream,
) -> None:
    stdout, stderr = io.StringIO(), _InterruptingWrite(" · ")
    with Client(base_url=upstream.base_url) as client:
        code = run_chat(
            client,
            model="m",
            system=None,
            stdin=io.StringIO("first\nsecond\n"),
            stdout=stdout,
            stderr=stderr,
        )
    assert code == 0
    second = upstream.app.requests[1].json
    assert second is not None
    assert second["messages"] == [{"role": "user", "content": "second"}]


def test_main_ctrl_c_outside_a_stream_exits_130(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Stdin(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", _Stdin())
    assert main(["ask"]) == 130


@pytest.mark.parametrize("command", [["ask", "hi"], ["chat"]])
def test_main_without_uvicorn_names_the_extra(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(command) == 2
    assert "pip install 'tokenhub_stream[cli]'" in capsys.readouterr().err


def test_serve_import_error_from_run_serve(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fake_run_serve(**kwargs: object) -> int:
        raise ImportError("tokenhub-stream serve needs uvicorn: pip install x")

    monkeypatch.setattr("tokenhub_stream.cli._serve.run_serve", fake_run_serve)
    assert main(["serve"]) == 2
    assert "serve needs uvicorn" in capsys.readouterr().err


def test_ask_closed_stdout_pipe_exits_quietly(upstream: RunningUpstream) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenhub_stream", "ask", "--base-url", upstream.base_url, "hi"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -c 0`: the reader is gone
    try:
        assert proc.wait(TIMEOUT) == 1
        assert b"Traceback" not in proc.stderr.read()  # a few lines: the pipe never filled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        proc.stderr.close()
