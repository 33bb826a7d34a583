"""Harvest end to end in-process: fault server or real teacher in, Parquet rows out via SQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import HarvestFlags, SamplingConfig, build_harvest_config
from pipeline.harvest_requests import request_body
from pipeline.prompts import PromptRecord
from tests.fault_server import FaultPlan, FaultServer, expected_response
from tests.fixtures_harvest import make_config, make_teacher, prompt_text, query, run_harvest, write_prompts
from tests.fixtures_server import teacher_server_url  # noqa: F401  (pytest fixture)

OUTPUT_COLUMNS = "prompt_id, response, finish_reason, tokens, token_logprobs, top_logprobs"


def stored_outputs(store: Path) -> dict[str, tuple]:
    rows = query(store, f"SELECT {OUTPUT_COLUMNS} FROM responses ORDER BY prompt_id")
    return {row[0]: row[1:] for row in rows}


def harvest_with_plan(tmp_path: Path, plan: FaultPlan, count: int = 3, *, name: str = "store",
                      extra_lines: tuple[str, ...] = (), **changes):
    prompts = write_prompts(tmp_path / f"{name}.jsonl", count, extra_lines=extra_lines)
    with FaultServer(plan) as server:
        config = make_config(prompts, tmp_path / name, [make_teacher(server.base_url)], **changes)
        result = run_harvest(config)
        log = list(server.log)
    return result, tmp_path / name, log


def test_harvest_stores_every_prompt(tmp_path: Path) -> None:
    result, store, log = harvest_with_plan(tmp_path, FaultPlan(), count=20)
    assert result.status == "completed"
    assert result.exit_code == 0
    assert result.stats.responses == 20
    assert len(log) == 20

    rows = query(store, "SELECT request_id, params, attempts, endpoint, teacher, sample_index,"
                        " token_level_ok, top_logprobs_requested, prompt_line FROM responses")
    assert len(rows) == 20
    assert len({row[0] for row in rows}) == 20
    for request_id, params, attempts, endpoint, teacher, sample_index, ok, k, line in rows:
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        assert json.loads(params) == {"max_tokens": 32, "temperature": 0.0, "top_logprobs": 5}
        assert (attempts, endpoint, teacher, sample_index, ok, k) == (1, "chat", "fault", 0, True, 5)
        assert 1 <= line <= 20

    runs = query(store, "SELECT status, requests, sent, responses, failed FROM runs")
    assert runs == [("completed", 20, 20, 20, 0)]


def test_stored_tokens_match_server_output(tmp_path: Path) -> None:
    result, store, _ = harvest_with_plan(tmp_path, FaultPlan(), count=2)
    teacher = make_teacher("http://127.0.0.1:1/v1")
    sampling = SamplingConfig(max_tokens=32, top_logprobs=5, temperature=0.0)
    for index in range(2):
        record = PromptRecord(index + 1, f"p{index}", prompt_text(index), None)
        body = request_body(teacher, record, sampling.params_for(0))
        expected = expected_response(body, "chat")["choices"][0]
        response, finish, tokens, token_logprobs, top = stored_outputs(store)[f"p{index}"]
        content = expected["logprobs"]["content"]
        assert response == expected["message"]["content"]
        assert finish == expected["finish_reason"]
        assert tokens == [entry["token"] for entry in content]
        # The store's default encoding keeps logprobs to the nearest 1/8 nat.
        assert token_logprobs == pytest.approx([entry["logprob"] for entry in content], abs=1 / 16)
        assert [[alt["token"] for alt in position] for position in top] == [
            [alt["token"] for alt in entry["top_logprobs"]] for entry in content
        ]


def test_samples_get_offset_seeds(tmp_path: Path) -> None:
    sampling = SamplingConfig(max_tokens=32, top_logprobs=2, temperature=1.0, seed=7)
    result, store, log = harvest_with_plan(tmp_path, FaultPlan(), count=2, samples=3, sampling=sampling)
    rows = query(store, "SELECT prompt_id, sample_index, params FROM responses ORDER BY 1, 2")
    assert [(pid, index) for pid, index, _ in rows] == [(p, i) for p in ("p0", "p1") for i in range(3)]
    assert [json.loads(params)["seed"] for _, _, params in rows] == [7, 8, 9, 7, 8, 9]
    assert result.stats.requests == 6
    assert len(log) == 6


def test_every_prompt_goes_to_each_teacher(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    with FaultServer() as server:
        config_file = tmp_path / "teachers.toml"
        config_file.write_text(
            f'[[teachers]]\nname = "chatty"\nbase_url = "{server.base_url}"\nmodel = "a"\n\n'
            f'[[teachers]]\nname = "legacy"\nbase_url = "{server.base_url}"\nmodel = "b"\n'
            'endpoint = "completions"\nconcurrency = 2\n[teachers.params]\nfrequency_penalty = 0.5\n',
            encoding="utf-8",
        )
        flags = HarvestFlags(prompts_path=prompts, store_path=tmp_path / "store", config_path=config_file,
                             max_tokens=8, top_logprobs=3, progress=False, backoff_initial_s=0.001)
        config = build_harvest_config(flags, environ={})
        result = run_harvest(config)
        paths = sorted({entry.path for entry in server.log})
    assert result.stats.responses == 8
    assert paths == ["/v1/chat/completions", "/v1/completions"]
    rows = query(tmp_path / "store", "SELECT teacher, endpoint, model, count(*), any_value(params)"
                                     " FROM responses GROUP BY ALL ORDER BY 1")
    assert [row[:4] for row in rows] == [("chatty", "chat", "a", 4), ("legacy", "completions", "b", 4)]
    assert json.loads(rows[1][4])["frequency_penalty"] == 0.5


def test_duplicate_prompt_is_sent_once(tmp_path: Path) -> None:
    duplicates = [json.dumps({"id": f"dup{i}", "prompt": prompt_text(0)}) for i in range(3)]
    result, store, log = harvest_with_plan(tmp_path, FaultPlan(), count=5, extra_lines=tuple(duplicates))
    assert result.stats.requests == 8
    assert result.stats.cached == 3
    assert result.stats.responses == 5
    assert len(log) == 5
    assert query(store, "SELECT count(*), count(DISTINCT request_id) FROM responses") == [(5, 5)]


def test_invalid_lines_become_failure_rows(tmp_path: Path) -> None:
    extra = ('{"prompt": 42}', "not json", "", '{"prompt": "x", "messages": []}')
    result, store, log = harvest_with_plan(tmp_path, FaultPlan(), count=3, extra_lines=extra)
    assert result.stats.responses == 3
    assert result.stats.invalid_lines == 3
    assert result.status == "failed"
    assert result.exit_code == 1
    rows = query(store, "SELECT error_type, prompt_line, retryable FROM failures ORDER BY prompt_line")
    assert rows == [("invalid_prompt", 4, False), ("invalid_prompt", 5, False), ("invalid_prompt", 7, False)]


def test_messages_rejected_by_completions_teacher(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "m1", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with FaultServer() as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url, endpoint="completions")])
        result = run_harvest(config)
        assert server.log == []
    rows = query(tmp_path / "store", "SELECT error_type, message FROM failures")
    assert rows[0][0] == "invalid_prompt"
    assert "--endpoint chat" in rows[0][1]
    assert result.exit_code == 1


@pytest.mark.parametrize("fault", ["content-filter", "length"])
def test_incomplete_response_stored_not_cached(tmp_path: Path, fault: str) -> None:
    duplicate = json.dumps({"id": "again", "prompt": prompt_text(0)})
    plan = FaultPlan(per_prompt={prompt_text(0): [fault]})
    result, store, log = harvest_with_plan(tmp_path, plan, count=2, extra_lines=(duplicate,))
    finish = fault.replace("-", "_")
    rows = query(store, "SELECT finish_reason, response IS NULL FROM responses WHERE prompt_id = 'p0'")
    assert rows == [(finish, fault == "content-filter")]
    assert result.stats.cached == 0
    assert result.stats.skipped_stored == 1
    assert result.stats.incomplete == 1
    assert len([entry for entry in log if entry.prompt == prompt_text(0)]) == 1


RETRIED_FAULTS = [
    "429", "429:retry-after=0", "429:retry-after-ms=3", "429:retry-after=date-10", "429:retry-after=abc",
    "500", "502-html", "502-json", "503", "529", "error-200:code=429", "error-200:code=503",
    "truncated-json", "drop-length", "drop-chunked", "close", "slow:seconds=1",
]


@pytest.mark.parametrize("fault", RETRIED_FAULTS)
def test_fault_then_success_stores_same_response(tmp_path: Path, fault: str) -> None:
    _, clean_store, _ = harvest_with_plan(tmp_path, FaultPlan(), count=2, name="clean")
    plan = FaultPlan(per_prompt={prompt_text(0): [fault]})
    result, store, log = harvest_with_plan(tmp_path, plan, count=2, name="faulty", timeout_s=0.5)
    assert result.status == "completed"
    assert stored_outputs(store) == stored_outputs(clean_store)
    assert query(store, "SELECT attempts FROM responses WHERE prompt_id = 'p0'") == [(2,)]
    assert query(store, "SELECT count(*) FROM failures") == [(0,)]
    assert result.stats.retries == 1


@pytest.mark.parametrize(
    ("fault", "error_type", "status"),
    [("no-logprobs", "MissingLogprobsError", None), ("bad-logprobs", "ResponseFormatError", None),
     ("error-200:code=400", "ClientError", 400)],
)
def test_unretryable_fault_fails_at_once(tmp_path: Path, fault: str, error_type: str, status: int | None) -> None:
    plan = FaultPlan(per_prompt={prompt_text(0): [fault]})
    result, store, log = harvest_with_plan(tmp_path, plan, count=2)
    rows = query(store, "SELECT error_type, http_status, attempts, retryable, message FROM failures")
    assert len(rows) == 1
    assert rows[0][:4] == (error_type, status, 1, False)
    assert "request " in rows[0][4]
    assert query(store, "SELECT prompt_id FROM responses") == [("p1",)]
    assert len([entry for entry in log if entry.prompt == prompt_text(0)]) == 1
    assert result.exit_code == 1


def test_retries_exhausted_records_cause(tmp_path: Path) -> None:
    plan = FaultPlan(per_prompt={prompt_text(0): ["500", "502-html", "429", "500", "500"]})
    result, store, log = harvest_with_plan(tmp_path, plan, count=2, max_attempts=4)
    rows = query(store, "SELECT error_type, http_status, attempts, retryable, message, prompt_id FROM failures")
    assert rows[0][:4] == ("ServerError", 500, 4, True)
    assert "HTTP 500" in rows[0][4]
    assert rows[0][5] == "p0"
    assert len([entry for entry in log if entry.prompt == prompt_text(0)]) == 4
    assert result.status == "failed"
    assert result.stats.failure_causes == {"ServerError HTTP 500": 1}
    assert "HTTP 500" in result.stats.failure_examples["ServerError HTTP 500"]


@pytest.mark.slow
def test_real_teacher_harvest_reads_back(tmp_path: Path, teacher_server_url: str, stories_prompts: Path) -> None:  # noqa: F811
    teacher = make_teacher(teacher_server_url, name="stories", model="stories260k")
    sampling = SamplingConfig(max_tokens=24, top_logprobs=5, temperature=0.0)
    config = make_config(stories_prompts, tmp_path / "store", [teacher], sampling=sampling, limit=24,
                         timeout_s=60.0)
    result = run_harvest(config)
    assert result.status == "completed"
    assert result.stats.responses == 24

    summary = query(
        tmp_path / "store",
        "SELECT count(*), count(DISTINCT prompt_id), bool_and(token_level_ok),"
        " bool_and(len(tokens) = completion_tokens), bool_and(len(top_logprobs) = len(tokens)),"
        " min(list_min(token_logprobs)), max(list_max(token_logprobs)), min(prompt_tokens)"
        " FROM responses",
    )[0]
    count, distinct, ok, lengths_match, positions_match, lowest, highest, prompt_tokens = summary
    assert (count, distinct, ok, lengths_match, positions_match) == (24, 24, True, True, True)
    assert lowest < highest <= 0.0
    assert prompt_tokens > 0
    alternatives = query(tmp_path / "store", "SELECT DISTINCT len(unnest(top_logprobs)) FROM responses")
    assert alternatives == [(5,)]


def test_duplicate_without_cache_stored_once(tmp_path: Path) -> None:
    # With no cache, a later duplicate is sent again but its row is not stored twice.
    duplicate = json.dumps({"id": "again", "prompt": prompt_text(0)})
    result, store, log = harvest_with_plan(tmp_path, FaultPlan(), count=6, extra_lines=(duplicate,),
                                           cache_size=0, concurrency=1)
    assert len(log) == 7
    assert result.stats.responses == 6
    assert result.stats.skipped_stored == 1
    assert query(store, "SELECT count(*) FROM responses") == [(6,)]


def test_failure_streak_stops_run(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 200)
    with FaultServer(FaultPlan(rates={"no-logprobs": 1.0})) as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)],
                             concurrency=2, max_consecutive_failures=10)
        result = run_harvest(config)
        sent = len(server.log)
    assert result.stopped_reason is not None
    assert "10 requests in a row failed" in result.stopped_reason
    assert 10 <= result.stats.failed <= 12
    assert sent < 20
    assert result.status == "failed"
    assert result.exit_code == 1


def test_response_resets_failure_streak(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 40)
    with FaultServer(FaultPlan(sequence=["no-logprobs", "ok"] * 20)) as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)],
                             concurrency=1, max_consecutive_failures=2)
        result = run_harvest(config)
    assert result.stopped_reason is None
    assert (result.stats.responses, result.stats.failed) == (20, 20)
