"""End to end: the real `imgpipe` command (a subprocess) against the live stack."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from testing.origin import ImageOrigin, held_origin
from testing.ports import free_tcp_port
from testing.stack import ROOT, Stack, StartStack

pytestmark = pytest.mark.e2e

RUN_TIMEOUT = 90.0
UNKNOWN_ID = "3f1c2a4e-0000-4000-8000-000000000000"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def imgpipe(url: str, *argv: str) -> Run:
    """`python -m imgpipe ARGV` with IMGPIPE_URL=url, awaited without blocking the loop."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGPIPE_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imgpipe",
        *argv,
        cwd=ROOT,
        env={**env, "IMGPIPE_URL": url},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(
            f"imgpipe {' '.join(argv)} did not finish in {RUN_TIMEOUT} s"
        ) from None
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


def write_csv(path: Path, rows: list[tuple[str, str, list[str]]]) -> Path:
    lines = ["S. No.,Product Name,Input Image Urls"]
    lines += [f'{serial},{name},"{",".join(urls)}"' for serial, name, urls in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def without_rate(status: dict[str, Any]) -> dict[str, Any]:
    # The status service measures the rate of a final request up to now, so it changes.
    return status | {"progress": status["progress"] | {"images_per_second": None}}


def request_id_of(run: Run) -> str:
    """The id from the first line the command printed: `Request <id> accepted: ...`."""
    first = run.out.splitlines()[0]
    assert first.startswith("Request "), run.out
    return first.split()[1]


async def test_upload_wait_json_then_status_and_download(
    tmp_path: Path, module_origin: ImageOrigin, module_stack: Stack
) -> None:
    image_origin, stack = module_origin, module_stack
    rows = [
        ("10", "Trail Shoe", [image_origin.url(f"/img/shoe{i}.jpg") for i in range(2)]),
        ("7", "Tote", [image_origin.url("/img/bag.jpg")]),
    ]
    csv_path = write_csv(tmp_path / "products.csv", rows)

    run = await imgpipe(
        stack.base_url, "upload", str(csv_path), "--quality", "60", "--wait", "--json"
    )

    assert run.code == 0, run.err
    final = run.json()
    request_id = final["request_id"]
    assert final["status"] == "Completed"
    assert final["progress"]["images_total"] == final["progress"]["images_done"] == 3
    assert final["progress"]["images_failed"] == 0
    assert [p["serial_number"] for p in final["products"]] == ["10", "7"]
    assert [p["input_image_urls"] for p in final["products"]] == [urls for _, _, urls in rows]
    assert all(url for p in final["products"] for url in p["output_image_urls"])
    assert final["next_page_token"] is None
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{stack.base_url}/status/{request_id}") as response:
            assert without_rate(final) == without_rate(await response.json())
        async with http.get(final["output_csv_url"]) as response:
            output_csv = await response.read()
    assert "━" not in run.err  # --json draws no progress bar

    status = await imgpipe(stack.base_url, "status", request_id)
    assert status.code == 0, status.err
    assert status.out.startswith(f"Request {request_id}: Completed\n")
    assert "3 total: 3 done, 0 failed" in status.out
    assert "  10  Trail Shoe: 2 done" in status.out

    paged = await imgpipe(
        stack.base_url, "status", request_id, "--all", "--page-size", "1", "--json"
    )
    assert paged.code == 0, paged.err
    assert paged.json()["products"] == final["products"]

    first_page = await imgpipe(stack.base_url, "status", request_id, "--page-size", "1")
    assert "Products (1) (more pages: use --all):" in first_page.out

    out_path = tmp_path / "out.csv"
    saved = await imgpipe(stack.base_url, "download", request_id, "-o", str(out_path))
    assert saved.code == 0, saved.err
    assert out_path.read_bytes() == output_csv
    to_stdout = await imgpipe(stack.base_url, "download", request_id)
    assert to_stdout.code == 0 and to_stdout.out.encode() == output_csv


async def test_failed_image_exits_7_and_retry_brings_it_to_all_done(
    tmp_path: Path, module_origin: ImageOrigin, module_stack: Stack
) -> None:
    image_origin, stack = module_origin, module_stack
    image_origin.missing.add("/img/later.jpg")
    later = image_origin.url("/img/later.jpg")
    csv_path = write_csv(
        tmp_path / "products.csv", [("1", "Shoe", [image_origin.url("/img/now.jpg"), later])]
    )

    run = await imgpipe(stack.base_url, "upload", str(csv_path), "--wait")

    assert run.code == 7, run.out + run.err
    request_id = request_id_of(run)
    assert f"Status: {stack.base_url}/status/{request_id}" in run.out
    assert f"Request {request_id}: Completed\n" in run.out
    assert "2 total: 1 done, 1 failed" in run.out
    assert "% saved)" in run.out
    assert f"output CSV  {stack.base_url}/requests/{request_id}/output.csv" in run.out
    failed = run.out.splitlines()[-2:]
    assert failed[0] == "Failed images:"
    assert failed[1].startswith(f"  {later}  HTTP_STATUS: ")
    assert "404" in failed[1]

    image_origin.missing.clear()
    retried = await imgpipe(stack.base_url, "retry", request_id, "--wait", "--json")

    assert retried.code == 0, retried.out + retried.err
    final = retried.json()
    assert final["status"] == "Completed"
    assert (final["progress"]["images_done"], final["progress"]["images_failed"]) == (2, 0)
    assert final["products"][0]["errors"] == []
    assert all(final["products"][0]["output_image_urls"])


async def test_errors_exit_with_their_codes(tmp_path: Path, start_live_stack: StartStack) -> None:
    async with held_origin() as (port, release):
        stack = start_live_stack(
            port,
            # The held image must not time out while the test looks at its request.
            IMGPIPE_FETCH_STALL_TIMEOUT="60",
            IMGPIPE_FETCH_TOTAL_TIMEOUT="60",
        )
        url = stack.base_url
        bad = tmp_path / "bad.csv"
        bad.write_text(
            "S. No.,Product Name,Input Image Urls\n"
            "1,Shoe,http://127.0.0.1:9/a.jpg\n"
            "2,,http://127.0.0.1:9/b.jpg\n"
            "3,Hat,not-a-url\n"
        )
        invalid = await imgpipe(url, "upload", str(bad), "--wait")
        assert invalid.code == 3 and invalid.out == ""
        assert "row 3, column Product Name: empty product name" in invalid.err
        assert "row 4, column Input Image Urls: " in invalid.err

        as_json = await imgpipe(url, "upload", str(bad), "--json")
        assert as_json.code == 3
        assert as_json.json()["error"]["code"] == "invalid_csv"
        assert len(as_json.json()["error"]["details"]) == 2

        for argv in (["status"], ["download"], ["retry"]):
            missing = await imgpipe(url, *argv, UNKNOWN_ID)
            assert missing.code == 4, (argv, missing.err)
            assert "not_found" in missing.err

        held = write_csv(
            tmp_path / "held.csv", [("1", "Shoe", [f"http://127.0.0.1:{port}/img/a.jpg"])]
        )
        accepted = await imgpipe(url, "upload", str(held), "--json")
        assert accepted.code == 0, accepted.err
        request_id = accepted.json()["request_id"]
        out_path = tmp_path / "early.csv"
        early = await imgpipe(url, "download", request_id, "-o", str(out_path))
        assert early.code == 5
        assert "not finished yet" in early.err
        assert not out_path.exists() and not (tmp_path / ".early.csv.part").exists()

        release.set()
        done = await imgpipe(url, "upload", str(held), "--wait", "--json")
        assert done.code == 0, done.err
        assert done.json()["status"] == "Completed"


async def test_nothing_listening_exits_6() -> None:
    url = f"http://127.0.0.1:{free_tcp_port()}"
    run = await imgpipe(url, "status", UNKNOWN_ID)
    assert run.code == 6
    assert f"cannot reach the imgpipe server at {url}" in run.err
    as_json = await imgpipe(url, "retry", UNKNOWN_ID, "--json")
    assert as_json.code == 6
    assert as_json.json()["error"]["code"] == "unavailable"
