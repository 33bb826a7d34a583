"""Typed configuration of training and evaluation runs.

Every default lives in the dataclasses below and nowhere else: the CLI passes only the
flags a user gave, and the trainer reads fields, never ``dict.get`` with a fallback.
``validate()`` collects every problem before any work starts and raises one
:class:`~pipeline.errors.ConfigError` that lists them all, each naming the flag that
fixes it, so a user fixes a bad command line in one go instead of one error per run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.model_paths import device_problem, model_source_problem, out_dir_problem

LOSS_MODES = ("sequence", "topk", "mixed")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SPLITS = ("heldout", "train", "all")
INIT_MODES = ("copy", "fresh")
DEFAULT_HOLDOUT_FRACTION = 0.1


@dataclass
class TrainConfig:
    """Settings of one ``pipeline train`` run; field names match the CLI flags."""

    store_dir: Path
    student: str
    out_dir: Path
    loss: str = "topk"
    where: str | None = None
    include_truncated: bool = False
    steps: int = 300
    batch_size: int = 8
    grad_accum_steps: int = 1
    lr: float = 3e-4
    warmup_steps: int = 0
    # The learning rate decays on a cosine from lr to lr * min_lr_ratio after warmup.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    # Gradient clipping norm; 0 turns clipping off.
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    # Weight of the KL term in the ``mixed`` loss: (1 - alpha) * CE + alpha * KL.
    alpha: float = 0.5
    max_seq_len: int = 512
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_rows: int = 256
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION
    save_every: int = 0
    rows_per_chunk: int = 256
    # Append the student's EOS token as a CE-only target after responses that ended
    # with finish_reason 'stop', so the student learns where the teacher stopped.
    append_eos: bool = True
    # Replace the files of a non-empty --out directory instead of rejecting it.
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        self.out_dir = Path(self.out_dir)
        self.student = str(self.student)

    def problems(self) -> list[str]:
        """Return every invalid setting as a message naming the flag that fixes it."""
        found: list[str] = []
        found += _store_problems(self.store_dir)
        found += _student_problems(self.student)
        out_problem = out_dir_problem(self.out_dir, overwrite=self.overwrite)
        if out_problem:
            found.append(out_problem)
        found += _choice_problems("--loss", self.loss, LOSS_MODES)
        found += _choice_problems("--device", self.device, DEVICES)
        found += _choice_problems("--dtype", self.dtype, DTYPES)

        found += _positive("--steps", self.steps)
        found += _positive("--batch-size", self.batch_size)
        found += _positive("--grad-accum-steps", self.grad_accum_steps)
        found += _positive("--max-seq-len", self.max_seq_len, minimum=2)
        found += _positive("--log-every", self.log_every)
        found += _positive("--eval-rows", self.eval_rows)
        found += _positive("rows_per_chunk", self.rows_per_chunk)
        found += _non_negative("--eval-every", self.eval_every)
        found += _non_negative("--save-every", self.save_every)
        found += _non_negative("--warmup-steps", self.warmup_steps)
        if self.warmup_steps > self.steps:
            found.append(
                f"--warmup-steps {self.warmup_steps} exceeds --steps {self.steps};"
                " pass a value up to --steps"
            )

        found += _finite_range("--lr", self.lr, low=0.0, low_open=True)
        found += _finite_range("--temperature", self.temperature, low=0.0, low_open=True)
        found += _finite_range("--alpha", self.alpha, low=0.0, high=1.0)
        found += _finite_range("--min-lr-ratio", self.min_lr_ratio, low=0.0, high=1.0)
        found += _finite_range("--weight-decay", self.weight_decay, low=0.0)
        found += _finite_range("--max-grad-norm", self.max_grad_norm, low=0.0)

        found += _holdout_problems(self.holdout_fraction)
        if self.eval_every > 0 and self.holdout_fraction == 0:
            found.append(
                "--eval-every needs held-out prompts; pass --holdout-fraction above 0"
                " or --eval-every 0"
            )
        found += _cuda_problems(self.device, self.dtype)
        return found

    def validate(self) -> None:
        """Raise ConfigError listing every invalid setting, or return if there is none."""
        raise_problems("train", self.problems())

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready values (paths as strings)."""
        return _json_ready(dataclasses.asdict(self))


@dataclass
class EvalConfig:
    """Settings of one ``pipeline eval`` run."""

    store_dir: Path
    student: str
    where: str | None = None
    include_truncated: bool = False
    split: str = "heldout"
    # None: read the fraction from the checkpoint's train_state.json, so evaluation
    # holds out exactly the prompts that training held out.
    holdout_fraction: float | None = None
    max_rows: int | None = None
    batch_size: int = 8
    max_seq_len: int = 512
    device: str = "auto"
    dtype: str = "auto"
    rows_per_chunk: int = 256

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        self.student = str(self.student)

    def problems(self) -> list[str]:
        """Return every invalid setting as a message naming the flag that fixes it."""
        found: list[str] = []
        found += _store_problems(self.store_dir)
        found += _student_problems(self.student)
        found += _choice_problems("--split", self.split, SPLITS)
        found += _choice_problems("--device", self.device, DEVICES)
        found += _choice_problems("--dtype", self.dtype, DTYPES)
        found += _positive("--batch-size", self.batch_size)
        found += _positive("--max-seq-len", self.max_seq_len, minimum=2)
        found += _positive("rows_per_chunk", self.rows_per_chunk)
        if self.max_rows is not None:
            found += _positive("--max-rows", self.max_rows)
        if self.holdout_fraction is not None:
            found += _holdout_problems(self.holdout_fraction)
        found += _cuda_problems(self.device, self.dtype)
        return found

    def validate(self) -> None:
        """Raise ConfigError listing every invalid setting, or return if there is none."""
        raise_problems("eval", self.problems())


