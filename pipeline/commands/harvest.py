"""``pipeline harvest``: send every prompt to every teacher and store the responses.

The command only collects flags, builds the validated config, runs the
:class:`~pipeline.harvest.Harvester` and prints the summary. Exit status: 0 when every
request ended in a stored response, 1 when some failed or some prompt lines were
invalid, 2 for config and usage errors (nothing sent), 130 after SIGINT and 143 after
SIGTERM.

With ``--compact auto`` (the default) a run that was not interrupted ends with
:func:`storage.maintenance.compact_tiered`, so a store that many runs append to keeps
few files. It runs after the harvester has released the store, so it takes the lock
again. A failed compaction is reported but leaves the exit status alone, because every
row is stored either way.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import click

from pipeline.config import (
    DEFAULT_API_KEY_ENV,
    ENDPOINTS,
    HTTP_CLIENTS,
    HarvestConfig,
    HarvestFlags,
    SamplingConfig,
    build_harvest_config,
)
from pipeline.errors import ConfigError, StoreError
from pipeline.harvest import SIGNAL_EXIT_CODES, HarvestResult, Harvester, dry_run
from pipeline.harvest_rows import HarvestStats
from storage.encoding import LOGPROB_ENCODINGS

if TYPE_CHECKING:
    from storage.maintenance import CompactReport

log = logging.getLogger(__name__)

# Cyclic GC thresholds during a harvest (CPython's defaults are 700, 10, 10).
# Decoding one 64-token top-20 chat body allocates about 2,760 lists and dicts, so at
# the default every body set off several collections, some of which traversed the
# whole heap: orjson.loads took 2.75 ms per body against 0.58 ms with this threshold
# (1M live objects, Python 3.11, benchmarks/README.md). Parsed bodies hold no reference
# cycles, so reference counting frees them whatever the threshold.
GC_THRESHOLDS = (50_000, 20, 100)

_DEFAULTS = HarvestConfig(prompts_path=Path(), store_path=Path(), teachers=())
_SAMPLING = SamplingConfig()


@click.command(
    "harvest",
    epilog="""\b
Example:
  pipeline harvest prompts/demo_stories.jsonl --store store/ \\
      --base-url http://127.0.0.1:8400/v1 --model stories260k \\
      --max-tokens 64 --top-logprobs 20 --samples 2 --seed 1
  pipeline harvest prompts/demo_stories.jsonl --store store/ \\
      --config prompts/teachers.example.toml
