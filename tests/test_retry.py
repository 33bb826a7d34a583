"""Retry policy: what is retried, how often, how long it waits, and that it stops on cancel."""

from __future__ import annotations

import asyncio
import logging
import time

import anyio
import pytest

from pipeline.errors import (
    ClientError,
    ConfigError,
    MissingLogprobsError,
    RateLimitError,
    ResponseFormatError,
    ServerError,
    TransportError,
    TruncatedBodyError,
)
from pipeline.retry import RequeueRequested, RetryPolicy, is_retryable
from tests.fixtures_harvest import SleepRecorder


async def run_policy(policy: RetryPolicy, errors: list[BaseException], **retrying_args) -> tuple[int, object]:
    """Run attempts that raise ``errors`` in order and then succeed; return (attempts, result)."""
    attempts = 0
    result = None
    async for attempt in policy.retrying(**retrying_args):
        with attempt:
            attempts += 1
            if attempts <= len(errors):
                raise errors[attempts - 1]
            result = "ok"
    return attempts, result


RETRYABLE = [
    RateLimitError("429", status=429),
    ServerError("500", status=500),
    ServerError("529", status=529),
    TransportError("dropped"),
    TruncatedBodyError("cut"),
]
NOT_RETRYABLE = [
    ClientError("400", status=400),
    ResponseFormatError("bad shape"),
    MissingLogprobsError("no logprobs"),
    ConfigError("bad flag"),
    ValueError("a bug"),
    RuntimeError("a bug"),
]


@pytest.mark.parametrize("error", RETRYABLE, ids=lambda e: type(e).__name__)
def test_retryable_errors_are_retried(error: BaseException) -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=3, backoff_initial_s=0.01, sleep=recorder)
    attempts, result = anyio.run(run_policy, policy, [error, error])
    assert is_retryable(error)
    assert attempts == 3
    assert result == "ok"
    assert len(recorder.waits) == 2


@pytest.mark.parametrize("error", NOT_RETRYABLE, ids=lambda e: type(e).__name__)
def test_other_errors_are_not_retried(error: BaseException) -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=5, sleep=recorder)
    with pytest.raises(type(error)) as raised:
        anyio.run(run_policy, policy, [error])
    assert raised.value is error
    assert not is_retryable(error)
    assert recorder.waits == []


@pytest.mark.parametrize("error_class", [asyncio.CancelledError, KeyboardInterrupt, SystemExit])
def test_cancellation_and_exit_are_not_retried(error_class: type[BaseException]) -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=5, sleep=recorder)
    attempts = 0

    async def main() -> None:
        nonlocal attempts
        async for attempt in policy.retrying():
            with attempt:
                attempts += 1
                raise error_class()

    with pytest.raises(error_class):
        asyncio.run(main())
    assert attempts == 1
    assert recorder.waits == []
    assert not is_retryable(error_class())


def test_attempts_stop_at_maximum() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=4, backoff_initial_s=0.01, sleep=recorder)
    errors = [ServerError(f"500 #{i}", status=500) for i in range(10)]
    with pytest.raises(ServerError) as raised:
        anyio.run(run_policy, policy, errors)
    assert str(raised.value) == "500 #3"  # the last attempt's error, not a RetryError
    assert len(recorder.waits) == 3


def test_backoff_is_full_jitter_and_capped() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=8, backoff_initial_s=1.0, max_retry_wait_s=5.0, sleep=recorder)
    errors = [TransportError("dropped") for _ in range(7)]
    anyio.run(run_policy, policy, errors)
    # Window of retry n is min(cap, initial * 2**(n-1)); full jitter draws within [0, window].
    windows = [1, 2, 4, 5, 5, 5, 5]
    assert len(recorder.waits) == len(windows)
    for wait, window in zip(recorder.waits, windows):
        assert 0 <= wait <= window


