"""Profile ``pipeline harvest`` against the mock teacher and sum its CPU time by area.

The harvester runs in a child process, exactly as the CLI runs it, under py-spy, a
sampling profiler that reads the process's stacks from outside it: no per-call
overhead and no change to what is measured. cProfile is not used: with a wall clock it
charges the time spent waiting for a free core to whatever function was running. With
the process CPU clock it makes a system call at every function entry and exit, which
inflates the functions called most. Each sample counts for the innermost Python
frame, so time in C code (``orjson.loads``, pyarrow) is charged to the Python function
that called it. Only samples of a thread that holds the GIL are
kept (``--gil``): threads blocked on a queue or in ``epoll`` do not count, and neither
does C code that releases the GIL (pyarrow's Parquet encoding, socket I/O), so the
store's share is a lower bound.

Frames are grouped into areas by their file: the HTTP stack (httpx, httpcore, h11,
aiohttp, anyio's sockets), the openai SDK, response parsing, the store (the project's
storage package and pyarrow), the harvest loop itself and the event loop. Every sample
taken while a module is imported, class creation included, counts as imports. The raw profile stays in ``benchmarks/out/`` in py-spy's raw
collapsed-stack format, which flamegraph.pl and speedscope read.

    python -m benchmarks.profile_harvest --prompts 2000 --concurrency 64
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import harvester
from benchmarks.common import OUT_DIR, print_table, run_measured, write_prompts, write_results
from benchmarks.mock_teacher import MockConfig, MockProcess

# (area, substrings of a frame's file or function name); the first match wins.
AREAS = (
    ("imports", ("importlib",)),
    ("parsing", ("pipeline/parsing", "json/decoder")),
    ("store", ("storage/", "pyarrow")),
    ("openai SDK", ("openai/", "pydantic")),
    ("HTTP stack", (
        "httpx", "httpcore", "h11", "aiohttp", "yarl", "multidict",
        "anyio/_backends", "anyio/abc", "anyio/_core/_typed", "socket",
    )),
    ("harvest loop", ("pipeline/",)),
    ("event loop", ("asyncio/", "selectors", "epoll", "anyio/")),
)


def area_of(file_name: str, function: str) -> str:
    key = f"{file_name}:{function}"
    for area, needles in AREAS:
        if any(needle in key for needle in needles):
            return area
    return "other"


def parse_frame(frame: str) -> tuple[str, str]:
    """Split a py-spy frame ``function (file:line)`` into the function and ``file:line``."""
    function, _, location = frame.rpartition(" (")
    return function, location.rstrip(")")


def summarise(raw_path: Path) -> list[dict[str, object]]:
    """Return the share of samples per area, with the heaviest innermost frames of each."""
    samples: dict[str, int] = defaultdict(int)
    frames: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        function, location = parse_frame(stack.rsplit(";", 1)[-1])
        # Code run by an imported module's body (class creation, decorators) is start-up cost.
        area = "imports" if "(<frozen importlib._bootstrap>" in stack else area_of(location, function)
        samples[area] += int(count)
        short = "/".join(location.rsplit(":", 1)[0].split("/")[-2:])
        frames[area][f"{function} ({short})"] += int(count)
    total = sum(samples.values())
    rows = []
    for area, count in sorted(samples.items(), key=lambda item: -item[1]):
        heaviest = sorted(frames[area].items(), key=lambda item: -item[1])[:3]
        rows.append({
            "area": area,
            "samples": count,
            "share": round(count / total, 3),
            "heaviest innermost frames (share)": "; ".join(f"{name} {n / total:.1%}" for name, n in heaviest),
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Profile pipeline harvest with py-spy and sum its CPU samples by area.")
    parser.add_argument("--prompts", type=int, default=2_000, help="prompts to harvest")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="mock teacher latency, in ms")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat", help="API format")
    parser.add_argument("--quick", action="store_true", help="300 prompts")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts = 300

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    profile_path = OUT_DIR / "harvest-py-spy.txt"
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("py-spy not found; install the bench extra: pip install -e '.[bench]'")
    store = OUT_DIR / "profile-store"
    shutil.rmtree(store, ignore_errors=True)
    prompts = write_prompts(args.prompts)
    with MockProcess(MockConfig(latency_ms=args.latency_ms)) as mock:
        spec = harvester.HarvestSpec(
            base_url=mock.url, prompts=prompts, store=store, concurrency=args.concurrency, endpoint=args.endpoint,
        )
        profiler = [
            py_spy, "record", "--gil", "--rate", str(args.rate), "--format", "raw", "--output", str(profile_path), "--",
        ]
        child = run_measured([*profiler, *harvester.command(spec)])
    shutil.rmtree(store, ignore_errors=True)
    if child.returncode != 0:
        raise SystemExit(f"profiled harvest failed with exit status {child.returncode}:\n{child.stderr[-2000:]}")

    rows = summarise(profile_path)
    # The CPU figure includes py-spy itself, which is also a child of this process.
    print(f"harvest of {args.prompts} prompts at concurrency {args.concurrency}:"
          f" {child.cpu_s:.1f} CPU s with the profiler, {child.wall_s:.1f} s wall")
    print_table(rows)
    settings = {"prompts": args.prompts, "concurrency": args.concurrency, "latency_ms": args.latency_ms}
    path = write_results("profile_harvest", {"settings": settings, "cpu_s": round(child.cpu_s, 2), "areas": rows})
    print(f"profile written to {profile_path}; summary written to {path}")


if __name__ == "__main__":
    main()