""",
)
@click.argument("prompts", type=click.Path(path_type=Path))
@click.option("--store", "store_path", type=click.Path(path_type=Path),
              help="Folder of the Parquet store; created when new. Requests already stored there are skipped.")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="TOML file with one or more [[teachers]] tables; every prompt goes to each teacher.")
@click.option("--base-url", help="Teacher's OpenAI-compatible base URL, e.g. http://127.0.0.1:8400/v1.")
@click.option("--model", help="Model name sent in each request.")
@click.option("--teacher", help="Teacher name stored with each row.  [default: the model name]")
@click.option("--api-key-env",
              help=f"Environment variable holding the API key.  [default: {DEFAULT_API_KEY_ENV}; "
                   "without it a loopback teacher gets a placeholder key]")
@click.option("--api-key-file", type=click.Path(path_type=Path), help="File holding the API key.")
@click.option("--endpoint", type=click.Choice(ENDPOINTS),
              help="API to call: chat (/chat/completions) or completions (/completions).  [default: chat]")
@click.option("--max-tokens", type=int, help=f"Maximum tokens per completion.  [default: {_SAMPLING.max_tokens}]")
@click.option("--temperature", type=float, help=f"Sampling temperature.  [default: {_SAMPLING.temperature}]")
@click.option("--top-p", type=float, help="Nucleus sampling probability mass.  [default: not sent]")
@click.option("--seed", type=int, help="Sampling seed; sample i is sent with seed + i.  [default: not sent]")
@click.option("--stop", multiple=True, help="Stop sequence; repeat the flag for several.")
@click.option("--top-logprobs", type=int,
              help=f"Alternatives returned per token; 0 requests no logprobs.  [default: {_SAMPLING.top_logprobs}]")
@click.option("--samples", type=int, help=f"Requests per prompt, sample_index 0..N-1.  [default: {_DEFAULTS.samples}]")
@click.option("--concurrency", type=int,
              help=f"Maximum requests in flight per teacher.  [default: {_DEFAULTS.concurrency}]")
@click.option("--rpm", type=float, help="Requests per minute budget per teacher.  [default: unlimited]")
@click.option("--tpm", type=float,
              help="Tokens per minute budget per teacher (prompt estimate + max tokens).  [default: unlimited]")
@click.option("--http-client", type=click.Choice(HTTP_CLIENTS),
              help="How requests are sent: aiohttp posts each JSON body directly; openai lets the openai SDK"
                   " build each request (its headers and authentication), at about 0.5 ms more CPU per"
                   " request.  [default: aiohttp]")
@click.option("--logprob-encoding", type=click.Choice(sorted(LOGPROB_ENCODINGS)),
              help="How new responses files store logprobs, saved as the store's setting: uint8 in"
                   " 1/8-nat steps (a mean KL of about 4e-4 nats per token between the stored and"
                   " original top-k distributions) or float32, lossless.  [default: the store's"
                   " setting, uint8 for a new store]")
@click.option("--timeout", "timeout_s", type=float,
              help=f"Seconds to wait for one response.  [default: {_DEFAULTS.timeout_s:g}]")
@click.option("--max-attempts", type=int,
              help=f"Attempts per request, the first included.  [default: {_DEFAULTS.max_attempts}]")
@click.option("--max-retry-wait", "max_retry_wait_s", type=float,
              help="Longest wait in seconds before one retry; a longer Retry-After puts the request back"
                   f" in the queue instead.  [default: {_DEFAULTS.max_retry_wait_s:g}]")
@click.option("--backoff-initial", "backoff_initial_s", type=float,
              help="Backoff window in seconds of the first retry, doubled per attempt, random within"
                   f" the window.  [default: {_DEFAULTS.backoff_initial_s:g}]")
@click.option("--deadline", "deadline_s", type=float,
              help="Seconds one request may take from its first attempt, retries included; 0 for"
                   f" no deadline.  [default: {_DEFAULTS.deadline_s:g}]")
@click.option("--limit", type=int, help="Read only the first N prompt lines (blank lines not counted).")
@click.option("--cache-size", type=int,
              help="Completed requests remembered to answer duplicate prompts without sending;"
                   f" 0 disables.  [default: {_DEFAULTS.cache_size}]")
@click.option("--max-consecutive-failures", type=int,
              help="Stop the run after this many requests in a row failed with no response in"
                   " between, as with a wrong URL, model or key; 0 never stops. Unsent prompts are"
                   f" sent by the next run.  [default: {_DEFAULTS.max_consecutive_failures}]")
@click.option("--dry-run", is_flag=True, help="Validate the config and every prompt line; send and store nothing.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (it is hidden anyway when stderr is not a terminal).")
@click.option("--compact", "compact_mode", type=click.Choice(["auto", "off"]), default="auto", show_default=True,
              help="After the run, merge small store files once enough have piled up (auto), or leave them"
                   " to `pipeline compact` (off). Skipped after an interrupted run.")
def command(
    prompts: Path,
    no_progress: bool,
    stop: tuple[str, ...],
    deadline_s: float | None,
    compact_mode: str,
    **options: object,
) -> None:
    """Send every prompt of PROMPTS (JSONL) to the teachers and store responses with logprobs.

    Each prompt line is sent --samples times to each teacher. Rate limits, 5xx errors and
    dropped connections are retried; requests whose retries run out are stored in the
    failures table with the cause. Run the same command again to resume: requests already
    stored are skipped.
    """
    flags = HarvestFlags(
        prompts_path=prompts,
        progress=not no_progress,
        stop=tuple(stop),
        deadline_s=deadline_s,
        **options,  # type: ignore[arg-type]
    )
    try:
        config = build_harvest_config(flags)
    except ConfigError as error:
        _fail_usage(str(error))

    if config.dry_run:
        stats = dry_run(config)
        click.echo(format_dry_run(config, stats))
        raise SystemExit(1 if stats.invalid_lines else 0)

    harvester = Harvester(config, handle_signals=True)
    try:
        with _tuned_gc():
            result = anyio.run(harvester.run)
    except (ConfigError, StoreError) as error:
        _fail_usage(str(error))
    except KeyboardInterrupt:
        # SIGINT before the signal handler was installed: nothing was sent yet.
        click.echo("harvest interrupted before it started", err=True)
        raise SystemExit(SIGNAL_EXIT_CODES[signal.SIGINT]) from None
    click.echo(format_summary(result))
    if compact_mode == "auto" and result.interrupted_by is None:
        _compact_store(result.store_path)
    raise SystemExit(result.exit_code)


def _compact_store(store_path: Path) -> None:
    """Run the tiered compaction after a run and print one summary line about it.

    Exits with status 130 on SIGINT; the store stays readable, with every row once.
    """
    import pyarrow as pa

    from pipeline.errors import DamagedFileError, StoreLockedError
    from storage.maintenance import compact_tiered

    # Hand the harvest's freed Arrow buffers back first, so that the merge's buffers
    # do not stack on top of them in the process's peak memory.
    gc.collect()
    pa.default_memory_pool().release_unused()
    started = time.perf_counter()
    try:
        report = compact_tiered(store_path)
    except StoreLockedError:
        click.echo("  compact    skipped: another writer took the store after this run")
        return
    except KeyboardInterrupt:
        click.echo("  compact    interrupted; no row was lost, the next run finishes it", err=True)
        raise SystemExit(SIGNAL_EXIT_CODES[signal.SIGINT]) from None
    except (DamagedFileError, StoreError, OSError) as error:
        log.warning("compaction after the run failed: %s", error)
        click.echo(
            f"  compact    failed: {error}; no row was lost. Run `pipeline check --store"
            f" {shlex.quote(str(store_path))} --deep` to set damaged files aside",
            err=True,
        )
        return
    click.echo(format_compaction(report, time.perf_counter() - started))


def format_compaction(report: CompactReport, seconds: float) -> str:
    """Return the summary line of a tiered compaction: what was merged, per table."""
    parts = []
    for table in report.tables:
        if table.files_written:
            parts.append(
                f"{table.table} {table.files_merged} files ({table.rows_merged} rows) merged into"
                f" {table.files_written}, {table.files_after} files now"
            )
        else:
            parts.append(f"{table.table} {table.files_after} files, nothing to merge")
        if table.damaged_skipped:
            parts[-1] += f", {len(table.damaged_skipped)} damaged files left alone (run `pipeline check`)"
    return f"  compact    {'; '.join(parts)} ({seconds:.1f} s)"


@contextlib.contextmanager
def _tuned_gc() -> Iterator[None]:
    """Freeze the objects of start-up (modules, config) and make cyclic collections rarer.

    Both are undone on exit, for callers that run the command in their own process.
    """
    # Frozen objects are never traversed again, so each collection costs what the
    # requests in flight hold, not the imported libraries.
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


FAILURE_CAUSES_SHOWN = 5


def _fail_usage(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(2)


def format_summary(result: HarvestResult) -> str:
    """Return the end-of-run summary: counts, tokens, rate, store and a query to start from."""
    stats = result.stats
    wall_s = max(stats.wall_s, 1e-9)
    store = shlex.quote(str(result.store_path))
    lines = [
        f"harvest {result.status} in {stats.wall_s:.1f} s (run {result.run_id})",
        f"  requests   {stats.requests}: {stats.responses} stored responses"
        f" ({stats.incomplete} not finished with 'stop'), {stats.failed} failed,"
        f" {stats.cached} cached, {stats.skipped_stored} skipped (already stored)",
        f"  sent       {stats.sent} HTTP requests ({stats.retries} retries, {stats.requeued} requeued),"
        f" {stats.sent / wall_s:.1f} requests/s",
        f"  prompts    {stats.prompts_read} read, {stats.invalid_lines} invalid lines,"
        f" {stats.blank_lines} blank lines",
        f"  tokens     {stats.prompt_tokens} prompt, {stats.completion_tokens} completion",
        f"  store      {result.store_path}",
        "  query      pipeline sql --store {store} \"SELECT teacher, finish_reason, count(*) AS n"
        " FROM responses WHERE run_id = '{run}' GROUP BY ALL\"".format(store=store, run=result.run_id),
    ]
    causes = sorted(stats.failure_causes.items(), key=lambda item: -item[1])
    for cause, count in causes[:FAILURE_CAUSES_SHOWN]:
        lines.append(f"  failed     {count} x {cause}: {stats.failure_examples[cause]}")
    if len(causes) > FAILURE_CAUSES_SHOWN:
        lines.append(f"  failed     ... and {len(causes) - FAILURE_CAUSES_SHOWN} more causes")
    if stats.failed or stats.invalid_lines:
        lines.append(
            "  failures   pipeline sql --store {store} \"SELECT error_type, http_status, count(*) AS n,"
            " any_value(message) AS example FROM failures WHERE run_id = '{run}' GROUP BY ALL\"".format(
                store=store, run=result.run_id)
        )
    if result.stopped_reason is not None:
        lines.append(f"  stopped    early: {result.stopped_reason}")
    if result.interrupted_by is not None or result.stopped_reason is not None:
        lines.append("  resume     run the same command again; stored requests are skipped")
    return "\n".join(lines)


def format_dry_run(config: HarvestConfig, stats: HarvestStats) -> str:
    teachers = ", ".join(f"{t.name} ({t.endpoint} at {t.base_url})" for t in config.teachers)
    return "\n".join([
        "dry run: nothing sent, nothing stored",
        f"  prompts    {stats.prompts_read} valid, {stats.invalid_lines} invalid lines, {stats.blank_lines} blank lines",
        f"  requests   {stats.requests} would be sent ({config.samples} per prompt and teacher,"
        " fewer if some are already stored)",
        f"  teachers   {teachers}",
    ])
