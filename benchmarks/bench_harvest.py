"""Harvest throughput and CPU cost: the project's harvester against plain reference clients.

One command starts the mock teacher, then, for every prompt count and concurrency,
runs each reference client (:mod:`benchmarks.reference_clients`) and the harvester
(``pipeline harvest`` in a child process) on the same prompts. Each client runs in its
own process, so its CPU seconds and peak RSS come from the kernel's accounting of that
process (``wait4``). The mock's own CPU per 1000 requests comes from its ``/stats``.

Figures per run: requests/s over the client's work phase (without interpreter start),
CPU seconds per 1000 requests of the whole client process (imports included, for
every client alike), peak RSS, and the share of the latency ceiling
``concurrency / latency``. Ratios compare the harvester with the best reference client
at the same size and concurrency: requests/s with the fastest, CPU and memory with the
one that uses the least CPU per request.

    python -m benchmarks.bench_harvest            # 2,000 and 20,000 prompts, concurrency 64 and 256
    python -m benchmarks.bench_harvest --quick    # 500 prompts, concurrency 64, under a minute
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from benchmarks import harvester
from benchmarks.common import OUT_DIR, ChildRun, last_json_line, print_table, run_measured, write_results, write_prompts
from benchmarks.mock_teacher import MockConfig, MockProcess
from benchmarks.reference_clients import CLIENTS

# The httpx 0.29 clients (httpcore 1.0's connection pool) cost 12-15 ms of CPU per
# request at concurrency 64 on the 2-core benchmark machine. So they run only up to
# this many prompts, because more would add minutes and no information.
SLOW_CLIENT_MAX_PROMPTS = {"httpx-json": 2_000, "httpx-orjson": 2_000}
HARVESTER = "harvester"
# A client run still going after this many seconds is killed and reported as failed.
CHILD_TIMEOUT_S = 1500


@dataclass(slots=True)
class BenchConfig:
    sizes: list[int]
    concurrencies: list[int]
    clients: list[str]
    latency_ms: float = 100.0
    top_k: int = 20
    tokens: int = 64
    endpoint: str = "chat"


def run_client(client: str, url: str, prompts: Any, concurrency: int, config: BenchConfig) -> tuple[ChildRun, dict[str, Any]]:
    """Run one client process to completion; return its resource use and its own report."""
    if client == HARVESTER:
        store = OUT_DIR / "bench-harvest-store"
        shutil.rmtree(store, ignore_errors=True)
        spec = harvester.HarvestSpec(
            base_url=url, prompts=prompts, store=store, concurrency=concurrency,
            endpoint=config.endpoint, max_tokens=config.tokens, top_k=config.top_k,
        )
        child = run_measured(harvester.command(spec), timeout_s=CHILD_TIMEOUT_S)
        report = harvester.report(spec, child) if child.returncode == 0 else {}
        shutil.rmtree(store, ignore_errors=True)
        return child, report
    out = OUT_DIR / f"reference-{client}.parquet"
    argv = [
        sys.executable, "-m", "benchmarks.reference_clients", "--client", client, "--base-url", url,
        "--prompts", str(prompts), "--out", str(out), "--concurrency", str(concurrency),
        "--endpoint", config.endpoint, "--max-tokens", str(config.tokens), "--top-k", str(config.top_k),
    ]
    child = run_measured(argv, timeout_s=CHILD_TIMEOUT_S)
    report = last_json_line(child.stdout) if child.returncode == 0 else {}
    out.unlink(missing_ok=True)
    return child, report


def measure(mock: MockProcess, client: str, size: int, concurrency: int, config: BenchConfig) -> dict[str, Any]:
    prompts = write_prompts(size)
    before = mock.stats()
    child, report = run_client(client, mock.url, prompts, concurrency, config)
    after = mock.stats()
    requests = after["requests"] - before["requests"]
    row: dict[str, Any] = {"client": client, "prompts": size, "concurrency": concurrency, "requests": requests}
    if child.returncode != 0:
        tail = (child.stderr or child.stdout)[-800:]
        print(f"{client} failed with exit status {child.returncode}:\n{tail}", file=sys.stderr)
        return {**row, "status": f"failed ({child.returncode})"}
    responses = report.get("responses", requests)
    work_wall_s = report.get("work_wall_s") or child.wall_s
    ceiling = concurrency / (config.latency_ms / 1000) if config.latency_ms else None
    requests_per_s = responses / work_wall_s
    return {
        **row,
        "status": "ok",
        "responses": responses,
        "process_wall_s": round(child.wall_s, 2),
        "work_wall_s": round(work_wall_s, 2),
        "requests_per_s": round(requests_per_s, 1),
        "ceiling_share": round(requests_per_s / ceiling, 3) if ceiling else None,
        "cpu_s_per_1000": round(child.cpu_s / max(requests, 1) * 1000, 3),
        "work_cpu_s_per_1000": round(report["work_cpu_s"] / max(requests, 1) * 1000, 3) if "work_cpu_s" in report else None,
        "peak_rss_mb": round(child.peak_rss_mb, 1),
        "mock_cpu_s_per_1000": round((after["cpu_s"] - before["cpu_s"]) / max(requests, 1) * 1000, 3),
    }


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Compare the harvester with the best reference client of each size and concurrency.

    Requests/s is compared with the reference client of the highest requests/s, and CPU
    per request with the one of the lowest CPU per request. On a loaded machine these
    can be different clients.
    """
    out = []
    for harvest in (r for r in rows if r["client"] == HARVESTER and r["status"] == "ok"):
        peers = [
            r for r in rows
            if r["client"] != HARVESTER and r["status"] == "ok"
            and r["prompts"] == harvest["prompts"] and r["concurrency"] == harvest["concurrency"]
        ]
        if not peers:
            continue
        fastest = max(peers, key=lambda r: r["requests_per_s"])
        cheapest = min(peers, key=lambda r: r["cpu_s_per_1000"])
        out.append({
            "prompts": harvest["prompts"],
            "concurrency": harvest["concurrency"],
            "fastest_reference": fastest["client"],
            "requests_per_s_ratio": round(harvest["requests_per_s"] / fastest["requests_per_s"], 3),
            "cheapest_reference": cheapest["client"],
            "cpu_per_request_ratio": round(harvest["cpu_s_per_1000"] / cheapest["cpu_s_per_1000"], 3),
            "peak_rss_ratio": round(harvest["peak_rss_mb"] / cheapest["peak_rss_mb"], 3),
        })
    return out


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(description="Harvest throughput and CPU: harvester against reference clients.")
    parser.add_argument("--sizes", default="2000,20000", help="comma-separated prompt counts")
    parser.add_argument("--concurrency", default="64,256", help="comma-separated concurrency levels")
    parser.add_argument("--clients", default=",".join([*CLIENTS, HARVESTER]), help="comma-separated clients to run")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="mock teacher latency per request, in ms")
    parser.add_argument("--k", type=int, default=20, help="top logprobs per token")
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per response")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="API format")
    parser.add_argument("--quick", action="store_true", help="500 prompts at concurrency 64 only")
    args = parser.parse_args(argv)
    sizes = [500] if args.quick else [int(s) for s in args.sizes.split(",")]
    concurrencies = [64] if args.quick else [int(c) for c in args.concurrency.split(",")]
    clients = args.clients.split(",")
    unknown = set(clients) - {*CLIENTS, HARVESTER}
    if unknown:
        parser.error(f"unknown client(s) {', '.join(sorted(unknown))}; choose from {', '.join([*CLIENTS, HARVESTER])}")
    return BenchConfig(sizes, concurrencies, clients, args.latency_ms, args.k, args.tokens, args.endpoint)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    if HARVESTER in config.clients and not harvester.available():
        print("pipeline harvest is not available yet; measuring the reference clients only", file=sys.stderr)
        config.clients.remove(HARVESTER)

    rows = []
    mock_config = MockConfig(latency_ms=config.latency_ms, top_k=config.top_k, tokens=config.tokens)
    with MockProcess(mock_config) as mock:
        for size in config.sizes:
            for concurrency in config.concurrencies:
                for client in config.clients:
                    if size > SLOW_CLIENT_MAX_PROMPTS.get(client, size):
                        continue
                    row = measure(mock, client, size, concurrency, config)
                    print(f"  {client:15} prompts={size:<7} c={concurrency:<4} {row.get('requests_per_s', '-')} req/s", flush=True)
                    rows.append(row)

    columns = ["client", "prompts", "concurrency", "status", "requests_per_s", "ceiling_share",
               "cpu_s_per_1000", "work_cpu_s_per_1000", "peak_rss_mb", "mock_cpu_s_per_1000"]
    print_table(rows, columns)
    comparison = ratios(rows)
    if comparison:
        print()
        print_table(comparison)
    settings = {"latency_ms": config.latency_ms, "top_k": config.top_k, "tokens": config.tokens, "endpoint": config.endpoint}
    path = write_results("bench_harvest", {"settings": settings, "results": rows, "ratios": comparison})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
