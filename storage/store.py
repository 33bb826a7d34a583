"""The Parquet store: layout, single-writer lock, batched writer and crash recovery.

Layout under the store root::

    store.json     schema version and the ordered list of applied migrations
    .lock          the writer lock (fcntl), holding the holder's pid for messages
    responses/     finished part-*.parquet files only
    failures/      finished part-*.parquet files only
    runs/          <run_id>.parquet, one file per run, replaced as its status changes
    journal/       write-ahead journal segments of rows not yet in Parquet
    quarantine/    damaged files set aside by ``pipeline check``

Responses files store the logprob columns in the encoding that store.json's
``logprob_encoding`` names: ``uint8`` by default, ``float32`` for lossless storage
(:meth:`Store.set_logprob_encoding`, :mod:`storage.encoding`). Each file records its
own encoding, so a store may mix them.

One writer at a time: :meth:`Store.lock` takes an exclusive, non-blocking
``fcntl.flock`` on ``.lock``. A second harvest on the same store stops at once with
:class:`StoreLockedError` naming the holder. The kernel releases the lock when the
holder exits, even on ``kill -9``, so a dead writer never leaves a stale lock.
Readers take no lock.

Exactly once: a row is checked against the schema and journaled (see
:mod:`storage.journal`) before :meth:`StoreWriter.add_response` returns, and a batch
is committed by writing ``part-<segment>.parquet`` under a hidden partial name,
renaming it into place and only then deleting the segment's journal. After any crash,
:meth:`Store.recover` replays a journal only if its Parquet file does not exist, and skips request_ids that are already stored.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DamagedFileError, StoreError, StoreLockedError
from pipeline.harvest_ids import DigestSet
from storage.catalog import (
    STORE_METADATA_FILE,
    TABLES,
    is_partial_name,
    list_table_files,
    read_store_metadata,
)
from storage.journal import (
    ROW_JOURNAL_SUFFIX,
    JournalFile,
    JournalSegment,
    RowJournalSegment,
    list_journals,
    journal_path,
    part_file_name,
    read_journal,
    segment_id,
    validate_run_id,
)
from storage.encoding import (
    DEFAULT_LOGPROB_ENCODING,
    LogprobEncoding,
    encode_responses_table,
    logprob_encoding_named,
)
from storage.schema import (
    RESPONSES_SCHEMA,
    SCHEMA_VERSION,
    TABLE_SCHEMAS,
    build_responses_table,
    build_table,
    checked_row,
    validate_table,
)

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
JOURNAL_DIR = "journal"
QUARANTINE_DIR = "quarantine"
LAYOUT_DIRS = (*TABLES, JOURNAL_DIR, QUARANTINE_DIR)
QUARANTINE_REPORT = "report.jsonl"
PARQUET_COMPRESSION = "zstd"
# Level 3 instead of pyarrow's default 1: on the tiny teacher's top-20 logprobs it
# stored 1.2 bytes per token less, for about 1 ms more CPU per 256-row file.
PARQUET_COMPRESSION_LEVEL = 3


@functools.lru_cache(maxsize=16)
def parquet_write_options(schema: pa.Schema) -> dict[str, Any]:
    """Return ``pyarrow.parquet`` writer options for a table of ``schema``.

    Float columns skip dictionary encoding and use BYTE_STREAM_SPLIT: logprobs rarely
    repeat, so a dictionary only adds bytes, while splitting the float bytes into streams
    lets zstd compress them. The change is lossless. On 490 responses of the tiny teacher
    with top-20 alternatives, the files went from 125 to 104 bytes per generated token
    (``benchmarks/bench_store.py`` has the full comparison).

    uint8 columns (quantised logprobs, see :mod:`storage.encoding`) are written the same
    way. Parquet stores them as 4-byte INT32, and BYTE_STREAM_SPLIT puts the code bytes
    in one stream and the three zero bytes in others, which zstd removes. A dictionary
    bit-packs the codes at 7 bits when fewer than 129 occur, which zstd compresses
    poorly: 19 % larger than BYTE_STREAM_SPLIT for 1/6-nat codes of the tiny teacher.
    """
    floats: list[str] = []
    others: list[str] = []

    def walk(path: str, data_type: pa.DataType) -> None:
        if pa.types.is_list(data_type):
            walk(f"{path}.list.element", data_type.value_type)
        elif pa.types.is_struct(data_type):
            for child in data_type:
                walk(f"{path}.{child.name}", child.type)
        elif pa.types.is_floating(data_type) or pa.types.is_uint8(data_type):
            floats.append(path)
        else:
            others.append(path)

    for schema_field in schema:
        walk(schema_field.name, schema_field.type)
    return {
        "compression": PARQUET_COMPRESSION,
        "compression_level": PARQUET_COMPRESSION_LEVEL,
        "use_dictionary": others,
        "column_encoding": {path: "BYTE_STREAM_SPLIT" for path in floats},
        # Min/max statistics of list elements let no reader skip a row group, and
        # computing them for 20 alternatives per token cost 10 to 15 % of the write.
        "write_statistics": [f.name for f in schema if not pa.types.is_list(f.type)],
    }
# Pending response rows are built into an Arrow table this many at a time. For 64 tokens
# x 20 alternatives a one-row table cost 0.43 ms of CPU and a row of a 32-row table about
# 0.2 ms. Keeping a whole 256-row batch as Python lists instead raised the harvester's
# peak RSS from 239 to 307 MB (shared 2-core VM, Python 3.11, pyarrow 26).
RESPONSE_BUILD_ROWS = 32


# --- Files ----------------------------------------------------------------------------


def fsync_directory(path: Path) -> None:
    """Make renames and deletions inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(path: Path) -> Path:
    """Return the hidden name a file is written under before it is renamed to ``path``."""
    return path.with_name(f".{path.name}.tmp")


