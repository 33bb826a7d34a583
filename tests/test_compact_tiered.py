"""compact_tiered and ``pipeline harvest --compact``: rows kept once, crash-safe, opt-out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from storage import maintenance
from storage.catalog import StoreFile, connect, list_table_files
from storage.maintenance import (
    TieredCompactConfig,
    check_store,
    compact_store,
    compact_tiered,
    plan_tiered_merge,
)
from storage.store import Store
from tests.conftest import REPO_DIR
from tests.fault_server import FaultServer
from tests.fixtures_harvest import write_prompts
from tests.fixtures_store import make_failure_row, make_response_row

# Full size from 10 rows; tier 1 contains files of 3 to 9 rows, tier 2 of 0 to 2 rows.
SMALL_TIERS = TieredCompactConfig(target_rows=20, fanout=4)


def append_run(store: Store, run_id: str, first: int, rows: int, batch_rows: int) -> None:
    """Write ``rows`` responses (and one failure per 5) as one run, ``batch_rows`` per file."""
    with store.writer(run_id, batch_rows=batch_rows) as writer:
        for index in range(first, first + rows):
            writer.add_response(make_response_row(index, run_id=run_id))
            if index % 5 == 0:
                writer.add_failure(make_failure_row(index, run_id=run_id))


def request_id_counts(root: Path, table: str = "responses") -> Counter:
    connection = connect(root)
    try:
        return Counter(row[0] for row in connection.execute(f"SELECT request_id FROM {table}").fetchall())
    finally:
        connection.close()


def all_rows(root: Path, table: str = "responses") -> list[tuple]:
    connection = connect(root)
    try:
        rows = connection.execute(f"SELECT * EXCLUDE (created_at), created_at FROM {table}").fetchall()
    finally:
        connection.close()
    return sorted(rows, key=repr)


def file_names(root: Path, table: str = "responses") -> list[str]:
    return sorted(p.name for p in (root / table).iterdir())


def fake_file(name: str, num_rows: int) -> StoreFile:
    return StoreFile(Path(name), "responses", num_rows, 0, None, None)  # type: ignore[arg-type]


# --- tiers and planning ---------------------------------------------------------------


def test_tier_bounds() -> None:
    config = TieredCompactConfig(target_rows=100, fanout=10)
    assert config.full_rows == 50
    assert [config.tier(rows) for rows in (1000, 50, 49, 5, 4, 1, 0)] == [0, 0, 1, 1, 2, 2, 2]


def test_config_rejects_tiny_values() -> None:
    with pytest.raises(ValueError, match="fanout"):
        TieredCompactConfig(fanout=1)
    with pytest.raises(ValueError, match="target_rows"):
        TieredCompactConfig(target_rows=1)


def test_plan_waits_for_full_tier() -> None:
    config = TieredCompactConfig(target_rows=100, fanout=4)
    files = [fake_file(f"b{i}", 20) for i in range(3)] + [fake_file("c0", 2), fake_file("big", 60)]
    assert plan_tiered_merge(files, config) == []


def test_plan_takes_smaller_tiers_along() -> None:
    config = TieredCompactConfig(target_rows=100, fanout=4)
    tier_1 = [fake_file(f"b{i}", 20) for i in range(4)]
    tier_2 = [fake_file("a0", 2)]
    full = [fake_file("z-full", 60)]
    chosen = plan_tiered_merge(full + tier_1 + tier_2, config)
    assert [f.path.name for f in chosen] == ["a0", "b0", "b1", "b2", "b3"]


def test_plan_caps_one_pass_at_target_rows() -> None:
    config = TieredCompactConfig(target_rows=100, fanout=4)
    files = [fake_file(f"c{i:03d}", 12) for i in range(40)]
    chosen = plan_tiered_merge(files, config)
    assert [f.path.name for f in chosen] == [f"c{i:03d}" for i in range(8)]
    assert sum(f.num_rows for f in chosen) <= config.target_rows


def test_plan_leaves_larger_tiers_alone() -> None:
    config = TieredCompactConfig(target_rows=100, fanout=4)
    tier_1 = [fake_file(f"b{i}", 20) for i in range(3)]
    tier_2 = [fake_file(f"a{i}", 2) for i in range(4)]
    chosen = plan_tiered_merge(tier_1 + tier_2, config)
    assert [f.path.name for f in chosen] == ["a0", "a1", "a2", "a3"]


# --- compaction -----------------------------------------------------------------------


def test_tiered_merge_keeps_rows_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    append_run(store, "run-a", 0, 8, batch_rows=1)
    before = all_rows(store.root)
    failures_before = all_rows(store.root, "failures")

    report = compact_tiered(store.root, SMALL_TIERS)

    responses = report.tables[0]
    assert responses.files_before == 8
    assert responses.files_merged == 8
    assert responses.rows_merged == 8
    assert responses.files_after == 1
    assert all_rows(store.root) == before
    assert all_rows(store.root, "failures") == failures_before
    assert set(request_id_counts(store.root).values()) == {1}


def test_tiered_under_callers_lock(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    append_run(store, "run-a", 0, 8, batch_rows=1)
    before = all_rows(store.root)

    with store.lock():
        report = compact_tiered(store, SMALL_TIERS)
        assert store.locked

    assert report.tables[0].files_after == 1
    assert all_rows(store.root) == before


def test_tiered_leaves_unfilled_tiers(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    append_run(store, "run-a", 0, 3, batch_rows=1)
    names = file_names(store.root)

    report = compact_tiered(store.root, SMALL_TIERS)

    assert report.tables[0].files_written == 0
    assert file_names(store.root) == names


def test_many_runs_keep_few_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    full_size: set[str] = set()
    rows = 0
    for number in range(16):
        append_run(store, f"run-{number}", rows, 3, batch_rows=1)
        rows += 3
        report = compact_tiered(store.root, SMALL_TIERS)
        listing = list_table_files(store.root, "responses")

        # Full-size files are never rewritten, and each tier has fewer than fanout files.
        names = {f.path.name for f in listing.files}
        assert full_size <= names
        full_size |= {f.path.name for f in listing.files if SMALL_TIERS.tier(f.num_rows) == 0}
        tiers = Counter(SMALL_TIERS.tier(f.num_rows) for f in listing.files)
        assert all(count < SMALL_TIERS.fanout for tier, count in tiers.items() if tier > 0)
        assert report.tables[0].rows_after == rows

    counts = request_id_counts(store.root)
    assert len(counts) == rows
    assert set(counts.values()) == {1}
    assert all(10 <= f.num_rows <= 20 for f in list_table_files(store.root, "responses").files
               if f.path.name in full_size)


def test_tiered_drops_duplicates_among_merged(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    append_run(store, "run-a", 0, 4, batch_rows=1)
    # A second writer repeats two request_ids the first one stored.
    append_run(store, "run-b", 2, 2, batch_rows=1)
    assert sum(request_id_counts(store.root).values()) == 6

    report = compact_tiered(store.root, SMALL_TIERS)

    assert report.tables[0].duplicates_removed == 2
    counts = request_id_counts(store.root)
    assert len(counts) == 4
    assert set(counts.values()) == {1}
    assert not check_store(store.root, fix=False).damage_found


# --- interruptions --------------------------------------------------------------------


def test_error_while_writing_keeps_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    append_run(store, "run-a", 0, 8, batch_rows=1)
    before = all_rows(store.root)
    names = file_names(store.root)

    def fail(path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(maintenance, "fsync_file", fail)
    with pytest.raises(OSError, match="No space"):
        compact_tiered(store.root, SMALL_TIERS)

    assert file_names(store.root) == names
    assert all_rows(store.root) == before
    monkeypatch.undo()
    assert not check_store(store.root).damage_found
    assert compact_tiered(store.root, SMALL_TIERS).tables[0].files_after == 1
    assert all_rows(store.root) == before


def test_error_after_rename_hides_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    append_run(store, "run-a", 0, 8, batch_rows=1)
    before = all_rows(store.root)
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.suffix == ".parquet":
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(PermissionError):
        compact_tiered(store.root, SMALL_TIERS)
    monkeypatch.undo()

    # The merged file is in place and the sources are hidden, not read twice.
    assert all_rows(store.root) == before
    assert len(list_table_files(store.root, "responses").superseded) == 8
    report = check_store(store.root)
    assert not report.damage_found
    assert report.recovery is not None
    assert report.recovery.superseded_files_removed == 8
    assert len(list(store.root.joinpath("responses").glob("*.parquet"))) == 1
    assert all_rows(store.root) == before


KILL_CHILD = """
import os, signal, sys
from datetime import datetime, timezone
from pathlib import Path
from storage import maintenance

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "after_rename":
    real_unlink = Path.unlink
    def unlink(self, missing_ok=False):
        if self.suffix == ".parquet":
            die()
        real_unlink(self, missing_ok=missing_ok)
    Path.unlink = unlink
