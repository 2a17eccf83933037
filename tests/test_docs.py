"""The README stays true: its schema section is `fmap schema`, and it documents every command."""

from __future__ import annotations

import re

from conftest import REPO

from fmap_cli import schema
from fmap_cli.cli import cli

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
