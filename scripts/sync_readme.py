"""Rewrite the README's generated schema section from `fmap schema` (run: make docs)."""

from __future__ import annotations

import re
from pathlib import Path

from fmap_cli.store import schema

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = re.compile(r"(<!-- fmap schema -->\n```\n)(.*?)(```\n<!-- /fmap schema -->)", re.S)


def main() -> None:
    """Replace the section between the markers with the current schema text."""
    text = README.read_text(encoding="utf-8")
    if not SECTION.search(text):
        raise SystemExit(f"{README}: schema markers not found")
    README.write_text(SECTION.sub(lambda m: m.group(1) + schema.render() + m.group(3), text), encoding="utf-8")


if __name__ == "__main__":
    main()
