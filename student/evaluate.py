"""Measure how close a student is to the teacher on stored responses.

Three numbers, each per target token of the teacher's responses:

- ``kl_nats_per_token``: KL(teacher top-k ‖ student) at temperature 1, with the teacher's
  alternatives renormalised over those that map to student ids (the training rule), on
  positions that have a teacher distribution;
- ``ce_nats_per_token``: the student's cross-entropy on the teacher's tokens (on the
  student's own tokenization for rows that fall back to sequence level);
- ``top1_agreement``: how often the student's argmax is the teacher's most likely
  alternative, on positions where that alternative maps to a student id.

The same functions serve ``pipeline eval`` and the trainer's periodic evaluation. By
default ``pipeline eval`` reads the held-out prompts, chosen by the same hash of the
prompt id and the same fraction as the training run (read from its train_state.json).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from student.config import DEFAULT_HOLDOUT_FRACTION, EvalConfig
from student.data import (
    IGNORE_INDEX,
    Batch,
    MappingStats,
    RowQuery,
    Sample,
    SampleEncoder,
    iter_batches,
    iter_rows,
    pad_token_id,
)
from student.losses import default_chunk_rows, distillation_loss_sums
from student.model import autocast_context, load_student, logits_width, resolve_device, resolve_dtype
from student.vocab import StudentVocab

logger = logging.getLogger(__name__)

TRAIN_STATE_FILE = "train_state.json"


@dataclass
class EvalResult:
    """Evaluation metrics; a metric is None when no position qualified for it."""

    rows: int = 0
    positions: int = 0
    kl_positions: int = 0
    top1_positions: int = 0
    kl_nats_per_token: float | None = None
    ce_nats_per_token: float | None = None
    top1_agreement: float | None = None
    split: str = "all"
    holdout_fraction: float = 0.0
    mapping: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def report(self) -> str:
        """Return a human-readable multi-line report."""

        def number(value: float | None, fmt: str) -> str:
            return "n/a" if value is None else format(value, fmt)

        top1 = "n/a" if self.top1_agreement is None else f"{100 * self.top1_agreement:.2f}%"
        lines = [
            f"split              {self.split} (holdout_fraction {self.holdout_fraction})",
            f"rows               {self.rows}",
            f"positions          {self.positions} (kl {self.kl_positions}, top1 {self.top1_positions})",
            f"kl_nats_per_token  {number(self.kl_nats_per_token, '.4f')}",
            f"ce_nats_per_token  {number(self.ce_nats_per_token, '.4f')}",
            f"top1_agreement     {top1}",
        ]
        if self.mapping:
            lines.append(
                f"mapped_positions   {100 * self.mapping.get('mapped_position_share', 0):.1f}%"
                f" (token_level rows {self.mapping.get('rows_token_level', 0)},"
                f" sequence_level rows {self.mapping.get('rows_sequence_level', 0)})"
            )
        return "\n".join(lines)


@dataclass
class _Totals:
    rows: int = 0
    positions: int = 0
    kl_positions: int = 0
    top1_positions: int = 0
    ce_sum: float = 0.0
    kl_sum: float = 0.0
    top1_hits: int = 0

    def result(self, **extra: Any) -> EvalResult:
        def mean(total: float, count: int) -> float | None:
            return total / count if count else None

        return EvalResult(
            rows=self.rows,
            positions=self.positions,
            kl_positions=self.kl_positions,
            top1_positions=self.top1_positions,
            kl_nats_per_token=mean(self.kl_sum, self.kl_positions),
            ce_nats_per_token=mean(self.ce_sum, self.positions),
            top1_agreement=mean(self.top1_hits, self.top1_positions),
            **extra,
        )


def _student_argmax(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Return the argmax id at each selected row, upcasting one chunk of rows at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    chunk = default_chunk_rows(logits.shape[-1], logits.device)
    parts = [
        flat.index_select(0, rows[start : start + chunk]).argmax(dim=-1)
        for start in range(0, rows.numel(), chunk)
    ]
    return torch.cat(parts) if parts else rows.new_zeros(0)


@torch.no_grad()
def evaluate_batches(
    model: Any, batches: Iterable[Batch], device: torch.device, dtype: torch.dtype
) -> EvalResult:
    """Return the metrics of ``model`` over ``batches``; restores the model's training mode."""
    was_training = model.training
    model.eval()
    totals = _Totals()
    try:
        for batch in batches:
            _accumulate(model, batch.to(device), device, dtype, totals)
    finally:
        model.train(was_training)
    return totals.result()


