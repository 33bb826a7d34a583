"""Helpers shared by the harvester tests: prompt files, configs and in-process runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from pipeline.config import ApiKey, HarvestConfig, SamplingConfig, TeacherConfig
from pipeline.harvest import HarvestHooks, HarvestResult, Harvester
from storage.catalog import connect
from tests.conftest import REPO_DIR

TEST_KEY = "sk-test-not-secret"


class SleepRecorder:
    """Injected sleep that records each wait and returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await anyio.sleep(0)


def prompt_text(index: int) -> str:
    return f"Once upon a time, story number {index} began."


def write_prompts(path: Path, count: int, *, extra_lines: Sequence[str] = ()) -> Path:
    """Write ``count`` prompt lines with ids p0..p{count-1}, then ``extra_lines`` verbatim."""
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            handle.write(json.dumps({"id": f"p{index}", "prompt": prompt_text(index)}) + "\n")
        for line in extra_lines:
            handle.write(line + "\n")
    return path


def make_teacher(base_url: str, **changes: Any) -> TeacherConfig:
    teacher = TeacherConfig(name="fault", base_url=base_url, model="fault-model",
                            api_key=ApiKey(TEST_KEY, "test"))
    return replace(teacher, **changes)


def make_config(
    prompts: Path, store: Path, teachers: Iterable[TeacherConfig], **changes: Any
) -> HarvestConfig:
    """A config with fast retries (millisecond backoff) and no progress bar.

    ``max_tokens`` is 32, above the fault server's longest completion (24 tokens), so
    every fault-free response finishes with "stop".
    """
    sampling = changes.pop("sampling", SamplingConfig(max_tokens=32, top_logprobs=5, temperature=0.0))
    defaults: dict[str, Any] = dict(
        concurrency=4, timeout_s=5.0, max_attempts=4, backoff_initial_s=0.001,
        max_retry_wait_s=5.0, deadline_s=60.0, progress=False,
    )
    defaults.update(changes)
    return HarvestConfig(prompts_path=prompts, store_path=store, teachers=tuple(teachers),
                         sampling=sampling, **defaults)


def run_harvest(config: HarvestConfig, hooks: HarvestHooks | None = None) -> HarvestResult:
    return anyio.run(Harvester(config, hooks=hooks).run)


def query(store: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    connection = connect(store)
    try:
        return connection.execute(sql, list(params)).fetchall()
    finally:
        connection.close()


def pipeline_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_pipeline(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        pipeline_command(*args), capture_output=True, text=True, timeout=timeout,
        env=env or subprocess_env(), cwd=REPO_DIR,
    )
