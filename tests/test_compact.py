"""compact_store and ``pipeline compact``: no row lost or duplicated, crash-safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import DamagedFileError, StoreLockedError
from storage.catalog import REPLACES_KEY, TABLE_KIND_KEY, connect, list_table_files
from storage.encoding import (
    DEFAULT_LOGPROB_ENCODING,
    FLOAT32_ENCODING,
    LOGPROB_ENCODING_KEY,
    stored_responses_schema,
)
from storage.journal import JournalSegment, journal_path
from storage.maintenance import CompactConfig, compact_store
from storage.schema import build_responses_table
from storage.store import Store
from tests.conftest import REPO_DIR
from tests.fixtures_store import BASE_TIME, make_failure_row, make_response_row

OLD_ALTERNATIVE = pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float32())])


def small_files_store(root: Path, files: int = 10, rows_per_file: int = 3) -> Store:
    store = Store(root)
    with store.writer("run-a", batch_rows=rows_per_file) as writer:
        for index in range(files * rows_per_file):
            writer.add_response(make_response_row(index))
    with store.writer("run-b", batch_rows=2) as writer:
        for index in range(0, files * rows_per_file, 5):
            writer.add_failure(make_failure_row(index))
    return store


def all_rows(store: Store, table: str = "responses") -> list[tuple]:
    connection = connect(store.root)
    return sorted(connection.execute(f"SELECT * EXCLUDE (created_at), created_at FROM {table}").fetchall(), key=repr)


def test_compact_merges_small_files(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store")
    before = all_rows(store)
    failures_before = all_rows(store, "failures")

    report = compact_store(store.root)

    responses = report.tables[0]
    assert (responses.files_before, responses.files_after) == (10, 1)
    assert (responses.rows_before, responses.rows_after) == (30, 30)
    assert all_rows(store) == before
    assert all_rows(store, "failures") == failures_before
    (merged,) = (store.root / "responses").glob("*.parquet")
    metadata = pq.read_metadata(merged).metadata
    assert len(json.loads(metadata[REPLACES_KEY])) == 10
    assert metadata[TABLE_KIND_KEY] == b"responses"
    # The sources were written in the default encoding, so the merged file keeps it.
    assert pq.read_schema(merged).equals(stored_responses_schema(DEFAULT_LOGPROB_ENCODING), check_metadata=False)
    assert metadata[LOGPROB_ENCODING_KEY] == DEFAULT_LOGPROB_ENCODING.to_metadata()


def test_compact_respects_target_rows(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store")
    report = compact_store(store.root, CompactConfig(target_rows=9, small_file_rows=100))
    # Groups of three 3-row files; the tenth file alone is left as it is.
    assert report.tables[0].files_written == 3
    assert report.tables[0].files_after == 4
    assert sorted(f.num_rows for f in list_table_files(store.root, "responses").files) == [3, 9, 9, 9]


def test_compact_keeps_earliest_duplicate(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    row = make_response_row(0)
    versions = [
        {**row, "created_at": BASE_TIME + timedelta(hours=2), "response": "late"},
        {**row, "created_at": BASE_TIME, "response": "earliest"},
        {**row, "created_at": None, "response": "no time"},
    ]
    for index, version in enumerate(versions):
        table = build_responses_table([version, make_response_row(10 + index)])
        pq.write_table(table, store.root / "responses" / f"part-dup-{index}.parquet")

    report = compact_store(store.root)
    assert report.tables[0].duplicates_removed == 2
    connection = connect(store.root)
    rows = connection.execute(
        "SELECT response FROM responses WHERE request_id = ?", [row["request_id"]]
    ).fetchall()
    assert rows == [("earliest",)]
    assert connection.execute("SELECT count(*) FROM responses").fetchone()[0] == 4


def test_compact_keeps_repeated_failures(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    for run_id in ["run-a", "run-b"]:
        with store.writer(run_id) as writer:
            writer.add_failure(make_failure_row(0, run_id=run_id))
    compact_store(store.root)
    assert len(all_rows(store, "failures")) == 2


def test_compact_converts_older_schema(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store", files=2)
    old = pa.table(
        {
            "request_id": ["old-1"],
            "prompt_tokens": pa.array([7], pa.int64()),
            "top_logprobs": pa.array([[[{"token": "a", "logprob": -0.5}]]], pa.list_(pa.list_(OLD_ALTERNATIVE))),
        }
    )
    pq.write_table(old.replace_schema_metadata({TABLE_KIND_KEY: b"responses"}), store.root / "responses" / "part-old.parquet")
    before = all_rows(store)

    compact_store(store.root)
    assert len(list_table_files(store.root, "responses").files) == 1
    assert all_rows(store) == before
    row = connect(store.root).execute(
        "SELECT top_logprobs, prompt_tokens FROM responses WHERE request_id = 'old-1'"
    ).fetchone()
    assert row == ([[{"token": "a", "logprob": -0.5, "bytes": None}]], 7)


def test_compact_twice_writes_nothing(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store")
    compact_store(store.root)
    second = compact_store(store.root)
    assert [t.files_written for t in second.tables] == [0, 0, 0]


def test_compact_recovers_journals_first(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store", files=2)
    table = build_responses_table([make_response_row(99)])
    segment = JournalSegment(journal_path(store.root / "journal", "run-z-00000000-000000", "responses"), table.schema)
    segment.append(table)
    segment.close()

    report = compact_store(store.root)
    assert report.recovery.responses_recovered == 1
    assert report.tables[0].rows_after == 7


def test_compact_fails_while_locked(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store", files=2)
    with store.lock():
        with pytest.raises(StoreLockedError):
            compact_store(store.root)


def test_cli_compact_locked_exits_2(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store", files=2)
    with store.lock():
        result = CliRunner().invoke(cli, ["compact", "--store", str(store.root)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output


def run_compaction_killed_at(store_dir: Path, point: str) -> None:
    """Run compact_store in a child that kills itself at ``point``."""
    code = f"""
