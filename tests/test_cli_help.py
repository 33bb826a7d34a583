"""Every command has help text that ends with a runnable example and is documented."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import COMMANDS, cli
from tests.conftest import REPO_DIR


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_has_example(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"pipeline {name}" in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_options_have_help(name: str) -> None:
    command = cli.get_command(None, name)  # type: ignore[arg-type]
    for param in command.params:
        if param.param_type_name == "option":
            assert param.help, f"pipeline {name} {param.opts[0]} has no help text"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_readme_documents_command(name: str) -> None:
    readme = (REPO_DIR / "README.md").read_text(encoding="utf-8")
    assert f"pipeline {name}" in readme


def test_top_level_help_lists_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_example_follows_options(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.output.index("Options:") < result.output.index("Example")


@pytest.mark.parametrize(("name", "option"), [("train", "--loss"), ("train", "--dtype"), ("eval", "--split"),
                                              ("eval", "--dtype"), ("make-student", "--init")])
def test_fixed_choices_listed_in_help(name: str, option: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    options = result.output[result.output.index("Options:"):]
    line = next(line for line in options.splitlines() if line.strip().startswith(option))
    assert "TEXT" not in line
    assert "[" in line
