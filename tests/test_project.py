"""fmap project: projections checked against independent numpy computations (a conv1 filter, max-pool
switches, the sign masks of deconvnet, guided backpropagation and the gradient), a ResNet with in-place
ReLUs, the model left as it was, refusals as one line, the file contract, inspect and render."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, make_photo, tiny_weights
from helpers import FMAP, error_line, invoke, ok
from PIL import Image
from torch import nn

from fmap_cli.capture import capture, discover
from fmap_cli.errors import ModelError, StoppedError
from fmap_cli.projection import METHODS, ProjectOptions, Unit, project, project_units
from fmap_cli.receptive import input_tensor
from fmap_cli.store import schema

ZOO = REPO / "tests" / "zoo.py"


def extract(images: list[Path], model: Path | str, out: Path, *extra: object) -> Path:
    ok(invoke("extract", *images, "-m", model, "--device", "cpu", "-q", "-o", out, *extra))
    return out


def run_project(maps: Path, out: Path, *args: object) -> Path:
    ok(invoke("project", maps, *args, "--device", "cpu", "-q", "-o", out))
    return out


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        found = {name: f[f"unit/{name}"][...] for name in ("image", "row", "col", "value")}
        return {**found, "projection": f["projection"][...], "input": f["input"][...]}


def write_spec(folder: Path, name: str, size: tuple[int, int], mean: float, std: float, layers: str,
               weights: dict[str, np.ndarray]) -> Path:  # fmt: skip
    """A spec model ``folder/name.toml`` with ``weights`` in ``folder/name.npz``."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / f"{name}.toml"
    spec.write_text(
        f'[model]\nname = "{name}"\nweights = "{name}.npz"\n\n[input]\nsize = [{size[0]}, {size[1]}]\n'
        f"mean = [{mean}, {mean}, {mean}]\nstd = [{std}, {std}, {std}]\n\n{layers}"
    )
    np.savez(folder / f"{name}.npz", **{k: v.astype(np.float32) for k, v in weights.items()})
    return spec


def png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)
    return path


# ---------------------------------------------------------------------------- against numpy


@pytest.mark.parametrize("method", METHODS)
def test_conv1_projection_is_the_filter_at_the_units_window(
    method: str, tiny_model: Path, images: list[Path], tmp_path: Path
) -> None:
    """conv1 (3x3, padding 1) of the tiny spec: the projection of unit (c, i, j) is a[c, i, j] times
    the filter w[c] placed on the unit's window of input pixels, zero elsewhere (cut at the border)."""
    maps = extract(images, tiny_model, tmp_path / "maps.h5", "--layers", "conv1")
    w = tiny_weights()["conv1.weight"].astype(np.float64)  # (4, 3, 3, 3)
    with h5py.File(maps, "r") as f:
        a = f["layers/conv1/activation"][...].astype(np.float64)  # (3, 4, 20, 24)

    def expected(n: int, c: int, row: int, col: int) -> np.ndarray:
        out = np.zeros((3, 20, 24))
        for ki in range(3):
            for kj in range(3):
                i, j = row - 1 + ki, col - 1 + kj  # stride 1, padding 1
                if 0 <= i < 20 and 0 <= j < 24:
                    out[:, i, j] = a[n, c, row, col] * w[c, :, ki, kj]
        return out

    corners = [(0, 0), (0, 23), (19, 0), (19, 23)]
    c, corner = next((c, p) for p in corners for c in range(4) if a[1, c, p[0], p[1]] > 0)
    for row, col in [corner, (7, 11)]:
        got = read(run_project(maps, tmp_path / f"u{row}-{col}.h5", "--layer", "conv1", "--channel", c,
                               "--image", 1, "--unit", f"{row},{col}", "--method", method))  # fmt: skip
        assert got["value"][0] == pytest.approx(a[1, c, row, col], rel=1e-6)
        if a[1, c, row, col] > 0 or method == "gradient":
            np.testing.assert_allclose(got["projection"][0], expected(1, c, row, col), rtol=1e-5, atol=1e-7)
        else:  # a unit at zero: nothing to project
            assert not got["projection"][0].any()
    top = read(run_project(maps, tmp_path / "top.h5", "--layer", "conv1", "--channel", c, "--method", method))
    assert top["image"].tolist() == np.argsort(-a[:, c].max(axis=(1, 2)), kind="stable").tolist()
    for k, n in enumerate(top["image"]):
        row, col = np.unravel_index(np.argmax(a[n, c]), (20, 24))
        assert (top["row"][k], top["col"][k]) == (row, col)
        np.testing.assert_allclose(top["projection"][k], expected(n, c, row, col), rtol=1e-5, atol=1e-7)


