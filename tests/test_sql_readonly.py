"""``pipeline sql`` and run_query: reads work, every kind of write is rejected.

Each rejected statement is followed by a check that no file in the store (or beside
it) changed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from storage.query import RejectedQueryError, check_read_only, run_query
from storage.store import Store
from tests.fixtures_store import make_failure_row, make_response_row, tree_snapshot
from tests.fixtures_student import damage_data_pages


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    with store.writer("run-a", batch_rows=3) as writer:
        for index in range(5):
            writer.add_response(make_response_row(index))
        writer.add_failure(make_failure_row(9))
    store.write_run({"run_id": "run-a", "status": "completed"})
    return store


def forbidden_statements(store: Store, outside: Path) -> list[str]:
    part = next((store.root / "responses").glob("*.parquet"))
    return [
        "DROP VIEW responses",
        "DELETE FROM responses",
        "UPDATE responses SET teacher = 'x'",
        "INSERT INTO responses SELECT * FROM responses",
        "CREATE TABLE copy AS SELECT * FROM responses",
        f"COPY (SELECT 1) TO '{part}'",
        f"COPY (SELECT 1) TO '{outside / 'out.csv'}'",
        f"COPY responses TO '{store.root / 'responses' / 'x.parquet'}' (FORMAT parquet)",
        f"ATTACH '{outside / 'other.db'}' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        f"EXPORT DATABASE '{outside / 'export'}'",
        "SET enable_external_access = true",
        "PRAGMA enable_profiling",
        "CALL pragma_version()",
        "SELECT 1; DROP VIEW responses",
        "SELECT 1; SELECT 2",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO 'x.csv'",
        "",
    ]


def test_select_returns_rows(store: Store) -> None:
    result = run_query(store.root, "SELECT prompt_id FROM responses ORDER BY prompt_id")
    assert result.columns == ["prompt_id"]
    assert [row[0] for row in result.rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert result.truncated is False


def test_select_forms_are_allowed(store: Store) -> None:
    for sql in [
        "WITH t AS (SELECT * FROM responses) SELECT count(*) FROM t",
        "DESCRIBE responses",
        "SHOW TABLES",
        "SUMMARIZE runs",
        "FROM failures SELECT error_type",
        "SELECT * FROM unresolved_failures",
    ]:
        assert run_query(store.root, sql).columns, sql


def test_limit_marks_truncation(store: Store) -> None:
    result = run_query(store.root, "SELECT * FROM responses", limit=2)
    assert len(result.rows) == 2
    assert result.truncated is True
    assert run_query(store.root, "SELECT * FROM responses", limit=5).truncated is False


def test_forbidden_statements_change_nothing(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    before = tree_snapshot(tmp_path)
    for sql in forbidden_statements(store, outside):
        with pytest.raises(RejectedQueryError):
            run_query(store.root, sql)
        assert tree_snapshot(tmp_path) == before, sql


def test_rejection_names_statement_type() -> None:
    with pytest.raises(RejectedQueryError, match="DELETE statements are not allowed"):
        check_read_only("DELETE FROM responses")
    with pytest.raises(RejectedQueryError, match="2 statements"):
        check_read_only("SELECT 1; SELECT 2")
    with pytest.raises(RejectedQueryError, match="invalid SQL"):
        check_read_only("SELEC 1")


def test_reading_outside_store_is_rejected(store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    for sql in [
        f"SELECT * FROM read_csv('{secret}')",
        "SELECT * FROM read_text('/etc/passwd')",
        f"SELECT * FROM read_blob('{store.root}/store.json')",
        f"SELECT * FROM read_parquet('{store.root}/responses/*.parquet')",
        "SELECT * FROM glob('/etc/*')",
    ]:
        with pytest.raises(RejectedQueryError, match="only the store's tables") as excinfo:
            run_query(store.root, sql)
        assert "hunter2" not in str(excinfo.value)


def test_query_function_cannot_write(store: Store, tmp_path: Path) -> None:
    target = tmp_path / "q.csv"
    with pytest.raises(duckdb.Error):
        run_query(store.root, f"SELECT * FROM query('COPY (SELECT 1) TO ''{target}''')")
    assert not target.exists()


def test_cli_rejects_with_exit_2(store: Store) -> None:
    before = tree_snapshot(store.root)
    result = CliRunner().invoke(cli, ["sql", "DROP VIEW responses", "--store", str(store.root)])
    assert result.exit_code == 2
    assert "DROP statements are not allowed" in result.output
    assert tree_snapshot(store.root) == before


def test_cli_csv_output(store: Store) -> None:
    result = CliRunner().invoke(
        cli,
        ["sql", "SELECT prompt_id, tokens FROM responses ORDER BY 1", "--store", str(store.root),
         "--format", "csv"],
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["prompt_id", "tokens"]
    assert rows[1] == ["p0", json.dumps([" w0", " w1", " w2", " w3"])]
    assert len(rows) == 6


def test_cli_json_output(store: Store) -> None:
    result = CliRunner().invoke(
        cli,
        ["sql", "SELECT prompt_id, token_bytes, created_at FROM responses ORDER BY 1",
         "--store", str(store.root), "--format", "json", "--limit", "2"],
    )
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    assert len(records) == 2
    assert records[0]["prompt_id"] == "p0"
    assert records[0]["token_bytes"][0] == "IHcw"
    assert records[0]["created_at"].startswith("2025-01-01T00:00:00")
    assert "raise --limit" in result.stderr


def test_cli_table_output(store: Store) -> None:
    result = CliRunner().invoke(
        cli, ["sql", "SELECT teacher, count(*) AS n FROM responses GROUP BY 1", "--store", str(store.root)]
    )
    assert result.exit_code == 0, result.output
    assert "tiny" in result.output
    assert "1 row" in result.output


@pytest.mark.parametrize(
    "query",
    ["SELECT no_such_column FROM responses", "SELECT * FROM no_such_table", "SELECT count(* FROM responses"],
)
def test_cli_query_error_exits_2(store: Store, query: str) -> None:
    result = CliRunner().invoke(cli, ["sql", query, "--store", str(store.root)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output


@pytest.mark.parametrize(
    ("query", "keyword"),
    [("INSTALL httpfs", "INSTALL"), ("CHECKPOINT", "CHECKPOINT"), ("USE memory", "USE"),
     ("/* note */ load httpfs", "LOAD")],
)
def test_rejection_names_written_keyword(query: str, keyword: str) -> None:
    with pytest.raises(RejectedQueryError, match=f"^{keyword} statements are not allowed"):
        check_read_only(query)


def test_cli_corrupt_page_hints_check(store: Store) -> None:
    part = max((store.root / "responses").glob("*.parquet"), key=lambda p: p.stat().st_size)
    damage_data_pages(part)
    result = CliRunner().invoke(cli, ["sql", "SELECT * FROM responses", "--store", str(store.root)])
    assert result.exit_code == 1, result.output
    assert "pipeline check --store" in result.output
    assert "--deep" in result.output


def test_cli_missing_store_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["sql", "SELECT 1", "--store", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "store.json is missing" in result.output
