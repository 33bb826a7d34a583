"""StoreWriter and Store.write_run: real Parquet files read back through DuckDB."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import StoreError
from storage.catalog import connect
from storage.encoding import DEFAULT_LOGPROB_ENCODING, LOGPROB_ENCODING_KEY, stored_responses_schema
from storage.journal import list_journals, read_journal
from storage.schema import (
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    TABLE_SCHEMAS,
    LogprobColumns,
    build_responses_table,
    validate_table,
)
from storage.store import MIGRATIONS, Store, partial_path
from tests.fixtures_store import make_failure_row, make_response_row


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def parquet_files(store: Store, table: str) -> list[Path]:
    return sorted((store.root / table).glob("*.parquet"))


def test_writer_round_trip_through_views(store: Store) -> None:
    with store.writer("run-a", batch_rows=4) as writer:
        for index in range(10):
            writer.add_response(make_response_row(index, run_id="run-a"))
        writer.add_failure(make_failure_row(99, run_id="run-a"))

    assert writer.responses_written == 10
    assert writer.failures_written == 1
    connection = connect(store.root)
    assert connection.execute("SELECT count(*) FROM responses").fetchone()[0] == 10
    assert connection.execute("SELECT count(*) FROM failures").fetchone()[0] == 1
    row = connection.execute(
        "SELECT prompt_id, tokens, token_logprobs, top_logprobs[2][1], finish_reason"
        " FROM responses WHERE prompt_id = 'p3'"
    ).fetchone()
    assert row[0] == "p3"
    assert row[1] == [" w0", " w1", " w2", " w3"]
    assert row[2][0] is None
    # The default encoding stores logprobs in steps of 1/8 nat, so each moves by <= 1/16.
    assert row[2][1] == pytest.approx(-0.25, abs=1 / 16)
    assert row[3] == {"token": " a1_0", "logprob": pytest.approx(-0.8, abs=1 / 16), "bytes": b" a1_0"}
    assert row[4] == "length"


def test_writer_files_have_version_and_zstd(store: Store) -> None:
    with store.writer("run-a", batch_rows=100) as writer:
        writer.add_response(make_response_row(0))

    (path,) = parquet_files(store, "responses")
    parquet_file = pq.ParquetFile(path)
    assert parquet_file.metadata.metadata[SCHEMA_VERSION_KEY] == str(SCHEMA_VERSION).encode()
    assert parquet_file.metadata.row_group(0).column(0).compression == "ZSTD"
    stored = stored_responses_schema(DEFAULT_LOGPROB_ENCODING)
    assert parquet_file.schema_arrow.equals(stored, check_metadata=False)
    assert parquet_file.metadata.metadata[LOGPROB_ENCODING_KEY] == DEFAULT_LOGPROB_ENCODING.to_metadata()


def test_writer_commits_every_batch_rows(store: Store) -> None:
    writer = store.writer("run-a", batch_rows=3, batch_seconds=3600)
    for index in range(7):
        writer.add_response(make_response_row(index))

    assert len(parquet_files(store, "responses")) == 2
    assert writer.pending_rows == 1
    assert len(list_journals(store.root / "journal")) == 1
    writer.close()
    assert len(parquet_files(store, "responses")) == 3
    assert list_journals(store.root / "journal") == []


def test_writer_commits_after_batch_seconds(store: Store) -> None:
    with store.writer("run-a", batch_rows=1000, batch_seconds=0.05) as writer:
        writer.add_response(make_response_row(0))
        assert parquet_files(store, "responses") == []
        time.sleep(0.1)
        writer.add_response(make_response_row(1))
        assert len(parquet_files(store, "responses")) == 1


def test_added_row_is_in_journal_before_flush(store: Store) -> None:
    writer = store.writer("run-a", batch_rows=1000)
    row = make_response_row(5)
    writer.add_response(row)

    (journal,) = list_journals(store.root / "journal")
    contents = read_journal(journal.path)
    assert contents.torn_tail is False
    assert contents.table.column("request_id").to_pylist() == [row["request_id"]]
    assert parquet_files(store, "responses") == []
    writer.close()


def test_nested_nulls_round_trip(store: Store) -> None:
    # Teachers may send "bytes": null; positions may have no alternatives; logprobs
    # may be missing entirely. All of it must write and read back unchanged.
    sparse = LogprobColumns(
        tokens=["a", "b"],
        token_bytes=[None, b"b"],
        token_logprobs=[None, -0.5],
        top_counts=[0, 2],
        top_tokens=["b", None],
        top_logprobs=[-0.5, None],
        top_bytes=[None, None],
        text_offset=None,
    )
    rows = [
        make_response_row(0, bytes_missing=True),
        {**make_response_row(1), "logprobs": sparse},
        make_response_row(2, with_logprobs=False),
    ]
    with store.writer("run-a") as writer:
        for row in rows:
            writer.add_response(row)

    connection = connect(store.root)
    result = dict(
        (prompt_id, (token_bytes, top, text_offset))
        for prompt_id, token_bytes, top, text_offset in connection.execute(
            "SELECT prompt_id, token_bytes, top_logprobs, text_offset FROM responses"
        ).fetchall()
    )
    assert result["p0"][0] == [None, None, None, None]
    assert all(alt["bytes"] is None for position in result["p0"][1] for alt in position)
    assert result["p1"][0] == [None, b"b"]
    assert result["p1"][1] == [
        [],
        [
            {"token": "b", "logprob": -0.5, "bytes": None},
            {"token": None, "logprob": None, "bytes": None},
        ],
    ]
    assert result["p1"][2] is None
    assert result["p2"] == (None, None, None)


def test_validate_rejects_non_nullable_nested_field() -> None:
    # list<list<struct<token not null>>> with a NULL token: Parquet writes it and the
    # read fails later with an offsets error, so the store rejects it before writing.
    strict = pa.struct(
        [
            pa.field("token", pa.string(), nullable=False),
            pa.field("logprob", pa.float32()),
            pa.field("bytes", pa.binary()),
        ]
    )
    column = pa.array(
        [[[{"token": None, "logprob": -1.0, "bytes": None}]]], type=pa.list_(pa.list_(strict))
    )
    good = build_responses_table([make_response_row(0, with_logprobs=False)])
    index = good.schema.get_field_index("top_logprobs")
    bad = good.set_column(index, "top_logprobs", column)

    with pytest.raises(ValueError, match="column 'top_logprobs' is"):
        validate_table(bad, "responses")


def test_validate_rejects_inferred_null_column() -> None:
    good = build_responses_table([make_response_row(0, with_logprobs=False)])
    inferred = pa.Table.from_pylist(good.to_pylist())
    assert pa.types.is_null(inferred.schema.field("tokens").type)
    with pytest.raises(ValueError, match="'tokens' is null"):
        validate_table(inferred, "responses")


def test_schemas_have_only_nullable_fields() -> None:
    def walk(schema_field: pa.Field, path: str) -> None:
        assert schema_field.nullable, f"{path} is not nullable"
        field_type = schema_field.type
        if pa.types.is_struct(field_type):
            for child in field_type:
                walk(child, f"{path}.{child.name}")
        elif pa.types.is_list(field_type):
            walk(field_type.value_field, f"{path}[]")
        assert not pa.types.is_null(field_type), f"{path} has type null"

    for kind, schema in TABLE_SCHEMAS.items():
        for schema_field in schema:
            walk(schema_field, f"{kind}.{schema_field.name}")


def test_invalid_row_is_rejected_before_journal(store: Store) -> None:
    with store.writer("run-a") as writer:
        with pytest.raises(ValueError, match="request_id"):
            writer.add_response({**make_response_row(0), "request_id": None})
        with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
            writer.add_response({**make_response_row(1), "prompt_tokens": "five"})
        assert writer.responses_written == 0
        assert list_journals(store.root / "journal") == []


def test_repeated_request_id_is_skipped(store: Store) -> None:
    with store.writer("run-a") as writer:
        writer.add_response(make_response_row(0))
        writer.add_response(make_response_row(0))
    assert writer.responses_written == 1
    assert connect(store.root).execute("SELECT count(*) FROM responses").fetchone()[0] == 1


def test_write_run_replaces_status(store: Store) -> None:
    store.write_run({"run_id": "run-a", "status": "started", "requests": 3})
    store.write_run({"run_id": "run-a", "status": "completed", "requests": 3, "responses": 3})

    assert [p.name for p in parquet_files(store, "runs")] == ["run-a.parquet"]
    rows = connect(store.root).execute("SELECT status, responses FROM runs").fetchall()
    assert rows == [("completed", 3)]
    assert list((store.root / "runs").iterdir()) == [store.root / "runs" / "run-a.parquet"]


def test_partial_name_never_matches_parquet_glob(tmp_path: Path) -> None:
    partial = partial_path(tmp_path / "part-run-a-0001.parquet")
    partial.write_bytes(b"PAR1")
    assert partial.name == ".part-run-a-0001.parquet.tmp"
    assert list(tmp_path.glob("*.parquet")) == []


def test_writer_rejects_unsafe_run_id(store: Store) -> None:
    for run_id in ["../escape", ".hidden", "a/b", ""]:
        with pytest.raises(ValueError, match="invalid run_id"):
            store.writer(run_id)


def test_closed_writer_rejects_rows(store: Store) -> None:
    writer = store.writer("run-a")
    writer.close()
    writer.close()
    with pytest.raises(StoreError, match="closed"):
        writer.add_response(make_response_row(0))


def test_store_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not empty"):
        Store(tmp_path)


def test_store_records_migrations(store: Store) -> None:
    import json

    metadata = json.loads((store.root / "store.json").read_text())
    assert metadata["schema_version"] == SCHEMA_VERSION
    assert [step["name"] for step in metadata["migrations"]] == [m.name for m in MIGRATIONS]
    for name in ["responses", "failures", "runs", "journal", "quarantine"]:
        assert (store.root / name).is_dir()
    Store(store.root, create=False)


def test_store_without_metadata_is_not_opened(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="store.json is missing"):
        Store(tmp_path / "missing", create=False)


def test_null_check_walks_nested_fields() -> None:
    from storage.schema import _check_not_null

    strict = pa.struct([pa.field("token", pa.string(), nullable=False)])
    schema_field = pa.field("top", pa.list_(strict))
    bad = pa.array([[{"token": "a"}, {"token": None}]], type=pa.list_(strict))
    with pytest.raises(ValueError, match="'top\\[\\].token' is not nullable"):
        _check_not_null(bad, schema_field, "top")

    # A NULL struct may have NULL children: the alternative itself is absent.
    absent = pa.array([[{"token": "a"}, None], None], type=pa.list_(strict))
    _check_not_null(absent, schema_field, "top")
