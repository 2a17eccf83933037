"""Spec files (fmap_cli.spec): TOML and JSON read alike; every mistake in one (syntax, keys, types,
values, encoding, the file's name) is one error line naming the file, the layer and the key; and
absurd sizes are refused before any tensor is allocated (a typo like ``out_channels = 1000000000``
must not end in the OOM killer)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY_SPEC, make_photo, tiny_weights
from helpers import error_line, extract_fails, invoke, maps_of

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
# ---------------------------------------------------------------------------- absurd sizes


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


@pytest.fixture
def no_network_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the network is the allocation the check must come before."""

    def refuse(*args: object) -> None:
        raise AssertionError("SpecNet was built: the sizes were not checked first")

    monkeypatch.setattr(fmap_cli.models.SpecNet, "__init__", refuse)


@pytest.mark.usefixtures("no_network_is_built")
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


@pytest.mark.usefixtures("no_network_is_built")
def test_sizes_just_under_the_limits_are_accepted(tmp_path: Path) -> None:
    spec = tmp_path / "big.toml"
    # 16 x 16384 x 4096 float32 is exactly 4 GiB; 3 x 3 x 3 x 16 + 16 parameters.
    spec.write_text(HEAD.format(size="16384, 4096") + CONV.format(channels=16, padding=1))
    assert load_spec(spec).layers[0].params["out_channels"] == 16


# ---------------------------------------------------------------------------- mistakes in a spec file


def write_spec(directory: Path, text: str, name: str = "spec.toml") -> Path:
    directory.mkdir(exist_ok=True)
    np.savez(directory / "tiny.npz", **tiny_weights())
    path = directory / name
    path.write_text(text)
    return path


SPEC_ERRORS = {  # case: (spec text, the error after "Error: <spec file>: ")
    "negative_kernel": (
        TINY_SPEC.replace("kernel_size = 3", "kernel_size = -3", 1),
        "layer 'conv1': kernel_size must be a positive integer, got -3",
    ),
    "unknown_key": (
        TINY_SPEC.replace("kernel_size = 3", "kernal_size = 3", 1),
        "layer 'conv1': unknown key 'kernal_size' (did you mean 'kernel_size'?)",
    ),
    "unknown_type": (
        TINY_SPEC.replace('type = "conv2d"', 'type = "conv2dd"', 1),
        "layer 'conv1': type must be one of conv2d, maxpool2d, avgpool2d, batchnorm2d, flatten, linear, "
        "got 'conv2dd' (did you mean 'conv2d'?)",
    ),
    "unknown_activation": (
        TINY_SPEC.replace('activation = "relu"', 'activation = "rleu"', 1),
        "layer 'conv1': activation must be one of relu, leaky_relu, gelu, sigmoid, tanh, none, "
        "got 'rleu' (did you mean 'relu'?)",
    ),
    "missing_weights_key": (
        TINY_SPEC.replace('weights = "tiny.npz"\n', ""),
        "[model]: 'weights' must be a non-empty string",
    ),
    "missing_required": (
        TINY_SPEC.replace("out_channels = 5\n", ""),
        "layer 'conv2': missing required key 'out_channels'",
    ),
    "bad_stride_in_second_layer": (
        TINY_SPEC.replace("stride = 2", "stride = 0"),
        "layer 'conv2': stride must be a positive integer, got 0",
    ),
    "bad_input_size": (
        TINY_SPEC.replace("size = [20, 24]", "size = [20, 24, 3]"),
        "[input]: size must be an integer or a list of two, got [20, 24, 3]",
    ),
    "toml_syntax": (
        TINY_SPEC.replace("kernel_size = 3", "kernel_size = = 3", 1),
        "cannot parse model spec: ",  # then tomllib's words
    ),
}


def check_spec_error(line: str, spec: Path, case: str) -> None:
    expected = f"Error: {spec}: {SPEC_ERRORS[case][1]}"
    if expected.endswith(": "):
        assert line.startswith(expected), line
    else:
        assert line == expected


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_spec_errors_in_layers_command(tmp_path: Path, case: str) -> None:
    spec = write_spec(tmp_path / "model", SPEC_ERRORS[case][0])
    check_spec_error(error_line(invoke("layers", "-m", spec), 1), spec, case)


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_spec_errors_in_extract(tmp_path: Path, good: list[Path], outdir: Path, case: str) -> None:
    spec = write_spec(tmp_path / "model", SPEC_ERRORS[case][0])
    check_spec_error(extract_fails(good, spec, outdir, 1), spec, case)