def write_parquet_atomic(
    table: pa.Table, path: Path, *, logprob_encoding: LogprobEncoding = DEFAULT_LOGPROB_ENCODING
) -> None:
    """Write ``table`` to ``path`` so that readers see the whole file or nothing.

    A table in the logical ``RESPONSES_SCHEMA`` is stored in ``logprob_encoding``
    (see :mod:`storage.encoding`); other tables are written as they are. The data goes
    to a hidden partial name (never matched by ``*.parquet``), is fsynced, and is
    renamed into place with ``os.replace``.
    """
    if table.schema.equals(RESPONSES_SCHEMA, check_metadata=False):
        table = encode_responses_table(table, logprob_encoding)
    partial = partial_path(path)
    try:
        pq.write_table(table, partial, **parquet_write_options(table.schema.remove_metadata()))
        fsync_file(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quarantine_file(root: Path, path: Path, kind: str, reason: str) -> Path:
    """Move a damaged file to ``quarantine/<kind>/`` and append the reason to the report.

    The report, ``quarantine/report.jsonl``, has one JSON object per moved file.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target_dir = root / QUARANTINE_DIR / kind
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{stamp}-{path.name}"
    os.replace(path, target)
    fsync_directory(path.parent)

    entry = {"file": str(path), "moved_to": str(target), "reason": reason, "at": stamp}
    with (root / QUARANTINE_DIR / QUARANTINE_REPORT).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
    logger.warning("moved damaged file %s to %s: %s", path, target, reason)
    return target


def read_columns(path: Path, columns: list[str]) -> pa.Table:
    """Read some columns of a Parquet file, raising :class:`DamagedFileError` if they are corrupt."""
    try:
        # ParquetFile, not pq.read_table: read_table goes through pyarrow.dataset, whose
        # import (with pandas when installed) cost a resumed harvest 0.25 s of start-up.
        return pq.ParquetFile(path).read(columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DamagedFileError(
            f"columns {columns} unreadable: {exc}; run `pipeline check --deep` to set the file aside",
            path=str(path),
        ) from exc


def write_json_atomic(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` so that readers see the old or the new file, never a part."""
    partial = partial_path(path)
    partial.write_text(json.dumps(value, indent=2) + "\n")
    fsync_file(partial)
    os.replace(partial, path)
    fsync_directory(path.parent)


# --- Migrations -----------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One named, idempotent step that brings a store's layout up to date."""

    name: str
    apply: Callable[[Path], None]


def _create_layout(root: Path) -> None:
    for name in LAYOUT_DIRS:
        (root / name).mkdir(exist_ok=True)


def _no_layout_change(root: Path) -> None:
    """Mark a schema version whose files need no change to the directory layout."""


# Applied in order; store.json records the names applied so far. Append new steps,
# never reorder or rename old ones.
MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_create_layout", _create_layout),
    # Schema version 2 stores logprobs in encoded form. Recording this step raises the
    # schema_version in store.json, so older code rejects the store instead of
    # misreading its files.
    Migration("0002_logprob_encoding", _no_layout_change),
)

