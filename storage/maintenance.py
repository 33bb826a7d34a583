"""Store maintenance: checking files and compacting small ones.

:func:`check_store` inspects every file the way readers do (size, ``PAR1`` magic,
footer, schema compatible with the current one, row count) and optionally reads every
page. Damaged files are moved to ``quarantine/`` with a line in
``quarantine/report.jsonl``; nothing is deleted.

:func:`compact_store` merges small files of a table into files of up to
``target_rows`` rows and removes duplicate responses. It is crash-safe because each
merged file names its sources in its ``kd.replaces`` metadata: once the merged file is
renamed into place, readers hide the sources, and recovery deletes them if the
process died before it could.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import DamagedFileError, StoreLockedError
from storage.catalog import (
    REPLACES_KEY,
    STORE_METADATA_FILE,
    TABLES,
    SkippedEntry,
    StoreFile,
    TableListing,
    list_table_files,
    read_store_metadata,
    table_select_sql,
)
from storage.journal import list_journals
from storage.schema import SCHEMA_VERSION, TABLE_SCHEMAS, validate_table, with_table_metadata
from storage.store import (
    JOURNAL_DIR,
    MIGRATIONS,
    RecoveryReport,
    Store,
    fsync_directory,
    fsync_file,
    parquet_write_options,
    partial_path,
    quarantine_file,
    read_columns,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

# Tables that compaction merges. runs/ keeps one file per run because write_run
# replaces that file whenever the run's status changes.
COMPACTED_TABLES = ("responses", "failures")
READ_BATCH_ROWS = 4096


# --- Check ----------------------------------------------------------------------------


@dataclass
class FileProblem:
    """A damaged file and where it was moved, if it was."""

    path: str
    table: str
    reason: str
    quarantined_to: str | None = None


@dataclass
class CheckReport:
    """Findings of :func:`check_store` and the fixes it applied."""

    root: str
    files_checked: int = 0
    rows_checked: int = 0
    damaged: list[FileProblem] = field(default_factory=list)
    journals_pending: list[str] = field(default_factory=list)
    partial_files: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)
    superseded_files: list[str] = field(default_factory=list)
    duplicate_request_ids: int = 0
    writer_active: str | None = None
    recovery: RecoveryReport | None = None
    # Set when store.json was unreadable: the reason and where the old file went.
    metadata_problem: str | None = None
    metadata_backup: str | None = None

    @property
    def quarantined(self) -> list[str]:
        return [p.quarantined_to for p in self.damaged if p.quarantined_to]

    @property
    def damage_found(self) -> bool:
        return bool(self.damaged or self.duplicate_request_ids or self.metadata_problem)


def check_store(root: str | Path, *, fix: bool = True, deep: bool = False) -> CheckReport:
    """Validate every file of the store at ``root`` and report what is wrong.

    With ``fix``, damaged files are moved to ``quarantine/`` and, when no writer holds
    the lock, :meth:`Store.recover` runs: it commits pending journals and removes
    partial and superseded files. With ``deep``, every data page is read as well as
    the footer (slower, finds corrupt pages).
    """
    root = Path(root).resolve()
    report = CheckReport(root=str(root))
    if fix:
        _repair_store_metadata(root, report)
    read_store_metadata(root)
    store = Store(root, create=False)

    lock_stack = contextlib.ExitStack()
    if fix:
        try:
            lock_stack.enter_context(store.lock())
        except StoreLockedError as exc:
            report.writer_active = str(exc)

    with lock_stack:
        listings = {table: list_table_files(root, table) for table in TABLES}
        for listing in listings.values():
            _check_listing(listing, report, deep=deep)
        report.duplicate_request_ids = _count_duplicate_ids(listings["responses"], report)
        report.journals_pending = [str(j.path) for j in list_journals(root / JOURNAL_DIR)]

        if fix:
            for problem in report.damaged:
                moved = quarantine_file(root, Path(problem.path), problem.table, problem.reason)
                problem.quarantined_to = str(moved)
            if store.locked:
                report.recovery = store.recover()
    return report


def _repair_store_metadata(root: Path, report: CheckReport) -> None:
    """Rewrite an unreadable store.json from the layout present, keeping a backup.

    Only a folder with the store's table folders is repaired, so ``check`` never turns
    an unrelated folder into a store. The new file records this code's schema version
    and every known migration, after applying them (they are idempotent).
    NOTE: this runs without the writer lock, because :class:`Store` cannot open a
    store whose store.json is unreadable; the rewrite itself is atomic.
    """
    path = root / STORE_METADATA_FILE
    if not path.is_file() or not all((root / table).is_dir() for table in TABLES):
        return
    try:
        metadata = json.loads(path.read_text())
        if isinstance(metadata, dict):
            return
        problem = f"holds a JSON {type(metadata).__name__}, not an object"
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problem = str(exc)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    backup = root / f"{STORE_METADATA_FILE}.corrupt-{stamp}"
    os.replace(path, backup)
    fsync_directory(root)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for migration in MIGRATIONS:
        migration.apply(root)
    write_json_atomic(
        path,
        {
            "format": "kd-store",
            "schema_version": SCHEMA_VERSION,
            "migrations": [{"name": m.name, "applied_at": now} for m in MIGRATIONS],
        },
    )
    report.metadata_problem = problem
    report.metadata_backup = str(backup)
    logger.warning("rewrote unreadable %s (%s); old file kept as %s", path, problem, backup)


def _check_listing(listing: TableListing, report: CheckReport, *, deep: bool) -> None:
    table = listing.table
    readable = [*listing.files, *listing.superseded]
    report.files_checked += len(readable) + len(listing.damaged)
    for entry in listing.damaged:
        report.damaged.append(FileProblem(str(entry.path), table, entry.reason))
    for store_file in readable:
        if deep:
            problem = _read_all_pages(store_file)
            if problem is not None:
                report.damaged.append(FileProblem(str(store_file.path), table, problem))
                continue
        report.rows_checked += store_file.num_rows
    report.partial_files += [str(p) for p in listing.partial]
    report.stray_files += [str(e.path) for e in listing.stray]
    report.superseded_files += [str(f.path) for f in listing.superseded]


def find_damaged_files(root: str | Path, table: str) -> list[Path]:
    """Return the files of ``table`` whose data pages cannot be read; changes nothing.

    Reads every page of every listed file, like ``check_store(deep=True)``, so it is as
    slow as reading the table once. Meant for naming the culprit after a query failed.
    """
    listing = list_table_files(Path(root).resolve(), table)
    return [f.path for f in listing.files if _read_all_pages(f) is not None]


def _read_all_pages(store_file: StoreFile) -> str | None:
    try:
        parquet_file = pq.ParquetFile(store_file.path)
        rows = sum(batch.num_rows for batch in parquet_file.iter_batches(batch_size=READ_BATCH_ROWS))
    except (pa.ArrowException, OSError, ValueError) as exc:
        return f"data pages unreadable: {exc}"
    if rows != store_file.num_rows:
        return f"footer says {store_file.num_rows} rows but the pages hold {rows}"
    return None


def _count_duplicate_ids(listing: TableListing, report: CheckReport) -> int:
    """Count request_ids stored more than once, reading only that column.

    A file whose request_id column cannot be read is reported as damaged.
    """
    damaged = {problem.path for problem in report.damaged}
    seen: set[str] = set()
    repeated: set[str] = set()
    for store_file in listing.files:
        if str(store_file.path) in damaged:
            continue
        try:
            column = read_columns(store_file.path, ["request_id"]).column(0)
        except DamagedFileError as exc:
            reason = str(exc).removeprefix(f"{store_file.path}: ")
            report.damaged.append(FileProblem(str(store_file.path), "responses", reason))
            continue
        for request_id in column.to_pylist():
            if request_id in seen:
                repeated.add(request_id)
            seen.add(request_id)
    return len(repeated)


# --- Compact --------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactConfig:
    """Sizes that decide which files are merged and how large the results are."""

    target_rows: int = 50_000
    """Maximum rows per merged file, unless one source file alone is larger."""
    small_file_rows: int = 10_000
    """Files with fewer rows than this are merged."""

    def __post_init__(self) -> None:
        if self.target_rows < 1 or self.small_file_rows < 1:
            raise ValueError(
                f"target_rows and small_file_rows must be positive, got {self.target_rows}"
                f" and {self.small_file_rows}"
            )


@dataclass
class TableCompaction:
    """Before and after counts of one table."""

    table: str
    files_before: int = 0
    rows_before: int = 0
    files_after: int = 0
    rows_after: int = 0
    files_written: int = 0
    duplicates_removed: int = 0
    damaged_skipped: list[SkippedEntry] = field(default_factory=list)


@dataclass
class CompactReport:
    """Outcome of :func:`compact_store`, per table, and of the recovery it ran first."""

    tables: list[TableCompaction]
    recovery: RecoveryReport


def compact_store(root: str | Path, config: CompactConfig | None = None) -> CompactReport:
    """Merge small files and drop duplicate responses, holding the writer lock.

    Runs :meth:`Store.recover` first, so no journal refers to a file about to be
    merged. A response whose request_id occurs more than once keeps its earliest row
    (by created_at, then file name, then position in the file). Damaged files are left
    where they are and reported; run :func:`check_store` to set them aside.
    """
    config = config or CompactConfig()
    store = Store(root, create=False)
    with store.lock():
        recovery = store.recover()
        tables = [_compact_table(store.root, table, config) for table in COMPACTED_TABLES]
    return CompactReport(tables=tables, recovery=recovery)


def _compact_table(root: Path, table: str, config: CompactConfig) -> TableCompaction:
    listing = list_table_files(root, table)
    result = TableCompaction(
        table=table,
        files_before=len(listing.files),
        rows_before=listing.num_rows,
        damaged_skipped=listing.damaged,
    )
    files = sorted(listing.files, key=lambda f: f.path.name)
    losers = _duplicate_rows(files) if table == "responses" else {}
    result.duplicates_removed = sum(len(rows) for rows in losers.values())

    candidates = [f for f in files if f.num_rows < config.small_file_rows or f.path in losers]
    for group in _group_files(candidates, config.target_rows):
        if len(group) == 1 and group[0].path not in losers:
            continue
        _merge_group(root, table, group, losers)
        result.files_written += 1

    after = list_table_files(root, table)
    result.files_after = len(after.files)
    result.rows_after = after.num_rows
    logger.info(
        "compacted %s: %d files, %d rows -> %d files, %d rows",
        table, result.files_before, result.rows_before, result.files_after, result.rows_after,
    )
    return result


def _group_files(files: list[StoreFile], target_rows: int) -> list[list[StoreFile]]:
    """Split ``files`` into consecutive groups of at most ``target_rows`` rows each."""
    groups: list[list[StoreFile]] = []
    current: list[StoreFile] = []
    rows = 0
    for store_file in files:
        if current and rows + store_file.num_rows > target_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(store_file)
        rows += store_file.num_rows
    if current:
        groups.append(current)
    return groups


def _duplicate_rows(files: list[StoreFile]) -> dict[Path, set[int]]:
    """Return, per file, the row positions of responses that repeat an earlier request_id."""
    parts = []
    for file_index, store_file in enumerate(files):
        columns = ["request_id"] + (["created_at"] if "created_at" in store_file.schema.names else [])
        keys = read_columns(store_file.path, columns)
        created = (
            keys.column("created_at").cast(pa.timestamp("us", tz="UTC"))
            if "created_at" in keys.column_names
            else pa.nulls(keys.num_rows, pa.timestamp("us", tz="UTC"))
        )
        parts.append(
            pa.table(
                {
                    "request_id": keys.column("request_id").cast(pa.string()),
                    "created_at": created,
                    "file_index": pa.array([file_index] * keys.num_rows, pa.int32()),
                    "row": pa.array(range(keys.num_rows), pa.int64()),
                }
            )
        )
    if not parts:
        return {}

    keys = pa.concat_tables(parts)
    counts = keys.group_by("request_id").aggregate([("request_id", "count")])
    repeated = counts.filter(pc.greater(counts.column("request_id_count"), 1)).column("request_id")
    if len(repeated) == 0:
        return {}

    candidates = keys.filter(pc.is_in(keys.column("request_id"), value_set=repeated))
    # Nulls sort last by default, so a row without created_at never wins over a dated one.
    sort_keys = ["request_id", "created_at", "file_index", "row"]
    ordered = candidates.sort_by([(name, "ascending") for name in sort_keys])
    losers: dict[Path, set[int]] = {}
    previous = None
    for request_id, file_index, row in zip(
        ordered.column("request_id").to_pylist(),
        ordered.column("file_index").to_pylist(),
        ordered.column("row").to_pylist(),
    ):
        if request_id == previous:
            losers.setdefault(files[file_index].path, set()).add(row)
        previous = request_id
    return losers


def _merge_group(root: Path, table: str, group: list[StoreFile], losers: dict[Path, set[int]]) -> Path:
    """Write the rows of ``group`` (without ``losers``) to one file, then remove the sources."""
    schema = TABLE_SCHEMAS[table]
    replaces = sorted({name for f in group for name in (f.path.name, *f.replaces)})
    metadata = dict(with_table_metadata(schema.empty_table(), table).schema.metadata)
    metadata[REPLACES_KEY] = json.dumps(replaces).encode()
    schema = schema.with_metadata(metadata)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = root / table / f"part-compact-{stamp}-{secrets.token_hex(4)}.parquet"
    partial = partial_path(target)
    try:
        options = parquet_write_options(schema.remove_metadata())
        with pq.ParquetWriter(partial, schema, **options) as writer:
            for store_file in group:
                for batch_table in _read_checked(store_file, losers.get(store_file.path, set())):
                    writer.write_table(batch_table.replace_schema_metadata(metadata))
        fsync_file(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)

    # From here readers see the merged file and hide the sources named in kd.replaces.
    for store_file in group:
        store_file.path.unlink(missing_ok=True)
    fsync_directory(target.parent)
    logger.debug("merged %d %s files into %s", len(group), table, target.name)
    return target


def _read_checked(store_file: StoreFile, drop_rows: set[int]) -> Iterator[pa.Table]:
    """Yield validated tables from :func:`_read_current_schema`, naming the file on failure."""
    tables = _read_current_schema(store_file, drop_rows)
    while True:
        try:
            table = next(tables)
            validate_table(table, store_file.table)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError, duckdb.Error) as exc:
            raise DamagedFileError(
                f"unreadable while compacting: {exc}; run `pipeline check --deep` to set it aside",
                path=str(store_file.path),
            ) from exc
        yield table


def _read_current_schema(store_file: StoreFile, drop_rows: set[int]) -> Iterator[pa.Table]:
    """Yield the rows of a file in the current schema, in order, without ``drop_rows``."""
    schema = TABLE_SCHEMAS[store_file.table]
    if store_file.schema.equals(schema, check_metadata=False):
        batches = pq.ParquetFile(store_file.path).iter_batches(batch_size=READ_BATCH_ROWS)
        yield from _without_rows(batches, drop_rows, schema)
        return

    # Older or foreign schema: reconcile in DuckDB exactly as the views do.
    connection = duckdb.connect(":memory:")
    try:
        connection.execute("SET TimeZone = 'UTC'")
        select_sql = table_select_sql(store_file.table, [store_file])
        reader = connection.sql(select_sql).to_arrow_reader(READ_BATCH_ROWS)
        yield from _without_rows(reader, drop_rows, schema)
    finally:
        connection.close()


def _without_rows(batches, drop_rows: set[int], schema: pa.Schema) -> Iterator[pa.Table]:
    offset = 0
    for batch in batches:
        table = pa.Table.from_batches([batch]).cast(schema)
        if drop_rows:
            keep = [offset + i not in drop_rows for i in range(table.num_rows)]
            table = table.filter(pa.array(keep, type=pa.bool_()))
        offset += batch.num_rows
        if table.num_rows:
            yield table
