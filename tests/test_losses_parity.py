"""Chunked distillation losses against plain full-vocabulary PyTorch, and their memory use.

The reference computes ``log_softmax`` over whole logit rows with stock PyTorch ops and
lets autograd differentiate it. The chunked :class:`student.losses.GatheredLogSoftmax`
must match it in value and gradient for every row layout its chunk plan distinguishes.
Consecutive rows are read as views and written in place. Rows with gaps, unsorted rows
and low-precision logits go through chunk-sized buffers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from student.losses import _plan_chunks, distillation_loss_sums

BATCH, SEQ_LEN, TOP_K = 3, 10, 5


def plain_reference(logits, rows, targets, teacher_ids, teacher_logprobs, teacher_mask, *, mode, alpha, temperature):
    """Return (loss, ce_sum, kl_sum) computed over full logit rows with stock ops."""
    selected = logits.reshape(-1, logits.shape[-1])[rows].double()
    ce = F.cross_entropy(selected, targets, reduction="none")
    student_logp = F.log_softmax(selected / temperature, dim=-1).gather(1, teacher_ids)

    usable = teacher_mask & torch.isfinite(teacher_logprobs) & (teacher_logprobs > -1000.0)
    teacher_scaled = torch.where(usable, teacher_logprobs.double() / temperature, torch.tensor(-1e30, dtype=torch.double))
    teacher_logp = F.log_softmax(teacher_scaled, dim=-1)
    terms = torch.where(usable, teacher_logp.exp() * (teacher_logp - student_logp), 0.0)
    kl = temperature**2 * terms.sum(dim=1)
    has_teacher = usable.any(dim=1)
    teacher_term = torch.where(has_teacher, kl, ce)

    if mode == "sequence":
        per_position = ce
    elif mode == "topk":
        per_position = teacher_term
    else:
        per_position = (1 - alpha) * ce + alpha * teacher_term
    kl_sum = torch.where(has_teacher, kl, 0.0).sum()
    return per_position.sum(), ce.sum().item(), kl_sum.item()


def layout_rows(layout: str, total_rows: int, generator: torch.Generator) -> torch.Tensor:
    if layout == "all":
        return torch.arange(total_rows)
    if layout == "gaps":
        # Runs of consecutive rows with gaps, as after prompts and padding are left out.
        keep = torch.ones(total_rows, dtype=torch.bool)
        keep[[0, 1, 7, 12, 13, 14, 22]] = False
        return keep.nonzero().squeeze(1)
    if layout == "unsorted":
        return torch.randperm(total_rows, generator=generator)[: total_rows - 4]
    raise ValueError(layout)


def make_case(vocab_size: int, layout: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return logits and teacher tensors with masked, NaN, -inf and fully masked entries."""
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(BATCH, SEQ_LEN, vocab_size, generator=generator)).to(dtype).requires_grad_()
    rows = layout_rows(layout, BATCH * SEQ_LEN, generator)
    positions = rows.numel()
    targets = torch.randint(0, vocab_size, (positions,), generator=generator)
    teacher_ids = torch.stack([torch.randperm(vocab_size, generator=generator)[:TOP_K] for _ in range(positions)])
    teacher_logprobs = -torch.rand(positions, TOP_K, generator=generator) * 5 - 0.05
    teacher_mask = torch.rand(positions, TOP_K, generator=generator) > 0.2
    teacher_logprobs[1, 0] = float("nan")
    teacher_logprobs[2, 1] = float("-inf")
    teacher_logprobs[3, 2] = -9999.0
    teacher_mask[4] = False  # a position without a teacher distribution falls back to CE
    return logits, rows, targets, teacher_ids, teacher_logprobs, teacher_mask


