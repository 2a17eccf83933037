"""fmap inspect's text report (summary.py): its whole text on a file with known statistics, and
stored text (paths, names) printed with its control characters escaped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner, Result
from crafted import craft

from fmap_cli.cli import cli


def fmap(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def known(path: Path, names: tuple[str, str] = ("conv", "pool"), **attrs: str) -> Path:
    """Two images; layer ``conv`` z (2, 2, 2, 2) with a = relu(z), its channel 1 dead; layer ``pool``
    z (2, 1, 1, 1) = 5 and -5, without a. Fixed version and time, so the report is known exactly."""
    z = np.array(
        [
            [[[-2, -1], [1, 2]], [[-1, -1], [-1, -1]]],
            [[[0, 1], [2, 3]], [[-3, -3], [-3, -3]]],
        ],
        dtype=np.float32,
    )
    pool = np.array([5, -5], dtype=np.float32).reshape(2, 1, 1, 1)
    craft(path, {names[0]: (z, np.maximum(z, 0)), names[1]: (pool, None)}, image_paths=attrs.pop("paths", None))
    with h5py.File(path, "r+") as f:
        f.attrs.update({"fmap_version": "9.9.9", "created": "2024-01-02T03:04:05Z", **attrs})
    return path


def test_whole_text_report(tmp_path: Path) -> None:
    # conv z: channel 0 holds -2 -1 1 2 0 1 2 3, channel 1 four -1 and four -3: min -3, max 3,
    # mean -10/16, E[z^2] 64/16 so std sqrt(4 - 0.625^2) = 1.8998, negatives (2 + 8)/16.
    # conv a: 0 0 1 2 0 1 2 3 and zeros: mean 9/16, E[a^2] 19/16 so std 0.9333; zero fraction per
    # image and channel 2/4, 1, 1/4, 1: mean 0.6875. Channel 1 is dead (a = 0 everywhere).
    path = known(tmp_path / "known.h5")
    result = fmap("inspect", path)
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        f"{path}: fmap schema v1, written by fmap 9.9.9 at 2024-01-02T03:04:05Z on cpu\n"
        "model: crafted (tests)\n"
        "images: 2\n"
        "  [0] img0.png  (32x32)\n"
        "  [1] img1.png  (32x32)\n"
        "layers:\n"
        "  conv  conv2d -> relu  2x2x2x2 float32  128 B on disk (1.00x)  input: input\n"
        "    z preactivation  min         -3  max          3  mean     -0.625  std        1.9  negatives  62.5%\n"
        "    a activation     min          0  max          3  mean     0.5625  std     0.9333  zeros  68.8%\n"
        "    dead channels: 1/2 (1)\n"
        "  pool  conv2d -> none  2x1x1x1 float32  8 B on disk (1.00x)  input: input\n"
        "    z preactivation  min         -5  max          5  mean          0  std          5  negatives  50.0%\n"
        "    a (none: no nonlinearity follows this layer)\n"
    )


CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # every control character but the newline


def test_stored_text_is_printed_with_control_characters_escaped(tmp_path: Path) -> None:
    paths = ["\x1b]0;pwned\x07a.png", "b\x1b[2J\x9b\x7f\n.png"]
    path = known(tmp_path / "evil.h5", ("c\x1bv", "pool"), paths=paths, model_name="m\x1b[31mred", device="\x1b[2J")
    result = fmap("inspect", path, "--channels", "--top", "1", "--hist")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:5] == [
        f"{path}: fmap schema v1, written by fmap 9.9.9 at 2024-01-02T03:04:05Z on \\x1b[2J",
        "model: m\\x1b[31mred (tests)",
        "images: 2",
        "  [0] \\x1b]0;pwned\\x07a.png  (32x32)",
        "  [1] b\\x1b[2J\\x9b\\x7f\\x0a.png  (32x32)",
    ]
    assert lines[6].startswith("  c\\x1bv  conv2d -> relu  2x2x2x2 float32")
    assert "         0: 3 [1] b\\x1b[2J\\x9b\\x7f\\x0a.png" in lines
    assert not CONTROL.search(result.stdout)
    data = json.loads(fmap("inspect", path, "--json").stdout)  # JSON escapes them itself
    assert [image["path"] for image in data["images"]] == paths and data["model_name"] == "m\x1b[31mred"
    wrong = fmap("inspect", path, "--layer", "nope")
    assert wrong.exit_code == 2
    assert wrong.stderr.splitlines()[-1] == f"Error: layer 'nope' not in {path}; stored layers: c\\x1bv, pool"
