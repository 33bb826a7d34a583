"""Distillation losses: cross-entropy on the teacher's tokens and top-k KL.

Per target position the loss is one of:

- ``sequence``: CE, ``-log q(y)`` with ``q = softmax(student logits)`` and ``y`` the
  teacher's token;
- ``topk``: the teacher term, ``T² · KL(p_T ‖ q_T)`` over the teacher's top-k student ids,
  where ``p_T = softmax(teacher_logprobs / T)`` renormalised over the k alternatives that
  are present (masked and padded ones excluded) and ``q_T = softmax(student_logits / T)``
  over the full student vocabulary, gathered at those ids. Positions without a teacher
  distribution (sequence-level samples, positions whose alternatives were all masked or
  unmapped) use CE on the teacher's token instead, which equals the KL against a
  one-hot teacher at temperature 1;
- ``mixed``: ``(1 - alpha) · CE + alpha · teacher term``.

The functions return sums over positions, never means: the trainer divides by the
number of target tokens in the whole gradient-accumulation window, so every token
weighs the same however the tokens fall into micro-batches.

Memory and time: the student's logits are the only ``[tokens, vocab]`` tensor kept from
forward to backward, and backward allocates one gradient of that shape.
:class:`GatheredLogSoftmax` computes ``log_softmax`` at a few ids per row in chunks of
rows and saves only the per-row log-sum-exp. Backward recomputes the softmax chunk by
chunk and writes it straight into the gradient of the logits. A chunk of consecutive rows
is read as a view of the logits, not copied. On the CPU, chunks are small enough that the
several passes over one chunk run from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from storage.schema import MASKED_LOGPROB_THRESHOLD
from student.config import LOSS_MODES

# Elements of one chunk's temporary [rows, vocab] tensors. On the CPU this is 1 MiB of
# float32. Every step of a chunk (max, exp, sum, scale) is a separate pass over it, and
# a chunk this size stays in the L2 cache of current x86 cores between passes. On a
# 2-core Xeon, log-sum-exp over [2048, 32000] float32 logits took 0.03 s in 8-row chunks
# against 0.11 s in 512-row (64 MiB) chunks. On a GPU each pass is a kernel launch, so
# chunks are large (64 MiB) to keep the launches few.
_CPU_CHUNK_ELEMENTS = 1 << 18
_GPU_CHUNK_ELEMENTS = 1 << 24
# Finite stand-in for log(0) at masked teacher entries: exp() of it is exactly 0 in
# float32, and unlike -inf it gives 0, not NaN, when multiplied by 0.
_MASKED_LOGIT = -1e30


def default_chunk_rows(vocab_size: int, device: torch.device | str | None = None) -> int:
    """Return how many rows one chunk processes on ``device`` (CPU when not given)."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    elements = _CPU_CHUNK_ELEMENTS if on_cpu else _GPU_CHUNK_ELEMENTS
    return max(1, elements // max(vocab_size, 1))


# One chunk of positions: [start, stop) into ``rows``, and the logits row of ``start``
# when the chunk's rows are consecutive (so the chunk is a slice of the logits), else None.
_Chunk = tuple[int, int, int | None]


def _plan_chunks(rows: torch.Tensor, chunk_rows: int) -> list[_Chunk]:
    """Split ``rows`` into chunks and find which chunks cover consecutive logits rows."""
    starts = torch.arange(0, rows.numel(), chunk_rows, device=rows.device)
    stops = torch.clamp(starts + chunk_rows, max=rows.numel())
    # breaks[i] counts the non-unit steps among rows[0..i], so a chunk is consecutive
    # when no break falls inside it.
    steps = rows[1:] - rows[:-1] != 1
    breaks = torch.cat([steps.new_zeros(1, dtype=torch.long), steps.long().cumsum(0)])
    consecutive = breaks[stops - 1] == breaks[starts]
    # One device-to-host copy for the whole plan.
    first_rows, flags = torch.stack([rows[starts], consecutive.long()]).tolist()
    return [
        (start, min(start + chunk_rows, rows.numel()), first if flag else None)
        for start, first, flag in zip(range(0, rows.numel(), chunk_rows), first_rows, flags)
    ]


class _ChunkBuffers:
    """Chunk-sized scratch tensors, allocated once per pass and reused by every chunk.

    Reuse keeps allocation, and the page faults of newly mapped memory, out of the
    per-chunk loop.
    """

    def __init__(self, chunk_rows: int, vocab_size: int, dtype: torch.dtype, device: torch.device):
        self._shape = (chunk_rows, vocab_size)
        self._dtype = dtype
        self._device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        """Return the buffer ``name`` cut to ``rows`` rows. Its contents are undefined."""
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = torch.empty(self._shape, dtype=self._dtype, device=self._device)
            self._buffers[name] = buffer
        return buffer[:rows]


def _chunk_logits(
    logits: torch.Tensor, rows: torch.Tensor, chunk: _Chunk, buffers: _ChunkBuffers, dtype: torch.dtype
) -> torch.Tensor:
    """Return one chunk's logits rows in ``dtype``: a view when possible, else a copy in a buffer.

    Callers never write to the result, because it may be a view of the logits.
    """
    start, stop, first_row = chunk
    if first_row is not None:
        selected = logits[first_row : first_row + stop - start]
        if selected.dtype == dtype:
            return selected
        return buffers.get("logits", stop - start).copy_(selected)
    if logits.dtype == dtype:
        return torch.index_select(logits, 0, rows[start:stop], out=buffers.get("logits", stop - start))
    return buffers.get("logits", stop - start).copy_(logits.index_select(0, rows[start:stop]))


def _row_max(z: torch.Tensor) -> torch.Tensor:
    """Return each row's max, with infinities replaced by 0 as ``torch.logsumexp`` does."""
    row_max = z.amax(dim=-1)
    return row_max.masked_fill_(row_max.abs() == float("inf"), 0.0)


def _logsumexp(z: torch.Tensor, row_max: torch.Tensor, temperature: float, work: torch.Tensor) -> torch.Tensor:
    """Return ``logsumexp(z / temperature)`` per row, using ``work`` as the only temporary."""
    # exp((z - max) / T) in one pass: z / T - max / T.
    torch.add(-row_max[:, None] / temperature, z, alpha=1.0 / temperature, out=work)
    return work.exp_().sum(dim=-1).log_().add_(row_max / temperature)


def _scaled_softmax_into(
    out: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, temperature: float, weight: torch.Tensor
) -> torch.Tensor:
    """Write ``-weight * softmax(z / temperature)`` into ``out``, using the saved log-sum-exp."""
    # z / T - lse in one pass, then exp and scale in place.
    torch.add(-lse[:, None], z, alpha=1.0 / temperature, out=out)
    return out.exp_().mul_(-weight[:, None])


def _zero_rows_without_position(grad_logits: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero the gradient rows that no position reads, since backward writes only the others."""
    if rows.numel() == grad_logits.shape[0]:
        return  # rows are unique, so they cover every row
    covered = torch.zeros(grad_logits.shape[0], dtype=torch.bool, device=grad_logits.device)
    covered[rows] = True
    grad_logits[~covered] = 0


class GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax`` of selected logit rows, evaluated only at given ids.

    Forward inputs: ``logits`` ``[R, V]`` (any float dtype), ``rows`` ``[N]`` unique row
    indices into it, ``label_ids`` ``[N]`` read at temperature 1, ``teacher_ids``
    ``[N, K]`` read at ``temperature`` (``K`` may be 0), ``chunk_rows`` positions per
    chunk. Returns ``(label_logprobs [N], teacher_logprobs [N, K])`` in float32 (float64
    for float64 logits).
    """

    @staticmethod
    def forward(ctx, logits, rows, label_ids, teacher_ids, temperature, chunk_rows):
        # Half-precision logits are upcast chunk by chunk; float64 stays float64 so
        # gradcheck can verify the backward pass.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        n_rows = rows.numel()
        label_out = torch.empty(n_rows, dtype=dtype, device=logits.device)
        teacher_out = torch.empty(teacher_ids.shape, dtype=dtype, device=logits.device)
        lse = torch.empty(n_rows, dtype=dtype, device=logits.device)
        lse_t = torch.empty(n_rows, dtype=dtype, device=logits.device)
        plan = _plan_chunks(rows, chunk_rows)
        buffers = _ChunkBuffers(min(chunk_rows, n_rows), logits.shape[1], dtype, logits.device)

        for chunk in plan:
            start, stop, _ = chunk
            z = _chunk_logits(logits, rows, chunk, buffers, dtype)
            row_max = _row_max(z)
            work = buffers.get("work", stop - start)
            lse[start:stop] = _logsumexp(z, row_max, 1.0, work)
            label_out[start:stop] = z.gather(1, label_ids[start:stop, None]).squeeze(1) - lse[start:stop]
            if teacher_ids.shape[1] == 0:
                continue
            if temperature != 1.0:
                # max(z / T) = max(z) / T because T > 0.
                lse_t[start:stop] = _logsumexp(z, row_max, temperature, work)
            else:
                lse_t[start:stop] = lse[start:stop]
            teacher_logits = z.gather(1, teacher_ids[start:stop]) / temperature
            teacher_out[start:stop] = teacher_logits - lse_t[start:stop, None]

        ctx.save_for_backward(logits, rows, label_ids, teacher_ids, lse, lse_t)
        ctx.temperature = temperature
        ctx.plan = plan
        ctx.chunk_rows = chunk_rows
        return label_out, teacher_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_label, grad_teacher):
        logits, rows, label_ids, teacher_ids, lse, lse_t = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        _zero_rows_without_position(grad_logits, rows)
        buffers = _ChunkBuffers(min(ctx.chunk_rows, rows.numel()), logits.shape[1], lse.dtype, logits.device)
        use_teacher = teacher_ids.shape[1] > 0 and grad_teacher is not None
        # In topk mode a row with a teacher distribution gives the label output a zero
        # gradient. When every row has one, the label's softmax pass is skipped.
        use_label = grad_label is not None and bool(grad_label.any())
        shared_softmax = use_teacher and use_label and temperature == 1.0

        for chunk in ctx.plan:
            start, stop, first_row = chunk
            z = _chunk_logits(logits, rows, chunk, buffers, lse.dtype)
            # A chunk of consecutive rows in the compute dtype is written in place in
            # the gradient; any other goes through a buffer.
            in_place = first_row is not None and grad_logits.dtype == lse.dtype
            if in_place:
                grad = grad_logits[first_row : first_row + stop - start]
            else:
                grad = buffers.get("grad", stop - start)

            # d/dz [z_y - lse(z)] = onehot(y) - softmax(z); at temperature T the same
            # with z / T and a chain-rule factor 1 / T.
            written = False
            if use_teacher:
                teacher_grad = grad_teacher[start:stop] / temperature
                weight = teacher_grad.sum(dim=1)
                if shared_softmax:
                    weight = weight + grad_label[start:stop]
                _scaled_softmax_into(grad, z, lse_t[start:stop], temperature, weight)
                grad.scatter_add_(1, teacher_ids[start:stop], teacher_grad)
                written = True
            if use_label:
                label_grad = grad_label[start:stop]
                if not shared_softmax:
                    if written:
                        work = buffers.get("work", stop - start)
                        grad.add_(_scaled_softmax_into(work, z, lse[start:stop], 1.0, label_grad))
                    else:
                        _scaled_softmax_into(grad, z, lse[start:stop], 1.0, label_grad)
                        written = True
                grad.scatter_add_(1, label_ids[start:stop, None], label_grad[:, None])
            if not written:
                grad.zero_()

            if in_place:
                continue
            if first_row is not None:
                grad_logits[first_row : first_row + stop - start] = grad
            else:
                grad_logits.index_copy_(0, rows[start:stop], grad.to(grad_logits.dtype))
        return grad_logits, None, None, None, None, None


def gathered_log_softmax(
    logits: torch.Tensor,
    rows: torch.Tensor,
    label_ids: torch.Tensor,
    teacher_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return student log-probs at the labels (T=1) and at the teacher ids (T=temperature).

    ``logits`` is ``[..., V]`` and is viewed as ``[R, V]``; ``rows`` indexes that view.
    """
    vocab_size = logits.shape[-1]
    flat = logits.reshape(-1, vocab_size)
    if teacher_ids is None:
        teacher_ids = label_ids.new_zeros((label_ids.numel(), 0))
    chunk = chunk_rows or default_chunk_rows(vocab_size, logits.device)
    return GatheredLogSoftmax.apply(flat, rows, label_ids, teacher_ids, float(temperature), chunk)


@dataclass
class LossSums:
    """Loss terms of one micro-batch, summed over positions.

    ``loss`` carries the graph; ``ce_sum``, ``kl_sum`` and ``kl_tokens`` are detached
    tensors, read with ``.item()`` only when logging so a GPU step never waits on them.
    ``kl_sum`` covers only the ``kl_tokens`` positions that have a teacher distribution;
    it is ``T²``-scaled like the loss.
    """

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    num_targets: int
    kl_tokens: torch.Tensor


def teacher_log_probs(
    teacher_logprobs: torch.Tensor, teacher_mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the teacher's renormalised log-probs at temperature T, and the usable mask.

    Entries are usable when the mask is set and the value is a finite logprob above the
    masked threshold. Unusable entries are replaced with a finite stand-in before any
    arithmetic, so NaN or -inf padding never reaches a product or a gradient.
    """
    usable = (
        teacher_mask
        & torch.isfinite(teacher_logprobs)
        & (teacher_logprobs > MASKED_LOGPROB_THRESHOLD)
    )
    safe = torch.where(usable, teacher_logprobs.float(), 0.0)
    scaled = torch.where(usable, safe / temperature, _MASKED_LOGIT)
    return torch.log_softmax(scaled, dim=-1), usable


def distillation_loss_sums(
    logits: torch.Tensor,
    rows: torch.Tensor,
    target_ids: torch.Tensor,
    teacher_ids: torch.Tensor | None,
    teacher_logprobs: torch.Tensor | None,
    teacher_mask: torch.Tensor | None,
    *,
    mode: str,
    alpha: float = 0.5,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> LossSums:
    """Return the summed loss terms of one micro-batch (see the module docstring).

    ``rows`` are flat indices into the ``[batch * seq_len, vocab]`` view of ``logits``
    for the ``N`` positions with a target; the teacher tensors are ``[N, K]``.
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"loss mode {mode!r} is not supported; use one of {', '.join(LOSS_MODES)}")
    if rows.numel() == 0:
        # An empty slice keeps the graph connected: backward gives exact zero gradients.
        zero = logits.reshape(-1)[:0].sum()
        detached = zero.detach().float()
        return LossSums(zero, detached, detached.clone(), 0, detached.long())

    if mode == "sequence" or teacher_ids is None or teacher_ids.shape[1] == 0:
        # Without teacher distributions every mode reduces to CE on the teacher's tokens.
        label_logprobs, _ = gathered_log_softmax(logits, rows, target_ids, chunk_rows=chunk_rows)
        ce = -label_logprobs
        zero = ce.new_zeros(())
        return LossSums(ce.sum(), ce.detach().sum(), zero, int(rows.numel()), zero.long())

    teacher_logp, usable = teacher_log_probs(teacher_logprobs, teacher_mask, temperature)
    safe_ids = torch.where(usable, teacher_ids, torch.zeros_like(teacher_ids))
    label_logprobs, student_logp = gathered_log_softmax(
        logits, rows, target_ids, safe_ids, temperature, chunk_rows
    )
    ce = -label_logprobs

    # KL(p ‖ q) = Σ p (log p − log q) over the usable entries, times T² so gradient
    # magnitudes do not shrink as the temperature grows.
    terms = torch.exp(teacher_logp) * (teacher_logp - student_logp)
    kl = temperature**2 * torch.where(usable, terms, torch.zeros_like(terms)).sum(dim=1)
    has_teacher = usable.any(dim=1)
    teacher_term = torch.where(has_teacher, kl, ce)

    per_position = teacher_term if mode == "topk" else (1 - alpha) * ce + alpha * teacher_term
    kl_sum = torch.where(has_teacher, kl, torch.zeros_like(kl)).detach().sum()
    return LossSums(
        loss=per_position.sum(),
        ce_sum=ce.detach().sum(),
        kl_sum=kl_sum,
        num_targets=int(rows.numel()),
        kl_tokens=has_teacher.sum(),
    )
