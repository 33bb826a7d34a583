"""SQL over a store that many harvest runs appended to, with and without auto-compaction.

The script replays a sequence of harvest runs (default 100 runs of 10,000 synthetic
response rows, committed in files of 256 rows as the store writer's default batch does,
plus one ``runs/`` record per run) into three stores that end with the same rows:

- ``auto``: after each run, :func:`storage.maintenance.compact_tiered`, the step
  ``pipeline harvest --compact auto`` (the default) runs; its time per run is recorded;
- ``off``: the files as the runs left them (``pipeline harvest --compact off``);
- ``one file``: every response in one Parquet file, plus the same run records.

It then times a count by teacher and a filter on ``finish_reason`` in two ways:

- in this process, through :func:`storage.catalog.connect` (which reads every footer),
  against plain DuckDB ``read_parquet`` on the one file, with and without the connect
  time. The sources take turns within each repetition, and the medians are reported;
- end to end, as users run them: ``pipeline sql QUERY --store S --format csv`` in a
  child process (interpreter start, imports, connect, query, output), against the same
  command on the one-file store.

Last, ``pipeline compact`` merges the ``off`` store, and its row count, distinct
request_ids and a request_id fingerprint are compared before and after.

Rows are built with pyarrow from one template batch with short logprob lists (4
tokens, 2 alternatives), so generation is quick. Only the row and file counts matter
here. Files get the store's names, schema metadata, logprob encoding (the default,
uint8) and writer options, as the store writer's files do.

    python -m benchmarks.bench_sql
    python -m benchmarks.bench_sql --quick
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import OUT_DIR, print_table, run_measured, write_results
from storage.catalog import connect
from storage.encoding import DEFAULT_LOGPROB_ENCODING, encode_responses_table
from storage.journal import part_file_name, segment_id
from storage.maintenance import MERGE_ROW_GROUP_ROWS, compact_tiered
from storage.schema import LogprobColumns, build_responses_table
from storage.store import Store, parquet_write_options

TEACHERS = ("teacher-a", "teacher-b", "teacher-c")
QUERIES = {
    "count": "SELECT teacher, count(*) AS n FROM {source} GROUP BY teacher ORDER BY teacher",
    "filter": "SELECT request_id, completion_tokens FROM {source} WHERE finish_reason = 'stop'",
}
# Rows per file of a harvest: the store writer's default batch_rows.
HARVEST_FILE_ROWS = 256
FINGERPRINT_SQL = (
    "SELECT count(*), count(DISTINCT request_id), sum(hash(request_id)::HUGEINT) FROM responses"
)


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


def file_table(template: pa.Table, first_row: int, rows: int, run_id: str, started: datetime) -> pa.Table:
    """Return ``rows`` rows of ``template`` with unique request ids and varied teacher and finish reason."""
    index = range(first_row, first_row + rows)
    replacements = {
        "request_id": pa.array([f"{i:032x}" for i in index], pa.string()),
        "run_id": pa.array([run_id] * rows, pa.string()),
        "prompt_line": pa.array(index, pa.int64()),
        "teacher": pa.array([TEACHERS[i % 3] for i in index], pa.string()),
        # One response in ten stops early, as a model that ends its story would.
        "finish_reason": pa.array(["stop" if i % 10 == 0 else "length" for i in index], pa.string()),
        "created_at": pa.array([started + timedelta(milliseconds=i) for i in index], pa.timestamp("us", tz="UTC")),
    }
    table = template.slice(0, rows)
    for name, values in replacements.items():
        position = table.schema.get_field_index(name)
        table = table.set_column(position, table.schema.field(position), values)
    return table


# --- Building the stores --------------------------------------------------------------


@dataclass
class Shape:
    """Sizes of the replayed harvest runs."""

    runs: int
    rows_per_run: int
    rows_per_file: int

    @property
    def rows(self) -> int:
        return self.runs * self.rows_per_run


@dataclass
class Stores:
    """The three stores with the same rows, and what auto-compaction cost along the way."""

    auto: Path
    off: Path
    single_store: Path
    single_file: Path
    compaction_s: list[float] = field(default_factory=list)
    rows_rewritten: int = 0
    build_s: float = 0.0


class SingleFileWriter:
    """Appends tables to one Parquet file in row groups of the size compaction writes."""

    def __init__(self, path: Path, schema: pa.Schema):
        self._writer = pq.ParquetWriter(path, schema, **parquet_write_options(schema.remove_metadata()))
        self._buffered: list[pa.Table] = []
        self._rows = 0

    def write(self, table: pa.Table) -> None:
        self._buffered.append(table)
        self._rows += table.num_rows
        if self._rows >= MERGE_ROW_GROUP_ROWS:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._buffered:
            self._writer.write_table(pa.concat_tables(self._buffered))
        self._buffered, self._rows = [], 0


def run_record(run_id: str, rows: int, started: datetime) -> dict[str, Any]:
    return {
        "run_id": run_id, "status": "completed", "started_at": started,
        "finished_at": started + timedelta(minutes=10), "prompts_path": "prompts.jsonl",
        "prompts_read": rows, "requests": rows, "sent": rows, "responses": rows,
        "cached": 0, "skipped_stored": 0, "failed": 0, "invalid_lines": 0, "blank_lines": 0,
    }


def write_run_files(root: Path, run_id: str, tables: list[pa.Table]) -> None:
    """Write one run's batches under the names the store writer gives them."""
    token = secrets.token_hex(4)
    for sequence, table in enumerate(tables):
        name = part_file_name(segment_id(run_id, token, sequence))
        pq.write_table(table, root / "responses" / name, **parquet_write_options(table.schema.remove_metadata()))


