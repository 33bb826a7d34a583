"""Training steps with top-k KD, sequence-level CE and plain cross-entropy: time and peak memory.

Every variant runs on the same model and the same batch: forward, loss, backward and an
AdamW update, as the trainer's step does (``Trainer._loss_step`` without autocast, on
one micro-batch). The losses are the project's :func:`student.losses.distillation_loss_sums`
in ``sequence`` mode (CE on the teacher's tokens), ``topk`` mode (KL over the teacher's
top-k alternatives) and ``mixed`` mode, plus ``torch.nn.functional.cross_entropy`` on
the full logits as the plain reference. ``--baseline-losses FILE`` adds each mode once
more with ``distillation_loss_sums`` from another copy of the losses module (for example
the committed one, from ``git show HEAD:student/losses.py``), so a change is measured
against its baseline in the same process and under the same load.

Timing: each model runs in its own child process. After warm-up rounds, every round runs
each variant once, in an order rotated by one per round, so load on a shared machine
falls on all variants alike. A ratio such as topk / sequence is computed within each
round and the median over rounds is reported. Per variant the table has the fastest and
the median step (wall clock), the median process CPU time per step, and tokens/s from
the fastest step.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` during a step minus the allocation
before it. On CPU, tracemalloc does not see torch's allocations and RSS does not fall when
memory is freed. So a thread samples the bytes malloc has handed out (glibc ``mallinfo2``)
every 0.5 ms, and the figure is the largest sample minus the value before the step. Both
count memory in use, not memory cached by the allocator, so variants can share a process.
It is an estimate that can miss a peak shorter than the interval. Each variant's figure is
the largest of ``--memory-steps`` steps, measured after warm-up and apart from the timed steps.

Models: ``tiny`` is the real stories260k checkpoint (vocabulary 512). ``wide`` is a
randomly initialised Llama with a 32,000-token vocabulary, where the logits dominate
memory as they do in real students.

    python -m benchmarks.bench_train --models tiny,wide --steps 10
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import TINY_MODEL_DIR, last_json_line, print_table, run_measured, write_results

MODES = ("ce-reference", "sequence", "topk", "mixed")
# (numerator, denominator) mode pairs whose per-round step-time ratios are reported.
RATIO_PAIRS = (("topk", "sequence"), ("topk", "ce-reference"), ("mixed", "sequence"), ("sequence", "ce-reference"))
WIDE_CONFIG = {
    "vocab_size": 32_000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


class MallocSampler:
    """Sample the bytes glibc's malloc has handed out, in a thread, and keep the largest value.

    ``uordblks + hblkhd`` of ``mallinfo2`` counts memory in use by the program, heap and
    mmap alike, and unlike RSS it falls when memory is freed, so a step that reuses
    memory freed by an earlier step is still measured. torch's CPU allocator uses malloc.
    """

    def __init__(self, interval_s: float = 0.0005):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self._mallinfo2 = libc.mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.start = self.in_use()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)

    def in_use(self) -> int:
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.in_use())
            time.sleep(self._interval_s)

    def __enter__(self) -> MallocSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())


def build_model(name: str, device: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "tiny":
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    elif name == "wide":
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**WIDE_CONFIG))
    else:
        raise ValueError(f"unknown model {name!r}; use tiny or wide")
    return model.to(device).train()


def build_batch(vocab_size: int, batch_size: int, seq_len: int, top_k: int, device: Any) -> dict[str, Any]:
    """Return a batch with a target and a top-k teacher distribution at every position."""
    import torch

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    targets = torch.randint(3, vocab_size, (batch_size, seq_len), generator=generator)
    positions = batch_size * seq_len
    # Random ids may repeat within a row; that changes no cost of the loss.
    teacher_ids = torch.randint(3, vocab_size, (positions, top_k), generator=generator)
    teacher_ids[:, 0] = targets.reshape(-1)
    logits = torch.randn(positions, top_k, generator=generator).sort(dim=1, descending=True).values * 2
    teacher_logprobs = torch.log_softmax(logits, dim=1) - 0.1  # leave mass outside the top-k
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": targets,
        "rows": torch.arange(positions),
        "target_ids": targets.reshape(-1),
        "teacher_ids": teacher_ids,
        "teacher_logprobs": teacher_logprobs.float(),
        "teacher_mask": torch.ones(positions, top_k, dtype=torch.bool),
    }
    return {name: value.to(device) for name, value in batch.items()}


@dataclass
class Variant:
    """One measured configuration: a loss mode and the ``distillation_loss_sums`` to call."""

    name: str
    mode: str
    loss_sums: Callable[..., Any] | None  # None for ce-reference


def load_loss_sums(path: Path) -> Callable[..., Any]:
    """Import ``distillation_loss_sums`` from a copy of the losses module at ``path``."""
    spec = importlib.util.spec_from_file_location(f"baseline_losses_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path} as a Python module. Pass a copy of student/losses.py.")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the defining module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.distillation_loss_sums


def build_variants(modes: list[str], baseline_path: str | None, baseline_label: str) -> list[Variant]:
    from student.losses import distillation_loss_sums

    variants = [Variant(mode, mode, None if mode == "ce-reference" else distillation_loss_sums) for mode in modes]
    if baseline_path:
        baseline = load_loss_sums(Path(baseline_path))
        variants += [
            Variant(f"{mode}@{baseline_label}", mode, baseline) for mode in modes if mode != "ce-reference"
        ]
    return variants


def train_step(model: Any, optimizer: Any, batch: dict[str, Any], variant: Variant) -> float:
    import torch.nn.functional as F

    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    if variant.loss_sums is None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    else:
        sums = variant.loss_sums(
            logits, batch["rows"], batch["target_ids"], batch["teacher_ids"],
            batch["teacher_logprobs"], batch["teacher_mask"], mode=variant.mode,
        )
        loss = sums.loss / sums.num_targets
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def measure_peak_mb(step: Callable[[], float], device: Any) -> float:
    """Return the memory one call of ``step`` needs beyond what was allocated before it."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with MallocSampler() as sampler:
        step()
    return (sampler.peak - sampler.start) / 2**20


