"""Every test the docs cite exists: docs/security.md's table and the other pages name test
files and tests as proof, and a renamed or deleted test must not leave a claim unbacked."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])
# `tests/x/test_y.py`, `tests/x/test_y.py::test_z[param]`, and `::test_w` after either,
# which names another test of the file cited last.
CITATION = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+)(?:\[[^\]`]*\])?)?`")


def cited(doc: Path) -> list[tuple[str, str | None]]:
    """(file, test or None) for each citation, in order."""
    found: list[tuple[str, str | None]] = []
    last_file: str | None = None
    for match in CITATION.finditer(doc.read_text(encoding="utf-8")):
        file, test = match.groups()
        if file is None and test is None:
            continue
        if file is None:
            assert last_file is not None, f"{doc.name}: `::{test}` follows no test file"
            file = last_file
        last_file = file
        found.append((file, test))
    return found


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_security_md_cites_a_test_in_every_row() -> None:
    rows = [
        line
        for line in (ROOT / "docs" / "security.md").read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and not line.startswith(("| threat", "| ---"))
    ]
    assert rows
    for row in rows:
        assert "`tests/" in row.rsplit("|", 2)[-2], row


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_cited_test_exists(doc: Path) -> None:
    for file, test in cited(doc):
        path = ROOT / file
        assert path.is_file(), f"{doc.name} cites {file}, which does not exist"
        if test is not None:
            assert test in defined_functions(path), f"{doc.name} cites {file}::{test}: no such test"
