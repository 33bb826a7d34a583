"""Retry policy of teacher requests, as one composed tenacity value, and Retry-After parsing.

What is retried is listed, never inferred: an exception is retried only when it is a
:class:`~pipeline.errors.KDError` whose class sets ``retryable = True`` (rate limits,
5xx, transport failures, truncated bodies). Everything else propagates at once, in
particular ``CancelledError``, ``KeyboardInterrupt`` and ``SystemExit``: a rule written
as "retry everything except X" would retry cancellation and make Ctrl-C or a timeout
unable to stop a request.

The wait before a retry is the server's ``Retry-After`` when the error carries one,
otherwise full-jitter exponential backoff. A server wait longer than
``max_retry_wait_s`` is not slept in the worker: the policy raises
:class:`RequeueRequested` and the harvester puts the request back in its queue with a
not-before time, so an hour-long Retry-After does not hold a worker for an hour. The
attempt still counts, and a wait that would pass the request's deadline stops retrying
instead, because ``stop_before_delay`` is given the full wait, not the capped one.

``sleep`` is injected, so tests record the waits instead of sleeping.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from pipeline.errors import KDError

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


def is_retryable(error: BaseException) -> bool:
    """Return whether ``error`` is worth another attempt (only KDErrors marked retryable)."""
    return isinstance(error, KDError) and getattr(error, "retryable", False) is True


class RequeueRequested(Exception):
    """Control flow, not an error: retry this request after ``delay_s``, from the queue.

    Raised by the policy when the server asked for a wait longer than the cap. ``error``
    is the failure that asked for the wait; ``attempts`` counts every attempt so far.
    """

    def __init__(self, *, delay_s: float, error: BaseException, attempts: int):
        self.delay_s = delay_s
        self.error = error
        self.attempts = attempts
        super().__init__(f"requeue after {delay_s:.1f} s following {type(error).__name__}")


# --- Retry-After -----------------------------------------------------------------------


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: Callable[[], float] = time.time
) -> float | None:
    """Return the server's requested wait in seconds, or ``None`` when it gave none.

    ``retry-after-ms`` (OpenAI and Azure) wins over ``retry-after``. ``retry-after`` is
    delay-seconds or an HTTP date (RFC 9110); a date in the past means "now" (0). A
    value that is neither, negative or not finite is ignored, so the caller falls back
    to exponential backoff. ``now`` is the wall clock in Unix seconds, injectable for
    tests of the date form.
    """
    if not headers:
        return None
    if not hasattr(headers, "multi_items"):
        # Header names are case-insensitive; httpx.Headers already handles that.
        headers = {name.lower(): value for name, value in headers.items()}
    milliseconds = _parse_seconds(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _parse_seconds(value)
    if seconds is not None:
        return seconds
    return _parse_http_date_delay(value, now())


def _parse_seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def _parse_http_date_delay(value: str, now_s: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        # RFC 9110 dates are always GMT; a date without a zone is not one of its forms.
        return None
    return max(0.0, when.timestamp() - now_s)


# --- policy ----------------------------------------------------------------------------


class wait_retry_after(wait_base):
    """Wait what the server asked for (uncapped) or, when it did not ask, ``fallback``."""

    def __init__(self, fallback: wait_base):
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return float(retry_after)
        return self.fallback(retry_state)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry rules of teacher requests: retryable errors, attempt budget, deadline and waits."""

    max_attempts: int = 6
    deadline_s: float | None = 900.0
    max_retry_wait_s: float = 60.0
    backoff_initial_s: float = 1.0
    sleep: Sleep = field(default=anyio.sleep, compare=False)

    def retrying(
        self,
        *,
        request_id: str | None = None,
        attempts_before: int = 0,
        elapsed_before_s: float = 0.0,
    ) -> AsyncRetrying:
        """Return the tenacity controller of one request.

        A request that was requeued passes the attempts it already made and the time
        since its first attempt, so the attempt budget and the deadline span requeues.
        """
        return AsyncRetrying(
            retry=retry_if_exception(is_retryable),
            stop=self._stop(attempts_before, elapsed_before_s),
            wait=wait_retry_after(
                wait_random_exponential(multiplier=self.backoff_initial_s, max=self.max_retry_wait_s)
            ),
            before_sleep=_BeforeSleep(self.max_retry_wait_s, request_id, attempts_before),
            sleep=self.sleep,
            reraise=True,
        )

    def _stop(self, attempts_before: int, elapsed_before_s: float) -> stop_base:
        stop: stop_base = stop_after_attempt(max(1, self.max_attempts - attempts_before))
        if self.deadline_s is not None:
            stop = stop | stop_before_delay(max(0.0, self.deadline_s - elapsed_before_s))
        return stop


class _BeforeSleep:
    """Log each retry, and turn a wait above the cap into :class:`RequeueRequested`."""

    def __init__(self, cap_s: float, request_id: str | None, attempts_before: int):
        self.cap_s = cap_s
        self.request_id = request_id
        self.attempts_before = attempts_before

    def __call__(self, retry_state: RetryCallState) -> None:
        error = retry_state.outcome.exception()
        attempts = self.attempts_before + retry_state.attempt_number
        wait_s = retry_state.upcoming_sleep
        if wait_s > self.cap_s:
            log.info(
                "requeueing request %s after attempt %d: %s asked to wait %.1f s (cap %.1f s)",
                self.request_id, attempts, type(error).__name__, wait_s, self.cap_s,
            )
            raise RequeueRequested(delay_s=wait_s, error=error, attempts=attempts)
        log.info(
            "retrying request %s after attempt %d in %.3f s: %s: %s",
            self.request_id, attempts, wait_s, type(error).__name__, error,
        )