SWITCH_LAYERS = """\
[[layers]]
name = "conv1"
type = "conv2d"
out_channels = 3
kernel_size = 1
activation = "relu"

[[layers]]
name = "pool1"
type = "maxpool2d"
kernel_size = 2
"""
# The red channel of a 4x4 image; the maximum of each 2x2 window (the max-pool switch), by hand:
RED = np.array([[10, 20, 200, 30],
                [40, 250, 50, 60],
                [70, 80, 90, 15],
                [25, 35, 240, 45]])  # fmt: skip
SWITCHES = {(0, 0): (1, 1), (0, 1): (0, 2), (1, 0): (2, 1), (1, 1): (3, 2)}  # pool1 unit -> input pixel


@pytest.mark.parametrize("method", METHODS)
def test_max_pool_sends_the_signal_to_its_switches_only(method: str, tmp_path: Path) -> None:
    """conv1 is the identity (1x1, weights eye(3)) then ReLU, then a 2x2 max pool: a pool1 unit
    projects to exactly one pixel, the switch of its window, with the unit's value."""
    spec = write_spec(tmp_path / "m", "switch", (4, 4), 0.0, 1.0, SWITCH_LAYERS,
                      {"conv1.weight": np.eye(3).reshape(3, 3, 1, 1), "conv1.bias": np.zeros(3)})  # fmt: skip
    pixels = np.stack([RED, RED[::-1], RED[:, ::-1]], axis=-1)
    maps = extract([png(tmp_path / "four.png", pixels)], spec, tmp_path / "maps.h5", "--layers", "pool1")
    x = (pixels / np.float32(255)).astype(np.float32)  # mean 0, std 1
    for (row, col), (i, j) in SWITCHES.items():
        got = read(run_project(maps, tmp_path / f"{row}{col}.h5", "--layer", "pool1", "--channel", 0,
                               "--image", 0, "--unit", f"{row},{col}", "--method", method))  # fmt: skip
        expected = np.zeros((3, 4, 4), dtype=np.float32)
        expected[0, i, j] = x[i, j, 0]
        assert got["value"][0] == x[i, j, 0]
        np.testing.assert_array_equal(got["projection"][0], expected)
    whole = read(run_project(maps, tmp_path / "whole.h5", "--layer", "pool1", "--channel", 0, "--image", 0,
                             "--whole-map", "--method", method))  # fmt: skip
    expected = np.zeros((3, 4, 4), dtype=np.float32)
    for i, j in SWITCHES.values():
        expected[0, i, j] = x[i, j, 0]
    np.testing.assert_array_equal(whole["projection"][0], expected)
    assert (whole["row"][0], whole["col"][0], whole["value"][0]) == (-1, -1, x[1, 1, 0])


def masks_net(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": rng.normal(0, 1, (3, 3, 1, 1)),
        "conv1.bias": rng.normal(0, 0.5, 3),
        "conv2.weight": rng.normal(0, 1, (2, 3, 3, 3)),
        "conv2.bias": np.array([2.0, 2.0]),
    }


