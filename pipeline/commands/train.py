"""``pipeline train``: distil stored teacher responses into a student model.

Options left out on the command line are not passed on, so every default comes from
:class:`student.config.TrainConfig`; the help text reads them from there too. Flag
values are checked all together before any model loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from pipeline.errors import ConfigError, KDError
from student.config import DTYPES, LOSS_MODES


def config_default(config_class: type, name: str) -> Any:
    """Return the default of one field of a config dataclass, for help texts."""
    return {f.name: f.default for f in dataclasses.fields(config_class)}[name]


def _train_default(name: str) -> str:
    from student.config import TrainConfig

    return f"[default: {config_default(TrainConfig, name)}]"


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in options.items() if value is not None}


@click.command(
    "train",
    help="""Train a student on the teacher responses in a store.

Reads rows with finish_reason 'stop' and a response (--include-truncated adds 'length';
a --where predicate that names finish_reason replaces that filter). Prompts are split
into training and held-out sets by a hash of prompt_id; pipeline eval --split heldout
evaluates on the same held-out prompts.

Loss per target token of the teacher's responses: 'sequence' is cross-entropy (CE) on
the teacher's tokens; 'topk' is T^2 * KL(teacher top-k || student) at temperature T,
with the teacher's alternatives renormalised over those that map to student tokens;
'mixed' is (1 - alpha) * CE + alpha * KL. Samples whose tokens do not map one to one
onto the student's vocabulary fall back to CE on the student's own tokenization.
Losses are averaged over all target tokens of a gradient-accumulation window.

Writes the student (save_pretrained) and train_state.json to --out, which must be new
or empty unless --overwrite is given. Prints one progress line every --log-every steps
and a summary at the end. On Ctrl-C (SIGINT) or SIGTERM the current step finishes, a
checkpoint marked interrupted is saved to --out, and the exit status is 130 or 143.
""",
    epilog="""\b
Example, run after the pipeline harvest example. Its --max-tokens 64 cuts stories
of the tiny model at max_tokens (finish_reason 'length'), so train passes --include-truncated:
  pipeline make-student --teacher ../shared/models/stories260k --out student-init --layers 2
  pipeline train --store store/ --student student-init --out student \\
      --include-truncated --loss topk --steps 300 --batch-size 8 --lr 3e-3
""",
)
@click.option("--store", "store_dir", required=True, help="Store directory written by pipeline harvest.")
@click.option("--student", required=True, help="Student model directory (from pipeline make-student or save_pretrained) or hub id.")
@click.option("--out", "out_dir", required=True, help="Directory for the trained student and train_state.json; must be new or empty.")
@click.option("--overwrite", is_flag=True, default=None, help="Write into a non-empty --out directory, replacing its files.")
@click.option("--loss", type=click.Choice(LOSS_MODES), default=None, help=f"Distillation loss. {_train_default('loss')}")
@click.option("--where", default=None, help="SQL predicate over the responses table that selects training rows, ANDed with the default filters.")
@click.option("--include-truncated", is_flag=True, default=None, help="Also train on responses cut at max_tokens (finish_reason 'length').")
@click.option("--steps", type=int, default=None, help=f"Optimizer steps. {_train_default('steps')}")
@click.option("--batch-size", type=int, default=None, help=f"Samples per micro-batch. {_train_default('batch_size')}")
@click.option("--grad-accum-steps", type=int, default=None, help=f"Micro-batches per optimizer step. {_train_default('grad_accum_steps')}")
@click.option("--lr", type=float, default=None, help=f"Peak learning rate of AdamW. {_train_default('lr')}")
@click.option("--warmup-steps", type=int, default=None, help=f"Steps of linear warmup before the cosine decay. {_train_default('warmup_steps')}")
@click.option("--min-lr-ratio", type=float, default=None, help=f"Final learning rate as a fraction of --lr. {_train_default('min_lr_ratio')}")
@click.option("--weight-decay", type=float, default=None, help=f"AdamW weight decay. {_train_default('weight_decay')}")
@click.option("--max-grad-norm", type=float, default=None, help=f"Gradient clipping norm; 0 turns clipping off. {_train_default('max_grad_norm')}")
@click.option("--temperature", type=float, default=None, help=f"Distillation temperature T of the KL term. {_train_default('temperature')}")
@click.option("--alpha", type=float, default=None, help=f"Weight of the KL term in the mixed loss, 0 to 1. {_train_default('alpha')}")
@click.option("--max-seq-len", type=int, default=None, help=f"Longest prompt plus response in tokens; longer samples are cut at the end. {_train_default('max_seq_len')}")
@click.option("--device", default=None, help=f"auto (cuda when available), cpu, cuda or cuda:N. {_train_default('device')}")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help=f"Compute dtype under autocast; weights stay float32. {_train_default('dtype')}")
@click.option("--seed", type=int, default=None, help=f"Seed of the data order and the random state. {_train_default('seed')}")
@click.option("--log-every", type=int, default=None, help=f"Steps between progress lines. {_train_default('log_every')}")
@click.option("--eval-every", type=int, default=None, help=f"Steps between held-out evaluations; 0 evaluates only before and after training. {_train_default('eval_every')}")
@click.option("--eval-rows", type=int, default=None, help=f"Held-out samples used by each evaluation. {_train_default('eval_rows')}")
@click.option("--holdout-fraction", type=float, default=None, help=f"Share of prompts held out of training, chosen by a hash of prompt_id. {_train_default('holdout_fraction')}")
@click.option("--save-every", type=int, default=None, help=f"Steps between intermediate checkpoints to --out; 0 saves only at the end (and on Ctrl-C). {_train_default('save_every')}")
@click.option("--append-eos/--no-append-eos", default=None, help=f"Teach the student to emit EOS after responses that ended with finish_reason 'stop'. {_train_default('append_eos')}")
def command(**options: Any) -> None:
    from transformers.utils import logging as transformers_logging

    from student.config import TrainConfig
    from student.trainer import TrainingInterrupted, run_training

    transformers_logging.disable_progress_bar()
    try:
        config = TrainConfig(**_given(options))
        summary = run_training(config, progress=click.echo)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    except KDError as error:
        click.echo(f"train failed: {error}", err=True)
        raise SystemExit(1) from error
    except TrainingInterrupted as interrupted:
        click.echo(
            f"train: {interrupted}; train_state.json records step {interrupted.step} and"
            f" interrupted {interrupted.signal_name}",
            err=True,
        )
        raise SystemExit(interrupted.exit_status) from interrupted

    click.echo("")
    for line in summary.lines():
        click.echo(line)
