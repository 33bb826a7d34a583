"""Distillation losses against plain reference computations, and their behaviour on masks."""

from __future__ import annotations

import math

import pytest
import torch

from student.data import IGNORE_INDEX, Sample, collate
from student.losses import distillation_loss_sums, gathered_log_softmax, teacher_log_probs

VOCAB = 13


def reference_loss(logits, rows, targets, teacher, *, mode, alpha=0.5, temperature=1.0):
    """Sum of per-position losses by explicit loops over positions and alternatives.

    ``teacher[n]`` is a list of (student id, teacher logprob) pairs, possibly empty;
    entries with a None, non-finite or masked logprob are left out.
    """
    flat = logits.reshape(-1, logits.shape[-1]).double()
    total = flat.new_zeros(())
    ce_total = 0.0
    kl_total = 0.0
    for n, row in enumerate(rows):
        log_q = torch.log_softmax(flat[row], dim=-1)
        log_q_t = torch.log_softmax(flat[row] / temperature, dim=-1)
        ce = -log_q[targets[n]]
        ce_total += float(ce.detach())

        usable = [
            (token, lp) for token, lp in teacher[n]
            if lp is not None and math.isfinite(lp) and lp > -1000.0
        ]
        if usable:
            scaled = [lp / temperature for _, lp in usable]
            norm = math.log(sum(math.exp(s) for s in scaled))
            kl = flat.new_zeros(())
            for (token, _), s in zip(usable, scaled):
                log_p = s - norm
                kl = kl + math.exp(log_p) * (log_p - log_q_t[token])
            kl = temperature**2 * kl
            kl_total += float(kl.detach())
            teacher_term = kl
        else:
            teacher_term = ce

        if mode == "sequence":
            total = total + ce
        elif mode == "topk":
            total = total + teacher_term
        else:
            total = total + (1 - alpha) * ce + alpha * teacher_term
    return total, ce_total, kl_total


def pack_teacher(teacher, width=None):
    """Pad per-position (id, logprob) lists into [N, K] tensors with a mask."""
    width = width or max(1, max(len(entries) for entries in teacher))
    ids = torch.zeros((len(teacher), width), dtype=torch.long)
    logprobs = torch.zeros((len(teacher), width))
    mask = torch.zeros((len(teacher), width), dtype=torch.bool)
    for n, entries in enumerate(teacher):
        for k, (token, lp) in enumerate(entries):
            ids[n, k] = token
            logprobs[n, k] = float("nan") if lp is None else lp
            mask[n, k] = True
    return ids, logprobs, mask


def random_case(seed=0, positions=7, every_position_has_teacher=False):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2, 5, VOCAB, generator=generator)).requires_grad_()
    rows = [1, 2, 4, 5, 6, 8, 9][:positions]
    targets = torch.randint(0, VOCAB, (len(rows),), generator=generator).tolist()
    teacher = []
    for n in range(len(rows)):
        # Variable-length top-k, including an empty list, as teachers return them.
        count = [3, 1, 0, 4, 2, 3, 1][n] or (2 if every_position_has_teacher else 0)
        ids = torch.randperm(VOCAB, generator=generator)[:count].tolist()
        lps = (-torch.rand(count, generator=generator) * 4 - 0.1).tolist()
        teacher.append(list(zip(ids, lps)))
    return logits, rows, targets, teacher


def run_loss(logits, rows, targets, teacher, **kwargs):
    ids, logprobs, mask = pack_teacher(teacher)
    return distillation_loss_sums(
        logits,
        torch.tensor(rows),
        torch.tensor(targets),
        ids,
        logprobs,
        mask,
        **kwargs,
    )


