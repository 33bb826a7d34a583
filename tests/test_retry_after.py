"""Retry-After in each of its forms: parsing, and the waits the client really takes."""

from __future__ import annotations

import email.utils

import anyio
import httpx
import pytest

from pipeline.client import TeacherClient
from pipeline.errors import RateLimitError
from pipeline.retry import RequeueRequested, RetryPolicy, parse_retry_after
from tests.fault_server import FaultPlan, FaultServer
from tests.fixtures_harvest import (
    SleepRecorder,
    make_config,
    make_teacher,
    prompt_text,
    query,
    run_harvest,
    write_prompts,
)
from pipeline.harvest import HarvestHooks

NOW = 1_700_000_000.0
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
             "logprobs": True, "top_logprobs": 3}


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(NOW + offset_s, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "5"}, 5.0),
        ({"retry-after-ms": "4321"}, 4.321),
        ({"retry-after": "90"}, 90.0),
        ({"retry-after": "3600"}, 3600.0),
        ({"retry-after": "5", "retry-after-ms": "4321"}, 4.321),
        ({"Retry-After": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": http_date(-60)}, 0.0),
        ({"retry-after": http_date(30)}, 30.0),
        ({"retry-after": "abc"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after-ms": "abc", "retry-after": "2"}, 2.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=lambda: NOW) == expected


def test_parse_retry_after_reads_httpx_headers() -> None:
    headers = httpx.Headers({"Retry-After-Ms": "250", "Retry-After": "9"})
    assert parse_retry_after(headers, now=lambda: NOW) == 0.25


async def _send_until_ok(base_url: str, policy: RetryPolicy) -> int:
    client = TeacherClient(make_teacher(base_url), timeout_s=5.0, max_connections=1, top_logprobs=3,
                           now=lambda: NOW)
    attempts = 0
    try:
        async for attempt in policy.retrying(request_id="r1"):
            with attempt:
                attempts += 1
                await client.send(CHAT_BODY, request_id="r1")
    finally:
        await client.aclose()
    return attempts


@pytest.mark.parametrize(
    ("fault", "expected_wait"),
    [
        ("429:retry-after=5", 5.0),
        ("429:retry-after-ms=4321", 4.321),
        ("429:retry-after=5,retry-after-ms=4321", 4.321),
        ("429:retry-after=date-60", 0.0),
        ("429:retry-after=date+30", 30.0),
        ("503:retry-after=2", 2.0),
    ],
)
def test_client_waits_what_server_asked(fault: str, expected_wait: float) -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=3, max_retry_wait_s=60.0, sleep=recorder)
    with FaultServer(FaultPlan(sequence=[fault]), clock=lambda: NOW) as server:
        attempts = anyio.run(_send_until_ok, server.base_url, policy)
    assert attempts == 2
    assert recorder.waits == [pytest.approx(expected_wait)]


def test_garbage_retry_after_falls_back_to_backoff() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=4, backoff_initial_s=0.5, max_retry_wait_s=60.0, sleep=recorder)
    plan = FaultPlan(sequence=["429:retry-after=abc", "429:retry-after=abc"])
    with FaultServer(plan, clock=lambda: NOW) as server:
        attempts = anyio.run(_send_until_ok, server.base_url, policy)
    assert attempts == 3
    assert len(recorder.waits) == 2
    assert 0 <= recorder.waits[0] <= 0.5
    assert 0 <= recorder.waits[1] <= 1.0


@pytest.mark.parametrize("seconds", ["90", "3600"])
def test_wait_above_cap_is_requeued(seconds: str) -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=3, max_retry_wait_s=60.0, deadline_s=None, sleep=recorder)
    with FaultServer(FaultPlan(sequence=[f"429:retry-after={seconds}"])) as server:
        with pytest.raises(RequeueRequested) as raised:
            anyio.run(_send_until_ok, server.base_url, policy)
    assert raised.value.delay_s == float(seconds)
    assert raised.value.attempts == 1
    assert isinstance(raised.value.error, RateLimitError)
    assert recorder.waits == []


def test_harvest_requeues_long_wait(tmp_path) -> None:
    # The server requests a one-hour wait for prompt 0. The harvest requeues it instead
    # of sleeping in the worker, and its second attempt still counts.
    recorder = SleepRecorder()
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)
    plan = FaultPlan(per_prompt={prompt_text(0): ["429:retry-after=3600"]})
    with FaultServer(plan) as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)],
                             max_retry_wait_s=60.0, deadline_s=None)
        result = run_harvest(config, HarvestHooks(sleep=recorder))
    assert result.stats.requeued == 1
    assert result.stats.responses == 5
    assert 3600.0 in recorder.waits
    rows = query(tmp_path / "store", "SELECT attempts FROM responses WHERE prompt_id = 'p0'")
    assert rows == [(2,)]


def test_requeued_request_frees_its_worker(tmp_path) -> None:
    # One worker. Prompt 0 must wait 1 s (cap 0.05 s): the other prompts are sent
    # during that second, before prompt 0's second attempt.
    prompts = write_prompts(tmp_path / "prompts.jsonl", 10)
    plan = FaultPlan(per_prompt={prompt_text(0): ["429:retry-after=1"]})
    with FaultServer(plan) as server:
        config = make_config(prompts, tmp_path / "store", [make_teacher(server.base_url)],
                             concurrency=1, max_retry_wait_s=0.05)
        result = run_harvest(config)
        order = [entry.prompt for entry in server.log]
    assert result.stats.responses == 10
    assert order[0] == prompt_text(0)
    assert order[-1] == prompt_text(0)
    assert len(order) == 11
