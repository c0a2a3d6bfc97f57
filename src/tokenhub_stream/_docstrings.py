"""Google-style docstrings read for descriptions: a tool's summary and argument texts, and
the `Attributes:` of a model, dataclass or TypedDict (#19). Stdlib only.

Internal interface: `parse_docstring`, used by `tools/_tool.py` (a tool's description),
`tools/_schema.py` (its arguments) and `_pydantic.py` (the fields of a class).
"""

from __future__ import annotations

import re

__all__ = ["parse_docstring"]

_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
_PARAM_SECTIONS = {"args", "arguments", "parameters", "params", "attributes", "keyword args"}
_ENTRY = re.compile(r"^\*{0,2}(?P<name>\w+)\s*(?:\([^)]*\))?\s*:\s*(?P<text>.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The text before the first Google-style section, and the Args/Attributes entries.

    Args:
        doc: a docstring, cleaned (`inspect.cleandoc`), or None.

    Returns:
        The summary (paragraphs joined, each on one line) and the entries by name.
    """
    if not doc:
        return "", {}
    lines = doc.splitlines()
    intro: list[str] = []
    entries: dict[str, str] = {}
    section: str | None = None
    entry_indent: int | None = None
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        header = _SECTION.match(line)  # sections start at column 0 of the cleaned docstring
        if header:
            section, entry_indent, current = header[1].lower(), None, None
            continue
        if section is None:
            intro.append(stripped)
            continue
        if section not in _PARAM_SECTIONS or not stripped:
            continue
        if entry_indent is None:
            entry_indent = indent
        match = _ENTRY.match(stripped) if indent <= entry_indent else None
        if match:
            current = match["name"]
            entries[current] = match["text"].strip()
        elif current is not None:
            entries[current] = f"{entries[current]} {stripped}".strip()
    paragraphs = " ".join(s if s else "\n\n" for s in intro).split("\n\n")
    summary = "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
    return summary, entries
