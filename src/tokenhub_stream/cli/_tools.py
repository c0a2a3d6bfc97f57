"""`--tools FILE`: the tools `ask` and `chat` may run, loaded from a Python file or module."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ..tools import Tool, ToolSet

__all__ = ["load_tools"]


def load_tools(spec: str) -> ToolSet:
    """The tools defined by a Python file (`tools.py`) or an importable module (`pkg.mod`).

    The module's `tools` (a `ToolSet` or a list of tools) when it has one, else every
    `@tool` function at its top level, in the order they are defined. The terminal runs
    tools with the sync `Client`, so they must be plain functions.

    Raises:
        ValueError: no such file, no tools in it, or an `async def` tool.
        Exception: whatever running the module raised.
    """
    module = _load(spec)
    found = getattr(module, "tools", None)
    if found is not None:
        tools = ToolSet.coerce(found)
    else:
        tools = ToolSet([v for v in vars(module).values() if isinstance(v, Tool)])
    if not tools:
        raise ValueError(f"{spec} defines no @tool function and no `tools`")
    for item in tools.values():
        if item.is_async:
            raise ValueError(
                f"tool {item.name!r} is an async def; the terminal runs tools with the sync "
                "Client, so write it as a plain def"
            )
    return tools


def _load(spec: str) -> ModuleType:
    path = Path(spec)
    if not (spec.endswith(".py") or path.exists()):
        return importlib.import_module(spec)
    if not path.is_file():
        raise ValueError(f"no such file: {spec}")
    # A name of its own, so the file's dataclasses and pickles find their module, and
    # `if __name__ == "__main__":` in it does not run.
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"_tokenhub_stream_tools_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"cannot load {spec} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
