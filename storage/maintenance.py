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

:func:`compact_tiered` is the incremental compaction that ``pipeline harvest`` runs
after each run. It sorts the files that are not yet full size into size tiers, a
factor ``fanout`` apart, and merges only when a tier has ``fanout`` files, as a
size-tiered LSM tree does. Each merge moves rows at least one tier up, so every row is
rewritten once per tier (a handful of times in all) and the work of one run stays
proportional to the rows it added, while the number of files stays bounded. It reuses
the merge of :func:`compact_store`, with the same crash safety.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
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
    inspect_file,
    STORE_METADATA_FILE,
    TABLES,
    SkippedEntry,
    StoreFile,
    TableListing,
    list_table_files,
    read_store_metadata,
    table_select_sql,
)
from storage.encoding import (
    DEFAULT_LOGPROB_ENCODING,
    FLOAT32_ENCODING,
    LogprobEncoding,
    encode_responses_table,
    stored_responses_schema,
)
from storage.journal import list_journals
from storage.schema import SCHEMA_VERSION, TABLE_SCHEMAS, validate_table, with_table_metadata
from storage.store import (
    JOURNAL_DIR,
    LOGPROB_ENCODING_SETTING,
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

# Tables that compaction merges. A runs file is merged only once its run has a final
# status: write_run replaces a run's own file while the run is going on.
COMPACTED_TABLES = ("responses", "failures", "runs")
READ_BATCH_ROWS = 4096
# A merged file gets a new row group when this many rows or bytes (Arrow, in memory) are
# buffered. One row group per source batch would leave the row groups of 256-row harvest
# batches in place, and every row group costs DuckDB a scan step. The byte limit bounds
# the memory of a merge: a 64-token top-20 response takes roughly 25 KB in Arrow (estimate).
MERGE_ROW_GROUP_ROWS = 65_536
MERGE_ROW_GROUP_BYTES = 16 * 2**20


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
    metadata = {
        "format": "kd-store",
        "schema_version": SCHEMA_VERSION,
        "migrations": [{"name": m.name, "applied_at": now} for m in MIGRATIONS],
    }
    # The lost file may have set a lossless encoding, so the newest responses file decides.
    encoding = _newest_logprob_encoding(root)
    if encoding is not None and encoding != DEFAULT_LOGPROB_ENCODING:
        metadata[LOGPROB_ENCODING_SETTING] = encoding.name
    write_json_atomic(path, metadata)
    report.metadata_problem = problem
    report.metadata_backup = str(backup)
    logger.warning("rewrote unreadable %s (%s); old file kept as %s", path, problem, backup)


def _newest_logprob_encoding(root: Path) -> LogprobEncoding | None:
    """Return the logprob encoding of the most recently written responses file, if any."""
    files = list_table_files(root, "responses").files
    if not files:
        return None
    return max(files, key=lambda f: f.path.stat().st_mtime).logprob_encoding


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
    files_merged: int = 0
    """Source files rewritten into the files_written merged files."""
    rows_merged: int = 0
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
    return _compact_tables(Store(root, create=False), lambda root, table: _compact_table(root, table, config))


def _compact_tables(store: Store, compact_table: Callable[[Path, str], TableCompaction]) -> CompactReport:
    """Recover the store, then compact each table, all under the writer lock."""
    with store.lock():
        recovery = store.recover()
        tables = [compact_table(store.root, table) for table in COMPACTED_TABLES]
    return CompactReport(tables=tables, recovery=recovery)


def _start_compaction(root: Path, table: str) -> tuple[TableCompaction, list[StoreFile]]:
    """Return the report of a table's compaction, filled with its state before, and the files it may merge.

    Runs files with a run still marked running are left out: under the writer lock
    after recovery there is none, unless the caller holding the lock is that run.
    """
    listing = list_table_files(root, table)
    result = TableCompaction(
        table=table,
        files_before=len(listing.files),
        rows_before=listing.num_rows,
        damaged_skipped=listing.damaged,
    )
    files = listing.files
    if table == "runs":
        files = [store_file for store_file in files if not _has_running_run(store_file)]
    return result, sorted(files, key=lambda f: f.path.name)


def _has_running_run(store_file: StoreFile) -> bool:
    statuses = read_columns(store_file.path, ["status"]).column("status").to_pylist()
    return "running" in statuses


def _compact_table(root: Path, table: str, config: CompactConfig) -> TableCompaction:
    result, files = _start_compaction(root, table)
    losers = _duplicate_rows(files) if table == "responses" else {}
    result.duplicates_removed = sum(len(rows) for rows in losers.values())

    candidates = [f for f in files if f.num_rows < config.small_file_rows or f.path in losers]
    for group in _group_files(candidates, config.target_rows):
        if len(group) == 1 and group[0].path not in losers:
            continue
        _merge_group(root, table, group, losers)
        result.files_written += 1
        result.files_merged += len(group)
        result.rows_merged += sum(f.num_rows for f in group)

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
    encoding = _merged_encoding(table, group)
    schema = TABLE_SCHEMAS[table] if encoding is None else stored_responses_schema(encoding)
    metadata = dict(schema.metadata or with_table_metadata(schema.empty_table(), table).schema.metadata)
    metadata[REPLACES_KEY] = json.dumps(_replaced_names(root / table, group)).encode()
    schema = schema.with_metadata(metadata)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = root / table / f"part-compact-{stamp}-{secrets.token_hex(4)}.parquet"
    partial = partial_path(target)
    try:
        options = parquet_write_options(schema.remove_metadata())
        with pq.ParquetWriter(partial, schema, **options) as writer:
            for row_group in _row_groups(group, losers, encoding):
                writer.write_table(row_group.replace_schema_metadata(metadata))
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


def _merged_encoding(table: str, group: list[StoreFile]) -> LogprobEncoding | None:
    """Return the logprob encoding of a merged responses file; ``None`` for other tables.

    Sources that share an encoding keep it, so their stored columns are copied as they
    are. Mixed sources, or files written before schema version 2, get ``float32``:
    quantising them would change logprobs that were stored exactly.
    """
    if table != "responses":
        return None
    encodings = {store_file.logprob_encoding for store_file in group}
    if len(encodings) == 1 and None not in encodings:
        return encodings.pop()
    return FLOAT32_ENCODING


def _replaced_names(directory: Path, group: list[StoreFile]) -> list[str]:
    """Return the names a merged file hides: the group's files and their replaced files.

    A name a source replaced is kept only while that file still exists (a crash left it
    behind), because segment names are never reused. Without this a file merged again
    and again would carry the name of every file it ever absorbed in its footer.
    """
    names = {store_file.path.name for store_file in group}
    for store_file in group:
        names.update(name for name in store_file.replaces if (directory / name).exists())
    return sorted(names)


def _row_groups(
    group: list[StoreFile], losers: dict[Path, set[int]], encoding: LogprobEncoding | None
) -> Iterator[pa.Table]:
    """Yield the checked rows of ``group`` in order, in tables of about one row group each."""
    buffered: list[pa.Table] = []
    rows = 0
    size = 0
    for store_file in group:
        for table in _read_checked(store_file, losers.get(store_file.path, set()), encoding):
            buffered.append(table)
            rows += table.num_rows
            size += table.nbytes
            if rows >= MERGE_ROW_GROUP_ROWS or size >= MERGE_ROW_GROUP_BYTES:
                yield pa.concat_tables(buffered)
                buffered, rows, size = [], 0, 0
    if buffered:
        yield pa.concat_tables(buffered)


def _read_checked(
    store_file: StoreFile, drop_rows: set[int], encoding: LogprobEncoding | None = None
) -> Iterator[pa.Table]:
    """Yield the rows of a file as validated tables, naming the file on failure.

    With ``encoding`` (responses only) the tables are in its stored form. A file
    already stored that way is copied without decoding; others are read in the current
    schema and encoded.
    """
    stored_as_is = encoding is not None and _is_stored_in(store_file, encoding)
    if stored_as_is:
        schema = stored_responses_schema(encoding).remove_metadata()
        batches = pq.ParquetFile(store_file.path).iter_batches(batch_size=READ_BATCH_ROWS)
        tables = _without_rows(batches, drop_rows, schema)
    else:
        tables = _read_current_schema(store_file, drop_rows)
    while True:
        try:
            table = next(tables)
            if stored_as_is:
                table.validate(full=True)
            else:
                validate_table(table, store_file.table)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError, duckdb.Error) as exc:
            raise DamagedFileError(
                f"unreadable while compacting: {exc}; run `pipeline check --deep` to set it aside",
                path=str(store_file.path),
            ) from exc
        if encoding is not None and not stored_as_is:
            table = encode_responses_table(table, encoding)
        yield table


