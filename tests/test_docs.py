"""The README stays true: its schema section is `fmap schema`, and it documents every command."""

from __future__ import annotations

import re
import shlex

import pytest
from click.testing import CliRunner
from conftest import REPO

from fmap_cli.cli import cli
from fmap_cli.store import schema

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_schema_section_is_fmap_schema_output() -> None:
    match = re.search(r"<!-- fmap schema -->\n```\n(.*?)```\n<!-- /fmap schema -->", README, re.S)
    assert match, "README lost its generated schema section"
    assert match.group(1) == schema.render(), "README schema section is stale: run 'make docs'"


def test_readme_documents_every_command() -> None:
    for name in cli.commands:
        assert f"fmap {name}" in README, f"README does not show 'fmap {name}'"


def test_readme_starts_with_the_two_setup_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make demo" in quick_start
    assert "make test" in quick_start
    assert "PATH" in quick_start


def test_readme_layers_examples_are_real_output(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the example names tests/zoo.py relative to the repository
    block = README.split("```sh\n$ fmap layers\n", 1)[1].split("```", 1)[0]
    default, rest = block.split("$ fmap layers --model ", 1)
    command, expected = rest.split("\n", 1)
    runner = CliRunner()
    assert runner.invoke(cli, ["layers"]).output == default
    args = ["layers", "--model", *shlex.split(command)]
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.output == expected


def test_readme_models_schema_version_examples_are_real_output() -> None:
    block = README.split("```sh\n$ fmap models\n", 1)[1].split("```", 1)[0]
    for example in ("fmap models\n" + block).split("$ "):
        command, expected = example.split("\n", 1)
        command = command.split("#", 1)[0].strip()
        args, _, head = command.removeprefix("fmap ").partition(" | head -")
        output = CliRunner().invoke(cli, shlex.split(args), catch_exceptions=False).output
        if head:
            output = "".join(output.splitlines(keepends=True)[: int(head)])
        assert output == expected, command
