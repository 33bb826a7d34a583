"""The ``.rows`` journal of response rows: encoding, torn tails, recovery and row checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage.journal import (
    ROW_JOURNAL_MAGIC,
    ROW_JOURNAL_SUFFIX,
    RowJournalSegment,
    journal_path,
    list_journals,
    read_journal,
)
from storage.schema import build_responses_table, checked_row
from storage.store import Store
from tests.fixtures_store import make_failure_row, make_response_row

SEGMENT = "run-r-00000000-000000"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def write_segment(store: Store, rows: list[dict]) -> Path:
    path = journal_path(store.root / "journal", SEGMENT, "responses", suffix=ROW_JOURNAL_SUFFIX)
    segment = RowJournalSegment(path, "responses")
    for row in rows:
        segment.append(checked_row("responses", row))
    segment.close()
    return path


def test_rows_round_trip_as_built_table(store: Store) -> None:
    rows = [make_response_row(index) for index in range(3)]
    rows.append(make_response_row(3, with_logprobs=False))
    path = write_segment(store, rows)

    contents = read_journal(path)
    assert contents.torn_tail is False
    assert contents.table.to_pylist() == build_responses_table(rows).to_pylist()


def test_torn_tail_keeps_complete_rows(store: Store) -> None:
    rows = [make_response_row(index) for index in range(3)]
    path = write_segment(store, rows)
    data = path.read_bytes()
    path.write_bytes(data[:-10])

    contents = read_journal(path)
    assert contents.torn_tail is True
    assert contents.table.column("request_id").to_pylist() == [row["request_id"] for row in rows[:2]]


def test_corrupt_last_record_fails_crc(store: Store) -> None:
    rows = [make_response_row(index) for index in range(2)]
    path = write_segment(store, rows)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    contents = read_journal(path)
    assert contents.torn_tail is True
    assert "CRC-32" in contents.error
    assert contents.table.num_rows == 1


def test_header_only_segment_has_no_rows(store: Store) -> None:
    path = write_segment(store, [])
    assert path.read_bytes() == ROW_JOURNAL_MAGIC
    contents = read_journal(path)
    assert contents.table is None
    assert contents.torn_tail is False


def test_recover_replays_row_journal(store: Store) -> None:
    rows = [make_response_row(index) for index in range(4)]
    write_segment(store, rows)

    report = store.recover()
    assert report.responses_recovered == 4
    assert list_journals(store.root / "journal") == []
    (part,) = sorted((store.root / "responses").glob("*.parquet"))
    assert pq.read_table(part).column("request_id").to_pylist() == [row["request_id"] for row in rows]


def test_recover_quarantines_foreign_header(store: Store) -> None:
    path = journal_path(store.root / "journal", SEGMENT, "responses", suffix=ROW_JOURNAL_SUFFIX)
    path.write_bytes(b"not a journal at all")

    report = store.recover()
    assert report.journals_quarantined == 1
    assert not path.exists()


def test_writer_journals_rows_format(store: Store) -> None:
    writer = store.writer("run-a", batch_rows=1000)
    writer.add_response(make_response_row(1))
    writer.add_failure(make_failure_row(2))

    names = sorted(journal.path.name for journal in list_journals(store.root / "journal"))
    assert [name.rsplit(".", 2)[1:] for name in names] == [["failures", "arrows"], ["responses", "rows"]]
    writer.close()


def test_writer_rejects_out_of_range_int(store: Store) -> None:
    row = make_response_row(1)
    row["completion_tokens"] = 2**40
    with store.writer("run-a") as writer:
        with pytest.raises(ValueError, match="completion_tokens"):
            writer.add_response(row)
        assert writer.responses_written == 0
        assert list_journals(store.root / "journal") == []


def test_writer_rejects_wrong_logprob_type(store: Store) -> None:
    row = make_response_row(1)
    row["logprobs"].top_tokens[0] = 5
    with store.writer("run-a") as writer:
        with pytest.raises(TypeError, match="top_tokens"):
            writer.add_response(row)
        assert writer.responses_written == 0


def test_checked_row_converts_numpy_scalars() -> None:
    row = make_response_row(1)
    row["prompt_tokens"] = np.int64(7)
    row["latency_ms"] = np.float32(1.5)
    checked = checked_row("responses", row)
    assert type(checked["prompt_tokens"]) is int
    assert type(checked["latency_ms"]) is float


def test_writer_flush_spans_built_chunks(store: Store) -> None:
    # More rows than one Arrow build chunk, fewer than a batch: one Parquet file.
    with store.writer("run-a", batch_rows=1000) as writer:
        for index in range(70):
            writer.add_response(make_response_row(index, run_id="run-a"))
        assert writer.pending_rows == 70
    (part,) = sorted((store.root / "responses").glob("*.parquet"))
    assert pq.read_table(part).num_rows == 70
