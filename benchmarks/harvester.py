"""Runner of the project's harvester for the benchmarks: ``pipeline harvest`` in a child process.

The harvester runs exactly as a user runs it, through the CLI, so its figures include
everything a real harvest pays for (config validation, the store's lock and journal,
the run record). Its work-phase wall time comes from the ``runs`` table it writes.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from benchmarks.common import ChildRun


@dataclass(slots=True)
class HarvestSpec:
    """One harvest against a loopback teacher."""

    base_url: str
    prompts: Path
    store: Path
    concurrency: int = 64
    endpoint: str = "chat"
    max_tokens: int = 64
    top_k: int = 20
    model: str = "mock-teacher"
    limit: int | None = None
    extra: tuple[str, ...] = ()


def available() -> bool:
    """Return True when ``pipeline harvest`` can be imported."""
    return importlib.util.find_spec("pipeline.commands.harvest") is not None


def command(spec: HarvestSpec) -> list[str]:
    """Return the argv of ``pipeline harvest`` for ``spec``."""
    argv = [
        sys.executable, "-m", "pipeline.cli", "harvest", str(spec.prompts),
        "--base-url", spec.base_url, "--model", spec.model, "--store", str(spec.store),
        "--endpoint", spec.endpoint, "--max-tokens", str(spec.max_tokens),
        "--top-logprobs", str(spec.top_k), "--concurrency", str(spec.concurrency),
    ]
    if spec.limit is not None:
        argv += ["--limit", str(spec.limit)]
    return argv + list(spec.extra)


def last_run(store: Path) -> dict[str, Any]:
    """Return the newest row of the store's ``runs`` table."""
    files = sorted((store / "runs").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no run record in {store / 'runs'}; did the harvest finish?")
    rows = pq.read_table(files[-1]).to_pylist()
    return max(rows, key=lambda r: r["started_at"])


def report(spec: HarvestSpec, child: ChildRun) -> dict[str, Any]:
    """Return the harvester's own counts and work-phase wall time, like a reference client's report."""
    run = last_run(spec.store)
    return {"responses": run["responses"], "failed": run["failed"], "sent": run["sent"], "work_wall_s": run["wall_s"]}