LOGPROB_ENCODING_SETTING = "logprob_encoding"
"""Key in store.json naming the encoding of new responses files (see :mod:`storage.encoding`)."""


# --- Reports --------------------------------------------------------------------------


@dataclass
class RecoveryReport:
    """Outcome of :meth:`Store.recover`: segments replayed, rows recovered, files removed."""

    journals_found: int = 0
    journals_replayed: int = 0
    journals_already_committed: int = 0
    responses_recovered: int = 0
    failures_recovered: int = 0
    duplicates_skipped: int = 0
    torn_tails: int = 0
    partial_files_removed: int = 0
    superseded_files_removed: int = 0
    journals_quarantined: int = 0
    runs_marked_crashed: int = 0

    @property
    def changed(self) -> bool:
        return bool(
            self.journals_found
            or self.partial_files_removed
            or self.superseded_files_removed
            or self.runs_marked_crashed
        )

    def summary(self) -> str:
        return (
            f"recovered {self.responses_recovered} responses and {self.failures_recovered}"
            f" failures from {self.journals_replayed} journal segments"
            f" ({self.journals_already_committed} already committed,"
            f" {self.duplicates_skipped} duplicate rows skipped, {self.torn_tails} torn tails);"
            f" removed {self.partial_files_removed} partial and"
            f" {self.superseded_files_removed} superseded files;"
            f" quarantined {self.journals_quarantined} invalid journal segments;"
            f" marked {self.runs_marked_crashed} runs that died while running as crashed"
        )


# --- Store ----------------------------------------------------------------------------


