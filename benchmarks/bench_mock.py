"""Capacity of the mock teacher, measured with a bare client that does not parse bodies.

The harvester benchmarks are only meaningful if the mock serves far more requests per
second than any client under test can consume. This script drives the mock with the
cheapest client possible: raw asyncio streams on keep-alive connections that read the
status line, the headers and ``Content-Length`` bytes, and nothing else. It reports
requests/s and the mock's own CPU seconds per 1000 requests (from ``GET /stats``).

    python -m benchmarks.bench_mock --requests 20000 --concurrency 256 --latency-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from benchmarks.common import print_table, write_results
from benchmarks.mock_teacher import MockConfig, MockProcess

REQUEST_BODY = (
    b'{"model":"mock-teacher","messages":[{"role":"user","content":"Once upon a time %d"}],'
    b'"max_tokens":64,"logprobs":true,"top_logprobs":20}'
)


@dataclass(slots=True)
class BareResult:
    latency_ms: float
    concurrency: int
    requests: int
    wall_s: float
    requests_per_s: float
    ceiling_per_s: float | None
    mock_cpu_s_per_1000: float
    response_bytes: int


async def _worker(host: str, port: int, path: str, jobs: asyncio.Queue[int], sizes: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while True:
            try:
                index = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = REQUEST_BODY % index
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), len(body), body)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"mock returned {head.split(b' ', 2)[1].decode()}, expected 200")
            length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            await reader.readexactly(length)
            sizes.append(length)
    finally:
        writer.close()


async def drive(url: str, requests: int, concurrency: int, endpoint: str = "chat") -> tuple[float, list[int]]:
    """Send ``requests`` requests over ``concurrency`` connections; return wall seconds and body sizes."""
    parts = urlsplit(url)
    path = parts.path + ("/chat/completions" if endpoint == "chat" else "/completions")
    jobs: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        jobs.put_nowait(index)
    sizes: list[int] = []
    start = time.perf_counter()
    workers = [_worker(parts.hostname, parts.port, path, jobs, sizes) for _ in range(concurrency)]
    await asyncio.gather(*workers)
    return time.perf_counter() - start, sizes


def measure(latency_ms: float, requests: int, concurrency: int) -> BareResult:
    with MockProcess(MockConfig(latency_ms=latency_ms)) as mock:
        asyncio.run(drive(mock.url, min(requests, 500), concurrency))  # warm-up
        before = mock.stats()
        wall_s, sizes = asyncio.run(drive(mock.url, requests, concurrency))
        after = mock.stats()
    served = after["requests"] - before["requests"]
    return BareResult(
        latency_ms=latency_ms,
        concurrency=concurrency,
        requests=served,
        wall_s=round(wall_s, 3),
        requests_per_s=round(served / wall_s, 1),
        ceiling_per_s=round(concurrency / (latency_ms / 1000), 1) if latency_ms else None,
        mock_cpu_s_per_1000=round((after["cpu_s"] - before["cpu_s"]) / served * 1000, 4),
        response_bytes=round(sum(sizes) / len(sizes)),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=256, help="open connections")
    parser.add_argument("--latency-ms", type=float, action="append", help="mock latency; repeat for several (default 0 and 100)")
    parser.add_argument("--quick", action="store_true", help="2,000 requests per measurement")
    args = parser.parse_args(argv)
    requests = 2_000 if args.quick else args.requests

    results = [measure(latency, requests, args.concurrency) for latency in args.latency_ms or [0.0, 100.0]]
    rows = [asdict(r) for r in results]
    print_table(rows)
    path = write_results("bench_mock", {"results": rows})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
