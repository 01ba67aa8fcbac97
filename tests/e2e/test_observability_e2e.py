"""End to end: one request through the real stack with IMGPIPE_DEV_METRICS_BASE_PORT set; every
process's /metrics counts it, and the caller's trace id is on the log lines of every service
that handled it."""

from __future__ import annotations

import base64
import csv
import io
import json
import secrets
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from services.common.tracing import parse_traceparent
from services.local.launcher import metrics_ports
from testing.listeners import serve_receiver
from testing.origin import ImageOrigin
from testing.polling import wait_until, wait_until_async
from testing.ports import free_port_block
from testing.stack import StartStack, public_address
from tests.e2e.test_pipeline import wait_completed
from tests.e2e.test_webhooks_e2e import received

pytestmark = pytest.mark.e2e

TRACE_ID = secrets.token_hex(16)
TRACEPARENT = f"00-{TRACE_ID}-{secrets.token_hex(8)}-01"


def _free_metrics_base(workers: int) -> int:
    ports = metrics_ports(0, workers).values()  # the offsets from the base
    return free_port_block(sorted(ports))


async def scrape(http: aiohttp.ClientSession, port: int) -> list[Sample]:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_metrics_of_every_process_and_one_trace_across_the_stack(
    image_origin: ImageOrigin, start_live_stack: StartStack
) -> None:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    image_origin.missing.add("/img/gone.jpg")  # a 404 at the origin: HTTP_STATUS, not retried
    async with serve_receiver(secret) as receiver:
        metrics_base = _free_metrics_base(workers=1)
        stack = start_live_stack(
            image_origin.port,
            receiver.port,
            **public_address(),
            IMGPIPE_WEBHOOK_SECRET=secret,
            IMGPIPE_DEV_WORKERS="1",
            IMGPIPE_DEV_METRICS_BASE_PORT=str(metrics_base),
            IMGPIPE_DB_POOL_SIZE="3",  # the worker's too, whatever its concurrency (64)
        )
        base = stack.base_url
        ports = metrics_ports(metrics_base, 1)
        urls = [image_origin.url(path) for path in ("/img/a.jpg", "/img/b.jpg", "/img/gone.jpg")]
        out = io.StringIO()
        csv.writer(out).writerows(
            [["S. No.", "Product Name", "Input Image Urls"], ["1", "Shoe", ",".join(urls)]]
        )

        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("webhook_url", receiver.url("/hooks/imgpipe"))
            form.add_field(
                "file", out.getvalue().encode(), filename="p.csv", content_type="text/csv"
            )
            async with http.post(
                f"{base}/upload", data=form, headers={"traceparent": TRACEPARENT}
            ) as response:
                assert response.status == 202, await response.text()
                request_id = (await response.json())["request_id"]
                answered = parse_traceparent(response.headers["traceparent"])
            assert answered is not None and answered.trace_id == TRACE_ID
            status = await wait_completed(http, base, request_id)
            assert (status["progress"]["images_done"], status["progress"]["images_failed"]) == (
                2,
                1,
            )
            await received(receiver, 1)
            async with http.get(f"{base}/no/such/route") as response:
                assert response.status == 404
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 404  # never on the public API port

            # --- metrics, process by process
            worker = await scrape(http, ports["worker-1"])
            assert value(worker, "imgpipe_images_total", outcome="done", code="") == 2
            assert value(worker, "imgpipe_images_total", outcome="failed", code="HTTP_STATUS") == 1
            for stage in ("fetch", "decode", "encode", "store"):
                assert value(worker, "imgpipe_stage_duration_seconds_count", stage=stage) == 2
                assert value(worker, "imgpipe_stage_duration_seconds_sum", stage=stage) > 0
            bytes_in = value(worker, "imgpipe_image_bytes_total", direction="in")
            bytes_out = value(worker, "imgpipe_image_bytes_total", direction="out")
            assert bytes_in == status["progress"]["bytes_in"] > 0
            assert bytes_out == status["progress"]["bytes_out"] > 0
            # Accepted to final, once per request; every download and decode took a budget,
            # and every download, the failed one too, took its turn for a connection.
            assert value(worker, "imgpipe_request_duration_seconds_count", status="Completed") == 1
            assert value(worker, "imgpipe_request_duration_seconds_sum", status="Completed") > 0
            assert value(worker, "imgpipe_budget_wait_seconds_count", budget="bytes") >= 2
            assert value(worker, "imgpipe_budget_wait_seconds_count", budget="pixels") == 2
            assert value(worker, "imgpipe_budget_wait_seconds_count", budget="connections") >= 3
            assert value(worker, "imgpipe_db_pool_max_connections") == 3
            assert value(worker, "imgpipe_db_pool_waiting") == 0

            gateway = await scrape(http, ports["gateway"])
            upload = {"method": "POST", "route": "/upload", "status": "202"}
            assert value(gateway, "http_requests_total", **upload) == 1
            polled = {"method": "GET", "route": "/status/{request_id}", "status": "200"}
            assert value(gateway, "http_requests_total", **polled) >= 1
            assert value(gateway, "http_requests_total", route="unmatched", status="404") == 2
            assert value(gateway, "http_request_duration_seconds_count", route="/upload") == 1
            assert not any(s.labels.get("route", "").endswith(request_id) for s in gateway)

            ingest = await scrape(http, ports["ingest"])
            assert value(ingest, "imgpipe_db_pool_max_connections") == 3
            call = {"grpc_service": "imgpipe.v1.IngestService", "grpc_method": "UploadCsv"}
            assert value(ingest, "grpc_server_handled_total", **call, grpc_code="OK") == 1
            assert value(ingest, "grpc_server_handling_seconds_count", **call) == 1

            async def status_metrics() -> list[Sample] | None:
                samples = await scrape(http, ports["status"])
                attempts = value(samples, "imgpipe_webhook_attempts_total", result="succeeded")
                return samples if attempts == 1 else None

            status_samples = await wait_until_async(
                status_metrics, timeout=30, interval=0.2, message="the webhook attempt counted"
            )
            read = {"grpc_service": "imgpipe.v1.StatusService", "grpc_method": "GetRequest"}
            assert value(status_samples, "grpc_server_handled_total", **read, grpc_code="OK") >= 1
            assert not any(
                s.labels.get("grpc_service", "").startswith("grpc.") for s in status_samples
            )
            gauges = {(s.name, s.labels.get("group")) for s in status_samples}
            assert {
                ("imgpipe_stream_lag", "workers"),
                ("imgpipe_stream_pending", "workers"),
                ("imgpipe_stream_lag", "webhooks"),
                ("imgpipe_stream_pending", "webhooks"),
                ("imgpipe_dead_letter_entries", None),
                ("imgpipe_stream_oldest_age_seconds", "workers"),
                ("imgpipe_stream_oldest_age_seconds", "webhooks"),
                ("imgpipe_db_pool_connections", None),
                ("imgpipe_db_pool_waiting", None),
            } <= gauges

    # --- one trace id, with the request id, in the logs of every service that handled it
    def traced() -> dict[str, list[dict[str, Any]]]:
        by_service: dict[str, list[dict[str, Any]]] = {}
        for line in stack.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and TRACE_ID in line:
                entry = json.loads(line)
                by_service.setdefault(entry["service"], []).append(entry)
        wanted = {"gateway", "ingest", "worker", "status"}
        return by_service if wanted <= set(by_service) else {}  # {}: not yet

    by_service = wait_until(traced, timeout=10, message="log lines of the trace in every service")
    for service, entries in by_service.items():
        assert all(entry["trace_id"] == TRACE_ID for entry in entries), service
        assert any(entry.get("request_id") == request_id for entry in entries), service
    # Each process has a span of its own; the gateway's is the one it answered with.
    assert {entry["span_id"] for entry in by_service["gateway"]} == {answered.span_id}
    assert answered.span_id not in {entry["span_id"] for entry in by_service["ingest"]}
    messages = {entry["msg"] for entry in by_service["worker"]}
    assert {"image failed", "request finished"} <= messages
