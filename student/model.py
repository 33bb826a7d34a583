"""Load a student model, or create a smaller one from a teacher's config and tokenizer.

A student made here keeps the teacher's tokenizer and architecture class, so teacher
tokens map onto it one to one, and changes only the sizes: fewer decoder layers,
narrower hidden and MLP widths, fewer attention heads. Its weights are either fresh
(the architecture's own initialiser, ``initializer_range`` from the config) or copied.
When copied, decoder layer ``i`` of the student takes the weights of teacher layer
``round(i * teacher_layers / student_layers)`` (every k-th layer). Every tensor whose
shape is no larger than the teacher's in each dimension takes the teacher's leading
slice. Copying is an initialisation heuristic, not a compression method: a
sliced width no longer computes what the teacher computed, but it starts from weights
with the teacher's scale and token embeddings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.model_paths import check_model_source, create_out_dir, out_dir_problem
from student.config import StudentSpec, raise_problems

logger = logging.getLogger(__name__)

STUDENT_INFO_FILE = "student_info.json"

# Matches the decoder layer index in parameter names of the common causal LM layouts
# (model.layers.3., transformer.h.3., gpt_neox.layers.3.).
_LAYER_INDEX = re.compile(r"(?<=\.)(layers|h|blocks)\.(\d+)\.")


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Return the compute dtype; ``auto`` is bfloat16 on CUDA that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_student(path: str | Path, device: torch.device) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a directory or hub id, in float32 on ``device``.

    Weights stay float32 whatever the compute dtype: training runs under autocast and
    the optimizer updates float32 master weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot load student {source!r}: {error}; pass a model directory written by"
            " pipeline make-student or save_pretrained"
        ) from error
    return model.to(device), tokenizer


def logits_width(model: Any) -> int:
    """Return the number of logits the model produces per position."""
    return int(model.get_output_embeddings().weight.shape[0])


def student_config(teacher_config: Any, spec: StudentSpec) -> Any:
    """Return a copy of the teacher's config with the student's sizes."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    hidden, heads, kv_heads = spec.resolved_attention(teacher_config)
    config.num_hidden_layers = spec.layers
    config.hidden_size = hidden
    config.num_attention_heads = heads
    if kv_heads is not None:
        config.num_key_value_heads = kv_heads
    if spec.intermediate_size is not None:
        config.intermediate_size = spec.intermediate_size
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = hidden // heads
    # Per-layer lists (layer_types of hybrid-attention models) follow the layer count.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) != spec.layers:
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(spec.layers)]
    return config


def teacher_layer_for(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    """Return the teacher layer whose weights student layer ``student_layer`` copies."""
    return min(teacher_layers - 1, round(student_layer * teacher_layers / student_layers))


def copy_teacher_weights(student: Any, teacher: Any) -> dict[str, int]:
    """Copy or slice teacher weights into the student; return counts per outcome."""
    teacher_params = dict(teacher.named_parameters())
    student_layers = student.config.num_hidden_layers
    teacher_layers = teacher.config.num_hidden_layers
    counts = {"copied": 0, "sliced": 0, "fresh": 0}

    def source_name(name: str) -> str:
        def swap(match: re.Match) -> str:
            layer = teacher_layer_for(int(match.group(2)), student_layers, teacher_layers)
            return f"{match.group(1)}.{layer}."

        return _LAYER_INDEX.sub(swap, name, count=1)

    with torch.no_grad():
        for name, param in student.named_parameters():
            source = teacher_params.get(source_name(name))
            if source is None or source.dim() != param.dim():
                counts["fresh"] += 1
                continue
            if any(s > t for s, t in zip(param.shape, source.shape)):
                counts["fresh"] += 1
                continue
            leading = tuple(slice(0, size) for size in param.shape)
            param.copy_(source[leading])
            counts["copied" if param.shape == source.shape else "sliced"] += 1
    return counts


def create_student(teacher_path: str | Path, spec: StudentSpec) -> tuple[Any, Any, dict[str, Any]]:
    """Return ``(model, tokenizer, info)`` for a student made from the teacher at ``teacher_path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_model_source(str(teacher_path), "--teacher")
    with _loading_teacher(teacher_path):
        teacher_config = AutoConfig.from_pretrained(str(teacher_path))
    problems = spec.problems(teacher_config)
    raise_problems("make-student", problems)

    config = student_config(teacher_config, spec)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with _loading_teacher(teacher_path):
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_path))

    info: dict[str, Any] = {
        "teacher": str(teacher_path),
        "spec": dataclasses.asdict(spec),
        "teacher_layers": teacher_config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if spec.init == "copy":
        with _loading_teacher(teacher_path):
            teacher = AutoModelForCausalLM.from_pretrained(str(teacher_path), dtype=torch.float32)
        info["copied_layers"] = [
            teacher_layer_for(i, spec.layers, teacher_config.num_hidden_layers)
            for i in range(spec.layers)
        ]
        info["tensors"] = copy_teacher_weights(model, teacher)
        # Tied output embeddings point at the copied input embeddings again.
        model.tie_weights()
    return model, tokenizer, info


@contextlib.contextmanager
def _loading_teacher(teacher_path: str | Path) -> Iterator[None]:
    """Turn a loader's OSError or ValueError into a ConfigError naming --teacher."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot load teacher {str(teacher_path)!r}: {error}; pass a transformers model"
            " directory or hub id as --teacher"
        ) from error


def make_student(
    teacher_path: str | Path, out_dir: str | Path, spec: StudentSpec, *, overwrite: bool = False
) -> dict[str, Any]:
    """Create a student and save config, tokenizer and weights in ``out_dir``; return its info.

    Raises ConfigError when ``out_dir`` is a file, cannot be created, or is a non-empty
    directory and ``overwrite`` is false; these checks run before the teacher loads.
    """
    check_model_source(str(teacher_path), "--teacher")
    raise_problems("make-student", [p for p in [out_dir_problem(out_dir, overwrite=overwrite)] if p])
    existed = Path(out_dir).exists()
    out = create_out_dir(out_dir)
    try:
        model, tokenizer, info = create_student(teacher_path, spec)
    except BaseException:
        # Leave no empty directory behind when the sizes or the teacher are rejected.
        if not existed and not any(out.iterdir()):
            out.rmdir()
        raise
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / STUDENT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("saved student with %d parameters to %s", info["parameters"], out)
    return info


def autocast_context(device: torch.device, dtype: torch.dtype):
    """Return the autocast context for a compute dtype; float32 needs none."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
