"""The worker's settings (the shared pieces: services/common/config.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from services.common.capacity import WORKER_CONCURRENCY
from services.common.config import CommonSettings, EnvReader, read_fetch_allow
from services.common.fetch import FetchAllow, FetchLimits
from services.common.image_options import ImageLimits
from services.common.outcome import RetryPolicy
from services.worker.budget import DEFAULT_BUFFER_BYTES, DEFAULT_PIXEL_BUDGET
from services.worker.cpus import usable_cpus
from services.worker.processor import DEFAULT_CONNECTION_WAIT, DEFAULT_RECORD_LINGER


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    common: CommonSettings
    consumer_name: str
    concurrency: int = WORKER_CONCURRENCY  # tasks in flight (services/common/capacity.py)
    threads: int = 2
    fetch_per_host: int = 16
    # A task that waits this long for a connection to its origin gives its slot back
    # (docs/scheduling.md, "Waiting for a connection").
    connection_wait: float = DEFAULT_CONNECTION_WAIT
    buffer_bytes: int = DEFAULT_BUFFER_BYTES  # downloaded bodies waiting for a compress thread
    pixel_budget: int = DEFAULT_PIXEL_BUDGET  # pixels decoded and encoded at once, all threads
    fetch_limits: FetchLimits = field(default_factory=FetchLimits)
    fetch_allow: FetchAllow = field(default_factory=FetchAllow)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # Time allowed to decode, encode and store one image and record it, after the download.
    process_budget: float = 60.0
    # An entry idle this long belongs to a dead worker and is claimed; None: derived.
    visibility_override: float | None = None
    max_deliveries: int = 5
    claim_interval: float = 10.0
    reconcile_interval: float = 30.0
    reconcile_min_age: float = 10.0
    # Final requests older than this many days are deleted by the janitor; 0 keeps everything.
    retention_days: int = 30
    janitor_interval: float = 300.0
    # Copy the owner's earlier output of the same source bytes and options instead of
    # compressing again (docs/quality.md, "No repeated work").
    reuse_outputs: bool = True
    # How long a Done record waits for other tasks' to share one statement (batching.py).
    record_linger: float = DEFAULT_RECORD_LINGER

    @property
    def slowest_image(self) -> float:
        """The longest one task may legitimately take: one attempt at the total timeout and the
        processing budget. A task waits for no retry: the image waits in Postgres instead."""
        return self.fetch_limits.total_timeout + self.process_budget

    @property
    def visibility_timeout(self) -> float:
        """Entries idle longer than this are taken over; it exceeds the slowest legitimate
        image, so live work is never stolen."""
        return self.visibility_override or self.slowest_image

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = EnvReader(environ)
        fetch = FetchLimits()
        images = ImageLimits()
        allow = read_fetch_allow(env)
        settings = cls(
            common=CommonSettings.read(env, "127.0.0.1:50061"),
            # The pod name in Kubernetes; hostname-pid elsewhere, so restarts get a new name
            # and the old name's pending entries are claimed by XAUTOCLAIM.
            consumer_name=env.text("IMGPIPE_CONSUMER_NAME", f"{os.uname().nodename}-{os.getpid()}"),
            concurrency=env.integer("IMGPIPE_WORKER_CONCURRENCY", WORKER_CONCURRENCY, minimum=1),
            threads=env.integer("IMGPIPE_WORKER_THREADS", usable_cpus(), minimum=1),
            fetch_limits=FetchLimits(
                connect_timeout=env.number("IMGPIPE_FETCH_CONNECT_TIMEOUT", fetch.connect_timeout),
                total_timeout=env.number("IMGPIPE_FETCH_TOTAL_TIMEOUT", fetch.total_timeout),
                stall_timeout=env.number("IMGPIPE_FETCH_STALL_TIMEOUT", fetch.stall_timeout),
                max_bytes=env.integer("IMGPIPE_FETCH_MAX_BYTES", fetch.max_bytes, minimum=1),
                max_redirects=env.integer("IMGPIPE_FETCH_MAX_REDIRECTS", fetch.max_redirects),
                allowed_ports=env.ports("IMGPIPE_FETCH_PORTS", fetch.allowed_ports),
                max_retry_after=env.number("IMGPIPE_FETCH_MAX_RETRY_AFTER", fetch.max_retry_after),
            ),
            fetch_per_host=env.integer("IMGPIPE_FETCH_PER_HOST", 16, minimum=1),
            connection_wait=env.number("IMGPIPE_FETCH_CONNECTION_WAIT", DEFAULT_CONNECTION_WAIT),
            buffer_bytes=env.integer(
                "IMGPIPE_WORKER_BUFFER_BYTES", DEFAULT_BUFFER_BYTES, minimum=1
            ),
            pixel_budget=env.integer("IMGPIPE_PIXEL_BUDGET", DEFAULT_PIXEL_BUDGET, minimum=1),
            fetch_allow=allow,
            image_limits=ImageLimits(
                max_pixels=env.integer("IMGPIPE_MAX_PIXELS", images.max_pixels, minimum=1),
                max_frames=env.integer("IMGPIPE_MAX_FRAMES", images.max_frames, minimum=1),
                max_scans=env.integer("IMGPIPE_MAX_SCANS", images.max_scans, minimum=1),
            ),
            retry=RetryPolicy(
                max_attempts=env.integer("IMGPIPE_MAX_ATTEMPTS", 3, minimum=1),
                max_wait=env.number("IMGPIPE_FETCH_MAX_RETRY_AFTER", fetch.max_retry_after),
            ),
            process_budget=env.number("IMGPIPE_PROCESS_BUDGET", 60.0),
            visibility_override=env.number("IMGPIPE_VISIBILITY_TIMEOUT", 0.0) or None,
            max_deliveries=env.integer("IMGPIPE_MAX_DELIVERIES", 5, minimum=1),
            claim_interval=env.number("IMGPIPE_CLAIM_INTERVAL", 10.0),
            reconcile_interval=env.number("IMGPIPE_RECONCILE_INTERVAL", 30.0),
            reconcile_min_age=env.number("IMGPIPE_RECONCILE_MIN_AGE", 10.0),
            retention_days=env.integer("IMGPIPE_RETENTION_DAYS", 30, minimum=0),
            janitor_interval=env.number("IMGPIPE_JANITOR_INTERVAL", 300.0),
            reuse_outputs=env.switch("IMGPIPE_REUSE_OUTPUTS", True),
            record_linger=env.integer(
                "IMGPIPE_WORKER_RECORD_LINGER_MS", round(DEFAULT_RECORD_LINGER * 1000), minimum=0
            )
            / 1000,
        )
        if settings.visibility_override and settings.visibility_override < settings.slowest_image:
            env.problems.append(
                f"IMGPIPE_VISIBILITY_TIMEOUT={settings.visibility_override:g} is shorter than the"
                f" slowest legitimate image ({settings.slowest_image:g} s, from the fetch and"
                " processing limits): live work would be taken over"
            )
        env.done()
        return settings