def time_step(step: Callable[[], float], device: Any) -> tuple[float, float]:
    """Return the wall-clock and process CPU seconds of one call of ``step``."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall_start, time.process_time() - cpu_start


def run_model(model_name: str, variants: list[Variant], args: argparse.Namespace) -> dict[str, Any]:
    """Measure every variant on one model in this process; called in a fresh child by :func:`main`."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(model_name, device)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    batch = build_batch(vocab_size, args.batch_size, args.seq_len, args.k, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    # Create AdamW's state before measuring, so no measured step allocates it.
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    steps = {variant.name: (lambda v=variant: train_step(model, optimizer, batch, v)) for variant in variants}

    # Warm-up: one-time allocations (kernels' workspaces, lazy initialisation) and
    # caches settle before anything is measured.
    losses = {}
    for _ in range(args.warmup):
        for name, step in steps.items():
            losses[name] = step()

    peaks = {name: max(measure_peak_mb(step, device) for _ in range(args.memory_steps)) for name, step in steps.items()}

    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            wall_s, cpu_s = time_step(steps[name], device)
            wall[name].append(wall_s)
            cpu[name].append(cpu_s)

    tokens = args.batch_size * args.seq_len
    rows = [
        {
            "model": model_name,
            "vocab": vocab_size,
            "variant": name,
            "device": device.type,
            "tokens_per_step": tokens,
            "min_step_s": round(min(wall[name]), 3),
            "median_step_s": round(statistics.median(wall[name]), 3),
            "median_cpu_s": round(statistics.median(cpu[name]), 3),
            # On a shared machine the fastest step is the best estimate of the uncontended cost.
            "tokens_per_s": round(tokens / min(wall[name]), 1),
            "step_peak_mb": round(peaks[name], 1),
            "loss": round(losses[name], 4),
        }
        for name in names
    ]
    return {
        "rows": rows,
        "ratios": step_ratios(model_name, wall, cpu, peaks, variants),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def ratio_pairs(variants: list[Variant]) -> list[tuple[str, str]]:
    """Return the (numerator, denominator) variant names to compare, where both were measured."""
    names = {variant.name for variant in variants}
    suffixes = sorted({variant.name[len(variant.mode):] for variant in variants})
    pairs = []
    for suffix in suffixes:
        for mode, base in RATIO_PAIRS:
            # ce-reference has no baseline copy: it calls torch directly.
            base_name = base if base == "ce-reference" else base + suffix
            pairs.append((mode + suffix, base_name))
    pairs += [(variant.mode, variant.name) for variant in variants if variant.name != variant.mode]
    return [(a, b) for a, b in pairs if a in names and b in names]


def step_ratios(
    model_name: str,
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    peaks: dict[str, float],
    variants: list[Variant],
) -> list[dict[str, Any]]:
    """Return, per pair, the median over rounds of the within-round step-time ratio."""
    ratios = []
    for numerator, denominator in ratio_pairs(variants):
        ratios.append({
            "model": model_name,
            "ratio": f"{numerator} / {denominator}",
            "time_median": round(statistics.median(a / b for a, b in zip(wall[numerator], wall[denominator])), 3),
            "time_min": round(min(wall[numerator]) / min(wall[denominator]), 3),
            "cpu_median": round(statistics.median(a / b for a, b in zip(cpu[numerator], cpu[denominator])), 3),
            "peak_memory": round(peaks[numerator] / peaks[denominator], 3) if peaks[denominator] > 0 else None,
        })
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time and peak memory of KD training steps against CE steps.")
    parser.add_argument("--models", default="tiny,wide", help="comma-separated: tiny (stories260k), wide (vocab 32k)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated loss modes")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--k", type=int, default=20, help="teacher alternatives per position")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds; each runs every variant once")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before measuring")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps per variant whose peak memory is measured")
    parser.add_argument(
        "--baseline-losses", metavar="FILE",
        help="copy of student/losses.py whose distillation_loss_sums is measured beside the current one",
    )
    parser.add_argument("--baseline-label", default="baseline", help="suffix naming the baseline variants")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch CPU threads (torch.set_num_threads); default: torch's choice")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 2 x 64 tokens, 2 rounds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.seq_len, args.steps = "tiny", 2, 64, 2
    for name in ("steps", "warmup", "memory_steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'warmup' else 1}")
    if args.baseline_losses:
        path = Path(args.baseline_losses).resolve()
        if not path.is_file():
            parser.error(f"--baseline-losses {args.baseline_losses}: file not found; pass a copy of student/losses.py")
        args.baseline_losses = str(path)
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {', '.join(unknown)}; use some of {', '.join(MODES)}")
    return args


