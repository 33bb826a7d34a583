"""Write-ahead journal that makes each stored row durable before it reaches Parquet.

A writer buffers rows and writes Parquet once per batch, so without a journal a
``kill -9`` would lose every row since the last batch. Each journal segment is one
Arrow IPC stream, ``journal/<segment>.<table>.arrows``: the schema message, then one
record batch per row. Every row is encoded in memory and handed to the kernel with a
single ``os.write`` before ``append`` returns, so a killed process loses at most the
row it was writing. The data then sits in the OS page cache: it survives the death of
the process, not a power loss, unless :meth:`JournalSegment.sync` ran.

Replay reads every complete message and ignores a torn tail (a message cut by the
kill), because only the last write can be incomplete when a process dies.

A segment id is ``<run_id>-<writer token>-<sequence>``, unique per store, so the
Parquet file that commits a segment (``part-<segment>.parquet``) has a name derived
from the journal's name, and recovery can tell a committed segment from one that
still needs replaying.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".arrows"

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


def journal_path(journal_dir: Path, segment: str, table: str) -> Path:
    return journal_dir / f"{segment}.{table}{JOURNAL_SUFFIX}"


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
        if name.startswith(".") or not name.endswith(JOURNAL_SUFFIX):
            continue
        segment, _, table = name[: -len(JOURNAL_SUFFIX)].rpartition(".")
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


@dataclass
class JournalContents:
    """The rows replayed from one segment."""

    table: pa.Table | None
    torn_tail: bool
    error: str | None = None


def read_journal(path: Path) -> JournalContents:
    """Read every complete row of a journal segment, ignoring a torn tail.

    ``table`` is ``None`` when the segment contains no complete row (the writer died
    before or while writing the schema message or the first row).
    """
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
