"""``pipeline compact``: merge a store's small Parquet files and drop duplicate responses."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from storage.maintenance import CompactConfig

_DEFAULTS = CompactConfig()


@click.command(
    "compact",
    epilog="""\b
Example:
  pipeline compact --store store/
  pipeline compact --store store/ --target-rows 20000 --small-file-rows 5000
""",
)
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path),
              help="Folder of the Parquet store, as passed to pipeline harvest --store.")
@click.option("--target-rows", type=click.IntRange(min=1), default=_DEFAULTS.target_rows, show_default=True,
              help="Maximum rows per merged file.")
@click.option("--small-file-rows", type=click.IntRange(min=1), default=_DEFAULTS.small_file_rows,
              show_default=True, help="Files with fewer rows than this are merged.")
def command(store_path: Path, target_rows: int, small_file_rows: int) -> None:
    """Merge small files of responses and failures into larger ones.

    Takes the writer lock (fails at once while a harvest runs), recovers pending
    journals, then rewrites small files without losing a row; a response stored more
    than once keeps its earliest row. Safe to interrupt at any point.
    """
    from pipeline.errors import DamagedFileError, StoreError
    from storage.maintenance import compact_store

    config = CompactConfig(target_rows=target_rows, small_file_rows=small_file_rows)
    try:
        report = compact_store(store_path, config)
    except KeyboardInterrupt:
        click.echo("compact interrupted; no row was lost, run pipeline compact again to finish", err=True)
        sys.exit(128 + signal.SIGINT)
    except DamagedFileError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except StoreError as exc:
        # A locked store is exit status 2, as for a second harvest on the same store.
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

    if report.recovery.changed:
        click.echo(f"recovery: {report.recovery.summary()}")
    for table in report.tables:
        click.echo(
            f"{table.table}: {table.files_before} files, {table.rows_before} rows -> "
            f"{table.files_after} files, {table.rows_after} rows"
            f" ({table.files_written} files written, {table.duplicates_removed} duplicate rows removed)"
        )
        for entry in table.damaged_skipped:
            click.echo(f"  skipped damaged file {entry.path}: {entry.reason} (run pipeline check)")
