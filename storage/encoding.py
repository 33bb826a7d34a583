"""How responses files store the logprob columns (schema version 2), and how to read them back.

Writers build tables in the logical :data:`storage.schema.RESPONSES_SCHEMA`, and readers
see that schema through the DuckDB views of :mod:`storage.catalog`. Only the Parquet
files hold the stored form that this module defines. Since schema version 2 that form
differs in two ways, and each file names its encoding in the ``kd.logprob_encoding``
metadata key, so every file is decoded by its own rule:

- Logprobs (``token_logprobs`` and the alternatives' ``logprob``) are stored either
  as float32, unchanged (encoding ``float32``, lossless), or quantised (encoding
  ``uint8``, the default). A uint8 code ``c`` stands for the logprob ``-c * step``
  with ``step`` = 1/8 nat, so codes 0..255 cover 0 to -31.875. Encoding rounds to the
  nearest step, so each value moves by at most 1/16 nat. Values below -31.875 are
  clamped to -31.875 (probability 1.4e-14 or less), and values above 0 are clamped to 0.
  Masked logprobs stay NULL: values at or below
  :data:`~storage.schema.MASKED_LOGPROB_THRESHOLD` (-inf included), and NaN, which
  is not a logprob, are stored as NULL. A uniform step bounds the error in the top-k
  distribution independently of its shape: the KL divergence between the original and
  the decoded top-k distribution, both renormalised, is about half the variance of
  the rounding errors, at most step**2 / 8 and about step**2 / 24 = 6.5e-4 nats for
  errors spread evenly. ``benchmarks/bench_store.py`` measured a mean of 3 to 4e-4
  nats per token on the mock and the tiny teacher, and at most 1.7e-3 at one position.
- Token bytes (``token_bytes`` and the alternatives' ``bytes``) are stored as NULL where
  they equal the UTF-8 encoding of the token's text. That is almost always the case,
  because the harvester derives the bytes from the text when a teacher sends none.
  Bytes that differ are stored as given. Where the bytes are NULL (no bytes known),
  the token's UTF-8 is stored instead. That value cannot otherwise occur, because
  bytes equal to the token's UTF-8 are stored as NULL. Decoding swaps back: NULL
  becomes the token's UTF-8, the token's UTF-8 becomes NULL, anything else stays. A
  token that is NULL keeps its bytes as given. This part is lossless and adds no
  column. Flag columns were measured and dropped. A boolean leaf per alternative under
  ``top_logprobs`` added about 4 ms of Parquet writer CPU per 256-row file (15 % of
  the write). Two flag columns made DuckDB's ``read_parquet`` of one scalar column
  over 300 files of 1,000 rows 5 to 8 % slower (2-core VM, pyarrow 26, DuckDB 2.0.1).

NOTE: with the ``float32`` encoding the stored columns have the same types as
``RESPONSES_SCHEMA``, yet their bytes are swapped as above. Read a file by its
``kd.logprob_encoding`` (:attr:`storage.catalog.StoreFile.logprob_encoding`), never by
comparing its schema with the logical one.

Both encodings are applied with vectorised Arrow and numpy operations over a whole
table, never per value in Python, because the harvester calls them for every batch.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.schema import (
    MASKED_LOGPROB_THRESHOLD,
    RESPONSES_SCHEMA,
    with_table_metadata,
)

LOGPROB_ENCODING_KEY = b"kd.logprob_encoding"
"""File metadata key naming the file's :class:`LogprobEncoding`, as JSON."""


_UINT8_CODES = 255