class Store:
    """A store directory: its layout, lock, writer and recovery.

    ``Store(root)`` creates the layout and ``store.json`` when ``root`` is new or
    empty, and applies pending migrations. With ``create=False`` a missing store is
    an error. Writing (:meth:`writer`, :meth:`recover`) holds the exclusive lock,
    taken on demand when the caller has not taken it with :meth:`lock`.
    """

    def __init__(self, root: str | Path, *, create: bool = True):
        self.root = Path(root).resolve()
        self._lock_fd: int | None = None
        self._open_writers: set[str] = set()
        self.logprob_encoding = DEFAULT_LOGPROB_ENCODING
        """Encoding of the responses files this store writes: the store.json setting."""

        if (self.root / STORE_METADATA_FILE).exists():
            self._open_existing()
        elif create:
            self._create()
        else:
            raise StoreError(
                f"no store at {self.root}: {STORE_METADATA_FILE} is missing;"
                " pass the directory a harvest wrote with --store"
            )

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- layout and migrations

    def _create(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"cannot create a store at {self.root}: it is a file")
        self.root.mkdir(parents=True, exist_ok=True)
        unexpected = sorted(
            p.name for p in self.root.iterdir() if p.name not in (*LAYOUT_DIRS, LOCK_FILE)
        )
        if unexpected:
            raise StoreError(
                f"cannot create a store in {self.root}: the directory is not empty"
                f" (contains {', '.join(unexpected[:5])}) and has no {STORE_METADATA_FILE};"
                " pass a new or empty directory"
            )
        with self.lock():
            for migration in MIGRATIONS:
                migration.apply(self.root)
            now = _utc_now_iso()
            self._write_metadata([{"name": m.name, "applied_at": now} for m in MIGRATIONS])
        logger.info("created store at %s", self.root)

    def _open_existing(self) -> None:
        metadata = read_store_metadata(self.root)
        self.logprob_encoding = self._encoding_setting(metadata)
        applied = [step.get("name") for step in metadata.get("migrations", [])]
        known = [m.name for m in MIGRATIONS]
        if applied != known[: len(applied)]:
            raise StoreError(
                f"store {self.root} has migrations {applied}, this code knows {known};"
                " it was written by another version of kd-pipeline: upgrade to use it"
            )
        pending = MIGRATIONS[len(applied) :]
        if not pending:
            return
        with self.lock():
            steps = list(metadata.get("migrations", []))
            for migration in pending:
                migration.apply(self.root)
                steps.append({"name": migration.name, "applied_at": _utc_now_iso()})
                self._write_metadata(steps)
                logger.info("applied store migration %s to %s", migration.name, self.root)

    def _write_metadata(self, steps: list[dict]) -> None:
        metadata = {"format": "kd-store", "schema_version": SCHEMA_VERSION, "migrations": steps}
        if self.logprob_encoding != DEFAULT_LOGPROB_ENCODING:
            metadata[LOGPROB_ENCODING_SETTING] = self.logprob_encoding.name
        write_json_atomic(self.root / STORE_METADATA_FILE, metadata)

    def _encoding_setting(self, metadata: dict) -> LogprobEncoding:
        name = metadata.get(LOGPROB_ENCODING_SETTING, DEFAULT_LOGPROB_ENCODING.name)
        try:
            return logprob_encoding_named(name)
        except ValueError as exc:
            raise StoreError(
                f"{self.root / STORE_METADATA_FILE}: {LOGPROB_ENCODING_SETTING} {name!r} is"
                " invalid; set it to \"uint8\" or \"float32\", or remove it for the default"
            ) from exc

    def set_logprob_encoding(self, name: str) -> None:
        """Record in store.json how responses files written from now on store logprobs.

        ``name`` is ``uint8`` (the default: 1/8-nat steps, a mean KL divergence of the
        top-k distributions of 3 to 4e-4 nats per token in ``benchmarks/bench_store.py``)
        or ``float32`` (lossless).
        Files already written keep their encoding, and readers decode each file by
        its own metadata. Holds the writer lock; raises ``ValueError`` for another name.
        """
        encoding = logprob_encoding_named(name)
        with self.lock():
            metadata = read_store_metadata(self.root)
            self.logprob_encoding = encoding
            self._write_metadata(list(metadata.get("migrations", [])))
        logger.info("store %s now writes logprobs as %s", self.root, name)

    # -- lock

    @property
    def locked(self) -> bool:
        """Whether this Store object holds the writer lock."""
        return self._lock_fd is not None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the exclusive writer lock, or raise :class:`StoreLockedError` at once.

        Non-blocking by design: a second harvest on the same store stops at once
        instead of waiting. Re-entrant within one Store object, so nested ``lock()``
        calls are free. Another Store object, even in the same process, is a separate
        holder and gets :class:`StoreLockedError`.
        """
        if self._lock_fd is not None:
            yield
            return

        self._lock_fd = self._acquire_lock()
        try:
            yield
        finally:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def _acquire_lock(self) -> int:
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock_holder(fd)
            os.close(fd)
            raise StoreLockedError(
                f"store {self.root} is locked by another writer ({holder}): only one"
                " harvest or compaction may write to a store at a time. Wait for it to"
                " finish or stop it. The lock is released as soon as that process exits,"
                " even if it is killed"
            ) from None
        except BaseException:
            os.close(fd)
            raise

        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _utc_now_iso()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return fd

    # -- reading

    def stored_request_ids(self) -> DigestSet:
        """Return the request_ids in the readable responses files, as a compact set.

        Reads only the request_id column. Rows still in a journal are not included:
        call :meth:`recover` first. Raises :class:`DamagedFileError` for a file whose
        footer is valid but whose request_id pages are not.
        """
        ids = DigestSet()
        for store_file in list_table_files(self.root, "responses").files:
            column = read_columns(store_file.path, ["request_id"]).column(0)
            ids.update(value for value in column.to_pylist() if value is not None)
        return ids

    # -- writing

    def writer(
        self, run_id: str, *, batch_rows: int = 256, batch_seconds: float = 5.0
    ) -> StoreWriter:
        """Open a writer for ``run_id``; it holds the store lock until it is closed."""
        validate_run_id(run_id)
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
        if batch_seconds <= 0:
            raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
        if run_id in self._open_writers:
            raise StoreError(f"a writer for run {run_id!r} is already open on {self.root}")

        lock_stack = contextlib.ExitStack()
        lock_stack.enter_context(self.lock())
        self._open_writers.add(run_id)
        return StoreWriter(
            self, run_id, batch_rows=batch_rows, batch_seconds=batch_seconds, lock_stack=lock_stack
        )

    def _writer_closed(self, run_id: str) -> None:
        self._open_writers.discard(run_id)

    def write_run(self, run_row: dict[str, Any]) -> None:
        """Write ``runs/<run_id>.parquet``, replacing the run's previous row atomically."""
        run_id = validate_run_id(run_row.get("run_id"))
        table = build_table("runs", [run_row])
        validate_table(table, "runs")
        write_parquet_atomic(table, self.root / "runs" / f"{run_id}.parquet")

    # -- recovery

    def recover(self) -> RecoveryReport:
        """Commit journal segments left by a dead writer and remove leftover files.

        Holds the lock. A segment whose Parquet file exists was committed before the
        writer died, so its journal is only deleted. Other segments are written to
        Parquet without the request_ids already stored, and a segment with invalid rows
        is moved to ``quarantine/journal/``. Partial files and files superseded by a
        compaction are removed. Safe to run again at any point, including after a
        crash during recovery.
        """
        if self._open_writers:
            raise StoreError(
                f"cannot recover {self.root} while this process has open writers"
                f" ({', '.join(sorted(self._open_writers))}): close them first"
            )
        report = RecoveryReport()
        with self.lock():
            self._remove_leftovers(report)
            self._replay_journals(report)
            self._mark_dead_runs(report)
        if report.changed:
            logger.info("store %s: %s", self.root, report.summary())
        return report

    def _remove_leftovers(self, report: RecoveryReport) -> None:
        for table in TABLES:
            listing = list_table_files(self.root, table)
            for path in listing.partial:
                path.unlink(missing_ok=True)
                report.partial_files_removed += 1
            for store_file in listing.superseded:
                store_file.path.unlink(missing_ok=True)
                report.superseded_files_removed += 1
            if listing.partial or listing.superseded:
                fsync_directory(self.root / table)
        for path in self.root.iterdir():
            if is_partial_name(path.name) and path.is_file():
                path.unlink()
                report.partial_files_removed += 1

    def _mark_dead_runs(self, report: RecoveryReport) -> None:
        # A run row is still "running" only if its process died before writing the final
        # status. This method holds the lock, so no live harvest can own such a row.
        for path in sorted((self.root / "runs").glob("*.parquet")):
            try:
                # The status column alone first: converting whole rows to Python (their
                # timestamps) imports pandas when it is installed, 0.2 s per process.
                run_file = pq.ParquetFile(path)
                statuses = run_file.read(columns=["status"]).column("status").to_pylist()
                if statuses != ["running"]:
                    continue
                rows = run_file.read().to_pylist()
            except (OSError, pa.ArrowException) as error:
                logger.warning("cannot read run record %s: %s", path, error)
                continue
            row = rows[0]
            row["status"] = "crashed"
            self.write_run(row)
            report.runs_marked_crashed += 1
            logger.warning("run %s ended without a final status; marked as crashed", row["run_id"])

    def _replay_journals(self, report: RecoveryReport) -> None:
        journal_dir = self.root / JOURNAL_DIR
        journals = list_journals(journal_dir)
        if not journals:
            return
        report.journals_found = len(journals)
        stored_ids: DigestSet | None = None

        for journal in journals:
            if journal.table not in ("responses", "failures"):
                logger.warning("ignoring journal segment of unknown table: %s", journal.path)
                continue
            final = self.root / journal.table / part_file_name(journal.segment)
            if final.exists():
                report.journals_already_committed += 1
                journal.path.unlink()
                continue

            table = self._read_replayable(journal, report)
            if table is not None and journal.table == "responses":
                if stored_ids is None:
                    stored_ids = self.stored_request_ids()
                table, skipped = _drop_stored_ids(table, stored_ids)
                report.duplicates_skipped += skipped
            if table is not None and table.num_rows:
                write_parquet_atomic(table, final, logprob_encoding=self.logprob_encoding)
                if journal.table == "responses":
                    report.responses_recovered += table.num_rows
                else:
                    report.failures_recovered += table.num_rows
            if journal.path.exists():
                report.journals_replayed += 1
                journal.path.unlink()
        fsync_directory(journal_dir)

    def _read_replayable(self, journal: JournalFile, report: RecoveryReport) -> pa.Table | None:
        """Read a journal's complete rows; quarantine the segment if they are invalid."""
        try:
            contents = read_journal(journal.path)
        except ValueError as exc:
            quarantine_file(self.root, journal.path, JOURNAL_DIR, f"invalid journal rows: {exc}")
            report.journals_quarantined += 1
            return None
        if contents.torn_tail:
            report.torn_tails += 1
            logger.info(
                "journal %s ends in a torn row, which was ignored: %s", journal.path, contents.error
            )
        table = contents.table
        if table is None:
            return None
        try:
            if table.schema.equals(TABLE_SCHEMAS[journal.table], check_metadata=False):
                validate_table(table, journal.table)
            else:
                # A segment written by an older schema version is replayed as it is;
                # readers reconcile its schema like any older file.
                table.validate(full=True)
        except (ValueError, pa.ArrowException) as exc:
            quarantine_file(self.root, journal.path, JOURNAL_DIR, f"invalid journal rows: {exc}")
            report.journals_quarantined += 1
            return None
        return table


