"""check_store and ``pipeline check`` on stores with damaged, partial and stray files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from storage.catalog import connect
from storage.journal import JournalSegment, journal_path
from storage.maintenance import check_store
from storage.schema import build_responses_table
from storage.store import MIGRATIONS, Store
from tests.fixtures_store import make_response_row


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    with store.writer("run-a", batch_rows=2) as writer:
        for index in range(4):
            writer.add_response(make_response_row(index))
    return store


def add_damaged_files(store: Store) -> None:
    directory = store.root / "responses"
    (directory / "part-cut.parquet").write_bytes(b"PAR1" + random.Random(5).randbytes(300))
    (directory / "part-empty.parquet").write_bytes(b"")
    (directory / ".part-00001.parquet.crc").write_bytes(b"\x00\x01")


def response_count(store: Store) -> int:
    return connect(store.root).execute("SELECT count(*) FROM responses").fetchone()[0]


def test_check_quarantines_damaged_files(store: Store) -> None:
    add_damaged_files(store)
    report = check_store(store.root)

    assert report.damage_found is True
    assert sorted(Path(p.path).name for p in report.damaged) == ["part-cut.parquet", "part-empty.parquet"]
    assert len(report.quarantined) == 2
    assert report.files_checked == 4
    assert report.rows_checked == 4
    assert [Path(p).name for p in report.stray_files] == [".part-00001.parquet.crc"]
    assert not (store.root / "responses" / "part-cut.parquet").exists()
    for moved in report.quarantined:
        assert Path(moved).exists()

    entries = [json.loads(line) for line in (store.root / "quarantine" / "report.jsonl").read_text().splitlines()]
    assert sorted(Path(e["file"]).name for e in entries) == ["part-cut.parquet", "part-empty.parquet"]
    assert all(e["reason"] for e in entries)
    assert response_count(store) == 4
    assert check_store(store.root).damage_found is False


def test_check_without_fix_moves_nothing(store: Store) -> None:
    add_damaged_files(store)
    report = check_store(store.root, fix=False)
    assert len(report.damaged) == 2
    assert report.quarantined == []
    assert (store.root / "responses" / "part-cut.parquet").exists()


def test_deep_check_finds_corrupt_pages(store: Store) -> None:
    path = sorted((store.root / "responses").glob("*.parquet"))[0]
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    # Overwrite the pages after the first column chunk (request_id), keep the footer.
    first_chunk_end = pq.read_metadata(path).row_group(0).column(1).data_page_offset
    data[first_chunk_end:footer_start] = bytes(footer_start - first_chunk_end)
    path.write_bytes(bytes(data))
    pq.read_metadata(path)

    assert check_store(store.root, fix=False).damaged == []
    deep = check_store(store.root, deep=True)
    assert [Path(p.path).name for p in deep.damaged] == [path.name]
    assert "data pages unreadable" in deep.damaged[0].reason
    assert len(deep.quarantined) == 1
    assert response_count(store) == 2


def test_check_names_file_with_unreadable_ids(store: Store) -> None:
    path = sorted((store.root / "responses").glob("*.parquet"))[0]
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[4:footer_start] = bytes(footer_start - 4)
    path.write_bytes(bytes(data))

    report = check_store(store.root, fix=False)
    assert [Path(p.path).name for p in report.damaged] == [path.name]
    assert "unreadable" in report.damaged[0].reason


def test_check_recovers_pending_journal(store: Store) -> None:
    row = make_response_row(50)
    table = build_responses_table([row])
    segment = JournalSegment(journal_path(store.root / "journal", "run-b-00000000-000000", "responses"), table.schema)
    segment.append(table)
    segment.close()

    report = check_store(store.root)
    assert len(report.journals_pending) == 1
    assert report.recovery.responses_recovered == 1
    assert response_count(store) == 5


def test_check_leaves_active_writer_alone(store: Store) -> None:
    other = Store(store.root)
    with other.writer("run-b") as writer:
        writer.add_response(make_response_row(60))
        report = check_store(store.root)
        assert "locked by another writer" in report.writer_active
        assert len(report.journals_pending) == 1
        assert report.recovery is None
        assert list((store.root / "journal").iterdir())
    assert response_count(store) == 5


def test_check_reports_duplicate_request_ids(store: Store) -> None:
    table = build_responses_table([make_response_row(0)])
    pq.write_table(table, store.root / "responses" / "part-copy.parquet")
    report = check_store(store.root)
    assert report.duplicate_request_ids == 1
    assert report.damage_found is True


def test_cli_check_exit_codes(store: Store) -> None:
    add_damaged_files(store)
    runner = CliRunner()
    first = runner.invoke(cli, ["check", "--store", str(store.root)])
    assert first.exit_code == 1
    assert "damaged: 2" in first.output
    assert "quarantined: 2" in first.output
    assert "journals pending: 0" in first.output

    second = runner.invoke(cli, ["check", "--store", str(store.root)])
    assert second.exit_code == 0, second.output
    assert "result: ok" in second.output


def test_cli_check_missing_store_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["check", "--store", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "store.json is missing" in result.output


def test_corrupt_store_json_hints_check(store: Store) -> None:
    (store.root / "store.json").write_text('{"format": "kd-store", ')
    result = CliRunner().invoke(cli, ["sql", "SELECT 1", "--store", str(store.root)])
    assert result.exit_code == 2
    assert f"pipeline check --store {store.root}" in result.output
    assert "schema version" in result.output


def test_check_fix_rewrites_corrupt_store_json(store: Store) -> None:
    rows_before = response_count(store)
    corrupt = '{"format": "kd-store", '
    (store.root / "store.json").write_text(corrupt)

    no_fix = CliRunner().invoke(cli, ["check", "--store", str(store.root), "--no-fix"])
    assert no_fix.exit_code == 2
    assert (store.root / "store.json").read_text() == corrupt

    result = CliRunner().invoke(cli, ["check", "--store", str(store.root)])
    assert result.exit_code == 1, result.output
    assert "store.json was unreadable" in result.output
    backups = list(store.root.glob("store.json.corrupt-*"))
    assert len(backups) == 1
    assert backups[0].read_text() == corrupt
    metadata = json.loads((store.root / "store.json").read_text())
    assert metadata["format"] == "kd-store"
    assert [step["name"] for step in metadata["migrations"]] == [m.name for m in MIGRATIONS]
    assert response_count(store) == rows_before

    again = CliRunner().invoke(cli, ["check", "--store", str(store.root)])
    assert again.exit_code == 0, again.output


def test_check_fix_keeps_lossless_encoding(store: Store) -> None:
    store.set_logprob_encoding("float32")
    with store.writer("run-float32", batch_rows=2) as writer:
        writer.add_response(make_response_row(100))
    (store.root / "store.json").write_text("not json")

    result = CliRunner().invoke(cli, ["check", "--store", str(store.root)])

    assert result.exit_code == 1, result.output
    assert json.loads((store.root / "store.json").read_text())["logprob_encoding"] == "float32"
    assert Store(store.root).logprob_encoding.name == "float32"


def test_check_leaves_non_store_json_alone(tmp_path: Path) -> None:
    (tmp_path / "store.json").write_text("not json")
    result = CliRunner().invoke(cli, ["check", "--store", str(tmp_path)])
    assert result.exit_code == 2
    assert (tmp_path / "store.json").read_text() == "not json"
    assert not list(tmp_path.glob("store.json.corrupt-*"))
