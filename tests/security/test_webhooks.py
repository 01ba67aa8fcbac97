"""Finding 5 (one webhook secret for every owner) and the webhook and link items of finding 7.

The status service runs in process with the API-key interceptor and two owners, its webhook
dispatcher sends to receivers on 127.0.0.1 that verify with `standardwebhooks`; the gateway
runs in process, in front of a real ingest servicer. Postgres and Redis are real.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
import redis.asyncio
from aiohttp.test_utils import TestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.app import create_app
from gateway.config import GatewaySettings
from gateway.serving import start
from services.common.auth import Limits as KeyLimits
from services.common.auth import key_hash, new_key, parse_api_keys
from services.common.csv_format import CsvLimits
from services.common.errors import Conflict, RateLimited, error_from_rpc
from services.common.fetch import FetchAllow, FetchLimits
from services.common.grpc_auth import ApiKeyInterceptor
from services.common.limits import Limiter
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from services.common.storage import Storage, StorageConfig
from services.common.streams import StreamNames
from services.ingest.servicer import IngestServicer
from services.ingest.servicer import registrar as ingest_registrar
from services.status.config import WebhookSettings
from services.status.servicer import StatusServicer
from services.status.servicer import registrar as status_registrar
from services.status.webhooks import WebhookDispatcher
from testing.databases import own_database
from testing.gateway import GatewayServer
from testing.listeners import Received, Receiver, serve_receiver
from testing.polling import wait_until_async
from testing.ports import free_tcp_port
from tests.integration.test_webhooks import (
    FAST,
    SECRET,
    S,
    finished_event,
    finished_request,
    publish,
    running,
)

ACME, GLOBEX = new_key(), new_key()
CSV = b"S. No.,Product Name,Input Image Urls\n1,Shoe,https://images.example/a.jpg\n"


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# ---------------------------------------------------------------- the status service


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A database of this test's own: the dispatcher sends every due row in its database."""
    async with own_database(postgres_server_url, "imgpipe_security") as pool:
        yield pool


@pytest.fixture
def names(redis_prefix: str) -> StreamNames:
    return StreamNames(f"{redis_prefix}:{secrets.token_hex(4)}")


@dataclass
class Hooks:
    """The status service of two owners, `acme` and `globex` (names with a suffix per test)."""

    status: status_grpc.StatusServiceAsyncStub
    dispatcher: WebhookDispatcher
    pool: asyncpg.Pool
    redis: redis.asyncio.Redis
    names: StreamNames
    acme: str
    globex: str

    async def secret(self, key: str) -> status_pb.WebhookSecret:
        answer = await self.status.GetWebhookSecret(
            status_pb.GetWebhookSecretRequest(), metadata=bearer(key), timeout=10
        )
        return answer.secret

    async def deliver(self, receiver: Receiver, owner: str, count: int) -> Received:
        """Finish a request of `owner` whose webhook goes to `receiver`; its delivery."""
        row = await finished_request(self.pool, receiver.url(), owner=owner)
        await publish(self.redis, self.names, finished_event(row))
        return (await received(receiver, count))[-1]


async def received(receiver: Receiver, count: int) -> list[Received]:
    async def enough() -> list[Received] | None:
        return receiver.received if len(receiver.received) >= count else None

    return await wait_until_async(enough, timeout=20, message=f"{count} webhooks")


