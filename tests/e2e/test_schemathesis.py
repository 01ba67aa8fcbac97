"""The live gateway keeps its contract: schemathesis against the real stack finds no 5xx and no
answer that breaks gateway/openapi.json.

Network: every request goes to the stack on 127.0.0.1, and nothing the stack is given can make
it fetch from anywhere. `POST /upload` is left out of generation, because a generated CSV would
have the workers fetch generated URLs; it is covered by the explicit cases below, whose image
and webhook URLs are `http://127.0.0.1:9/...`, which the fetch guard refuses without
connecting (loopback, and a port outside IMGPIPE_FETCH_PORTS). The SSE stream is left out too
(generation cannot wait for a stream to end); its 404 and a finished stream are checked here.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from openapi_schema_validator import OAS31Validator, validate
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode, Response

from gateway.openapi import DOCUMENT
from testing.polling import wait_until
from testing.stack import Stack, start_stack

pytestmark = pytest.mark.e2e

# The checks this contract promises; the others (negative data rejection, auth, ...) are about
# behaviour the document does not state.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}}}
)
# Per operation. Derandomized and without an example database, so every run sends the same
# cases; without shrinking, since each failure already comes with the request that caused it.
EXAMPLES = 30
# Refused by the fetch guard before any connection: loopback, and port 9 is not allowed.
REFUSED = "http://127.0.0.1:9"
# Accepted at upload (a name: only DNS tells where it leads), refused at delivery: loopback.
HOOK = "http://localhost/hook"
UPLOAD_LIMIT = 64 * 1024
CSV = (
    "S. No.,Product Name,Input Image Urls\n"
    f'1,Shoe,"{REFUSED}/shoe-front.jpg,{REFUSED}/shoe-back.jpg"\n'
    f"2,Hat,{REFUSED}/hat.jpg\n"
).encode()
BAD_CSV = (
    b"S. No.,Product Name,Input Image Urls\n1,,not-a-url\n"
    b"5,Hat,http://127.0.0.1:9/a.jpg\n5,Cap,http://127.0.0.1:9/b.jpg\n"
)


@dataclass(frozen=True)
class Live:
    """The running stack and what was put in it before generation starts."""

    stack: Stack
    document: dict[str, Any]
    request_id: str  # a final request: every image refused by the fetch guard
    webhook_request_id: str  # the same, with a webhook_url
    file_key: str  # a file in the stack's file:// store

    @property
    def base_url(self) -> str:
        return self.stack.base_url


def load_schema(base_url: str) -> BaseSchema:
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json", config=CONFIG)


def operation(schema: BaseSchema, method: str, path: str) -> APIOperation[Any, Any, Any, Any]:
    return schema[path][method]


def call(schema: BaseSchema, base_url: str, method: str, path: str, **case: Any) -> Response:
    """One explicit case: sent to the live gateway, its answer validated against the document."""
    made = operation(schema, method, path).Case(**case)
    response = made.call(base_url=base_url)
    made.validate_response(response)
    return response


def upload(schema: BaseSchema, base_url: str, body: bytes, **case: Any) -> Response:
    return call(schema, base_url, "POST", "/upload", body=body, media_type="text/csv", **case)


def wait_final(schema: BaseSchema, base_url: str, request_id: str) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        response = call(
            schema,
            base_url,
            "GET",
            "/status/{request_id}",
            path_parameters={"request_id": request_id},
        )
        body: dict[str, Any] = response.json()
        return body if body["status"] in ("Completed", "Failed") else None

    body = wait_until(final, timeout=60, interval=0.2, message=f"request {request_id} final")
    assert body is not None  # wait_until returns only a truthy answer
    return body


def wait_failed_again(schema: BaseSchema, base_url: str, request_id: str) -> None:
    """The generated calls may have reopened the live request (a retry: it fails again at
    once) or cancelled it while a retry had it open (the web page's cancel is generated too);
    a retry resumes a Cancelled request, and it ends Failed."""
    by_id = {"request_id": request_id}

    def settled() -> str | None:
        status = call(schema, base_url, "GET", "/status/{request_id}", path_parameters=by_id)
        found: str = status.json()["status"]
        return found if found in ("Completed", "Failed", "Cancelled") else None

    if wait_until(settled, timeout=60, interval=0.2, message="the live request final") == (
        "Cancelled"
    ):
        retried = call(
            schema, base_url, "POST", "/requests/{request_id}/retry", path_parameters=by_id
        )
        assert retried.status_code == 202, retried.text
    wait_final(schema, base_url, request_id)


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, database_url: str, redis_server_url: str
) -> Iterator[Live]:
    stack = start_stack(
        tmp_path_factory.mktemp("schemathesis"),
        {
            "IMGPIPE_DATABASE_URL": database_url,
            "IMGPIPE_REDIS_URL": redis_server_url,
            "IMGPIPE_DEV_WORKERS": "1",
            "IMGPIPE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        },
    )
    try:
        schema = load_schema(stack.base_url)
        base = stack.base_url
        first = upload(schema, base, CSV).json()["request_id"]
        hooked = upload(schema, base, CSV, query={"webhook_url": HOOK})
        wait_final(schema, base, first)
        wait_final(schema, base, hooked.json()["request_id"])
        store = stack.data_dir / "store"
        key = next(path for path in sorted(store.rglob("*")) if path.is_file())
        yield Live(
            stack=stack,
            document=call(schema, base, "GET", "/openapi.json").json(),
            request_id=first,
            webhook_request_id=hooked.json()["request_id"],
            file_key=key.relative_to(store).as_posix(),
        )
    finally:
        stack.stop_and_reap()


def documented_operations() -> list[str]:
    """Every operation of the document in the repository (the live one is checked to be it)."""
    document = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return [
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    ]


# A generated CSV would make the workers fetch generated URLs, and generation cannot wait for a
# stream to end: both are covered by the explicit tests below instead.
# POST /ui/upload (the web page's form) streams to ingest the same way: tests/browser covers it.
NOT_GENERATED = {"POST /upload", "POST /ui/upload", "GET /requests/{request_id}/events"}
# Deleting the shared request would leave the other operations nothing real to read: DELETE is
# generated with ids that do not exist, and test_delete_keeps_the_contract deletes its own.
NO_REAL_ID = {"DELETE /requests/{request_id}"}


@pytest.mark.parametrize(
    "label", [label for label in documented_operations() if label not in NOT_GENERATED]
)
def test_generated_requests_keep_the_contract(live: Live, label: str) -> None:
    method, path = label.split(" ", 1)
    operation = load_schema(live.base_url)[path][method]
    known = {"request_id": live.request_id, "key": live.file_key, "name": "app.js"}
    real = {name: known[name] for name in re.findall(r"\{(\w+)\}", path)}
    # Positive and negative data, and positive data with a real request id or file key, so the
    # 200 answers are checked too and not only the 404s of ids that do not exist.
    strategies = [operation.as_strategy(mode) for mode in GenerationMode]
    if real and label not in NO_REAL_ID:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real))
    if label == "GET /status":
        by_query = {"request_id": live.request_id}
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, query=by_query))

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
    )
    @given(case=st.one_of(strategies))
    def keeps_the_contract(case: Case[Any]) -> None:
        case.call_and_validate(base_url=live.base_url)

    keeps_the_contract()


def test_delete_keeps_the_contract(live: Live) -> None:
    schema, base = load_schema(live.base_url), live.base_url
    request_id = upload(schema, base, CSV).json()["request_id"]
    wait_final(schema, base, request_id)
    ids = {"request_id": request_id}
    assert (
        call(schema, base, "POST", "/requests/{request_id}/cancel", path_parameters=ids).status_code
        == 409
    )
    assert (
        call(schema, base, "DELETE", "/requests/{request_id}", path_parameters=ids).status_code
        == 204
    )
    assert (
        call(schema, base, "DELETE", "/requests/{request_id}", path_parameters=ids).status_code
        == 404
    )


def test_uploads_keep_the_contract(live: Live) -> None:
    schema, base = load_schema(live.base_url), live.base_url
    key = {"Idempotency-Key": f"contract-{uuid.uuid4()}"}
    options = {"quality": 70, "format": "webp", "scale": 0.5, "max_width": 640}

    first = upload(schema, base, CSV, query=options, headers=key)
    assert first.status_code == 202
    assert first.json()["products"] == 2
    assert first.json()["images"] == 3
    assert first.headers["location"] == [first.json()["status_url"]]
    replay = upload(schema, base, CSV, query=options, headers=key)
    assert replay.status_code == 200
    assert replay.json()["request_id"] == first.json()["request_id"]
    other = upload(schema, base, CSV + b"3,Bag,http://127.0.0.1:9/bag.jpg\n", headers=key)
    assert other.status_code == 409

    form = call(
        schema,
        base,
        "POST",
        "/upload",
        body={"quality": 80, "format": "png", "file": CSV},
        media_type="multipart/form-data",
    )
    assert form.status_code == 202

    invalid = upload(schema, base, BAD_CSV)
    assert invalid.status_code == 400
    error = invalid.json()["error"]
    assert error["code"] == "invalid_csv"
    assert {(d.get("row"), d.get("column")) for d in error["details"]} >= {
        (2, "Product Name"),
        (2, "Input Image Urls"),
        (4, "S. No."),
    }

    bad_option = upload(schema, base, CSV, query={"quality": 0, "format": "gif"})
    assert bad_option.status_code == 400
    assert {d["column"] for d in bad_option.json()["error"]["details"]} == {"quality", "format"}

    too_large = upload(schema, base, b"x" * (UPLOAD_LIMIT + 1))
    assert too_large.status_code == 413
    assert str(UPLOAD_LIMIT) in too_large.json()["error"]["message"]

    made = operation(schema, "POST", "/upload").Case(body=CSV, media_type="text/csv")
    wrong_type = made.call(base_url=base, headers={"Content-Type": "application/json"})
    made.validate_response(wrong_type)
    assert wrong_type.status_code == 415


def test_final_request_answers_keep_the_contract(live: Live) -> None:
    schema, base = load_schema(live.base_url), live.base_url
    by_id = {"request_id": live.request_id}
    wait_failed_again(schema, base, live.request_id)

    page = call(schema, base, "GET", "/status", query={**by_id, "page_size": 1}).json()
    assert page["status"] == "Failed"
    assert len(page["products"]) == 1
    assert page["products"][0]["output_image_urls"] == [None, None]
    assert {e["code"] for e in page["products"][0]["errors"]} != set()
    assert page["next_page_token"] is not None
    last = call(
        schema,
        base,
        "GET",
        "/status/{request_id}",
        path_parameters=by_id,
        query={"page_size": 1, "page_token": page["next_page_token"]},
    ).json()
    assert [p["serial_number"] for p in last["products"]] == ["2"]
    assert last["next_page_token"] is None

    output = call(schema, base, "GET", "/requests/{request_id}/output.csv", path_parameters=by_id)
    assert output.status_code == 200
    assert output.text.splitlines()[0].startswith("S. No.,Product Name,Input Image Urls")

    def delivered() -> list[dict[str, Any]]:
        response = call(
            schema,
            base,
            "GET",
            "/requests/{request_id}/webhooks",
            path_parameters={"request_id": live.webhook_request_id},
        )
        attempts: list[dict[str, Any]] = response.json()["deliveries"]
        return attempts

    # The fetch guard refuses the webhook's loopback address: the attempt is recorded, not sent.
    [attempt, *_] = wait_until(delivered, timeout=30, interval=0.2, message="a webhook attempt")
    assert attempt["url"] == HOOK
    assert attempt["event_type"] == "request.failed"
    redeliver = call(
        schema,
        base,
        "POST",
        "/requests/{request_id}/webhooks/redeliver",
        path_parameters={"request_id": live.webhook_request_id},
    )
    assert redeliver.status_code in (202, 409)
    no_webhook = call(
        schema, base, "POST", "/requests/{request_id}/webhooks/redeliver", path_parameters=by_id
    )
    assert no_webhook.status_code == 409


def test_events_answer_json_404_and_a_finished_stream(live: Live) -> None:
    schema, base = load_schema(live.base_url), live.base_url
    path = "/requests/{request_id}/events"

    missing = call(schema, base, "GET", path, path_parameters={"request_id": str(uuid.uuid4())})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"

    # A final request's stream is one `final` event, then the end: nothing to wait for.
    wait_failed_again(schema, base, live.request_id)
    stream = call(schema, base, "GET", path, path_parameters={"request_id": live.request_id})
    assert stream.status_code == 200
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream.text, flags=re.MULTILINE)
    assert [name for name, _ in events] == ["final"]
    # Each event's data is the document's Request schema.
    request_schema = {**live.document, "$ref": "#/components/schemas/Request"}
    validate(json.loads(events[0][1]), request_schema, cls=OAS31Validator)


def test_the_document_served_is_the_one_in_the_repository(live: Live) -> None:
    assert live.document == json.loads(DOCUMENT.read_text(encoding="utf-8"))


# Answers once found to break the contract (a 500 where the document says 400 or 404),
# kept as regression tests.
def test_a_file_key_too_long_for_the_filesystem_is_404(live: Live) -> None:
    schema = load_schema(live.base_url)
    call(schema, live.base_url, "GET", "/files/{key}", path_parameters={"key": "a" * 300})


def test_a_page_token_past_the_last_row_number_is_400(live: Live) -> None:
    schema = load_schema(live.base_url)
    token = base64.urlsafe_b64encode(b"v1:2147483648").decode().rstrip("=")
    call(
        schema,
        live.base_url,
        "GET",
        "/status/{request_id}",
        path_parameters={"request_id": live.request_id},
        query={"page_token": token},
    )


def test_an_idempotency_key_that_is_not_utf8_is_400(live: Live) -> None:
    schema = load_schema(live.base_url)
    # requests sends str headers as Latin-1: this is the single byte 0xE9.
    upload(schema, live.base_url, CSV, headers={"Idempotency-Key": "é"})