MASK_LAYERS = """\
[[layers]]
name = "conv1"
type = "conv2d"
out_channels = 3
kernel_size = 1
activation = "{activation}"
negative_slope = 0.2

[[layers]]
name = "conv2"
type = "conv2d"
out_channels = 2
kernel_size = 3
activation = "relu"
"""


def two_layer(x: np.ndarray, weights: dict[str, np.ndarray], slope: float) -> dict[str, np.ndarray]:
    """conv1 (1x1) -> f -> conv2 (3x3 on the 3x3 map: one unit) -> relu, forward and every projection,
    in float64 numpy. ``slope`` is f's slope below zero (0 for relu)."""
    w1, b1 = weights["conv1.weight"][:, :, 0, 0], weights["conv1.bias"]
    z1 = np.einsum("oc,chw->ohw", w1, x) + b1[:, None, None]  # (3, 3, 3)
    a1 = np.where(z1 > 0, z1, slope * z1)
    w2 = weights["conv2.weight"]
    value = float((w2[0] * a1).sum() + weights["conv2.bias"][0])  # channel 0's only unit, before relu
    g = value * w2[0]  # the signal reaching a1, every method (relu(value) = value > 0)
    forward, backward = z1 > 0, g > 0
    slope_of = np.where(forward, 1.0, slope)  # f'(z1)
    signals = {"deconvnet": g * backward, "guided": g * backward * slope_of, "gradient": g * slope_of}
    projections = {m: np.einsum("oc,ohw->chw", w1, s) for m, s in signals.items()}  # conv1 transposed
    return {"value": np.array(value), "forward": forward, "backward": backward, **projections}


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_deconvnet_guided_and_gradient_differ_exactly_where_the_sign_masks_differ(
    activation: str, tmp_path: Path
) -> None:
    """A crafted two-layer net, chosen so that every combination of the forward mask (z1 > 0) and the
    backward mask (signal > 0) occurs at conv1: each method's projection equals its numpy rule; with
    ReLU, deconvnet and gradient differ exactly where the masks differ, guided is zero where either is."""
    slope = 0.2 if activation == "leaky_relu" else 0.0
    pixels = np.random.default_rng(5).integers(0, 256, (3, 3, 3))
    x = ((pixels / np.float32(255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.25)
    x = x.transpose(2, 0, 1).astype(np.float64)
    for seed in range(200):  # the first weights where every case occurs
        weights = masks_net(seed)
        ref = two_layer(x, weights, slope)
        cases = {(f, b) for f, b in zip(ref["forward"].ravel(), ref["backward"].ravel(), strict=True)}
        if ref["value"] > 0.5 and len(cases) == 4:
            break
    else:
        pytest.fail("no seed gives every mask case")
    spec = write_spec(tmp_path / "m", "masks", (3, 3), 0.5, 0.25, MASK_LAYERS.format(activation=activation), weights)
    maps = extract([png(tmp_path / "three.png", pixels)], spec, tmp_path / "maps.h5", "--save-input")
    with h5py.File(maps, "r") as f:
        np.testing.assert_allclose(f["input"][0], x, rtol=1e-6)
    got = {}
    for method in METHODS:
        out = read(run_project(maps, tmp_path / f"{method}.h5", "--layer", "conv2", "--channel", 0, "--method", method))
        assert out["value"][0] == pytest.approx(ref["value"], rel=1e-5)
        np.testing.assert_allclose(out["projection"][0], ref[method], rtol=1e-4, atol=1e-6)
        got[method] = out["projection"][0]
    if activation == "relu":
        masks_differ = (ref["forward"] != ref["backward"]).any(axis=0)  # per pixel, over conv1's 3 channels
        assert masks_differ.any() and not masks_differ.all()
        np.testing.assert_array_equal(~np.isclose(got["deconvnet"], got["gradient"], atol=1e-6).all(axis=0),
                                      masks_differ)  # fmt: skip
        both = (ref["forward"] & ref["backward"]).any(axis=0)
        np.testing.assert_array_equal(np.abs(got["guided"]).max(axis=0) > 0, both)


# ---------------------------------------------------------------------------- ResNet, in-place ReLU


def test_resnet_with_inplace_relu_projects_inside_the_receptive_field_only(good: list[Path], tmp_path: Path) -> None:
    """torchvision's ResNet-18 layout (batch norm, residual adds, one ReLU(inplace=True) module called
    twice per block): finite projections, non-zero inside each unit's receptive field, exactly zero
    outside it, for every method and for a conv, a block (container) and a ReLU call."""
    model = f"{ZOO}:resnet18"
    layers = ["layer1.1.conv2", "layer2.0", "layer2.1.relu#2"]
    maps = extract(good, model, tmp_path / "maps.h5", "--model-arg", "width=4", "--size", "48",
                   "--layers", ",".join(layers))  # fmt: skip
    for layer in layers:
        with h5py.File(maps, "r") as f:
            group = f["layers"][layer]
            field = tuple(int(v) for v in group.attrs["receptive_field"])
            stride = tuple(int(v) for v in group.attrs["receptive_field_stride"])
            start = tuple(float(v) for v in group.attrs["receptive_field_start"])
        for method in METHODS:
            out = read(run_project(maps, tmp_path / f"{layer}-{method}.h5", "--model", model, "--layer", layer,
                                   "--channel", 1, "--top", 3, "--method", method))  # fmt: skip
            assert len(out["image"]) == 3
            for k in range(3):
                p = out["projection"][k]
                assert np.isfinite(p).all()
                top = round(start[0] + out["row"][k] * stride[0] - (field[0] - 1) / 2)
                left = round(start[1] + out["col"][k] * stride[1] - (field[1] - 1) / 2)
                inside = np.zeros(p.shape[1:], dtype=bool)
                inside[max(top, 0) : top + field[0], max(left, 0) : left + field[1]] = True
                assert np.abs(p[:, inside]).max() > 0, (layer, method, k)
                assert not p[:, ~inside].any(), (layer, method, k)


def test_the_model_is_left_as_it_was() -> None:
    """train/eval mode and flags, requires_grad, .grad, batch-norm statistics, hooks: all unchanged, and
    the model's outputs afterwards are bit-identical."""
    from zoo import resnet18

    net = resnet18(width=4)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 40, 40)).astype(np.float32))
    net.eval()
    with torch.no_grad():
        before = net(x)
    net.train()
    net.layer1[0].eval()  # mixed modes, as a partly frozen model has
    net.conv1.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    flags = [p.requires_grad for p in net.parameters()]
    layers = discover(net, x[:1])
    with capture(net, layers, ["layer2.1.conv2"]) as run:
        a = run(x)["layer2.1.conv2"].a
    assert a is not None
    units = [Unit(n, *np.unravel_index(int(a[n, 1].argmax()), a.shape[2:])) for n in range(2)]
    for method in METHODS:
        projected, values, maxima = project_units(net, layers, "layer2.1.conv2", 1, x, units, method)
        assert np.abs(projected).max() > 0 and (values > 0).all()
        np.testing.assert_array_equal(values, maxima)
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in net.modules())
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), before)


