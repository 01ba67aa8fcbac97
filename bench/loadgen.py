"""A bounded open-loop HTTP load generator; B4 runs it as a process of its own.

    python -m bench.loadgen URL --rate 500 --seconds 20 [--timeout 5]

Request i is sent at start + i / rate whatever became of the earlier ones (open loop): a slow
server meets the same offered load instead of slowing the client down. Latency runs from the
scheduled time to the end of the response body, so time a request waited in the client (for a
connection, or for a late event loop) counts against the result rather than vanishing
(no coordinated omission). Hard limits: rate × seconds requests, and seconds + timeout + 5 s
of wall time; a request unfinished by then is an error. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections import Counter
from urllib.parse import urlsplit

import aiohttp

MAX_CONNECTIONS = 256
MAX_REQUESTS = 1_000_000


async def one(
    http: aiohttp.ClientSession,
    url: str,
    scheduled: float,
    latencies: list[float],
    errors: Counter[str],
) -> None:
    try:
        async with http.get(url) as response:
            await response.read()
            if response.status != 200:
                errors[f"HTTP {response.status}"] += 1
                return
    except TimeoutError:
        errors["timeout"] += 1
        return
    except aiohttp.ClientError as exc:
        errors[type(exc).__name__] += 1
        return
    latencies.append(time.perf_counter() - scheduled)


async def generate(
    url: str, rate: float, seconds: float, request_timeout: float
) -> dict[str, object]:
    count = min(MAX_REQUESTS, math.ceil(rate * seconds))
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    lags: list[float] = []
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as http:
        tasks = []
        start = time.perf_counter() + 0.05
        hard_deadline = start + seconds + request_timeout + 5
        for i in range(count):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule itself, not synchronisation
            lags.append(time.perf_counter() - scheduled)
            tasks.append(asyncio.create_task(one(http, url, scheduled, latencies, errors)))
        sent_in = time.perf_counter() - start
        _, pending = await asyncio.wait(
            tasks, timeout=max(0.0, hard_deadline - time.perf_counter())
        )
        for task in pending:
            task.cancel()
        errors["unfinished at the hard deadline"] += len(pending)
    latencies.sort()
    lags.sort()
    return {
        "url_path": urlsplit(url).path,
        "offered_rate": rate,
        "sent": count,
        "sent_in_s": round(sent_in, 3),
        "ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": {kind: n for kind, n in errors.items() if n},
        "p50_ms": _ms(percentile(latencies, 50)),
        "p90_ms": _ms(percentile(latencies, 90)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(latencies[-1] if latencies else math.nan),
        "send_lag_p99_ms": _ms(percentile(lags, 99)),
        "client_cpu_s": round(time.process_time(), 2),
    }


def percentile(ordered: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    args = parser.parse_args()
    if urlsplit(args.url).hostname != "127.0.0.1":
        parser.error("the benchmarks talk to 127.0.0.1 only")
    result = asyncio.run(generate(args.url, args.rate, args.seconds, args.timeout))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
