"""End to end: API keys and limits on the real stack (`python -m services.local` with
IMGPIPE_API_KEYS), over REST, over direct gRPC, from the CLI and from a browser's cookie; and
the loud warning every service logs when no key is configured.

Images point at `http://127.0.0.1:9/...`, which the fetch guard refuses without connecting, so
requests become final (Failed) at once and nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest

from services.common.auth import AUTH_OFF_WARNING, key_hash, new_key
from services.common.pb.imgpipe.v1 import status_service_pb2 as status_pb
from services.common.pb.imgpipe.v1 import status_service_pb2_grpc as status_grpc
from testing.polling import wait_until, wait_until_async
from testing.ports import free_tcp_port
from testing.services import start_service
from testing.stack import Stack, free_grpc_base, run_cli, start_stack

pytestmark = pytest.mark.e2e

ACME, GLOBEX, SLOW = new_key(), new_key(), new_key()
UPLOAD_LIMIT, ROW_LIMIT = 4096, 3
REFUSED = "http://127.0.0.1:9"
CSV = (
    "S. No.,Product Name,Input Image Urls\n"
    f'1,Shoe,"{REFUSED}/a.jpg,{REFUSED}/b.jpg"\n'
    f"2,Hat,{REFUSED}/c.jpg\n"
).encode()
CHALLENGE = 'Bearer realm="imgpipe"'


@dataclass(frozen=True)
class Live:
    stack: Stack
    status_addr: str
    database_url: str

    @property
    def base(self) -> str:
        return self.stack.base_url


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_server_url: str
) -> Iterator[Live]:
    grpc_base = free_grpc_base(1)
    stack = start_stack(
        tmp_path_factory.mktemp("auth"),
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_DEV_WORKERS": "1",
            "IMGPIPE_DEV_GRPC_BASE_PORT": str(grpc_base),
            "IMGPIPE_API_KEYS": (
                f"acme:{key_hash(ACME)} rate=0, globex:{key_hash(GLOBEX)} rate=0,"
                f"slow:{key_hash(SLOW)} rate=1/min burst=1"
            ),
            "IMGPIPE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
            "IMGPIPE_MAX_ROWS": str(ROW_LIMIT),
        },
    )
    try:
        yield Live(stack, f"127.0.0.1:{grpc_base + 1}", database_url)
    finally:
        stack.stop_and_reap()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # No cookie jar: every call says which key it uses (or none); the cookie test sets its own.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


async def upload(http: aiohttp.ClientSession, live: Live, key: str, body: bytes = CSV) -> str:
    async with http.post(
        f"{live.base}/upload", data=body, headers={**bearer(key), "Content-Type": "text/csv"}
    ) as response:
        assert response.status == 202, await response.text()
        request_id: str = (await response.json())["request_id"]
        return request_id


async def final(http: aiohttp.ClientSession, live: Live, key: str, request_id: str) -> None:
    async def is_final() -> bool:
        async with http.get(f"{live.base}/status/{request_id}", headers=bearer(key)) as response:
            assert response.status == 200
            return (await response.json())["status"] in ("Completed", "Failed")

    await wait_until_async(is_final, timeout=60, interval=0.2, message=f"{request_id} final")


async def answer(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Mapping[str, str]]:
    async with http.request(method, url, **kwargs) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body, response.headers


def request_routes(request_id: str) -> list[tuple[str, str]]:
    """Every route that reads or acts on one request."""
    return [
        ("GET", f"/status/{request_id}"),
        ("GET", f"/status?request_id={request_id}"),
        ("GET", f"/requests/{request_id}/output.csv"),
        ("GET", f"/requests/{request_id}/events"),
        ("POST", f"/requests/{request_id}/retry"),
        ("GET", f"/requests/{request_id}/webhooks"),
        ("POST", f"/requests/{request_id}/webhooks/redeliver"),
        ("POST", f"/requests/{request_id}/cancel"),
        ("DELETE", f"/requests/{request_id}"),  # last: for its owner, it ends the request
    ]


async def test_calls_without_a_valid_key_are_401_with_a_challenge(
    live: Live, http: aiohttp.ClientSession
) -> None:
    some_id = str(uuid.uuid4())
    calls = [("POST", "/upload"), ("GET", "/queue"), ("GET", "/requests"), *request_routes(some_id)]
    for method, path in calls:
        csv = {"data": CSV, "headers": {"Content-Type": "text/csv"}} if path == "/upload" else {}
        status, body, headers = await answer(http, method, f"{live.base}{path}", **csv)
        assert (status, body["error"]["code"]) == (401, "unauthenticated"), path
        assert headers["WWW-Authenticate"] == CHALLENGE
        wrong_keys = (bearer("imgpipe_wrong"), bearer(key_hash(ACME)), {"Authorization": "Basic x"})
        for wrong in wrong_keys:
            status, body, headers = await answer(
                http, method, f"{live.base}{path}", headers=wrong, data=csv.get("data")
            )
            assert (status, body["error"]["code"]) == (401, "unauthenticated"), path
            assert headers["WWW-Authenticate"] == f'{CHALLENGE}, error="invalid_token"'
    # Probes, the contract and its page answer without a key.
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        async with http.get(f"{live.base}{path}") as response:
            assert response.status == 200, path


async def test_the_pages_without_javascript_answer_401_with_the_key_form(
    live: Live, http: aiohttp.ClientSession
) -> None:
    path = f"/ui/requests/{uuid.uuid4()}"
    async with http.get(f"{live.base}{path}", headers={"Accept": "text/html"}) as response:
        assert response.status == 401
        assert response.content_type == "text/html"
        assert response.headers["WWW-Authenticate"] == CHALLENGE
        page = await response.text()
    assert '<form class="key-form" method="post" action="/session">' in page
    assert f'name="next" value="{path}"' in page  # signed in, the browser comes back here


async def test_a_request_is_404_to_every_other_key(live: Live, http: aiohttp.ClientSession) -> None:
    request_id = await upload(http, live, ACME)
    connection = await asyncpg.connect(live.database_url)
    try:
        owner = await connection.fetchval(
            "SELECT owner FROM requests WHERE id = $1", uuid.UUID(request_id)
        )
    finally:
        await connection.close()
    assert owner == "acme"
    await final(http, live, ACME, request_id)

    missing = str(uuid.uuid4())
    for (method, path), (_, missing_path) in zip(
        request_routes(request_id), request_routes(missing), strict=True
    ):
        status, body, _ = await answer(http, method, f"{live.base}{path}", headers=bearer(GLOBEX))
        assert (status, body["error"]["code"]) == (404, "not_found"), path
        # Word for word what an id that does not exist gets.
        _, absent, _ = await answer(
            http, method, f"{live.base}{missing_path}", headers=bearer(GLOBEX)
        )
        assert body["error"]["message"].replace(request_id, missing) == absent["error"]["message"]

    # The owner reads, downloads, follows and retries it, cancels the retry (or learns with a
    # 409 that it has failed again already), then deletes it. Redeliver is a 409 only the
    # owner learns: this request has no webhook.
    owner_answers = {"redeliver": (409,), "cancel": (200, 409), "DELETE": (204,)}
    for method, path in request_routes(request_id):
        async with http.request(method, f"{live.base}{path}", headers=bearer(ACME)) as response:
            last = "DELETE" if method == "DELETE" else path.rsplit("/", 1)[-1]
            expected = owner_answers.get(last, (200, 202))
            assert response.status in expected, path
            await response.read()


async def test_requests_at_once_each_forward_their_own_key(
    live: Live, http: aiohttp.ClientSession
) -> None:
    request_id = await upload(http, live, ACME)

    async def status_of(key: str) -> int:
        async with http.get(f"{live.base}/status/{request_id}", headers=bearer(key)) as response:
            await response.read()
            return response.status

    keys = [ACME, GLOBEX] * 20
    statuses = await asyncio.gather(*(status_of(key) for key in keys))
    assert statuses == [200 if key == ACME else 404 for key in keys]


async def test_stored_files_are_served_without_a_key(
    live: Live, http: aiohttp.ClientSession
) -> None:
    request_id = await upload(http, live, ACME)
    await final(http, live, ACME, request_id)
    store = live.stack.data_dir / "store"
    [csv_file] = [path for path in store.rglob("*.csv") if request_id in path.as_posix()]
    async with http.get(f"{live.base}/files/{csv_file.relative_to(store).as_posix()}") as response:
        assert response.status == 200
        assert (await response.read()) == csv_file.read_bytes()


async def test_the_rate_limit_is_429_with_retry_after_and_resource_exhausted_on_grpc(
    live: Live, http: aiohttp.ClientSession
) -> None:
    # One call a minute, one at once: the first call passes, the next waits about a minute.
    async with http.get(f"{live.base}/queue", headers=bearer(SLOW)) as response:
        assert response.status == 200
    status, body, headers = await answer(http, "GET", f"{live.base}/queue", headers=bearer(SLOW))
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert "rate=1/min burst=1" in body["error"]["message"]
    assert [d["column"] for d in body["error"]["details"]] == ["rate"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    # Other keys have their own budget.
    async with http.get(f"{live.base}/queue", headers=bearer(GLOBEX)) as response:
        assert response.status == 200

    async with grpc.aio.insecure_channel(live.status_addr) as channel:
        stub = status_grpc.StatusServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetQueueStats(
                status_pb.GetQueueStatsRequest(),
                metadata=(("authorization", f"Bearer {SLOW}"),),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_direct_grpc_callers_authenticate_and_see_their_own_requests(
    live: Live, http: aiohttp.ClientSession
) -> None:
    request_id = await upload(http, live, ACME)
    async with grpc.aio.insecure_channel(live.status_addr) as channel:
        stub = status_grpc.StatusServiceStub(channel)
        get = status_pb.GetRequestRequest(request_id=request_id)
        for metadata, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", "Bearer imgpipe_wrong"),), grpc.StatusCode.UNAUTHENTICATED),
            ((("authorization", f"Bearer {GLOBEX}"),), grpc.StatusCode.NOT_FOUND),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetRequest(get, metadata=metadata, timeout=10)
            assert caught.value.code() == code
        got = await stub.GetRequest(
            get, metadata=(("authorization", f"Bearer {ACME}"),), timeout=10
        )
        assert got.request.request_id == request_id


async def test_size_limits_are_413_naming_the_setting(
    live: Live, http: aiohttp.ClientSession
) -> None:
    big = b"S. No.,Product Name,Input Image Urls\n" + b"x" * UPLOAD_LIMIT
    # Refused from Content-Length before reading, and while streaming a chunked body.
    for data in (big, _chunks(big)):
        status, body, _ = await answer(
            http,
            "POST",
            f"{live.base}/upload",
            data=data,
            headers={**bearer(ACME), "Content-Type": "text/csv"},
        )
        assert (status, body["error"]["code"]) == (413, "too_large")
        assert body["error"]["message"] == (
            f"the upload exceeds IMGPIPE_MAX_UPLOAD_BYTES={UPLOAD_LIMIT} bytes"
        )

    rows = "S. No.,Product Name,Input Image Urls\n" + "".join(
        f"{i},Shoe,{REFUSED}/{i}.jpg\n" for i in range(1, ROW_LIMIT + 2)
    )
    status, body, _ = await answer(
        http,
        "POST",
        f"{live.base}/upload",
        data=rows.encode(),
        headers={**bearer(ACME), "Content-Type": "text/csv"},
    )
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert body["error"]["message"] == f"the CSV exceeds IMGPIPE_MAX_ROWS={ROW_LIMIT} rows"
    assert [d["row"] for d in body["error"]["details"]] == [ROW_LIMIT + 2]


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


async def test_a_browser_signs_in_with_a_cookie(live: Live, http: aiohttp.ClientSession) -> None:
    request_id = await upload(http, live, ACME)
    status_path = f"/status/{request_id}"

    status, body, headers = await answer(
        http, "POST", f"{live.base}/session", data={"key": "imgpipe_wrong"}, allow_redirects=False
    )
    assert (status, body["error"]["code"]) == (401, "unauthenticated")
    assert "Set-Cookie" not in headers

    async with http.post(
        f"{live.base}/session",
        data={"key": ACME, "next": status_path},
        headers={"Origin": live.base},
        allow_redirects=False,
    ) as response:
        assert response.status == 303
        assert response.headers["Location"] == status_path
        cookie = response.headers["Set-Cookie"]
    attributes = [part.strip() for part in cookie.split(";")]
    name, _, session = attributes[0].partition("=")
    # The cookie holds a session id made with the key, never the key itself.
    assert name == "imgpipe_session" and session.startswith("ses_") and ACME not in cookie
    assert {"HttpOnly", "Path=/", "SameSite=Strict"} <= set(attributes)
    assert any(a.startswith("Max-Age=") and int(a.split("=")[1]) > 3600 for a in attributes)
    assert "Secure" not in attributes  # plain http here; https and X-Forwarded-Proto add it

    with_cookie = {"Cookie": f"imgpipe_session={session}"}
    async with http.get(f"{live.base}{status_path}", headers=with_cookie) as response:
        assert response.status == 200
        assert (await response.json())["request_id"] == request_id
    # The session acts for its key's owner: another key's request is 404 to it.
    other = await upload(http, live, GLOBEX)
    async with http.get(f"{live.base}/status/{other}", headers=with_cookie) as response:
        assert response.status == 404

    async with http.post(
        f"{live.base}/session",
        data={"key": ACME, "next": "//evil.example/"},
        allow_redirects=False,
    ) as response:
        assert (response.status, response.headers["Location"]) == (303, "/")
    status, body, headers = await answer(
        http,
        "POST",
        f"{live.base}/session",
        data={"key": ACME},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert (status, body["error"]["code"]) == (403, "permission_denied")
    assert "Set-Cookie" not in headers

    async with http.post(
        f"{live.base}/session/logout", headers=with_cookie, allow_redirects=False
    ) as response:
        assert (response.status, response.headers["Location"]) == (303, "/")
        cleared = response.headers["Set-Cookie"]
    assert cleared.startswith('imgpipe_session="";') and "Max-Age=0" in cleared

    # Signing out ended the session on the server: the old cookie is refused.
    async def signed_out() -> bool:
        async with http.get(f"{live.base}{status_path}", headers=with_cookie) as response:
            return response.status == 401

    await wait_until_async(signed_out, timeout=10, message="the session ended")


async def imgpipe(live: Live, *argv: str, key: str | None) -> tuple[int, str]:
    """`python -m imgpipe ARGV` with IMGPIPE_URL and IMGPIPE_API_KEY (when given)."""
    return await run_cli(live.base, *argv, key=key)


async def test_the_cli_sends_imgpipe_api_key(live: Live, http: aiohttp.ClientSession) -> None:
    request_id = await upload(http, live, ACME)
    code, out = await imgpipe(live, "status", request_id, "--json", key=ACME)
    assert code == 0, out
    assert request_id in out
    code, _ = await imgpipe(live, "status", request_id, key=None)
    assert code == 8  # not authorized
    code, _ = await imgpipe(live, "status", request_id, key=GLOBEX)
    assert code == 4  # not found: another key's request
    code, out = await imgpipe(live, "--api-key", ACME, "status", request_id, key="imgpipe_wrong")
    assert code == 0, out  # the flag wins over the environment


def test_every_service_warns_when_auth_is_off(
    tmp_path: Path, database_url: str, redis_server_url: str, redis_prefix: str
) -> None:
    common = {
        "IMGPIPE_DATABASE_URL": database_url,
        "IMGPIPE_REDIS_URL": redis_server_url,
        # Never the default prefix on a shared server: the session's, deleted at its end.
        "IMGPIPE_REDIS_PREFIX": f"{redis_prefix}:auth-off",
    }
    services = {
        "services.ingest": {**common, "IMGPIPE_GRPC_LISTEN": f"127.0.0.1:{free_tcp_port()}"},
        "services.status": {**common, "IMGPIPE_GRPC_LISTEN": f"127.0.0.1:{free_tcp_port()}"},
        "gateway": {"IMGPIPE_HTTP_LISTEN": f"127.0.0.1:{free_tcp_port()}"},
    }
    started = []
    try:
        for module, env in services.items():
            log = tmp_path / f"{module}.log"
            started.append((start_service(module, env, log), log))
        for process, log in started:

            def warned(process: Any = process, log: Path = log) -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"exited: {log.read_text(errors='replace')}")
                return AUTH_OFF_WARNING in log.read_text(errors="replace")

            wait_until(warned, timeout=60, interval=0.1, message=f"the warning in {log.name}")
            assert '"level": "warning"' in next(
                line for line in log.read_text().splitlines() if AUTH_OFF_WARNING in line
            )
    finally:
        for process, _ in started:
            process.terminate()
        for process, _ in started:
            process.wait(timeout=30)
