"""Per-teacher request budgets: rpm and tpm token buckets, server hints, adaptive concurrency.

A request passes three gates before it is sent, each on one teacher's
:class:`TeacherRateLimiter`:

1. a concurrency slot. The allowed in-flight count adapts (AIMD): it halves on every
   429 and grows back by one after as many successes in a row as the current limit,
   up to the configured concurrency;
2. a pause the server asked for through ``x-ratelimit-remaining-*`` = 0 (or fewer
   tokens remaining than the request needs) with ``x-ratelimit-reset-*``;
3. the ``rpm`` and ``tpm`` token buckets. A request takes 1 from the request bucket
   and its estimated tokens (prompt estimate + ``max_tokens``) from the token bucket;
   when the response reports its usage the difference is given back (or taken).

Buckets start full and refill continuously at budget/60 per second, so a burst of a
minute's budget is allowed at start, as providers' own limits allow. A request larger
than a whole bucket waits for a full bucket and then drives it negative, instead of
waiting forever. Clock and sleep are injected for tests.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import anyio

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """A budget of ``per_minute`` units that refills continuously."""

    def __init__(self, per_minute: float, *, clock: Clock = time.monotonic):
        self.capacity = float(per_minute)
        self.rate_per_s = self.capacity / 60.0
        self.level = self.capacity
        self._clock = clock
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._updated) * self.rate_per_s)
        self._updated = now

    def delay_for(self, amount: float) -> float:
        """Return seconds until ``amount`` (at most a full bucket) is available."""
        self._refill()
        needed = min(amount, self.capacity)
        if self.level >= needed:
            return 0.0
        return (needed - self.level) / self.rate_per_s

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give_back(self, amount: float) -> None:
        """Return ``amount`` units (negative takes more), never above capacity."""
        self._refill()
        self.level = min(self.capacity, self.level + amount)


# --- server hints ----------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset_duration(value: str | None) -> float | None:
    """Parse ``x-ratelimit-reset-*`` values: ``"1s"``, ``"6m0s"``, ``"20ms"`` or bare seconds."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
        return seconds if seconds >= 0 else None
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(number) * scale[unit] for number, unit in parts)


def _parse_count(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


# --- limiter ---------------------------------------------------------------------------


class TeacherRateLimiter:
    """The budgets of one teacher; one instance is shared by all its workers."""

    def __init__(
        self,
        *,
        max_concurrency: int,
        rpm: float | None = None,
        tpm: float | None = None,
        name: str = "teacher",
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ):
        self.name = name
        self.max_concurrency = max_concurrency
        self._slots = anyio.CapacityLimiter(max_concurrency)
        self._requests = TokenBucket(rpm, clock=clock) if rpm else None
        self._tokens = TokenBucket(tpm, clock=clock) if tpm else None
        self._clock = clock
        self._sleep = sleep
        self._paused_until = 0.0
        self._successes_in_row = 0
        self._server_remaining_tokens: float | None = None

    @property
    def concurrency_limit(self) -> int:
        """The in-flight count currently allowed (between 1 and ``max_concurrency``)."""
        return int(self._slots.total_tokens)

    @asynccontextmanager
    async def slot(self, estimated_tokens: int) -> AsyncIterator[None]:
        """Wait for a concurrency slot and the budgets, then hold the slot while sending."""
        async with self._slots:
            await self._wait_for_budgets(estimated_tokens)
            yield

    async def _wait_for_budgets(self, estimated_tokens: int) -> None:
        while True:
            delay = self._paused_until - self._clock()
            if self._requests is not None:
                delay = max(delay, self._requests.delay_for(1))
            if self._tokens is not None:
                delay = max(delay, self._tokens.delay_for(estimated_tokens))
            if delay <= 0:
                break
            await self._sleep(delay)
        if self._requests is not None:
            self._requests.take(1)
        if self._tokens is not None:
            self._tokens.take(estimated_tokens)

    def record_usage(self, estimated_tokens: int, used_tokens: int | None) -> None:
        """Correct the token bucket by what the response reports it used."""
        if self._tokens is not None and used_tokens is not None:
            self._tokens.give_back(estimated_tokens - used_tokens)

    def on_success(self) -> None:
        """Grow the concurrency limit by one after ``limit`` successes in a row."""
        self._successes_in_row += 1
        limit = self.concurrency_limit
        if self._successes_in_row >= limit and limit < self.max_concurrency:
            self._slots.total_tokens = limit + 1
            self._successes_in_row = 0

    def on_rate_limited(self) -> None:
        """Halve the concurrency limit (at least 1) after a 429."""
        self._successes_in_row = 0
        limit = self.concurrency_limit
        new_limit = max(1, limit // 2)
        if new_limit < limit:
            # CapacityLimiter lets current holders finish; only new acquisitions wait.
            self._slots.total_tokens = new_limit
            log.info("teacher %s: rate limited, concurrency %d -> %d", self.name, limit, new_limit)

    def observe_headers(self, headers: Mapping[str, str] | None, next_request_tokens: int) -> None:
        """Pause new requests until the reset time when the headers report a spent budget."""
        if not headers:
            return
        now = self._clock()
        remaining_requests = _parse_count(headers.get("x-ratelimit-remaining-requests"))
        if remaining_requests is not None and remaining_requests <= 0:
            self._pause_for(parse_reset_duration(headers.get("x-ratelimit-reset-requests")), now, "requests")
        remaining_tokens = _parse_count(headers.get("x-ratelimit-remaining-tokens"))
        if remaining_tokens is not None and remaining_tokens < next_request_tokens:
            self._pause_for(parse_reset_duration(headers.get("x-ratelimit-reset-tokens")), now, "tokens")

    def _pause_for(self, reset_s: float | None, now: float, budget: str) -> None:
        if reset_s is None or reset_s <= 0:
            return
        until = now + reset_s
        if until > self._paused_until:
            log.info("teacher %s: server %s budget spent, pausing %.2f s", self.name, budget, reset_s)
            self._paused_until = until