def child_argv(model_name: str, argv: list[str]) -> list[str]:
    """Return the command line of the child that measures ``model_name``; the last ``--models`` wins."""
    return [sys.executable, "-m", "benchmarks.bench_train", *argv, "--child", "--models", model_name]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        variants = build_variants(args.modes.split(","), args.baseline_losses, args.baseline_label)
        print(json.dumps(run_model(args.models, variants, args)))
        return

    rows, ratios, rss = [], [], {}
    for model_name in args.models.split(","):
        child = run_measured(child_argv(model_name, argv))
        if child.returncode != 0:
            raise SystemExit(f"bench_train child for model {model_name} failed:\n{child.stderr[-2000:]}")
        result = last_json_line(child.stdout)
        for row in result["rows"]:
            print(f"  {model_name:5} {row['variant']:20} {row['median_step_s']} s/step {row['step_peak_mb']} MB", flush=True)
        rows += result["rows"]
        ratios += result["ratios"]
        rss[model_name] = result["process_peak_rss_mb"]

    print_table(rows)
    print()
    print_table(ratios)
    print(f"process peak RSS MB per model: {rss}")
    settings = {
        "batch_size": args.batch_size, "seq_len": args.seq_len, "top_k": args.k, "steps": args.steps,
        "warmup": args.warmup, "memory_steps": args.memory_steps, "baseline_losses": args.baseline_losses,
        "threads": args.threads,
    }
    payload = {"settings": settings, "results": rows, "ratios": ratios, "process_peak_rss_mb": rss}
    path = write_results("bench_train", payload)
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