@contextlib.asynccontextmanager
async def hooks_for(
    pool: asyncpg.Pool,
    client: redis.asyncio.Redis,
    names: StreamNames,
    tmp_path: Path,
    **changes: Any,
) -> AsyncIterator[Hooks]:
    """The status service with its dispatcher running; webhooks may go to any port of
    127.0.0.1 (the receivers' secrets are known only once the service answers)."""
    tag = secrets.token_hex(3)
    acme, globex = f"acme-{tag}", f"globex-{tag}"
    keys, problems = parse_api_keys(
        f"{acme}:{key_hash(ACME)} rate=0, {globex}:{key_hash(GLOBEX)} rate=0", KeyLimits()
    )
    assert problems == []
    settings = WebhookSettings(
        secret=SECRET,
        timeout=5.0,
        schedule=FAST,
        fetch_allow=FetchAllow.parse("127.0.0.1/32"),
        fetch_limits=FetchLimits(total_timeout=5.0, max_redirects=0),
    )
    async with running(pool, client, names, replace(settings, **changes)) as run:
        storage = Storage.from_url((tmp_path / "store").as_uri(), "http://127.0.0.1/files/")
        servicer = StatusServicer(pool, storage, client, names, run.dispatcher)
        server = grpc.aio.server(
            interceptors=[ApiKeyInterceptor(keys, Limiter(client, names, pool).check_rate)]
        )
        status_registrar(servicer)(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            stub = status_grpc.StatusServiceStub(channel)
            yield Hooks(stub, run.dispatcher, pool, client, names, acme, globex)
        finally:
            await channel.close(None)
            await server.stop(None)


def verifies(secret: str, delivery: Received) -> bool:
    try:
        Webhook(secret).verify(delivery.body, delivery.headers)
    except WebhookVerificationError:
        return False
    return True


def signatures(delivery: Received) -> list[str]:
    return delivery.headers["webhook-signature"].split(" ")


# ---------------------------------------------------------------- finding 5


async def test_one_owners_secret_does_not_verify_another_owners_webhook(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, tmp_path: Path
) -> None:
    """Finding 5: each owner fetches a secret of its own with its key; it verifies that
    owner's webhooks only, and the signed payload names the owner."""
    async with hooks_for(pool, redis_client, names, tmp_path) as hooks:
        acme, globex = await hooks.secret(ACME), await hooks.secret(GLOBEX)
        assert (acme.owner, globex.owner) == (hooks.acme, hooks.globex)
        assert acme.secret.startswith("whsec_") and globex.secret.startswith("whsec_")
        assert len({acme.secret, globex.secret, SECRET}) == 3
        assert (acme.generation, acme.previous_secret) == (1, "")
        async with (
            serve_receiver(acme.secret) as acme_hook,
            serve_receiver(globex.secret) as globex_hook,
        ):
            from_acme = await hooks.deliver(acme_hook, hooks.acme, 1)
            from_globex = await hooks.deliver(globex_hook, hooks.globex, 1)
        assert acme_hook.rejected == [] and globex_hook.rejected == []
        assert (await hooks.secret(ACME)).secret == acme.secret  # stable: derived, not random

    assert from_acme.payload["data"]["owner"] == hooks.acme
    assert from_globex.payload["data"]["owner"] == hooks.globex
    # Acme holds its own secret: with it, it can neither verify nor forge globex's events.
    assert not verifies(acme.secret, from_globex)
    assert not verifies(globex.secret, from_acme)
    # The master secret signs nothing of an owner's: no tenant needs to hold it.
    assert not verifies(SECRET, from_acme) and not verifies(SECRET, from_globex)


async def test_a_rotated_secret_signs_with_both_during_the_grace_period_then_the_new_alone(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, tmp_path: Path
) -> None:
    """Finding 5: rotation, with a grace period in which both secrets sign."""
    async with hooks_for(pool, redis_client, names, tmp_path) as hooks:
        old = await hooks.secret(ACME)
        answer = await hooks.status.RotateWebhookSecret(
            status_pb.RotateWebhookSecretRequest(), metadata=bearer(ACME), timeout=10
        )
        new = answer.secret
        assert (new.generation, new.previous_generation) == (2, 1)
        assert new.secret not in (old.secret, "") and new.previous_secret == old.secret
        assert new.HasField("previous_expires_at") and new.HasField("rotated_at")
        assert (await hooks.secret(GLOBEX)).generation == 1  # another owner is untouched

        async with serve_receiver(new.secret) as receiver:
            during = await hooks.deliver(receiver, hooks.acme, 1)
            assert len(signatures(during)) == 2
            assert verifies(old.secret, during) and verifies(new.secret, during)

            # The grace period ends (as time would end it).
            await pool.execute(
                "UPDATE webhook_secrets SET previous_until = now() - interval '1 second'"
                " WHERE owner = $1",
                hooks.acme,
            )
            after = await hooks.secret(ACME)
            assert (after.secret, after.previous_secret) == (new.secret, "")
            later = await hooks.deliver(receiver, hooks.acme, 2)
        assert receiver.rejected == []
        assert len(signatures(later)) == 1
        assert verifies(new.secret, later) and not verifies(old.secret, later)


async def test_without_keys_the_single_secret_signs_as_before(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, tmp_path: Path
) -> None:
    """Finding 5: one tenant (no owner) keeps IMGPIPE_WEBHOOK_SECRET, and there is no
    per-owner secret to fetch."""
    async with hooks_for(pool, redis_client, names, tmp_path) as hooks:
        async with serve_receiver(SECRET) as receiver:
            delivery = await hooks.deliver(receiver, "", 1)
        with pytest.raises(Conflict, match="need API keys"):
            await hooks.dispatcher.secrets.current(pool, "")
        with pytest.raises(Conflict, match="need API keys"):
            await hooks.dispatcher.secrets.rotate(pool, "")
    assert receiver.rejected == []
    assert len(signatures(delivery)) == 1 and "owner" not in delivery.payload["data"]


# ---------------------------------------------------------------- finding 7: redelivery


async def test_webhook_redelivery_is_throttled_per_owner(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, tmp_path: Path
) -> None:
    """Finding 7: redelivery sent 20 signed POSTs a second to any URL; now each owner has a
    small bucket of them, and 429 (RESOURCE_EXHAUSTED) beyond it."""
    async with hooks_for(
        pool, redis_client, names, tmp_path, redeliver_rate=1 / 3600, redeliver_burst=2
    ) as hooks:
        acme, globex = await hooks.secret(ACME), await hooks.secret(GLOBEX)
        async with serve_receiver(acme.secret) as acme_hook, serve_receiver(globex.secret) as g:
            acme_row = await finished_request(pool, acme_hook.url(), owner=hooks.acme)
            globex_row = await finished_request(pool, g.url(), owner=hooks.globex)

            async def redeliver(key: str, request_id: str) -> status_pb.RedeliverWebhookResponse:
                return await hooks.status.RedeliverWebhook(
                    status_pb.RedeliverWebhookRequest(request_id=request_id),
                    metadata=bearer(key),
                    timeout=10,
                )

            for _ in range(2):
                await redeliver(ACME, str(acme_row.id))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await redeliver(ACME, str(acme_row.id))
            # Another owner is not held back by acme's bucket.
            again = await redeliver(GLOBEX, str(globex_row.id))
            assert again.delivery.state == S.WEBHOOK_DELIVERY_STATE_SCHEDULED
            await received(g, 1)
        assert acme_hook.rejected == [] and g.rejected == []

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = error_from_rpc(caught.value)
    assert isinstance(error, RateLimited) and error.retry_after > 1
    assert [d.column for d in error.details] == ["redeliver"]
    attempts = await hooks.dispatcher.list_deliveries(acme_row.id)
    assert 1 <= len(attempts) <= 2  # the refused call scheduled nothing


# ---------------------------------------------------------------- finding 11: hung receivers

HUNG = 20  # more than the attempts one replica has in flight (CONCURRENCY, 16)
PER_OWNER = 4


async def test_one_owners_hung_receivers_do_not_hold_back_another_owners_webhook(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, tmp_path: Path
) -> None:
    """Finding 11: attempts were claimed oldest first whoever their owner, so an owner whose
    receivers never answer held every delivery in flight, each until the timeout, and every
    other owner's webhook waited behind its backlog. Now owners take turns, each has at most
    IMGPIPE_WEBHOOK_PER_OWNER attempts in flight, and one receiver host (shared by both here,
    as an integration platform's would be) takes as many connections as there are attempts."""
    async with (
        hooks_for(pool, redis_client, names, tmp_path, per_owner=PER_OWNER) as hooks,
        serve_receiver(SECRET) as shared,
    ):
        shared.hung_paths.add("/hung")
        shared.secrets["/hung"] = (await hooks.secret(ACME)).secret
        shared.secrets["/prompt"] = (await hooks.secret(GLOBEX)).secret
        for _ in range(HUNG):
            row = await finished_request(pool, shared.url("/hung"), owner=hooks.acme)
            await publish(redis_client, names, finished_event(row))

        async def acme_in_flight() -> bool:
            return shared.held >= PER_OWNER

        await wait_until_async(acme_in_flight, timeout=10, message="acme's attempts held")
        sent = time.monotonic()
        row = await finished_request(pool, shared.url("/prompt"), owner=hooks.globex)
        await publish(redis_client, names, finished_event(row))
        (delivery,) = await received(shared, 1)
        waited = time.monotonic() - sent
    # The timeout is 5 s: globex's webhook waited for none of acme's attempts to end.
    assert waited < 2.5, waited
    assert shared.most_held == PER_OWNER
    assert delivery.payload["data"]["owner"] == hooks.globex and shared.rejected == []


# ---------------------------------------------------------------- finding 7: links, logs, URLs


@contextlib.asynccontextmanager
async def gateway(
    pool: asyncpg.Pool,
    client: redis.asyncio.Redis,
    names: StreamNames,
    tmp_path: Path,
    fetch_allow: str = "",
    **changes: Any,
) -> AsyncIterator[TestClient[Any, Any]]:
    """The gateway in front of a real ingest servicer (status is not running)."""
    ingest = IngestServicer(
        pool, client, names, CsvLimits(), fetch_allow=FetchAllow.parse(fetch_allow)
    )
    server = grpc.aio.server()
    ingest_registrar(ingest)(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{port}",
        status_addr=f"127.0.0.1:{free_tcp_port()}",
        storage=StorageConfig((tmp_path / "store").as_uri()),
        rpc_timeout=5,
        upload_timeout=10,
    )
    try:
        async with TestClient(GatewayServer(create_app(replace(settings, **changes)))) as http:
            yield http
    finally:
        await server.stop(None)


async def upload(
    http: TestClient[Any, Any], webhook_url: str = "", headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    if webhook_url:
        form.add_field("webhook_url", webhook_url)
    form.add_field("file", CSV, filename="products.csv", content_type="text/csv")
    return await http.post("/upload", data=form, headers=headers or {})


async def location(http: TestClient[Any, Any], headers: dict[str, str] | None = None) -> str:
    """The Location of an accepted upload, checked to equal its status_url."""
    response = await upload(http, headers=headers)
    assert response.status == 202, await response.text()
    body = await response.json()
    assert response.headers["Location"] == body["status_url"]
    assert body["status_url"].endswith(f"/status/{body['request_id']}")
    status_url: str = body["status_url"]
    return status_url.removesuffix(f"/status/{body['request_id']}")


LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
ELSEWHERE = (ipaddress.ip_network("10.0.0.0/8"),)
BEHIND_TLS = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example"}


@pytest.mark.parametrize(
    ("changes", "headers", "base"),
    [
        # The configured public URL wins over anything the request says.
        ({"public_api_url": "https://api.example"}, {}, "https://api.example"),
        ({"public_api_url": "https://api.example"}, {"Host": "evil.test"}, "https://api.example"),
        # A trusted proxy saying https: https, on the host it forwarded.
        ({"trusted_proxies": LOOPBACK}, BEHIND_TLS, "https://api.example"),
        # The nearest proxy's Forwarded element, not what the caller sent ahead of it.
        (
            {"trusted_proxies": LOOPBACK},
            {"Forwarded": 'proto=http;host="evil.test", proto=https;host=api.example'},
            "https://api.example",
        ),
        # Forwarded headers from a peer that is not a trusted proxy are ignored: a path.
        ({"trusted_proxies": ELSEWHERE}, BEHIND_TLS, ""),
        # Nothing configured: a path, never the connection's scheme and the Host header.
        ({}, {"Host": "evil.test"}, ""),
        # A trusted proxy that does not say the scheme: a path, not a guess.
        ({"trusted_proxies": LOOPBACK}, {}, ""),
    ],
    ids=["public-url", "public-url-host", "proxy", "forwarded", "untrusted", "nothing", "silent"],
)
async def test_location_never_comes_from_the_host_header_and_the_connection_scheme(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    tmp_path: Path,
    changes: dict[str, Any],
    headers: dict[str, str],
    base: str,
) -> None:
    """Finding 7: Location and status_url were http://<Host>/... behind a TLS ingress."""
    async with gateway(pool, redis_client, names, tmp_path, **changes) as http:
        assert await location(http, headers) == base


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_the_access_log_writes_no_query_values(tmp_path: Path) -> None:
    """Finding 7: the access log wrote full query strings, tokens inside webhook_url too."""
    handler = Records()
    records = handler.records
    access = logging.getLogger("aiohttp.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    settings = GatewaySettings(
        ingest_addr=f"127.0.0.1:{free_tcp_port()}",
        status_addr=f"127.0.0.1:{free_tcp_port()}",
        storage=StorageConfig((tmp_path / "store").as_uri()),
    )
    runner = await start(create_app(settings), "127.0.0.1", 0)  # as the gateway serves
    try:
        port = runner.addresses[0][1]
        hook = "https://hooks.example/in?token=SECRET-ONE"
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/healthz",
                params={"webhook_url": hook, "page_token": "SECRET-TWO", "imgpipe_SECRET": ""},
                headers={"Referer": "https://app.example/page?key=SECRET-THREE"},
            ) as response,
        ):
            assert response.status == 200

        async def logged() -> list[logging.LogRecord] | None:
            return records or None

        [record] = await wait_until_async(logged, message="the access log line")
    finally:
        await runner.cleanup()
        access.removeHandler(handler)
        access.setLevel(level)
    line = f"{record.getMessage()} {record.__dict__}"
    assert "SECRET" not in line
    assert "/healthz?webhook_url&page_token&_" in record.getMessage()
    assert record.__dict__["referer"] == "https://app.example/page"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:8080/hook",
        "http://[::1]:8080/hook",
        "http://[::ffff:192.168.0.1]/hook",
        "http://2130706433/hook",
        "http://user:secret@hooks.example/hook",
        "http://hooks.example:22/hook",
    ],
)
async def test_a_webhook_url_that_can_never_be_reached_is_refused_at_upload(
    pool: asyncpg.Pool,
    redis_client: redis.asyncio.Redis,
    names: StreamNames,
    tmp_path: Path,
    url: str,
) -> None:
    """Finding 7: such a webhook_url was accepted (202), then every delivery abandoned."""
    async with gateway(pool, redis_client, names, tmp_path) as http:
        response = await upload(http, url)
        assert response.status == 400, await response.text()
        error = (await response.json())["error"]
    assert error["code"] == "invalid_argument"
    assert [d["column"] for d in error["details"]] == ["webhook_url"]
    assert "webhook_url is refused" in error["details"][0]["message"]
    assert await pool.fetchval("SELECT count(*) FROM requests") == 0  # nothing was stored


async def test_a_webhook_url_decided_by_dns_or_allowed_is_accepted(
    pool: asyncpg.Pool, redis_client: redis.asyncio.Redis, names: StreamNames, tmp_path: Path
) -> None:
    """Only what is known without DNS is refused; IMGPIPE_FETCH_ALLOW lets tests through."""
    allowed = "http://127.0.0.1:9999/hook"
    async with gateway(pool, redis_client, names, tmp_path, "127.0.0.1:9999") as http:
        for url in ("https://hooks.example/in?token=t", allowed):
            response = await upload(http, url)
            assert response.status == 202, await response.text()
    stored = await pool.fetch("SELECT webhook_url FROM requests ORDER BY created_at")
    assert [row["webhook_url"] for row in stored] == ["https://hooks.example/in?token=t", allowed]
