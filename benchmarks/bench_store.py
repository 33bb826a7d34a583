"""Bytes per generated token of top-k logprobs in the store, and the error of the default encoding.

For each teacher the script harvests the same prompts twice with ``pipeline harvest``
(top-20, chat endpoint, a fixed ``--seed``, ``--compact off``). The first store has the
default logprob encoding (uint8 codes of 1/8 nat, see :mod:`storage.encoding`), and the
second is set to the lossless ``float32`` encoding. The teachers are the mock teacher
and the real tiny teacher (``pipeline serve-teacher`` on the stories260k checkpoint,
prompts from the TinyStories openings). Both return the same output for the same
request and seed, so the two stores hold the same responses, which the script checks.

Then, per generated token and per column, from the column-chunk sizes in the Parquet
footers:

- ``uint8 (default)`` and ``float32 (lossless)``: the two stores as harvested;
- ``version 1``: the lossless store's rows rewritten file by file as the schema version
  1 writer stored them (float32 logprobs, every token's bytes, zstd level 1);
- ``plain``: the same rows as plain Parquet, float32 and strings without dictionary or
  compression;
- ``compacted``: the default store after ``pipeline compact``.

The distortion is the KL divergence KL(original || stored) between each position's
top-k distribution in the lossless store and in the default store, both read through
the DuckDB views and renormalised over the alternatives, in nats per token (mean,
99th percentile and maximum over positions). The script also times reading the logprob
columns through the views, which decode the stored form.

    python -m benchmarks.bench_store --prompts 200
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks import harvester
from benchmarks.common import OUT_DIR, STORIES_PROMPTS, TINY_MODEL_DIR, print_table, run_measured, write_prompts, write_results
from benchmarks.mock_teacher import MockConfig, MockProcess
from storage.catalog import connect, list_table_files
from storage.encoding import decode_responses_table
from storage.schema import SCHEMA_VERSION_KEY
from storage.store import Store, parquet_write_options

LOGPROB_COLUMNS = ("tokens", "token_bytes", "token_logprobs", "top_logprobs", "text_offset")
# Column groups of the size table: (label, top-level columns, leaf name under
# top_logprobs or None for all leaves).
SIZE_GROUPS = (
    ("tokens", ("tokens",), None),
    ("token_bytes", ("token_bytes",), None),
    ("token_logprobs", ("token_logprobs",), None),
    ("alt token", ("top_logprobs",), "token"),
    ("alt logprob", ("top_logprobs",), "logprob"),
    ("alt bytes", ("top_logprobs",), "bytes"),
    ("text_offset", ("text_offset",), None),
)
SEED = 1


# --- sizes ---------------------------------------------------------------------------


def response_files(store: Path) -> list[Path]:
    return sorted((store / "responses").glob("*.parquet"))


def leaf_bytes(files: list[Path]) -> collections.Counter[str]:
    """Return the compressed bytes of each leaf column (dotted path) over ``files``, from the footers."""
    sizes: collections.Counter[str] = collections.Counter()
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index in range(row_group.num_columns):
                chunk = row_group.column(index)
                sizes[chunk.path_in_schema] += chunk.total_compressed_size
    return sizes


def size_row(label: str, teacher: str, files: list[Path], tokens: int) -> dict[str, Any]:
    """Return one row of the size table: bytes per generated token per column group."""
    sizes = leaf_bytes(files)
    row: dict[str, Any] = {"teacher": teacher, "storage": label}
    grouped = 0
    for name, columns, leaf in SIZE_GROUPS:
        total = 0
        for path, size in sizes.items():
            top, _, rest = path.partition(".")
            in_group = top in columns and (leaf is None or top != "top_logprobs" or rest.endswith(f".{leaf}"))
            total += size if in_group else 0
        grouped += total
        row[name] = round(total / tokens, 2)
    row["logprob columns"] = round(grouped / tokens, 1)
    row["whole files"] = round(sum(path.stat().st_size for path in files) / tokens, 1)
    return row


def view_table(store: Path, columns: str = "request_id, tokens, token_bytes, token_logprobs, top_logprobs, text_offset") -> pa.Table:
    connection = connect(store)
    try:
        return connection.sql(f"SELECT {columns} FROM responses ORDER BY request_id").to_arrow_table()
    finally:
        connection.close()


def earlier_write_options(schema: pa.Schema) -> dict[str, Any]:
    """Return the writer options of schema version 1: the same, but zstd level 1 and statistics on."""
    options = dict(parquet_write_options(schema))
    options.pop("compression_level", None)
    options.pop("write_statistics", None)
    return options


def rewritten_files(lossless: Path, scratch: Path) -> dict[str, list[Path]]:
    """Rewrite the lossless store's responses, file by file, as version 1 and as plain Parquet."""
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    written: dict[str, list[Path]] = {"version 1": [], "plain": []}
    for store_file in list_table_files(lossless, "responses").files:
        table = decode_responses_table(pq.read_table(store_file.path), store_file.logprob_encoding)
        metadata = {**(table.schema.metadata or {}), SCHEMA_VERSION_KEY: b"1", b"kd.table": b"responses"}
        table = table.replace_schema_metadata(metadata)
        version_1 = scratch / f"v1-{store_file.path.name}"
        pq.write_table(table, version_1, **earlier_write_options(table.schema.remove_metadata()))
        plain = scratch / f"plain-{store_file.path.name}"
        pq.write_table(table.select(list(LOGPROB_COLUMNS)), plain, compression="none", use_dictionary=False)
        written["version 1"].append(version_1)
        written["plain"].append(plain)
    return written