else:
    maintenance.fsync_file = die
maintenance.compact_tiered(sys.argv[1], maintenance.TieredCompactConfig(target_rows=20, fanout=4))
"""


@pytest.mark.parametrize("point", ["during_write", "after_rename"])
def test_killed_compaction_loses_nothing(tmp_path: Path, point: str) -> None:
    store = Store(tmp_path / "store")
    append_run(store, "run-a", 0, 8, batch_rows=1)
    before = all_rows(store.root)
    failures_before = all_rows(store.root, "failures")

    env = {**os.environ, "PYTHONPATH": str(REPO_DIR), "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(store.root), point],
                           cwd=REPO_DIR, env=env, capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()

    # Readers see every row once before any repair.
    assert all_rows(store.root) == before
    report = check_store(store.root)
    assert not report.damage_found
    assert report.recovery is not None
    assert report.recovery.changed
    assert not check_store(store.root).recovery.changed

    # The next compaction finishes the work.
    compact_tiered(store.root, SMALL_TIERS)
    assert all_rows(store.root) == before
    assert all_rows(store.root, "failures") == failures_before
    listing = list_table_files(store.root, "responses")
    assert (len(listing.files), listing.partial, listing.superseded) == (1, [], [])


# --- pipeline harvest --compact -------------------------------------------------------


def seed_small_files(root: Path, count: int) -> list[str]:
    """Write ``count`` one-row response files, enough to fill the default tier of one-row files."""
    store = Store(root)
    append_run(store, "seed", 10_000, count, batch_rows=1)
    return file_names(root)


def harvest_args(prompts: Path, store: Path, base_url: str, *extra: str) -> list[str]:
    return [
        "harvest", str(prompts), "--store", str(store), "--base-url", base_url,
        "--model", "fault-model", "--teacher", "fault", "--max-tokens", "32",
        "--temperature", "0", "--top-logprobs", "5", "--no-progress", *extra,
    ]


def test_harvest_compact_off_leaves_files(tmp_path: Path) -> None:
    store = tmp_path / "store"
    seeded = seed_small_files(store, 12)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)

    with FaultServer() as server:
        result = CliRunner().invoke(cli, harvest_args(prompts, store, server.base_url, "--compact", "off"))

    assert result.exit_code == 0, result.output
    assert "  compact    " not in result.output
    names = file_names(store)
    assert set(seeded) <= set(names)
    assert len(names) == len(seeded) + 1
    assert sum(request_id_counts(store).values()) == 17


def test_harvest_compacts_by_default(tmp_path: Path) -> None:
    store = tmp_path / "store"
    seeded = seed_small_files(store, 12)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 5)

    with FaultServer() as server:
        result = CliRunner().invoke(cli, harvest_args(prompts, store, server.base_url))

    assert result.exit_code == 0, result.output
    assert "compact    responses 12 files (12 rows) merged into 1" in result.output
    names = file_names(store)
    assert not set(seeded) & set(names)
    counts = request_id_counts(store)
    assert len(counts) == 17
    assert set(counts.values()) == {1}
    assert not check_store(store).damage_found


def test_resume_after_compaction_skips_stored(tmp_path: Path) -> None:
    store = tmp_path / "store"
    seed_small_files(store, 12)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)

    with FaultServer() as server:
        first = CliRunner().invoke(cli, harvest_args(prompts, store, server.base_url))
        # Merge the run's own file too, so the stored request_ids come from merged files only.
        compact_store(store)
        assert len(list_table_files(store, "responses").files) == 1
        sent = len(server.log)
        second = CliRunner().invoke(cli, harvest_args(prompts, store, server.base_url))

    assert first.exit_code == 0, first.output
    assert "merged into 1" in first.output
    assert second.exit_code == 0, second.output
    assert len(server.log) == sent
    assert "6 skipped (already stored)" in second.output
    counts = request_id_counts(store)
    assert len(counts) == 6 + 12
    assert set(counts.values()) == {1}


def test_compaction_failure_keeps_exit_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    seed_small_files(store, 12)
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)

    def fail(path: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(maintenance, "fsync_file", fail)
    with FaultServer() as server:
        result = CliRunner().invoke(cli, harvest_args(prompts, store, server.base_url))

    assert result.exit_code == 0, result.output
    assert "compact    failed" in result.output
    assert "No space left on device" in result.output
    counts = request_id_counts(store)
    assert len(counts) == 15
    assert set(counts.values()) == {1}


def run_row(run_id: str, status: str) -> dict:
    started = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return {"run_id": run_id, "status": status, "started_at": started, "finished_at": started, "requests": 1}


def test_finished_runs_files_merged(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    run_ids = [f"run-{index:02d}" for index in range(12)]
    for run_id in run_ids:
        store.write_run(run_row(run_id, "finished"))

    report = compact_tiered(store.root)

    runs_report = next(table for table in report.tables if table.table == "runs")
    assert (runs_report.files_before, runs_report.files_after) == (12, 1)
    assert len(file_names(store.root, "runs")) == 1
    with connect(store.root) as connection:
        stored = connection.execute("SELECT run_id, status FROM runs ORDER BY run_id").fetchall()
    assert stored == [(run_id, "finished") for run_id in run_ids]


def test_recovery_after_runs_merged(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    for index in range(10):
        store.write_run(run_row(f"run-{index:02d}", "finished"))
    compact_tiered(store.root)
    store.write_run(run_row("run-dead", "running"))

    report = store.recover()

    assert report.runs_marked_crashed == 1
    with connect(store.root) as connection:
        statuses = dict(connection.execute("SELECT run_id, status FROM runs").fetchall())
    assert statuses["run-dead"] == "crashed"
    assert sum(status == "finished" for status in statuses.values()) == 10


def test_harvest_summary_names_damaged_file(tmp_path: Path) -> None:
    store = tmp_path / "store"
    seeded = seed_small_files(store, 12)
    damaged = store / "responses" / seeded[0]
    damaged.write_bytes(damaged.read_bytes()[:500])
    prompts = write_prompts(tmp_path / "prompts.jsonl", 1)

    with FaultServer() as server:
        result = CliRunner().invoke(cli, harvest_args(prompts, store, server.base_url))

    assert result.exit_code == 0, result.output
    assert "1 damaged files left alone (run `pipeline check`)" in result.output
    assert damaged.exists()
