"""Turn stored teacher responses into training tensors for a student.

Rows stream from the store's DuckDB ``responses`` view in Arrow record batches, never
all at once. Each row becomes one :class:`Sample` in one of two ways:

- token-level: every teacher response token maps by bytes to exactly one student token
  (see :mod:`student.vocab`), so the student reads the teacher's own segmentation and
  each position has the teacher's top-k alternatives as a soft target;
- sequence-level fallback: the row has no usable token data (no logprobs, lossy,
  ``token_level_ok`` false, bytes that disagree with the text), or one of its tokens
  does not map. The student then reads its own tokenization of the response text and
  learns it with cross-entropy only.

Teacher distribution at one position (the documented rule): the alternatives with a
finite logprob above :data:`storage.schema.MASKED_LOGPROB_THRESHOLD` whose bytes map to a
student id, plus the sampled token itself when it is missing from them and its own
logprob is known. Alternatives that do not map are dropped, and alternatives that map
to the same student id are merged (their probabilities added). The loss renormalises
the remaining probabilities to sum to one. A position where no alternative maps has no
teacher distribution, and the loss uses cross-entropy on the sampled token there. Masked (NULL) logprobs never enter arithmetic:
they are dropped here, and the loss masks whatever padding remains.

Targets are aligned with logits: ``target_ids[t]`` is the token the student should
predict after reading ``input_ids[..t]``. A NULL teacher logprob (the first token of an
echoed text has none) removes that position's soft target, never the position itself,
so later targets are never shifted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError
from storage.schema import MASKED_LOGPROB_THRESHOLD
from student.vocab import StudentVocab, teacher_token_bytes

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target id of positions that carry no target (prompt, padding)."""

RESPONSE_COLUMNS = (
    "request_id",
    "prompt_id",
    "prompt",
    "messages",
    "response",
    "finish_reason",
    "tokens",
    "token_bytes",
    "token_logprobs",
    "top_logprobs",
    "token_level_ok",
    "logprobs_lossy",
)

# The held-out split hashes this key, so every sample of one prompt lands on the same side.
_SPLIT_KEY_SQL = "coalesce(prompt_id, prompt, messages, request_id, '')"
# First 32 bits of the key's MD5 as a fraction in [0, 1); holdout_bucket() is its twin.
_SPLIT_BUCKET_SQL = f"(('0x' || left(md5({_SPLIT_KEY_SQL}), 8))::UBIGINT / 4294967296.0)"
_FINISH_REASON_NAMED = re.compile(r"\bfinish_reason\b", re.IGNORECASE)
# Rows whose teacher logprobs give no distribution to distil: none stored, or at most
# one alternative per position (the sampled token alone renormalises to probability 1,
# so its KL term equals cross-entropy).
WITHOUT_TEACHER_DISTRIBUTION_SQL = (
    "coalesce(list_max(list_transform(top_logprobs, lambda alternatives: len(alternatives))), 0) < 2"
)


def holdout_bucket(key: str) -> float:
    """Return the split bucket in [0, 1) of a prompt key; the SQL query computes the same."""
    digest = hashlib.md5(key.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) / 2**32


def is_heldout(key: str, holdout_fraction: float) -> bool:
    """Return whether the prompt with this key belongs to the held-out split."""
    return holdout_bucket(key) < holdout_fraction


