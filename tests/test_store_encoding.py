"""Stored form of the logprob columns (schema version 2) and reading it back.

Real Parquet files, real DuckDB views, the real store writer, recovery, check and compact.
Stores holding version 1 files (as the earlier writer wrote them), version 2 files in
each encoding, and a mix of them must read the same logical rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import StoreError
from storage.catalog import connect, list_table_files, select_columns_sql
from storage.encoding import (
    FLOAT32_ENCODING,
    LOGPROB_ENCODING_KEY,
    UINT8_ENCODING,
    LogprobEncoding,
    decode_responses_table,
    encode_logprobs,
    encode_responses_table,
    stored_responses_schema,
)
from storage.journal import ROW_JOURNAL_SUFFIX, RowJournalSegment, journal_path, part_file_name, segment_id
from storage.schema import (
    RESPONSES_SCHEMA,
    SCHEMA_VERSION_KEY,
    TABLE_KIND_KEY,
    LogprobColumns,
    build_responses_table,
    checked_row,
)
from storage.store import Store, parquet_write_options, write_parquet_atomic
from tests.fixtures_store import make_response_row

LOGPROB_COLUMNS = ["tokens", "token_bytes", "token_logprobs", "top_logprobs", "text_offset"]


def edge_logprobs() -> LogprobColumns:
    """Logprobs with every case the encoding treats apart, three alternatives per position."""
    return LogprobColumns(
        tokens=["a", "\\xf0", "é", "b"],
        # Per token: the text's UTF-8, the raw byte of a split character, NULL (none sent), other bytes.
        token_bytes=[b"a", b"\xf0", None, b"B"],
        token_logprobs=[None, -0.3, -40.0, 0.0],
        top_counts=[3, 3, 0, 3],
        top_tokens=["a", "b", "c", "\\xf0", "x", None, "b", "c", "d"],
        top_logprobs=[-0.01, -1.234, None, -0.5, -31.9, -1e-9, 0.0, -2000.0, -math.inf],
        # Positions 0 and 3 send every token's UTF-8, and position 1 a raw byte and two NULLs.
        top_bytes=[b"a", b"b", b"c", b"\xf0", None, None, b"b", b"c", b"d"],
        text_offset=[0, 1, 2, 3],
    )


def edge_row(index: int, logprobs: LogprobColumns | None) -> dict[str, Any]:
    row = make_response_row(index)
    row["logprobs"] = logprobs
    return row


def logical_table(rows: list[dict[str, Any]]) -> pa.Table:
    return build_responses_table([checked_row("responses", row) for row in rows])


def expected_logprob(value: float | None) -> float | None:
    """Return what the uint8 encoding stores for ``value``."""
    if value is None or math.isnan(value) or value <= -1000:
        return None
    return -min(round(-value / UINT8_ENCODING.step), 255) * UINT8_ENCODING.step if value < 0 else 0.0


def view_rows(root: Path) -> dict[str, dict[str, Any]]:
    connection = connect(root)
    try:
        table = connection.sql("SELECT * FROM responses").to_arrow_table()
    finally:
        connection.close()
    assert table.schema.equals(RESPONSES_SCHEMA, check_metadata=False)
    return {row["request_id"]: row for row in table.to_pylist()}


def write_v1_file(path: Path, table: pa.Table) -> None:
    """Write ``table`` as the schema version 1 writer did: logical columns, version 1."""
    metadata = {**table.schema.metadata, SCHEMA_VERSION_KEY: b"1", TABLE_KIND_KEY: b"responses"}
    table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path, **parquet_write_options(table.schema.remove_metadata()))


# --- Encoding in memory ---------------------------------------------------------------


def test_uint8_round_trip_edge_values() -> None:
    logical = logical_table([edge_row(0, edge_logprobs()), edge_row(1, None)])
    stored = encode_responses_table(logical, UINT8_ENCODING)
    assert stored.schema.equals(stored_responses_schema(UINT8_ENCODING), check_metadata=False)
    decoded = decode_responses_table(stored, UINT8_ENCODING).to_pylist()

    original = edge_logprobs()
    row = decoded[0]
    assert row["tokens"] == original.tokens
    assert row["token_bytes"] == original.token_bytes
    assert row["token_logprobs"] == [expected_logprob(v) for v in original.token_logprobs]
    flat = [alternative for position in row["top_logprobs"] for alternative in position]
    assert [a["token"] for a in flat] == original.top_tokens
    assert [a["bytes"] for a in flat] == original.top_bytes
    assert [a["logprob"] for a in flat] == [expected_logprob(v) for v in original.top_logprobs]
    assert [len(position) for position in row["top_logprobs"]] == original.top_counts
    assert decoded[1]["top_logprobs"] is None
    assert decoded[1]["token_logprobs"] is None


def test_uint8_clamps_and_masks() -> None:
    values = pa.array([0.0, 1e-7, -0.0625, -0.0626, -31.875, -31.9, -500.0, -1000.0, -np.inf, np.nan, None], pa.float32())
    codes = encode_logprobs(values, UINT8_ENCODING).to_pylist()
    # Ties round to even (0.0625 is half a step): codes 0 and 1 are both 1/16 nat away.
    assert codes == [0, 0, 0, 1, 255, 255, 255, None, None, None, None]


def test_float32_round_trip_is_exact() -> None:
    logical = logical_table([edge_row(0, edge_logprobs())])
    stored = encode_responses_table(logical, FLOAT32_ENCODING)
    decoded = decode_responses_table(stored, FLOAT32_ENCODING)
    expected = logical.to_pylist()[0]
    actual = decoded.to_pylist()[0]
    for column in LOGPROB_COLUMNS:
        assert actual[column] == expected[column], column


def test_bytes_stored_where_they_differ() -> None:
    stored = encode_responses_table(logical_table([edge_row(0, edge_logprobs())]), UINT8_ENCODING)
    row = stored.to_pylist()[0]
    # The token's UTF-8 is stored as NULL, and unknown bytes (NULL) as the token's UTF-8.
    assert row["token_bytes"] == [None, b"\xf0", "é".encode(), b"B"]
    # Alternatives: "\\xf0" keeps its raw byte, "x" had no bytes, and a NULL token keeps NULL.
    assert [[a["bytes"] for a in position] for position in row["top_logprobs"]] == [
        [None, None, None],
        [b"\xf0", b"x", None],
        [],
        [None, None, None],
    ]


def test_swapped_bytes_in_sql() -> None:
    """Decode by the views' SQL matches the Python decoder on every bytes case."""
    logical = logical_table([edge_row(0, edge_logprobs())])
    stored = encode_responses_table(logical, FLOAT32_ENCODING)
    connection = duckdb.connect()
    try:
        connection.register("stored_table", stored)
        select = ", ".join(select_columns_sql(stored.schema, RESPONSES_SCHEMA, FLOAT32_ENCODING))
        decoded = connection.sql(f"SELECT {select} FROM stored_table").to_arrow_table().to_pylist()[0]
    finally:
        connection.close()
    expected = logical.to_pylist()[0]
    for column in LOGPROB_COLUMNS:
        assert decoded[column] == expected[column], column


