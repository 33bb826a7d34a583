"""DuckDB views over real Parquet files: mixed schema versions, damaged and stray files."""

from __future__ import annotations

import json
import logging
import random
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import StoreError
from storage.catalog import REPLACES_KEY, connect, list_table_files
from storage.schema import SCHEMA_VERSION_KEY, TABLE_KIND_KEY, build_responses_table
from storage.store import Store
from tests.fixtures_store import BASE_TIME, make_failure_row, make_response_row

OLD_ALTERNATIVE = pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float32())])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def write_current(store: Store, rows: list[dict], run_id: str = "run-a") -> None:
    with store.writer(run_id) as writer:
        for row in rows:
            writer.add_response(row)


def write_raw(path: Path, table: pa.Table, **metadata: bytes) -> None:
    key_values = {TABLE_KIND_KEY: b"responses", **{k.encode(): v for k, v in metadata.items()}}
    pq.write_table(table.replace_schema_metadata(key_values), path)


def test_struct_without_bytes_reads_with_current_files(store: Store) -> None:
    # An older file whose alternatives are (token, logprob), without bytes, and
    # without most columns, next to files of the current schema.
    write_current(store, [make_response_row(0)])
    old = pa.table(
        {
            "request_id": pa.array(["old-1"]),
            "prompt_tokens": pa.array([7], pa.int64()),
            "temperature": pa.array([0.5], pa.float64()),
            "token_logprobs": pa.array([[-0.5, None]], pa.list_(pa.float64())),
            "top_logprobs": pa.array(
                [[[{"token": "a", "logprob": -0.5}], []]], pa.list_(pa.list_(OLD_ALTERNATIVE))
            ),
            "dropped_later": pa.array(["x"]),
        }
    )
    write_raw(store.root / "responses" / "part-old.parquet", old, **{"kd.schema_version": b"0"})

    connection = connect(store.root)
    rows = dict(
        connection.execute(
            "SELECT request_id, (top_logprobs, prompt_tokens, temperature, token_logprobs, model)"
            " FROM responses"
        ).fetchall()
    )
    top, prompt_tokens, temperature, token_logprobs, model = rows["old-1"]
    assert top == [[{"token": "a", "logprob": -0.5, "bytes": None}], []]
    assert prompt_tokens == 7
    assert temperature == pytest.approx(0.5)
    assert token_logprobs == [-0.5, None]
    assert model is None
    current_top = rows[make_response_row(0)["request_id"]][0]
    assert current_top[0][0]["bytes"] == b" a0_0"


def test_inferred_null_columns_read_as_typed_nulls(store: Store) -> None:
    # pyarrow infers type null for a column that was NULL in every row.
    inferred = pa.Table.from_pylist(
        [{"request_id": "inferred-1", "tokens": None, "top_logprobs": None, "token_bytes": [None]}]
    )
    assert pa.types.is_null(inferred.schema.field("tokens").type)
    write_raw(store.root / "responses" / "part-inferred.parquet", inferred)
    write_current(store, [make_response_row(0)])

    connection = connect(store.root)
    row = connection.execute(
        "SELECT tokens, top_logprobs, token_bytes FROM responses WHERE request_id = 'inferred-1'"
    ).fetchone()
    assert row == (None, None, [None])
    assert connection.execute("SELECT count(*) FROM responses").fetchone()[0] == 2


def test_views_have_current_column_types(store: Store) -> None:
    write_raw(
        store.root / "responses" / "part-old.parquet",
        pa.table({"request_id": ["old-1"], "prompt_tokens": pa.array([1], pa.int64())}),
    )
    connection = connect(store.root)
    types = dict(
        (name, column_type)
        for name, column_type, *_ in connection.execute("DESCRIBE responses").fetchall()
    )
    expected = {
        "request_id": "VARCHAR",
        "prompt_id": "VARCHAR",
        "teacher": "VARCHAR",
        "model": "VARCHAR",
        "prompt": "VARCHAR",
        "response": "VARCHAR",
        "finish_reason": "VARCHAR",
        "prompt_tokens": "INTEGER",
        "completion_tokens": "INTEGER",
        "tokens": "VARCHAR[]",
        "token_logprobs": "FLOAT[]",
        "top_logprobs": "STRUCT(token VARCHAR, logprob FLOAT, bytes BLOB)[][]",
        "run_id": "VARCHAR",
        "created_at": "TIMESTAMP WITH TIME ZONE",
    }
    for name, column_type in expected.items():
        assert types[name] == column_type, name


def test_empty_store_has_all_views(store: Store) -> None:
    connection = connect(store.root)
    for view in ["responses", "failures", "runs", "unresolved_failures"]:
        assert connection.execute(f"SELECT count(*) FROM {view}").fetchone()[0] == 0
    columns = [row[0] for row in connection.execute("DESCRIBE failures").fetchall()]
    assert "error_type" in columns


