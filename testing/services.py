"""Services as processes of their own (`python -m services.<name>`), each with a gRPC channel
to its health service: for the fault tests and the scale-out benchmark, which start, kill and
restart them one by one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pb.imgpipe.v1 import ingest_service_pb2_grpc as ingest_grpc
from testing.stack import ROOT
from testing.uploads import csv_for, upload

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start_service(
    module: str,
    env: dict[str, str],
    log: Path,
    *,
    process_group: int | None = None,
    launcher: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """One service as a process (`python -m module`), its output in `log`.

    `process_group`: 0 makes the process the leader of a new group, a pid joins that leader's
    group (so one os.killpg reaches them all). `launcher`: a command that runs the service
    (e.g. `nsenter --net=...`); it must exec it, so the pid stays the service's.
    """
    with log.open("wb") as out:
        return subprocess.Popen(
            [*launcher, sys.executable, "-m", module],
            cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            process_group=process_group,
        )


@dataclass
class Service:
    """One service process, its log, and a gRPC channel to its health service."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    listen: str
    channel: grpc.aio.Channel = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(line[:400] for line in text.splitlines()[-lines:])

    async def health(self) -> int:
        """The overall health status; raises grpc.aio.AioRpcError when it does not answer."""
        stub: Any = health_pb2_grpc.HealthStub(self.channel)  # typeshed lists no methods
        response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        return int(response.status)

    async def wait_exit(self, within: float) -> int:
        """The exit code (negative: the signal), once the process has exited."""
        try:
            return await asyncio.to_thread(self.process.wait, within)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {within:g} s\n{self.tail()}"
            ) from None


async def submit(ingest: Service, urls: Sequence[str], *, api_key: str = "") -> str:
    """Upload a CSV of `urls` to `ingest` (as the owner of `api_key`, if given); the request
    id."""
    stub = ingest_grpc.IngestServiceStub(ingest.channel)
    accepted = await upload(stub, csv_for(urls), chunk_size=16384, api_key=api_key)
    assert accepted.images == len(urls)
    return accepted.request_id
