"""Command-line entry point: ``pipeline <command>``.

Each command lives in its own module under :mod:`pipeline.commands` and is imported
only when it runs, so ``pipeline sql`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

# Command name -> module under pipeline.commands that defines ``command``.
COMMANDS = {
    "serve-teacher": "serve_teacher",
    "harvest": "harvest",
    "sql": "sql",
    "check": "check",
    "compact": "compact",
    "make-student": "make_student",
    "train": "train",
    "eval": "evaluate",
}


class LazyGroup(click.Group):
    """A group that imports a command's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module_name = COMMANDS.get(name)
        if module_name is None:
            return None
        module = importlib.import_module(f"pipeline.commands.{module_name}")
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="Log more: -v for INFO, -vv for DEBUG.")
def cli(verbose: int) -> None:
    """Harvest teacher outputs, store them in Parquet, query them, train students.

    \b
    Example:
      pipeline serve-teacher ../shared/models/stories260k --port 8400 &
      pipeline harvest prompts/demo_stories.jsonl --base-url http://127.0.0.1:8400/v1 \\
          --model stories260k --store store/
      pipeline sql "SELECT teacher, count(*) FROM responses GROUP BY 1" --store store/
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