@pytest.mark.parametrize("mode", ["sequence", "topk", "mixed"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("layout", ["all", "gaps", "unsorted"])
@pytest.mark.parametrize("vocab_size, chunk_rows", [(50, 1), (50, 3), (50, None), (2048, None)])
def test_chunked_matches_plain_reference(mode, temperature, layout, vocab_size, chunk_rows) -> None:
    # With vocabulary 2048 the default CPU chunk is 128 rows, so the default plan
    # has several chunks too.
    logits, rows, targets, ids, logprobs, mask = make_case(vocab_size, layout)
    sums = distillation_loss_sums(
        logits, rows, targets, ids, logprobs, mask,
        mode=mode, alpha=0.3, temperature=temperature, chunk_rows=chunk_rows,
    )
    sums.loss.backward()
    grad = logits.grad.clone()

    logits.grad = None
    expected, ce_expected, kl_expected = plain_reference(
        logits, rows, targets, ids, logprobs, mask, mode=mode, alpha=0.3, temperature=temperature
    )
    expected.backward()

    assert sums.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sums.ce_sum.item() == pytest.approx(ce_expected, rel=1e-5)
    if mode != "sequence":
        assert sums.kl_sum.item() == pytest.approx(kl_expected, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, logits.grad.float(), rtol=1e-4, atol=1e-6)


def test_rows_without_position_get_zero_gradient() -> None:
    logits, rows, targets, ids, logprobs, mask = make_case(50, "gaps")
    # Leave NaN in freed memory of the gradient's size, so a gradient allocated
    # without zeroing would likely show it.
    garbage = torch.full_like(logits, float("nan"))
    del garbage
    sums = distillation_loss_sums(logits, rows, targets, ids, logprobs, mask, mode="mixed", chunk_rows=4)
    sums.loss.backward()

    untouched = torch.ones(BATCH * SEQ_LEN, dtype=torch.bool)
    untouched[rows] = False
    flat_grad = logits.grad.reshape(BATCH * SEQ_LEN, -1)
    assert torch.count_nonzero(flat_grad[untouched]) == 0
    assert torch.isfinite(flat_grad).all()


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_mixed_weights_match_reference(alpha: float) -> None:
    logits, rows, targets, ids, logprobs, mask = make_case(50, "gaps", seed=4)
    sums = distillation_loss_sums(
        logits, rows, targets, ids, logprobs, mask, mode="mixed", alpha=alpha, temperature=2.0, chunk_rows=4
    )
    sums.loss.backward()
    grad = logits.grad.clone()

    logits.grad = None
    expected, _, _ = plain_reference(
        logits, rows, targets, ids, logprobs, mask, mode="mixed", alpha=alpha, temperature=2.0
    )
    expected.backward()
    assert sums.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, logits.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "mode, rows",
    [
        ("sequence", [1, 2, 3, 5, 6, 9, 10, 11]),
        ("topk", [1, 2, 3, 5, 6, 9, 10, 11]),
        ("mixed", [1, 2, 3, 5, 6, 9, 10, 11]),
        ("mixed", [7, 2, 3, 0, 11, 5]),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_loss_sums_gradcheck(mode: str, rows: list[int], temperature: float) -> None:
    # In chunks of 3 the first rows are consecutive (a view, written in place) and
    # the others are not (copied through buffers).
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    positions = len(rows)
    targets = torch.randint(0, 5, (positions,), generator=generator)
    ids = torch.stack([torch.randperm(5, generator=generator)[:3] for _ in range(positions)])
    logprobs = -torch.rand(positions, 3, generator=generator, dtype=torch.float64) * 3 - 0.1
    mask = torch.ones(positions, 3, dtype=torch.bool)
    mask[0] = False  # one position falls back to CE
    mask[1, 2] = False
    assert torch.autograd.gradcheck(
        lambda z: distillation_loss_sums(
            z, torch.tensor(rows), targets, ids, logprobs, mask,
            mode=mode, alpha=0.3, temperature=temperature, chunk_rows=3,
        ).loss,
        (logits,),
    )


@pytest.mark.parametrize("layout", ["all", "unsorted"])
def test_bfloat16_gradient_matches_float32(layout: str) -> None:
    logits, rows, targets, ids, logprobs, mask = make_case(50, layout, dtype=torch.bfloat16)
    as_float = logits.detach().float().requires_grad_()
    for tensor in (logits, as_float):
        sums = distillation_loss_sums(tensor, rows, targets, ids, logprobs, mask, mode="mixed", temperature=2.0, chunk_rows=4)
        sums.loss.backward()

    assert logits.grad.dtype == torch.bfloat16
    # The only difference is rounding the float32 gradient to bfloat16 (8 bits of mantissa).
    torch.testing.assert_close(logits.grad.float(), as_float.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(
    "rows, chunk_rows, expected",
    [
        ([0, 1, 2, 5, 6, 7, 8, 3], 3, [(0, 3, 0), (3, 6, 5), (6, 8, None)]),
        ([0, 1, 2, 4], 3, [(0, 3, 0), (3, 4, 4)]),
        ([0, 1, 2, 4], 2, [(0, 2, 0), (2, 4, None)]),
        ([3, 2, 1], 3, [(0, 3, None)]),
        ([9], 4, [(0, 1, 9)]),
    ],
)
def test_chunk_plan_finds_consecutive_rows(rows, chunk_rows, expected) -> None:
    assert _plan_chunks(torch.tensor(rows), chunk_rows) == expected


class AllocationRecorder(TorchDispatchMode):
    """Record the byte size of every tensor an op returns in new storage."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        # Views, in-place ops and out= ops return storage one of their inputs owns.
        input_storages = {
            tensor.untyped_storage().data_ptr()
            for tensor in tree_flatten((args, kwargs))[0]
            if isinstance(tensor, torch.Tensor)
        }
        for tensor in tree_flatten(output)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in input_storages:
                self.allocations.append((tensor.untyped_storage().nbytes(), str(func)))
        return output


@pytest.mark.parametrize("mode", ["sequence", "topk", "mixed"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("layout", ["all", "gaps"])
def test_loss_allocates_one_logits_sized_tensor(mode: str, temperature: float, layout: str) -> None:
    # 1024 rows of vocabulary 2048: the default CPU chunk is 128 rows, an eighth of the logits.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 256, 2048, generator=generator, requires_grad=True)
    rows = torch.arange(1024) if layout == "all" else torch.arange(0, 1024, 3)
    targets = torch.randint(0, 2048, (rows.numel(),), generator=generator)
    ids = torch.randint(0, 2048, (rows.numel(), 20), generator=generator)
    logprobs = torch.log_softmax(torch.randn(rows.numel(), 20, generator=generator), dim=1)
    mask = torch.ones_like(ids, dtype=torch.bool)

    with AllocationRecorder() as recorder:
        sums = distillation_loss_sums(logits, rows, targets, ids, logprobs, mask, mode=mode, temperature=temperature)
        sums.loss.backward()

    logits_bytes = logits.numel() * logits.element_size()
    large = [(size, op) for size, op in recorder.allocations if size > logits_bytes // 4]
    # The only tensor of the logits' size is their gradient; every other temporary is chunk-sized.
    assert len(large) == 1, large
    assert large[0][0] == logits_bytes
    assert torch.isfinite(logits.grad).all()