def test_json_spec_equivalent_to_toml(tmp_path: Path, good: list[Path], tiny_model: Path) -> None:
    json_spec = write_spec(tmp_path / "json_model", json.dumps(tomllib.loads(TINY_SPEC)), name="tiny.json")
    toml_out, json_out = tmp_path / "toml.h5", tmp_path / "json.h5"
    assert invoke("extract", *good, "-m", tiny_model, "-o", toml_out).exit_code == 0
    result = invoke("extract", *good, "-m", json_spec, "-o", json_out)
    assert result.exit_code == 0, result.output
    a, b = maps_of(toml_out), maps_of(json_out)
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert "conv1" in invoke("layers", "-m", json_spec).stdout


def test_json_spec_syntax_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "m", '{"model": {"name": "x",', name="bad.json")
    line = error_line(invoke("layers", "-m", spec), 1)
    assert line.startswith(f"Error: {spec}: cannot parse model spec: ")  # then the json module's words


BIG = 10**400  # JSON's integers have no bound; a float cannot hold this one
GIB = 3 * BIG * 4 * 10 // 2**30  # tenths of a GiB in a 3 x BIG x 1 float32 input (exact: no rounding up)


@pytest.mark.parametrize(
    ("where", "key", "value", "says"),
    [
        ("input", "mean", [BIG, 0, 0], f"[input]: mean must be a list of 3 finite numbers, got [{BIG}, 0, 0]"),
        ("input", "std", [1, BIG, 1], f"[input]: std must be a list of 3 positive numbers, got [1, {BIG}, 1]"),
        ("layer", "negative_slope", BIG, f"layer 'conv1': negative_slope must be a finite number, got {BIG}"),
        ("input", "resize", BIG, f"[input]: resize must be at most 2147483647, got {BIG}"),
        (
            "input",
            "size",
            [BIG, 1],
            f"[input]: size = [{BIG}, 1] makes a 3x{BIG}x1 input, {GIB // 10}.{GIB % 10} GiB per image, more than "
            "fmap's limit of 4 GiB; use a smaller size",
        ),
    ],
)
def test_json_spec_numbers_too_large_for_a_float(
    tmp_path: Path, where: str, key: str, value: object, says: str
) -> None:
    raw = tomllib.loads(TINY_SPEC)
    (raw["input"] if where == "input" else raw["layers"][0])[key] = value
    spec = write_spec(tmp_path / "m", json.dumps(raw), name="big.json")
    assert error_line(invoke("layers", "-m", spec), 1) == f"Error: {spec}: {says}"


def test_nonexistent_spec(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = tmp_path / "missing.toml"
    said = f"Error: {spec}: cannot read model spec: No such file or directory"
    assert error_line(invoke("layers", "-m", spec), 1) == said
    assert extract_fails(good, spec, outdir, 1) == said


@pytest.mark.parametrize("name", ["spec.yaml", "spec", "tiny.npz"])
def test_wrong_extension_spec(tmp_path: Path, good: list[Path], outdir: Path, name: str) -> None:
    spec = tmp_path / "m" / name
    if name != "tiny.npz":  # a valid spec under a wrong name; tiny.npz is the weights file itself
        write_spec(spec.parent, TINY_SPEC, name=name)
    else:
        write_spec(spec.parent, TINY_SPEC)
    # an unrecognisable --model value is a usage error (exit 2) naming the flag and the value
    said = (
        f"Error: --model: cannot understand '{spec}'; give a built-in name (edges), a .toml/.json spec, "
        "a .pt2 program, package.module:factory, file.py:factory, torchvision:NAME or timm:NAME"
    )
    assert error_line(invoke("layers", "-m", spec), 2) == said
    assert extract_fails(good, spec, outdir, 2) == said


def test_spec_not_utf8(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.toml"
    spec.write_bytes(TINY_SPEC.replace('name = "tiny"', 'name = "tiny\xe9"').encode("latin-1"))
    assert error_line(invoke("layers", "-m", spec), 1) == f"Error: {spec}: model spec is not UTF-8 text"