@pytest.mark.parametrize("method", METHODS)
def test_module_functional_and_inplace_nonlinearities_get_the_same_rule(method: str) -> None:
    """The same weights with F.relu, torch.relu, x.relu_() and an nn.ReLU(inplace=True) module give
    the same projections; deconvnet and guided differ from the gradient, so the rule was applied."""
    from zoo import FunctionalNet

    class ModuleForm(FunctionalNet):
        def __init__(self) -> None:
            super().__init__("F.relu", seed=0)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.block.conv(self.act(self.conv1(x))))
            return self.fc(self.act(self.conv3(x)).mean(dim=(2, 3)))

    x = torch.from_numpy(np.random.default_rng(1).normal(size=(2, 3, 12, 12)).astype(np.float32))
    results = {}
    for kind in ("F.relu", "torch.relu", "relu_", "module"):
        net = ModuleForm() if kind == "module" else FunctionalNet(kind, seed=0)
        layers = discover(net, x[:1])
        units = [Unit(0, 2, 2), Unit(1)]  # one unit, and a whole map
        results[kind] = project_units(net, layers, "conv3", 2, x, units, method)[0]
        gradient = project_units(net, layers, "conv3", 2, x, units, "gradient")[0]
        assert (method == "gradient") == np.array_equal(results[kind], gradient)
    for kind, projected in results.items():
        np.testing.assert_allclose(projected, results["F.relu"], rtol=1e-6, atol=1e-8, err_msg=kind)


