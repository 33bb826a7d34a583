"""Peak RSS of the harvester as the prompts file and the number of requests grow.

A harvester that streams its prompts file and flushes rows in batches keeps a flat
memory profile: the peak RSS for 100,000 prompts should be close to the peak for
10,000. For each size the script writes a prompts file of that many lines, streamed
to disk, and runs ``pipeline harvest`` with high concurrency against the mock teacher.
The mock responds after about 1 ms with small bodies (16 tokens, 5 alternatives), so a
run is bounded by the harvester's bookkeeping rather than by parsing. ``--limit`` is
passed to the harvester, which then reads only the first N lines of the file. A
1,000,000-line file can so be given without sending a million requests.

    python -m benchmarks.bench_memory --sizes 10000,100000,1000000 --limit 100000
    python -m benchmarks.bench_memory --quick
"""

from __future__ import annotations

import argparse
import shutil
from typing import Any

from benchmarks import harvester
from benchmarks.common import OUT_DIR, print_table, run_measured, write_prompts, write_results
from benchmarks.mock_teacher import MockConfig, MockProcess


def measure(mock: MockProcess, size: int, limit: int | None, concurrency: int, tokens: int, top_k: int) -> dict[str, Any]:
    prompts = write_prompts(size)
    store = OUT_DIR / "bench-memory-store"
    shutil.rmtree(store, ignore_errors=True)
    requested = min(size, limit) if limit else size
    spec = harvester.HarvestSpec(
        base_url=mock.url, prompts=prompts, store=store, concurrency=concurrency,
        max_tokens=tokens, top_k=top_k, limit=limit if limit and limit < size else None,
    )
    before = mock.stats()["requests"]
    child = run_measured(harvester.command(spec))
    sent = mock.stats()["requests"] - before
    shutil.rmtree(store, ignore_errors=True)
    status = "ok" if child.returncode == 0 else f"failed ({child.returncode})"
    if child.returncode != 0:
        print(child.stderr[-1500:])
    return {
        "prompt_lines": size,
        "requests_limit": requested,
        "requests_on_mock": sent,
        "status": status,
        "wall_s": round(child.wall_s, 1),
        "requests_per_s": round(sent / child.wall_s, 1),
        "peak_rss_mb": round(child.peak_rss_mb, 1),
    }


def flatness(rows: list[dict[str, Any]]) -> float | None:
    """Return the largest peak RSS divided by the smallest, over the successful runs."""
    peaks = [r["peak_rss_mb"] for r in rows if r["status"] == "ok"]
    return round(max(peaks) / min(peaks), 3) if len(peaks) > 1 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak RSS of pipeline harvest against prompt-file size.")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated prompt-file line counts")
    parser.add_argument("--limit", type=int, default=100_000, help="maximum prompt lines each run reads (pipeline harvest --limit); 0 for no limit")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    parser.add_argument("--latency-ms", type=float, default=1.0, help="mock teacher latency, in ms")
    parser.add_argument("--tokens", type=int, default=16, help="generated tokens per response")
    parser.add_argument("--k", type=int, default=5, help="top logprobs per token")
    parser.add_argument("--quick", action="store_true", help="1,000 and 5,000 lines, no limit")
    args = parser.parse_args(argv)
    sizes = [1_000, 5_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    limit = None if args.quick or args.limit == 0 else args.limit

    rows = []
    with MockProcess(MockConfig(latency_ms=args.latency_ms, tokens=args.tokens, top_k=args.k)) as mock:
        for size in sizes:
            row = measure(mock, size, limit, args.concurrency, args.tokens, args.k)
            print(f"  {size:>9,} lines: {row['requests_on_mock']:,} requests, peak RSS {row['peak_rss_mb']} MB", flush=True)
            rows.append(row)

    print_table(rows)
    ratio = flatness(rows)
    print(f"largest / smallest peak RSS: {ratio}")
    settings = {"limit": limit, "concurrency": args.concurrency, "latency_ms": args.latency_ms, "tokens": args.tokens, "top_k": args.k}
    path = write_results("bench_memory", {"settings": settings, "results": rows, "peak_rss_ratio": ratio})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