@dataclass(frozen=True)
class LogprobEncoding:
    """Storage rule for logprobs: ``float32`` as given, or ``uint8`` codes of ``step`` nats below 0."""

    name: str
    step: float | None = None

    def __post_init__(self) -> None:
        if self.name == "float32":
            if self.step is not None:
                raise ValueError("logprob encoding float32 takes no step")
        elif self.name == "uint8":
            if self.step is None or not (np.isfinite(self.step) and self.step > 0):
                raise ValueError(f"logprob encoding uint8 needs a positive step, got {self.step!r}")
        else:
            raise ValueError(
                f"unknown logprob encoding {self.name!r}; use one of {', '.join(LOGPROB_ENCODINGS)}"
            )

    @property
    def lossless(self) -> bool:
        return self.name == "float32"

    @property
    def value_type(self) -> pa.DataType:
        """Arrow type of one stored logprob."""
        return pa.float32() if self.lossless else pa.uint8()

    @property
    def min_logprob(self) -> float:
        """Lowest logprob the encoding represents; lower values are clamped to it."""
        return -np.inf if self.lossless else -_UINT8_CODES * self.step

    def to_metadata(self) -> bytes:
        fields = {"name": self.name} if self.lossless else {"name": self.name, "step": self.step}
        return json.dumps(fields, sort_keys=True).encode()

    @classmethod
    def from_metadata(cls, raw: bytes) -> LogprobEncoding:
        """Parse a ``kd.logprob_encoding`` value; raises ``ValueError`` when it is invalid."""
        try:
            fields = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"logprob encoding {raw!r} is not JSON: {exc}") from exc
        if not isinstance(fields, dict) or not isinstance(fields.get("name"), str):
            raise ValueError(f"logprob encoding {raw!r} is not an object with a name")
        step = fields.get("step")
        if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))):
            raise ValueError(f"logprob encoding {raw!r} has a step that is not a number")
        return cls(fields["name"], None if step is None else float(step))


UINT8_ENCODING = LogprobEncoding("uint8", 0.125)
FLOAT32_ENCODING = LogprobEncoding("float32")
LOGPROB_ENCODINGS: dict[str, LogprobEncoding] = {"uint8": UINT8_ENCODING, "float32": FLOAT32_ENCODING}
DEFAULT_LOGPROB_ENCODING = UINT8_ENCODING
"""Encoding of new files unless the store's ``logprob_encoding`` setting names another."""


def logprob_encoding_named(name: str) -> LogprobEncoding:
    """Return the encoding called ``name`` (``uint8`` or ``float32``); raises ``ValueError`` otherwise."""
    try:
        return LOGPROB_ENCODINGS[name]
    except KeyError:
        raise ValueError(
            f"unknown logprob encoding {name!r}; use uint8 (1/8-nat steps, the default)"
            " or float32 (lossless)"
        ) from None


# --- Schemas --------------------------------------------------------------------------


def stored_alternative_type(encoding: LogprobEncoding) -> pa.StructType:
    return pa.struct(
        [
            pa.field("token", pa.string()),
            pa.field("logprob", encoding.value_type),
            pa.field("bytes", pa.binary()),
        ]
    )


@functools.cache
def stored_responses_schema(encoding: LogprobEncoding) -> pa.Schema:
    """Return the Parquet schema of a responses file in ``encoding``, with its metadata."""
    fields = []
    for schema_field in RESPONSES_SCHEMA:
        name = schema_field.name
        if name == "token_logprobs":
            fields.append(pa.field(name, pa.list_(encoding.value_type)))
        elif name == "top_logprobs":
            fields.append(pa.field(name, pa.list_(pa.list_(stored_alternative_type(encoding)))))
        else:
            fields.append(schema_field)
    schema = pa.schema(fields)
    metadata = dict(with_table_metadata(RESPONSES_SCHEMA.empty_table(), "responses").schema.metadata)
    metadata[LOGPROB_ENCODING_KEY] = encoding.to_metadata()
    return schema.with_metadata(metadata)


# --- Encoding -------------------------------------------------------------------------


def encode_responses_table(table: pa.Table, encoding: LogprobEncoding = DEFAULT_LOGPROB_ENCODING) -> pa.Table:
    """Return ``table`` (in ``RESPONSES_SCHEMA``) in the stored form of ``encoding``.

    Raises ``ValueError`` when ``table`` is not in the logical responses schema, or
    when a row's ``tokens`` and ``token_bytes`` differ in length (the bytes are stored
    relative to the tokens at the same positions).
    """
    if not table.schema.equals(RESPONSES_SCHEMA, check_metadata=False):
        raise ValueError("only a table in RESPONSES_SCHEMA can be encoded for storage")
    schema = stored_responses_schema(encoding)
    # One batch instead of one per chunk: each batch costs about 20 compute calls, and the
    # writer hands over a concatenation of many small tables.
    batches = [_encode_batch(batch, encoding, schema) for batch in table.combine_chunks().to_batches()]
    return pa.Table.from_batches(batches, schema=schema)


