"""Bytes per generated token of top-k logprobs in the store, and what quantising them costs.

Two stores are harvested with ``pipeline harvest`` (top-20, chat endpoint): one from the
mock teacher, one from the real tiny teacher (``pipeline serve-teacher`` on the
stories260k checkpoint, prompts from the TinyStories openings). For each the script
reports, per generated token:

- ``store``: the compressed size of the logprob columns (``tokens``, ``token_bytes``,
  ``token_logprobs``, ``top_logprobs``, ``text_offset``) in the store's Parquet files,
  from the column-chunk sizes in the footers, and the whole files' size;
- ``plain``: the same columns rewritten as plain Parquet (no dictionary, no
  compression), i.e. float32 values and raw strings;
- ``arrow``: the same columns' Arrow buffers in memory.

It also evaluates other encodings of the alternatives' logprobs, the column that
dominates: float32 without dictionary and with Parquet's BYTE_STREAM_SPLIT (both
lossless), float16, and 8-bit and 16-bit fixed-point steps of log-probability. Each is
written alone as a zstd column and compared with float32 in pyarrow's default encoding
(dictionary), which is how the store writes it. The error of an encoding is the mean
KL divergence, in nats per token, between each position's top-k distribution before
and after encoding, both renormalised over the alternatives.

    python -m benchmarks.bench_store --prompts 200
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
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

LOGPROB_COLUMNS = ("tokens", "token_bytes", "token_logprobs", "top_logprobs", "text_offset")


# --- sizes ---------------------------------------------------------------------------


def response_files(store: Path) -> list[Path]:
    return sorted((store / "responses").glob("*.parquet"))


def generated_tokens(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table["tokens"])).as_py() or 0)


def column_bytes(files: list[Path], columns: tuple[str, ...]) -> int:
    """Return the compressed bytes of the column chunks under ``columns``, from the footers."""
    total = 0
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index in range(row_group.num_columns):
                chunk = row_group.column(index)
                if chunk.path_in_schema.split(".", 1)[0] in columns:
                    total += chunk.total_compressed_size
    return total


def plain_bytes(table: pa.Table, scratch: Path) -> int:
    """Return the size of ``table`` written as plain Parquet: no dictionary, no compression."""
    pq.write_table(table, scratch, compression="none", use_dictionary=False)
    size = scratch.stat().st_size
    scratch.unlink()
    return size


def store_sizes(store: Path) -> dict[str, Any]:
    files = response_files(store)
    table = pa.concat_tables([pq.read_table(p, columns=list(LOGPROB_COLUMNS)) for p in files])
    tokens = generated_tokens(table)
    stored = column_bytes(files, LOGPROB_COLUMNS)
    plain = plain_bytes(table, OUT_DIR / "plain-scratch.parquet")
    return {
        "responses": table.num_rows,
        "generated_tokens": tokens,
        "store_logprob_bytes_per_token": round(stored / tokens, 1),
        "store_file_bytes_per_token": round(sum(p.stat().st_size for p in files) / tokens, 1),
        "plain_bytes_per_token": round(plain / tokens, 1),
        "arrow_bytes_per_token": round(table.nbytes / tokens, 1),
        "store_vs_plain": round(stored / plain, 3),
    }


# --- quantised encodings ---------------------------------------------------------------


def alternative_logprobs(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the alternatives' logprobs (flat float32) and each position's count."""
    column = pa.concat_tables([pq.read_table(p, columns=["top_logprobs"]) for p in response_files(store)])["top_logprobs"]
    positions = pc.list_flatten(column)  # one list of alternatives per generated token
    counts = pc.list_value_length(positions).to_numpy(zero_copy_only=False)
    values = pc.struct_field(pc.list_flatten(positions), "logprob")
    # Masked alternatives are NULL in the store; they carry no probability mass.
    flat = pc.fill_null(values, -np.inf).to_numpy(zero_copy_only=False).astype(np.float32)
    return flat, counts.astype(np.int64)


