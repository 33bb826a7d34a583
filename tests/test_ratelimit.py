"""Rate limiter: rpm/tpm buckets on a fake clock, server hints, adaptive concurrency."""

from __future__ import annotations

import anyio
import pytest

from pipeline.ratelimit import TeacherRateLimiter, TokenBucket, parse_reset_duration


class FakeClock:
    """A clock that only moves when the injected sleep is awaited."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await anyio.sleep(0)


def test_bucket_starts_full_and_refills() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock)
    assert bucket.delay_for(60) == 0
    bucket.take(60)
    assert bucket.delay_for(1) == pytest.approx(1.0)
    clock.now += 0.5
    assert bucket.delay_for(1) == pytest.approx(0.5)


def test_bucket_oversized_request_waits_for_full_bucket() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, clock=clock)
    bucket.take(100)
    # 250 tokens never fit; it waits for a full bucket (60 s) and then goes negative.
    assert bucket.delay_for(250) == pytest.approx(60.0)


def test_rpm_spaces_requests() -> None:
    clock = FakeClock()
    limiter = TeacherRateLimiter(max_concurrency=4, rpm=6, clock=clock, sleep=clock.sleep)
    start = clock.now
    times = []

    async def main() -> None:
        for _ in range(8):
            async with limiter.slot(estimated_tokens=10):
                times.append(clock.now - start)

    anyio.run(main)
    # A burst of 6 (one minute's budget), then one every 10 s.
    assert times[:6] == [0.0] * 6
    assert times[6] == pytest.approx(10.0)
    assert times[7] == pytest.approx(20.0)


def test_tpm_uses_estimate_and_usage_correction() -> None:
    clock = FakeClock()
    limiter = TeacherRateLimiter(max_concurrency=4, tpm=600, clock=clock, sleep=clock.sleep)
    start = clock.now
    times = []

    async def main() -> None:
        for _ in range(3):
            async with limiter.slot(estimated_tokens=300):
                times.append(clock.now - start)
            # The response used only 100 of the 300 estimated tokens.
            limiter.record_usage(300, 100)

    anyio.run(main)
    # Without the correction the third request would wait 30 s for 300 tokens.
    assert times == [0.0, 0.0, 0.0]


def test_tpm_waits_when_spent() -> None:
    clock = FakeClock()
    limiter = TeacherRateLimiter(max_concurrency=4, tpm=600, clock=clock, sleep=clock.sleep)
    start = clock.now
    times = []

    async def main() -> None:
        for _ in range(3):
            async with limiter.slot(estimated_tokens=300):
                times.append(clock.now - start)
            limiter.record_usage(300, 300)

    anyio.run(main)
    assert times[:2] == [0.0, 0.0]
    assert times[2] == pytest.approx(30.0)  # 300 tokens at 10 tokens/s


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
     ("12", 12.0), ("soon", None), ("1s garbage", None), (None, None), ("-1", None)],
)
def test_parse_reset_duration(value: str | None, seconds: float | None) -> None:
    assert parse_reset_duration(value) == seconds


def test_server_spent_budget_pauses_requests() -> None:
    clock = FakeClock()
    limiter = TeacherRateLimiter(max_concurrency=4, clock=clock, sleep=clock.sleep)
    start = clock.now
    limiter.observe_headers(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}, next_request_tokens=10
    )
    times = []

    async def main() -> None:
        async with limiter.slot(estimated_tokens=10):
            times.append(clock.now - start)

    anyio.run(main)
    assert times == [pytest.approx(2.0)]


def test_server_token_budget_pauses_only_when_short() -> None:
    clock = FakeClock()
    limiter = TeacherRateLimiter(max_concurrency=4, clock=clock, sleep=clock.sleep)
    headers = {"x-ratelimit-remaining-tokens": "500", "x-ratelimit-reset-tokens": "6m0s"}
    limiter.observe_headers(headers, next_request_tokens=100)
    assert limiter._paused_until <= clock.now
    limiter.observe_headers(headers, next_request_tokens=1000)
    assert limiter._paused_until == pytest.approx(clock.now + 360.0)


def test_concurrency_halves_on_429_and_grows_back() -> None:
    limiter = TeacherRateLimiter(max_concurrency=16)
    limits = []
    for _ in range(5):
        limiter.on_rate_limited()
        limits.append(limiter.concurrency_limit)
    assert limits == [8, 4, 2, 1, 1]

    # Additive increase: one more slot after as many successes in a row as the limit.
    grown = []
    for _ in range(1 + 2 + 3):
        limiter.on_success()
        grown.append(limiter.concurrency_limit)
    assert grown == [2, 2, 3, 3, 3, 4]

    for _ in range(500):
        limiter.on_success()
    assert limiter.concurrency_limit == 16


def test_reduced_limit_bounds_requests_in_flight() -> None:
    limiter = TeacherRateLimiter(max_concurrency=8)
    limiter.on_rate_limited()
    limiter.on_rate_limited()  # 8 -> 4 -> 2
    in_flight = 0
    peak = 0

    async def request() -> None:
        nonlocal in_flight, peak
        async with limiter.slot(estimated_tokens=1):
            in_flight += 1
            peak = max(peak, in_flight)
            await anyio.sleep(0.01)
            in_flight -= 1

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(12):
                group.start_soon(request)

    anyio.run(main)
    assert peak == 2