def _encode_batch(batch: pa.RecordBatch, encoding: LogprobEncoding, schema: pa.Schema) -> pa.RecordBatch:
    columns = dict(zip(batch.schema.names, batch.columns))
    tokens = columns["tokens"]
    token_bytes = columns["token_bytes"]
    if not np.array_equal(_lengths(tokens), _lengths(token_bytes)):
        raise ValueError("tokens and token_bytes differ in length in a row; the row cannot be stored")
    columns["token_bytes"] = _relist(token_bytes, _swap_bytes(tokens.flatten(), token_bytes.flatten()))
    token_logprobs = columns["token_logprobs"]
    columns["token_logprobs"] = _relist(token_logprobs, encode_logprobs(token_logprobs.flatten(), encoding))
    columns["top_logprobs"] = _encode_alternatives(columns["top_logprobs"], encoding)
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


def _encode_alternatives(top_logprobs: pa.ListArray, encoding: LogprobEncoding) -> pa.ListArray:
    positions = top_logprobs.flatten()
    alternatives = positions.flatten()
    tokens = alternatives.field("token")
    struct = pa.StructArray.from_arrays(
        [
            tokens,
            encode_logprobs(alternatives.field("logprob"), encoding),
            _swap_bytes(tokens, alternatives.field("bytes")),
        ],
        fields=list(stored_alternative_type(encoding)),
        mask=alternatives.is_null() if alternatives.null_count else None,
    )
    return _relist(top_logprobs, _relist(positions, struct))


def _swap_bytes(tokens: pa.Array, token_bytes: pa.Array) -> pa.Array:
    """Return the stored form of token bytes: NULL for the token's UTF-8, the token's UTF-8 for NULL."""
    utf8 = tokens.cast(pa.binary())
    same = pc.equal(utf8, token_bytes)
    if same.null_count:
        same = pc.coalesce(same, False)
    # Bytes unknown for a known token: store the token's UTF-8, which marks them.
    unknown = pc.and_(pc.is_null(token_bytes), pc.is_valid(tokens))
    if pc.any(unknown).as_py():
        token_bytes = pc.if_else(unknown, utf8, token_bytes)
    if not pc.any(same).as_py():
        return token_bytes
    if pc.all(same).as_py():
        return pa.nulls(len(token_bytes), pa.binary())
    return pc.if_else(same, pa.scalar(None, pa.binary()), token_bytes)


def _unswap_bytes(tokens: pa.Array, stored: pa.Array) -> pa.Array:
    """Return token bytes from their stored form: the inverse of :func:`_swap_bytes`."""
    utf8 = tokens.cast(pa.binary())
    unknown = pc.equal(utf8, stored)
    if unknown.null_count:
        unknown = pc.coalesce(unknown, False)
    restored = pc.coalesce(stored, utf8) if stored.null_count else stored
    if not pc.any(unknown).as_py():
        return restored
    return pc.if_else(unknown, pa.scalar(None, pa.binary()), restored)


def _relist(template: pa.ListArray, values: pa.Array) -> pa.ListArray:
    """Return a list array with the lengths and NULLs of ``template`` over ``values``.

    ``values`` must line up with ``template.flatten()``, which skips NULL lists.
    """
    offsets = template.offsets
    if template.null_count or offsets[0].as_py() != 0:
        lengths = _lengths(template)
        zero_based = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=zero_based[1:])
        offsets = pa.array(zero_based)
    mask = template.is_null() if template.null_count else None
    return pa.ListArray.from_arrays(offsets, values, mask=mask)


def _lengths(array: pa.ListArray) -> np.ndarray:
    """Return each list's length, 0 for a NULL list (whose range ``flatten`` skips)."""
    lengths = np.diff(array.offsets.to_numpy())
    if array.null_count:
        lengths[array.is_null().to_numpy(zero_copy_only=False)] = 0
    return lengths


