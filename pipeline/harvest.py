"""Harvest orchestrator: prompts in, one stored response or failure row per request out.

Data flow, all on one anyio event loop::

    PromptReader (file, read in a worker thread, in batches)
        -> producer: builds WorkItems, skips stored ids, serves duplicates from the cache
        -> one bounded queue per teacher
        -> N workers per teacher: rate limiter slot -> TeacherClient.send -> retry policy
        -> StoreWriter (journaled before add_* returns; called from the event loop thread)

Memory for requests does not grow with the number of prompts: the file is streamed,
every queue is bounded (the producer waits when a teacher's queue is full), the
duplicate cache is an LRU, and requests in flight are bounded by the workers. What does
grow are three sets of ids: the request_ids already in the store (read once for
resume), those the store writer keeps to reject duplicates, and the prompt ids the
reader keeps to reject duplicate ids. Each is a :class:`~pipeline.harvest_ids.DigestSet`
of 16 bytes per id (a Python set of the id strings took about 110 MB per million). A
20,000-prompt run against the fault server stayed at 190-224 MB RSS throughout.

NOTE: teachers share the producer, so a teacher whose queue stays full (slow or rate
limited) also holds back prompts for the others.

Every request ends in exactly one outcome: skipped (already stored), cached (a duplicate
of a request completed in this run), a stored response, or a stored failure row
(retries ran out, or an error that is not retried). Invalid prompt lines become failure
rows too. A request whose server wait exceeds the cap is requeued, not slept on. On
SIGINT or SIGTERM the work is cancelled; what was received is already journaled, the
writer is closed and the run is recorded as interrupted. Requests in flight then are
lost and sent again by the next run.

Responses whose ``finish_reason`` is not ``stop`` (``length``, ``content_filter``) are
stored with their finish reason and count as stored, so a resumed run skips them and
each request_id stays unique in ``responses``. To ask again, change the request (for
example a larger ``--max-tokens``), which gives it a new request_id.
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.cache import LRUCache
from pipeline.client import TeacherClient, TeacherReply
from pipeline.config import HarvestConfig, TeacherConfig
from pipeline.errors import (
    KDError,
    MissingLogprobsError,
    PromptError,
    RateLimitError,
    ResponseFormatError,
)
from pipeline.harvest_ids import DigestSet
from pipeline.harvest_progress import HarvestProgress
from pipeline.harvest_requests import WorkItem, build_work_item
from pipeline.harvest_rows import (
    HarvestStats,
    failure_row,
    invalid_prompt_row,
    new_run_id,
    response_row,
    run_row,
    utc_now,
)
from pipeline.prompts import PromptReader, PromptRecord
from pipeline.ratelimit import TeacherRateLimiter
from pipeline.retry import RequeueRequested, RetryPolicy, Sleep
from storage.store import Store, StoreWriter

log = logging.getLogger(__name__)

READ_BATCH_LINES = 256
QUEUE_ITEMS_PER_WORKER = 2
# Pending rows are committed to a Parquet file at least this often, and when 256 are
# pending. Every row is journaled first, so the interval bounds how late rows show in
# queries during a run, not what a crash loses. At 2 s, a teacher that returned 2.5
# responses per second left a file of about 5 rows every 2 s until compaction merged them.
FLUSH_INTERVAL_S = 30.0
# Invalid prompt lines logged one by one; the rest are only counted and stored.
INVALID_LINES_LOGGED = 20

SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class HarvestResult:
    """Outcome of a finished or interrupted run."""

    run_id: str
    status: str
    stats: HarvestStats
    store_path: Path
    interrupted_by: int | None = None
    stopped_reason: str | None = None

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return SIGNAL_EXIT_CODES.get(self.interrupted_by, 128 + int(self.interrupted_by))
        return 1 if self.stats.failed or self.stats.invalid_lines else 0


@dataclass
class _Lane:
    """One teacher's client, budgets and queue; ``pending`` counts unresolved items."""

    teacher: TeacherConfig
    client: TeacherClient
    limiter: TeacherRateLimiter
    send: MemoryObjectSendStream[WorkItem]
    receive: MemoryObjectReceiveStream[WorkItem]
    workers: int
    pending: int = 0
    warned_missing_logprobs: bool = False