def _is_stored_in(store_file: StoreFile, encoding: LogprobEncoding) -> bool:
    return store_file.logprob_encoding == encoding and store_file.schema.equals(
        stored_responses_schema(encoding), check_metadata=False
    )


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


# --- Tiered compaction after a harvest ------------------------------------------------


@dataclass(frozen=True)
class TieredCompactConfig:
    """Size tiers of the compaction that ``pipeline harvest --compact auto`` runs.

    A file with at least ``target_rows / 2`` rows is full size and never rewritten.
    A smaller file is in tier k >= 1 when it has at least
    ``target_rows / 2 / fanout**k`` rows, so tier 1 contains the largest small files. When a
    tier has ``fanout`` files, that tier and every tier below it are merged into files
    of at most ``target_rows`` rows.
    """

    target_rows: int = CompactConfig.target_rows
    """Maximum rows per merged file, as for ``pipeline compact``."""
    fanout: int = 10
    """Files per tier that start a merge, and the size factor between tiers."""

    def __post_init__(self) -> None:
        if self.target_rows < 2:
            raise ValueError(f"target_rows must be at least 2, got {self.target_rows}")
        if self.fanout < 2:
            raise ValueError(f"fanout must be at least 2, got {self.fanout}")

    @property
    def full_rows(self) -> int:
        """Rows from which a file counts as full size."""
        return self.target_rows // 2

    def tier(self, num_rows: int) -> int:
        """Return the tier of a file of ``num_rows`` rows; 0 for a full-size file."""
        tier = 0
        bound = self.full_rows
        # Empty files share the tier of one-row files instead of sinking forever.
        while num_rows < bound and bound >= 1:
            tier += 1
            bound /= self.fanout
        return tier


