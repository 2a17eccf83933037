"""``fmap extract --verify`` (issue 9, section 2c): every stored map is checked by an independent
forward pass, and anything that differs, or was not checked, fails the run with one line.

The model is ``tests/zoo.py:residual_net``: batch norm between z and a, residual adds and in-place
ReLUs, so no default layer has a == f(z) alone (the old check verified 0 values on it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import REPO, make_photo
from helpers import ok, run_extract, write_photos
from torch import nn

from fmap_cli import extract as pipeline
from fmap_cli import verify
from fmap_cli.cli import cli
from fmap_cli.pairing import LayerMaps

MODEL = "tests/zoo.py:residual_net"  # relative to the repository root (tests chdir there)
DEFAULT_LAYERS = ["stem.0", "block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "block2.downsample.0"]
TOLERANCE = "rtol 1e-05 + 1e-05 x max|map|"


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.chdir(REPO)
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        make_photo(24, 24, seed=i).save(path)
        paths.append(str(path))
    return paths


def extract(*args: Any) -> Result:
    return CliRunner().invoke(cli, ["extract", "--model", MODEL, "--size", "24", "--device", "cpu", *map(str, args)])


def verified_line(result: Result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("verified ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def stored_values(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return sum(group[role].size for group in f["layers"].values() for role in group if role in verify.ROLES)


def only_error(result: Result) -> str:
    """The one line a failed run prints, with exit code 1 and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def nothing_left(directory: Path) -> None:
    assert sorted(p.name for p in directory.iterdir() if p.suffix in (".h5", ".partial")) == []


def test_default_layers_of_a_batch_norm_network_are_all_checked(images: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    result = extract(*images, "--batch-size", "2", "--verify", "-o", out)
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        assert list(f.attrs["layers"]) == DEFAULT_LAYERS
        assert not any(int(f["layers"][name].attrs["a_is_f_of_z"]) for name in DEFAULT_LAYERS)
    line = verified_line(result)
    match = re.fullmatch(
        r"verified a == f\(z\) at the (\d+) nonlinearities and all (\d+) stored values \((\d+) layers x (\d+) images\) "
        rf"against an independent forward pass \(tolerance {re.escape(TOLERANCE)}; largest difference (\S+), "
        r"(\S+) of the tolerance\)",
        line,
    )
    assert match, line
    pairs, values, layers, n_images, largest, used = match.groups()
    assert (int(pairs), int(values), int(layers), int(n_images)) == (5, stored_values(out), 6, 3)
    assert float(used) <= 1.0 and float(largest) >= 0.0


def test_the_library_reports_what_it_checked(images: list[str], tmp_path: Path) -> None:
    from conftest import extract_options

    out = tmp_path / "lib.h5"
    result = pipeline.extract(
        extract_options(images, out=out, model=MODEL, size=(24, 24), device="cpu", verify=True, layers=["*"])
    )
    assert result.values_verified == stored_values(out) > 0


@contextmanager
def changed_capture(change: Callable[[dict[str, LayerMaps]], None]) -> Iterator[None]:
    """Capture as usual, then ``change`` the maps of the first batch (a bug in capture, simulated)."""
    real = pipeline.capture

    @contextmanager
    def capture(*args: Any) -> Iterator[Callable[[torch.Tensor], dict[str, LayerMaps]]]:
        with real(*args) as run:
            calls = []

            def changed(x: torch.Tensor) -> dict[str, LayerMaps]:
                maps = run(x)
                if not calls:
                    change(maps)
                calls.append(x.shape[0])
                return maps

            yield changed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "capture", capture)
        yield


def test_one_perturbed_value_fails_with_one_line(images: list[str], tmp_path: Path) -> None:
    def perturb(maps: dict[str, LayerMaps]) -> None:
        z = maps["block1.conv2"].z
        assert z is not None
        z = z.clone()  # captured tensors may be shared with other maps
        z[1, 2, 3, 4] += 1.0
        maps["block1.conv2"] = LayerMaps(z, maps["block1.conv2"].a)

    out = tmp_path / "out.h5"
    with changed_capture(perturb):
        result = extract(*images, "--verify", "-o", out)
    assert only_error(result) == (
        "Error: layer 'block1.conv2': stored preactivation differs from the independent forward pass by 1 at "
        f"image 1, position (2, 3, 4) (tolerance: {TOLERANCE})"
    )
    nothing_left(tmp_path)
    with changed_capture(perturb):  # without --verify the same run passes: the check is what catches it
        assert extract(*images, "-o", out).exit_code == 0


def test_a_perturbed_activation_fails_too(images: list[str], tmp_path: Path) -> None:
    def perturb(maps: dict[str, LayerMaps]) -> None:
        a = maps["stem.0"].a
        assert a is not None
        a = a.clone()
        a[0, 0, 0, 0] = -1.0  # never a ReLU's output
        maps["stem.0"] = LayerMaps(maps["stem.0"].z, a)

    with changed_capture(perturb):
        result = extract(*images, "--verify", "-o", tmp_path / "out.h5")
    assert re.fullmatch(
        r"Error: layer 'stem\.0': stored activation differs from the independent forward pass by \S+ at image 0, "
        rf"position \(0, 0, 0\) \(tolerance: {re.escape(TOLERANCE)}\)",
        only_error(result),
    )
    nothing_left(tmp_path)


