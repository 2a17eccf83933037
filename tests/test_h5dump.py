"""The file documents itself to HDF5's own reader: h5dump prints z/a roles and text readably."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from fmap_cli.cli import cli

pytestmark = pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (hdf5-tools) not installed")


def test_h5dump_shows_roles_and_glossary(tmp_path: Path, tiny_model: Path, images: list[Path]) -> None:
    out = tmp_path / "maps.h5"
    result = CliRunner().invoke(cli, ["extract", str(images[0]), "-m", str(tiny_model), "-o", str(out)])
    assert result.exit_code == 0, result.output
    dump = subprocess.run(["h5dump", "-A", str(out)], capture_output=True, text=True, check=True).stdout
    assert 'DATASET "preactivation"' in dump and 'DATASET "activation"' in dump
    assert '"preactivation"' in dump.split('ATTRIBUTE "role"', 1)[1]  # role attribute printed as text
    assert "rectified feature map" in dump
    assert "'Feature map' and 'activation map' in the literature mean a" in dump
    assert "H5T_STD_I8LE" in dump.split('ATTRIBUTE "complete"', 1)[1].split("}", 1)[0]