def test_a_torch_export_program_projects_as_its_eager_model(tmp_path: Path) -> None:
    """A .pt2 program runs as aten ops (aten.relu_ in place here), which get the same rules."""
    from zoo import functional_net

    from fmap_cli.models import load_model

    x = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 3, 12, 12)).astype(np.float32))
    eager = functional_net("relu_").eval()
    torch.export.save(torch.export.export(functional_net("relu_").eval(), (x[:1],)), tmp_path / "net.pt2")
    program = load_model(str(tmp_path / "net.pt2")).module
    units = [Unit(0, 1, 2), Unit(1)]
    for method in METHODS:
        got = project_units(program, discover(program, x[:1]), "conv3", 1, x, units, method)
        want = project_units(eager, discover(eager, x[:1]), "conv3", 1, x, units, method)
        assert np.abs(want[0]).max() > 0
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=method)


def test_units_batched_equal_units_one_by_one(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    maps = extract(images, tiny_model, tmp_path / "maps.h5")
    one = read(run_project(maps, tmp_path / "one.h5", "--layer", "conv2", "--channel", 3, "-b", 1))
    batched = read(run_project(maps, tmp_path / "all.h5", "--layer", "conv2", "--channel", 3, "-b", 16))
    np.testing.assert_allclose(one["projection"], batched["projection"], rtol=1e-5, atol=1e-8)
    assert one["image"].tolist() == batched["image"].tolist() and len(one["image"]) == 3


def test_the_forward_pass_stops_at_the_layer() -> None:
    class Never(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("ran past the projected layer")

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), Never()).eval()
    x = torch.ones(1, 3, 9, 9)
    layers = discover(nn.Sequential(*list(net)[:4]), x)  # what the file's model had up to the layer
    projected, _, _ = project_units(net, layers, "2", 0, x, [Unit(0)], "deconvnet")
    assert projected.shape == (1, 3, 9, 9)


# ---------------------------------------------------------------------------- refusals


def test_a_model_with_other_weights_is_refused(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    maps = extract(images, tiny_model, tmp_path / "maps.h5")
    spec = (tmp_path / "other").mkdir() or tmp_path / "other" / "tiny.toml"
    spec.write_text(tiny_model.read_text())
    np.savez(tmp_path / "other" / "tiny.npz", **tiny_weights(seed=1))
    ours = hashlib.sha256(tiny_model.with_suffix(".npz").read_bytes()).hexdigest()
    theirs = hashlib.sha256((tmp_path / "other" / "tiny.npz").read_bytes()).hexdigest()
    out = tmp_path / "p.h5"
    line = error_line(invoke("project", maps, "--layer", "conv2", "--channel", 0, "-m", spec, "-o", out), 1)
    assert line == (f"Error: model {spec}: weights SHA-256 {theirs} is not the {ours} of {maps}'s model; "
                    "give the model and weights that made the file")  # fmt: skip
    tiny_model.with_suffix(".npz").write_bytes((tmp_path / "other" / "tiny.npz").read_bytes())  # changed in place
    line = error_line(invoke("project", maps, "--layer", "conv2", "--channel", 0, "-o", out), 1)
    assert line == (f"Error: model {tiny_model}: weights SHA-256 {theirs} is not the {ours} of {maps}'s model; "
                    "give the model and weights that made the file")  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".p.h5.*"))