@dataclass(frozen=True)
class RowQuery:
    """Selection and order of the stored responses to read.

    By default only rows with a response and ``finish_reason = 'stop'`` are read:
    responses cut at max_tokens or blocked by a content filter are not complete teacher
    outputs. ``include_truncated`` adds ``'length'`` rows; a ``where`` predicate that
    names ``finish_reason`` replaces the default finish_reason filter entirely.
    """

    store_dir: Path
    where: str | None = None
    include_truncated: bool = False
    split: str = "all"
    holdout_fraction: float = 0.0
    # None keeps a stable order (request_id); a seed gives a reproducible shuffle.
    order_seed: int | None = None
    offset: int = 0
    limit: int | None = None

    def filters(self) -> list[str]:
        """Return the default and split predicates, applied outside the user's ``where``."""
        predicates = ["response IS NOT NULL"]
        user_sets_finish = bool(self.where and _FINISH_REASON_NAMED.search(self.where))
        if not user_sets_finish:
            if self.include_truncated:
                predicates.append("finish_reason IN ('stop', 'length')")
            else:
                predicates.append("finish_reason = 'stop'")
        if self.split == "heldout":
            predicates.append(f"{_SPLIT_BUCKET_SQL} < {float(self.holdout_fraction)!r}")
        elif self.split == "train" and self.holdout_fraction > 0:
            predicates.append(f"{_SPLIT_BUCKET_SQL} >= {float(self.holdout_fraction)!r}")
        return predicates

    def describe(self) -> str:
        """Return every predicate of the query as one readable condition, for messages."""
        predicates = self.filters() + ([f"({self.where})"] if self.where else [])
        return " AND ".join(predicates)

    def _source(self) -> str:
        # The user's predicate runs in an inner query and the default and split filters
        # in the outer one, so no predicate text can remove the held-out filter.
        if not self.where:
            return "responses"
        check_where(self.where)
        return f"(SELECT * FROM responses WHERE ({self.where})) AS selected"

    def sql(self, columns: Iterable[str] = RESPONSE_COLUMNS) -> str:
        """Return the SELECT statement over the ``responses`` view."""
        if self.order_seed is None:
            order = "request_id"
        else:
            order = f"md5(coalesce(request_id, '') || ':{int(self.order_seed)}'), request_id"
        statement = (
            f"SELECT {', '.join(columns)} FROM {self._source()}"
            f" WHERE {' AND '.join(self.filters())} ORDER BY {order}"
        )
        if self.limit is not None:
            statement += f" LIMIT {int(self.limit)}"
        if self.offset:
            statement += f" OFFSET {int(self.offset)}"
        return statement

    def count_sql(self, condition: str | None = None) -> str:
        """Return a statement counting the selected rows, or those that meet ``condition``."""
        predicates = self.filters() + ([f"({condition})"] if condition else [])
        return f"SELECT count(*) FROM {self._source()} WHERE {' AND '.join(predicates)}"


def check_where(where: str) -> None:
    """Raise ConfigError unless ``where`` is one SQL expression with balanced brackets.

    DuckDB's tokenizer reads the text, so brackets inside string literals do not
    count. Comments and semicolons are rejected because they could cut off or end the
    statement the predicate is placed in.
    """
    import duckdb

    def reject(reason: str) -> None:
        raise ConfigError(
            f"--where {where!r} is not a single SQL predicate: {reason}; pass one boolean"
            " expression over the responses columns, such as \"teacher = 'tiny'\""
        )

    try:
        tokens = duckdb.tokenize(where)
    except duckdb.Error as error:
        reject(str(error))
    depth = {"(": 0, "[": 0}
    closing = {")": "(", "]": "["}
    ends = [position for position, _ in tokens[1:]] + [len(where)]
    for (position, kind), end in zip(tokens, ends):
        if kind == duckdb.token_type.comment:
            reject("it contains a comment")
        if kind != duckdb.token_type.operator:
            continue
        for char in where[position:end]:
            if char == ";":
                reject("it contains a semicolon")
            if char in depth:
                depth[char] += 1
            elif char in closing:
                depth[closing[char]] -= 1
                if depth[closing[char]] < 0:
                    reject(f"the {char!r} at offset {position} closes a bracket it did not open")
    if any(depth.values()):
        reject("it opens a bracket it does not close")

    try:
        statements = duckdb.extract_statements(f"SELECT 1 FROM responses WHERE ({where})")
    except duckdb.Error as error:
        reject(str(error).splitlines()[0])
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        reject("it does not parse as one expression")


