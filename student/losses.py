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

Memory: the student's logits are the only ``[tokens, vocab]`` tensor kept from forward
to backward, and backward allocates one gradient of that shape. :class:`GatheredLogSoftmax`
computes ``log_softmax`` at a few ids per row in chunks of rows and saves only the
per-row log-sum-exp. Backward recomputes the softmax chunk by chunk and writes straight
into the gradient of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from storage.schema import MASKED_LOGPROB_THRESHOLD
from student.config import LOSS_MODES

# Float32 elements of one chunk's temporary [rows, vocab] tensors (about 64 MiB each).
_CHUNK_ELEMENTS = 1 << 24
# Finite stand-in for log(0) at masked teacher entries: exp() of it is exactly 0 in
# float32, and unlike -inf it gives 0, not NaN, when multiplied by 0.
_MASKED_LOGIT = -1e30


def default_chunk_rows(vocab_size: int) -> int:
    """Return how many rows one chunk processes so its temporaries stay near 64 MiB."""
    return max(1, _CHUNK_ELEMENTS // max(vocab_size, 1))


class GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax`` of selected logit rows, evaluated only at given ids.

    Forward inputs: ``logits`` ``[R, V]`` (any float dtype), ``rows`` ``[N]`` unique row
    indices into it, ``label_ids`` ``[N]`` read at temperature 1, ``teacher_ids``
    ``[N, K]`` read at ``temperature`` (``K`` may be 0). Returns ``(label_logprobs [N],
    teacher_logprobs [N, K])`` in float32 (float64 for float64 logits).
    """

    @staticmethod
    def forward(ctx, logits, rows, label_ids, teacher_ids, temperature, chunk_rows):
        n_rows = rows.numel()
        # Half-precision logits are upcast chunk by chunk; float64 stays float64 so
        # gradcheck can verify the backward pass.
        dtype = torch.promote_types(logits.dtype, torch.float32)
        label_out = torch.empty(n_rows, dtype=dtype, device=logits.device)
        teacher_out = torch.empty(teacher_ids.shape, dtype=dtype, device=logits.device)
        lse = torch.empty(n_rows, dtype=dtype, device=logits.device)
        lse_t = torch.empty(n_rows, dtype=dtype, device=logits.device)
        use_teacher = teacher_ids.shape[1] > 0

        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            z = logits.index_select(0, rows[start:stop]).to(dtype)
            lse[start:stop] = torch.logsumexp(z, dim=-1)
            label_out[start:stop] = (
                z.gather(1, label_ids[start:stop, None]).squeeze(1) - lse[start:stop]
            )
            if not use_teacher:
                continue
            if temperature != 1.0:
                z = z / temperature
                lse_t[start:stop] = torch.logsumexp(z, dim=-1)
            else:
                lse_t[start:stop] = lse[start:stop]
            teacher_out[start:stop] = z.gather(1, teacher_ids[start:stop]) - lse_t[start:stop, None]

        ctx.save_for_backward(logits, rows, label_ids, teacher_ids, lse, lse_t)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return label_out, teacher_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_label, grad_teacher):
        logits, rows, label_ids, teacher_ids, lse, lse_t = ctx.saved_tensors
        temperature = ctx.temperature
        grad_logits = torch.zeros_like(logits)
        use_teacher = teacher_ids.shape[1] > 0 and grad_teacher is not None
        # In topk mode a row with a teacher distribution gives the label output a zero
        # gradient. When every row has one, the label's softmax pass is skipped.
        use_label = grad_label is not None and bool(grad_label.any())
        shared_softmax = use_teacher and use_label and temperature == 1.0

        for start in range(0, rows.numel(), ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, rows.numel())
            z = logits.index_select(0, rows[start:stop]).to(lse.dtype)

            # d/dz [z_y - lse(z)] = onehot(y) - softmax(z); at temperature T the same
            # with z / T and a chain-rule factor 1 / T.
            grad = None
            if use_teacher:
                teacher_grad = grad_teacher[start:stop] / temperature
                weight = teacher_grad.sum(dim=1)
                if shared_softmax:
                    weight = weight + grad_label[start:stop]
                scaled = z / temperature if temperature != 1.0 else z.clone()
                grad = scaled.sub_(lse_t[start:stop, None]).exp_().mul_(-weight[:, None])
                grad.scatter_add_(1, teacher_ids[start:stop], teacher_grad)
            if use_label:
                label_grad = grad_label[start:stop]
                if not shared_softmax:
                    softmax = z.sub_(lse[start:stop, None]).exp_().mul_(-label_grad[:, None])
                    grad = softmax if grad is None else grad.add_(softmax)
                grad.scatter_add_(1, label_ids[start:stop, None], label_grad[:, None])
            if grad is not None:
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
    chunk = chunk_rows or default_chunk_rows(vocab_size)
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