def _log_normalise(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Return log-softmax of ``values`` within each segment starting at ``starts``."""
    peak = np.maximum.reduceat(values, starts)
    sizes = np.diff(np.append(starts, len(values)))
    shifted = values - np.repeat(peak, sizes)
    sums = np.add.reduceat(np.exp(shifted), starts)
    return shifted - np.repeat(np.log(sums), sizes)


def mean_kl(original: np.ndarray, quantised: np.ndarray, counts: np.ndarray) -> float:
    """Return the mean over positions of KL(p_original || p_quantised) over the top-k, in nats."""
    keep = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[keep]
    usable = np.isfinite(original)
    if not usable.all():
        raise ValueError("masked alternatives present; KL over them is not implemented")
    log_p = _log_normalise(original.astype(np.float64), starts)
    log_q = _log_normalise(quantised.astype(np.float64), starts)
    kl = np.add.reduceat(np.exp(log_p) * (log_p - log_q), starts)
    return float(kl.mean())


def quantise(values: np.ndarray, step: float, bits: int) -> tuple[np.ndarray, pa.Array]:
    """Round ``-values`` to multiples of ``step`` in an unsigned integer of ``bits`` bits."""
    top = 2**bits - 1
    codes = np.clip(np.rint(-values / step), 0, top).astype(np.uint8 if bits == 8 else np.uint16)
    return (-codes.astype(np.float32) * step), pa.array(codes)


def column_file_bytes(array: pa.Array, scratch: Path, **options: Any) -> int:
    """Return the size of ``array`` written alone as a zstd Parquet column."""
    pq.write_table(pa.table({"value": array}), scratch, compression="zstd", **options)
    size = scratch.stat().st_size
    scratch.unlink()
    return size


def quantisation_rows(store: Path, label: str) -> list[dict[str, Any]]:
    values, counts = alternative_logprobs(store)
    tokens = int((counts > 0).sum())
    scratch = OUT_DIR / "quantise-scratch.parquet"
    baseline = column_file_bytes(pa.array(values, pa.float32()), scratch)
    float32 = pa.array(values, pa.float32())
    # (name, values after decoding, array written, Parquet writer options)
    encodings: list[tuple[str, np.ndarray, pa.Array, dict[str, Any]]] = [
        ("float32, dictionary (pyarrow default)", values, float32, {}),
        ("float32, plain", values, float32, {"use_dictionary": False}),
        ("float32, byte_stream_split", values, float32,
         {"use_dictionary": False, "column_encoding": {"value": "BYTE_STREAM_SPLIT"}}),
        ("float16, byte_stream_split", values.astype(np.float16).astype(np.float32),
         pa.array(values.astype(np.float16), pa.float16()),
         {"use_dictionary": False, "column_encoding": {"value": "BYTE_STREAM_SPLIT"}}),
    ]
    for name, step, bits in (("uint8, step 1/8 nat", 1 / 8, 8), ("uint16, step 1/256 nat", 1 / 256, 16)):
        restored, codes = quantise(values, step, bits)
        encodings.append((name, restored, codes, {}))
    rows = []
    for name, restored, array, options in encodings:
        size = column_file_bytes(array, scratch, **options)
        rows.append({
            "teacher": label,
            "encoding": name,
            "alt_logprob_bytes_per_token": round(size / tokens, 2),
            "vs_default": round(size / baseline, 3),
            "kl_nats_per_token": f"{mean_kl(values, restored, counts):.2e}",
        })
    return rows


def harvest(base_url: str, prompts: Path, store: Path, model: str, tokens: int, top_k: int) -> None:
    shutil.rmtree(store, ignore_errors=True)
    spec = harvester.HarvestSpec(
        base_url=base_url, prompts=prompts, store=store, model=model, max_tokens=tokens, top_k=top_k, concurrency=16,
    )
    child = run_measured(harvester.command(spec))
    if child.returncode != 0:
        raise SystemExit(f"harvest from {base_url} failed with exit status {child.returncode}:\n{child.stderr[-2000:]}")


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

    sizes, quantised = [], []
    for teacher in args.teachers.split(","):
        store = OUT_DIR / f"bench-store-{teacher}"
        if teacher == "mock":
            # One pool body per prompt, so repeated bodies do not flatter compression.
            mock_config = MockConfig(latency_ms=5, tokens=args.tokens, top_k=args.k, pool_size=max(64, count))
            with MockProcess(mock_config) as mock:
                harvest(mock.url, write_prompts(count), store, "mock-teacher", args.tokens, args.k)
        elif teacher == "tiny":
            process, url = serve_tiny_teacher()
            try:
                harvest(url, tiny_prompts(count), store, "stories260k", args.tokens, args.k)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        else:
            raise SystemExit(f"unknown teacher {teacher!r}; use mock or tiny")
        sizes.append({"teacher": teacher, **store_sizes(store)})
        quantised += quantisation_rows(store, teacher)
        shutil.rmtree(store, ignore_errors=True)

    print_table(sizes)
    print()
    print_table(quantised)
    settings = {"prompts": count, "tokens": args.tokens, "top_k": args.k}
    path = write_results("bench_store", {"settings": settings, "sizes": sizes, "quantised": quantised})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