def _drop_stored_ids(table: pa.Table, stored_ids: DigestSet) -> tuple[pa.Table, int]:
    """Drop rows whose request_id is stored or repeats an earlier row; update ``stored_ids``."""
    keep = []
    for request_id in table.column("request_id").to_pylist():
        fresh = request_id is not None and request_id not in stored_ids
        keep.append(fresh)
        if fresh:
            stored_ids.add(request_id)
    kept = table.filter(pa.array(keep, type=pa.bool_()))
    return kept, table.num_rows - kept.num_rows


def _read_lock_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, json.JSONDecodeError):
        return "holder unknown"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


def _utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- Writer ---------------------------------------------------------------------------


class StoreWriter:
    """Batched, journaled writer of one run's response and failure rows.

    Each row is journaled before ``add_*`` returns, so it survives ``kill -9`` of this
    process. Rows are committed to Parquet, one file per table per batch, on
    :meth:`close` and when ``batch_rows`` rows (responses and failures together) are
    pending or the oldest pending row is ``batch_seconds`` old. Both limits are checked
    only when a row is added, so call :meth:`flush` when rows stop arriving. Not
    thread-safe: use it from one thread or event loop.
    """

    def __init__(
        self,
        store: Store,
        run_id: str,
        *,
        batch_rows: int,
        batch_seconds: float,
        lock_stack: contextlib.ExitStack,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.run_id = run_id
        self.batch_rows = batch_rows
        self.batch_seconds = batch_seconds
        self.responses_written = 0
        """Rows accepted by :meth:`add_response`: journaled or committed to Parquet."""
        self.failures_written = 0
        """Rows accepted by :meth:`add_failure`: journaled or committed to Parquet."""

        self._lock_stack = lock_stack
        self._clock = clock
        # A random 32-bit token keeps segment names unique across writers of the same
        # run_id, so a resumed run does not reuse the name of a file a compaction
        # replaced (a file named in kd.replaces is hidden from readers).
        self._token = secrets.token_hex(4)
        self._sequence = {"responses": 0, "failures": 0}
        self._journals: dict[str, JournalSegment] = {}
        # Pending rows as Arrow tables. Response rows wait as checked dicts in
        # _unbuilt until RESPONSE_BUILD_ROWS of them are built into one table.
        self._pending: dict[str, list[pa.Table]] = {"responses": [], "failures": []}
        self._unbuilt: list[dict[str, Any]] = []
        self._pending_since: float | None = None
        self._request_ids = DigestSet()
        self._duplicates_logged = False
        self._closed = False

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pending_rows(self) -> int:
        return len(self._unbuilt) + sum(table.num_rows for tables in self._pending.values() for table in tables)

    def add_response(self, row: dict[str, Any]) -> None:
        """Journal one response row; durable against a process kill once this returns.

        Raises ``ValueError`` for a row without a request_id or one that does not fit
        the schema; nothing is journaled then. A request_id this writer already added
        is skipped with a warning, because the row is already stored.
        """
        request_id = row.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"response row needs a non-empty string request_id, got {request_id!r}")
        if request_id in self._request_ids:
            self._log_duplicate(request_id)
            return
        checked = checked_row("responses", row)
        self._append("responses", checked)
        self._request_ids.add(request_id)
        self.responses_written += 1
        self._flush_if_due()

    def add_failure(self, row: dict[str, Any]) -> None:
        """Journal one failure row; durable against a process kill once this returns."""
        table = build_table("failures", [row])
        validate_table(table, "failures")
        self._append("failures", table)
        self.failures_written += 1
        self._flush_if_due()

    def flush(self) -> None:
        """Commit pending rows: one Parquet file per table, then drop their journals."""
        self._check_open()
        if self._unbuilt:
            self._build_unbuilt()
        for table_name, tables in self._pending.items():
            if tables:
                self._commit(table_name, tables)
        self._pending_since = None

    def close(self) -> None:
        """Flush and release the store lock; safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for journal in self._journals.values():
                journal.close()
            self.store._writer_closed(self.run_id)
            self._lock_stack.close()

    def _append(self, table_name: str, row: pa.Table | dict[str, Any]) -> None:
        """Journal one row (a checked row dict for responses, a one-row table for failures)."""
        self._check_open()
        journal = self._journals.get(table_name)
        if journal is None:
            journal = self._journals[table_name] = self._open_journal(table_name, row)
        journal.append(row)
        if isinstance(row, dict):
            self._unbuilt.append(row)
            if len(self._unbuilt) >= RESPONSE_BUILD_ROWS:
                self._build_unbuilt()
        else:
            self._pending[table_name].append(row)
        if self._pending_since is None:
            self._pending_since = self._clock()

    def _open_journal(self, table_name: str, row: pa.Table | dict[str, Any]) -> JournalSegment:
        segment = self._segment(table_name)
        journal_dir = self.store.root / JOURNAL_DIR
        if isinstance(row, dict):
            path = journal_path(journal_dir, segment, table_name, suffix=ROW_JOURNAL_SUFFIX)
            return RowJournalSegment(path, table_name)
        return JournalSegment(journal_path(journal_dir, segment, table_name), row.schema)

    def _flush_if_due(self) -> None:
        if self.pending_rows >= self.batch_rows:
            self.flush()
        elif self._pending_since is not None and self._clock() - self._pending_since >= self.batch_seconds:
            self.flush()

    def _build_unbuilt(self) -> None:
        table = build_responses_table(self._unbuilt)
        validate_table(table, "responses")
        self._pending["responses"].append(table)
        self._unbuilt = []

    def _commit(self, table_name: str, tables: list[pa.Table]) -> None:
        segment = self._segment(table_name)
        table = pa.concat_tables(tables)
        path = self.store.root / table_name / part_file_name(segment)
        write_parquet_atomic(table, path, logprob_encoding=self.store.logprob_encoding)

        # The Parquet file is durable and in place; only now may the journal go.
        journal = self._journals.pop(table_name)
        journal.remove()
        self._pending[table_name] = []
        self._sequence[table_name] += 1
        logger.debug("committed %d %s rows as segment %s", table.num_rows, table_name, segment)

    def _segment(self, table_name: str) -> str:
        return segment_id(self.run_id, self._token, self._sequence[table_name])

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer for run {self.run_id!r} is closed")

    def _log_duplicate(self, request_id: str) -> None:
        if not self._duplicates_logged:
            self._duplicates_logged = True
            logger.warning(
                "run %s added request_id %s twice; the repeat was skipped"
                " (later repeats are skipped without a warning)",
                self.run_id,
                request_id,
            )
