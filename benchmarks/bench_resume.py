"""Resume cost: a harvest over a store that already contains every response.

The first run harvests N prompts into a fresh store; the second run repeats the same
command on the same store. The second run must send no request at all, counted on the
mock teacher rather than taken from the harvester's own report. It should take a small
fraction of the first run's wall time, because reading the stored request ids and
hashing the prompts is all it has to do.

    python -m benchmarks.bench_resume --prompts 2000
    python -m benchmarks.bench_resume --quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import Any

from benchmarks import harvester
from benchmarks.common import OUT_DIR, print_table, run_measured, write_prompts, write_results
from benchmarks.mock_teacher import MockConfig, MockProcess


def harvest_once(mock: MockProcess, spec: harvester.HarvestSpec, label: str) -> dict[str, Any]:
    before = mock.stats()["requests"]
    child = run_measured(harvester.command(spec))
    sent = mock.stats()["requests"] - before
    if child.returncode != 0:
        raise SystemExit(f"{label} harvest failed with exit status {child.returncode}:\n{child.stderr[-2000:]}")
    return {
        "run": label,
        "requests_on_mock": sent,
        "process_wall_s": round(child.wall_s, 3),
        "cpu_s": round(child.cpu_s, 3),
        "peak_rss_mb": round(child.peak_rss_mb, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Wall time of a harvest resumed over a complete store.")
    parser.add_argument("--prompts", type=int, default=2_000, help="prompts harvested by the first run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="mock teacher latency, in ms")
    parser.add_argument("--quick", action="store_true", help="300 prompts")
    args = parser.parse_args(argv)
    count = 300 if args.quick else args.prompts

    store = OUT_DIR / "bench-resume-store"
    shutil.rmtree(store, ignore_errors=True)
    prompts = write_prompts(count)
    with MockProcess(MockConfig(latency_ms=args.latency_ms)) as mock:
        spec = harvester.HarvestSpec(base_url=mock.url, prompts=prompts, store=store, concurrency=args.concurrency)
        first = harvest_once(mock, spec, "first")
        second = harvest_once(mock, spec, "second (resume)")
    shutil.rmtree(store, ignore_errors=True)

    rows = [first, second]
    print_table(rows)
    ratio = second["process_wall_s"] / first["process_wall_s"]
    print(f"second/first wall time: {ratio:.3f}; requests sent by the second run: {second['requests_on_mock']}")
    path = write_results("bench_resume", {
        "settings": {"prompts": count, "concurrency": args.concurrency, "latency_ms": args.latency_ms},
        "results": rows, "wall_ratio": round(ratio, 4),
    })
    print(f"results written to {path}")
    if second["requests_on_mock"] != 0:
        sys.exit(f"the resumed run sent {second['requests_on_mock']} requests; expected 0")


if __name__ == "__main__":
    main()
