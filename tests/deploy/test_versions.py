"""The Postgres and Redis majors, named once in deploy/versions.env, are the ones deployed."""

from __future__ import annotations

import re

import pytest

from testing.containers import versions
from tests.deploy.manifests import Rendered

pytestmark = pytest.mark.deploy

# The official images a manifest may run, and the variable naming their major.
SERVER_IMAGES = {"postgres": "POSTGRES_MAJOR", "redis": "REDIS_MAJOR"}


def server_images(overlay: Rendered) -> list[tuple[str, str]]:
    """(repository, tag) of every container image of a server named in SERVER_IMAGES."""
    found = []
    for workload in overlay.workloads():
        for container in workload.containers():
            repository, _, tag = container["image"].rpartition("/")[2].partition(":")
            if repository in SERVER_IMAGES:
                found.append((repository, tag))
    return found


def test_versions_file_names_each_major_once() -> None:
    named = versions()
    assert set(SERVER_IMAGES.values()) <= set(named)
    assert all(named[key].isdigit() for key in SERVER_IMAGES.values()), named


def test_the_dev_overlay_runs_the_servers_it_is_tested_against(dev: Rendered) -> None:
    # The dev overlay is the one with in-cluster servers: it must name both.
    assert {repository for repository, _ in server_images(dev)} == set(SERVER_IMAGES)


def test_every_server_image_carries_the_major_of_versions_env(overlay: Rendered) -> None:
    named = versions()
    for repository, tag in server_images(overlay):
        major = named[SERVER_IMAGES[repository]]
        # The official tags: 17, 17.6, 17-bookworm, 7.4-bookworm...
        found = re.match(r"\d+", tag)
        assert found and found.group() == major, (
            f"{overlay.name}: {repository}:{tag}, but deploy/versions.env says {major}"
        )
