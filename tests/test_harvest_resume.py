"""Resume: a second harvest skips stored requests, sends the rest, and retries failures."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import anyio

from pipeline.harvest import Harvester
from tests.fault_server import FaultPlan, FaultServer
from tests.fixtures_harvest import make_config, make_teacher, prompt_text, query, run_harvest, write_prompts


def test_second_run_sends_nothing(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 10)
    with FaultServer() as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)])
        first = run_harvest(config)
        sent_after_first = len(server.log)
        second = run_harvest(config)
        assert len(server.log) == sent_after_first == 10
    assert first.stats.responses == 10
    assert (second.stats.sent, second.stats.responses, second.stats.skipped_stored) == (0, 0, 10)
    assert second.status == "completed"
    assert query(tmp_path / "store", "SELECT count(*) FROM responses") == [(10,)]
    assert query(tmp_path / "store", "SELECT status, count(*) FROM runs GROUP BY ALL") == [("completed", 2)]


def test_resume_sends_only_missing(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 10)
    with FaultServer() as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)])
        run_harvest(replace(config, limit=4))
        second = run_harvest(config)
        sent_prompts = [entry.prompt for entry in server.log]
    assert second.stats.skipped_stored == 4
    assert second.stats.sent == 6
    assert sorted(sent_prompts) == sorted(prompt_text(i) for i in range(10))
    rows = query(tmp_path / "store", "SELECT count(*), count(DISTINCT prompt_id) FROM responses")
    assert rows == [(10, 10)]


def test_failed_request_is_sent_again(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    plan = FaultPlan(per_prompt={prompt_text(0): ["500", "500"]})
    with FaultServer(plan) as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)], max_attempts=2)
        first = run_harvest(config)
        second = run_harvest(config)
    assert first.stats.failed == 1
    assert first.exit_code == 1
    assert (second.stats.sent, second.stats.responses, second.stats.skipped_stored) == (1, 1, 2)
    assert second.exit_code == 0
    assert query(tmp_path / "store", "SELECT count(*) FROM responses") == [(3,)]
    assert query(tmp_path / "store", "SELECT prompt_id, attempts FROM failures") == [("p0", 2)]


def test_incomplete_response_skipped_on_resume(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    plan = FaultPlan(per_prompt={prompt_text(0): ["length"]})
    with FaultServer(plan) as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)])
        run_harvest(config)
        again = run_harvest(config)
    assert again.stats.sent == 0
    assert again.stats.skipped_stored == 3
    rows = query(tmp_path / "store", "SELECT finish_reason FROM responses WHERE prompt_id = 'p0'")
    assert rows == [("length",)]


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 40)
    with FaultServer(latency_s=0.02) as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)], concurrency=2)
        harvester = Harvester(config)

        async def interrupt_after_some() -> None:
            while len(server.completed) < 6:
                await anyio.sleep(0.005)
            harvester.interrupt(signal.SIGINT)

        async def main():
            async with anyio.create_task_group() as group:
                group.start_soon(interrupt_after_some)
                result = await harvester.run()
            return result

        first = anyio.run(main)
        second = run_harvest(config)
        sent_total = len(server.log)
    assert first.status == "interrupted"
    assert first.exit_code == 130
    # The server had sent 6 responses; up to the 2 in flight may not have been received.
    assert 6 - 2 <= first.stats.responses < 40
    assert second.stats.skipped_stored == first.stats.responses
    assert query(tmp_path / "store", "SELECT count(*), count(DISTINCT prompt_id) FROM responses") == [(40, 40)]
    # Only the requests cancelled in flight (at most the concurrency) were sent twice.
    assert sent_total - 40 <= 2
    statuses = query(tmp_path / "store", "SELECT status FROM runs ORDER BY started_at")
    assert statuses == [("interrupted",), ("completed",)]
