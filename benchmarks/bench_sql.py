"""SQL over a large store of many small files, through the catalog and after compaction.

The script writes a store of synthetic response rows (default 1,000,000 rows in 1,000
files, the shape a long harvest leaves: one small file per committed batch), then times:

- ``catalog connect``: :func:`storage.catalog.connect`, which reads every file's footer;
- a count by teacher and a filter on ``finish_reason``, through the catalog's views;
- the same two queries on one Parquet file holding the same rows (DuckDB ``read_parquet``);
- ``pipeline compact`` on the store (a child process), then the queries again.

Rows are built with pyarrow from one template batch with short logprob lists (4
tokens, 2 alternatives), so generation is quick. Only the row and file counts matter
here. Files get the store's own names, schema metadata and zstd compression.

    python -m benchmarks.bench_sql --rows 1000000 --files 1000
    python -m benchmarks.bench_sql --quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.common import OUT_DIR, print_table, run_measured, write_results
from storage.catalog import connect
from storage.schema import LogprobColumns, build_responses_table
from storage.store import PARQUET_COMPRESSION, Store
from storage.journal import part_file_name, segment_id

TEACHERS = ("teacher-a", "teacher-b", "teacher-c")
QUERIES = {
    "count by teacher": "SELECT teacher, count(*) AS n FROM {source} GROUP BY teacher ORDER BY teacher",
    "filter finish_reason": (
        "SELECT request_id, completion_tokens FROM {source} WHERE finish_reason = 'stop'"
    ),
}


def template_table(rows: int) -> pa.Table:
    """Return ``rows`` response rows with short logprob lists and fixed scalar values."""
    logprobs = LogprobColumns(
        tokens=["Once", " upon", " a", " time"],
        token_bytes=[b"Once", b" upon", b" a", b" time"],
        token_logprobs=[-0.1, -0.2, -0.05, -0.3],
        top_counts=[2, 2, 2, 2],
        top_tokens=["Once", "One", " upon", " on", " a", " the", " time", " day"],
        top_logprobs=[-0.1, -2.5, -0.2, -1.9, -0.05, -3.1, -0.3, -1.4],
        top_bytes=[b"Once", b"One", b" upon", b" on", b" a", b" the", b" time", b" day"],
    )
    row = {
        "run_id": "bench-sql", "teacher": TEACHERS[0], "base_url": "http://127.0.0.1:1/v1",
        "model": "mock-teacher", "endpoint": "chat", "prompt": "Once upon a time", "sample_index": 0,
        "params": '{"max_tokens":4,"temperature":1.0,"top_logprobs":2}', "max_tokens": 4,
        "temperature": 1.0, "top_logprobs_requested": 2, "attempts": 1, "response_model": "mock-teacher",
        "response": "Once upon a time", "finish_reason": "length", "prompt_tokens": 5,
        "completion_tokens": 4, "latency_ms": 100.0, "logprobs_format": "chat", "logprobs_lossy": False,
        "token_bytes_match": True, "token_level_ok": True, "logprobs": logprobs,
    }
    return build_responses_table([row] * rows)


def file_table(template: pa.Table, first_row: int, started: datetime) -> pa.Table:
    """Return ``template`` with unique request ids and varied teacher and finish reason."""
    n = template.num_rows
    index = range(first_row, first_row + n)
    replacements = {
        "request_id": pa.array([f"{i:032x}" for i in index], pa.string()),
        "prompt_line": pa.array(index, pa.int64()),
        "teacher": pa.array([TEACHERS[i % 3] for i in index], pa.string()),
        # One response in ten stops early, as a model that ends its story would.
        "finish_reason": pa.array(["stop" if i % 10 == 0 else "length" for i in index], pa.string()),
        "created_at": pa.array([started + timedelta(milliseconds=i) for i in index], pa.timestamp("us", tz="UTC")),
    }
    table = template
    for name, values in replacements.items():
        position = table.schema.get_field_index(name)
        table = table.set_column(position, table.schema.field(position), values)
    return table


def build_store(root: Path, rows: int, files: int) -> float:
    """Write a store of ``rows`` rows in ``files`` files; return the seconds it took."""
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    Store(root)
    per_file = max(1, rows // files)
    template = template_table(per_file)
    started = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for number in range(files):
        table = file_table(template, number * per_file, started)
        name = part_file_name(segment_id("bench-sql", "00000000", number))
        pq.write_table(table, root / "responses" / name, compression=PARQUET_COMPRESSION)
    return time.perf_counter() - start


def write_single_file(root: Path, path: Path) -> float:
    """Copy every response of the store into one Parquet file; return the seconds it took."""
    start = time.perf_counter()
    files = sorted((root / "responses").glob("*.parquet"))
    schema = pq.read_schema(files[0])
    with pq.ParquetWriter(path, schema, compression=PARQUET_COMPRESSION) as writer:
        for file in files:
            writer.write_table(pq.read_table(file))
    return time.perf_counter() - start


def time_query(connection: duckdb.DuckDBPyConnection, sql: str) -> tuple[float, int]:
    start = time.perf_counter()
    result = connection.execute(sql).fetchall()
    return time.perf_counter() - start, len(result)


def measure_catalog(root: Path, label: str) -> list[dict[str, Any]]:
    start = time.perf_counter()
    connection = connect(root)
    connect_s = time.perf_counter() - start
    files = len(list((root / "responses").glob("*.parquet")))
    rows = [{"source": label, "files": files, "step": "catalog connect", "seconds": round(connect_s, 3), "result_rows": None}]
    for name, sql in QUERIES.items():
        seconds, count = time_query(connection, sql.format(source="responses"))
        rows.append({"source": label, "files": files, "step": name, "seconds": round(seconds, 3), "result_rows": count})
    connection.close()
    return rows


def measure_single_file(path: Path) -> list[dict[str, Any]]:
    connection = duckdb.connect(":memory:")
    source = f"read_parquet('{path}')"
    rows = []
    for name, sql in QUERIES.items():
        seconds, count = time_query(connection, sql.format(source=source))
        rows.append({"source": "single file", "files": 1, "step": name, "seconds": round(seconds, 3), "result_rows": count})
    connection.close()
    return rows


def run_compact(root: Path) -> dict[str, Any]:
    child = run_measured([sys.executable, "-m", "pipeline.cli", "compact", "--store", str(root)])
    if child.returncode != 0:
        print(f"pipeline compact failed with exit status {child.returncode}:\n{child.stderr[-1500:]}", file=sys.stderr)
    return {
        "source": "pipeline compact", "files": len(list((root / "responses").glob("*.parquet"))),
        "step": "compact" if child.returncode == 0 else f"compact failed ({child.returncode})",
        "seconds": round(child.wall_s, 3), "result_rows": None,
        "cpu_s": round(child.cpu_s, 2), "peak_rss_mb": round(child.peak_rss_mb, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SQL timings over a store of many small files.")
    parser.add_argument("--rows", type=int, default=1_000_000, help="response rows in the store")
    parser.add_argument("--files", type=int, default=1_000, help="Parquet files the rows are spread over")
    parser.add_argument("--quick", action="store_true", help="20,000 rows in 50 files")
    parser.add_argument("--no-compact", action="store_true", help="skip pipeline compact")
    args = parser.parse_args(argv)
    rows, files = (20_000, 50) if args.quick else (args.rows, args.files)

    root = OUT_DIR / "bench-sql-store"
    single = OUT_DIR / "bench-sql-single.parquet"
    build_s = build_store(root, rows, files)
    single_s = write_single_file(root, single)
    size_mb = sum(p.stat().st_size for p in (root / "responses").glob("*.parquet")) / 2**20
    print(f"store: {rows:,} rows in {files:,} files, {size_mb:.1f} MiB, written in {build_s:.1f} s;"
          f" single file written in {single_s:.1f} s", flush=True)

    results = measure_catalog(root, "catalog")
    results += measure_single_file(single)
    if not args.no_compact:
        results.append(run_compact(root))
        results += measure_catalog(root, "catalog after compact")

    # The filter must return the same rows from every source, or the timings compare different work.
    counts = {r["result_rows"] for r in results if r["step"] == "filter finish_reason"}
    if len(counts) != 1:
        raise SystemExit(f"sources disagree on the filter's row count: {sorted(counts)}")
    print_table(results, ["source", "files", "step", "seconds", "result_rows"])
    path = write_results("bench_sql", {"settings": {"rows": rows, "files": files, "store_mib": round(size_mb, 1)}, "results": results})
    shutil.rmtree(root, ignore_errors=True)
    single.unlink(missing_ok=True)
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