def test_misaligned_token_bytes_rejected() -> None:
    logical = logical_table([edge_row(0, edge_logprobs())])
    position = logical.schema.get_field_index("token_bytes")
    shorter = pa.array([[b"a"]], pa.list_(pa.binary()))
    misaligned = logical.set_column(position, logical.schema.field(position), shorter)
    with pytest.raises(ValueError, match="differ in length"):
        encode_responses_table(misaligned, UINT8_ENCODING)


def test_encoding_metadata_parses() -> None:
    assert LogprobEncoding.from_metadata(UINT8_ENCODING.to_metadata()) == UINT8_ENCODING
    assert LogprobEncoding.from_metadata(FLOAT32_ENCODING.to_metadata()) == FLOAT32_ENCODING
    for raw in (b"not json", b"[]", b'{"name": "int4"}', b'{"name": "uint8"}', b'{"name": "uint8", "step": true}'):
        with pytest.raises(ValueError):
            LogprobEncoding.from_metadata(raw)


# --- Stores ---------------------------------------------------------------------------


def test_writer_stores_uint8_by_default(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with store.writer("run-a") as writer:
        writer.add_response(edge_row(0, edge_logprobs()))
        writer.add_response(edge_row(1, None))
    (path,) = (store.root / "responses").glob("*.parquet")
    assert pq.ParquetFile(path).metadata.metadata[LOGPROB_ENCODING_KEY] == UINT8_ENCODING.to_metadata()

    rows = view_rows(store.root)
    expected = decode_responses_table(
        encode_responses_table(logical_table([edge_row(0, edge_logprobs())]), UINT8_ENCODING), UINT8_ENCODING
    ).to_pylist()[0]
    actual = rows[expected["request_id"]]
    for column in LOGPROB_COLUMNS:
        assert actual[column] == expected[column], column


def test_store_setting_float32_is_lossless(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.set_logprob_encoding("float32")
    assert json.loads((store.root / "store.json").read_text())["logprob_encoding"] == "float32"
    reopened = Store(store.root, create=False)
    assert reopened.logprob_encoding == FLOAT32_ENCODING
    with reopened.writer("run-a") as writer:
        writer.add_response(edge_row(0, edge_logprobs()))

    expected = logical_table([edge_row(0, edge_logprobs())]).to_pylist()[0]
    actual = view_rows(store.root)[expected["request_id"]]
    for column in LOGPROB_COLUMNS:
        assert actual[column] == expected[column], column


def test_store_setting_rejects_unknown(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(ValueError, match="float32"):
        store.set_logprob_encoding("float8")
    metadata = json.loads((store.root / "store.json").read_text())
    metadata["logprob_encoding"] = "float8"
    (store.root / "store.json").write_text(json.dumps(metadata))
    with pytest.raises(StoreError, match="logprob_encoding 'float8' is invalid"):
        Store(store.root, create=False)


def test_version_1_store_is_migrated(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    metadata = json.loads((store.root / "store.json").read_text())
    metadata["schema_version"] = 1
    metadata["migrations"] = metadata["migrations"][:1]
    (store.root / "store.json").write_text(json.dumps(metadata))

    Store(store.root, create=False)
    migrated = json.loads((store.root / "store.json").read_text())
    assert migrated["schema_version"] == 2
    assert [step["name"] for step in migrated["migrations"]] == ["0001_create_layout", "0002_logprob_encoding"]


@pytest.fixture
def mixed_store(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """A store with a version 1 file, a uint8 file and a float32 file; returns the expected rows."""
    store = Store(tmp_path / "store")
    directory = store.root / "responses"
    expected: dict[str, dict[str, Any]] = {}

    v1_rows = [edge_row(0, edge_logprobs()), make_response_row(1), edge_row(2, None)]
    v1_table = logical_table(v1_rows)
    write_v1_file(directory / "part-v1.parquet", v1_table)
    expected.update({row["request_id"]: row for row in v1_table.to_pylist()})

    uint8_table = logical_table([edge_row(10, edge_logprobs()), make_response_row(11)])
    write_parquet_atomic(uint8_table, directory / "part-uint8.parquet", logprob_encoding=UINT8_ENCODING)
    decoded = decode_responses_table(encode_responses_table(uint8_table, UINT8_ENCODING), UINT8_ENCODING)
    expected.update({row["request_id"]: row for row in decoded.to_pylist()})

    float32_table = logical_table([edge_row(20, edge_logprobs()), make_response_row(21, bytes_missing=True)])
    write_parquet_atomic(float32_table, directory / "part-float32.parquet", logprob_encoding=FLOAT32_ENCODING)
    expected.update({row["request_id"]: row for row in float32_table.to_pylist()})
    return store.root, expected


def assert_rows_equal(actual: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert sorted(actual) == sorted(expected)
    for request_id, row in expected.items():
        for column in LOGPROB_COLUMNS + ["finish_reason", "response"]:
            assert actual[request_id][column] == row[column], (request_id, column)


def test_mixed_store_reads_every_file(mixed_store: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    root, expected = mixed_store
    listing = list_table_files(root, "responses")
    assert listing.damaged == []
    assert {f.logprob_encoding for f in listing.files} == {None, UINT8_ENCODING, FLOAT32_ENCODING}
    assert_rows_equal(view_rows(root), expected)


def test_mixed_store_check_and_compact(mixed_store: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    root, expected = mixed_store
    runner = CliRunner()
    checked = runner.invoke(cli, ["check", "--store", str(root), "--deep"])
    assert checked.exit_code == 0, checked.output

    compacted = runner.invoke(cli, ["compact", "--store", str(root)])
    assert compacted.exit_code == 0, compacted.output
    assert len(list((root / "responses").glob("*.parquet"))) == 1
    assert_rows_equal(view_rows(root), expected)

    again = runner.invoke(cli, ["check", "--store", str(root), "--deep"])
    assert again.exit_code == 0, again.output


def test_recover_encodes_journaled_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.set_logprob_encoding("uint8")
    segment = segment_id("run-crashed", "00000000", 0)
    path = journal_path(store.root / "journal", segment, "responses", suffix=ROW_JOURNAL_SUFFIX)
    journal = RowJournalSegment(path, "responses")
    rows = [edge_row(0, edge_logprobs()), make_response_row(1)]
    for row in rows:
        journal.append(checked_row("responses", row))
    journal.close()

    report = store.recover()
    assert report.responses_recovered == 2
    part = store.root / "responses" / part_file_name(segment)
    assert pq.ParquetFile(part).metadata.metadata[LOGPROB_ENCODING_KEY] == UINT8_ENCODING.to_metadata()
    decoded = decode_responses_table(encode_responses_table(logical_table(rows), UINT8_ENCODING), UINT8_ENCODING)
    assert_rows_equal(view_rows(store.root), {row["request_id"]: row for row in decoded.to_pylist()})


def test_codes_without_metadata_are_skipped(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    stored = encode_responses_table(logical_table([make_response_row(0)]), UINT8_ENCODING)
    metadata = dict(stored.schema.metadata)
    del metadata[LOGPROB_ENCODING_KEY]
    pq.write_table(stored.replace_schema_metadata(metadata), store.root / "responses" / "part-bare.parquet")

    listing = list_table_files(store.root, "responses")
    assert listing.files == []
    (damaged,) = listing.damaged
    assert "kd.logprob_encoding" in damaged.reason


def test_encoding_type_mismatch_is_skipped(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    stored = encode_responses_table(logical_table([make_response_row(0)]), FLOAT32_ENCODING)
    metadata = {**stored.schema.metadata, LOGPROB_ENCODING_KEY: UINT8_ENCODING.to_metadata()}
    pq.write_table(stored.replace_schema_metadata(metadata), store.root / "responses" / "part-float.parquet")

    (damaged,) = list_table_files(store.root, "responses").damaged
    assert "stores float values" in damaged.reason


def test_unknown_encoding_is_skipped(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    stored = encode_responses_table(logical_table([make_response_row(0)]), UINT8_ENCODING)
    metadata = {**stored.schema.metadata, LOGPROB_ENCODING_KEY: b'{"name": "int4", "step": 0.5}'}
    pq.write_table(stored.replace_schema_metadata(metadata), store.root / "responses" / "part-new.parquet")

    (damaged,) = list_table_files(store.root, "responses").damaged
    assert "upgrade" in damaged.reason


def test_scalar_queries_skip_logprob_columns(mixed_store: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    root, _ = mixed_store
    connection = connect(root)
    try:
        for query in (
            "SELECT teacher, count(*) FROM responses GROUP BY teacher",
            "SELECT request_id, completion_tokens FROM responses WHERE finish_reason = 'length'",
        ):
            plan = "\n".join(row[1] for row in connection.execute(f"EXPLAIN {query}").fetchall())
            assert "Projections:" in plan, plan
            for column in ("top_logprobs", "token_logprobs", "token_bytes"):
                assert column not in plan, (query, column)
    finally:
        connection.close()


def test_harvest_flag_sets_lossless_encoding(tmp_path: Path) -> None:
    from tests.fault_server import FaultServer, expected_response
    from tests.fixtures_harvest import write_prompts

    store = tmp_path / "store"
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    args = ["harvest", str(prompts), "--store", str(store), "--model", "fault-model", "--max-tokens", "32",
            "--temperature", "0", "--top-logprobs", "5", "--no-progress", "--compact", "off"]

    with FaultServer() as server:
        result = CliRunner().invoke(cli, [*args, "--base-url", server.base_url, "--logprob-encoding", "float32"])
        assert result.exit_code == 0, result.output
        bad = CliRunner().invoke(cli, [*args, "--base-url", server.base_url, "--logprob-encoding", "float16"])

    assert bad.exit_code == 2
    assert "float16" in bad.output
    assert json.loads((store / "store.json").read_text())["logprob_encoding"] == "float32"
    (stored,) = list_table_files(store, "responses").files
    assert stored.logprob_encoding == FLOAT32_ENCODING
    with connect(store) as connection:
        prompt, logprobs = connection.execute("SELECT prompt, token_logprobs FROM responses LIMIT 1").fetchone()
    body = {"model": "fault-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
            "temperature": 0.0, "logprobs": True, "top_logprobs": 5}
    sent = [entry["logprob"] for entry in expected_response(body, "chat")["choices"][0]["logprobs"]["content"]]
    assert logprobs == [float(np.float32(value)) for value in sent]