def build_stores(out: Path, shape: Shape) -> Stores:
    """Replay ``shape.runs`` harvest runs into the auto, off and one-file stores."""
    start = time.perf_counter()
    stores = Stores(out / "bench-sql-auto", out / "bench-sql-off", out / "bench-sql-single",
                    out / "bench-sql-single.parquet")
    for root in (stores.auto, stores.off, stores.single_store):
        shutil.rmtree(root, ignore_errors=True)
    handles = {root: Store(root) for root in (stores.auto, stores.off, stores.single_store)}
    template = template_table(min(shape.rows_per_file, shape.rows_per_run))
    single = SingleFileWriter(stores.single_file, encode_responses_table(template).schema)
    first_day = datetime(2026, 1, 1, tzinfo=timezone.utc)

    for number in range(shape.runs):
        started = first_day + timedelta(days=number)
        run_id = f"{started:%Y%m%dT%H%M%SZ}-{number:08x}"
        first = number * shape.rows_per_run
        tables = []
        for offset in range(0, shape.rows_per_run, shape.rows_per_file):
            rows = min(shape.rows_per_file, shape.rows_per_run - offset)
            table = file_table(template, first + offset, rows, run_id, started)
            tables.append(encode_responses_table(table, DEFAULT_LOGPROB_ENCODING))
        for root, store in handles.items():
            store.write_run(run_record(run_id, shape.rows_per_run, started))
            if root != stores.single_store:
                write_run_files(root, run_id, tables)
        for table in tables:
            single.write(table)

        compaction_start = time.perf_counter()
        report = compact_tiered(stores.auto)
        stores.compaction_s.append(time.perf_counter() - compaction_start)
        stores.rows_rewritten += sum(table.rows_merged for table in report.tables)
        if (number + 1) % 10 == 0:
            print(f"  replayed {number + 1} of {shape.runs} runs", flush=True)

    single.close()
    shutil.copy(stores.single_file, stores.single_store / "responses" / "part-single.parquet")
    stores.build_s = time.perf_counter() - start
    return stores


# --- Inventory and row checks ---------------------------------------------------------


def inventory(root: Path) -> dict[str, Any]:
    """Count the files and bytes of each table of a store."""
    result: dict[str, Any] = {}
    total = 0
    for table in ("responses", "failures", "runs"):
        paths = list((root / table).glob("*.parquet"))
        result[f"{table}_files"] = len(paths)
        total += sum(p.stat().st_size for p in paths)
    result["mib"] = round(total / 2**20, 2)
    return result


def fingerprint(root: Path) -> tuple[int, int, int]:
    """Return rows, distinct request_ids and a sum of request_id hashes of ``responses``."""
    connection = connect(root)
    try:
        rows, distinct, digest = connection.execute(FINGERPRINT_SQL).fetchone()
    finally:
        connection.close()
    return int(rows), int(distinct), int(digest)


# --- Timings --------------------------------------------------------------------------


def time_catalog(root: Path) -> dict[str, float | int]:
    """Time connect and each query through the catalog, as ``pipeline sql`` runs them."""
    start = time.perf_counter()
    connection = connect(root)
    timings: dict[str, float | int] = {"connect": time.perf_counter() - start}
    try:
        for name, sql in QUERIES.items():
            start = time.perf_counter()
            rows = connection.execute(sql.format(source="responses")).fetchall()
            timings[name] = time.perf_counter() - start
            timings[f"{name}_rows"] = len(rows)
    finally:
        connection.close()
    return timings


