"""``pipeline make-student``: create a smaller student from a teacher's config and tokenizer."""

from __future__ import annotations

from typing import Any

import click

from pipeline.commands.train import config_default
from pipeline.errors import ConfigError
from student.config import INIT_MODES


def _spec_default(name: str) -> str:
    from student.config import StudentSpec

    return f"[default: {config_default(StudentSpec, name)}]"


@click.command(
    "make-student",
    help="""Create a smaller student model from a teacher's config and tokenizer.

The student keeps the teacher's architecture and tokenizer and takes the sizes given
here; sizes left out keep the teacher's value, and sizes above the teacher's are
rejected unless --allow-larger is given. --init copy takes decoder layer
round(i * teacher_layers / layers) of the teacher for student layer i (every k-th
layer) and copies every weight whose shape fits, slicing the leading part of wider
teacher weights; --init fresh initialises every weight at random with the config's
initializer_range. Saves config, tokenizer and weights (save_pretrained) plus
student_info.json to --out, which must be new or empty unless --overwrite is given;
pipeline train --student accepts that directory.
""",
    epilog="""\b
Example:
  pipeline make-student --teacher ../shared/models/stories260k --out student-init \\
      --layers 2 --init copy
""",
)
@click.option("--teacher", required=True, help="Teacher model directory (with config.json) or hub id.")
@click.option("--out", "out_dir", required=True, help="Directory to write the student to; must be new or empty.")
@click.option("--layers", type=int, required=True, help="Number of decoder layers, at most the teacher's.")
@click.option("--hidden-size", type=int, default=None, help="Hidden size. [default: the teacher's]")
@click.option("--intermediate-size", type=int, default=None, help="MLP inner size. [default: the teacher's]")
@click.option("--heads", type=int, default=None, help="Attention heads; hidden size must divide by it. [default: the teacher's]")
@click.option("--kv-heads", type=int, default=None, help="Key/value heads; heads must divide by it. [default: the teacher's, capped at --heads]")
@click.option("--init", "init", type=click.Choice(INIT_MODES), default=None,
              help=f"copy (teacher weights where shapes allow) or fresh (random). {_spec_default('init')}")
@click.option("--seed", type=int, default=None, help=f"Seed of the random initialisation. {_spec_default('seed')}")
@click.option("--allow-larger", is_flag=True, default=None, help="Accept sizes above the teacher's.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --out directory, replacing its files.")
def command(teacher: str, out_dir: str, overwrite: bool, **options: Any) -> None:
    from transformers.utils import logging as transformers_logging

    from student.config import StudentSpec
    from student.model import make_student

    transformers_logging.disable_progress_bar()
    spec = StudentSpec(**{name: value for name, value in options.items() if value is not None})
    layers = spec.layers
    try:
        info = make_student(teacher, out_dir, spec, overwrite=overwrite)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    except OSError as error:
        click.echo(f"make-student failed: cannot write {out_dir}: {error}", err=True)
        raise SystemExit(1) from error

    tensors = info.get("tensors")
    copied = (
        f", layers {info['copied_layers']} copied ({tensors['copied']} tensors whole,"
        f" {tensors['sliced']} sliced, {tensors['fresh']} fresh)"
        if tensors
        else ", fresh weights"
    )
    click.echo(
        f"make-student: {info['parameters']} parameters, {layers} layers{copied};"
        f" saved to {out_dir}"
    )
