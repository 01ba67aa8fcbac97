"""The ingest service's settings (the shared pieces: services/common/config.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Self

from services.common.auth import KeyRing
from services.common.capacity import window_for
from services.common.config import CommonSettings, EnvReader, read_api_keys, read_fetch_allow
from services.common.csv_format import CsvLimits
from services.common.fetch import FetchAllow, FetchLimits

# Tasks released and not yet final, at most (IMGPIPE_SCHEDULER_WINDOW): the slots of two
# workers (2 × 64) and room for the lookahead and the lingering Done records. `make run`
# sizes it from its workers (services/local/launcher.py).
DEFAULT_WINDOW = window_for(2)
# Tasks released and not yet delivered to a worker, at most (IMGPIPE_SCHEDULER_LOOKAHEAD).
DEFAULT_LOOKAHEAD = 32
# Of those, at most what the workers took in this many seconds
# (IMGPIPE_SCHEDULER_LOOKAHEAD_SECONDS).
DEFAULT_LOOKAHEAD_SECONDS = 0.5

# The setting behind each CsvLimits field, to name it when a CSV goes over it (413).
CSV_LIMIT_SETTINGS = {
    "max_bytes": ("IMGPIPE_MAX_UPLOAD_BYTES", "bytes"),
    "max_rows": ("IMGPIPE_MAX_ROWS", "rows"),
    "max_urls_per_row": ("IMGPIPE_MAX_URLS_PER_ROW", "image URLs in one row"),
    "max_urls_total": ("IMGPIPE_MAX_URLS_TOTAL", "image URLs"),
}


@dataclass(frozen=True, slots=True)
class IngestSettings:
    common: CommonSettings
    csv_limits: CsvLimits = field(default_factory=CsvLimits)
    api_keys: KeyRing = field(default_factory=KeyRing)
    # The status service's fetch guard settings: a webhook_url it would refuse whatever DNS
    # says is refused at upload instead.
    fetch_allow: FetchAllow = field(default_factory=FetchAllow)
    fetch_ports: frozenset[int] = FetchLimits().allowed_ports
    # Tasks on the stream and not yet final, at most (docs/scheduling.md): at least the
    # workers' tasks in flight (workers × IMGPIPE_WORKER_CONCURRENCY), plus 64.
    scheduler_window: int = DEFAULT_WINDOW
    # Of those, not yet delivered to a worker, at most: what the workers take during a poll or
    # two. A new request waits behind no more than this.
    scheduler_lookahead: int = DEFAULT_LOOKAHEAD
    # And at most what they take in this many seconds: a newcomer waits behind little work.
    scheduler_lookahead_seconds: float = DEFAULT_LOOKAHEAD_SECONDS
    scheduler_poll: float = 0.1  # seconds between the feeder's looks at the window

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        env = EnvReader(environ)
        defaults = CsvLimits()
        settings = cls(
            common=CommonSettings.read(env, "127.0.0.1:50051"),
            csv_limits=CsvLimits(
                max_bytes=env.integer("IMGPIPE_MAX_UPLOAD_BYTES", defaults.max_bytes, minimum=1),
                max_rows=env.integer("IMGPIPE_MAX_ROWS", defaults.max_rows, minimum=1),
                max_urls_per_row=env.integer(
                    "IMGPIPE_MAX_URLS_PER_ROW", defaults.max_urls_per_row, minimum=1
                ),
                max_urls_total=env.integer(
                    "IMGPIPE_MAX_URLS_TOTAL", defaults.max_urls_total, minimum=1
                ),
            ),
            api_keys=read_api_keys(env),
            fetch_allow=read_fetch_allow(env),
            fetch_ports=env.ports("IMGPIPE_FETCH_PORTS", FetchLimits().allowed_ports),
            scheduler_window=env.integer("IMGPIPE_SCHEDULER_WINDOW", DEFAULT_WINDOW, minimum=1),
            scheduler_lookahead=env.integer(
                "IMGPIPE_SCHEDULER_LOOKAHEAD", DEFAULT_LOOKAHEAD, minimum=1
            ),
            scheduler_lookahead_seconds=env.number(
                "IMGPIPE_SCHEDULER_LOOKAHEAD_SECONDS", DEFAULT_LOOKAHEAD_SECONDS
            ),
            scheduler_poll=env.number("IMGPIPE_SCHEDULER_POLL", 0.1, minimum=0.01),
        )
        env.done()
        return settings