def time_single_file(path: Path) -> dict[str, float | int]:
    """Time the same queries with plain DuckDB on one Parquet file."""
    start = time.perf_counter()
    connection = duckdb.connect(":memory:")
    timings: dict[str, float | int] = {"connect": time.perf_counter() - start}
    try:
        for name, sql in QUERIES.items():
            start = time.perf_counter()
            rows = connection.execute(sql.format(source=f"read_parquet('{path}')")).fetchall()
            timings[name] = time.perf_counter() - start
            timings[f"{name}_rows"] = len(rows)
    finally:
        connection.close()
    return timings


def interleave(measures: dict[str, Callable[[], dict[str, float | int]]], repeats: int) -> dict[str, list[dict]]:
    """Run each measure ``repeats`` times, rotating their order every repetition."""
    names = list(measures)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            samples[name].append(measures[name]())
    return samples


def median_of(samples: list[dict], key: str) -> float:
    return statistics.median(sample[key] for sample in samples)


def time_pipeline_sql(root: Path, query: str) -> float:
    """Run ``pipeline sql`` as a user does and return its wall time in seconds."""
    argv = [sys.executable, "-m", "pipeline.cli", "sql", query.format(source="responses"),
            "--store", str(root), "--format", "csv"]
    child = run_measured(argv)
    if child.returncode != 0:
        raise SystemExit(f"pipeline sql failed with exit status {child.returncode}:\n{child.stderr[-1500:]}")
    return child.wall_s


def query_rows(label: str, files: int, samples: list[dict], baseline: list[dict]) -> dict[str, Any]:
    """Return one table row of medians and ratios against ``baseline`` (plain DuckDB, one file)."""
    row: dict[str, Any] = {"source": label, "response files": files}
    base_connect = median_of(baseline, "connect")
    connect_s = median_of(samples, "connect")
    row["connect s"] = round(connect_s, 4)
    for name in QUERIES:
        query_s = median_of(samples, name)
        base_s = median_of(baseline, name)
        row[f"{name} s"] = round(query_s, 4)
        row[f"{name} ratio"] = round(query_s / base_s, 2)
        row[f"{name} ratio with connect"] = round((connect_s + query_s) / (base_connect + base_s), 2)
    return row


# --- Main -----------------------------------------------------------------------------


