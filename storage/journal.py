"""Write-ahead journal that makes each stored row durable before it reaches Parquet.

A writer buffers rows and writes Parquet once per batch, so without a journal a
``kill -9`` would lose every row since the last batch. A journal segment contains the rows
of one batch of one table, in one of two formats:

- ``journal/<segment>.responses.rows`` (:class:`RowJournalSegment`, what
  :class:`~storage.store.StoreWriter` writes for responses): a header, then one record
  per row, each a length, a CRC-32 and the row's ``marshal`` encoding. For 64 tokens x
  20 alternatives, building a one-row Arrow table cost 0.43 ms of CPU and encoding the
  row 0.08 ms (shared 2-core VM, Python 3.11, pyarrow 26); the writer builds Arrow
  tables of several rows at a time instead.
- ``journal/<segment>.<table>.arrows`` (:class:`JournalSegment`, used for failure
  rows): an Arrow IPC stream, the schema message, then one record batch per row.

Every row is encoded in memory and handed to the kernel with a single ``os.write``
before ``append`` returns, so a killed process loses at most the row it was writing.
The data then sits in the OS page cache: it survives the death of the process, not a
power loss, unless :meth:`JournalSegment.sync` ran.

Journals hold rows in the logical schema of :mod:`storage.schema`. The stored form of
the logprob columns (:mod:`storage.encoding`) is applied only when a segment is
committed or replayed to Parquet, in the store's encoding at that time, so rows
journaled before a crash are recovered whatever the encoding setting.

Replay reads every complete record and ignores a torn tail (a record cut by the kill,
or whose CRC does not match), because only the last write can be incomplete when a
process dies.

A segment id is ``<run_id>-<writer token>-<sequence>``, unique per store, so the
Parquet file that commits a segment (``part-<segment>.parquet``) has a name derived
from the journal's name, and recovery can tell a committed segment from one that
still needs replaying.
"""

from __future__ import annotations

import logging
import marshal
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from storage.schema import TABLE_SCHEMAS, LogprobColumns, build_table

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".arrows"
ROW_JOURNAL_SUFFIX = ".rows"
JOURNAL_SUFFIXES = (JOURNAL_SUFFIX, ROW_JOURNAL_SUFFIX)

ROW_JOURNAL_MAGIC = b"KDROWS1\n"
# Record header: payload length and CRC-32 of the payload, little-endian uint32 each.
_RECORD_HEADER = struct.Struct("<II")
# marshal format 4 is read by every Python 3.4 and later.
_MARSHAL_VERSION = 4
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LOGPROB_FIELDS = (
    "tokens", "token_bytes", "token_logprobs", "top_counts", "top_tokens", "top_logprobs",
    "top_bytes", "text_offset",
)

