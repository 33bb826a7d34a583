"""``pipeline sql``: run one read-only SQL query over a store and print the rows.

Only a single SELECT passes (see :mod:`storage.query`); anything else exits with
status 2 and the reason, before DuckDB runs it.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import sys
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import click

TABLE_DEFAULT_LIMIT = 100
# Longer cell values are cut in table output; csv and json print them whole.
TABLE_CELL_CHARS = 80


@click.command(
    "sql",
    epilog="""\b
Example:
  pipeline sql "SELECT teacher, finish_reason, count(*) AS n FROM responses GROUP BY ALL" --store store/
  pipeline sql "SELECT request_id, tokens[1:5] FROM responses" --store store/ --format json --limit 3
""",
)
@click.argument("query")
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path),
              help="Folder of the Parquet store, as passed to pipeline harvest --store.")
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True, help="Output format; csv and json go to stdout for piping. BLOB values print as base64.")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help=f"Maximum rows to print.  [default: {TABLE_DEFAULT_LIMIT} for table, all for csv and json]")
def command(query: str, store_path: Path, output_format: str, limit: int | None) -> None:
    """Run one read-only SQL QUERY over a store.

    Views: responses, failures, runs, and unresolved_failures (failures whose
    request_id has no response, and invalid prompt lines of the latest run that
    read each prompts file). Only a single SELECT runs (WITH, DESCRIBE, SHOW and
    SUMMARIZE are SELECTs); statements that could change data or read other files are
    rejected with exit status 2. Errors in the query (syntax, unknown table or column)
    exit with status 2; failures to read the store's files exit with status 1.
    """
    import duckdb

    from pipeline.errors import StoreError
    from storage.query import RejectedQueryError, run_query

    if limit is None and output_format == "table":
        limit = TABLE_DEFAULT_LIMIT
    try:
        result = run_query(store_path, query, limit=limit)
    except RejectedQueryError as exc:
        click.echo(f"error: query rejected: {exc}", err=True)
        sys.exit(2)
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except duckdb.Error as exc:
        _exit_query_failed(exc, store_path)

    if output_format == "table":
        _print_table(result)
    elif output_format == "csv":
        _print_csv(result)
    else:
        _print_json(result)
    if result.truncated:
        click.echo(f"(output cut at {limit} rows; raise --limit to see more)", err=True)


def _exit_query_failed(error: Exception, store_path: Path) -> None:
    """Print a failed query's error and exit: 2 for errors in the query, 1 for I/O."""
    from storage.query import corruption_hint, is_corruption_error, is_query_error

    message = str(error).strip()
    if is_corruption_error(error):
        click.echo(f"error: query failed: {message}; {corruption_hint(store_path)}", err=True)
        sys.exit(1)
    click.echo(f"error: query failed: {message}", err=True)
    sys.exit(2 if is_query_error(error) else 1)


def _print_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for name, type_name in zip(result.columns, result.types):
        table.add_column(f"{name}\n{type_name}", overflow="fold")
    for row in result.rows:
        table.add_row(*(_table_cell(value) for value in row))
    console = Console()
    console.print(table)
    count = len(result.rows)
    console.print(f"{count} row" if count == 1 else f"{count} rows")


def _table_cell(value: Any) -> str:
    if value is None:
        return "NULL"
    plain = _plain(value)
    text = plain if isinstance(plain, str) else json.dumps(plain, ensure_ascii=False)
    if len(text) > TABLE_CELL_CHARS:
        text = text[: TABLE_CELL_CHARS - 1] + "…"
    # Square brackets are rich markup; escape them so lists print as written.
    from rich.markup import escape

    return escape(text)


def _print_csv(result) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow([_csv_cell(value) for value in row])


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return value
    plain = _plain(value)
    return plain if isinstance(plain, str) else json.dumps(plain, ensure_ascii=False)


def _print_json(result) -> None:
    records = [dict(zip(result.columns, (_plain(v) for v in row))) for row in result.rows]
    json.dump(records, sys.stdout, ensure_ascii=False, indent=2)
    sys.stdout.write("\n")


def _plain(value: Any) -> Any:
    """Convert a DuckDB value to JSON-compatible data (NaN and infinities become null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, (Decimal, UUID)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