def test_backoff_draws_differ() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=30, backoff_initial_s=1.0, max_retry_wait_s=1.0, sleep=recorder)
    anyio.run(run_policy, policy, [TransportError("x") for _ in range(29)])
    assert len(set(recorder.waits)) > 20


def test_retry_after_is_used_as_wait() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=3, max_retry_wait_s=60.0, sleep=recorder)
    errors = [RateLimitError("429", status=429, retry_after=7.5), ServerError("503", status=503, retry_after=0.0)]
    anyio.run(run_policy, policy, errors)
    assert recorder.waits == [7.5, 0.0]


def test_wait_above_cap_requeues() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=5, max_retry_wait_s=60.0, deadline_s=None, sleep=recorder)
    error = RateLimitError("429", status=429, retry_after=3600.0)
    with pytest.raises(RequeueRequested) as raised:
        anyio.run(run_policy, policy, [ServerError("500", status=500, retry_after=1.0), error])
    assert raised.value.delay_s == 3600.0
    assert raised.value.error is error
    assert raised.value.attempts == 2
    assert recorder.waits == [1.0]  # the worker never slept the hour


def test_requeued_request_keeps_attempt_budget() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=4, backoff_initial_s=0.01, sleep=recorder)
    errors = [ServerError("500", status=500) for _ in range(5)]
    with pytest.raises(ServerError):
        anyio.run(lambda: run_policy(policy, errors, attempts_before=2))
    assert len(recorder.waits) == 1  # attempts 3 and 4 only


def test_wait_past_deadline_stops_instead_of_requeueing() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=5, max_retry_wait_s=60.0, deadline_s=600.0, sleep=recorder)
    error = RateLimitError("429", status=429, retry_after=3600.0)
    with pytest.raises(RateLimitError) as raised:
        anyio.run(run_policy, policy, [error])
    assert raised.value is error
    assert recorder.waits == []


def test_deadline_counts_time_before_requeue() -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=5, max_retry_wait_s=60.0, deadline_s=100.0, sleep=recorder)
    errors = [RateLimitError("429", status=429, retry_after=30.0)]
    with pytest.raises(RateLimitError):
        anyio.run(lambda: run_policy(policy, errors, elapsed_before_s=80.0))
    assert recorder.waits == []


def test_retries_are_logged_with_request_id(caplog: pytest.LogCaptureFixture) -> None:
    recorder = SleepRecorder()
    policy = RetryPolicy(max_attempts=3, sleep=recorder)
    errors = [RateLimitError("too many", status=429, retry_after=2.0)]
    with caplog.at_level(logging.INFO, logger="pipeline.retry"):
        anyio.run(lambda: run_policy(policy, errors, request_id="abc123"))
    messages = [record.getMessage() for record in caplog.records]
    assert any("abc123" in m and "attempt 1" in m and "2.000 s" in m for m in messages), messages


def test_cancel_during_backoff_sleep_stops_quickly() -> None:
    # A real sleep of 30 s between attempts; cancelling must end it within about a second.
    policy = RetryPolicy(max_attempts=5, backoff_initial_s=30.0, max_retry_wait_s=30.0)
    attempts = 0

    async def request_forever() -> None:
        nonlocal attempts
        async for attempt in policy.retrying():
            with attempt:
                attempts += 1
                raise ServerError("500", status=500, retry_after=30.0)

    async def main() -> float:
        with anyio.move_on_after(0.3) as scope:
            await request_forever()
        assert scope.cancelled_caught
        return time.monotonic()

    started = time.monotonic()
    finished = anyio.run(main)
    assert finished - started < 1.3
    assert attempts == 1


def test_cancel_during_attempt_is_not_retried() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_initial_s=0.01)
    attempts = 0

    async def main() -> None:
        nonlocal attempts
        with anyio.move_on_after(0.1):
            async for attempt in policy.retrying():
                with attempt:
                    attempts += 1
                    await anyio.sleep(10)

    started = time.monotonic()
    anyio.run(main)
    assert time.monotonic() - started < 1.0
    assert attempts == 1