@dataclass
class StudentSpec:
    """Sizes of a student made from a teacher; None keeps the teacher's value."""

    layers: int
    hidden_size: int | None = None
    intermediate_size: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    init: str = "copy"
    seed: int = 0
    # Accept sizes above the teacher's; a larger student is rarely intended.
    allow_larger: bool = False

    def problems(self, teacher_config: Any) -> list[str]:
        """Return every size that cannot work with this teacher, naming the flag."""
        found = []
        if self.init not in INIT_MODES:
            found.append(f"--init {self.init!r} is not supported; pass fresh or copy")
        for flag, value in (
            ("--layers", self.layers),
            ("--hidden-size", self.hidden_size),
            ("--intermediate-size", self.intermediate_size),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
        ):
            if value is not None and value < 1:
                found.append(f"{flag} must be >= 1, got {value}")
        if found:
            return found

        if not self.allow_larger:
            found += self._larger_than_teacher(teacher_config)
        hidden, heads, kv_heads = self.resolved_attention(teacher_config)
        if hidden % heads:
            found.append(
                f"--hidden-size {hidden} is not divisible by --heads {heads}; pick sizes"
                " where hidden_size = heads * head_dim"
            )
        if kv_heads is not None and heads % kv_heads:
            found.append(f"--heads {heads} is not divisible by --kv-heads {kv_heads}")
        return found

    def _larger_than_teacher(self, teacher_config: Any) -> list[str]:
        found = []
        for flag, value, attribute in (
            ("--layers", self.layers, "num_hidden_layers"),
            ("--hidden-size", self.hidden_size, "hidden_size"),
            ("--intermediate-size", self.intermediate_size, "intermediate_size"),
            ("--heads", self.heads, "num_attention_heads"),
            ("--kv-heads", self.kv_heads, "num_key_value_heads"),
        ):
            teacher_value = getattr(teacher_config, attribute, None)
            if value is not None and isinstance(teacher_value, int) and value > teacher_value:
                found.append(
                    f"{flag} {value} exceeds the teacher's {attribute} {teacher_value};"
                    f" pass at most {teacher_value}, or --allow-larger for a larger student"
                )
        return found

    def resolved_attention(self, teacher_config: Any) -> tuple[int, int, int | None]:
        hidden = self.hidden_size or teacher_config.hidden_size
        heads = self.heads or teacher_config.num_attention_heads
        teacher_kv = getattr(teacher_config, "num_key_value_heads", None)
        kv_heads = self.kv_heads or (min(teacher_kv, heads) if teacher_kv else None)
        return hidden, heads, kv_heads


def raise_problems(command: str, problems: list[str]) -> None:
    """Raise one ConfigError that lists all ``problems``; return when there are none."""
    if not problems:
        return
    lines = "\n".join(f"  - {problem}" for problem in problems)
    noun = "setting" if len(problems) == 1 else "settings"
    raise ConfigError(f"{len(problems)} invalid {command} {noun}:\n{lines}")


def _json_ready(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _store_problems(store_dir: Path) -> list[str]:
    if not store_dir.is_dir():
        return [f"--store {store_dir} is not a directory; pass the store written by pipeline harvest"]
    if not (store_dir / "store.json").is_file():
        return [
            f"--store {store_dir} has no store.json, so it is not a store; pass the"
            " directory written by pipeline harvest --store"
        ]
    return []


def _student_problems(student: str) -> list[str]:
    problem = model_source_problem(student, "--student")
    return [problem] if problem else []


def _choice_problems(flag: str, value: str, choices: tuple[str, ...]) -> list[str]:
    if flag == "--device":
        problem = device_problem(value, flag)
        return [problem] if problem else []
    if value not in choices:
        return [f"{flag} {value!r} is not supported; pass one of {', '.join(choices)}"]
    return []


def _positive(flag: str, value: int, minimum: int = 1) -> list[str]:
    if not isinstance(value, int) or value < minimum:
        return [f"{flag} must be an integer >= {minimum}, got {value!r}"]
    return []


def _non_negative(flag: str, value: int) -> list[str]:
    if not isinstance(value, int) or value < 0:
        return [f"{flag} must be an integer >= 0, got {value!r}"]
    return []


def _finite_range(
    flag: str,
    value: float,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
) -> list[str]:
    too_low = value <= low if low_open else value < low
    too_high = high is not None and value > high
    if not math.isfinite(value) or too_low or too_high:
        lower = f"> {low}" if low_open else f">= {low}"
        bound = f"{lower} and <= {high}" if high is not None else lower
        return [f"{flag} must be a finite number {bound}, got {value!r}"]
    return []


def _holdout_problems(fraction: float) -> list[str]:
    if not math.isfinite(fraction) or not 0.0 <= fraction < 1.0:
        return [f"--holdout-fraction must be in [0, 1), got {fraction!r}"]
    return []


def _cuda_problems(device: str, dtype: str) -> list[str]:
    import torch

    found = []
    cuda_available = torch.cuda.is_available()
    if device.startswith("cuda") and not cuda_available:
        found.append(
            f"--device {device} requested but CUDA is not available; pass --device cpu or auto"
        )
    on_cuda = device.startswith("cuda") or (device == "auto" and cuda_available)
    if dtype == "float16" and not on_cuda:
        found.append(
            "--dtype float16 runs only on CUDA; pass --dtype bfloat16 or float32 for CPU runs"
        )
    return found
