"""Gateway memory under the GET /status page flood of issue 14 (finding 2).

    .venv/bin/python -m bench.page_flood

The real stack (`python -m services.local`, embedded Postgres and Redis) with one request of
1000 products, each with ten image URLs of 2000 characters: a 20 MiB page when asked for
1000 products at once. Then, as the hostile tenant did: 16 requests for that page with
equivalent token spellings (one at a time, then at once), 16 at once for distinct page sizes,
and a wait past the page cache's max_age. Prints the gateway's VmRSS and lifetime peak VmHWM
in MB after each step. Everything is on 127.0.0.1. A measurement, not a test.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench.procs import memory_mb, stack_processes
from testing.stack import start_stack

PRODUCTS = 1000
URLS_PER_PRODUCT = 10
URL_LENGTH = 2000
SETTLE_SECONDS = 80  # past the page cache's 60 s max_age


def csv_body() -> bytes:
    lines = ["S. No.,Product Name,Input Image Urls"]
    for i in range(PRODUCTS):
        stem = f"http://127.0.0.1:9/{i}/"
        urls = [stem + f"{j}/" + "a" * (URL_LENGTH - len(stem) - 10) + ".jpg" for j in range(10)]
        lines.append(f'{i + 1},Product {i},"{",".join(urls)}"')
    return ("\n".join(lines) + "\n").encode()


def spellings() -> list[str]:
    """16 spellings of 'the page after row 2' that a lenient decoder reads as one page."""
    texts = [f"v1:{'0' * zeros}2" for zeros in range(8)]
    padded = [base64.urlsafe_b64encode(text.encode()).decode() for text in texts]
    return [token.rstrip("=") + "=" * (i % 3) for i, token in enumerate(padded)] + [
        token.rstrip("=") + "===" for token in padded
    ]


def gateway_memory(pid: int) -> str:
    return f"VmRSS {memory_mb(pid, 'VmRSS') or 0:.0f} MB, peak VmHWM {memory_mb(pid) or 0:.0f} MB"


async def flood(base: str, pid: int) -> None:
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.post(
            f"{base}/upload", data=csv_body(), headers={"Content-Type": "text/csv"}
        ) as response:
            assert response.status == 202, await response.text()
            request_id = (await response.json())["request_id"]
        print(f"uploaded {request_id}: {gateway_memory(pid)}")

        async def get(query: str) -> tuple[int, int]:
            async with http.get(f"{base}/status/{request_id}?{query}") as response:
                return response.status, len(await response.read())

        steps = {
            "16 token spellings, one at a time": None,
            "16 token spellings, at once": [f"page_size=1000&page_token={t}" for t in spellings()],
            "16 page sizes, at once": [f"page_size={1000 - i}" for i in range(16)],
        }
        for name, queries in steps.items():
            if queries is None:
                answers = [await get(f"page_size=1000&page_token={t}") for t in spellings()]
            else:
                answers = list(await asyncio.gather(*(get(q) for q in queries)))
            statuses = sorted({status for status, _ in answers})
            largest = max(size for _, size in answers) / 2**20
            print(f"{name}: answers {statuses}, largest {largest:.1f} MiB; {gateway_memory(pid)}")
        await asyncio.sleep(SETTLE_SECONDS)  # a measurement over time, not a synchronisation
        print(f"{SETTLE_SECONDS} s later: {gateway_memory(pid)}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="imgpipe-page-flood-") as tmp:
        stack = start_stack(Path(tmp), {"IMGPIPE_DEV_WORKERS": "1"})
        try:
            pid = stack_processes(stack)["gateway"][0]
            print(f"started: {gateway_memory(pid)}")
            asyncio.run(flood(stack.base_url, pid))
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
