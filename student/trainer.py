"""Distillation trainer: an explicit ``setup`` / ``train`` / ``cleanup`` lifecycle.

``setup`` validates the config (every problem reported at once), then builds the pieces
in small ``_setup_*`` steps: device and seed, student, data stream, held-out batches,
optimizer. ``train`` runs optimizer steps over windows of ``grad_accum_steps``
micro-batches. ``_loss_step`` returns each loss term of one micro-batch as a sum over
target tokens, and the window divides by the number of target tokens in the whole
window, so a token weighs the same whichever micro-batch it falls in. A window without
any target token contributes zero loss and zero gradient, and its optimizer step is
skipped (AdamW would otherwise still move the weights through momentum and decay).

Checkpoints are ``save_pretrained`` weights and tokenizer in the output directory plus
a ``train_state.json`` sidecar: step, resolved config, metrics history, data cursor,
mapping statistics and wall time.

SIGINT and SIGTERM do not abort a run: while ``train`` runs, a first signal lets the
current step finish, saves a checkpoint whose train_state.json names the signal
(``interrupted``) and raises :class:`TrainingInterrupted`. A second signal raises
KeyboardInterrupt at once. Handlers are installed only from the main thread, where
Python delivers signals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.model_paths import create_out_dir
from student.config import TrainConfig
from student.data import (
    WITHOUT_TEACHER_DISTRIBUTION_SQL,
    Batch,
    MappingStats,
    RowQuery,
    SampleEncoder,
    StoreSamples,
    count_rows,
    iter_batches,
    pad_token_id,
)
from student.evaluate import TRAIN_STATE_FILE, EvalResult, evaluate_batches, heldout_batches
from student.losses import LossSums, distillation_loss_sums
from student.model import autocast_context, load_student, logits_width, resolve_device, resolve_dtype
from student.vocab import StudentVocab

logger = logging.getLogger(__name__)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Return the learning rate of optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_steps``, then a cosine from ``lr`` down to
    ``lr * min_lr_ratio`` at the last step.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def format_progress(step: int, steps: int, entry: dict[str, Any]) -> str:
    """Return the fixed-order progress line of one log step."""
    kl = entry.get("kl")
    kl_text = "-" if kl is None else f"{kl:.3f}"
    return (
        f"step {step:05d}/{steps:05d} | loss {entry['loss']:.4f} | ce {entry['ce']:.2f}"
        f" | kl {kl_text} | lr {entry['lr']:.1e} | tokens_per_sec {entry['tokens_per_sec']:.0f}"
        f" | mapped {100 * entry['mapped_share']:.1f}%"
    )


def format_eval(step: int, result: EvalResult) -> str:
    """Return the progress line of one evaluation on held-out rows."""

    def number(value: float | None, scale: float = 1.0, fmt: str = ".4f") -> str:
        return "n/a" if value is None else format(scale * value, fmt)

    return (
        f"eval {step:05d} | val_kl {number(result.kl_nats_per_token)}"
        f" | val_ce {number(result.ce_nats_per_token)}"
        f" | val_top1 {number(result.top1_agreement, 100, '.1f')}%"
        f" | positions {result.positions}"
    )


@dataclass
class _Window:
    """Running sums between two progress lines."""

    loss_sum: float = 0.0
    ce_sum: float = 0.0
    kl_sum: float = 0.0
    targets: int = 0
    kl_tokens: int = 0
    input_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class TrainSummary:
    """Summary of a finished run."""

    steps: int
    skipped_steps: int
    first_loss: float | None
    last_loss: float | None
    wall_time_s: float
    input_tokens: int
    target_tokens: int
    out_dir: Path
    mapping: MappingStats
    baseline_eval: EvalResult | None
    final_eval: EvalResult | None
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Return the end-of-run summary as lines of text."""

        def loss(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.4f}"

        lines = [
            f"trained {self.steps} steps in {self.wall_time_s:.1f} s"
            f" ({self.skipped_steps} skipped without targets)",
            f"loss {loss(self.first_loss)} -> {loss(self.last_loss)}"
            f" | input_tokens {self.input_tokens} | target_tokens {self.target_tokens}",
            f"data: {self.mapping.summary()}",
        ]
        if self.baseline_eval is not None and self.final_eval is not None:
            lines.append(f"held-out before: {format_eval(0, self.baseline_eval)}")
            lines.append(f"held-out after:  {format_eval(self.steps, self.final_eval)}")
        lines.extend(f"warning: {warning}" for warning in self.warnings)
        lines.append(f"checkpoint: {self.out_dir}")
        return lines


