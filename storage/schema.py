"""Versioned Arrow schemas of the store, and the builders that turn rows into tables.

Every Parquet file is written with one of the explicit schemas below, never with a
schema inferred from the rows: inference turns an always-null list column into
type ``null`` and makes files disagree with each other. Every field is nullable,
including nested ones that a teacher may omit (``bytes``), so a teacher that leaves a
field out produces a NULL, not a write that succeeds and a read that fails.

Token-level logprob data is passed around in columnar form (:class:`LogprobColumns`):
flat Python lists plus per-position counts. Building one Python object per top-k
alternative is the slowest part of harvesting at 20 alternatives per token, so the
parser fills flat lists and :func:`build_responses_table` turns them into nested Arrow
lists with offsets, without a dict per alternative.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 2
"""Version written into every file's metadata under ``kd.schema_version``.

Version 2 changed only how responses files store the logprob columns (quantised
logprobs, token bytes left out where they equal the token's UTF-8; see
:mod:`storage.encoding`). The logical schemas below, which writers build and readers
see, are the same as in version 1.
"""

SCHEMA_VERSION_KEY = b"kd.schema_version"
TABLE_KIND_KEY = b"kd.table"

# Logprobs at or below this value are "masked": servers send -9999, -1e30 or -inf for
# tokens that constrained decoding or a vocabulary mask excluded. They are stored as
# NULL, so they never count as probability mass and never turn into NaN in arithmetic.
MASKED_LOGPROB_THRESHOLD = -1000.0

ALTERNATIVE_TYPE = pa.struct(
    [
        pa.field("token", pa.string()),
        pa.field("logprob", pa.float32()),
        pa.field("bytes", pa.binary()),
    ]
)

_REQUEST_FIELDS = [
    pa.field("request_id", pa.string()),
    pa.field("run_id", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
    pa.field("teacher", pa.string()),
    pa.field("base_url", pa.string()),
    pa.field("model", pa.string()),
    pa.field("endpoint", pa.string()),
    pa.field("prompt_id", pa.string()),
    pa.field("prompt_source", pa.string()),
    pa.field("prompt_line", pa.int64()),
    pa.field("prompt", pa.string()),
    pa.field("messages", pa.string()),
    pa.field("sample_index", pa.int32()),
    pa.field("params", pa.string()),
    pa.field("max_tokens", pa.int32()),
    pa.field("temperature", pa.float32()),
    pa.field("top_logprobs_requested", pa.int32()),
    pa.field("attempts", pa.int32()),
]

RESPONSES_SCHEMA = pa.schema(
    _REQUEST_FIELDS
    + [
        pa.field("response_model", pa.string()),
        pa.field("response", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("latency_ms", pa.float32()),
        pa.field("logprobs_format", pa.string()),
        pa.field("tokens", pa.list_(pa.string())),
        pa.field("token_bytes", pa.list_(pa.binary())),
        pa.field("token_logprobs", pa.list_(pa.float32())),
        pa.field("top_logprobs", pa.list_(pa.list_(ALTERNATIVE_TYPE))),
        pa.field("text_offset", pa.list_(pa.int32())),
        pa.field("logprobs_lossy", pa.bool_()),
        pa.field("token_bytes_match", pa.bool_()),
        pa.field("token_level_ok", pa.bool_()),
        pa.field("logprobs_note", pa.string()),
    ]
)

FAILURES_SCHEMA = pa.schema(
    _REQUEST_FIELDS
    + [
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("retryable", pa.bool_()),
    ]
)

RUNS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("prompts_path", pa.string()),
        pa.field("teachers", pa.string()),
        pa.field("config", pa.string()),
        pa.field("prompts_read", pa.int64()),
        pa.field("invalid_lines", pa.int64()),
        pa.field("blank_lines", pa.int64()),
        pa.field("requests", pa.int64()),
        pa.field("sent", pa.int64()),
        pa.field("cached", pa.int64()),
        pa.field("skipped_stored", pa.int64()),
        pa.field("responses", pa.int64()),
        pa.field("failed", pa.int64()),
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("wall_s", pa.float64()),
        pa.field("hostname", pa.string()),
        pa.field("version", pa.string()),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "responses": RESPONSES_SCHEMA,
    "failures": FAILURES_SCHEMA,
    "runs": RUNS_SCHEMA,
}

_LOGPROB_COLUMNS = frozenset(
    {"tokens", "token_bytes", "token_logprobs", "top_logprobs", "text_offset"}
)


@dataclass(slots=True)
class LogprobColumns:
    """Token-level logprobs of one response, in flat columnar form.

    ``token_logprobs[i]`` is ``None`` where the teacher masked the token or gave no
    conditional probability (the first token of an echoed prompt); positions are
    never dropped, so index ``i`` always refers to ``tokens[i]``. ``top_counts[i]`` is
    how many alternatives position ``i`` has; the flat ``top_*`` lists hold them all in
    order. A position may have fewer alternatives than requested, or none.
    """

    tokens: list[str] = field(default_factory=list)
    token_bytes: list[bytes | None] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_counts: list[int] = field(default_factory=list)
    top_tokens: list[str | None] = field(default_factory=list)
    top_logprobs: list[float | None] = field(default_factory=list)
    top_bytes: list[bytes | None] = field(default_factory=list)
    text_offset: list[int] | None = None
    element_types_checked: bool = field(default=False, compare=False)
    """Set by the response parser, whose lists hold only the types the schema stores,
    so :func:`checked_row` skips scanning the type of every element."""

    def __len__(self) -> int:
        return len(self.tokens)

    def validate(self) -> None:
        """Raise ``ValueError`` when the parallel lists disagree in length."""
        n = len(self.tokens)
        for name in ("token_bytes", "token_logprobs", "top_counts"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"logprobs {name} has {len(getattr(self, name))} entries for {n} tokens"
                )
        total = sum(self.top_counts)
        for name in ("top_tokens", "top_logprobs", "top_bytes"):
            if len(getattr(self, name)) != total:
                raise ValueError(
                    f"logprobs {name} has {len(getattr(self, name))} entries,"
                    f" expected {total} from top_counts"
                )
        if self.text_offset is not None and len(self.text_offset) != n:
            raise ValueError(
                f"logprobs text_offset has {len(self.text_offset)} entries for {n} tokens"
            )

    def alternatives(self, position: int) -> list[tuple[str | None, float | None, bytes | None]]:
        """Return the alternatives at one position as (token, logprob, bytes) tuples."""
        start = sum(self.top_counts[:position])
        stop = start + self.top_counts[position]
        return list(
            zip(
                self.top_tokens[start:stop],
                self.top_logprobs[start:stop],
                self.top_bytes[start:stop],
            )
        )


def _offsets(counts: Iterable[int]) -> pa.Array:
    offsets = [0]
    total = 0
    for count in counts:
        total += count
        offsets.append(total)
    return pa.array(offsets, type=pa.int32())


def _logprob_arrays(columns: Sequence[LogprobColumns | None]) -> dict[str, pa.Array]:
    """Build the nested list arrays of the logprob columns for a batch of rows."""
    tokens: list[str] = []
    token_bytes: list[bytes | None] = []
    token_logprobs: list[float | None] = []
    top_counts: list[int] = []
    top_tokens: list[str | None] = []
    top_logprobs: list[float | None] = []
    top_bytes: list[bytes | None] = []
    row_lengths: list[int] = []
    offsets_rows: list[list[int] | None] = []
    present: list[bool] = []

    for data in columns:
        if data is None:
            row_lengths.append(0)
            offsets_rows.append(None)
            present.append(False)
            continue
        present.append(True)
        row_lengths.append(len(data.tokens))
        tokens.extend(data.tokens)
        token_bytes.extend(data.token_bytes)
        token_logprobs.extend(data.token_logprobs)
        top_counts.extend(data.top_counts)
        top_tokens.extend(data.top_tokens)
        top_logprobs.extend(data.top_logprobs)
        top_bytes.extend(data.top_bytes)
        offsets_rows.append(data.text_offset)

    row_offsets = _offsets(row_lengths)
    mask = pa.array([not p for p in present], type=pa.bool_())

    def outer(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(row_offsets, values, mask=mask)

    alternatives = pa.StructArray.from_arrays(
        [
            pa.array(top_tokens, type=pa.string()),
            pa.array(top_logprobs, type=pa.float32()),
            pa.array(top_bytes, type=pa.binary()),
        ],
        fields=list(ALTERNATIVE_TYPE),
    )
    per_position = pa.ListArray.from_arrays(_offsets(top_counts), alternatives)
    return {
        "tokens": outer(pa.array(tokens, type=pa.string())),
        "token_bytes": outer(pa.array(token_bytes, type=pa.binary())),
        "token_logprobs": outer(pa.array(token_logprobs, type=pa.float32())),
        "top_logprobs": outer(per_position),
        "text_offset": pa.array(offsets_rows, type=pa.list_(pa.int32())),
    }


def build_responses_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Build a table in :data:`RESPONSES_SCHEMA` from response rows.

    Each row is a dict of the scalar columns plus ``"logprobs"``: a
    :class:`LogprobColumns` or ``None``. Missing scalar keys become NULL.
    """
    logprob_arrays = _logprob_arrays([row.get("logprobs") for row in rows])
    arrays = []
    for schema_field in RESPONSES_SCHEMA:
        if schema_field.name in _LOGPROB_COLUMNS:
            arrays.append(logprob_arrays[schema_field.name])
        else:
            values = [row.get(schema_field.name) for row in rows]
            arrays.append(pa.array(values, type=schema_field.type))
    table = pa.Table.from_arrays(arrays, schema=RESPONSES_SCHEMA)
    return with_table_metadata(table, "responses")


