"""A harvest through a storm of faults stores exactly what a fault-free harvest stores."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

from tests.fault_server import FaultPlan, FaultServer, LoggedRequest
from tests.fixtures_harvest import make_config, make_teacher, query, run_harvest, write_prompts

PROMPTS = 500
MAX_ATTEMPTS = 4
# 20% rate limits, 10% server errors, 5% dropped connections.
STORM = {
    "429": 0.14, "429:retry-after-ms=2": 0.03, "429:retry-after=0": 0.03,
    "500": 0.03, "502-html": 0.03, "503": 0.02, "529": 0.02,
    "drop-length": 0.02, "drop-chunked": 0.015, "close": 0.015,
}
FAULT_CAUSES = {
    "429": ("RateLimitError", 429), "500": ("ServerError", 500), "502-html": ("ServerError", 502),
    "503": ("ServerError", 503), "529": ("ServerError", 529), "drop-length": ("TransportError", None),
    "drop-chunked": ("TransportError", None), "close": ("TransportError", None),
}
OUTPUT_SQL = (
    "SELECT prompt_id, response, finish_reason, completion_tokens, tokens, token_bytes,"
    " token_logprobs, top_logprobs FROM responses ORDER BY prompt_id"
)


def harvest(tmp_path: Path, name: str, plan: FaultPlan) -> tuple[Path, list[LoggedRequest], object]:
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        write_prompts(prompts, PROMPTS)
    with FaultServer(plan) as server:
        config = make_config(prompts, tmp_path / name, [make_teacher(server.base_url)],
                             concurrency=8, max_attempts=MAX_ATTEMPTS, backoff_initial_s=0.001)
        result = run_harvest(config)
        log = list(server.log)
    return tmp_path / name, log, result


@pytest.mark.slow
def test_fault_storm_matches_fault_free_run(tmp_path: Path) -> None:
    clean_store, clean_log, clean = harvest(tmp_path, "clean", FaultPlan())
    started = time.monotonic()
    store, log, result = harvest(tmp_path, "storm", FaultPlan(rates=STORM, seed=11))
    storm_s = time.monotonic() - started
    assert clean.stats.responses == PROMPTS
    assert len(clean_log) == PROMPTS

    # Every prompt ends as exactly one stored response or one failure row.
    responses = dict(query(store, "SELECT prompt_id, attempts FROM responses"))
    failures = {row[0]: row[1:] for row in query(
        store, "SELECT prompt_id, error_type, http_status, attempts, retryable, message FROM failures")}
    assert len(responses) + len(failures) == PROMPTS
    assert not responses.keys() & failures.keys()
    assert result.stats.responses == len(responses)
    assert result.stats.failed == len(failures)
    assert result.stats.sent == len(log)
    assert 0 < len(failures) < 30  # about 0.35**4 of 500 prompts run out of attempts

    # Stored responses are identical to the fault-free run's, tokens and logprobs included.
    clean_rows = {row[0]: row for row in query(clean_store, OUTPUT_SQL)}
    storm_rows = query(store, OUTPUT_SQL)
    assert len(storm_rows) == len(responses)
    for row in storm_rows:
        assert row == clean_rows[row[0]]

    # Attempts match the server's log: faults then one success, or only faults.
    by_prompt: dict[str, list[LoggedRequest]] = defaultdict(list)
    for entry in log:
        by_prompt[entry.prompt].append(entry)
    prompt_ids = dict(query(store, "SELECT prompt, prompt_id FROM responses"
                                   " UNION ALL SELECT prompt, prompt_id FROM failures"))
    assert len(prompt_ids) == PROMPTS
    for prompt, entries in by_prompt.items():
        prompt_id = prompt_ids[prompt]
        faults = [entry.fault for entry in entries]
        if prompt_id in responses:
            assert responses[prompt_id] == len(entries)
            assert faults[-1] == "ok"
            assert all(fault != "ok" for fault in faults[:-1])
        else:
            error_type, status, attempts, retryable, message = failures[prompt_id]
            assert attempts == MAX_ATTEMPTS == len(entries)
            assert "ok" not in faults
            assert (error_type, status) == FAULT_CAUSES[faults[-1].split(":")[0]]
            assert retryable is True
            assert prompt_id in message or "request" in message

    run = query(store, "SELECT status, responses, failed, sent FROM runs")[0]
    assert run == ("failed", len(responses), len(failures), len(log))
    print(f"storm harvest: {len(log)} requests for {PROMPTS} prompts in {storm_s:.2f} s")

