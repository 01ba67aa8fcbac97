"""deploy/k8s/overlays/local through `podman kube play`: the manifests run, one request completes.

Run by `make image-test` (IMGPIPE_TEST_IMAGE names the image to run; podman as root). The
overlay is rendered by the real kustomize; the test then points it at its own servers: the
session's Postgres and Redis, SeaweedFS, the image origin, and free ports instead of the
overlay's fixed ones, so that runs on one machine do not collide.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from testing.origin import ImageOrigin
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from testing.seaweed import BUCKET, SeaweedS3
from tests.deploy.manifests import run_check
from tests.e2e.test_pipeline import upload_csv, wait_completed

IMAGE = os.environ.get("IMGPIPE_TEST_IMAGE", "")
PODMAN_CONF = Path(__file__).resolve().parents[2] / "build" / "containers" / "containers.conf"
# The overlay's fixed loopback ports (deploy/k8s/overlays/local/kustomization.yaml).
LOCAL_PORTS = (18080, 15051, 15052, 15061)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not IMAGE, reason="make image-test runs it (IMGPIPE_TEST_IMAGE, podman)"),
]


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": str(PODMAN_CONF)}
    return subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, check=False, timeout=180
    )


def point_at(
    objects: list[dict[str, Any]], config: dict[str, str], secret: dict[str, str], suffix: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rendered objects but the Secret, with `config` merged into the ConfigMap, IMAGE in
    every container and `suffix` on every Deployment's and the Secret's name; and the Secret,
    with `secret` merged in."""
    played, found = [], {}
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            obj["data"].update(config)
        elif obj["kind"] == "Secret":
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()}
            obj["data"].update(encoded)
            obj["metadata"]["name"] += suffix
            found = obj
            continue
        elif obj["kind"] == "Deployment":
            obj["metadata"]["name"] += suffix
            for container in obj["spec"]["template"]["spec"]["containers"]:
                container["image"] = IMAGE
                for item in container.get("env", []):
                    if "secretKeyRef" in item.get("valueFrom", {}):
                        item["valueFrom"]["secretKeyRef"]["name"] += suffix
        played.append(obj)
    return played, found


@pytest.fixture
def played() -> Iterator[list[Path]]:
    """The files given to `podman kube play`: `podman kube down` for each at the end, and no
    pod of theirs left (a play that failed half-way made some). A file named *.secret.json is
    a podman secret of that name, removed."""
    files: list[Path] = []
    yield files
    for path in files:
        if path.name.endswith(".secret.json"):
            podman("secret", "rm", path.name.removesuffix(".secret.json"))
            continue
        podman("kube", "down", str(path))
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj["kind"] == "Deployment":
                pod = f"{obj['metadata']['name']}-pod-0"
                if podman("pod", "exists", pod).returncode == 0:
                    podman("pod", "rm", "--force", pod)


async def test_one_request_completes_through_the_local_overlay(
    tmp_path: Path,
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    seaweed: SeaweedS3,
    image_origin: ImageOrigin,
    played: list[Path],
) -> None:
    result = run_check(tmp_path, "--no-validate")
    assert result.returncode == 0, result.stdout + result.stderr
    text = (tmp_path / "local.yaml").read_text()
    ports = {port: free_tcp_port() for port in LOCAL_PORTS}
    for fixed, free in ports.items():
        text = re.sub(rf"\b{fixed}\b", str(free), text)
    gateway = f"http://127.0.0.1:{ports[18080]}"
    storage = seaweed.env(f"s3://{BUCKET}/kube-{secrets.token_hex(4)}")
    objects, secret_object = point_at(
        [doc for doc in yaml.safe_load_all(text) if doc],
        config={
            "IMGPIPE_STORAGE_URL": storage["IMGPIPE_STORAGE_URL"],
            "AWS_ENDPOINT_URL": storage["AWS_ENDPOINT_URL"],
            "AWS_REGION": storage["AWS_REGION"],
            "IMGPIPE_REDIS_PREFIX": f"{redis_prefix}:kube",
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{image_origin.port}",
            "IMGPIPE_PUBLIC_API_URL": gateway,
            "IMGPIPE_GRACE_SECONDS": "5",
        },
        secret={
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "AWS_ACCESS_KEY_ID": storage["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": storage["AWS_SECRET_ACCESS_KEY"],
        },
        suffix=f"-{secrets.token_hex(3)}",
    )
    # Created here, not played: podman 4.3 (Debian bookworm) stores a Secret of the played file
    # as YAML, then reads it as what it creates itself, a JSON object of base64 values.
    secret_file = tmp_path / f"{secret_object['metadata']['name']}.secret.json"
    secret_file.write_text(json.dumps(secret_object["data"]))
    created = podman("secret", "create", secret_object["metadata"]["name"], str(secret_file))
    assert created.returncode == 0, created.stderr
    played.append(secret_file)
    play = tmp_path / "play.yaml"
    play.write_text(yaml.safe_dump_all(objects))
    played.append(play)
    started = podman("kube", "play", str(play))
    assert started.returncode == 0, started.stdout + started.stderr

    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            async with http.get(f"{gateway}/readyz") as response:
                return response.status == 200

        await wait_until_async(
            ready,
            timeout=120,
            interval=0.5,
            message="the gateway pod to be ready",
            ignore=(aiohttp.ClientError,),
        )

    urls = [image_origin.url(f"/img/kube{i}.jpg") for i in range(3)]
    body = io.StringIO()
    csv.writer(body).writerows(
        [["S. No.", "Product Name", "Input Image Urls"], ["1", "Kube Shoe", ",".join(urls)]]
    )
    async with aiohttp.ClientSession() as http:
        async with await upload_csv(http, gateway, body.getvalue().encode()) as response:
            assert response.status == 202, await response.text()
            request_id = (await response.json())["request_id"]
        status = await wait_completed(http, gateway, request_id)
    assert status["status"] == "Completed"
    assert status["progress"]["images_done"] == 3
    assert status["progress"]["images_failed"] == 0
