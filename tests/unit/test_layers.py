"""The layers hold: services/common is a kernel that imports nothing above it, and the gateway
loads neither Pillow nor numpy nor a database driver."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "services" / "common"
# What the kernel must not import: the services, the local stack and the gateway sit above it.
ABOVE = (
    "gateway",
    "services.ingest",
    "services.worker",
    "services.status",
    "services.local",
)
# What the gateway has no use for: image work is the worker's, Postgres and Redis the services'.
NOT_IN_GATEWAY = ("PIL", "asyncpg", "redis", "numpy")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports by absolute name, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def is_above(module: str) -> bool:
    return any(module == top or module.startswith(top + ".") for top in ABOVE)


def test_the_kernel_imports_nothing_above_it() -> None:
    modules = sorted(KERNEL.rglob("*.py"))
    assert len(modules) > 20  # the walk found the kernel
    upward = {
        f"{path.relative_to(ROOT)} imports {module}"
        for path in modules
        for module in imported_modules(path)
        if is_above(module)
    }
    assert not upward, sorted(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "leaky.py"
    module.write_text("def f() -> None:\n    from services.worker.imaging import compress\n")
    assert any(is_above(name) for name in imported_modules(module))


@pytest.mark.parametrize("entry", ["gateway.app", "gateway.__main__"])
def test_the_gateway_loads_no_image_or_database_library(entry: str) -> None:
    # A fresh interpreter: this one has loaded them all for other tests.
    probe = (
        f"import sys, {entry}\n"
        f"print(' '.join(m for m in {NOT_IN_GATEWAY!r} if m in sys.modules))\n"
        "import services.worker.imaging\n"  # the probe itself can see them load
        f"print(' '.join(m for m in {NOT_IN_GATEWAY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    gateway_loaded, after_worker = result.stdout.splitlines()
    assert gateway_loaded == ""
    assert after_worker.split() == ["PIL", "numpy"]