_INT_RANGES = {pa.int32(): (-(2**31), 2**31 - 1), pa.int64(): (-(2**63), 2**63 - 1)}
_FLOAT_TYPES = (pa.float32(), pa.float64())
# Element types the logprob lists accept, besides None where the column allows it.
_LOGPROB_ELEMENT_TYPES = {
    "tokens": {str},
    "token_bytes": {bytes, type(None)},
    "token_logprobs": {float, int, type(None)},
    "top_counts": {int},
    "top_tokens": {str, type(None)},
    "top_logprobs": {float, int, type(None)},
    "top_bytes": {bytes, type(None)},
}


def checked_row(kind: str, row: dict[str, Any]) -> dict[str, Any]:
    """Return the columns of ``row`` that ``kind``'s table stores, as plain Python values.

    Raises ``ValueError`` or ``TypeError`` for a value that :func:`build_table` would
    reject: a wrong type, an integer out of range, logprob lists of unequal length.
    A row can so be checked when it arrives and its table built later, with others.
    Values of other types that Arrow converts (say, numpy scalars) are converted here.
    """
    checked: dict[str, Any] = {}
    for schema_field in TABLE_SCHEMAS[kind]:
        name = schema_field.name
        if name in _LOGPROB_COLUMNS and kind == "responses":
            continue
        checked[name] = _checked_scalar(row.get(name), schema_field)
    if kind == "responses":
        logprobs = row.get("logprobs")
        if logprobs is not None:
            _check_logprobs(logprobs)
        checked["logprobs"] = logprobs
    return checked