# Run ids become file names, so they are limited to characters that are safe in a
# file name on every common file system and never start with a dot (hidden files).
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` unchanged, or raise ``ValueError`` if it is unsafe as a file name."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise ValueError(
            f"invalid run_id {run_id!r}: use 1 to 128 characters from A-Z a-z 0-9 _ . -,"
            " starting with a letter or digit"
        )
    return run_id


def segment_id(run_id: str, token: str, sequence: int) -> str:
    """Return the id of one writer's ``sequence``-th batch."""
    return f"{run_id}-{token}-{sequence:06d}"


def journal_path(journal_dir: Path, segment: str, table: str, *, suffix: str = JOURNAL_SUFFIX) -> Path:
    return journal_dir / f"{segment}.{table}{suffix}"


def part_file_name(segment: str) -> str:
    """Return the name of the Parquet file that commits ``segment``."""
    return f"part-{segment}.parquet"


@dataclass(frozen=True)
class JournalFile:
    """A journal segment on disk: which batch of which table it holds."""

    path: Path
    segment: str
    table: str


def list_journals(journal_dir: Path) -> list[JournalFile]:
    """Return the journal segments in ``journal_dir``, sorted by name."""
    if not journal_dir.is_dir():
        return []
    found = []
    for path in sorted(journal_dir.iterdir()):
        name = path.name
        suffix = next((suffix for suffix in JOURNAL_SUFFIXES if name.endswith(suffix)), None)
        if name.startswith(".") or suffix is None:
            continue
        segment, _, table = name[: -len(suffix)].rpartition(".")
        if not segment or not table:
            logger.warning("ignoring journal file with an unexpected name: %s", path)
            continue
        found.append(JournalFile(path=path, segment=segment, table=table))
    return found


class JournalSegment:
    """Append-only journal of one batch of one table.

    The file is created with ``O_EXCL``: two writers never share a segment.
    """

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.rows = 0
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._write(schema.serialize().to_pybytes())

    def append(self, table: pa.Table) -> None:
        """Append the rows of ``table`` as one message; durable against a process kill on return."""
        batch = table.combine_chunks().to_batches()[0]
        self._write(batch.serialize().to_pybytes())
        self.rows += table.num_rows

    def sync(self) -> None:
        """Flush the segment to stable storage (survives a power loss)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"journal segment {self.path} is closed")
        view = memoryview(data)
        # os.write on a regular file writes everything unless the disk is full or a
        # signal interrupts it; the loop covers both short-write cases.
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


class RowJournalSegment(JournalSegment):
    """Append-only journal of one batch of rows of ``table``, in the ``.rows`` format.

    :meth:`append` takes a row dict as :func:`~storage.schema.build_table` takes it:
    ``datetime`` values are stored as microseconds since the epoch and come back as
    UTC datetimes, and a response's ``"logprobs"`` is stored as its lists. Raises
    ``ValueError`` for a value ``marshal`` cannot encode; nothing is written then.
    """

    def __init__(self, path: Path, table: str):
        self.path = path
        self.rows = 0
        self._columns = tuple(TABLE_SCHEMAS[table].names)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self._write(ROW_JOURNAL_MAGIC)

    def append(self, row: dict[str, Any]) -> None:  # type: ignore[override]
        """Append one row as one record; durable against a process kill on return."""
        payload = encode_row(row, self._columns)
        self._write(_RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self.rows += 1


def encode_row(row: dict[str, Any], columns: Sequence[str]) -> bytes:
    """Encode the ``columns`` of a row dict, plus its ``"logprobs"``, for a ``.rows`` journal."""
    values = {}
    datetime_columns = []
    for name in columns:
        value = row.get(name)
        if isinstance(value, datetime):
            datetime_columns.append(name)
            value = _epoch_microseconds(value)
        values[name] = value
    logprobs = row.get("logprobs")
    encoded_logprobs = None
    if logprobs is not None:
        encoded_logprobs = tuple(getattr(logprobs, name) for name in _LOGPROB_FIELDS)
    return marshal.dumps((values, tuple(datetime_columns), encoded_logprobs), _MARSHAL_VERSION)


def decode_row(payload: bytes) -> dict[str, Any]:
    """Return the row dict that :func:`encode_row` encoded; raises ``ValueError`` if it is malformed."""
    # NOTE: marshal is not hardened against crafted input; a journal is only ever
    # written by this store's own writer.
    try:
        values, datetime_columns, logprobs = marshal.loads(payload)
    except (EOFError, TypeError, ValueError) as exc:
        raise ValueError(f"journal row cannot be decoded: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"journal row is a {type(values).__name__}, expected a dict")
    for name in datetime_columns:
        if values.get(name) is not None:
            values[name] = _EPOCH + timedelta(microseconds=values[name])
    if logprobs is not None:
        values["logprobs"] = LogprobColumns(**dict(zip(_LOGPROB_FIELDS, logprobs, strict=True)))
    return values


def _epoch_microseconds(value: datetime) -> int:
    # A naive datetime is UTC, as pyarrow reads it for a timestamp column with tz="UTC".
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return (value - _EPOCH) // timedelta(microseconds=1)


@dataclass
class JournalContents:
    """The rows replayed from one segment."""

    table: pa.Table | None
    torn_tail: bool
    error: str | None = None


def read_journal(path: Path) -> JournalContents:
    """Read every complete row of a journal segment, ignoring a torn tail.

    ``table`` is ``None`` when the segment contains no complete row (the writer died
    before or while writing the schema message or the first row). Raises
    ``ValueError`` when a complete row of a ``.rows`` segment cannot be decoded or
    does not fit the table's schema.
    """
    if path.name.endswith(ROW_JOURNAL_SUFFIX):
        return _read_row_journal(path)
    data = path.read_bytes()
    try:
        reader = pa.ipc.open_stream(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        return JournalContents(table=None, torn_tail=len(data) > 0, error=str(exc))

    batches: list[pa.RecordBatch] = []
    torn_tail = False
    error = None
    while True:
        try:
            batches.append(reader.read_next_batch())
        except StopIteration:
            break
        except (pa.ArrowInvalid, OSError) as exc:
            torn_tail = True
            error = str(exc)
            break

    if not batches:
        return JournalContents(table=None, torn_tail=torn_tail, error=error)
    return JournalContents(
        table=pa.Table.from_batches(batches, schema=reader.schema), torn_tail=torn_tail, error=error
    )


def _read_row_journal(path: Path) -> JournalContents:
    data = path.read_bytes()
    table_name = path.name[: -len(ROW_JOURNAL_SUFFIX)].rpartition(".")[2]
    if table_name not in TABLE_SCHEMAS:
        raise ValueError(f"journal {path} is for unknown table {table_name!r}")
    if not data.startswith(ROW_JOURNAL_MAGIC):
        # A kill while the header was written leaves a prefix of it; anything else is not ours.
        if ROW_JOURNAL_MAGIC.startswith(data):
            return JournalContents(table=None, torn_tail=len(data) > 0, error="header incomplete")
        raise ValueError(f"journal {path} does not start with the {ROW_JOURNAL_MAGIC!r} header")

    rows, error = _read_row_records(data, len(ROW_JOURNAL_MAGIC))
    torn_tail = error is not None
    if not rows:
        return JournalContents(table=None, torn_tail=torn_tail, error=error)
    try:
        table = build_table(table_name, rows)
    except (TypeError, pa.ArrowException) as exc:
        raise ValueError(f"journal {path} rows do not fit the {table_name} schema: {exc}") from exc
    return JournalContents(table=table, torn_tail=torn_tail, error=error)


def _read_row_records(data: bytes, offset: int) -> tuple[list[dict[str, Any]], str | None]:
    """Decode the complete records from ``offset``; return them and why reading stopped early."""
    rows = []
    view = memoryview(data)
    while offset < len(data):
        if len(data) - offset < _RECORD_HEADER.size:
            return rows, f"record header cut at byte {offset}"
        length, checksum = _RECORD_HEADER.unpack_from(data, offset)
        start = offset + _RECORD_HEADER.size
        payload = view[start : start + length]
        if len(payload) < length:
            return rows, f"record at byte {offset} cut after {len(payload)} of {length} bytes"
        if zlib.crc32(payload) != checksum:
            return rows, f"record at byte {offset} fails its CRC-32 check"
        rows.append(decode_row(bytes(payload)))
        offset = start + length
    return rows, None