def encode_logprobs(values: pa.Array, encoding: LogprobEncoding) -> pa.Array:
    """Return float logprobs in ``encoding``'s stored type (see the module docstring)."""
    if encoding.lossless:
        return values.cast(pa.float32())
    # float32 is exact here: the stored values are float32, and 1 / step is a power of two
    # for the uint8 encoding this module defines.
    logprobs = values.cast(pa.float32()).to_numpy(zero_copy_only=False)
    valid = logprobs > MASKED_LOGPROB_THRESHOLD  # False for NULL (NaN here) and NaN
    codes = np.where(valid, logprobs, np.float32(0.0)) * np.float32(-1.0 / encoding.step)
    np.rint(codes, out=codes)
    np.clip(codes, 0, _UINT8_CODES, out=codes)
    mask = None if valid.all() else ~valid
    return pa.array(codes.astype(np.uint8), type=pa.uint8(), mask=mask)


# --- Decoding -------------------------------------------------------------------------


def decode_logprobs(values: pa.Array, encoding: LogprobEncoding) -> pa.Array:
    """Return stored logprobs as float32, NULLs kept: the inverse of :func:`encode_logprobs`."""
    if encoding.lossless:
        return values.cast(pa.float32())
    codes = values.to_numpy(zero_copy_only=False)
    # 0.0 - x rather than -x, so code 0 decodes to +0.0 as DuckDB's decoding does.
    decoded = np.float32(0.0) - np.nan_to_num(codes, nan=0.0).astype(np.float32) * np.float32(encoding.step)
    mask = values.is_null().to_numpy(zero_copy_only=False) if values.null_count else None
    return pa.array(decoded, type=pa.float32(), mask=mask)


def decode_responses_table(table: pa.Table, encoding: LogprobEncoding) -> pa.Table:
    """Return a stored responses table (as read with pyarrow) in ``RESPONSES_SCHEMA``."""
    batches = [_decode_batch(batch, encoding) for batch in table.to_batches()]
    return pa.Table.from_batches(batches, schema=RESPONSES_SCHEMA).replace_schema_metadata(
        dict(with_table_metadata(RESPONSES_SCHEMA.empty_table(), "responses").schema.metadata)
    )


def _decode_batch(batch: pa.RecordBatch, encoding: LogprobEncoding) -> pa.RecordBatch:
    columns = dict(zip(batch.schema.names, batch.columns))
    stored_bytes = columns["token_bytes"]
    token_bytes = _unswap_bytes(columns["tokens"].flatten(), stored_bytes.flatten())
    columns["token_bytes"] = _relist(stored_bytes, token_bytes)
    token_logprobs = columns["token_logprobs"]
    columns["token_logprobs"] = _relist(token_logprobs, decode_logprobs(token_logprobs.flatten(), encoding))

    top_logprobs = columns["top_logprobs"]
    positions = top_logprobs.flatten()
    alternatives = positions.flatten()
    tokens_of_alternatives = alternatives.field("token")
    struct = pa.StructArray.from_arrays(
        [
            tokens_of_alternatives,
            decode_logprobs(alternatives.field("logprob"), encoding),
            _unswap_bytes(tokens_of_alternatives, alternatives.field("bytes")),
        ],
        fields=list(RESPONSES_SCHEMA.field("top_logprobs").type.value_type.value_type),
        mask=alternatives.is_null() if alternatives.null_count else None,
    )
    columns["top_logprobs"] = _relist(top_logprobs, _relist(positions, struct))
    return pa.RecordBatch.from_arrays([columns[name] for name in RESPONSES_SCHEMA.names], schema=RESPONSES_SCHEMA)


def decode_bytes_sql(stored: str, token: str) -> str:
    """Return DuckDB SQL that decodes stored token bytes ``stored`` of the token ``token``."""
    utf8 = f"encode({token})"
    return f"CASE WHEN {stored} IS NULL THEN {utf8} WHEN {stored} = {utf8} THEN NULL ELSE {stored} END"


def decode_logprob_sql(expr: str, encoding: LogprobEncoding) -> str:
    """Return DuckDB SQL that decodes one stored logprob ``expr`` to FLOAT."""
    if encoding.lossless:
        return f"CAST({expr} AS FLOAT)"
    return f"CAST(0.0 - CAST({expr} AS DOUBLE) * CAST({encoding.step!r} AS DOUBLE) AS FLOAT)"
