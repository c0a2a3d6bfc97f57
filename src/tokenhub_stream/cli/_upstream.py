"""Which upstream the commands talk to: token-hub, a given server, or a local one."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import NamedTuple, TextIO

from .._config import DEFAULT_BASE_URL, DEFAULT_MODEL, env_api_key, env_base_url

__all__ = ["ResolvedUpstream", "default_model", "resolve_upstream"]


class ResolvedUpstream(NamedTuple):
    """Where to send requests; unpacks as `(base_url, api_key, local)`."""

    base_url: str
    api_key: str | None
    local: bool


@contextlib.contextmanager
def resolve_upstream(
    base_url: str | None, *, stderr: TextIO | None = None
) -> Iterator[ResolvedUpstream]:
    """Pick the upstream from `base_url` and the environment, for as long as the block runs.

    ```python
    with resolve_upstream(args.base_url) as (base_url, api_key, local):
        client = Client(base_url=base_url, api_key=api_key)
    ```

    - a base URL (`base_url`, else env `TOKENHUB_BASE_URL`): that server, with env
      `TOKENHUB_KEY` if set and no key otherwise (vLLM, Ollama);
    - only `TOKENHUB_KEY`: token-hub's default URL;
    - neither: the local upstream of `tokenhub_stream.testing`, started in-process for
      the block, announced in one line on `stderr`.

    Args:
        base_url: the `--base-url` option, or None.
        stderr: where the one-line notice goes (default `sys.stderr`).

    Returns:
        A context manager yielding an `ResolvedUpstream`; the key is never printed.

    Raises:
        ImportError: the local upstream is needed but uvicorn is missing (the `cli` extra).
        RuntimeError: the local upstream did not start.
    """
    api_key = env_api_key()
    url = base_url or env_base_url()
    if url is not None:
        yield ResolvedUpstream(url.rstrip("/"), api_key, False)
        return
    if api_key is not None:
        yield ResolvedUpstream(DEFAULT_BASE_URL, api_key, False)
        return
    from ..testing import run_upstream

    with run_upstream() as running:
        out = sys.stderr if stderr is None else stderr
        out.write(
            "tokenhub-stream: no TOKENHUB_KEY and no base URL: "
            f"using the local test upstream at {running.base_url}\n"
        )
        out.flush()
        yield ResolvedUpstream(running.base_url, None, True)


def default_model(upstream: ResolvedUpstream) -> str:
    """The model used when none is given: the local upstream's first, else `DEFAULT_MODEL`."""
    if upstream.local:
        from ..testing import DEFAULT_MODELS

        return DEFAULT_MODELS[0]
    return DEFAULT_MODEL
