"""The request lifecycle suite (issue 13, docs/lifecycle.md): list, cancel, delete and retention
through the real stack. Every test here is marked `lifecycle` and `e2e`."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import image_origin, origin_stack, stack_factory

__all__ = ["image_origin", "origin_stack", "stack_factory"]


@pytest.fixture(scope="module")
def database_url(module_database_url: str) -> str:
    """One database per module (tests/conftest.py `module_database_url` says why)."""
    return module_database_url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/lifecycle/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)  # `lifecycle` comes by folder (tests/conftest.py)