def _connect(store_dir: Path):
    from storage.catalog import connect

    return connect(store_dir, read_only=True)


def _run_query(connection: Any, statement: str, query: RowQuery):
    import duckdb

    try:
        return connection.sql(statement)
    except duckdb.Error as error:
        _raise_query_error(error, query)


def _raise_query_error(error: Exception, query: RowQuery) -> None:
    """Raise the KDError for a failed row query: damaged store files or a bad predicate."""
    from pipeline.errors import DamagedFileError
    from storage.query import corruption_hint, is_corruption_error

    if is_corruption_error(error):
        damaged = _damaged_files(query)
        others = f" (also damaged: {', '.join(map(str, damaged[1:]))})" if len(damaged) > 1 else ""
        raise DamagedFileError(
            f"cannot read stored responses: {_first_line(error)}{others}; {corruption_hint(query.store_dir)}",
            path=str(damaged[0]) if damaged else str(query.store_dir),
        ) from error
    where = f" with --where {query.where!r}" if query.where else ""
    raise ConfigError(
        f"query over {query.store_dir} failed{where}: {error}; fix the predicate"
        " (columns are those of the responses table, see pipeline sql)"
    ) from error


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _damaged_files(query: RowQuery) -> list[Path]:
    from storage.maintenance import find_damaged_files

    try:
        return find_damaged_files(query.store_dir, "responses")
    except Exception as error:  # noqa: BLE001 - naming the file is optional, the error is not
        logger.debug("cannot list damaged files of %s: %s", query.store_dir, error)
        return []


def count_rows(query: RowQuery, condition: str | None = None) -> int:
    """Return how many rows ``query`` selects, or how many of them meet ``condition``."""
    import duckdb

    connection = _connect(query.store_dir)
    try:
        relation = _run_query(connection, query.count_sql(condition), query)
        try:
            return int(relation.fetchall()[0][0])
        except duckdb.Error as error:
            _raise_query_error(error, query)
    finally:
        connection.close()


def iter_rows(query: RowQuery, rows_per_chunk: int = 256) -> Iterator[dict[str, Any]]:
    """Yield the selected rows as dicts, reading ``rows_per_chunk`` rows at a time."""
    import duckdb

    connection = _connect(query.store_dir)
    try:
        relation = _run_query(connection, query.sql(), query)
        try:
            for record_batch in relation.to_arrow_reader(rows_per_chunk):
                yield from record_batch.to_pylist()
        except (duckdb.Error, OSError) as error:
            _raise_query_error(error, query)
    finally:
        connection.close()


