"""DuckDB views over the store's Parquet files, tolerant of damaged and older files.

:func:`connect` opens an in-memory DuckDB database with one view per table
(``responses``, ``failures``, ``runs``) plus ``unresolved_failures``. A view lists
the files present when the connection opened; files added later are not seen until
the next :func:`connect`.

Readers use only finished files: named ``*.parquet`` and not hidden,
whose footer parses and whose columns can be read as the current schema. Anything
else (a writer's partial file, a file cut before its footer, an empty file, a stray
``.crc``) is skipped and logged once per file, so one bad file never breaks a query.
A file named in another file's ``kd.replaces`` metadata (written by compaction) is
hidden as well, which makes a compaction atomic for readers.

Files written under different schema versions are read together. Each group of files
with one physical schema and one logprob encoding is converted to the current schema in
SQL. Files of schema version 2 store logprobs quantised or as float32 and leave out
token bytes that equal the token's UTF-8 (see :mod:`storage.encoding`); their
``kd.logprob_encoding`` metadata selects the SQL that decodes them, so the views show
the same columns and types for every file. Missing columns
and struct fields become NULL, and so do columns typed ``null`` (inferred from rows
that were all NULL), with the current type. Extra fields are dropped. DuckDB's
``union_by_name`` is not used: older DuckDB releases reject a struct that gained a
field, and the type it picks depends on which files are present, while these views
always have the current schema's types.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DamagedFileError, StoreError
from storage.encoding import (
    LOGPROB_ENCODING_KEY,
    LogprobEncoding,
    decode_bytes_sql,
    decode_logprob_sql,
)
from storage.schema import SCHEMA_VERSION, SCHEMA_VERSION_KEY, TABLE_KIND_KEY, TABLE_SCHEMAS

logger = logging.getLogger(__name__)

TABLES = ("responses", "failures", "runs")
STORE_METADATA_FILE = "store.json"
REPLACES_KEY = b"kd.replaces"
PARQUET_MAGIC = b"PAR1"
# Header magic (4 bytes) + footer length (4 bytes) + footer magic (4 bytes).
MIN_PARQUET_SIZE = 12

# The column a table cannot do without: its rows are useless when it is missing.
KEY_COLUMNS = {"responses": "request_id", "failures": "request_id", "runs": "run_id"}

# (path, reason) pairs already logged, so a bad file is reported once per process
# instead of on every connect.
_reported: set[tuple[str, str]] = set()


def _report_once(level: int, path: Path, reason: str) -> None:
    key = (str(path), reason)
    if key not in _reported:
        _reported.add(key)
        logger.log(level, "skipping %s: %s", path, reason)


class IncompatibleColumnError(ValueError):
    """A file's column whose type cannot be read as the current schema's type."""


@dataclass(frozen=True)
class StoreFile:
    """A finished, readable Parquet file of one table."""

    path: Path
    table: str
    num_rows: int
    size_bytes: int
    schema: pa.Schema
    schema_version: int | None
    replaces: tuple[str, ...] = ()
    logprob_encoding: LogprobEncoding | None = None
    """The ``kd.logprob_encoding`` of a responses file; ``None`` for files that have none.

    A file that has one stores its logprob columns in the form :mod:`storage.encoding`
    defines, even where the column types equal the current schema's.
    """


@dataclass(frozen=True)
class SkippedEntry:
    """A directory entry readers ignore, with the reason."""

    path: Path
    reason: str


@dataclass
class TableListing:
    """Entries of one table directory, sorted into files readers use and entries they skip."""

    table: str
    files: list[StoreFile] = field(default_factory=list)
    superseded: list[StoreFile] = field(default_factory=list)
    damaged: list[SkippedEntry] = field(default_factory=list)
    partial: list[Path] = field(default_factory=list)
    stray: list[SkippedEntry] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)


def is_partial_name(name: str) -> bool:
    """Return whether ``name`` is a writer's partial file (hidden, ending in ``.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def read_store_metadata(root: Path) -> dict:
    """Read ``store.json``, raising :class:`StoreError` if it is missing or newer than this code."""
    path = root / STORE_METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(
            f"no store at {root}: {STORE_METADATA_FILE} is missing;"
            " pass the directory a harvest wrote with --store"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(
            f"cannot read {path}: {exc}; the file records the store's format, schema"
            f" version and applied migrations, and `pipeline check --store {root}` rewrites"
            " it from the files present (keeping the old one as a backup)"
        ) from exc
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise StoreError(
            f"cannot read {path}: it contains a JSON {type(metadata).__name__}, not an object;"
            f" `pipeline check --store {root}` rewrites it from the files present"
        )
    version = metadata.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise StoreError(
            f"store {root} has schema version {version!r}, this code reads up to"
            f" {SCHEMA_VERSION}; upgrade kd-pipeline to read it"
        )
    return metadata


# --- Inspecting files -----------------------------------------------------------------


def inspect_file(path: Path, table: str) -> StoreFile:
    """Read a Parquet file's footer and check that it can be read as ``table``.

    Raises :class:`DamagedFileError` naming the reason: too short, no ``PAR1`` magic,
    unreadable footer, wrong table, missing key column or an incompatible column type.
    Does not read the data pages.
    """
    size = path.stat().st_size
    if size < MIN_PARQUET_SIZE:
        raise DamagedFileError(
            f"{size} bytes, shorter than any Parquet file ({MIN_PARQUET_SIZE} bytes):"
            " empty or cut off",
            path=str(path),
        )
    with path.open("rb") as handle:
        head = handle.read(4)
        handle.seek(-4, 2)
        tail = handle.read(4)
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise DamagedFileError(
            "missing the PAR1 magic bytes at the start or end: the writer stopped"
            " before the footer was written",
            path=str(path),
        )

    try:
        parquet_file = pq.ParquetFile(path)
        schema = parquet_file.schema_arrow
        metadata = parquet_file.metadata
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DamagedFileError(f"unreadable Parquet footer: {exc}", path=str(path)) from exc

    key_values = metadata.metadata or {}
    file_table = key_values.get(TABLE_KIND_KEY, table.encode()).decode(errors="replace")
    if file_table != table:
        raise DamagedFileError(
            f"file contains a {file_table!r} table but is in the {table}/ directory",
            path=str(path),
        )
    key = KEY_COLUMNS[table]
    if schema.get_field_index(key) < 0:
        raise DamagedFileError(f"missing the key column {key!r}", path=str(path))
    try:
        encoding = _logprob_encoding(key_values.get(LOGPROB_ENCODING_KEY))
        select_columns_sql(schema, TABLE_SCHEMAS[table], encoding)
    except IncompatibleColumnError as exc:
        raise DamagedFileError(str(exc), path=str(path)) from exc

    return StoreFile(
        path=path,
        table=table,
        num_rows=metadata.num_rows,
        size_bytes=size,
        schema=schema.remove_metadata(),
        schema_version=_int_or_none(key_values.get(SCHEMA_VERSION_KEY)),
        replaces=tuple(_decode_replaces(key_values.get(REPLACES_KEY))),
        logprob_encoding=encoding,
    )


def _logprob_encoding(raw: bytes | None) -> LogprobEncoding | None:
    if raw is None:
        return None
    try:
        return LogprobEncoding.from_metadata(raw)
    except ValueError as exc:
        raise IncompatibleColumnError(
            f"{exc}; the file was written by a newer kd-pipeline: upgrade to read it"
        ) from None


def _int_or_none(raw: bytes | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def _decode_replaces(raw: bytes | None) -> list[str]:
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        return []
    return [name for name in names if isinstance(name, str)]


def list_table_files(root: str | Path, table: str) -> TableListing:
    """Sort the entries of one table directory into readable, superseded and skipped.

    Logs each skipped entry once per process: damaged files at WARNING, partial and
    stray files at INFO, files superseded by a compaction at DEBUG.
    """
    directory = Path(root) / table
    listing = TableListing(table=table)
    if not directory.is_dir():
        return listing

    readable: list[StoreFile] = []
    for path in sorted(directory.iterdir()):
        name = path.name
        if is_partial_name(name):
            listing.partial.append(path)
            continue
        if name.startswith(".") or not name.endswith(".parquet") or not path.is_file():
            listing.stray.append(SkippedEntry(path, "not a finished Parquet file name"))
            continue
        try:
            readable.append(inspect_file(path, table))
        except DamagedFileError as exc:
            listing.damaged.append(SkippedEntry(path, str(exc).removeprefix(f"{path}: ")))
        except FileNotFoundError:
            # Removed between listing and opening (a compaction finishing): not an error.
            continue

    replaced = {name for store_file in readable for name in store_file.replaces}
    for store_file in readable:
        if store_file.path.name in replaced:
            listing.superseded.append(store_file)
        else:
            listing.files.append(store_file)
        if store_file.schema_version is not None and store_file.schema_version > SCHEMA_VERSION:
            _report_once(
                logging.WARNING,
                store_file.path,
                f"written with schema version {store_file.schema_version}, newer than"
                f" {SCHEMA_VERSION}: columns this version does not know are not shown",
            )

    _log_skipped(listing)
    return listing


def _log_skipped(listing: TableListing) -> None:
    for entry in listing.damaged:
        _report_once(logging.WARNING, entry.path, f"{entry.reason} (run `pipeline check` to set it aside)")
    for path in listing.partial:
        _report_once(logging.INFO, path, "partial file of a writer that is running or died")
    for entry in listing.stray:
        _report_once(logging.INFO, entry.path, entry.reason)
    for store_file in listing.superseded:
        _report_once(logging.DEBUG, store_file.path, "replaced by a compacted file")


# --- Reconciling schemas in SQL -------------------------------------------------------


def duckdb_type(arrow_type: pa.DataType) -> str:
    """Return the DuckDB type name for a type used in the store schemas."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return f"{duckdb_type(arrow_type.value_type)}[]"
    if pa.types.is_struct(arrow_type):
        fields = ", ".join(
            f"{quote_identifier(child.name)} {duckdb_type(child.type)}" for child in arrow_type
        )
        return f"STRUCT({fields})"
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMPTZ" if arrow_type.tz else "TIMESTAMP"
    for predicate, name in _SCALAR_TYPES:
        if predicate(arrow_type):
            return name
    raise TypeError(f"no DuckDB type mapping for Arrow type {arrow_type}")


_SCALAR_TYPES = [
    (pa.types.is_string, "VARCHAR"),
    (pa.types.is_large_string, "VARCHAR"),
    (pa.types.is_binary, "BLOB"),
    (pa.types.is_large_binary, "BLOB"),
    (pa.types.is_boolean, "BOOLEAN"),
    (pa.types.is_int8, "TINYINT"),
    (pa.types.is_int16, "SMALLINT"),
    (pa.types.is_int32, "INTEGER"),
    (pa.types.is_int64, "BIGINT"),
    (pa.types.is_float16, "FLOAT"),
    (pa.types.is_float32, "FLOAT"),
    (pa.types.is_float64, "DOUBLE"),
]


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _scalar_family(arrow_type: pa.DataType) -> str | None:
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "binary"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return "number"
    if pa.types.is_boolean(arrow_type):
        return "boolean"
    if pa.types.is_timestamp(arrow_type):
        return "timestamp"
    return None


def _is_list(arrow_type: pa.DataType) -> bool:
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def convert_sql(expr: str, source: pa.DataType, target: pa.DataType, depth: int = 0) -> str:
    """Return SQL that turns ``expr`` of type ``source`` into a value of type ``target``.

    Struct fields are matched by name: a missing field becomes NULL and an extra one is
    dropped. Scalars of one family (numbers, strings, binary, timestamps) convert with
    ``TRY_CAST``. Raises :class:`IncompatibleColumnError` for anything else.
    """
    if source.equals(target):
        return expr
    target_sql = duckdb_type(target)
    if pa.types.is_null(source):
        return f"CAST(NULL AS {target_sql})"

    if _is_list(source) and _is_list(target):
        variable = f"x{depth}"
        inner = convert_sql(variable, source.value_type, target.value_type, depth + 1)
        if inner == variable:
            return f"CAST({expr} AS {target_sql})"
        return f"list_transform({expr}, lambda {variable}: {inner})"

    if pa.types.is_struct(source) and pa.types.is_struct(target):
        source_fields = {child.name: child.type for child in source}
        parts = []
        for child in target:
            if child.name in source_fields:
                child_expr = f"struct_extract({expr}, {quote_literal(child.name)})"
                value = convert_sql(child_expr, source_fields[child.name], child.type, depth + 1)
            else:
                value = f"CAST(NULL AS {duckdb_type(child.type)})"
            parts.append(f"{quote_identifier(child.name)} := {value}")
        packed = f"struct_pack({', '.join(parts)})"
        return f"CASE WHEN {expr} IS NULL THEN NULL ELSE {packed} END"

    source_family = _scalar_family(source)
    if source_family is not None and source_family == _scalar_family(target):
        return f"TRY_CAST({expr} AS {target_sql})"
    raise IncompatibleColumnError(f"type {source} cannot be read as {target}")


def select_columns_sql(
    file_schema: pa.Schema,
    target_schema: pa.Schema,
    logprob_encoding: LogprobEncoding | None = None,
) -> list[str]:
    """Return one ``<expr> AS <name>`` item per target column for files of ``file_schema``.

    ``logprob_encoding`` is the file's ``kd.logprob_encoding``: with it, the stored
    logprob and token bytes columns are decoded. Raises :class:`IncompatibleColumnError`
    for a file that stores quantised logprobs without one, and for one whose logprob
    type differs from its encoding's.
    """
    if logprob_encoding is None:
        _check_not_encoded(file_schema)
    else:
        _check_encoded_types(file_schema, logprob_encoding)
    items = []
    for target_field in target_schema:
        name = quote_identifier(target_field.name)
        index = file_schema.get_field_index(target_field.name)
        if index < 0:
            expr = f"CAST(NULL AS {duckdb_type(target_field.type)})"
        elif logprob_encoding is not None and target_field.name in _ENCODED_COLUMNS:
            expr = _decoded_column_sql(target_field.name, file_schema, logprob_encoding)
            expr = f"CAST({expr} AS {duckdb_type(target_field.type)})"
        else:
            source_type = file_schema.field(index).type
            try:
                expr = convert_sql(name, source_type, target_field.type)
            except IncompatibleColumnError as exc:
                raise IncompatibleColumnError(f"column {target_field.name!r}: {exc}") from None
            if expr != name:
                expr = f"CAST({expr} AS {duckdb_type(target_field.type)})"
        items.append(f"{expr} AS {name}")
    return items


# Columns whose stored form depends on the file's logprob encoding.
_ENCODED_COLUMNS = ("token_logprobs", "token_bytes", "top_logprobs")


def _check_not_encoded(file_schema: pa.Schema) -> None:
    """Reject quantised logprobs in a file without ``kd.logprob_encoding``.

    Without this check an integer logprob code would be cast to FLOAT as if it were a
    logprob.
    """
    for name, path in _LOGPROB_LEAVES:
        index = file_schema.get_field_index(name)
        if index >= 0 and _has_integer_leaf(file_schema.field(index).type, path):
            raise IncompatibleColumnError(
                f"integer values in {name!r} without {LOGPROB_ENCODING_KEY.decode()} metadata:"
                " the stored logprobs cannot be decoded"
            )


def _check_encoded_types(file_schema: pa.Schema, encoding: LogprobEncoding) -> None:
    """Reject a file whose stored logprobs are not of the type its encoding names."""
    for name, path in _LOGPROB_LEAVES:
        index = file_schema.get_field_index(name)
        leaf = _leaf_type(file_schema.field(index).type, path) if index >= 0 else None
        if leaf is not None and not leaf.equals(encoding.value_type):
            raise IncompatibleColumnError(
                f"column {name!r} stores {leaf} values, but the file's"
                f" {LOGPROB_ENCODING_KEY.decode()} {encoding.name!r} stores {encoding.value_type}"
            )


# Logprob leaves of the responses schema: (column, struct fields from the list element).
_LOGPROB_LEAVES = (("token_logprobs", ()), ("top_logprobs", ("logprob",)))


def _has_integer_leaf(arrow_type: pa.DataType, path: tuple[str, ...]) -> bool:
    leaf = _leaf_type(arrow_type, path)
    return leaf is not None and pa.types.is_integer(leaf)


def _leaf_type(arrow_type: pa.DataType, path: tuple[str, ...]) -> pa.DataType | None:
    """Return the type at ``path`` below the list levels of ``arrow_type``, or ``None``."""
    while _is_list(arrow_type):
        arrow_type = arrow_type.value_type
    for name in path:
        if not pa.types.is_struct(arrow_type) or arrow_type.get_field_index(name) < 0:
            return None
        arrow_type = arrow_type.field(name).type
    return arrow_type


def _decoded_column_sql(name: str, file_schema: pa.Schema, encoding: LogprobEncoding) -> str:
    """Return SQL that decodes a stored logprob or token bytes column of a version 2 file."""
    column = quote_identifier(name)
    if name == "token_logprobs":
        return f"list_transform({column}, lambda x: {decode_logprob_sql('x', encoding)})"
    if name == "token_bytes":
        # DuckDB list indices are 1-based, as is the index argument of the lambda.
        token = f"{quote_identifier('tokens')}[i]"
        return f"list_transform({column}, lambda b, i: {decode_bytes_sql('b', token)})"
    packed = (
        f"struct_pack(token := a.token, logprob := {decode_logprob_sql('a.logprob', encoding)},"
        f" bytes := {decode_bytes_sql('a.bytes', 'a.token')})"
    )
    return (
        f"list_transform({column}, lambda p: list_transform(p, lambda a:"
        f" CASE WHEN a IS NULL THEN NULL ELSE {packed} END))"
    )


def table_select_sql(table: str, files: Iterable[StoreFile]) -> str:
    """Return a SELECT over ``files`` with exactly the current columns of ``table``.

    Files are grouped by physical schema and logprob encoding, so each group is one
    ``read_parquet`` call; the groups are joined with UNION ALL.
    """
    target = TABLE_SCHEMAS[table]
    groups: dict[tuple[str, LogprobEncoding | None], list[StoreFile]] = {}
    for store_file in files:
        schema = store_file.schema.to_string(show_field_metadata=False, show_schema_metadata=False)
        groups.setdefault((schema, store_file.logprob_encoding), []).append(store_file)

    if not groups:
        empty = ", ".join(
            f"CAST(NULL AS {duckdb_type(f.type)}) AS {quote_identifier(f.name)}" for f in target
        )
        return f"SELECT {empty} WHERE false"

    selects = []
    for group in groups.values():
        columns = ", ".join(select_columns_sql(group[0].schema, target, group[0].logprob_encoding))
        paths = ", ".join(quote_literal(str(f.path.resolve())) for f in group)
        selects.append(f"SELECT {columns} FROM read_parquet([{paths}])")
    return "\nUNION ALL\n".join(selects)


# --- Connections ----------------------------------------------------------------------


UNRESOLVED_FAILURES_SQL = """
WITH run_starts AS (
    SELECT prompts_path AS source, run_id, min(started_at) AS started
    FROM runs WHERE prompts_path IS NOT NULL GROUP BY ALL
    UNION ALL
    SELECT prompt_source, run_id, min(created_at)
    FROM failures WHERE prompt_source IS NOT NULL GROUP BY ALL
),
latest_runs AS (
    SELECT source, arg_max(run_id, started) AS run_id FROM run_starts GROUP BY source
),
request_failures AS (
    SELECT f.* FROM failures AS f
    WHERE f.request_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM responses AS r WHERE r.request_id = f.request_id)
),
line_failures AS (
    SELECT f.* FROM failures AS f
    LEFT JOIN latest_runs AS l ON l.source = f.prompt_source
    WHERE f.request_id IS NULL AND (f.prompt_source IS NULL OR f.run_id = l.run_id)
    QUALIFY row_number() OVER (
        PARTITION BY f.teacher, f.prompt_source, f.prompt_line, f.error_type
        ORDER BY f.created_at DESC
    ) = 1
)
SELECT * FROM request_failures
UNION ALL
SELECT * FROM line_failures
"""
"""Body of the ``unresolved_failures`` view: failures that a rerun has not fixed.

A failure with a request_id is unresolved while no response has that request_id.
A failure without one (a prompt line that never became a request, error_type
``invalid_prompt``) cannot be answered, so it counts only when it comes from the
latest run that read its prompt_source: a rerun records every line that is still
invalid again, and a line fixed since then has no failure in that run. The latest
run is the one with the newest start in ``runs`` (``prompts_path``) or, for a run
without a runs row, the newest first failure. Each (teacher, prompt_source,
prompt_line, error_type) appears once, its latest row.
"""


def connect(root: str | Path, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB connection with views over the store at ``root``.

    Views: ``responses``, ``failures``, ``runs`` (all columns of the current schema)
    and ``unresolved_failures`` (see :data:`UNRESOLVED_FAILURES_SQL`).

    With ``read_only`` (the default) DuckDB may open only the files behind the views.
    External access is disabled except for those exact paths, extension loading is
    off and the configuration is locked, so a query can neither read other files nor
    write any.
    The in-memory database itself stays writable (temporary tables work). Pass
    ``read_only=False`` for internal maintenance that needs an unrestricted connection.

    NOTE: the views name the files present at connect time. A compaction that runs
    later deletes merged files, and queries that reach them then fail: reconnect.
    """
    root = Path(root).resolve()
    read_store_metadata(root)
    listings = {table: list_table_files(root, table) for table in TABLES}

    connection = duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )
    connection.execute("SET TimeZone = 'UTC'")
    if read_only:
        paths = [str(f.path.resolve()) for listing in listings.values() for f in listing.files]
        # Order matters: allowed_paths cannot change once external access is disabled.
        connection.execute("SET allowed_paths = ?", [paths])
        connection.execute("SET enable_external_access = false")

    for table, listing in listings.items():
        connection.execute(f"CREATE VIEW {table} AS {table_select_sql(table, listing.files)}")
    connection.execute(f"CREATE VIEW unresolved_failures AS {UNRESOLVED_FAILURES_SQL}")
    if read_only:
        connection.execute("SET lock_configuration = true")
    return connection
