"""``pipeline eval``: measure a student against the teacher's stored responses.

Prints KL from the teacher's top-k to the student, the student's cross-entropy on the
teacher's tokens and top-1 agreement, by default on the prompts that training held out.
The same numbers come from :func:`student.evaluate.evaluate_store` in Python.
"""

from __future__ import annotations

import json
from typing import Any

import click

from pipeline.commands.train import config_default
from pipeline.errors import ConfigError, KDError
from student.config import DTYPES, SPLITS


def _eval_default(name: str) -> str:
    from student.config import EvalConfig

    return f"[default: {config_default(EvalConfig, name)}]"


@click.command(
    "eval",
    help="""Evaluate a student on stored teacher responses.

Reports three metrics per target token, and the number of rows and positions.
kl_nats_per_token is KL(teacher top-k || student) at temperature 1, with the teacher's
alternatives renormalised over those that map to student tokens. ce_nats_per_token is
the student's cross-entropy on the teacher's tokens. top1_agreement is the share of
positions where the student's most likely token is the teacher's most likely
alternative.

--split heldout (the default) reads the prompts that pipeline train held out, with the
holdout fraction recorded in the checkpoint's train_state.json; --split train reads the
others and --split all reads every row. Row filters are those of pipeline train.

""",
    epilog="""\b
Example:
  pipeline eval --store store/ --student student --split heldout --include-truncated
  pipeline eval --store store/ --student student --split all --json
""",
)
@click.option("--store", "store_dir", required=True, help="Store directory written by pipeline harvest.")
@click.option("--student", required=True, help="Student checkpoint directory (from pipeline train) or any causal LM directory.")
@click.option("--where", default=None, help="SQL predicate over the responses table, ANDed with the default filters.")
@click.option("--include-truncated", is_flag=True, default=None, help="Also evaluate responses cut at max_tokens (finish_reason 'length').")
@click.option("--split", type=click.Choice(SPLITS), default=None, help=f"Which prompts to read. {_eval_default('split')}")
@click.option("--holdout-fraction", type=float, default=None, help="Share of prompts held out; default: the value in the checkpoint's train_state.json.")
@click.option("--max-rows", type=int, default=None, help="Evaluate at most this many samples. [default: all]")
@click.option("--batch-size", type=int, default=None, help=f"Samples per forward pass. {_eval_default('batch_size')}")
@click.option("--max-seq-len", type=int, default=None, help=f"Longest prompt plus response in tokens. {_eval_default('max_seq_len')}")
@click.option("--device", default=None, help=f"auto, cpu, cuda or cuda:N. {_eval_default('device')}")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help=f"Compute dtype. {_eval_default('dtype')}")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def command(as_json: bool, **options: Any) -> None:
    from transformers.utils import logging as transformers_logging

    from student.config import EvalConfig
    from student.evaluate import evaluate_store

    transformers_logging.disable_progress_bar()
    try:
        config = EvalConfig(**{name: value for name, value in options.items() if value is not None})
        result = evaluate_store(config)
    except ConfigError as error:
        raise click.UsageError(str(error)) from error
    except KDError as error:
        click.echo(f"eval failed: {error}", err=True)
        raise SystemExit(1) from error

    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(result.report())
    if result.positions == 0:
        click.echo(
            "eval: no positions to evaluate; check --split, --where, --include-truncated"
            " and --holdout-fraction",
            err=True,
        )
        raise SystemExit(2)
