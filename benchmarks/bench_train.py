"""One training step with top-k KD against one with cross-entropy: time and peak memory.

Both steps run on the same model and the same batch: forward, loss, backward and an
AdamW update, as the trainer's step does (``Trainer._loss_step`` without autocast, on
one micro-batch). The losses are the project's :func:`student.losses.distillation_loss_sums`
in ``sequence`` mode (CE on the teacher's tokens), ``topk`` mode (KL over the teacher's
top-k alternatives) and ``mixed`` mode, plus ``torch.nn.functional.cross_entropy`` on
the full logits as the plain reference. Each mode runs in a fresh child process, so
its memory figure is not hidden by the allocator's caching from an earlier mode.

Memory is measured on the second step (the first pays one-time allocations): on CUDA,
``torch.cuda.max_memory_allocated`` during the step minus the allocation before it. On
CPU, tracemalloc does not see torch's allocations and RSS does not fall when memory is
freed. So a thread samples the bytes malloc has handed out (glibc ``mallinfo2``) every
0.5 ms, and the figure is the largest sample minus the value before the step. It is an
estimate that can miss a peak shorter than the interval. Time: the median of the steps
after the measured one, and the fastest of them, from which tokens/s is computed.

Models: ``tiny`` is the real stories260k checkpoint (vocabulary 512). ``wide`` is a
randomly initialised Llama with a 32,000-token vocabulary, where the logits dominate
memory as they do in real students.

    python -m benchmarks.bench_train --models tiny,wide --steps 5
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import statistics
import sys
import threading
import time
from typing import Any

from benchmarks.common import TINY_MODEL_DIR, last_json_line, print_table, run_measured, write_results

MODES = ("ce-reference", "sequence", "topk", "mixed")
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


def train_step(model: Any, optimizer: Any, batch: dict[str, Any], mode: str) -> float:
    import torch.nn.functional as F

    from student.losses import distillation_loss_sums

    optimizer.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    if mode == "ce-reference":
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    else:
        sums = distillation_loss_sums(
            logits, batch["rows"], batch["target_ids"], batch["teacher_ids"],
            batch["teacher_logprobs"], batch["teacher_mask"], mode=mode,
        )
        loss = sums.loss / sums.num_targets
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def run_one(model_name: str, mode: str, batch_size: int, seq_len: int, top_k: int, steps: int, device_name: str) -> dict[str, Any]:
    """Measure one mode in this process; called in a fresh child by :func:`main`."""
    import torch

    device = torch.device(device_name)
    model = build_model(model_name, device)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    batch = build_batch(vocab_size, batch_size, seq_len, top_k, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    # Create AdamW's state before measuring, so the measured step does not allocate it.
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    # One step before measuring, so one-time allocations (kernels' workspaces, lazy
    # initialisation) do not count as the step's memory.
    train_step(model, optimizer, batch, mode)

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step_start = time.perf_counter()
        loss = train_step(model, optimizer, batch, mode)
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with MallocSampler() as sampler:
            step_start = time.perf_counter()
            loss = train_step(model, optimizer, batch, mode)
        peak_mb = (sampler.peak - sampler.start) / 2**20
    measured_step_s = time.perf_counter() - step_start

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch, mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times) if times else measured_step_s
    # On a shared machine the fastest step is the best estimate of the uncontended cost.
    fastest_s = min(times, default=measured_step_s)
    tokens = batch_size * seq_len
    return {
        "model": model_name,
        "vocab": vocab_size,
        "mode": mode,
        "device": device.type,
        "tokens_per_step": tokens,
        "measured_step_s": round(measured_step_s, 3),
        "step_s": round(step_s, 3),
        "fastest_step_s": round(fastest_s, 3),
        "tokens_per_s": round(tokens / fastest_s, 1),
        "step_peak_mb": round(peak_mb, 1),
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loss": round(loss, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Time and peak memory of one KD step against one CE step.")
    parser.add_argument("--models", default="tiny,wide", help="comma-separated: tiny (stories260k), wide (vocab 32k)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated loss modes")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--k", type=int, default=20, help="teacher alternatives per position")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the measured one")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, batch 2 x 64 tokens, 2 steps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.seq_len, args.steps = "tiny", 2, 64, 2

    if args.child:
        result = run_one(args.models, args.modes, args.batch_size, args.seq_len, args.k, args.steps, args.device)
        print(json.dumps(result))
        return

    rows = []
    for model_name in args.models.split(","):
        for mode in args.modes.split(","):
            argv_child = [
                sys.executable, "-m", "benchmarks.bench_train", "--child", "--models", model_name,
                "--modes", mode, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                "--k", str(args.k), "--steps", str(args.steps), "--device", args.device,
            ]
            child = run_measured(argv_child)
            if child.returncode != 0:
                raise SystemExit(f"bench_train child {model_name}/{mode} failed:\n{child.stderr[-2000:]}")
            row = last_json_line(child.stdout)
            print(f"  {model_name:5} {mode:13} {row['step_s']} s/step {row['step_peak_mb']} MB", flush=True)
            rows.append(row)

    print_table(rows)
    settings = {"batch_size": args.batch_size, "seq_len": args.seq_len, "top_k": args.k, "steps": args.steps}
    path = write_results("bench_train", {"settings": settings, "results": rows})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
