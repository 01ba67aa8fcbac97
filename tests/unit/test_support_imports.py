"""The benchmarks and the test-support package stand on their own: neither imports the test
suite (tests/), which would make the suite a library and load it into every benchmark run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from testing.stack import ROOT

CHECKED = sorted([*(ROOT / "bench").glob("*.py"), *(ROOT / "testing").glob("*.py")])


def imported_modules(source: str) -> list[str]:
    """Every module an `import` or `from ... import` statement names, anywhere in the file."""
    modules: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.append(node.module)
    return modules


def imports_tests(module: str) -> bool:
    return module == "tests" or module.startswith("tests.")


def test_the_checked_folders_are_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in CHECKED}
    assert {"bench/__main__.py", "testing/polling.py", "testing/stack.py"} <= names


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_does_not_import_the_test_suite(path: Path) -> None:
    found = [m for m in imported_modules(path.read_text()) if imports_tests(m)]
    assert not found, f"{path.relative_to(ROOT)} imports {found}: move what it needs to testing/"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import tests.stack", True),
        ("from tests import photos", True),
        ("from tests.fault.harness import submit", True),
        ("def f() -> None:\n    from tests.support import wait_until", True),
        ("from testing import photos", False),
        ("import testing.stack", False),
        ("from . import tests", False),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, expected: bool) -> None:
    assert any(imports_tests(m) for m in imported_modules(source)) is expected
