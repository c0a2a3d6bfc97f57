"""The `tokenhub-stream` command line: `chat`, `ask` and `serve`.

```sh
tokenhub-stream ask "Why is the sky blue?"
tokenhub-stream chat --model gpt-4o --system "Be brief."
tokenhub-stream chat --tools examples/terminal_tools.py
tokenhub-stream serve --port 8000
```

The key comes from env `TOKENHUB_KEY` only (never a flag, never printed); see
`resolve_upstream` for how the upstream is chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from ..__version__ import __version__
from .._config import env_api_key
from .._sync_client import Client
from ..tools import ToolSet
from ._terminal import EXIT_INTERRUPTED, EXIT_USAGE, run_ask, run_chat
from ._upstream import ResolvedUpstream, default_model, resolve_upstream

__all__ = ["ResolvedUpstream", "build_parser", "default_model", "main", "resolve_upstream"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `tokenhub-stream`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        help="the model (default: the local upstream's first model, else DEFAULT_MODEL)",
    )
    common.add_argument(
        "--base-url",
        help="an OpenAI-compatible base URL, e.g. http://localhost:11434/v1 "
        "(default: env TOKENHUB_BASE_URL, else token-hub if TOKENHUB_KEY is set, "
        "else a local test upstream)",
    )
    system = argparse.ArgumentParser(add_help=False)
    system.add_argument("--system", help="a system prompt")
    system.add_argument(
        "--tools",
        metavar="FILE",
        help="a Python file (or module) whose @tool functions the model may call; "
        "calls and results are shown on stderr",
    )

    parser = argparse.ArgumentParser(
        prog="tokenhub-stream",
        description="Stream chat completions from token-hub or any OpenAI-compatible server. "
        "The API key is read from env TOKENHUB_KEY.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "chat",
        parents=[common, system],
        help="an interactive chat in the terminal",
        description="An interactive chat. /model NAME switches model; Ctrl-C stops an "
        "answer; Ctrl-D quits.",
    )
    ask = commands.add_parser(
        "ask",
        parents=[common, system],
        help="answer one question (stdout: the answer only)",
        description="Answer one question. Only the answer goes to stdout; the status "
        "line and errors go to stderr. Exit 1 on an upstream error, 130 on Ctrl-C.",
    )
    ask.add_argument("question", nargs="?", help="the question; '-' or none reads stdin")
    serve = commands.add_parser(
        "serve", parents=[common], help="the browser chat", description="Serve the chat page."
    )
    serve.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="default 8000")
    serve.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address browsers may reach the page as, beside localhost, "
        "127.0.0.1, [::1] and --host (repeatable; *.example.com for subdomains); "
        "other Host headers get 400",
    )
    serve.add_argument(
        "--require-token",
        action="store_true",
        help="require a token on every request (env TOKENHUB_SERVE_TOKEN, else a random "
        "one); the printed URL carries it. A set TOKENHUB_SERVE_TOKEN requires it anyway",
    )
    store = serve.add_mutually_exclusive_group()
    store.add_argument(
        "--store-url",
        help="where to keep the conversations, a SQLAlchemy URL (default: env "
        "TOKENHUB_STORE_URL, else ~/.local/share/tokenhub_stream/conversations.db)",
    )
    store.add_argument(
        "--no-store", action="store_true", help="keep no history (the page shows none)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `tokenhub-stream` with `argv` (default `sys.argv[1:]`).

    Returns:
        The exit status: 0 ok, 1 upstream error, 2 usage error, 130 Ctrl-C.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "ask":
            return _cmd_ask(args)
        return _cmd_chat(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep the interpreter's
        # final flush from raising again (Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _error(message: str) -> int:
    sys.stderr.write(f"tokenhub-stream: {message}\n")
    return EXIT_USAGE


def _tools_option(spec: str | None) -> ToolSet | None:
    if spec is None:
        return None
    from ._tools import load_tools

    return load_tools(spec)


def _cmd_ask(args: argparse.Namespace) -> int:
    question: str | None = args.question
    if question is None or question == "-":
        question = sys.stdin.read()
    question = question.strip()
    if not question:
        return _error("no question (give it as an argument or on stdin)")
    return _in_terminal(
        args,
        lambda client, model, tools: run_ask(
            client,
            question,
            model=model,
            system=args.system,
            stdout=sys.stdout,
            stderr=sys.stderr,
            tools=tools,
        ),
    )


def _cmd_chat(args: argparse.Namespace) -> int:
    return _in_terminal(
        args,
        lambda client, model, tools: run_chat(
            client,
            model=model,
            system=args.system,
            stdin=sys.stdin,
            stdout=sys.stdout,
            stderr=sys.stderr,
            interactive=sys.stdin.isatty(),
            tools=tools,
        ),
    )


def _in_terminal(
    args: argparse.Namespace, run: Callable[[Client, str, ToolSet | None], int]
) -> int:
    """What `ask` and `chat` share: load `--tools`, pick the upstream and the model, open
    a client, then `run(client, model, tools)`."""
    try:
        tools = _tools_option(args.tools)
    except Exception as exc:  # the file is the user's code: say what it raised
        return _error(f"--tools {args.tools}: {type(exc).__name__}: {exc}")
    with contextlib.ExitStack() as stack:
        try:
            upstream = stack.enter_context(resolve_upstream(args.base_url))
        except ImportError as exc:
            return _error(str(exc))
        model = args.model or default_model(upstream)
        client = stack.enter_context(_client(upstream, model))
        return run(client, model, tools)
    raise AssertionError("unreachable")  # pragma: no cover  (ExitStack may swallow)


def _client(upstream: ResolvedUpstream, model: str) -> Client:
    return Client(base_url=upstream.base_url, api_key=upstream.api_key, model=model)


def _cmd_serve(args: argparse.Namespace) -> int:
    # Imported lazily: it needs the `cli` extra (starlette, uvicorn). run_serve applies
    # the same upstream rule as resolve_upstream and keeps a local upstream running.
    try:
        from ._serve import run_serve
    except ImportError as exc:
        return _error(
            f"serve is not available ({exc}); install it with: pip install 'tokenhub_stream[cli]'"
        )
    try:
        return run_serve(
            host=args.host,
            port=args.port,
            base_url=args.base_url,
            api_key=env_api_key(),
            model=args.model,
            store_url=args.store_url,
            history=not args.no_store,
            allowed_hosts=args.allowed_host,
            require_token=args.require_token,
        )
    except (ImportError, ValueError) as exc:
        return _error(str(exc))


def __getattr__(name: str) -> type[ResolvedUpstream]:
    # `Upstream` clashed with the proxy's `Upstream` protocol; the old name stays for one
    # release, with a warning, and then goes.
    if name == "Upstream":
        warnings.warn(
            "tokenhub_stream.cli.Upstream is deprecated; use ResolvedUpstream",
            DeprecationWarning,
            stacklevel=2,
        )
        return ResolvedUpstream
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
