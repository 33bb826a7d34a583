"""Rows and helpers shared by the store tests, and the child process of the crash tests.

Run as ``python -m tests.fixtures_store STORE RUN_ID CRASH_AT`` the module appends
response rows in a loop and prints each request_id after ``add_response`` returns,
optionally killing itself with SIGKILL at one named point of the write path.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from storage.schema import LogprobColumns

BASE_TIME = datetime(2025, 1, 1, tzinfo=timezone.utc)


def request_id_for(index: int, salt: str = "") -> str:
    return hashlib.sha256(f"{salt}{index}".encode()).hexdigest()[:32]


def make_logprobs(tokens: int = 4, alternatives: int = 3, *, bytes_missing: bool = False) -> LogprobColumns:
    """Build token logprobs with ``alternatives`` per position; first logprob masked."""
    token_texts = [f" w{i}" for i in range(tokens)]
    top_tokens = [f" a{i}_{j}" for i in range(tokens) for j in range(alternatives)]
    return LogprobColumns(
        tokens=token_texts,
        token_bytes=[None if bytes_missing else t.encode() for t in token_texts],
        token_logprobs=[None] + [-0.25 * i for i in range(1, tokens)],
        top_counts=[alternatives] * tokens,
        top_tokens=top_tokens,
        top_logprobs=[-0.5 - 0.1 * j for j in range(tokens * alternatives)],
        top_bytes=[None if bytes_missing else t.encode() for t in top_tokens],
        text_offset=list(range(0, 3 * tokens, 3)),
    )


def make_response_row(
    index: int,
    *,
    run_id: str = "run-test",
    salt: str = "",
    tokens: int = 4,
    alternatives: int = 3,
    bytes_missing: bool = False,
    with_logprobs: bool = True,
) -> dict[str, Any]:
    """Build a response row with every scalar column the harvester fills."""
    return {
        "request_id": request_id_for(index, salt),
        "run_id": run_id,
        "created_at": BASE_TIME + timedelta(seconds=index),
        "teacher": "tiny",
        "base_url": "http://127.0.0.1:1/v1",
        "model": "stories260k",
        "endpoint": "completions",
        "prompt_id": f"p{index}",
        "prompt_source": "prompts.jsonl",
        "prompt_line": index + 1,
        "prompt": f"Once upon a time {index}",
        "messages": None,
        "sample_index": 0,
        "params": '{"max_tokens":4}',
        "max_tokens": tokens,
        "temperature": 0.0,
        "top_logprobs_requested": alternatives,
        "attempts": 1,
        "response_model": "stories260k",
        "response": "".join(f" w{i}" for i in range(tokens)),
        "finish_reason": "length",
        "prompt_tokens": 5,
        "completion_tokens": tokens,
        "latency_ms": 12.5,
        "logprobs_format": "completions" if with_logprobs else None,
        "logprobs_lossy": False,
        "token_bytes_match": True,
        "token_level_ok": with_logprobs and not bytes_missing,
        "logprobs_note": None,
        "logprobs": make_logprobs(tokens, alternatives, bytes_missing=bytes_missing)
        if with_logprobs
        else None,
    }


def make_failure_row(index: int, *, run_id: str = "run-test", salt: str = "") -> dict[str, Any]:
    return {
        "request_id": request_id_for(index, salt),
        "run_id": run_id,
        "created_at": BASE_TIME + timedelta(seconds=index),
        "teacher": "tiny",
        "model": "stories260k",
        "endpoint": "completions",
        "prompt": f"Once upon a time {index}",
        "attempts": 3,
        "error_type": "ServerError",
        "message": "HTTP 502 from http://127.0.0.1:1/v1",
        "http_status": 502,
        "retryable": True,
    }


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Return the content of every file under ``root``, keyed by relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


# --- Crash child ----------------------------------------------------------------------

# The child kills itself at the first matching event once this many rows were printed,
# so every crash lands after some batches were already committed.
CRASH_AFTER_ROWS = 23


def _kill_self() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_crash(crash_at: str, rows_done: list[int]) -> None:
    """Patch the write path so the process dies at ``crash_at``."""
    from storage import journal as journal_module
    from storage import store as store_module

    def armed() -> bool:
        return rows_done[0] >= CRASH_AFTER_ROWS

    if crash_at == "journal_append":
        original_write = journal_module.JournalSegment._write

        def torn_write(self, data: bytes) -> None:
            if armed() and self.rows > 0:
                os.write(self._fd, data[: len(data) // 2])
                _kill_self()
            original_write(self, data)

        journal_module.JournalSegment._write = torn_write

    elif crash_at == "before_parquet":
        original_commit = store_module.StoreWriter._commit

        def commit(self, table_name, tables):
            if armed():
                _kill_self()
            original_commit(self, table_name, tables)

        store_module.StoreWriter._commit = commit

    elif crash_at == "during_parquet":
        original_fsync = store_module.fsync_file

        def fsync_then_die(path: Path) -> None:
            if armed() and path.name.endswith(".parquet.tmp"):
                # Cut the partial file as if the writer died before the footer.
                with open(path, "r+b") as handle:
                    handle.truncate(max(path.stat().st_size // 2, 4))
                _kill_self()
            original_fsync(path)

        store_module.fsync_file = fsync_then_die

    elif crash_at == "after_rename":
        original_replace = os.replace

        def replace_then_die(source, target) -> None:
            original_replace(source, target)
            if armed() and str(target).endswith(".parquet"):
                _kill_self()

        store_module.os.replace = replace_then_die

    elif crash_at != "none":
        raise SystemExit(f"unknown crash point {crash_at!r}")


def run_child(store_dir: str, run_id: str, crash_at: str, batch_rows: int = 5) -> None:
    from storage.store import Store

    rows_done = [0]
    _install_crash(crash_at, rows_done)
    store = Store(store_dir)
    with store.lock():
        store.recover()
        with store.writer(run_id, batch_rows=batch_rows, batch_seconds=3600) as writer:
            index = 0
            while True:
                row = make_response_row(index, run_id=run_id, salt=run_id)
                writer.add_response(row)
                print(row["request_id"], flush=True)
                rows_done[0] += 1
                if index % 7 == 3:
                    writer.add_failure(make_failure_row(index, run_id=run_id, salt=run_id))
                index += 1


if __name__ == "__main__":
    run_child(sys.argv[1], sys.argv[2], sys.argv[3])
