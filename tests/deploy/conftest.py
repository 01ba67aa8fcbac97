"""Every overlay rendered once per session by scripts/k8s_check.py: a real kustomize, no cluster."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.manifests import CLUSTER_OVERLAYS, LOCAL, OVERLAYS, Rendered, run_check


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    out = tmp_path_factory.mktemp("k8s")
    result = run_check(out, "--no-validate")
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        name: Rendered(
            name, [doc for doc in yaml.safe_load_all((out / f"{name}.yaml").read_text()) if doc]
        )
        for name in OVERLAYS
    }


@pytest.fixture(scope="session")
def dev(rendered: dict[str, Rendered]) -> Rendered:
    return rendered["dev"]


@pytest.fixture(scope="session")
def prod(rendered: dict[str, Rendered]) -> Rendered:
    return rendered["prod"]


@pytest.fixture(scope="session")
def local(rendered: dict[str, Rendered]) -> Rendered:
    return rendered[LOCAL]


@pytest.fixture(params=CLUSTER_OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, Rendered]) -> Rendered:
    found: Rendered = rendered[request.param]
    return found