def test_a_changed_image_is_refused_unless_the_input_was_saved(
    tiny_model: Path, images: list[Path], tmp_path: Path
) -> None:
    maps = extract(images, tiny_model, tmp_path / "maps.h5")
    saved = extract(images, tiny_model, tmp_path / "saved.h5", "--save-input")
    make_photo(30, 40, seed=42).save(images[0])
    out = tmp_path / "p.h5"
    line = error_line(invoke("project", maps, "--layer", "conv1", "--channel", 0, "--image", 0, "-o", out), 1)
    assert line == f"Error: {images[0]}: changed since extraction (SHA-256 differs); extract with --save-input"
    run_project(saved, out, "--layer", "conv1", "--channel", 0, "--image", 0)  # /input: the exact tensor


def test_python_models_need_model_and_other_code_is_caught(images: list[Path], tmp_path: Path) -> None:
    model = f"{ZOO}:functional_net"
    maps = extract(images, model, tmp_path / "maps.h5", "--size", "16", "--layers", "conv3")
    out = tmp_path / "p.h5"
    line = error_line(invoke("project", maps, "--layer", "conv3", "--channel", 0, "-o", out), 2)
    assert line == (f"Error: {maps} was made with --model {model}, which is Python code: fmap runs it only when you "
                    "name it; pass --model (with --weights/--model-arg as at extraction)")  # fmt: skip
    # same weights (same seed), other code: the maps differ from the file's
    args = ("project", maps, "--layer", "conv3", "--channel", 0, "-m", model, "--model-arg", "kind=sigmoid")
    line = error_line(invoke(*args, "-o", out), 1)
    assert re.fullmatch(
        rf"Error: layer 'conv3' channel 0 on image \d \({re.escape(str(tmp_path))}/img\d\.\w+\): the model computes "
        rf"a maximum of [-\d.e]+ where {re.escape(str(maps))} holds [-\d.e]+; the model, its arguments or the "
        "preprocessing are not those that made the file",
        line,
    ), line
    run_project(maps, out, "--layer", "conv3", "--channel", 0, "-m", model)  # the recorded model_args: none here


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--top", "2", "--image", "0"], 2, "--top K and --image choose the units differently; give one of them"),
        (["--unit", "1,1"], 2, "--unit ROW,COL needs --image (the unit of which image?)"),
        (["--image", "0", "--unit", "1,1", "--whole-map"], 2,
         "--unit and --whole-map choose the units differently; give one of them"),
        (["--image", "0", "--unit", "5,3"], 2,
         "--unit 5,3 out of range: layer 'conv2' maps are 4x5 (rows 0..3, columns 0..4)"),
        (["--image", "7"], 2, "--image 7 out of range: the file has images 0..2"),
        (["--unit", "1"], 2, "Invalid value for '--unit': expected ROW,COL: two integers >= 0 (e.g. 12,30), got '1'"),
        (["--method", "lrp"], 2,
         "Invalid value for '--method': 'lrp' is not one of 'deconvnet', 'guided', 'gradient'."),
        (["--weights", "w.pt"], 2, "--weights and --model-arg go with --model"),
    ],
)  # fmt: skip
def test_usage_errors(args: list[str], code: int, message: str, all_layers_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    result = invoke("project", all_layers_file, "--layer", "conv2", "--channel", 1, *args, "-o", out)
    assert error_line(result, code) == f"Error: {message}"
    assert not out.exists()


def test_unknown_layer_channel_and_existing_output(all_layers_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    line = error_line(invoke("project", all_layers_file, "--layer", "conv3", "--channel", 0, "-o", out), 2)
    assert line == (f"Error: layer 'conv3' not in {all_layers_file}; did you mean 'conv2'? "
                    "stored layers: conv1, conv2, pool1")  # fmt: skip
    line = error_line(invoke("project", all_layers_file, "--layer", "conv2", "--channel", 5, "-o", out), 2)
    assert line == "Error: channel 5 out of range: layer 'conv2' has channels 0..4"
    line = error_line(invoke("project", all_layers_file, "--layer", "conv2", "--channel", 0, "-o", all_layers_file), 2)
    assert line == f"Error: {all_layers_file}: already exists; pass --overwrite to replace it"
    line = error_line(invoke("project", all_layers_file, "--layer", "conv2", "--channel", 0, "--overwrite",
                             "-o", all_layers_file), 2)  # fmt: skip
    assert line == f"Error: -o {all_layers_file}: is also an input; choose another output name"


def test_a_signal_stops_between_batches_and_leaves_nothing(all_layers_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.h5"
    options = ProjectOptions(all_layers_file, "conv2", 1, out, device="cpu", batch_size=1)
    with pytest.raises(StoppedError, match="interrupted by signal 15"):
        project(options, stop_requested=lambda: 15)
    assert not out.exists() and not list(tmp_path.glob(".p.h5.*"))
    with pytest.raises(ModelError, match="no layer 'conv9'"):  # a layer the file has but the model lacks
        with h5py.File(all_layers_file, "a") as f:
            f["layers"].move("conv2", "conv9")
        project(ProjectOptions(all_layers_file, "conv9", 1, out, device="cpu"))


# ---------------------------------------------------------------------------- the file, inspect, render


def test_the_file_contract(all_layers_file: Path, tmp_path: Path, tiny_model: Path) -> None:
    before = hashlib.sha256(all_layers_file.read_bytes()).hexdigest()
    out = run_project(all_layers_file, tmp_path / "p.h5", "--layer", "conv2", "--channel", 1, "--top", 2,
                      "--method", "guided")  # fmt: skip
    assert hashlib.sha256(all_layers_file.read_bytes()).hexdigest() == before  # the source is never modified
    with h5py.File(out, "r") as f, h5py.File(all_layers_file, "r") as src:
        assert f.attrs["fmap_file_kind"] == "projection" and f.attrs["complete"] == 1
        assert f.attrs["source_file"] == str(all_layers_file)
        assert f.attrs["source_input_list_sha256"] == src.attrs["input_list_sha256"]
        for name in ("model_name", "model_source", "model_spec", "weights_sha256", "preprocessing"):
            assert f.attrs[name] == src.attrs[name], name
        assert int(f.attrs["n_units"]) == 2
        p = f["projection"]
        assert p.dtype == np.float32 and p.shape == (2, 3, 20, 24) == f["input"].shape
        assert (p.attrs["role"], p.attrs["method"], p.attrs["layer"], int(p.attrs["channel"])) == (
            "projection", "guided", "conv2", 1)  # fmt: skip
        assert p.attrs["units"] == "unit" and p.attrs["description"]
        assert "leaky ReLU, GELU, SiLU, sigmoid" in p.attrs["rule"]
        for key in ("receptive_field", "receptive_field_stride", "receptive_field_start"):
            np.testing.assert_array_equal(p.attrs[key], src["layers/conv2"].attrs[key])
        paths = src["images/path"].asstr()[...]
        assert f["unit/path"].asstr()[...].tolist() == [paths[n] for n in f["unit/image"][...]]
        for k, n in enumerate(f["unit/image"][...]):  # each unit's image, preprocessed as the source records
            np.testing.assert_array_equal(f["input"][k], input_tensor(src, int(n)))
        for node in schema.PROJECTION_SCHEMA:
            assert node.path in f, node.path
            obj = f[node.path]
            for attr in node.attrs:
                assert attr.name in obj.attrs or not attr.required, (node.path, attr.name)
            if node.kind == "dataset":
                assert obj.dtype in [np.dtype(t) if t != "str" else obj.dtype for t in node.dtype.split("|")]
    maps_only = error_line(invoke("render", out, "--layer", "conv2", "-o", tmp_path / "x.png"), 2)
    assert maps_only == "Error: --layer: for maps files; a projection file is drawn whole (--full: uncropped)"
    line = error_line(invoke("extract", tmp_path / "none.png", "-m", tiny_model, "-o", tmp_path / "e.h5"), 1)
    assert "none.png" in line
    line = error_line(invoke("project", out, "--layer", "conv2", "--channel", 0, "-o", tmp_path / "q.h5"), 1)
    assert line == f"Error: {out}: an fmap file of kind 'projection'; this command reads 'maps' files"


def test_inspect_summarises_a_projection_file(all_layers_file: Path, tmp_path: Path) -> None:
    with h5py.File(all_layers_file, "r") as f:  # a channel active on every image
        c = int(np.flatnonzero((f["layers/conv1/activation"][...].max(axis=(2, 3)) > 0).all(axis=0))[0])
    out = run_project(all_layers_file, tmp_path / "p.h5", "--layer", "conv1", "--channel", c)
    text = ok(invoke("inspect", out)).stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"{out}: fmap projection file, schema v{schema.SCHEMA_VERSION}, written by fmap ")
    assert lines[1].startswith(f"source: {all_layers_file} (input list ")
    assert lines[3] == (f"projection: deconvnet of layer conv1 channel {c}: 3 x 3x20x24 (one unit each), in the "
                        "network's input space; receptive field 3x3")  # fmt: skip
    units = lines[lines.index("units (value [image] path, unit, projection min .. max, non-zero pixels):") + 1 :]
    assert len(units) == 3 and all("(inside its receptive field)" in line for line in units)
    summary = json.loads(ok(invoke("inspect", out, "--json")).stdout)
    assert summary["kind"] == "projection" and summary["method"] == "deconvnet"
    assert [u["inside_field"] for u in summary["units"]] == [True] * 3
    line = error_line(invoke("inspect", out, "--top", "2"), 2)
    assert line == (f"Error: {out} is a projection file: --layer, --channel, --channels, --top and --hist describe "
                    "maps files")  # fmt: skip


def test_render_draws_figure_2_and_full_pictures(all_layers_file: Path, tmp_path: Path) -> None:
    out = run_project(all_layers_file, tmp_path / "p.h5", "--layer", "conv2", "--channel", 1)
    crops = tmp_path / "crops.png"
    assert ok(invoke("render", out, "-o", crops)).stdout == f"{crops}\n"
    full = tmp_path / "full.png"
    ok(invoke("render", out, "--full", "-o", full))
    with Image.open(crops) as a, Image.open(full) as b:
        assert a.mode == b.mode == "RGB" and a.size != b.size
        assert a.width >= 3 * 96  # three cropped projections side by side, over their patches
    line = error_line(invoke("render", all_layers_file, "--full", "-o", tmp_path / "x.png"), 2)
    assert line == "Error: --full draws projection files (fmap project); for maps files leave it out"
    line = error_line(invoke("render", all_layers_file, "-o", tmp_path / "x.png"), 2)
    assert line == "Error: --layer L is needed for maps files (which layer to draw?)"


@pytest.mark.skipif(not FMAP.is_file(), reason=f"console script not installed at {FMAP}")
def test_inspect_and_render_of_a_projection_file_do_not_import_torch(all_layers_file: Path, tmp_path: Path) -> None:
    out = run_project(all_layers_file, tmp_path / "p.h5", "--layer", "conv2", "--channel", 1, "--whole-map")
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text('raise ImportError("torch must not be imported")\n')
    env = dict(os.environ, PYTHONPATH=str(poison))
    for args in (["inspect", str(out)], ["render", str(out), "-o", str(tmp_path / "w.png")]):
        proc = subprocess.run([str(FMAP), *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "torch" not in proc.stderr
