"""Settings: defaults, every problem listed at once, values parsed into frozen objects."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from gateway.config import GatewaySettings
from services.common.config import LONGEST_REDIS_BLOCK, ConfigError
from services.common.db.pool import DEFAULT_COMMAND_TIMEOUT
from services.common.streams import READ_BLOCK_MS
from services.ingest.config import IngestSettings
from services.status.config import StatusSettings
from services.worker.config import WorkerSettings

pytestmark = pytest.mark.unit

BASE = {"IMGPIPE_DATABASE_URL": "postgresql://db/x", "IMGPIPE_REDIS_URL": "redis://r:6379/0"}


def test_defaults_follow_the_design() -> None:
    worker = WorkerSettings.from_env(BASE)
    assert worker.common.redis_prefix == "imgpipe"
    assert worker.common.storage.url.startswith("file://")
    assert worker.common.storage.public_base_url == "http://127.0.0.1:8080/files/"
    assert worker.common.storage.presign_expiry is None
    assert worker.common.grpc_listen == "127.0.0.1:50061"
    assert worker.fetch_limits.max_redirects == 3
    assert worker.fetch_allow.host_ports == frozenset()
    assert IngestSettings.from_env(BASE).common.grpc_listen == "127.0.0.1:50051"
    assert StatusSettings.from_env(BASE).common.grpc_listen == "127.0.0.1:50052"
    gateway = GatewaySettings.from_env({})
    assert (gateway.http_listen, gateway.ingest_addr) == ("127.0.0.1:8080", "127.0.0.1:50051")
    assert (gateway.watch_timeout, gateway.page_cache_bytes) == (600, 32 * 1024 * 1024)


def test_a_browser_session_lasts_twelve_hours_unless_configured() -> None:
    assert StatusSettings.from_env(BASE).session_ttl == 12 * 3600
    assert StatusSettings.from_env({**BASE, "IMGPIPE_SESSION_TTL": "600"}).session_ttl == 600
    with pytest.raises(ConfigError, match="IMGPIPE_SESSION_TTL"):
        StatusSettings.from_env({**BASE, "IMGPIPE_SESSION_TTL": "0"})


def test_a_live_stream_lasts_at_most_ten_minutes() -> None:
    assert GatewaySettings.from_env({"IMGPIPE_WATCH_TIMEOUT": "60"}).watch_timeout == 60
    with pytest.raises(ConfigError, match="IMGPIPE_WATCH_TIMEOUT=3600: at most 600 seconds"):
        GatewaySettings.from_env({"IMGPIPE_WATCH_TIMEOUT": "3600"})


def test_redis_answers_wait_longer_than_a_blocking_read() -> None:
    assert WorkerSettings.from_env(BASE).common.redis_timeout == 5
    assert READ_BLOCK_MS / 1000 <= LONGEST_REDIS_BLOCK
    with pytest.raises(ConfigError, match="IMGPIPE_REDIS_TIMEOUT"):
        WorkerSettings.from_env({**BASE, "IMGPIPE_REDIS_TIMEOUT": "1"})


def test_postgres_statements_wait_the_pools_default_unless_set() -> None:
    assert WorkerSettings.from_env(BASE).common.db_command_timeout == DEFAULT_COMMAND_TIMEOUT
    settings = WorkerSettings.from_env({**BASE, "IMGPIPE_DB_COMMAND_TIMEOUT": "120"})
    assert settings.common.db_command_timeout == 120
    with pytest.raises(ConfigError, match="IMGPIPE_DB_COMMAND_TIMEOUT"):
        WorkerSettings.from_env({**BASE, "IMGPIPE_DB_COMMAND_TIMEOUT": "0"})


def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        WorkerSettings.from_env(
            {
                "IMGPIPE_REDIS_URL": "redis://r",
                "IMGPIPE_WORKER_CONCURRENCY": "many",
                "IMGPIPE_FETCH_TOTAL_TIMEOUT": "-1",
                "IMGPIPE_GRPC_LISTEN": "nowhere",
                "IMGPIPE_FETCH_ALLOW": "127.0.0.1:notaport",
                "IMGPIPE_STORAGE_URL": "ftp://bucket",
            }
        )
    problems = caught.value.problems
    named = {problem.split("=")[0].split(" ")[0] for problem in problems}
    assert named == {
        "IMGPIPE_DATABASE_URL",
        "IMGPIPE_WORKER_CONCURRENCY",
        "IMGPIPE_FETCH_TOTAL_TIMEOUT",
        "IMGPIPE_GRPC_LISTEN",
        "IMGPIPE_FETCH_ALLOW",
        "IMGPIPE_STORAGE_URL",
    }
    assert all(problem in str(caught.value) for problem in problems)


def test_values_are_parsed_and_frozen() -> None:
    settings = WorkerSettings.from_env(
        {
            **BASE,
            "IMGPIPE_WORKER_CONCURRENCY": "16",
            "IMGPIPE_FETCH_ALLOW": "127.0.0.1:8000, 10.1.0.0/16",
            "IMGPIPE_CONSUMER_NAME": "worker-7",
            "IMGPIPE_MAX_PIXELS": "1000",
        }
    )
    assert settings.concurrency == 16
    assert settings.consumer_name == "worker-7"
    assert settings.image_limits.max_pixels == 1000
    assert settings.fetch_allow.allows("127.0.0.1", 8000, ipaddress.ip_address("127.0.0.1"))
    assert settings.fetch_allow.allows("h", 80, ipaddress.ip_address("10.1.2.3"))
    assert not settings.fetch_allow.allows("h", 80, ipaddress.ip_address("10.2.0.1"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.concurrency = 1  # type: ignore[misc]


def test_ingest_limits_come_from_the_environment() -> None:
    limits = IngestSettings.from_env({**BASE, "IMGPIPE_MAX_ROWS": "10"}).csv_limits
    assert limits.max_rows == 10
    with pytest.raises(ConfigError, match="IMGPIPE_MAX_ROWS"):
        IngestSettings.from_env({**BASE, "IMGPIPE_MAX_ROWS": "0"})


def test_fetch_and_image_limits_come_from_the_environment() -> None:
    settings = WorkerSettings.from_env(
        {
            **BASE,
            "IMGPIPE_FETCH_PORTS": "443, 8443",
            "IMGPIPE_FETCH_STALL_TIMEOUT": "2.5",
            "IMGPIPE_FETCH_PER_HOST": "3",
            "IMGPIPE_MAX_FRAMES": "50",
        }
    )
    assert settings.fetch_limits.allowed_ports == frozenset({443, 8443})
    assert settings.fetch_limits.stall_timeout == 2.5
    assert settings.fetch_per_host == 3
    assert settings.image_limits.max_frames == 50
    with pytest.raises(ConfigError, match="IMGPIPE_FETCH_PORTS"):
        WorkerSettings.from_env({**BASE, "IMGPIPE_FETCH_PORTS": "80,99999"})


def test_visibility_timeout_exceeds_the_slowest_legitimate_image() -> None:
    settings = WorkerSettings.from_env(
        {
            **BASE,
            "IMGPIPE_FETCH_TOTAL_TIMEOUT": "2",
            "IMGPIPE_MAX_ATTEMPTS": "2",
            "IMGPIPE_FETCH_MAX_RETRY_AFTER": "1",
            "IMGPIPE_PROCESS_BUDGET": "2",
        }
    )
    # One attempt of 2 s + 2 s of processing: the waits between attempts and for cooldowns
    # happen with the image back in Postgres, not in the task.
    assert settings.slowest_image == 2 + 2
    assert settings.visibility_timeout == settings.slowest_image
    longer = WorkerSettings.from_env({**BASE, "IMGPIPE_VISIBILITY_TIMEOUT": "900"})
    assert longer.visibility_timeout == 900
    with pytest.raises(ConfigError, match="IMGPIPE_VISIBILITY_TIMEOUT=5 is shorter"):
        WorkerSettings.from_env({**BASE, "IMGPIPE_VISIBILITY_TIMEOUT": "5"})


def test_webhook_secrets_links_and_proxies_come_from_the_environment() -> None:
    status = StatusSettings.from_env(
        {
            **BASE,
            "IMGPIPE_WEBHOOK_SECRET_GRACE": "3600",
            "IMGPIPE_WEBHOOK_REDELIVER_RATE": "2/min",
            "IMGPIPE_WEBHOOK_REDELIVER_BURST": "3",
        }
    ).webhooks
    assert (status.secret_grace, status.redeliver_rate, status.redeliver_burst) == (
        3600.0,
        2 / 60,
        3,
    )
    gateway = GatewaySettings.from_env(
        {
            "IMGPIPE_PUBLIC_API_URL": "https://api.example/",
            "IMGPIPE_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7",
        }
    )
    assert gateway.public_api_url == "https://api.example"
    assert gateway.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    assert GatewaySettings.from_env({}).public_api_url == ""  # links are paths
    ingest = IngestSettings.from_env({**BASE, "IMGPIPE_FETCH_ALLOW": "127.0.0.1:9000"})
    assert ingest.fetch_allow.host_ports == frozenset({("127.0.0.1", 9000)})
    with pytest.raises(ConfigError) as caught:
        GatewaySettings.from_env(
            {"IMGPIPE_TRUSTED_PROXIES": "proxy.local", "IMGPIPE_PUBLIC_API_URL": "ftp://x"}
        )
    assert {problem.split("=")[0] for problem in caught.value.problems} == {
        "IMGPIPE_TRUSTED_PROXIES",
        "IMGPIPE_PUBLIC_API_URL",
    }


def test_the_scheduler_window_and_the_owners_weights_reach_ingest() -> None:
    env = {
        **BASE,
        "IMGPIPE_SCHEDULER_WINDOW": "256",
        "IMGPIPE_API_KEYS": f"acme:{'a' * 64} weight=3, globex:{'b' * 64}",
    }
    settings = IngestSettings.from_env(env)
    assert (settings.scheduler_window, settings.scheduler_poll) == (256, 0.1)
    assert settings.api_keys.weights == {"acme": 3, "globex": 1}
    assert IngestSettings.from_env(BASE).scheduler_window == 192
    with pytest.raises(ConfigError) as caught:
        IngestSettings.from_env(
            {**BASE, "IMGPIPE_SCHEDULER_WINDOW": "0", "IMGPIPE_SCHEDULER_POLL": "soon"}
        )
    named = {problem.split("=")[0] for problem in caught.value.problems}
    assert named == {"IMGPIPE_SCHEDULER_WINDOW", "IMGPIPE_SCHEDULER_POLL"}