def compacted_files(store: Path, scratch: Path) -> list[Path]:
    """Copy ``store``, run ``pipeline compact`` on the copy and return its responses files."""
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(store, scratch, ignore=shutil.ignore_patterns(".lock"))
    child = run_measured([sys.executable, "-m", "pipeline.cli", "compact", "--store", str(scratch)])
    if child.returncode != 0:
        raise SystemExit(f"pipeline compact failed with exit status {child.returncode}:\n{child.stderr[-2000:]}")
    return response_files(scratch)


# --- distortion ------------------------------------------------------------------------


def alternative_logprobs(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Return the alternatives' logprobs (flat float64, NULL as -inf) and each position's count."""
    positions = pc.list_flatten(table["top_logprobs"])
    counts = pc.list_value_length(positions).to_numpy(zero_copy_only=False)
    values = pc.struct_field(pc.list_flatten(positions), "logprob")
    # Masked alternatives are NULL in the store; they carry no probability mass.
    flat = pc.fill_null(values, -np.inf).to_numpy(zero_copy_only=False).astype(np.float64)
    return flat, np.nan_to_num(counts, nan=0).astype(np.int64)


def _log_normalise(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Return log-softmax of ``values`` within each segment; -inf stays -inf."""
    peak = np.repeat(np.maximum.reduceat(values, starts), sizes)
    with np.errstate(invalid="ignore"):
        shifted = values - peak
    shifted[~np.isfinite(values)] = -np.inf
    sums = np.add.reduceat(np.exp(shifted), starts)
    return shifted - np.repeat(np.log(sums), sizes)


def position_kl(original: np.ndarray, stored: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Return KL(p_original || p_stored) over the top-k of each position with alternatives, in nats."""
    keep = counts > 0
    starts = (np.cumsum(counts) - counts)[keep]
    sizes = counts[keep]
    log_p = _log_normalise(original, starts, sizes)
    log_q = _log_normalise(stored, starts, sizes)
    probability = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(probability > 0, probability * (log_p - log_q), 0.0)
    return np.add.reduceat(terms, starts)


def distortion_row(teacher: str, default: Path, lossless: Path) -> dict[str, Any]:
    """Pair the two stores' rows by request_id and measure the KL of the default store's top-k."""
    quantised = view_table(default)
    original = view_table(lossless)
    if quantised["request_id"].to_pylist() != original["request_id"].to_pylist():
        raise SystemExit(f"{teacher}: the two harvests stored different request_ids")
    same = [a == b for a, b in zip(quantised["tokens"].to_pylist(), original["tokens"].to_pylist())]
    mask = pa.array(same, pa.bool_())
    quantised, original = quantised.filter(mask), original.filter(mask)
    stored_values, counts = alternative_logprobs(quantised)
    original_values, original_counts = alternative_logprobs(original)
    if not np.array_equal(counts, original_counts):
        raise SystemExit(f"{teacher}: alternatives per position differ between the two harvests")
    kl = position_kl(original_values, stored_values, counts)
    token_error = np.abs(
        pc.fill_null(pc.list_flatten(quantised["token_logprobs"]), 0).to_numpy(zero_copy_only=False)
        - pc.fill_null(pc.list_flatten(original["token_logprobs"]), 0).to_numpy(zero_copy_only=False)
    )
    return {
        "teacher": teacher,
        "rows compared": quantised.num_rows,
        "rows with other tokens": len(same) - quantised.num_rows,
        "positions": len(kl),
        "KL mean, nats per token": f"{kl.mean():.2e}",
        "KL p99": f"{np.percentile(kl, 99):.2e}",
        "KL max": f"{kl.max():.2e}",
        "max error of a logprob, nats": round(float(np.max(np.abs(np.where(np.isfinite(original_values), original_values - stored_values, 0)))), 4),
        "max error of token_logprobs": round(float(token_error.max()), 4),
    }


QUERIES = {
    "read logprob columns s": "SELECT tokens, token_bytes, token_logprobs, top_logprobs FROM responses",
    "count by teacher s": "SELECT teacher, count(*) FROM responses GROUP BY teacher",
    "filter on finish_reason s": "SELECT request_id, completion_tokens FROM responses WHERE finish_reason = 'stop'",
}


def query_seconds(stores: dict[str, Path], repeats: int = 15) -> dict[str, dict[str, float]]:
    """Return, per store, the median seconds of each query in :data:`QUERIES` through the views.

    The stores take turns within each repeat, so a change of the machine's load
    affects them alike.
    """
    connections = {name: connect(path) for name, path in stores.items()}
    times: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    try:
        for _ in range(repeats):
            for query, sql in QUERIES.items():
                for name, connection in connections.items():
                    start = time.perf_counter()
                    connection.sql(sql).to_arrow_table()
                    times[(name, query)].append(time.perf_counter() - start)
    finally:
        for connection in connections.values():
            connection.close()
    return {name: {query: round(statistics.median(times[(name, query)]), 4) for query in QUERIES} for name in stores}


# --- harvests ----------------------------------------------------------------------------


def harvest(base_url: str, prompts: Path, store: Path, model: str, tokens: int, top_k: int, encoding: str) -> None:
    shutil.rmtree(store, ignore_errors=True)
    Store(store).set_logprob_encoding(encoding)
    spec = harvester.HarvestSpec(
        base_url=base_url, prompts=prompts, store=store, model=model, max_tokens=tokens, top_k=top_k,
        concurrency=16, extra=("--seed", str(SEED), "--compact", "off"),
    )
    child = run_measured(harvester.command(spec))
    if child.returncode != 0:
        raise SystemExit(f"harvest from {base_url} failed with exit status {child.returncode}:\n{child.stderr[-2000:]}")


def harvest_both(base_url: str, prompts: Path, stores: dict[str, Path], model: str, tokens: int, top_k: int) -> None:
    for encoding, store in stores.items():
        harvest(base_url, prompts, store, model, tokens, top_k, encoding)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_tiny_teacher() -> tuple[subprocess.Popen[bytes], str]:
    """Start ``pipeline serve-teacher`` on the tiny model; return the process and its base URL."""
    port = _free_port()
    argv = [sys.executable, "-m", "pipeline.cli", "serve-teacher", str(TINY_MODEL_DIR), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"pipeline serve-teacher exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("pipeline serve-teacher was not ready after 120 s")


def tiny_prompts(count: int) -> Path:
    lines = [line for line in STORIES_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    path = OUT_DIR / f"tinystories-{count}.jsonl"
    path.write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
    return path


def harvest_teacher(teacher: str, count: int, stores: dict[str, Path], tokens: int, top_k: int) -> None:
    if teacher == "mock":
        # One pool body per prompt, so repeated bodies do not flatter compression.
        mock_config = MockConfig(latency_ms=5, tokens=tokens, top_k=top_k, pool_size=max(64, count))
        with MockProcess(mock_config) as mock:
            harvest_both(mock.url, write_prompts(count), stores, "mock-teacher", tokens, top_k)
    elif teacher == "tiny":
        process, url = serve_tiny_teacher()
        try:
            harvest_both(url, tiny_prompts(count), stores, "stories260k", tokens, top_k)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    else:
        raise SystemExit(f"unknown teacher {teacher!r}; use mock or tiny")


def measure_teacher(teacher: str, stores: dict[str, Path]) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]]:
    default, lossless = stores["uint8"], stores["float32"]
    tokens = int(pc.sum(pc.list_value_length(view_table(lossless, "tokens")["tokens"])).as_py() or 0)
    rewritten = rewritten_files(lossless, OUT_DIR / f"bench-store-{teacher}-rewritten")
    compacted_store = OUT_DIR / f"bench-store-{teacher}-compacted"
    compacted = compacted_files(default, compacted_store)
    sizes = [
        size_row("uint8 (default), as harvested", teacher, response_files(default), tokens),
        size_row("float32 (lossless), as harvested", teacher, response_files(lossless), tokens),
        size_row("version 1 (float32, all bytes), same rows", teacher, rewritten["version 1"], tokens),
        size_row("plain float32 + strings, same rows", teacher, rewritten["plain"], tokens),
        size_row("uint8 store after pipeline compact", teacher, compacted, tokens),
    ]
    for row, files in zip(sizes, (response_files(default), response_files(lossless), rewritten["version 1"], rewritten["plain"], compacted)):
        row["files"] = len(files)

    version_1_store = OUT_DIR / f"bench-store-{teacher}-version-1"
    shutil.rmtree(version_1_store, ignore_errors=True)
    Store(version_1_store)
    for path in rewritten["version 1"]:
        shutil.copy(path, version_1_store / "responses" / path.name.removeprefix("v1-"))
    named = {"uint8 (default)": default, "float32 (lossless)": lossless, "version 1": version_1_store}
    reads = [{"teacher": teacher, "store": name, **seconds} for name, seconds in query_seconds(named).items()]
    for path in (compacted_store, version_1_store, OUT_DIR / f"bench-store-{teacher}-rewritten"):
        shutil.rmtree(path, ignore_errors=True)
    return sizes, distortion_row(teacher, default, lossless), reads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Bytes per token of top-k logprobs in the store.")
    parser.add_argument("--prompts", type=int, default=200, help="prompts per teacher (the tiny set has 245)")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--k", type=int, default=20, help="top logprobs per token")
    parser.add_argument("--teachers", default="mock,tiny", help="comma-separated: mock, tiny")
    parser.add_argument("--quick", action="store_true", help="20 prompts per teacher")
    args = parser.parse_args(argv)
    count = 20 if args.quick else args.prompts
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    sizes, distortion, reads = [], [], []
    for teacher in args.teachers.split(","):
        stores = {encoding: OUT_DIR / f"bench-store-{teacher}-{encoding}" for encoding in ("uint8", "float32")}
        harvest_teacher(teacher, count, stores, args.tokens, args.k)
        teacher_sizes, teacher_distortion, teacher_reads = measure_teacher(teacher, stores)
        sizes += teacher_sizes
        distortion.append(teacher_distortion)
        reads += teacher_reads
        for store in stores.values():
            shutil.rmtree(store, ignore_errors=True)

    print_table(sizes)
    print()
    print_table(distortion)
    print()
    print_table(reads)
    settings = {"prompts": count, "tokens": args.tokens, "top_k": args.k, "seed": SEED}
    path = write_results("bench_store", {"settings": settings, "sizes": sizes, "distortion": distortion, "reads": reads})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
