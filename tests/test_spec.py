"""Spec files with absurd sizes are refused, naming the file, the layer and the key, before any
tensor is allocated (a typo like ``out_channels = 1000000000`` must not end in the OOM killer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_photo

import fmap_cli.models
from fmap_cli.cli import cli
from fmap_cli.errors import SpecError
from fmap_cli.spec import load_spec

HEAD = """\
[model]
name = "big"
weights = "big.npz"   # never read: the spec is refused first

[input]
size = [{size}]
"""
CONV = """
[[layers]]
name = "conv1"
type = "conv2d"
out_channels = {channels}
kernel_size = 3
padding = {padding}
activation = "relu"
"""
FLAT = """
[[layers]]
name = "flat"
type = "flatten"

[[layers]]
name = "fc"
type = "linear"
out_features = {features}
"""
LIMIT = "more than fmap's limit of"

CASES = {
    "parameters": (
        HEAD.format(size="32, 32") + CONV.format(channels=1_000_000_000, padding=1),
        f"layer 'conv1': out_channels = 1000000000 gives the model 28000000000 parameters, {LIMIT} "
        "2147483648 (2**31); use a smaller out_channels",
    ),
    "map": (
        HEAD.format(size="32, 32") + CONV.format(channels=16, padding=20000),
        f"layer 'conv1': padding = 20000 makes a 16x40030x40030 map, 95.5 GiB per image, {LIMIT} 4 GiB; "
        "use a smaller padding",
    ),
    "linear": (
        HEAD.format(size="32, 32") + CONV.format(channels=16, padding=1) + FLAT.format(features=200_000),
        f"layer 'fc': out_features = 200000 gives the model 3277000448 parameters, {LIMIT} 2147483648 (2**31); "
        "use a smaller out_features",
    ),
    "input": (
        HEAD.format(size="100000, 100000") + CONV.format(channels=16, padding=1),
        f"[input]: size = [100000, 100000] makes a 3x100000x100000 input, 111.8 GiB per image, {LIMIT} 4 GiB; "
        "use a smaller size",
    ),
}


@pytest.fixture(autouse=True)
def no_network_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the network is the allocation the check must come before."""

    def refuse(*args: object) -> None:
        raise AssertionError("SpecNet was built: the sizes were not checked first")

    monkeypatch.setattr(fmap_cli.models.SpecNet, "__init__", refuse)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["layers", "extract"])
def test_absurd_sizes_are_refused_before_allocation(case: str, command: str, tmp_path: Path) -> None:
    text, message = CASES[case]
    spec = tmp_path / "big.toml"
    spec.write_text(text)
    image = tmp_path / "a.png"
    make_photo(40, 40).save(image)
    out = tmp_path / "out.h5"
    args = ["layers", "--model", str(spec)]
    if command == "extract":
        args = ["extract", str(image), "--model", str(spec), "--device", "cpu", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {spec}: {message}\n"
    assert not out.exists()
    with pytest.raises(SpecError) as caught:
        load_spec(spec)  # the check needs no torch
    assert str(caught.value) == f"{spec}: {message}"


def test_sizes_just_under_the_limits_are_accepted(tmp_path: Path) -> None:
    spec = tmp_path / "big.toml"
    # 16 x 16384 x 4096 float32 is exactly 4 GiB; 3 x 3 x 3 x 16 + 16 parameters.
    spec.write_text(HEAD.format(size="16384, 4096") + CONV.format(channels=16, padding=1))
    assert load_spec(spec).layers[0].params["out_channels"] == 16