@pytest.mark.parametrize("mode", ["sequence", "topk", "mixed"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_rows", [None, 2])
@pytest.mark.parametrize("every_position_has_teacher", [False, True])
def test_loss_matches_reference(
    mode: str, temperature: float, chunk_rows: int | None, every_position_has_teacher: bool
) -> None:
    logits, rows, targets, teacher = random_case(every_position_has_teacher=every_position_has_teacher)
    sums = run_loss(
        logits, rows, targets, teacher,
        mode=mode, alpha=0.3, temperature=temperature, chunk_rows=chunk_rows,
    )
    sums.loss.backward()
    grad = logits.grad.clone()

    logits.grad = None
    expected, ce_expected, kl_expected = reference_loss(
        logits, rows, targets, teacher, mode=mode, alpha=0.3, temperature=temperature
    )
    expected.backward()

    assert sums.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    assert sums.ce_sum.item() == pytest.approx(ce_expected, rel=1e-5)
    if mode != "sequence":
        assert sums.kl_sum.item() == pytest.approx(kl_expected, rel=1e-5, abs=1e-6)
        assert sums.kl_tokens.item() == sum(1 for entries in teacher if entries)
    assert sums.num_targets == len(rows)
    torch.testing.assert_close(grad, logits.grad.float(), rtol=1e-4, atol=1e-6)


def test_gathered_log_softmax_gradcheck() -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, VOCAB, dtype=torch.float64, generator=generator, requires_grad=True)
    rows = torch.tensor([0, 3, 5, 11])
    labels = torch.tensor([1, 7, 12, 0])
    teacher_ids = torch.randint(0, VOCAB, (4, 3), generator=generator)
    for temperature in (1.0, 0.5, 3.0):
        assert torch.autograd.gradcheck(
            lambda z: gathered_log_softmax(z, rows, labels, teacher_ids, temperature, chunk_rows=3),
            (logits,),
        )


def test_bfloat16_logits_upcast_per_chunk() -> None:
    logits, rows, targets, teacher = random_case(seed=5)
    full = run_loss(logits.detach().float(), rows, targets, teacher, mode="topk", temperature=2.0)
    half = run_loss(logits.detach().bfloat16(), rows, targets, teacher, mode="topk", temperature=2.0)
    assert half.loss.dtype == torch.float32
    assert half.loss.item() == pytest.approx(full.loss.item(), rel=2e-2)


def test_kl_is_zero_when_student_matches_renormalised_teacher() -> None:
    # The teacher's three alternatives carry 60% of its mass; renormalised they are
    # (0.5, 0.3, 0.2). A student with exactly that distribution over the three ids
    # (and none elsewhere) has KL 0 against the renormalised teacher.
    probs = torch.tensor([0.3, 0.18, 0.12])
    logits = torch.full((1, 1, VOCAB), -1e4)
    logits[0, 0, :3] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    teacher = [[(0, math.log(0.3)), (1, math.log(0.18)), (2, math.log(0.12))]]
    assert probs.sum().item() == pytest.approx(0.6)
    sums = run_loss(logits, [0], [0], teacher, mode="topk")
    assert sums.kl_sum.item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_temperature_flattens_distribution() -> None:
    logprobs = torch.tensor([[math.log(0.8), math.log(0.2)]])
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    sharp, _ = teacher_log_probs(logprobs, mask, temperature=1.0)
    flat, _ = teacher_log_probs(logprobs, mask, temperature=2.0)
    assert sharp.exp().tolist()[0] == pytest.approx([0.8, 0.2])
    # softmax(log p / 2) is proportional to sqrt(p): sqrt(.8) : sqrt(.2) = 2 : 1.
    assert flat.exp().tolist()[0] == pytest.approx([2 / 3, 1 / 3])


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), -9999.0, -1e30])
def test_masked_values_keep_gradients_finite(bad: float) -> None:
    logits, rows, targets, teacher = random_case(seed=1)
    ids, logprobs, mask = pack_teacher(teacher)
    # Padding and masked entries contain the bad value. So does one unmasked entry, as
    # from a teacher that sent -inf for a real alternative, and it must count as masked.
    logprobs = torch.where(mask, logprobs, torch.full_like(logprobs, bad))
    logprobs[0, 0] = bad
    sums = distillation_loss_sums(
        logits, torch.tensor(rows), torch.tensor(targets), ids, logprobs, mask,
        mode="mixed", temperature=2.0,
    )
    sums.loss.backward()

    assert math.isfinite(sums.loss.item())
    assert torch.isfinite(logits.grad).all()

    cleaned = [entries[1:] if n == 0 else entries for n, entries in enumerate(teacher)]
    expected, _, _ = reference_loss(logits, rows, targets, cleaned, mode="mixed", temperature=2.0)
    assert sums.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_extreme_student_logits_stay_finite() -> None:
    logits = torch.zeros(1, 3, VOCAB)
    logits[0, :, 0] = 1e4
    logits[0, :, 1] = -1e4
    logits.requires_grad_()
    teacher = [[(1, -0.1), (2, -3.0)], [(0, -0.5)], []]
    sums = run_loss(logits, [0, 1, 2], [1, 0, 3], teacher, mode="mixed", temperature=4.0)
    sums.loss.backward()
    assert math.isfinite(sums.loss.item())
    assert torch.isfinite(logits.grad).all()


def test_all_masked_sample_adds_nothing() -> None:
    # Sample 0 has targets; sample 1's prompt filled the context, so it has none.
    learning = Sample("a", [5, 6, 7, 8], [IGNORE_INDEX, 7, 8, 9], True, {1: ([7, 3], [-0.2, -2.0])})
    empty = Sample("b", [5, 6, 7, 8, 9, 10], [IGNORE_INDEX] * 6, True)
    both = collate([learning, empty], pad_id=0, vocab_size=VOCAB)
    alone = collate([learning], pad_id=0, vocab_size=VOCAB)
    assert both.num_targets == alone.num_targets == 3

    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, both.input_ids.shape[1], VOCAB, generator=generator, requires_grad=True)
    sums = distillation_loss_sums(
        logits, both.rows, both.target_ids, both.teacher_ids, both.teacher_logprobs,
        both.teacher_mask, mode="mixed",
    )
    sums.loss.backward()

    single = logits.detach()[:1, : alone.input_ids.shape[1]].clone().requires_grad_()
    expected = distillation_loss_sums(
        single, alone.rows, alone.target_ids, alone.teacher_ids, alone.teacher_logprobs,
        alone.teacher_mask, mode="mixed",
    )
    assert sums.loss.item() == pytest.approx(expected.loss.item(), rel=1e-6)
    assert torch.count_nonzero(logits.grad[1]) == 0
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("mode", ["sequence", "topk", "mixed"])
def test_all_masked_batch_zero_loss(mode: str) -> None:
    empty = Sample("b", [5, 6, 7], [IGNORE_INDEX] * 3, True)
    batch = collate([empty, empty], pad_id=0, vocab_size=VOCAB)
    weight = torch.randn(VOCAB, 4, requires_grad=True)
    logits = torch.randn(2, 3, 4) @ weight.T
    sums = distillation_loss_sums(
        logits, batch.rows, batch.target_ids, batch.teacher_ids, batch.teacher_logprobs,
        batch.teacher_mask, mode=mode,
    )
    sums.loss.backward()
    assert sums.loss.item() == 0.0
    assert sums.num_targets == 0
    assert torch.isfinite(weight.grad).all()
    assert torch.count_nonzero(weight.grad) == 0


def test_unsupported_mode_rejected() -> None:
    logits, rows, targets, teacher = random_case()
    with pytest.raises(ValueError, match="sequence, topk, mixed"):
        run_loss(logits, rows, targets, teacher, mode="reverse_kl")