def test_damaged_and_stray_files_are_skipped(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    write_current(store, [make_response_row(i) for i in range(3)])
    directory = store.root / "responses"
    noise = random.Random(3).randbytes(500)
    assert noise[-4:] != b"PAR1"
    # A writer that died before the footer: the header magic, then page bytes.
    (directory / "part-cut.parquet").write_bytes(b"PAR1" + noise)
    (directory / "part-empty.parquet").write_bytes(b"")
    (directory / ".part-00000.parquet.crc").write_bytes(b"crc bytes")
    (directory / "part-bad-footer.parquet").write_bytes(b"PAR1" + noise + b"\x10\x00\x00\x00PAR1")
    (directory / "part-dir.parquet").mkdir()

    with caplog.at_level(logging.INFO, logger="storage.catalog"):
        connection = connect(store.root)
        assert connection.execute("SELECT count(*) FROM responses").fetchone()[0] == 3
        connect(store.root)

    listing = list_table_files(store.root, "responses")
    assert sorted(e.path.name for e in listing.damaged) == [
        "part-bad-footer.parquet",
        "part-cut.parquet",
        "part-empty.parquet",
    ]
    assert sorted(e.path.name for e in listing.stray) == [".part-00000.parquet.crc", "part-dir.parquet"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, "each damaged file is logged once"
    assert any("PAR1" in message for message in warnings)


def test_file_of_other_table_is_skipped(store: Store) -> None:
    with store.writer("run-a") as writer:
        writer.add_failure(make_failure_row(0))
    (failure_file,) = (store.root / "failures").glob("*.parquet")
    failure_file.rename(store.root / "responses" / failure_file.name)

    listing = list_table_files(store.root, "responses")
    assert [e.path.name for e in listing.damaged] == [failure_file.name]
    assert "'failures' table" in listing.damaged[0].reason


def test_incompatible_column_is_skipped(store: Store) -> None:
    write_raw(
        store.root / "responses" / "part-odd.parquet",
        pa.table({"request_id": ["x"], "tokens": pa.array([1], pa.int64())}),
    )
    listing = list_table_files(store.root, "responses")
    assert "column 'tokens'" in listing.damaged[0].reason
    assert connect(store.root).execute("SELECT count(*) FROM responses").fetchone()[0] == 0


def test_file_named_in_replaces_is_hidden(store: Store) -> None:
    rows = [make_response_row(i) for i in range(2)]
    table = build_responses_table(rows)
    directory = store.root / "responses"
    pq.write_table(table, directory / "part-source.parquet")
    merged = table.replace_schema_metadata(
        {**table.schema.metadata, REPLACES_KEY: json.dumps(["part-source.parquet"]).encode()}
    )
    pq.write_table(merged, directory / "part-merged.parquet")

    connection = connect(store.root)
    assert connection.execute("SELECT count(*) FROM responses").fetchone()[0] == 2
    listing = list_table_files(store.root, "responses")
    assert [f.path.name for f in listing.superseded] == ["part-source.parquet"]


def test_newer_schema_version_is_read(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    table = build_responses_table([make_response_row(0)])
    table = table.append_column("new_column", pa.array(["x"]))
    newer = table.replace_schema_metadata({**table.schema.metadata, SCHEMA_VERSION_KEY: b"99"})
    pq.write_table(newer, store.root / "responses" / "part-newer.parquet")

    with caplog.at_level(logging.WARNING, logger="storage.catalog"):
        connection = connect(store.root)
    assert connection.execute("SELECT count(*) FROM responses").fetchone()[0] == 1
    assert any("schema version 99" in r.getMessage() for r in caplog.records)


def test_unresolved_failures_exclude_answered(store: Store) -> None:
    with store.writer("run-a") as writer:
        writer.add_failure(make_failure_row(0))
        writer.add_failure(make_failure_row(1))
        writer.add_response(make_response_row(1))

    connection = connect(store.root)
    unresolved = connection.execute("SELECT request_id FROM unresolved_failures").fetchall()
    assert unresolved == [(make_failure_row(0)["request_id"],)]


def invalid_line_row(line: int, run_id: str, seconds: int) -> dict:
    return {
        "run_id": run_id,
        "created_at": BASE_TIME + timedelta(seconds=seconds),
        "teacher": None,
        "prompt_source": "prompts.jsonl",
        "prompt_line": line,
        "attempts": 0,
        "error_type": "invalid_prompt",
        "message": f"line {line}: not valid JSON",
        "retryable": False,
    }


def harvest_invalid_lines(store: Store, run_id: str, lines: range, start_s: int) -> None:
    store.write_run(
        {"run_id": run_id, "status": "completed", "prompts_path": "prompts.jsonl",
         "started_at": BASE_TIME + timedelta(seconds=start_s)}
    )
    with store.writer(run_id) as writer:
        for line in lines:
            writer.add_failure(invalid_line_row(line, run_id, start_s + line))


def unresolved_lines(store: Store) -> list[int]:
    connection = connect(store.root)
    rows = connection.execute(
        "SELECT prompt_line FROM unresolved_failures WHERE request_id IS NULL ORDER BY 1"
    ).fetchall()
    return [line for (line,) in rows]


def test_invalid_lines_listed_once_after_reruns(store: Store) -> None:
    harvest_invalid_lines(store, "run-a", range(1, 13), start_s=0)
    harvest_invalid_lines(store, "run-b", range(1, 13), start_s=100)
    assert unresolved_lines(store) == list(range(1, 13))

    # Line 5 was fixed before the third run, so only that run's failures count.
    harvest_invalid_lines(store, "run-c", [n for n in range(1, 13) if n != 5], start_s=200)
    assert unresolved_lines(store) == [n for n in range(1, 13) if n != 5]


def test_invalid_lines_all_fixed_leaves_none(store: Store) -> None:
    harvest_invalid_lines(store, "run-a", range(1, 4), start_s=0)
    harvest_invalid_lines(store, "run-b", range(0), start_s=100)
    assert unresolved_lines(store) == []


def test_connect_requires_store_metadata(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="store.json is missing"):
        connect(tmp_path)


def test_connect_rejects_newer_store(store: Store) -> None:
    metadata = json.loads((store.root / "store.json").read_text())
    metadata["schema_version"] = 99
    (store.root / "store.json").write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match="upgrade"):
        connect(store.root)


def test_read_only_connection_blocks_other_files(store: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    connection = connect(store.root)
    with pytest.raises(duckdb.PermissionException):
        connection.execute(f"SELECT * FROM read_csv('{secret}')").fetchall()
    with pytest.raises(duckdb.Error, match="locked"):
        connection.execute("SET enable_external_access = true")