def _checked_scalar(value: Any, schema_field: pa.Field) -> Any:
    value_type = type(value)
    field_type = schema_field.type
    if value is None:
        return None
    if value_type is str and field_type == pa.string():
        return value
    if value_type is bool and field_type == pa.bool_():
        return value
    if value_type is int and field_type in _INT_RANGES:
        low, high = _INT_RANGES[field_type]
        if not low <= value <= high:
            raise ValueError(f"column {schema_field.name}: {value} is out of range for {field_type}")
        return value
    if value_type in (float, int) and field_type in _FLOAT_TYPES:
        return value
    if isinstance(value, datetime) and pa.types.is_timestamp(field_type):
        return value
    # Anything else goes through Arrow's own conversion, which raises ArrowInvalid
    # (a ValueError) or ArrowTypeError (a TypeError) where build_table would.
    return pa.scalar(value, type=field_type).as_py()


def _check_logprobs(logprobs: LogprobColumns) -> None:
    logprobs.validate()
    for name, allowed in () if logprobs.element_types_checked else _LOGPROB_ELEMENT_TYPES.items():
        found = set(map(type, getattr(logprobs, name)))
        if not found <= allowed:
            names = ", ".join(sorted(t.__name__ for t in found - allowed))
            raise TypeError(f"logprobs {name} contains values of type {names}")
    for name in ("top_counts", "text_offset"):
        values = getattr(logprobs, name)
        if values is None:
            continue
        if name == "text_offset" and not set(map(type, values)) <= {int, type(None)}:
            raise TypeError("logprobs text_offset must contain integers")
        numbers = [value for value in values if value is not None]
        if numbers and not (-(2**31) <= min(numbers) and max(numbers) < 2**31):
            raise ValueError(f"logprobs {name} has a value out of range for int32")