@dataclass
class _Done:
    """Cache entry of a request stored in this run."""

    finish_reason: str | None


@dataclass
class HarvestHooks:
    """Injection points for tests: sleep (retry waits), wall clock (HTTP dates), client."""

    sleep: Sleep = anyio.sleep
    now: Callable[[], float] = time.time
    client_factory: Callable[..., TeacherClient] = TeacherClient
    run_id: str | None = None


class Harvester:
    """Runs one harvest as configured; create one per run."""

    def __init__(self, config: HarvestConfig, *, hooks: HarvestHooks | None = None, handle_signals: bool = False):
        self.config = config
        self.hooks = hooks or HarvestHooks()
        self.handle_signals = handle_signals
        self.run_id = self.hooks.run_id or new_run_id()
        self.stats = HarvestStats()
        self.interrupted_by: int | None = None
        self.stopped_reason: str | None = None
        self._consecutive_failures = 0
        self.policy = RetryPolicy(
            max_attempts=config.max_attempts,
            deadline_s=config.deadline_s,
            max_retry_wait_s=config.max_retry_wait_s,
            backoff_initial_s=config.backoff_initial_s,
            sleep=self.hooks.sleep,
        )
        self._prompts_path = str(config.prompts_path)
        self._cache: LRUCache[str, _Done] = LRUCache(config.cache_size)
        self._inflight: dict[str, list[WorkItem]] = {}
        self._stored = DigestSet()
        self._lanes: list[_Lane] = []
        self._writer: StoreWriter | None = None
        self._producer_done = False
        self._work_scope: anyio.CancelScope | None = None
        self._task_group: TaskGroup | None = None
        self._progress: HarvestProgress | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self) -> HarvestResult:
        """Run the harvest against the store; raises StoreLockedError if another holds it."""
        store = Store(self.config.store_path)
        started_at = utc_now()
        with store.lock():
            report = store.recover()
            if report.changed:
                log.info("store %s recovered: %s", store.root, report.summary())
            self._stored = store.stored_request_ids()
            encoding = self.config.logprob_encoding
            if encoding is not None and encoding != store.logprob_encoding.name:
                store.set_logprob_encoding(encoding)
            self._writer = store.writer(self.run_id, batch_seconds=FLUSH_INTERVAL_S)
            store.write_run(self._run_row("running", started_at, None))
            status = "failed"
            try:
                await self._run_lanes()
                status = self._final_status()
            finally:
                with anyio.CancelScope(shield=True):
                    self.stats.finished_monotonic = time.monotonic()
                    if self.interrupted_by is not None:
                        status = "interrupted"
                    self._writer.close()
                    store.write_run(self._run_row(status, started_at, utc_now()))
                    await self._close_clients()
        return HarvestResult(
            self.run_id, status, self.stats, store.root, self.interrupted_by, self.stopped_reason
        )

    def interrupt(self, signum: int) -> None:
        """Stop sending and cancel requests in flight; the run ends as interrupted."""
        if self.interrupted_by is None:
            log.warning("received %s: stopping, requests in flight are cancelled", signal.Signals(signum).name)
            self.interrupted_by = signum
        if self._work_scope is not None:
            self._work_scope.cancel()

    def _final_status(self) -> str:
        if self.interrupted_by is not None:
            return "interrupted"
        return "failed" if self.stats.failed or self.stats.invalid_lines else "completed"

    def _run_row(self, status: str, started_at: datetime, finished_at: datetime | None) -> dict:
        return run_row(
            self.config, self.stats, run_id=self.run_id, status=status,
            started_at=started_at, finished_at=finished_at,
        )

    async def _close_clients(self) -> None:
        for lane in self._lanes:
            await lane.client.aclose()

    # --- tasks -------------------------------------------------------------------------

    async def _run_lanes(self) -> None:
        self._lanes = [self._open_lane(teacher) for teacher in self.config.teachers]
        with HarvestProgress(self.config, self.stats) as progress:
            self._progress = progress
            async with anyio.create_task_group() as outer:
                if self.handle_signals:
                    outer.start_soon(self._watch_signals)
                outer.start_soon(self._flush_periodically)
                with anyio.CancelScope() as self._work_scope:
                    if self.interrupted_by is not None:
                        self._work_scope.cancel()  # a signal arrived during start-up
                    async with anyio.create_task_group() as group:
                        self._task_group = group
                        for lane in self._lanes:
                            for _ in range(lane.workers):
                                group.start_soon(self._work, lane)
                        group.start_soon(self._produce)
                outer.cancel_scope.cancel()

    def _open_lane(self, teacher: TeacherConfig) -> _Lane:
        workers = self.config.teacher_concurrency(teacher)
        send, receive = anyio.create_memory_object_stream[WorkItem](workers * QUEUE_ITEMS_PER_WORKER)
        client = self.hooks.client_factory(
            teacher,
            timeout_s=self.config.timeout_s,
            max_connections=workers,
            top_logprobs=self.config.sampling.top_logprobs,
            now=self.hooks.now,
        )
        limiter = TeacherRateLimiter(
            max_concurrency=workers, rpm=teacher.rpm, tpm=teacher.tpm, name=teacher.name,
        )
        return _Lane(teacher, client, limiter, send, receive, workers)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.interrupt(signum)

    async def _flush_periodically(self) -> None:
        # The writer commits batches only when rows arrive; this commits a slow trickle.
        while True:
            await anyio.sleep(FLUSH_INTERVAL_S)
            if self._writer.pending_rows:
                self._writer.flush()

    # --- producer ----------------------------------------------------------------------

    async def _produce(self) -> None:
        reader = PromptReader(self.config.prompts_path)
        entries = _limited(iter(reader), self.config.limit)
        while True:
            batch = await anyio.to_thread.run_sync(_take, entries, READ_BATCH_LINES)
            if not batch:
                break
            for entry in batch:
                if isinstance(entry, PromptError):
                    self._record_invalid_prompt(entry)
                else:
                    self.stats.prompts_read += 1
                    await self._dispatch_record(entry)
            self.stats.blank_lines = reader.blank_lines
        self._producer_done = True
        for lane in self._lanes:
            self._close_lane_if_done(lane)

    async def _dispatch_record(self, record: PromptRecord) -> None:
        for lane in self._lanes:
            for sample_index in range(self.config.samples):
                try:
                    item = build_work_item(
                        lane.teacher, record, sample_index, self.config.sampling, self._prompts_path,
                    )
                except PromptError as error:
                    self._record_invalid_prompt(error, teacher=lane.teacher.name)
                    break
                await self._dispatch(lane, item)

    async def _dispatch(self, lane: _Lane, item: WorkItem) -> None:
        """Skip ``item``, serve it from the cache, attach it to an identical request in flight, or queue it."""
        request_id = item.request_id
        self.stats.requests += 1
        if request_id in self._stored:
            self.stats.skipped_stored += 1
            self._advance()
            return
        done = self._cache.get(request_id)
        if done is not None:
            self._count_duplicate(done)
            return
        # request_id includes the teacher, so identical requests share one lane.
        followers = self._inflight.get(request_id)
        lane.pending += 1
        if followers is not None:
            followers.append(item)
            return
        self._inflight[request_id] = []
        await lane.send.send(item)

    def _count_duplicate(self, done: _Done) -> None:
        # A duplicate of a stored incomplete response is not a cached good result, but it
        # is stored, so it counts as skipped like on resume.
        if done.finish_reason == "stop":
            self.stats.cached += 1
        else:
            self.stats.skipped_stored += 1
        self._advance()

    # --- workers -----------------------------------------------------------------------

    async def _work(self, lane: _Lane) -> None:
        async for item in lane.receive:
            await self._process(lane, item)

    async def _process(self, lane: _Lane, item: WorkItem) -> None:
        try:
            reply = await self._send_with_retries(lane, item)
        except RequeueRequested as requeue:
            self.stats.requeued += 1
            self._task_group.start_soon(self._requeue_later, lane, item, requeue.delay_s)
            return
        except KDError as error:
            self._record_failure(lane, item, error)
            self._resolve(lane, item, None)
            return
        done = self._record_response(lane, item, reply)
        self._resolve(lane, item, done)

    async def _send_with_retries(self, lane: _Lane, item: WorkItem) -> TeacherReply:
        # The first attempt of a request runs outside tenacity, whose controller cost
        # about 5 % of the harvester's CPU per request, and most requests need no other.
        # A failure is replayed as the controller's first attempt below. Waits,
        # Retry-After, the attempt budget, the deadline and requeueing so stay the same.
        first_error: BaseException | None = None
        if item.attempts == 0:
            item.attempts = 1
            item.first_attempt_at = time.monotonic()
            try:
                return await self._attempt(lane, item)
            except Exception as error:  # noqa: BLE001 - every outcome goes to the retry policy
                first_error = error

        replayed = 1 if first_error is not None else 0
        elapsed_s = 0.0 if item.first_attempt_at is None else time.monotonic() - item.first_attempt_at
        retrying = self.policy.retrying(
            request_id=item.request_id, attempts_before=item.attempts - replayed, elapsed_before_s=elapsed_s,
        )
        reply: TeacherReply | None = None
        async for attempt in retrying:
            with attempt:
                if first_error is not None:
                    error, first_error = first_error, None
                    raise error
                if item.attempts:
                    self.stats.retries += 1
                item.attempts += 1
                if item.first_attempt_at is None:
                    item.first_attempt_at = time.monotonic()
                reply = await self._attempt(lane, item)
        assert reply is not None
        return reply

    async def _attempt(self, lane: _Lane, item: WorkItem) -> TeacherReply:
        async with lane.limiter.slot(item.estimated_tokens):
            self.stats.sent += 1
            try:
                reply = await lane.client.send(item.body, request_id=item.request_id)
            except RateLimitError:
                lane.limiter.on_rate_limited()
                raise
        lane.limiter.on_success()
        lane.limiter.observe_headers(reply.headers, item.estimated_tokens)
        used = _used_tokens(reply)
        lane.limiter.record_usage(item.estimated_tokens, used)
        return reply

    async def _requeue_later(self, lane: _Lane, item: WorkItem, delay_s: float) -> None:
        await self.hooks.sleep(delay_s)
        await lane.send.send(item)

    # --- outcomes ----------------------------------------------------------------------

    def _record_response(self, lane: _Lane, item: WorkItem, reply: TeacherReply) -> _Done | None:
        """Store the response; return what the cache keeps, or ``None`` if it became a failure."""
        parsed = reply.parsed
        row = response_row(item, parsed, reply.latency_ms, run_id=self.run_id, prompts_path=self._prompts_path)
        written_before = self._writer.responses_written
        try:
            self._writer.add_response(row)
        except (ValueError, TypeError) as error:
            # A body the parser accepted but the schema rejects (say, a count beyond
            # int32) fails this request only, not the whole run.
            self._record_failure(lane, item, ResponseFormatError(
                f"teacher {lane.teacher.name}: request {item.request_id}: response cannot be stored: {error}"))
            return None
        if self._writer.responses_written == written_before:
            # The writer already had this request_id (a duplicate evicted from the cache).
            self.stats.skipped_stored += 1
            return _Done(parsed.choices[0].finish_reason)
        self.stats.responses += 1
        self._consecutive_failures = 0
        self.stats.prompt_tokens += parsed.prompt_tokens or 0
        self.stats.completion_tokens += parsed.completion_tokens or 0
        choice = parsed.choices[0]
        if choice.finish_reason != "stop" or choice.text is None:
            self.stats.incomplete += 1
            # Null content is never a good result, even with finish_reason "stop".
            return _Done(choice.finish_reason if choice.text is not None else None)
        return _Done("stop")

    def _record_failure(self, lane: _Lane, item: WorkItem, error: KDError) -> None:
        row = failure_row(item, error, run_id=self.run_id, prompts_path=self._prompts_path)
        row["attempts"] = item.attempts
        self._writer.add_failure(row)
        self.stats.failed += 1
        self._consecutive_failures += 1
        self._stop_after_failure_streak(error)
        if self.stats.count_failure(error):
            # One line per cause at the default verbosity makes a wrong URL, model or key
            # visible at once. Later failures of the same cause log at INFO.
            log.warning("request %s failed after %d attempts: %s: %s (further failures of this"
                        " kind are counted in the summary)", item.request_id, item.attempts,
                        type(error).__name__, error)
        else:
            log.info("request %s failed after %d attempts: %s: %s", item.request_id, item.attempts,
                     type(error).__name__, error)
        if isinstance(error, MissingLogprobsError) and not lane.warned_missing_logprobs:
            lane.warned_missing_logprobs = True
            log.error(
                "teacher %s returned no logprobs although %d were requested: %s. Such requests"
                " are recorded as failures and not retried; use a server that returns logprobs,"
                " or --top-logprobs 0 to harvest text only",
                lane.teacher.name, self.config.sampling.top_logprobs, error,
            )

    def _stop_after_failure_streak(self, error: KDError) -> None:
        # Requests failing back to back with no response in between mean a wrong URL,
        # model or key far more often than bad luck, and would retry for hours.
        limit = self.config.max_consecutive_failures
        if not limit or self._consecutive_failures < limit or self.stopped_reason is not None:
            return
        self.stopped_reason = (
            f"{self._consecutive_failures} requests in a row failed, the last with"
            f" {type(error).__name__}; fix the cause shown above, or raise"
            " --max-consecutive-failures (0 never stops)"
        )
        log.error("stopping the run: %s", self.stopped_reason)
        if self._work_scope is not None:
            self._work_scope.cancel()

    def _record_invalid_prompt(self, error: PromptError, *, teacher: str | None = None) -> None:
        self._writer.add_failure(
            invalid_prompt_row(error, run_id=self.run_id, prompts_path=self._prompts_path, teacher=teacher)
        )
        self.stats.invalid_lines += 1
        if self.stats.invalid_lines <= INVALID_LINES_LOGGED:
            log.warning("invalid prompt: %s", error)
        if self.stats.invalid_lines == INVALID_LINES_LOGGED:
            log.warning("more invalid prompt lines are counted and stored without a log line each")
        self._advance()

    def _resolve(self, lane: _Lane, item: WorkItem, done: _Done | None) -> None:
        """Settle ``item`` and the duplicates that waited for it.

        ``done`` is ``None`` for a failure. A stored response (complete or not) settles
        the duplicates; after a failure the first duplicate is sent instead.
        """
        followers = self._inflight.pop(item.request_id, [])
        lane.pending -= 1
        if done is not None:
            self._cache.put(item.request_id, done)
            for _ in followers:
                lane.pending -= 1
                self._count_duplicate(done)
        elif followers:
            first, rest = followers[0], followers[1:]
            self._inflight[item.request_id] = rest
            self._task_group.start_soon(lane.send.send, first)
        self._advance()
        self._close_lane_if_done(lane)

    def _advance(self) -> None:
        if self._progress is not None:
            self._progress.update()

    def _close_lane_if_done(self, lane: _Lane) -> None:
        if self._producer_done and lane.pending == 0:
            lane.send.close()


