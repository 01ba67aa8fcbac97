"""The security suite: one regression test per finding of the hostile-tenant review.

Each test names its finding (docs/security.md lists them); every one failed before its fix.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def database_url(module_database_url: str) -> str:
    """One database per module (tests/conftest.py `module_database_url` says why)."""
    return module_database_url
