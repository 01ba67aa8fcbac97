"""docs/configuration.md is generated from the services' settings classes; it cannot drift."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gen_config_docs.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_config_docs", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_committed_page_is_what_the_script_writes() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_variable_a_service_reads_is_found_with_its_default_and_readers() -> None:
    found = _generator().read_variables()
    assert found["IMGPIPE_DATABASE_URL"].required
    assert found["IMGPIPE_WORKER_CONCURRENCY"].defaults == {"worker": 64}
    assert found["IMGPIPE_WORKER_CONCURRENCY"].rule == "an integer ≥ 1"
    # Read only with s3:// storage, and straight from the mapping: both are found.
    assert "AWS_ACCESS_KEY_ID" in found
    assert found["IMGPIPE_API_KEYS"].services == ["gateway", "ingest", "status"]
    assert found["IMGPIPE_GRPC_LISTEN"].defaults == {
        "ingest": "127.0.0.1:50051",
        "status": "127.0.0.1:50052",
        "worker": "127.0.0.1:50061",
    }


def test_a_variable_without_a_meaning_stops_the_script(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = _generator()
    meanings = dict(generator.MEANINGS)
    del meanings["IMGPIPE_MAX_ROWS"]
    meanings["IMGPIPE_NO_SUCH_SETTING"] = generator.Meaning("gone")
    monkeypatch.setattr(generator, "MEANINGS", meanings)
    with pytest.raises(SystemExit, match="read but not explained: IMGPIPE_MAX_ROWS") as stopped:
        generator.render(generator.read_variables())
    assert "explained but not read: IMGPIPE_NO_SUCH_SETTING" in str(stopped.value)


def test_defaults_are_shown_as_operators_write_them() -> None:
    generator = _generator()
    assert generator.show_default(10 / 60, "a rate") == "`10/min`"
    assert generator.show_default(20.0, "a rate") == "`20/s`"
    assert generator.show_default(50 * 1024 * 1024) == "`52428800` (50 MiB)"
    assert generator.show_default(frozenset({443, 80})) == "`80,443`"
    assert generator.show_default("") == "—"
    assert generator.show_default(True) == "`on`"