@dataclass
class MappingStats:
    """Counts of how stored rows turned into samples; the share properties are reported."""

    rows_read: int = 0
    rows_token_level: int = 0
    rows_sequence_level: int = 0
    rows_without_targets: int = 0
    rows_truncated: int = 0
    rows_invalid: int = 0
    fallback_reasons: Counter = field(default_factory=Counter)
    positions_total: int = 0
    positions_mapped: int = 0
    positions_with_distribution: int = 0
    alternatives_total: int = 0
    alternatives_masked: int = 0
    alternatives_mapped: int = 0
    target_tokens: int = 0

    @property
    def mapped_position_share(self) -> float:
        """Share of teacher response tokens that map to exactly one student token."""
        return self.positions_mapped / self.positions_total if self.positions_total else 0.0

    @property
    def mapped_alternative_share(self) -> float:
        """Share of unmasked teacher alternatives that map to exactly one student token."""
        usable = self.alternatives_total - self.alternatives_masked
        return self.alternatives_mapped / usable if usable else 0.0

    def to_dict(self) -> dict[str, Any]:
        values = {
            name: getattr(self, name)
            for name in self.__dataclass_fields__
            if name != "fallback_reasons"
        }
        values["fallback_reasons"] = dict(self.fallback_reasons)
        values["mapped_position_share"] = round(self.mapped_position_share, 6)
        values["mapped_alternative_share"] = round(self.mapped_alternative_share, 6)
        return values

    def summary(self) -> str:
        """Return a one-line summary for logs and the end-of-run report."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.fallback_reasons.items()))
        return (
            f"rows {self.rows_read} | token_level {self.rows_token_level}"
            f" | sequence_level {self.rows_sequence_level}"
            + (f" ({reasons})" if reasons else "")
            + f" | without_targets {self.rows_without_targets}"
            f" | truncated {self.rows_truncated} | invalid {self.rows_invalid}"
            f" | mapped_positions {100 * self.mapped_position_share:.1f}%"
            f" | mapped_alternatives {100 * self.mapped_alternative_share:.1f}%"
        )


@dataclass
class Sample:
    """One response as student inputs and targets.

    ``teacher[t] = (ids, logprobs)`` is the teacher distribution for predicting
    ``target_ids[t]``; positions without one are absent. ``teacher_top1[t]`` is the
    student id of the teacher's most likely alternative, where it maps.
    """

    request_id: str
    input_ids: list[int]
    target_ids: list[int]
    token_level: bool
    teacher: dict[int, tuple[list[int], list[float]]] = field(default_factory=dict)
    teacher_top1: dict[int, int] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return sum(1 for target in self.target_ids if target != IGNORE_INDEX)


def _valid_logprob(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and value > MASKED_LOGPROB_THRESHOLD


class SampleEncoder:
    """Encode stored rows into :class:`Sample` objects for one student tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        vocab: StudentVocab,
        *,
        max_seq_len: int,
        append_eos: bool = False,
        stats: MappingStats | None = None,
    ):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.max_seq_len = max_seq_len
        self.append_eos = append_eos
        self.stats = stats if stats is not None else MappingStats()

    def encode(self, row: dict[str, Any]) -> Sample | None:
        """Return the row's sample, or None when it has nothing to learn (counted)."""
        self.stats.rows_read += 1
        try:
            prompt_text, add_special = self._prompt_text(row)
        except ValueError as error:
            self.stats.rows_invalid += 1
            logger.debug("row %s skipped: %s", row.get("request_id"), error)
            return None

        prompt_ids = self._encode_text(prompt_text, add_special)
        mapped, reason = self._map_response_tokens(row)
        if mapped is not None:
            sample = self._token_level_sample(row, prompt_ids, mapped)
            self.stats.rows_token_level += 1
        else:
            sample = self._sequence_level_sample(row, prompt_text, add_special, prompt_ids)
            self.stats.rows_sequence_level += 1
            self.stats.fallback_reasons[reason] += 1

        targets = sample.num_targets
        if targets == 0:
            self.stats.rows_without_targets += 1
            return None
        self.stats.target_tokens += targets
        self.stats.positions_with_distribution += len(sample.teacher)
        return sample

    def _prompt_text(self, row: dict[str, Any]) -> tuple[str, bool]:
        """Return the prompt as the student should read it, and whether to add BOS."""
        if row.get("prompt") is not None:
            return row["prompt"], True
        if row.get("messages") is None:
            return "", True
        try:
            messages = json.loads(row["messages"])
        except json.JSONDecodeError as error:
            raise ValueError(f"messages is not valid JSON: {error}") from error
        if not isinstance(messages, list):
            raise ValueError("messages is not a JSON list")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            # The template writes its own BOS and markers.
            return text, False
        # NOTE: without a chat template the student reads the message contents joined
        # by newlines, as pipeline serve-teacher renders them. Another server may
        # render messages differently, so the student would read other prompt text.
        return "\n".join(str(m.get("content") or "") for m in messages), True

    def _encode_text(self, text: str, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _map_response_tokens(self, row: dict[str, Any]) -> tuple[list[int] | None, str]:
        """Return the student ids of the teacher's tokens, or None and the fallback reason."""
        tokens = row.get("tokens")
        if not tokens:
            return None, "no_logprobs"
        token_bytes = row.get("token_bytes") or [None] * len(tokens)
        raw = [teacher_token_bytes(text, data) for text, data in zip(tokens, token_bytes)]

        mapped = [self.vocab.lookup(data) for data in raw]
        self.stats.positions_total += len(mapped)
        self.stats.positions_mapped += sum(token_id is not None for token_id in mapped)

        if row.get("logprobs_lossy"):
            return None, "lossy"
        if row.get("token_level_ok") is False:
            return None, "not_token_level_ok"
        if any(data is None for data in raw) or b"".join(raw) != (row.get("response") or "").encode():
            return None, "token_bytes_mismatch"
        if any(token_id is None for token_id in mapped):
            return None, "unmapped_token"
        return mapped, ""

    def _eos_tail(self, row: dict[str, Any]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if self.append_eos and eos is not None and row.get("finish_reason") == "stop":
            return [eos]
        return []

    def _token_level_sample(
        self, row: dict[str, Any], prompt_ids: list[int], mapped: list[int]
    ) -> Sample:
        full = prompt_ids + mapped + self._eos_tail(row)
        input_ids, target_ids = self._inputs_and_targets(full, first_target=len(prompt_ids))
        sample = Sample(row.get("request_id") or "", input_ids, target_ids, token_level=True)

        top_logprobs = row.get("top_logprobs") or []
        token_logprobs = row.get("token_logprobs") or []
        for index, token_id in enumerate(mapped):
            # Response token ``index`` is predicted from the position just before it.
            position = len(prompt_ids) + index - 1
            if position < 0 or position >= len(input_ids):
                continue
            alternatives = top_logprobs[index] if index < len(top_logprobs) else None
            chosen_logprob = token_logprobs[index] if index < len(token_logprobs) else None
            distribution, top1 = self._teacher_distribution(
                alternatives or [], token_id, chosen_logprob
            )
            if distribution is not None:
                sample.teacher[position] = distribution
            if top1 is not None:
                sample.teacher_top1[position] = top1
        return sample

    def _teacher_distribution(
        self,
        alternatives: list[dict[str, Any] | None],
        chosen_id: int,
        chosen_logprob: float | None,
    ) -> tuple[tuple[list[int], list[float]] | None, int | None]:
        """Return the mapped teacher distribution at one position and the top-1 student id."""
        logprob_by_id: dict[int, float] = {}
        best_logprob = -math.inf
        top1: int | None = None
        for alternative in alternatives:
            self.stats.alternatives_total += 1
            logprob = alternative.get("logprob") if alternative else None
            if not _valid_logprob(logprob):
                self.stats.alternatives_masked += 1
                continue
            token_id = self.vocab.lookup(
                teacher_token_bytes(alternative.get("token"), alternative.get("bytes"))
            )
            if logprob > best_logprob:
                best_logprob = logprob
                top1 = token_id
            if token_id is None:
                continue
            self.stats.alternatives_mapped += 1
            if token_id in logprob_by_id:
                logprob_by_id[token_id] = float(np.logaddexp(logprob_by_id[token_id], logprob))
            else:
                logprob_by_id[token_id] = logprob

        if not logprob_by_id:
            # The sampled token alone is no distribution: the loss uses CE here.
            return None, top1
        if chosen_id not in logprob_by_id and _valid_logprob(chosen_logprob):
            logprob_by_id[chosen_id] = chosen_logprob
            if chosen_logprob > best_logprob:
                top1 = chosen_id
        return (list(logprob_by_id), list(logprob_by_id.values())), top1

    def _sequence_level_sample(
        self,
        row: dict[str, Any],
        prompt_text: str,
        add_special: bool,
        prompt_ids: list[int],
    ) -> Sample:
        response = row.get("response") or ""
        if getattr(self.tokenizer, "is_fast", False):
            # Tokenize prompt and response together, as the student will read them at
            # inference, and find the response's first token from character offsets.
            encoding = self.tokenizer(
                prompt_text + response,
                add_special_tokens=add_special,
                return_offsets_mapping=True,
            )
            ids = list(encoding["input_ids"])
            boundary = len(prompt_text)
            first = next(
                (i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > boundary),
                len(ids),
            )
        else:
            ids = prompt_ids + self._encode_text(response, False)
            first = len(prompt_ids)
        full = ids + self._eos_tail(row)
        input_ids, target_ids = self._inputs_and_targets(full, first_target=first)
        return Sample(row.get("request_id") or "", input_ids, target_ids, token_level=False)

    def _inputs_and_targets(self, full: list[int], first_target: int) -> tuple[list[int], list[int]]:
        """Shift ``full`` into inputs and targets; tokens before ``first_target`` get none."""
        if len(full) > self.max_seq_len + 1:
            self.stats.rows_truncated += 1
            full = full[: self.max_seq_len + 1]
        input_ids = full[:-1]
        target_ids = [
            token if index + 1 >= first_target else IGNORE_INDEX
            for index, token in enumerate(full[1:])
        ]
        return input_ids, target_ids


@dataclass
class Batch:
    """Padded student inputs plus packed per-target tensors.

    Only positions with a target are packed: ``rows`` contains their flat index
    ``b * seq_len + t`` into the ``[batch * seq_len, vocab]`` view of the logits, so the
    loss never touches prompt or padding positions. ``teacher_*`` are ``[N, K]`` with K
    the longest teacher distribution in the batch; shorter ones are padded and masked.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    rows: torch.Tensor
    target_ids: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    teacher_mask: torch.Tensor
    teacher_top1: torch.Tensor
    num_kl_positions: int
    num_input_tokens: int
    request_ids: list[str] = field(default_factory=list)

    @property
    def num_targets(self) -> int:
        return int(self.rows.numel())

    def to(self, device: torch.device | str) -> Batch:
        """Return a copy with every tensor on ``device``."""
        moved = {
            name: value.to(device, non_blocking=True)
            for name, value in vars(self).items()
            if isinstance(value, torch.Tensor)
        }
        return replace(self, **moved)


def collate(samples: list[Sample], pad_id: int, vocab_size: int) -> Batch:
    """Pad samples into a :class:`Batch`; raise ValueError on an id outside ``vocab_size``."""
    seq_len = max((len(sample.input_ids) for sample in samples), default=1)
    input_ids = np.full((len(samples), seq_len), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(samples), seq_len), dtype=np.int64)
    rows: list[int] = []
    targets: list[int] = []
    distributions: list[tuple[list[int], list[float]] | None] = []
    top1: list[int] = []

    for b, sample in enumerate(samples):
        length = len(sample.input_ids)
        input_ids[b, :length] = sample.input_ids
        attention_mask[b, :length] = 1
        for t, target in enumerate(sample.target_ids):
            if target == IGNORE_INDEX:
                continue
            rows.append(b * seq_len + t)
            targets.append(target)
            distributions.append(sample.teacher.get(t))
            top1.append(sample.teacher_top1.get(t, IGNORE_INDEX))

    width = max((len(d[0]) for d in distributions if d is not None), default=1)
    teacher_ids = np.zeros((len(rows), width), dtype=np.int64)
    teacher_logprobs = np.zeros((len(rows), width), dtype=np.float32)
    teacher_mask = np.zeros((len(rows), width), dtype=bool)
    for n, distribution in enumerate(distributions):
        if distribution is None:
            continue
        ids, logprobs = distribution
        teacher_ids[n, : len(ids)] = ids
        teacher_logprobs[n, : len(ids)] = logprobs
        teacher_mask[n, : len(ids)] = True

    _check_ids_fit(vocab_size, input_ids, targets, teacher_ids)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        rows=torch.tensor(rows, dtype=torch.int64),
        target_ids=torch.tensor(targets, dtype=torch.int64),
        teacher_ids=torch.from_numpy(teacher_ids),
        teacher_logprobs=torch.from_numpy(teacher_logprobs),
        teacher_mask=torch.from_numpy(teacher_mask),
        teacher_top1=torch.tensor(top1, dtype=torch.int64),
        num_kl_positions=int(teacher_mask.any(axis=1).sum()),
        num_input_tokens=int(attention_mask.sum()),
        request_ids=[sample.request_id for sample in samples],
    )


def _check_ids_fit(vocab_size: int, input_ids: np.ndarray, targets: list[int], teacher_ids: np.ndarray) -> None:
    # Checked here on the CPU: an out-of-range gather on CUDA is an asynchronous device
    # assert that kills the process without naming the id.
    largest = max(
        int(input_ids.max(initial=0)),
        max(targets, default=0),
        int(teacher_ids.max(initial=0)),
    )
    if largest >= vocab_size:
        raise ValueError(
            f"token id {largest} is outside the student's {vocab_size} logits; build the"
            " StudentVocab with vocab_limit set to the width of the student's logits"
        )


class StoreSamples:
    """Endless stream of training samples, reshuffled on every pass over the rows.

    The cursor ``(epoch, rows_read_in_epoch)`` is the stream's position. A stream
    created with that cursor resumes right after it. Mapping statistics count the
    first pass only, so they describe the data once.
    """

    def __init__(
        self,
        query: RowQuery,
        encoder: SampleEncoder,
        *,
        seed: int,
        rows_per_chunk: int = 256,
        epoch: int = 0,
        rows_read_in_epoch: int = 0,
    ):
        self.query = query
        self.encoder = encoder
        self.seed = seed
        self.rows_per_chunk = rows_per_chunk
        self.epoch = epoch
        self.rows_read_in_epoch = rows_read_in_epoch
        self.stats = encoder.stats

    @property
    def cursor(self) -> dict[str, int]:
        return {"epoch": self.epoch, "rows_read_in_epoch": self.rows_read_in_epoch}

    def _raise_nothing_to_train(self) -> None:
        if self.rows_read_in_epoch == 0:
            raise ConfigError(
                f"no rows in {self.query.store_dir} match the training filters"
                f" ({self.query.describe()}); check --store, --where,"
                " --include-truncated and --holdout-fraction"
            )
        raise ConfigError(
            f"none of the {self.rows_read_in_epoch} selected rows has a target token"
            f" ({self.stats.summary()}); raise --max-seq-len or check the stored responses"
        )

    def __iter__(self) -> Iterator[Sample]:
        for epoch in count(self.epoch):
            self.epoch = epoch
            if epoch > 0:
                self.encoder.stats = MappingStats()
            query = replace(self.query, order_seed=self.seed + epoch, offset=self.rows_read_in_epoch)
            produced = 0
            for row in iter_rows(query, self.rows_per_chunk):
                self.rows_read_in_epoch += 1
                sample = self.encoder.encode(row)
                if sample is not None:
                    produced += 1
                    yield sample
            if produced == 0 and query.offset == 0:
                self._raise_nothing_to_train()
            self.rows_read_in_epoch = 0


def iter_batches(
    samples: Iterable[Sample], batch_size: int, pad_id: int, vocab_size: int
) -> Iterator[Batch]:
    """Group samples into collated batches of ``batch_size`` (the last may be smaller)."""
    pending: list[Sample] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            yield collate(pending, pad_id, vocab_size)
            pending = []
    if pending:
        yield collate(pending, pad_id, vocab_size)


def pad_token_id(tokenizer: Any) -> int:
    """Return the id used to pad inputs: pad, else EOS, else UNK, else 0.

    Padded positions are masked out of attention and of the loss, so any valid id
    works. The tokenizer itself is not changed.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