def plan_tiered_merge(files: list[StoreFile], config: TieredCompactConfig) -> list[StoreFile]:
    """Return the files the next tiered merge rewrites, or ``[]`` when no tier is full.

    Picks the largest-file tier that has ``config.fanout`` files and takes it together
    with every tier of smaller files, in name order, up to ``config.target_rows`` rows.
    Files of the smaller tiers add fewer rows than the full tier itself, so taking them
    along costs little. Repeated until it returns ``[]``, it leaves at most
    ``fanout - 1`` files in each tier.
    """
    tiers = [config.tier(store_file.num_rows) for store_file in files]
    counts: dict[int, int] = {}
    for tier in tiers:
        counts[tier] = counts.get(tier, 0) + 1
    full = [tier for tier, count in counts.items() if tier > 0 and count >= config.fanout]
    if not full:
        return []
    lowest = min(full)
    chosen = sorted(
        (store_file for store_file, tier in zip(files, tiers) if tier >= lowest), key=lambda f: f.path.name
    )
    # One pass writes at most one merged file, so its memory (the request ids checked
    # for duplicates, the row groups in flight) does not grow with the run's size. A run
    # of 1M responses left 3,900 small files, and merging them in one pass made a
    # harvest's peak RSS reach 598 MB.
    batch: list[StoreFile] = []
    rows = 0
    for store_file in chosen:
        if batch and rows + store_file.num_rows > config.target_rows:
            break
        batch.append(store_file)
        rows += store_file.num_rows
    return batch if len(batch) > 1 else chosen[:2]


def compact_tiered(store: Store | str | Path, config: TieredCompactConfig | None = None) -> CompactReport:
    """Merge full tiers of small files of responses and failures, holding the writer lock.

    ``store`` is a store root, or a :class:`Store` whose lock the caller may already
    hold (a harvest that compacts before it releases the store).

    Runs :meth:`Store.recover` first, like :func:`compact_store`. Unlike it, this
    reads only the footers of files it does not merge, and removes duplicate responses
    only among the files it merges (``pipeline compact`` removes all of them).

    Raises :class:`StoreLockedError` when another writer has the store, and
    :class:`DamagedFileError` when a file to merge cannot be read. After either, and
    after an interruption at any point, the store stays readable with every row once.

    NOTE: merged sources are deleted at once, as in :func:`compact_store`. A reader
    that connected before (a training job streaming rows) fails on a source it had not
    opened yet and must reconnect. Deleting them only after a grace period would fix it.
    """
    config = config or TieredCompactConfig()
    if not isinstance(store, Store):
        store = Store(store, create=False)
    return _compact_tables(store, lambda root, table: _compact_table_tiers(root, table, config))


def _compact_table_tiers(root: Path, table: str, config: TieredCompactConfig) -> TableCompaction:
    result, files = _start_compaction(root, table)
    # Files left out of merging (a runs file of a running run) stay in the table.
    held_back_files = result.files_before - len(files)
    held_back_rows = result.rows_before - sum(f.num_rows for f in files)

    # Each pass merges at least fanout files into fewer, so the loop ends.
    while chosen := plan_tiered_merge(files, config):
        losers = _duplicate_rows(chosen) if table == "responses" else {}
        result.duplicates_removed += sum(len(rows) for rows in losers.values())
        written: list[StoreFile] = []
        merged: set[Path] = set()
        for group in _group_files(chosen, config.target_rows):
            # Only the last group can be a single file: rewriting it alone gains nothing.
            if len(group) == 1 and group[0].path not in losers:
                continue
            written.append(inspect_file(_merge_group(root, table, group, losers), table))
            merged.update(f.path for f in group)
            result.rows_merged += sum(f.num_rows for f in group)
        result.files_written += len(written)
        result.files_merged += len(merged)
        files = sorted([f for f in files if f.path not in merged] + written, key=lambda f: f.path.name)

    result.files_after = len(files) + held_back_files
    result.rows_after = sum(f.num_rows for f in files) + held_back_rows
    if result.files_written:
        logger.info(
            "compacted %s: merged %d files (%d rows) into %d; %d files now",
            table, result.files_merged, result.rows_merged, result.files_written, result.files_after,
        )
    return result
