"""Read-only SQL over the store, for ``pipeline sql`` and scripts.

Two independent guards keep a query from changing anything. First, DuckDB's own
parser (:func:`duckdb.extract_statements`) must find exactly one statement of type
SELECT, which covers WITH, DESCRIBE, SHOW, SUMMARIZE and FROM-first queries, and
rejects DROP, DELETE, UPDATE, INSERT, CREATE, COPY, ATTACH, INSTALL, LOAD, EXPORT,
SET, PRAGMA, CALL and the rest. Second, the connection comes from
:func:`storage.catalog.connect` with ``read_only=True``: DuckDB may open only the
store's finished Parquet files, and its configuration is locked, so a SELECT cannot
read ``/etc/passwd`` through ``read_csv`` or reach any other file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from pipeline.errors import ConfigError
from storage.catalog import connect

ALLOWED_STATEMENT_TYPES = frozenset({duckdb.StatementType.SELECT})

# Leading whitespace, comments and opening brackets before a statement's first keyword.
_LEADING_NOISE = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*", re.DOTALL)
_KEYWORD = re.compile(r"[A-Za-z_]+")

# DuckDB messages of errors raised while reading a damaged Parquet data page.
_CORRUPTION_MARKERS = (
    "decompression",
    "corrupt",
    "invalid parquet",
    "checksum",
    "snappy",
    "zstd",
    "gzip",
    "lz4",
    "brotli",
    "thrift",
    "unexpected end",
    "out of buffer",
    "tprotocol",
    # Thrift's message for a field type byte it cannot parse, as in a damaged page header.
    "don't know what type",
    "parquet",
    "page",
)
_QUERY_ERRORS = (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)
_READ_ERRORS = (duckdb.IOException, duckdb.InternalException, duckdb.SerializationException)


class RejectedQueryError(ConfigError):
    """A query that is not a single read-only statement, or reads outside the store."""


@dataclass
class QueryResult:
    """Columns and rows of one query; ``truncated`` when ``limit`` cut rows off."""

    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False


def check_read_only(sql: str) -> str:
    """Return the single statement in ``sql``, or raise :class:`RejectedQueryError`."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise RejectedQueryError(f"invalid SQL: {exc}") from exc
    if not statements:
        raise RejectedQueryError("the query is empty: pass one SELECT statement")
    if len(statements) > 1:
        raise RejectedQueryError(
            f"the query contains {len(statements)} statements: pass one SELECT statement"
        )

    statement = statements[0]
    if statement.type not in ALLOWED_STATEMENT_TYPES:
        kind = first_keyword(statement.query) or statement.type.name
        raise RejectedQueryError(
            f"{kind} statements are not allowed: the store is read-only here; only a"
            " single SELECT (also WITH, DESCRIBE, SHOW, SUMMARIZE) may run"
        )
    return statement.query


def first_keyword(sql: str) -> str | None:
    """Return the first keyword of ``sql`` in upper case, skipping comments and brackets."""
    start = _LEADING_NOISE.match(sql).end()
    match = _KEYWORD.match(sql, start)
    return match.group(0).upper() if match else None


def is_query_error(error: duckdb.Error) -> bool:
    """Return whether ``error`` is a problem of the query text (parser, binder, catalog)."""
    return isinstance(error, _QUERY_ERRORS)


def is_corruption_error(error: BaseException) -> bool:
    """Return whether a DuckDB error looks like a damaged Parquet file in the store."""
    if not isinstance(error, duckdb.Error) or is_query_error(error):
        return False
    if isinstance(error, _READ_ERRORS):
        return True
    message = str(error).lower()
    return any(marker in message for marker in _CORRUPTION_MARKERS)


def corruption_hint(root: str | Path) -> str:
    """Return the fix for a query that hit a damaged data page."""
    return (
        f"a Parquet file of the store looks damaged; run `pipeline check --store {root}"
        " --deep` to set damaged files aside, then rerun"
    )


def run_query(root: str | Path, sql: str, *, limit: int | None = None) -> QueryResult:
    """Run one read-only query over the store at ``root``.

    Returns at most ``limit`` rows when it is given. Raises
    :class:`RejectedQueryError` for anything that is not a read or that touches a file
    outside the store, :class:`pipeline.errors.StoreError` when ``root`` is no store,
    and ``duckdb.Error`` for other query errors (unknown column, type mismatch).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be zero or positive, got {limit}")
    statement = check_read_only(sql)

    connection = connect(root, read_only=True)
    try:
        relation = connection.sql(statement)
        if relation is None:
            raise RejectedQueryError("the statement returns no rows: pass a SELECT")
        if limit is not None:
            rows = relation.limit(limit + 1).fetchall()
        else:
            rows = relation.fetchall()
        truncated = limit is not None and len(rows) > limit
        return QueryResult(
            columns=list(relation.columns),
            types=[str(t) for t in relation.types],
            rows=rows[:limit] if limit is not None else rows,
            truncated=truncated,
        )
    except duckdb.PermissionException as exc:
        raise RejectedQueryError(
            f"{exc}: queries may read only the store's tables (responses, failures,"
            " runs, unresolved_failures), not other files"
        ) from exc
    finally:
        connection.close()
