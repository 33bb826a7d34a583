"""Crash recovery and the writer lock, with real subprocesses killed by SIGKILL.

The child process (``tests/fixtures_store.py``) prints each request_id after
``add_response`` returns. After the kill and :meth:`Store.recover`, every printed
request_id must be stored exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.errors import StoreError, StoreLockedError
from storage.catalog import connect
from storage.journal import JournalSegment, journal_path, list_journals, part_file_name, read_journal
from storage.schema import build_responses_table
from storage.store import Store, write_parquet_atomic
from tests.conftest import REPO_DIR
from tests.fixtures_store import CRASH_AFTER_ROWS, make_response_row

CRASH_POINTS = ["journal_append", "before_parquet", "during_parquet", "after_rename"]


def start_child(store_dir: Path, run_id: str, crash_at: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_DIR)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures_store", str(store_dir), run_id, crash_at],
        cwd=REPO_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stored_counts(store_dir: Path) -> dict[str, int]:
    connection = connect(store_dir)
    rows = connection.execute("SELECT request_id, count(*) FROM responses GROUP BY 1").fetchall()
    return dict(rows)


def assert_exactly_once(store_dir: Path, printed: list[str]) -> dict[str, int]:
    counts = stored_counts(store_dir)
    duplicates = {request_id: n for request_id, n in counts.items() if n > 1}
    missing = [request_id for request_id in printed if request_id not in counts]
    assert duplicates == {}
    assert missing == []
    return counts


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_kill_at_crash_point_loses_nothing(tmp_path: Path, crash_at: str) -> None:
    store_dir = tmp_path / "store"
    child = start_child(store_dir, "run-crash", crash_at)
    stdout, stderr = child.communicate(timeout=60)

    assert child.returncode == -signal.SIGKILL, stderr
    printed = stdout.split()
    assert len(printed) >= CRASH_AFTER_ROWS
    assert list_journals(store_dir / "journal"), "the crash left no journal to replay"

    report = Store(store_dir).recover()
    counts = assert_exactly_once(store_dir, printed)
    # At most the row being added when the process died can be stored unprinted.
    assert len(counts) - len(printed) in (0, 1)
    assert list_journals(store_dir / "journal") == []
    assert list((store_dir / "responses").glob(".*")) == []
    if crash_at == "journal_append":
        assert report.torn_tails == 1
    if crash_at == "after_rename":
        assert report.journals_already_committed >= 1


@pytest.mark.slow
def test_random_kills_then_resume(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    rng = random.Random(7)
    printed: list[str] = []
    for attempt in range(4):
        child = start_child(store_dir, f"run-{attempt}", "none")
        rows_before_kill = rng.randint(5, 60)
        lines = 0
        while lines < rows_before_kill:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            printed.append(line.strip())
            lines += 1
        time.sleep(rng.random() * 0.05)
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
        printed.extend(rest.split())
    # Each child recovers its predecessor's journals on start, as a harvest does.
    Store(store_dir).recover()
    assert_exactly_once(store_dir, printed)


def test_recover_twice_changes_nothing(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    child = start_child(store_dir, "run-crash", "before_parquet")
    stdout, _ = child.communicate(timeout=60)
    store = Store(store_dir)
    store.recover()
    files = sorted(p.name for p in (store_dir / "responses").iterdir())

    second = store.recover()
    assert second.changed is False
    assert sorted(p.name for p in (store_dir / "responses").iterdir()) == files
    assert_exactly_once(store_dir, stdout.split())


def test_replay_skips_stored_request_ids(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    rows = [make_response_row(i) for i in range(4)]
    with store.writer("run-a") as writer:
        for row in rows[:2]:
            writer.add_response(row)

    # A journal left by a dead writer, with one stored row and two new ones.
    path = journal_path(store.root / "journal", "run-b-deadbeef-000000", "responses")
    segment = JournalSegment(path, build_responses_table(rows[:1]).schema)
    for row in [rows[1], rows[2], rows[3]]:
        segment.append(build_responses_table([row]))
    segment.close()

    report = store.recover()
    assert report.duplicates_skipped == 1
    assert report.responses_recovered == 2
    assert stored_counts(store.root) == {row["request_id"]: 1 for row in rows}


def test_committed_segment_journal_is_dropped(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    rows = [make_response_row(i) for i in range(3)]
    segment_name = "run-a-deadbeef-000000"
    table = build_responses_table(rows)
    write_parquet_atomic(table, store.root / "responses" / part_file_name(segment_name))
    segment = JournalSegment(journal_path(store.root / "journal", segment_name, "responses"), table.schema)
    segment.append(table)
    segment.close()

    report = store.recover()
    assert report.journals_already_committed == 1
    assert report.responses_recovered == 0
    assert stored_counts(store.root) == {row["request_id"]: 1 for row in rows}


def test_torn_journal_tail_is_ignored(tmp_path: Path) -> None:
    rows = [make_response_row(i) for i in range(3)]
    path = tmp_path / "seg.responses.arrows"
    segment = JournalSegment(path, build_responses_table(rows[:1]).schema)
    for row in rows:
        segment.append(build_responses_table([row]))
    segment.close()
    data = path.read_bytes()

    for cut in [len(data) - 1, len(data) - 200, len(data) // 2]:
        path.write_bytes(data[:cut])
        contents = read_journal(path)
        assert contents.torn_tail is True
        assert 0 < contents.table.num_rows < 3

    path.write_bytes(data[:3])
    contents = read_journal(path)
    assert contents.table is None


def test_recover_removes_partial_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    partial = store.root / "responses" / ".part-run-a-x-000000.parquet.tmp"
    partial.write_bytes(b"PAR1 half written")
    report = store.recover()
    assert report.partial_files_removed == 1
    assert not partial.exists()


def test_second_lock_fails_naming_holder(tmp_path: Path) -> None:
    first = Store(tmp_path / "store")
    second = Store(tmp_path / "store")
    with first.lock():
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}") as excinfo:
            with second.lock():
                pass
        assert "only one harvest or compaction" in str(excinfo.value)
        with pytest.raises(StoreLockedError):
            second.writer("run-b")
    with second.lock():
        pass


def test_lock_released_when_holder_killed(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    code = (
        "import sys, time\n"
        "from storage.store import Store\n"
        "store = Store(sys.argv[1])\n"
        "with store.lock():\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_DIR)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(store.root)], cwd=REPO_DIR, env=env,
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid}"):
            with store.lock():
                pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with store.lock():
        assert store.locked


def test_recover_refused_with_open_writer(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = store.writer("run-a")
    with pytest.raises(StoreError, match="open writers"):
        store.recover()
    writer.close()
    store.recover()



def test_invalid_journal_is_quarantined(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    table = build_responses_table([make_response_row(0)])
    bad_ids = pa.array([b"\xff\xfe"], pa.binary()).view(pa.string())
    table = table.set_column(0, table.schema.field(0), bad_ids)
    path = journal_path(store.root / "journal", "run-a-deadbeef-000000", "responses")
    segment = JournalSegment(path, table.schema)
    segment.append(table)
    segment.close()

    report = store.recover()
    assert report.journals_quarantined == 1
    assert report.responses_recovered == 0
    assert not path.exists()
    assert len(list((store.root / "quarantine" / "journal").iterdir())) == 1
    assert "invalid journal rows" in (store.root / "quarantine" / "report.jsonl").read_text()


def test_recover_marks_dead_runs_crashed(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.write_run({"run_id": "dead-run", "status": "running", "requests": 7})
    store.write_run({"run_id": "done-run", "status": "completed", "requests": 3})

    report = store.recover()

    assert report.runs_marked_crashed == 1
    connection = connect(store.root)
    rows = connection.execute("SELECT run_id, status, requests FROM runs ORDER BY run_id").fetchall()
    assert rows == [("dead-run", "crashed", 7), ("done-run", "completed", 3)]
    assert store.recover().runs_marked_crashed == 0