def _accumulate(model: Any, batch: Batch, device: torch.device, dtype: torch.dtype, totals: _Totals) -> None:
    totals.rows += batch.input_ids.shape[0]
    if batch.num_targets == 0:
        return
    with autocast_context(device, dtype):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    sums = distillation_loss_sums(
        logits,
        batch.rows,
        batch.target_ids,
        batch.teacher_ids,
        batch.teacher_logprobs,
        batch.teacher_mask,
        mode="topk",
        temperature=1.0,
    )
    totals.positions += batch.num_targets
    totals.ce_sum += float(sums.ce_sum)
    totals.kl_sum += float(sums.kl_sum)
    totals.kl_positions += int(sums.kl_tokens)

    has_top1 = batch.teacher_top1 != IGNORE_INDEX
    if bool(has_top1.any()):
        predicted = _student_argmax(logits, batch.rows[has_top1])
        totals.top1_hits += int((predicted == batch.teacher_top1[has_top1]).sum())
        totals.top1_positions += int(has_top1.sum())


def heldout_batches(
    query: RowQuery,
    encoder: SampleEncoder,
    *,
    batch_size: int,
    pad_id: int,
    vocab_size: int,
    max_rows: int | None = None,
    rows_per_chunk: int = 256,
) -> list[Batch]:
    """Encode up to ``max_rows`` samples of ``query`` into batches, kept in memory for reuse."""
    samples = encoded_samples(query, encoder, max_rows=max_rows, rows_per_chunk=rows_per_chunk)
    return list(iter_batches(samples, batch_size, pad_id, vocab_size))


def encoded_samples(
    query: RowQuery, encoder: SampleEncoder, *, max_rows: int | None, rows_per_chunk: int
) -> Iterator[Sample]:
    """Yield the samples of ``query`` in a stable order, at most ``max_rows`` of them."""
    samples = (sample for row in iter_rows(query, rows_per_chunk) if (sample := encoder.encode(row)))
    return islice(samples, max_rows) if max_rows is not None else samples


def evaluate_model(
    model: Any,
    tokenizer: Any,
    query: RowQuery,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 8,
    max_seq_len: int = 512,
    max_rows: int | None = None,
    rows_per_chunk: int = 256,
) -> EvalResult:
    """Return the metrics of a loaded student over the rows ``query`` selects."""
    vocab_size = logits_width(model)
    vocab = StudentVocab.from_tokenizer(tokenizer, vocab_limit=vocab_size)
    stats = MappingStats()
    encoder = SampleEncoder(tokenizer, vocab, max_seq_len=max_seq_len, append_eos=False, stats=stats)
    pad_id = pad_token_id(tokenizer)

    samples = encoded_samples(query, encoder, max_rows=max_rows, rows_per_chunk=rows_per_chunk)
    # Batches stream through; only one is in memory at a time.
    result = evaluate_batches(model, iter_batches(samples, batch_size, pad_id, vocab_size), device, dtype)
    result.split = query.split
    result.holdout_fraction = query.holdout_fraction
    result.mapping = stats.to_dict()
    return result


def checkpoint_holdout_fraction(student: str | Path) -> float | None:
    """Return the holdout fraction recorded in a checkpoint's train_state.json, if any."""
    state_path = Path(student) / TRAIN_STATE_FILE
    if not state_path.is_file():
        return None
    state = json.loads(state_path.read_text(encoding="utf-8"))
    return state.get("config", {}).get("holdout_fraction")


def evaluate_store(config: EvalConfig) -> EvalResult:
    """Load the student named in ``config`` and evaluate it on the store's rows."""
    config.validate()
    fraction = config.holdout_fraction
    if fraction is None:
        fraction = checkpoint_holdout_fraction(config.student)
    if fraction is None:
        fraction = DEFAULT_HOLDOUT_FRACTION
        if config.split != "all":
            logger.warning(
                "%s has no %s; using holdout fraction %.2f (pass --holdout-fraction to match"
                " the training run)", config.student, TRAIN_STATE_FILE, fraction,
            )

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    model, tokenizer = load_student(config.student, device)
    query = RowQuery(
        store_dir=config.store_dir,
        where=config.where,
        include_truncated=config.include_truncated,
        split=config.split,
        holdout_fraction=fraction,
    )
    return evaluate_model(
        model,
        tokenizer,
        query,
        device=device,
        dtype=dtype,
        batch_size=config.batch_size,
        max_seq_len=config.max_seq_len,
        max_rows=config.max_rows,
        rows_per_chunk=config.rows_per_chunk,
    )
