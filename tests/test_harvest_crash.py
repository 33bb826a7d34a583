"""Real ``pipeline harvest`` processes killed with -9, SIGINT or SIGTERM, then resumed."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.config import SamplingConfig
from pipeline.harvest_requests import request_body
from pipeline.prompts import PromptRecord
from tests.fault_server import FaultServer, expected_response
from tests.fixtures_harvest import (
    make_teacher,
    pipeline_command,
    prompt_text,
    query,
    run_pipeline,
    subprocess_env,
    write_prompts,
)
from tests.conftest import REPO_DIR

pytestmark = pytest.mark.slow

CONCURRENCY = 4
MAX_TOKENS = 32


def harvest_args(prompts: Path, store: Path, base_url: str) -> list[str]:
    return [
        "harvest", str(prompts), "--store", str(store), "--base-url", base_url,
        "--model", "fault-model", "--teacher", "fault", "--max-tokens", str(MAX_TOKENS),
        "--temperature", "0", "--top-logprobs", "5", "--concurrency", str(CONCURRENCY),
        "--backoff-initial", "0.001", "--no-progress",
    ]


def start_harvest(args: list[str], tmp_path: Path, name: str) -> subprocess.Popen:
    out = open(tmp_path / f"{name}.out", "w")
    err = open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen(pipeline_command(*args), stdout=out, stderr=err, env=subprocess_env(), cwd=REPO_DIR)


def wait_for_requests(server: FaultServer, count: int, process: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while len(server.log) < count:
        if process.poll() is not None:
            raise AssertionError(f"harvest exited with {process.returncode} before {count} requests")
        if time.monotonic() > deadline:
            raise AssertionError(f"server saw {len(server.log)} requests, expected {count}")
        time.sleep(0.002)


def test_kill_9_then_resume_stores_each_prompt_once(tmp_path: Path) -> None:
    prompt_count = 300
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_count)
    store = tmp_path / "store"
    kill_points = [10, 120, 240]  # early, mid and late, in requests seen by the server

    with FaultServer(latency_s=0.01) as server:
        args = harvest_args(prompts, store, server.base_url)
        for number, kill_at in enumerate(kill_points):
            process = start_harvest(args, tmp_path, f"killed{number}")
            wait_for_requests(server, kill_at, process)
            process.kill()
            assert process.wait(10) == -signal.SIGKILL

        final = run_pipeline(*args)
        log = list(server.log)

    assert final.returncode == 0, final.stderr
    rows = query(store, "SELECT prompt_id, prompt, response, attempts FROM responses")
    assert len(rows) == prompt_count
    assert len({row[0] for row in rows}) == prompt_count

    # Nothing received is lost, and only requests in flight at a kill were sent again.
    resent = len(log) - prompt_count
    assert 0 <= resent <= len(kill_points) * CONCURRENCY
    assert {entry.prompt for entry in log} == {prompt_text(i) for i in range(prompt_count)}

    # What was stored is what the server sent for that request.
    teacher = make_teacher("http://127.0.0.1:1/v1")
    sampling = SamplingConfig(max_tokens=MAX_TOKENS, top_logprobs=5, temperature=0.0)
    for prompt_id, prompt, response, _ in rows:
        body = request_body(teacher, PromptRecord(0, prompt_id, prompt, None), sampling.params_for(0))
        assert response == expected_response(body, "chat")["choices"][0]["message"]["content"]

    statuses = [status for (status,) in query(store, "SELECT status FROM runs ORDER BY started_at")]
    # Each later run found the killed runs still "running" and marked them crashed.
    assert statuses == ["crashed"] * len(kill_points) + ["completed"]
    assert list((store / "journal").iterdir()) == []


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_interrupts_run(tmp_path: Path, signum: int, exit_code: int) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 200)
    store = tmp_path / "store"
    with FaultServer(latency_s=0.05) as server:
        args = harvest_args(prompts, store, server.base_url)
        process = start_harvest(args, tmp_path, "run")
        wait_for_requests(server, 12, process)
        signalled = time.monotonic()
        process.send_signal(signum)
        returncode = process.wait(15)
        stop_s = time.monotonic() - signalled
        completed = len(server.completed)

    assert returncode == exit_code
    assert stop_s < 5.0
    output = (tmp_path / "run.out").read_text()
    assert "harvest interrupted" in output
    assert query(store, "SELECT status FROM runs") == [("interrupted",)]
    stored = query(store, "SELECT count(*) FROM responses")[0][0]
    # Everything received before the signal is stored; at most the requests in flight are not.
    assert completed - CONCURRENCY <= stored <= completed
    assert stored < 200


def test_second_harvest_on_locked_store_exits_2(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 100)
    store = tmp_path / "store"
    with FaultServer(latency_s=0.2) as server:
        args = harvest_args(prompts, store, server.base_url)
        first = start_harvest(args, tmp_path, "first")
        try:
            wait_for_requests(server, 1, first)
            started = time.monotonic()
            second = run_pipeline(*args, timeout=30)
            second_s = time.monotonic() - started
        finally:
            first.send_signal(signal.SIGTERM)
            first.wait(15)

    assert second.returncode == 2
    assert "locked by another writer" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    assert second_s < 10.0
    assert first.returncode == 143
    # The second harvest stopped before recording a run of its own.
    assert query(store, "SELECT status FROM runs") == [("interrupted",)]
