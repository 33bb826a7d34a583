"""A/B of harvester versions: `pipeline harvest` from several source trees, interleaved, on one mock.

Each tree is a checkout or ``git archive`` of one commit. Every round runs each tree once
(and the ``aiohttp-orjson`` reference client with ``--reference``), in the same order, so
that all versions share the machine's load. CPU seconds come from ``wait4`` on each child
process; requests/s uses the ``wall_s`` of the run record the harvest writes. Example::

    git archive 8864bf7 | (mkdir -p /tmp/before && tar -x -C /tmp/before)
    python -m benchmarks.harvest_ab /tmp/before . --reference --rounds 2 --prompts 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import last_json_line, print_table, write_prompts, write_results
from benchmarks.harvester import last_run
from benchmarks.mock_teacher import MockConfig, MockProcess

REFERENCE = "aiohttp-orjson"


def run_once(tree: Path | None, url: str, prompts: Path, out: Path, concurrency: int) -> dict:
    """Run one harvest (or the reference client when ``tree`` is None); return its figures."""
    if tree is None:
        argv = [sys.executable, "-m", "benchmarks.reference_clients", "--client", REFERENCE, "--base-url", url,
                "--prompts", str(prompts), "--out", str(out / "reference.parquet"), "--concurrency", str(concurrency)]
        cwd = Path(__file__).resolve().parents[1]
    else:
        argv = [sys.executable, "-m", "pipeline.cli", "harvest", str(prompts), "--base-url", url,
                "--model", "mock-teacher", "--store", str(out / "store"), "--max-tokens", "64",
                "--top-logprobs", "20", "--concurrency", str(concurrency)]
        cwd = tree
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd)}
    # Output goes to files, so that a chatty child cannot block on a full pipe.
    with open(out / "stdout.txt", "w+") as stdout, open(out / "stderr.txt", "w+") as stderr:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    returncode = os.waitstatus_to_exitcode(status)
    if returncode != 0:
        raise RuntimeError(f"{argv[2]} from {cwd} exited with {returncode}: {errors[-2000:]}")

    count = sum(1 for _ in prompts.open())
    cpu_s = usage.ru_utime + usage.ru_stime
    if tree is None:
        wall_s = last_json_line(output)["work_wall_s"]
    else:
        wall_s = last_run(out / "store")["wall_s"]
    return {"cpu_ms_per_request": 1000 * cpu_s / count, "requests_per_s": count / wall_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees to run pipeline harvest from")
    parser.add_argument("--prompts", type=int, default=2000, help="prompts per run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each runs every tree once")
    parser.add_argument("--reference", action="store_true", help=f"also run {REFERENCE} in every round")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="harvest-ab-") as scratch, MockProcess(MockConfig()) as mock:
        prompts = write_prompts(args.prompts, Path(scratch) / "prompts.jsonl")
        variants: list[Path | None] = [tree.resolve() for tree in args.trees] + ([None] if args.reference else [])
        for round_number in range(args.rounds):
            for index, tree in enumerate(variants):
                out = Path(scratch) / f"round{round_number}-variant{index}"
                out.mkdir()
                figures = run_once(tree, mock.url, prompts, out, args.concurrency)
                name = REFERENCE if tree is None else str(tree)
                rows.append({"variant": name, "round": round_number, **figures, "load_1min": os.getloadavg()[0]})
                print(f"  {name}  round {round_number}: {figures['cpu_ms_per_request']:.3f} CPU ms/request", flush=True)

    print_table(rows)
    for name in dict.fromkeys(row["variant"] for row in rows):
        cpu = statistics.median(row["cpu_ms_per_request"] for row in rows if row["variant"] == name)
        print(f"{name}: median {cpu:.3f} CPU ms per request")
    write_results("harvest_ab", {"prompts": args.prompts, "concurrency": args.concurrency, "rows": rows})


if __name__ == "__main__":
    main()