import os, signal, sys
from pathlib import Path
from storage import maintenance

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if {point!r} == "after_rename":
    real_unlink = Path.unlink
    def unlink(self, missing_ok=False):
        if self.suffix == ".parquet":
            die()
        real_unlink(self, missing_ok=missing_ok)
    Path.unlink = unlink
else:
    def fsync_file(path):
        die()
    maintenance.fsync_file = fsync_file
maintenance.compact_store(sys.argv[1])
"""
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    child = subprocess.run(
        [sys.executable, "-c", code, str(store_dir)], cwd=REPO_DIR, env=env, capture_output=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()


@pytest.mark.parametrize("point", ["during_write", "after_rename"])
def test_compaction_killed_loses_nothing(tmp_path: Path, point: str) -> None:
    store = small_files_store(tmp_path / "store")
    before = all_rows(store)

    run_compaction_killed_at(store.root, point)
    # Readers see every row exactly once even before recovery.
    assert all_rows(store) == before
    listing = list_table_files(store.root, "responses")
    if point == "after_rename":
        assert len(listing.superseded) == 10
    else:
        assert len(listing.partial) == 1

    report = Store(store.root).recover()
    assert report.changed
    assert all_rows(store) == before
    after = list_table_files(store.root, "responses")
    assert after.partial == []
    assert after.superseded == []


def test_cli_compact_prints_counts(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store")
    result = CliRunner().invoke(cli, ["compact", "--store", str(store.root)])
    assert result.exit_code == 0, result.output
    assert "responses: 10 files, 30 rows -> 1 files, 30 rows" in result.output
    assert "failures:" in result.output


def test_compact_names_damaged_source(tmp_path: Path) -> None:
    store = small_files_store(tmp_path / "store", files=3)
    path = sorted((store.root / "responses").glob("*.parquet"))[1]
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    # Keep the footer and the request_id pages, so only the full read fails.
    first_chunk_end = pq.read_metadata(path).row_group(0).column(1).data_page_offset
    data[first_chunk_end:footer_start] = bytes(footer_start - first_chunk_end)
    path.write_bytes(bytes(data))
    before = sorted(p.name for p in (store.root / "responses").iterdir())

    with pytest.raises(DamagedFileError, match=path.name):
        compact_store(store.root)
    assert sorted(p.name for p in (store.root / "responses").iterdir()) == before

    result = CliRunner().invoke(cli, ["compact", "--store", str(store.root)])
    assert result.exit_code == 1
    assert "pipeline check --deep" in result.output


def test_compact_mixed_encodings_stays_lossless(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with store.writer("run-a", batch_rows=2) as writer:
        for index in range(4):
            writer.add_response(make_response_row(index))
    store.set_logprob_encoding("float32")
    with store.writer("run-b", batch_rows=2) as writer:
        for index in range(4, 8):
            writer.add_response(make_response_row(index))
    before = all_rows(store)

    compact_store(store.root)

    (merged,) = (store.root / "responses").glob("*.parquet")
    assert pq.read_metadata(merged).metadata[LOGPROB_ENCODING_KEY] == FLOAT32_ENCODING.to_metadata()
    assert all_rows(store) == before


def test_compact_interrupt_exits_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("storage.maintenance.compact_store", interrupted)
    result = CliRunner().invoke(cli, ["compact", "--store", str(store.root)])

    assert result.exit_code == 130
    assert "no row was lost" in result.output