def _used_tokens(reply: TeacherReply) -> int | None:
    parsed = reply.parsed
    if parsed.prompt_tokens is None or parsed.completion_tokens is None:
        return None
    return parsed.prompt_tokens + parsed.completion_tokens


def _take(entries: Iterator, count: int) -> list:
    return list(itertools.islice(entries, count))


def _limited(entries: Iterator, limit: int | None) -> Iterator:
    return entries if limit is None else itertools.islice(entries, limit)


def dry_run(config: HarvestConfig) -> HarvestStats:
    """Read every prompt and build every request without sending or storing anything."""
    stats = HarvestStats()
    reader = PromptReader(config.prompts_path)
    for entry in _limited(iter(reader), config.limit):
        if isinstance(entry, PromptError):
            stats.invalid_lines += 1
            log.warning("invalid prompt: %s", entry)
            continue
        stats.prompts_read += 1
        for teacher in config.teachers:
            for sample_index in range(config.samples):
                try:
                    build_work_item(teacher, entry, sample_index, config.sampling, str(config.prompts_path))
                except PromptError as error:
                    stats.invalid_lines += 1
                    log.warning("invalid prompt: %s", error)
                    break
                stats.requests += 1
    stats.blank_lines = reader.blank_lines
    stats.finished_monotonic = time.monotonic()
    return stats

