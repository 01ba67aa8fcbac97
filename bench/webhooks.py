"""B15 a slow webhook receiver: one owner's receivers hang until the delivery times out, and
another owner's request finishes meanwhile. Its webhook's delay (from the request's completion
to the POST at its receiver) is measured alone and beside the first owner's, on one stack.

Both owners send one-image requests from a local origin; the first sends
IMGPIPE_BENCH_HUNG_WEBHOOKS of them with a webhook_url whose receiver never answers (the
status service gives up after IMGPIPE_WEBHOOK_TIMEOUT, 10 s, and schedules a retry), then,
once their webhooks are being delivered, the second owner sends one request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
from aiohttp import web

from bench.pipeline import csv_bytes, log, running_stack, upload
from bench.report import Section, Target, median, table
from bench.settings import BenchSettings
from services.common.auth import key_hash, new_key
from testing.origin import serve_images

SLACK = 2.0  # seconds a prompt webhook may take beyond its time alone
HUNG_SECONDS = 60.0  # how long the hung receiver holds a POST (longer than the timeout)


@dataclass
class Receivers:
    port: int = 0
    # request id: seconds from the event (the request's finish) to the POST's arrival
    delays: dict[str, float] = field(default_factory=dict)
    hung: int = 0  # POSTs the hung receiver holds now
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def _receivers() -> AsyncIterator[Receivers]:
    receivers = Receivers()

    async def prompt(request: web.Request) -> web.Response:
        body = await request.json()
        occurred = datetime.fromisoformat(body["timestamp"]).timestamp()
        receivers.delays[body["data"]["request_id"]] = time.time() - occurred
        return web.Response(status=204)

    async def hung(request: web.Request) -> web.Response:
        receivers.hung += 1
        try:
            # A receiver that never answers in time; released when the run ends.
            await asyncio.wait_for(receivers.release.wait(), HUNG_SECONDS)
        except TimeoutError:
            pass
        finally:
            receivers.hung -= 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/prompt", prompt)
    app.router.add_post("/hung", hung)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receivers.port = runner.addresses[0][1]
    try:
        yield receivers
    finally:
        receivers.release.set()
        await runner.cleanup()


async def run(settings: BenchSettings) -> Section:
    alone, beside = [], []
    for i in range(settings.runs):
        a, b = await _one_run(settings, f"h{i}")
        alone.append(a)
        beside.append(b)
        log(f"B15 run {i + 1}/{settings.runs}: prompt webhook {b:.2f} s (alone {a:.2f} s)")
    hung = settings.hung_webhooks
    target = Target(
        "B15",
        f"a webhook's delay while another owner's {hung} webhooks hang (median of {len(beside)})",
        f"{median(beside):.2f} s (alone {median(alone):.2f} s)",
        f"≤ alone + {SLACK:g} s",
        median(beside) <= median(alone) + SLACK,
    )
    lines = [
        f"Two API keys. The first sends {hung} one-image requests whose webhook receiver holds"
        f" every POST for {HUNG_SECONDS:g} s (the status service times out after 10 s); once"
        " its webhooks are being delivered, the second sends one request with a prompt"
        " receiver. The delay is from the event's timestamp (the request's finish) to the"
        " POST's arrival; alone is the same request on the same stack before the first"
        " owner's.",
        "",
        *table(
            ("run", "prompt webhook alone, s", "beside the hung ones, s"),
            [
                (i + 1, f"{a:.2f}", f"{b:.2f}")
                for i, (a, b) in enumerate(zip(alone, beside, strict=True))
            ],
        ),
    ]
    data = {"alone_s": alone, "beside_s": beside, "hung_webhooks": hung}
    return Section("B15", "a slow webhook receiver", lines, data, [target])


async def _one_run(settings: BenchSettings, tag: str) -> tuple[float, float]:
    hung_key, prompt_key = new_key(), new_key()
    keys = (
        f"hungco:{key_hash(hung_key)} concurrent=1000 uploads=1000 rate=1000/s burst=1000,"
        f" quickco:{key_hash(prompt_key)}"
    )
    async with serve_images((400, 300)) as origin, _receivers() as receivers:
        env = {
            "IMGPIPE_API_KEYS": keys,
            "IMGPIPE_FETCH_ALLOW": f"127.0.0.1:{origin.port},127.0.0.1:{receivers.port}",
        }
        with running_stack(env) as stack:
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as http:

                async def one(key: str, path: str, name: str) -> str:
                    urls = [origin.url(f"/img/{tag}-{name}.jpg")]
                    query = {"webhook_url": receivers.url(path)}
                    accepted = await upload(
                        http, stack, csv_bytes(urls, 1, name), query, api_key=key
                    )
                    return accepted.request_id

                alone = await _delay(receivers, await one(prompt_key, "/prompt", "a"))
                await asyncio.gather(
                    *(one(hung_key, "/hung", f"s{n}") for n in range(settings.hung_webhooks))
                )
                await _until(lambda: receivers.hung >= 8, "the hung webhooks being delivered")
                beside = await _delay(receivers, await one(prompt_key, "/prompt", "b"))
    return alone, beside


async def _delay(receivers: Receivers, request_id: str) -> float:
    await _until(lambda: request_id in receivers.delays, f"the webhook of {request_id}")
    return receivers.delays[request_id]


async def _until(done: Callable[[], bool], what: str, within: float = 300.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if done():
            return
        await asyncio.sleep(0.02)  # polling a local flag, with a deadline
    raise RuntimeError(f"B15: {what} not within {within:g} s")