class TrainingInterrupted(Exception):
    """A signal stopped training after a step; a checkpoint of that step was saved."""

    def __init__(self, signal_number: int, step: int, steps: int, out_dir: Path):
        self.signal_number = signal_number
        self.signal_name = signal.Signals(signal_number).name
        self.step = step
        self.steps = steps
        self.out_dir = out_dir
        super().__init__(
            f"interrupted by {self.signal_name} after step {step} of {steps};"
            f" checkpoint saved to {out_dir}"
        )

    @property
    def exit_status(self) -> int:
        """Return the shell convention for a process ended by the signal: 128 + number."""
        return 128 + self.signal_number


class Trainer:
    """Train a student on stored teacher responses; see the module docstring."""

    def __init__(self, config: TrainConfig, progress: Callable[[str], None] | None = None):
        self.config = config
        self.progress = progress or logger.info
        self.step = 0
        self.skipped_steps = 0
        self.history: list[dict[str, Any]] = []
        # Setup findings that do not stop the run; repeated in the summary.
        self.warnings: list[str] = []
        self.input_tokens = 0
        self.target_tokens = 0
        self.model: Any = None
        self.tokenizer: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.samples: StoreSamples | None = None
        self.heldout: list[Batch] = []
        self._batches: Iterator[Batch] | None = None
        self._started = 0.0
        self._baseline_eval: EvalResult | None = None
        self._last_eval: EvalResult | None = None
        self._stop_signal: int | None = None

    # Lifecycle ----------------------------------------------------------------

    def setup(self) -> None:
        """Validate the config and build model, data and optimizer."""
        self.config.validate()
        self._started = time.perf_counter()
        create_out_dir(self.config.out_dir)
        self._setup_device()
        # Row filters are checked before the model loads, so a bad --where fails fast.
        self._check_training_rows()
        self._setup_model()
        self._setup_data()
        self._setup_heldout()
        self._setup_optimizer()

    def train(self) -> TrainSummary:
        """Run the configured number of optimizer steps, then save the checkpoint."""
        if self.optimizer is None:
            raise RuntimeError("Trainer.train() called before setup()")
        with self._stop_on_signals():
            self._train_loop()
        if self._stop_signal is not None:
            self.save_checkpoint(finished=False, interrupted=signal.Signals(self._stop_signal).name)
            raise TrainingInterrupted(self._stop_signal, self.step, self.config.steps, self.config.out_dir)

        if self.heldout:
            self._run_eval()
        self.save_checkpoint(finished=True)
        return self._summary()

    def _train_loop(self) -> None:
        config = self.config
        if self.heldout:
            self._baseline_eval = self._evaluate()
            self.progress(format_eval(0, self._baseline_eval))

        window = _Window()
        while self.step < config.steps and self._stop_signal is None:
            self._train_step(window)
            self.step += 1
            # Step 1 is logged on its own, so the summary's first loss is the starting
            # loss even when the run is shorter than two logging windows.
            if self.step == 1 or self.step % config.log_every == 0 or self.step == config.steps:
                self._log_window(window)
                window = _Window()
            if self._stop_signal is not None:
                break
            paused = time.perf_counter()
            if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                self._run_eval()
            if config.save_every and self.step % config.save_every == 0 and self.step < config.steps:
                self.save_checkpoint(finished=False)
            # Evaluation and saving do not count against training throughput.
            window.started += time.perf_counter() - paused
        if self._stop_signal is not None and window.targets:
            self._log_window(window)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Turn SIGINT and SIGTERM into a stop after the current step while training runs."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signal_number: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal_number

        stop_signals = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.getsignal(number) for number in stop_signals}
        for number in stop_signals:
            signal.signal(number, request_stop)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def cleanup(self) -> None:
        """Close the data stream and release the model and optimizer."""
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()
        self._batches = None
        self.optimizer = None
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # Setup steps --------------------------------------------------------------

    def _setup_device(self) -> None:
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        random.seed(self.config.seed)
        np.random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)

    def _setup_model(self) -> None:
        self.model, self.tokenizer = load_student(self.config.student, self.device)
        self.model.train()
        self.vocab_size = logits_width(self.model)
        self.vocab = StudentVocab.from_tokenizer(self.tokenizer, vocab_limit=self.vocab_size)
        self.pad_id = pad_token_id(self.tokenizer)
        parameters = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "student %s: %d parameters, %d logits, device %s, compute dtype %s",
            self.config.student, parameters, self.vocab_size, self.device, self.dtype,
        )

    def _row_query(self, split: str) -> RowQuery:
        return RowQuery(
            store_dir=self.config.store_dir,
            where=self.config.where,
            include_truncated=self.config.include_truncated,
            split=split,
            holdout_fraction=self.config.holdout_fraction,
        )

    def _check_training_rows(self) -> None:
        query = self._row_query("train")
        rows = count_rows(query)
        logger.info("training rows: %d (%s)", rows, query.describe())
        if rows == 0:
            raise ConfigError(
                f"no rows in {self.config.store_dir} match the training filters"
                f" ({query.describe()}); check --store, --where,"
                " --include-truncated and --holdout-fraction"
            )
        if self.config.loss != "sequence":
            self._check_teacher_logprobs(query, rows)

    def _check_teacher_logprobs(self, query: RowQuery, rows: int) -> None:
        """Reject a KL loss without any teacher distribution; warn when some rows lack one."""
        without = count_rows(query, WITHOUT_TEACHER_DISTRIBUTION_SQL)
        if without == rows:
            raise ConfigError(
                f"--loss {self.config.loss} needs teacher top-k logprobs, but none of the"
                f" {rows} training rows has more than one alternative per token (harvested"
                " with --top-logprobs 0?); pass --loss sequence, or harvest with"
                " --top-logprobs 5 or more"
            )
        if without:
            warning = (
                f"{without} of {rows} training rows have no teacher logprobs; they train on"
                " cross-entropy only"
            )
            logger.warning(warning)
            self.warnings.append(warning)

    def _setup_data(self) -> None:
        config = self.config
        query = self._row_query("train")
        encoder = SampleEncoder(
            self.tokenizer,
            self.vocab,
            max_seq_len=config.max_seq_len,
            append_eos=config.append_eos,
        )
        self.samples = StoreSamples(
            query, encoder, seed=config.seed, rows_per_chunk=config.rows_per_chunk
        )
        self._batches = iter_batches(self.samples, config.batch_size, self.pad_id, self.vocab_size)

    def _setup_heldout(self) -> None:
        if self.config.holdout_fraction == 0:
            return
        encoder = SampleEncoder(
            self.tokenizer, self.vocab, max_seq_len=self.config.max_seq_len, append_eos=False
        )
        self.heldout = heldout_batches(
            self._row_query("heldout"),
            encoder,
            batch_size=self.config.batch_size,
            pad_id=self.pad_id,
            vocab_size=self.vocab_size,
            max_rows=self.config.eval_rows,
            rows_per_chunk=self.config.rows_per_chunk,
        )
        if not self.heldout:
            logger.warning(
                "no held-out rows at --holdout-fraction %s; evaluation is skipped",
                self.config.holdout_fraction,
            )

    def _setup_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=learning_rate(0, self.config),
            weight_decay=self.config.weight_decay,
            betas=(0.9, 0.95),
        )

    # Steps --------------------------------------------------------------------

    def _loss_step(self, batch: Batch) -> LossSums:
        """Run the student on one micro-batch and return its summed loss terms."""
        with autocast_context(self.device, self.dtype):
            logits = self.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).logits
        return distillation_loss_sums(
            logits,
            batch.rows,
            batch.target_ids,
            batch.teacher_ids,
            batch.teacher_logprobs,
            batch.teacher_mask,
            mode=self.config.loss,
            alpha=self.config.alpha,
            temperature=self.config.temperature,
        )

    def _next_window(self) -> list[Batch]:
        assert self._batches is not None
        return [next(self._batches) for _ in range(self.config.grad_accum_steps)]

    def _accumulate_gradients(self, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
        """Backpropagate a window of micro-batches; return its detached loss sums.

        Token-weighted normalisation: every micro-batch divides its sum by the target
        count of the whole window, so the gradient is the mean over all its tokens
        however they are split into micro-batches.
        """
        window_targets = sum(batch.num_targets for batch in micro_batches)
        totals: dict[str, torch.Tensor] = {}
        for batch in micro_batches:
            sums = self._loss_step(batch.to(self.device))
            (sums.loss / max(window_targets, 1)).backward()
            for name, value in (
                ("loss_sum", sums.loss.detach()),
                ("ce_sum", sums.ce_sum),
                ("kl_sum", sums.kl_sum),
                ("kl_tokens", sums.kl_tokens),
            ):
                totals[name] = totals[name] + value if name in totals else value
        return totals

    def _train_step(self, window: _Window) -> None:
        micro_batches = self._next_window()
        window_targets = sum(batch.num_targets for batch in micro_batches)
        lr = learning_rate(self.step, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        totals = self._accumulate_gradients(micro_batches)
        if window_targets > 0:
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
            self.optimizer.step()
        else:
            self.skipped_steps += 1
            logger.warning("step %d had no target tokens; optimizer step skipped", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)

        # One device sync per step; the values feed the progress line.
        input_tokens = sum(batch.num_input_tokens for batch in micro_batches)
        window.loss_sum += float(totals["loss_sum"])
        window.ce_sum += float(totals["ce_sum"])
        window.kl_sum += float(totals["kl_sum"])
        window.kl_tokens += int(totals["kl_tokens"])
        window.targets += window_targets
        window.input_tokens += input_tokens
        self.input_tokens += input_tokens
        self.target_tokens += window_targets

    def _log_window(self, window: _Window) -> None:
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        targets = max(window.targets, 1)
        entry = {
            "step": self.step,
            "loss": window.loss_sum / targets,
            "ce": window.ce_sum / targets,
            "kl": window.kl_sum / window.kl_tokens if window.kl_tokens else None,
            "lr": learning_rate(self.step - 1, self.config),
            "tokens_per_sec": window.input_tokens / elapsed,
            "mapped_share": self.samples.stats.mapped_position_share,
            "target_tokens": window.targets,
            "kl_tokens": window.kl_tokens,
        }
        self.history.append(entry)
        self.progress(format_progress(self.step, self.config.steps, entry))

    def _evaluate(self) -> EvalResult:
        return evaluate_batches(self.model, self.heldout, self.device, self.dtype)

    def _run_eval(self) -> None:
        result = self._evaluate()
        self._last_eval = result
        self.history.append(
            {
                "step": self.step,
                "val_kl": result.kl_nats_per_token,
                "val_ce": result.ce_nats_per_token,
                "val_top1": result.top1_agreement,
                "val_positions": result.positions,
            }
        )
        self.progress(format_eval(self.step, result))

    # Checkpoints --------------------------------------------------------------

    def train_state(self, finished: bool, interrupted: str | None = None) -> dict[str, Any]:
        """Return the JSON sidecar written next to the weights.

        NOTE: no command resumes from it yet. A resumed run would pass ``data_cursor``
        to :class:`StoreSamples`, but optimizer state is not saved.
        """
        return {
            "step": self.step,
            "steps": self.config.steps,
            "finished": finished,
            "interrupted": interrupted,
            "config": self.config.to_dict(),
            "metrics": self.history,
            "data_cursor": self.samples.cursor if self.samples else None,
            "mapping": self.samples.stats.to_dict() if self.samples else None,
            "skipped_steps": self.skipped_steps,
            "input_tokens": self.input_tokens,
            "target_tokens": self.target_tokens,
            "wall_time_s": round(time.perf_counter() - self._started, 3),
        }

    def save_checkpoint(self, finished: bool, interrupted: str | None = None) -> Path:
        """Save weights, tokenizer and train_state.json in the output directory.

        ``interrupted`` names the signal that stopped the run, if one did.
        """
        out = self.config.out_dir
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        state_path = out / TRAIN_STATE_FILE
        partial = state_path.with_suffix(".json.tmp")
        state = self.train_state(finished, interrupted)
        partial.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(partial, state_path)
        logger.info("saved checkpoint at step %d to %s", self.step, out)
        return out

    def _summary(self) -> TrainSummary:
        losses = [entry["loss"] for entry in self.history if "loss" in entry]
        return TrainSummary(
            steps=self.step,
            skipped_steps=self.skipped_steps,
            first_loss=losses[0] if losses else None,
            last_loss=losses[-1] if losses else None,
            wall_time_s=time.perf_counter() - self._started,
            input_tokens=self.input_tokens,
            target_tokens=self.target_tokens,
            out_dir=self.config.out_dir,
            mapping=self.samples.stats,
            baseline_eval=self._baseline_eval,
            final_eval=self._last_eval,
            warnings=list(self.warnings),
        )


def run_training(config: TrainConfig, progress: Callable[[str], None] | None = None) -> TrainSummary:
    """Set up, train and clean up; the Python twin of ``pipeline train``."""
    trainer = Trainer(config, progress)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()