def parse_shape(args: argparse.Namespace) -> Shape:
    if args.quick:
        return Shape(runs=10, rows_per_run=2_000, rows_per_file=HARVEST_FILE_ROWS)
    runs = max(1, min(args.runs, args.rows))
    rows_per_run = max(1, args.rows // runs)
    rows_per_file = args.rows_per_file
    if args.files is not None:
        rows_per_file = max(1, args.rows // args.files)
    return Shape(runs=runs, rows_per_run=rows_per_run, rows_per_file=rows_per_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="SQL timings over a store many harvest runs appended to.")
    parser.add_argument("--rows", type=int, default=1_000_000, help="response rows in all runs together")
    parser.add_argument("--runs", type=int, default=100, help="harvest runs the rows are spread over")
    parser.add_argument("--rows-per-file", type=int, default=HARVEST_FILE_ROWS,
                        help="rows per file a run commits (the store writer's batch_rows)")
    parser.add_argument("--files", type=int, default=None,
                        help="total files without compaction; sets --rows-per-file to ROWS / FILES")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions of the in-process timings")
    parser.add_argument("--cli-repeats", type=int, default=5, help="repetitions of each `pipeline sql` run")
    parser.add_argument("--quick", action="store_true", help="20,000 rows in 10 runs, 3 repetitions")
    parser.add_argument("--no-compact", action="store_true", help="skip `pipeline compact` on the off store")
    args = parser.parse_args(argv)
    shape = parse_shape(args)
    repeats, cli_repeats = (3, 2) if args.quick else (args.repeats, args.cli_repeats)
    load_before = os.getloadavg()

    print(f"replaying {shape.runs} runs of {shape.rows_per_run:,} rows in files of"
          f" {shape.rows_per_file:,} rows ({shape.rows:,} rows)", flush=True)
    stores = build_stores(OUT_DIR, shape)
    sources = {"auto": stores.auto, "off": stores.off, "one file (store)": stores.single_store}

    expected = fingerprint(stores.single_store)
    store_rows = []
    for label, root in sources.items():
        found = fingerprint(root)
        if found != expected:
            raise SystemExit(f"store {label} has other rows than the one file: {found} != {expected}")
        store_rows.append({"store": label, **inventory(root), "rows": found[0], "distinct request_ids": found[1]})
    compaction = {
        "runs": len(stores.compaction_s),
        "total_s": round(sum(stores.compaction_s), 2),
        "median_per_run_s": round(statistics.median(stores.compaction_s), 3),
        "max_per_run_s": round(max(stores.compaction_s), 3),
        "rows_rewritten": stores.rows_rewritten,
        "rows_rewritten_per_row": round(stores.rows_rewritten / max(1, shape.rows), 2),
    }
    print(f"\nstores built in {stores.build_s:.1f} s; auto-compaction after each run: {compaction}\n")
    print_table(store_rows)

    measures: dict[str, Callable[[], dict]] = {label: (lambda r=root: time_catalog(r)) for label, root in sources.items()}
    measures["one file (plain DuckDB)"] = lambda: time_single_file(stores.single_file)
    samples = interleave(measures, repeats)
    baseline = samples["one file (plain DuckDB)"]
    filter_counts = {sample["filter_rows"] for runs in samples.values() for sample in runs}
    if len(filter_counts) != 1:
        raise SystemExit(f"sources disagree on the filter's row count: {sorted(filter_counts)}")
    files = {label: row["responses_files"] for label, row in zip(sources, store_rows)}
    files["one file (plain DuckDB)"] = 1
    query_table = [query_rows(label, files[label], samples[label], baseline) for label in samples]
    print(f"\nin-process medians of {repeats} (ratios against plain DuckDB on the one file):\n")
    print_table(query_table)

    cli_measures = {
        (label, name): (lambda r=root, q=sql: time_pipeline_sql(r, q))
        for label, root in sources.items() for name, sql in QUERIES.items()
    }
    cli_samples: dict[tuple[str, str], list[float]] = {key: [] for key in cli_measures}
    for repeat in range(cli_repeats):
        keys = list(cli_measures)
        for key in keys[repeat % len(keys):] + keys[: repeat % len(keys)]:
            cli_samples[key].append(cli_measures[key]())
    cli_table = []
    for label in sources:
        row: dict[str, Any] = {"store": label, "response files": files[label]}
        for name in QUERIES:
            seconds = statistics.median(cli_samples[(label, name)])
            base = statistics.median(cli_samples[("one file (store)", name)])
            row[f"{name} s"] = round(seconds, 3)
            row[f"{name} ratio"] = round(seconds / base, 2)
        cli_table.append(row)
    print(f"\n`pipeline sql QUERY --store S --format csv`, medians of {cli_repeats}"
          " (ratios against the one-file store):\n")
    print_table(cli_table)

    compact_table = [] if args.no_compact else run_compact(stores.off, expected, repeats, stores.single_file)
    load_after = os.getloadavg()
    print(f"\nload average (1, 5, 15 min): before {load_before}, after {load_after}")
    path = write_results("bench_sql", {
        "settings": {"runs": shape.runs, "rows_per_run": shape.rows_per_run, "rows_per_file": shape.rows_per_file,
                     "rows": shape.rows, "repeats": repeats, "cli_repeats": cli_repeats},
        "load_before": load_before, "load_after": load_after,
        "stores": store_rows, "auto_compaction": compaction, "queries": query_table,
        "pipeline_sql": cli_table, "pipeline_compact": compact_table,
    })
    for root in (stores.auto, stores.off, stores.single_store):
        shutil.rmtree(root, ignore_errors=True)
    stores.single_file.unlink(missing_ok=True)
    print(f"results written to {path}")


def run_compact(root: Path, expected: tuple[int, int, int], repeats: int, single_file: Path) -> list[dict[str, Any]]:
    """Run ``pipeline compact`` on ``root``, check every request_id is kept once, time queries after."""
    before = fingerprint(root)
    files_before = inventory(root)["responses_files"]
    child = run_measured([sys.executable, "-m", "pipeline.cli", "compact", "--store", str(root)])
    if child.returncode != 0:
        raise SystemExit(f"pipeline compact failed with exit status {child.returncode}:\n{child.stderr[-1500:]}")
    after = fingerprint(root)
    files_after = inventory(root)["responses_files"]
    if not before == after == expected:
        raise SystemExit(f"pipeline compact changed the rows: before {before}, after {after}, expected {expected}")
    compact_row = {
        "files before": files_before, "files after": files_after,
        "rows before": before[0], "rows after": after[0],
        "distinct request_ids before": before[1], "distinct request_ids after": after[1],
        "request_id fingerprint equal": "yes" if before[2] == after[2] else "no",
        "seconds": round(child.wall_s, 2), "cpu_s": round(child.cpu_s, 2), "peak_rss_mb": round(child.peak_rss_mb, 1),
    }
    print("\n`pipeline compact` on the off store:\n")
    print_table([compact_row])

    samples = interleave({
        "off after pipeline compact": lambda: time_catalog(root),
        "one file (plain DuckDB)": lambda: time_single_file(single_file),
    }, repeats)
    row = query_rows("off after pipeline compact", files_after, samples["off after pipeline compact"],
                     samples["one file (plain DuckDB)"])
    print()
    print_table([row])
    return [compact_row, row]


if __name__ == "__main__":
    main()
