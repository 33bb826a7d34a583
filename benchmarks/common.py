"""Helpers shared by the benchmark scripts: measured child processes, tables, results.

Every client under test runs in its own child process, so its CPU time and peak RSS
come from the kernel's accounting of that process alone (``os.wait4``), not from the
benchmark driver or the mock teacher that share the machine.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parents[1]
# Results, generated prompts and scratch stores; KD_BENCH_OUT moves them (tests use a tmp dir).
OUT_DIR = Path(os.environ.get("KD_BENCH_OUT", REPO_DIR / "benchmarks" / "out"))
SHARED_DIR = Path(os.environ.get("KD_SHARED_DIR", REPO_DIR.parent / "shared"))
TINY_MODEL_DIR = SHARED_DIR / "models" / "stories260k"
STORIES_PROMPTS = SHARED_DIR / "data" / "prompts" / "tinystories_openings.jsonl"


@dataclass(slots=True)
class ChildRun:
    """Resource use of one finished child process."""

    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def run_measured(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float = 3600) -> ChildRun:
    """Run ``argv`` to completion; return its wall time, CPU seconds and peak RSS.

    CPU and RSS come from ``wait4`` and include the child's own waited-for children.
    Output is captured through temporary files so a chatty child cannot block on a pipe.
    """
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    out_path = OUT_DIR / f".child-{stamp}.out"
    err_path = OUT_DIR / f".child-{stamp}.err"
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(out_path, "w+") as out, open(err_path, "w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(list(argv), stdout=out, stderr=err, env=child_env, cwd=REPO_DIR)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.01)
        wall_s = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    out_path.unlink()
    err_path.unlink()
    return ChildRun(
        returncode=process.returncode,
        wall_s=wall_s,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
        stdout=stdout,
        stderr=stderr,
    )


def last_json_line(text: str) -> dict[str, Any]:
    """Return the last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON line in output: {text[-500:]!r}")


def machine_info() -> dict[str, Any]:
    """Describe the machine and the versions behind a measurement."""
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for name in ("pyarrow", "duckdb", "httpx", "httpx2", "openai", "aiohttp", "orjson", "torch", "transformers"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def code_version() -> dict[str, Any]:
    """Identify the code measured: the git commit plus a digest of the packages' sources.

    The digest changes with uncommitted edits too, so two results with the same digest
    measured the same harvester, store and trainer code.
    """
    digest = hashlib.sha256()
    for package in ("pipeline", "storage", "student"):
        for path in sorted((REPO_DIR / package).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_DIR)).encode())
            digest.update(path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"git_commit": commit, "source_sha256": digest.hexdigest()[:16]}


# Taken when a benchmark starts: the sources may change while a long benchmark runs.
CODE_AT_START = code_version()


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` with the date, machine and code version to ``OUT_DIR/NAME-<time>.json``."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "benchmark": name,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": CODE_AT_START,
        "load_average": os.getloadavg(),
        **payload,
    }
    path = OUT_DIR / f"{name}-{now.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print rows as a Markdown table, so output can be pasted into the results page."""
    if not rows:
        print("(no rows)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[_format(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    sys.stdout.flush()


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_prompts(count: int, path: Path | None = None) -> Path:
    """Write ``count`` distinct prompts as JSONL (``id``, ``prompt``) and return the path.

    Prompts cycle through the TinyStories openings in the shared folder. Each gets a
    numeric suffix, so every line is a distinct request. Lines are streamed to disk.
    """
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = path or OUT_DIR / f"prompts-{count}.jsonl"
    if path.exists() and sum(1 for _ in path.open("rb")) == count:
        return path
    openings = [json.loads(line)["prompt"] for line in STORIES_PROMPTS.open(encoding="utf-8") if line.strip()]
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as out:
        for index in range(count):
            opening = openings[index % len(openings)]
            out.write(json.dumps({"id": f"bench-{index:07d}", "prompt": f"{opening} ({index})"}) + "\n")
    partial.replace(path)
    return path