def build_table(kind: str, rows: Sequence[dict[str, Any]]) -> pa.Table:
    """Build a table of ``kind`` (``responses``, ``failures`` or ``runs``) from dict rows."""
    if kind == "responses":
        return build_responses_table(rows)
    schema = TABLE_SCHEMAS[kind]
    arrays = [
        pa.array([row.get(f.name) for row in rows], type=f.type) for f in schema
    ]
    table = pa.Table.from_arrays(arrays, schema=schema)
    return with_table_metadata(table, kind)


def with_table_metadata(table: pa.Table, kind: str) -> pa.Table:
    """Attach the schema version and table kind to a table's schema metadata."""
    metadata = dict(table.schema.metadata or {})
    metadata[SCHEMA_VERSION_KEY] = str(SCHEMA_VERSION).encode()
    metadata[TABLE_KIND_KEY] = kind.encode()
    return table.replace_schema_metadata(metadata)


def validate_table(table: pa.Table, kind: str) -> None:
    """Raise ``ValueError`` unless ``table`` can be written as a ``kind`` table file.

    The schema must be exactly ``TABLE_SCHEMAS[kind]``: names, types and nullability,
    nested fields included, with metadata ignored. The arrays must be internally
    consistent, and no non-nullable field, nested or not, may contain a NULL. Run it
    before every write, because Parquet accepts a NULL under a non-nullable nested
    field and the file then fails on read with an unrelated offsets error.
    """
    expected = TABLE_SCHEMAS[kind]
    if not table.schema.equals(expected, check_metadata=False):
        difference = _schema_diff(table.schema, expected)
        raise ValueError(f"{kind} table does not match the store schema: {difference}")
    table.validate(full=True)
    for index in _columns_with_non_nullable(kind):
        schema_field = table.schema.field(index)
        for chunk in table.column(index).chunks:
            _check_not_null(chunk, schema_field, schema_field.name)


@functools.cache
def _columns_with_non_nullable(kind: str) -> tuple[int, ...]:
    """Return the indices of ``kind``'s columns that contain a non-nullable field."""
    schema = TABLE_SCHEMAS[kind]
    return tuple(i for i, schema_field in enumerate(schema) if _has_non_nullable(schema_field))


def _has_non_nullable(schema_field: pa.Field) -> bool:
    """Return whether a field or any field nested in it is non-nullable."""
    if not schema_field.nullable:
        return True
    field_type = schema_field.type
    if pa.types.is_struct(field_type):
        return any(_has_non_nullable(child) for child in field_type)
    if pa.types.is_list(field_type) or pa.types.is_large_list(field_type):
        return _has_non_nullable(field_type.value_field)
    return False


def _schema_diff(actual: pa.Schema, expected: pa.Schema) -> str:
    problems = []
    for expected_field in expected:
        index = actual.get_field_index(expected_field.name)
        if index < 0:
            problems.append(f"column {expected_field.name!r} is missing")
            continue
        actual_field = actual.field(index)
        if not actual_field.equals(expected_field):
            problems.append(
                f"column {expected_field.name!r} is {actual_field.type}"
                f"{'' if actual_field.nullable else ' not null'}, expected {expected_field.type}"
            )
    extra = [name for name in actual.names if expected.get_field_index(name) < 0]
    if extra:
        problems.append(f"unexpected columns {extra}")
    if not problems and actual.names != expected.names:
        problems.append(f"columns are in the order {actual.names}, expected {expected.names}")
    return "; ".join(problems) or "nested field nullability differs"


def _check_not_null(array: pa.Array, schema_field: pa.Field, path: str) -> None:
    """Raise when a non-nullable field, at any depth, contains a NULL.

    A NULL in a child of a NULL struct is allowed: the struct itself is absent.
    """
    if not schema_field.nullable and array.null_count:
        raise ValueError(f"field {path!r} is not nullable but contains {array.null_count} NULLs")
    field_type = schema_field.type
    if pa.types.is_struct(field_type):
        for index in range(field_type.num_fields):
            child_field = field_type.field(index)
            child = array.field(index)
            if not child_field.nullable:
                nulls = pc.sum(pc.and_(pc.is_null(child), pc.is_valid(array))).as_py() or 0
                if nulls:
                    raise ValueError(
                        f"field '{path}.{child_field.name}' is not nullable but contains {nulls} NULLs"
                    )
            nullable_view = pa.field(child_field.name, child_field.type, nullable=True)
            _check_not_null(child, nullable_view, f"{path}.{child_field.name}")
    elif pa.types.is_list(field_type) or pa.types.is_large_list(field_type):
        _check_not_null(array.flatten(), field_type.value_field, f"{path}[]")