def test_a_value_changed_on_its_way_to_the_file_fails(
    images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the forward pass gave is checked, then the file must hold exactly that (a writer bug, simulated)."""
    real = pipeline._host
    changed: list[tuple[int, ...]] = []

    def host(t: torch.Tensor | None) -> np.ndarray | None:
        values = real(t)
        if values is not None and not changed and values.ndim == 4:
            values = values.copy()
            values[0, 0, 0, 0] += np.float32(0.5)
            changed.append(values.shape)
        return values

    monkeypatch.setattr(pipeline, "_host", host)
    result = extract(*images, "--verify", "-o", tmp_path / "out.h5")
    assert changed
    assert re.fullmatch(
        r"Error: layer '[\w.]+': the (preactivation|activation) written to the file differs from the values "
        r"verified during the forward pass",
        only_error(result),
    )
    nothing_left(tmp_path)


def test_a_map_the_independent_pass_cannot_find_is_a_failure(
    images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = verify.recompute

    def forgetful(*args: Any) -> dict[str, dict[str, torch.Tensor]]:
        held = real(*args)
        held.pop("block2.conv1", None)
        return held

    monkeypatch.setattr(verify, "recompute", forgetful)
    result = extract(*images, "--verify", "-o", tmp_path / "out.h5")
    assert only_error(result) == (
        "Error: layer 'block2.conv1': its stored preactivation was not checked: the independent forward pass "
        "made no call 'block2.conv1' to read it from"
    )
    nothing_left(tmp_path)


def test_a_is_f_of_the_input_of_f_at_every_nonlinearity(
    images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The input of a ReLU read by the independent pass is not a stored map: only a == f(input of f) sees it."""
    real = verify.recompute

    def shifted(*args: Any) -> dict[str, dict[str, torch.Tensor]]:
        held = real(*args)
        held["block1.relu"]["input"] = held["block1.relu"]["input"] + 1.0
        return held

    monkeypatch.setattr(verify, "recompute", shifted)
    result = extract(*images, "--verify", "-o", tmp_path / "out.h5")
    assert re.fullmatch(
        r"Error: nonlinearity 'block1\.relu': its output differs from relu\(its input\) by \S+ at image \d, "
        r"position \(\d+, \d+, \d+\) \(tolerance 0 x \(1 \+ \|relu\(z\)\|\)\)",
        only_error(result),
    )


def test_append_without_input_cannot_be_verified(images: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    assert extract(images[0], "-o", out).exit_code == 0
    before = out.read_bytes()
    result = extract(images[1], "--append", "--verify", "-o", out)
    assert only_error(result) == (
        "Error: --verify: the 1 images an earlier run put in the file cannot be re-checked: it has no /input "
        "(that run did not use --save-input)"
    )
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".partial") == []


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_append_with_input_verifies_every_image(images: list[str], tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "out.h5"
    common = ("--save-input", "--dtype", dtype, "--layers", "block1*")
    assert extract(images[0], *common, "-o", out).exit_code == 0
    result = extract(*images[1:], *common, "--append", "--verify", "-o", out)
    assert result.exit_code == 0, result.output
    line = verified_line(result)
    assert f"all {stored_values(out)} stored values (7 layers x 3 images)" in line
    assert ("rtol 0.000987 + 1e-05 x max|map| + 5.96e-08 for maps read back from float16" in line) == (
        dtype == "float16"
    )


def test_a_torch_export_program_is_verified(images: list[str], tmp_path: Path) -> None:
    import zoo

    program = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(zoo.residual_net().eval(), (torch.randn(2, 3, 24, 24),)), str(program))
    out = tmp_path / "out.h5"
    result = CliRunner().invoke(
        cli, ["extract", *images, "--model", str(program), "--device", "cpu", "--verify", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"all {stored_values(out)} stored values (6 layers x 3 images)" in verified_line(result)


def test_out_of_memory_in_the_check_retries_in_halves(
    images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """extract halves a batch that does not fit, the check's second forward pass included: nothing counted twice."""
    real = verify.recompute
    sizes: list[int] = []

    def tight(model: torch.nn.Module, x: torch.Tensor, wanted: Any) -> dict[str, dict[str, torch.Tensor]]:
        sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, x, wanted)

    monkeypatch.setattr(verify, "recompute", tight)
    out = tmp_path / "out.h5"
    result = extract(*images, "--batch-size", "3", "--verify", "-o", out)
    assert result.exit_code == 0, result.output
    assert sizes == [3, 1, 2, 1, 1]
    assert f"all {stored_values(out)} stored values (6 layers x 3 images)" in verified_line(result)


OTHER_DTYPES = """
import torch
from torch import nn


class Maps(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.cast = nn.Identity()
        self.dtype = getattr(torch, dtype)

    def forward(self, x):
        return self.cast(self.conv(x).to(self.dtype))


def maps(dtype):
    return Maps(dtype)
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "int64"])
def test_maps_of_other_dtypes_are_stored_and_verified(dtype: str, tmp_path: Path) -> None:
    """bfloat16 (numpy has none) and integer maps: stored as float32, and --verify's digest of what
    it checked is of the values as stored."""
    factory = tmp_path / "dtypes.py"
    factory.write_text(OTHER_DTYPES)
    out = tmp_path / "out.h5"
    images = write_photos(tmp_path / "images", 3)
    ok(run_extract(images, Path(f"{factory}:maps"), out, "--model-arg", f"dtype={dtype}", "-b", "2", "--size", "8",
                   "--save-input", "--layers", "cast", "--verify"))  # fmt: skip
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with h5py.File(out, "r") as f, torch.no_grad():
        want = conv(torch.from_numpy(f["input"][:])).to(getattr(torch, dtype)).float().numpy()
        assert np.array_equal(f["layers/cast/preactivation"][:], want)
