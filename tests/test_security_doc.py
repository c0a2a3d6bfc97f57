"""docs/security.md names the test behind each guarantee: every named test exists.

A reference is `tests/path.py::test_name`, or `::test_name` for another test of the file
named last before it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "security.md"
_REF = re.compile(r"`(tests/[\w/]+\.py)?::(test_\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_security_page_names_tests_that_exist() -> None:
    text = PAGE.read_text()
    current: Path | None = None
    seen = 0
    missing: list[str] = []
    for match in _REF.finditer(text):
        if match[1]:
            current = ROOT / match[1]
        assert current is not None, f"{match[0]} names no file before it"
        seen += 1
        if not current.exists() or match[2] not in _tests_in(current):
            missing.append(f"{current.relative_to(ROOT)}::{match[2]}")
    assert seen >= 20, "the page should name the test behind each guarantee"
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"
