"""``pipeline check``: validate every file of a store and set damaged ones aside.

Exit status 1 when damage was found (damaged files, duplicate request_ids or an
unreadable store.json), 0 otherwise, 2 when the folder is no store.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(
    "check",
    epilog="""\b
Example:
  pipeline check --store store/
  pipeline check --store store/ --no-fix --deep
""",
)
@click.option("--store", "store_path", required=True, type=click.Path(path_type=Path),
              help="Folder of the Parquet store, as passed to pipeline harvest --store.")
@click.option("--fix/--no-fix", default=True, show_default=True,
              help="Move damaged files to quarantine/, rewrite an unreadable store.json (the old one "
                   "is kept as store.json.corrupt-<time>) and, when no writer is running, recover "
                   "pending journals and remove partial files. --no-fix only reports.")
@click.option("--deep", is_flag=True,
              help="Also read every data page, not only each file's footer (slower; finds corrupt pages).")
def command(store_path: Path, fix: bool, deep: bool) -> None:
    """Check every Parquet file of a store: size, PAR1 magic, footer, schema, rows.

    Damaged files are moved to quarantine/ (listed in quarantine/report.jsonl), so
    queries over the rest keep working. Also reports pending journals, partial files
    and duplicate request_ids.
    """
    from pipeline.errors import StoreError
    from storage.maintenance import check_store

    try:
        report = check_store(store_path, fix=fix, deep=deep)
    except StoreError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

    for line in format_check_report(report, store_path):
        click.echo(line)
    if report.damage_found:
        sys.exit(1)


def format_check_report(report, store_path: Path) -> list[str]:
    """Return the lines of the printed check summary."""
    lines = [
        f"store: {report.root}",
    ]
    if report.metadata_problem:
        lines.append(
            f"store.json was unreadable ({report.metadata_problem}): rewritten, old file kept"
            f" as {report.metadata_backup}"
        )
    lines += [
        f"files checked: {report.files_checked} ({report.rows_checked} rows)",
        f"damaged: {len(report.damaged)}",
    ]
    for problem in report.damaged:
        where = f" -> {problem.quarantined_to}" if problem.quarantined_to else ""
        lines.append(f"  {problem.path}: {problem.reason}{where}")
    lines.append(f"quarantined: {len(report.quarantined)}")

    recovered = ""
    if report.recovery is not None and report.journals_pending:
        recovered = f" ({report.recovery.summary()})"
    lines.append(f"journals pending: {len(report.journals_pending)}{recovered}")
    if report.partial_files:
        lines.append(f"partial files: {len(report.partial_files)}")
    if report.stray_files:
        lines.append(f"ignored non-Parquet files: {len(report.stray_files)}")
        lines.extend(f"  {path}" for path in report.stray_files)
    if report.superseded_files:
        lines.append(f"files replaced by a compaction: {len(report.superseded_files)}")

    duplicates = f"duplicate request_ids: {report.duplicate_request_ids}"
    if report.duplicate_request_ids:
        duplicates += f" (run `pipeline compact --store {store_path}` to remove them)"
    lines.append(duplicates)
    if report.writer_active:
        lines.append(f"writer active, journals and partial files left alone: {report.writer_active}")
    lines.append("result: damage found" if report.damage_found else "result: ok")
    return lines
