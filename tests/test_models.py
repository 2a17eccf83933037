"""Any PyTorch model (issue 3): exact z/a pairs for real architectures, model sources, layer selection.

Every stored map is compared with an independent recomputation: a plain forward pass of a deep
copy of the model with every ``inplace`` flag turned off (outputs read by the test's own hooks),
or submodules called by hand. Models come from ``tests/zoo.py`` (torchvision/timm are not
dependencies and must not be installed).
"""

from __future__ import annotations

import copy
import enum
import functools
import hashlib
import json
import os
import pickle
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zoo
from click.testing import Result
from conftest import REPO, TINY_SPEC, extract_options, make_photo, tiny_weights
from helpers import assert_left_clean, error_line, extract_fails, invoke, maps_of
from PIL import Image
from test_replicas import recorded
from torch import nn

from fmap_cli.capture import LayerInfo, capture, discover
from fmap_cli.errors import ModelError, UnknownLayerError
from fmap_cli.extract import extract
from fmap_cli.layers import select_layers
from fmap_cli.models import load_model, parse_model_args, state_sha256

ZOO = "tests/zoo.py"  # relative to the repository root: tests chdir there (monkeypatch.chdir(REPO))
SIZE = (64, 64)
ATOL = 1e-5

# ---------------------------------------------------------------------------- helpers


def close(got: Any, want: torch.Tensor, atol: float = ATOL) -> bool:
    """Equal up to float32 rounding: ``atol`` relative to the map's largest magnitude (deep maps reach ~50)."""
    got_t = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got
    if got_t.shape != want.shape:
        return False
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return torch.allclose(got_t.float(), want.float(), atol=atol * scale, rtol=0)


def write_images(directory: Path, n: int, size: tuple[int, int] = SIZE, seed: int = 0) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"img{i}.png"
        make_photo(size[0], size[1], seed=seed + i).save(path)
        paths.append(str(path))
    return paths


def one_line_error(result: Result, code: int) -> str:
    """The single 'Error:' line of a failed command (no traceback, nothing on stdout)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def conv_names(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything capture must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": {p: m.training for p, m in model.named_modules()},
        "inplace": {p: m.inplace for p, m in model.named_modules() if hasattr(m, "inplace")},
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["inplace"] == before["inplace"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype, key
        assert torch.equal(after["state"][key], value), f"{key} changed"
    for path, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on '{path}'"
        assert not module._forward_pre_hooks, f"forward pre-hook left on '{path}'"
        assert not getattr(module, "_forward_hooks_with_kwargs", {}), path
        assert not getattr(module, "_forward_pre_hooks_with_kwargs", {}), path
    assert torch._C._len_torch_function_stack() == 0, "a TorchFunctionMode was left active"


# ---------------------------------------------------------------------------- ResNet-18 through the whole pipeline

RESNET_LAYERS = [
    "conv1",
    "bn1",
    "layer*.*.conv*",
    "layer*.0.downsample.0",
    "layer1.0.bn1",
    "layer1.0.relu",
    "layer1.0.relu#2",
    "layer1.0",
    "layer2.0",
    "fc",
]


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 64x64 images through tests/zoo.py:resnet18 (width 8), with /input stored."""
    tmp = tmp_path_factory.mktemp("resnet")
    paths = write_images(tmp / "img", 2)
    out = tmp / "resnet.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        extract(
            extract_options(
                paths,
                out=out,
                model=f"{ZOO}:resnet18",
                layers=RESNET_LAYERS,
                device="cpu",
                size=SIZE,
                save_input=True,
                verify=True,
            )
        )
    return out


@pytest.fixture(scope="module")
def resnet_ref(resnet_file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with h5py.File(resnet_file, "r") as f:
        x = torch.from_numpy(f["input"][()])
    return recorded(zoo.resnet18(), x)


def maps(path: Path, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    with h5py.File(path, "r") as f:
        group = f["layers"][name]
        return group["preactivation"][()], group["activation"][()] if "activation" in group else None


def attrs(path: Path, name: str) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return dict(f["layers"][name].attrs)


def test_resnet_factory_is_what_fmap_loaded(resnet_file: Path) -> None:
    """The references below rebuild tests/zoo.py:resnet18 in this process: the same weights."""
    with h5py.File(resnet_file, "r") as f:
        assert f.attrs["weights_sha256"] == state_sha256(zoo.resnet18())
        assert f["input"].shape == (2, 3, *SIZE)


def test_resnet_every_conv_z_is_the_conv_output_with_negatives(resnet_file: Path, resnet_ref: dict) -> None:
    model = zoo.resnet18()
    convs = conv_names(model)
    assert len(convs) == 20  # 1 stem + 8 blocks x 2 + 3 downsample convs
    with h5py.File(resnet_file, "r") as f:
        stored = [name for name in f.attrs["layers"] if name in convs]
    assert stored == convs  # '*conv*' globs and downsample.0 selected every conv, in forward order
    for name in convs:
        z, _ = maps(resnet_file, name)
        assert close(z, resnet_ref[name][1]), name
        assert (z < 0).any(), f"{name}: z has no negative values (rectified by an in-place ReLU?)"


def test_resnet_batchnorm_z_is_not_overwritten_by_inplace_relu(resnet_file: Path, resnet_ref: dict) -> None:
    for name, relu in (("bn1", "relu"), ("layer1.0.bn1", "layer1.0.relu")):
        z, a = maps(resnet_file, name)
        assert close(z, resnet_ref[name][1]), name
        assert (z < 0).any()
        assert a is not None and close(a, resnet_ref[relu][1]), name
        assert attrs(resnet_file, name)["path_to_activation"] == relu


def test_basic_block_conv2_activation_is_relu_of_bn2_plus_identity(resnet_file: Path) -> None:
    """a == relu(bn2(z) + identity), from the stored z and submodules called by hand."""
    model = zoo.resnet18().eval()
    with h5py.File(resnet_file, "r") as f:
        x = torch.from_numpy(f["input"][()])
    with torch.no_grad():
        stem = model.maxpool(F.relu(model.bn1(model.conv1(x))))
        z, a = maps(resnet_file, "layer1.0.conv2")
        want = F.relu(model.layer1[0].bn2(torch.from_numpy(z)) + stem)
        assert a is not None and close(a, want)
        block_in = model.layer1(stem)
        z, a = maps(resnet_file, "layer2.0.conv2")
        block = model.layer2[0]
        want = F.relu(block.bn2(torch.from_numpy(z)) + block.downsample(block_in))
        assert a is not None and close(a, want)
        # the stored z itself is conv2 of the rectified bn1(conv1(.)) of the block's input
        want_z = block.conv2(F.relu(block.bn1(block.conv1(block_in))))
        assert close(z, want_z)


def test_resnet_path_to_activation(resnet_file: Path) -> None:
    a = attrs(resnet_file, "layer1.0.conv2")
    assert a["path_to_activation"] == "layer1.0.bn2 -> add(+maxpool) -> layer1.0.relu#2"
    assert a["nonlinearity"] == "relu"
    assert a["a_is_f_of_z"] == 0  # bn and a joining tensor lie between z and a
    a = attrs(resnet_file, "layer2.0.conv2")
    assert "add(+layer2.0.downsample)" in a["path_to_activation"]
    assert a["path_to_activation"] == "layer2.0.bn2 -> add(+layer2.0.downsample) -> layer2.0.relu#2"
    assert attrs(resnet_file, "layer1.1.conv2")["path_to_activation"] == (
        "layer1.1.bn2 -> add(+layer1.0) -> layer1.1.relu#2"
    )
    assert attrs(resnet_file, "layer1.0.conv1")["path_to_activation"] == "layer1.0.bn1 -> layer1.0.relu"
    assert attrs(resnet_file, "conv1")["path_to_activation"] == "bn1 -> relu"
    fc = attrs(resnet_file, "fc")
    assert fc["nonlinearity"] == "none" and fc["has_activation"] == 0


def test_resnet_reused_relu_gives_two_layers(resnet_file: Path, resnet_ref: dict) -> None:
    with h5py.File(resnet_file, "r") as f:
        assert {"layer1.0.relu", "layer1.0.relu#2"} <= set(f["layers"])
    for name in ("layer1.0.relu", "layer1.0.relu#2"):
        z, a = maps(resnet_file, name)
        x_ref, y_ref = resnet_ref[name]
        assert close(z, x_ref) and a is not None and close(a, y_ref), name
        assert (z < 0).any()
        info = attrs(resnet_file, name)
        assert info["a_is_f_of_z"] == 1 and info["path_to_activation"] == name
    z1, _ = maps(resnet_file, "layer1.0.relu")
    z2, _ = maps(resnet_file, "layer1.0.relu#2")
    assert not np.allclose(z1, z2)  # really two different calls
    # the convs pair with the right call of the shared module
    assert close(maps(resnet_file, "layer1.0.conv1")[1], resnet_ref["layer1.0.relu"][1])
    assert close(maps(resnet_file, "layer1.0.conv2")[1], resnet_ref["layer1.0.relu#2"][1])


def test_resnet_container_block(resnet_file: Path, resnet_ref: dict) -> None:
    for block in ("layer1.0", "layer2.0"):
        z, a = maps(resnet_file, block)
        assert a is not None and close(a, resnet_ref[block][1]), block  # a: the block's output
        final_input = resnet_ref[f"{block}.relu#2"][0]  # bn2(conv2(.)) + identity
        assert close(z, final_input), block
        assert (z < 0).any()
        assert attrs(resnet_file, block)["path_to_activation"] == f"{block}.relu#2"


# ---------------------------------------------------------------------------- reused modules and functional calls


def capture_all(model: nn.Module, x: torch.Tensor, names: Sequence[str], probe: torch.Tensor | None = None) -> dict:
    layers = discover(model, probe if probe is not None else x[:1])
    with capture(model, layers, names) as run:
        return {"layers": layers, "maps": run(x)}


def test_reused_relu_module_gives_distinct_pairs() -> None:
    model = zoo.reused_relu()
    x = torch.randn(2, 3, 12, 12)
    got = capture_all(model, x, ["conv1", "act", "conv2", "act#2"])
    layers, m = got["layers"], got["maps"]
    assert list(layers) == ["conv1", "act", "conv2", "act#2"]
    with torch.no_grad():
        z1 = model.conv1(x)
        a1 = torch.relu(z1)
        z2 = model.conv2(a1)
        a2 = torch.relu(z2)
    assert close(m["act"].z, z1) and close(m["act"].a, a1)
    assert close(m["act#2"].z, z2) and close(m["act#2"].a, a2)
    assert close(m["conv1"].z, z1) and close(m["conv1"].a, a1)
    assert close(m["conv2"].z, z2) and close(m["conv2"].a, a2)
    assert layers["conv1"].path_to_activation == ["act"]
    assert layers["conv2"].path_to_activation == ["act#2"]


REFERENCE_F = {
    "F.relu": ("relu", torch.relu),
    "torch.relu": ("relu", torch.relu),
    "relu_": ("relu", torch.relu),
    "sigmoid": ("sigmoid", torch.sigmoid),
    "leaky_relu": ("leaky_relu", lambda t: torch.where(t >= 0, t, 0.2 * t)),
}


@pytest.mark.parametrize("kind", list(REFERENCE_F))
def test_functional_call_sites(kind: str) -> None:
    f_name, f = REFERENCE_F[kind]
    model = zoo.functional_net(kind)
    names = ["conv1", f":{f_name}", "block", "block.conv", f"block:{f_name}", "conv3", f":{f_name}#2", "fc"]
    x = torch.randn(2, 3, 12, 12)
    got = capture_all(model, x, names)
    layers, m = got["layers"], got["maps"]
    assert list(layers) == names
    with torch.no_grad():
        z1 = model.conv1(x)
        a1 = f(z1)
        zb = model.block.conv(a1)
        ab = f(zb)
        z3 = model.conv3(ab)
        a3 = f(z3)
    pairs = {
        "conv1": (z1, a1),
        f":{f_name}": (z1, a1),
        "block.conv": (zb, ab),
        f"block:{f_name}": (zb, ab),
        "block": (zb, ab),
        "conv3": (z3, a3),
        f":{f_name}#2": (z3, a3),
    }
    for name, (z, a) in pairs.items():
        assert close(m[name].z, z), f"{kind}: z of {name}"
        assert close(m[name].a, a), f"{kind}: a of {name}"
        assert (m[name].z < 0).any(), f"{kind}: z of {name} has no negatives"
        assert layers[name].nonlinearity == f_name
    assert layers["conv1"].path_to_activation == [f":{f_name}"]
    assert layers["block.conv"].path_to_activation == [f"block:{f_name}"]
    assert layers["conv3"].path_to_activation == [f":{f_name}#2"]
    assert layers["fc"].nonlinearity == "none" and m["fc"].a is None
    assert close(m["fc"].z, model.fc(a3.mean(dim=(2, 3))).detach())


def test_leaky_relu_slope_in_file_and_verify_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    image = write_images(tmp_path, 1, (16, 16))[0]
    out = tmp_path / "leaky.h5"
    result = invoke(
        "extract",
        image,
        "--model",
        f"{ZOO}:functional_net",
        "--model-arg",
        "kind=leaky_relu",
        "--size",
        "16,16",
        "--device",
        "cpu",
        "--verify",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "verified a == f(z)" in result.stderr
    with h5py.File(out, "r") as f:
        assert list(f.attrs["layers"]) == ["conv1", "block.conv", "conv3"]  # default: linear layers with an f
        for name in f.attrs["layers"]:
            group = f["layers"][name]
            assert group.attrs["nonlinearity"] == "leaky_relu"
            params = json.loads(group.attrs["nonlinearity_params"])
            assert params.get("negative_slope", (params.get("args") or [None])[0]) == pytest.approx(0.2)
            z, a = group["preactivation"][()], group["activation"][()]
            assert (z < 0).any()
            np.testing.assert_array_equal(a, np.where(z >= 0, z, z * np.float32(0.2)))


# ---------------------------------------------------------------------------- data-dependent control flow


def branchy_reference(model: zoo.Branchy, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        z1 = model.conv1(x)
        h = torch.relu(z1)
        z2 = model.conv2(h) if x.mean() > 0 else model.conv2(-torch.tanh(model.extra(h)))
    return {
        "conv1": (z1, torch.relu(z1)),
        "relu1": (z1, torch.relu(z1)),
        "conv2": (z2, torch.relu(z2)),
        "relu2": (z2, torch.relu(z2)),
    }


def test_fx_cannot_trace_but_fmap_extracts_both_branches() -> None:
    model = zoo.branchy()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    bright, dark = torch.rand(2, 3, 10, 10) + 0.1, -torch.rand(2, 3, 10, 10) - 0.1
    names = ["conv1", "relu1", "conv2", "relu2"]
    for probe in (bright, dark):  # discovery on one branch, capture on both
        layers = discover(model, probe[:1])
        with capture(model, layers, names) as run:
            for x in (bright, dark, bright):
                got, want = run(x), branchy_reference(model, x)
                for name in names:
                    assert close(got[name].z, want[name][0]), name
                    assert close(got[name].a, want[name][1]), name
                    assert (got[name].z < 0).any(), f"{name}: z rectified by the in-place ReLU"
    with torch.no_grad():  # the dark input really took the other branch: conv2 did not see relu1's output
        assert not torch.allclose(
            branchy_reference(model, dark)["conv2"][0], model.conv2(torch.relu(model.conv1(dark)))
        )


def test_branchy_model_through_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One image takes each branch (batch size 1); the file holds the right maps for both."""
    monkeypatch.chdir(REPO)
    white, black = tmp_path / "white.png", tmp_path / "black.png"
    Image.new("RGB", (12, 12), (250, 240, 230)).save(white)
    Image.new("RGB", (12, 12), (5, 10, 0)).save(black)
    out = tmp_path / "branchy.h5"
    extract(
        extract_options(
            [str(black), str(white)],
            out=out,
            model=f"{ZOO}:branchy",
            batch_size=1,
            layers=["conv1", "conv2", "relu2"],
            device="cpu",
            size=(12, 12),
            save_input=True,
        )
    )
    model = zoo.branchy()
    with h5py.File(out, "r") as f:
        x = torch.from_numpy(f["input"][()])
        assert x[0].mean() < 0 < x[1].mean()  # the two images really take different branches
        for i in range(2):
            want = branchy_reference(model, x[i : i + 1])
            for name in ("conv1", "conv2", "relu2"):
                assert close(f["layers"][name]["preactivation"][i : i + 1], want[name][0]), (name, i)
                assert close(f["layers"][name]["activation"][i : i + 1], want[name][1]), (name, i)


# ---------------------------------------------------------------------------- torch.export programs

PT2_LAYERS = [
    "conv1",
    "layer1.0",
    "layer1.0.conv2",
    "layer1.0.relu#2",
    "layer2.0.conv2",
    "layer2.0.downsample.0",
    "layer3.1.conv1",
    "fc",
]  # forward order: a container comes before its children


@pytest.fixture(scope="module")
def pt2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "resnet.pt2"
    program = torch.export.export(zoo.resnet18().eval(), (torch.randn(2, 3, 64, 64),))
    torch.export.save(program, str(path))
    return path


def test_pt2_gives_the_same_maps_as_the_eager_model(
    pt2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    images = write_images(tmp_path / "img", 3)
    files = {}
    for source in (str(pt2_path), f"{ZOO}:resnet18"):
        out = tmp_path / f"{Path(source).stem}.h5"
        # batch size 3: not the export example's 2
        extract(
            extract_options(
                images,
                out=out,
                model=source,
                layers=PT2_LAYERS,
                device="cpu",
                size=SIZE,
                batch_size=3,
                save_input=True,
            )
        )
        files[source] = out
    exported, eager = files.values()
    with h5py.File(exported, "r") as fe, h5py.File(eager, "r") as fg:
        assert list(fe.attrs["layers"]) == list(fg.attrs["layers"]) == PT2_LAYERS
        np.testing.assert_array_equal(fe["input"][()], fg["input"][()])
        for name in PT2_LAYERS:
            ge, gg = fe["layers"][name], fg["layers"][name]
            for key in ("path_to_activation", "nonlinearity", "a_is_f_of_z"):
                assert ge.attrs[key] == gg.attrs[key], (name, key)
            for key in ("output_shape", "receptive_field", "receptive_field_stride"):
                np.testing.assert_array_equal(ge.attrs[key], gg.attrs[key])
            assert sorted(ge) == sorted(gg)
            for dataset in ("preactivation", "activation"):
                if dataset in gg:
                    np.testing.assert_allclose(ge[dataset][()], gg[dataset][()], atol=1e-6, rtol=0)
        assert fe["layers"]["layer1.0.conv2"].attrs["path_to_activation"] == (
            "layer1.0.bn2 -> add(+maxpool) -> layer1.0.relu#2"
        )
        ref = recorded(zoo.resnet18(), torch.from_numpy(fe["input"][()]))
        assert close(fe["layers"]["layer3.1.conv1"]["preactivation"][()], ref["layer3.1.conv1"][1])


def test_pt2_single_image_batch(pt2_path: Path) -> None:
    loaded = load_model(str(pt2_path))
    assert loaded.input.size == (64, 64)  # from the program's example input
    layers = discover(loaded.module, torch.zeros(1, 3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    with capture(loaded.module, layers, ["layer2.0.conv2", "fc"]) as run:
        got = run(x)
    ref = recorded(zoo.resnet18(), x)
    assert close(got["layer2.0.conv2"].z, ref["layer2.0.conv2"][1])
    assert close(got["fc"].z, ref["fc"][1])


# ---------------------------------------------------------------------------- a .pt2 never runs code


class Tiny(nn.Module):
    """A conv and a ReLU, plus a non-persistent buffer: export stores it as a tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("shift", torch.full((4, 1, 1), 0.1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x) + self.shift)


class Marker:
    """Pickles to a call of ``open(path, 'w')``: unpickling it creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def tiny_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_pt2") / "tiny.pt2"
    torch.manual_seed(0)
    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(2, 3, 16, 16),)), str(path))
    return path


def rewrite_pt2(source: Path, target: Path, change: Callable[[str, bytes], bytes], add: dict[str, bytes]) -> Path:
    """Copy a .pt2 archive entry by entry through ``change(name, data)`` (names without the archive's
    top folder), then add the entries ``add``."""
    import zipfile

    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            zout.writestr(info, change(info.filename.split("/", 1)[1], zin.read(info.filename)))
        for name, data in add.items():
            zout.writestr(f"{root}/{name}", data)
    return target


def pickled(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def edit_json(data: bytes, edit: Callable[[dict[str, Any]], None]) -> bytes:
    value = json.loads(data)
    edit(value)
    return json.dumps(value).encode()


def enum_key_in_input_spec(program: dict[str, Any]) -> None:
    """Make the program's input spec a dict keyed by an enum of module 'fmap_marker_module':
    torch's pytree reader imports that module to find the enum."""
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    protocol, spec = json.loads(signature["in_spec"])
    kwargs = spec["children_spec"][1]  # (args, kwargs): kwargs is a dict, its context the keys
    kwargs["context"] = json.dumps([{"__enum__": True, "fqn": "fmap_marker_module:E", "name": "A"}])
    kwargs["children_spec"] = [{"type": None, "context": None, "children_spec": []}]
    signature["in_spec"] = json.dumps([protocol, spec])


NO_CODE = "fmap never runs code from a model file"
UNSAFE_PT2 = {
    # name: (entries to change, entries to add, the entry named, what the error says about it)
    "sample inputs": (
        {"data/sample_inputs/model.pt": lambda data, marker: pickled(Marker(marker))},
        {},
        "data/sample_inputs/model.pt",
        "holds Python objects, not just tensors",
    ),
    "pickled weight": (
        {
            "data/weights/weight_0": lambda data, marker: pickled(Marker(marker)),
            "data/weights/model_weights_config.json": lambda data, marker: edit_json(
                data, lambda config: config["config"]["conv.weight"].update(use_pickle=True)
            ),
        },
        {},
        "data/weights/weight_0",
        "(weight 'conv.weight') is a pickled object",
    ),
    "opaque constant": (
        {
            "data/constants/model_constants_config.json": lambda data, marker: edit_json(
                data,
                lambda config: config["config"].update(
                    c={"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False, "tensor_meta": None}
                ),
            )
        },
        {"data/constants/opaque_obj_0": lambda marker: pickle.dumps(Marker(marker))},
        "data/constants/opaque_obj_0",
        "(constant 'c') is a Python object, not a tensor",
    ),
    "module named by an enum key": (
        {"models/model.json": lambda data, marker: edit_json(data, enum_key_in_input_spec)},
        {},
        "models/model.json",
        "names a Python module to import ('fmap_marker_module') in a pytree spec",
    ),
    "AOTInductor library": (
        {},
        {"data/aotinductor/model/model.so": lambda marker: b"not really a library"},
        "data/aotinductor/model/model.so",
        "is compiled code (AOTInductor)",
    ),
}


@pytest.mark.parametrize("case", list(UNSAFE_PT2))
def test_pt2_with_pickled_objects_or_code_is_refused_without_running_them(
    case: str, tiny_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes, additions, entry, problem = UNSAFE_PT2[case]
    marker = tmp_path / "marker"
    # The enum case: a module on sys.path that creates the marker when imported.
    (tmp_path / "fmap_marker_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport enum\nE = enum.Enum('E', 'A')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = rewrite_pt2(
        tiny_pt2,
        tmp_path / "bad.pt2",
        lambda name, data: changes[name](data, marker) if name in changes else data,
        {name: make(marker) for name, make in additions.items()},
    )
    result = invoke("layers", "--model", bad)
    assert not marker.exists(), "unpickling or importing ran code from the .pt2"
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {bad}: entry '{entry}' {problem}; {NO_CODE}\n"
    with pytest.raises(ModelError):
        load_model(str(bad))
    assert not marker.exists()


def test_pt2_of_the_pre_2_7_format_is_refused(tiny_pt2: Path, tmp_path: Path) -> None:
    """torch.export.load reads the old format (a top-level 'version' entry) with pickle."""
    bad = tmp_path / "old.pt2"
    bad.write_bytes(tiny_pt2.read_bytes())
    import zipfile

    with zipfile.ZipFile(bad, "a") as archive:
        archive.writestr("version", "1.0")
    result = invoke("layers", "--model", bad)
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: {bad}: entry 'version' marks torch's pre-2.7 format, read with pickle "
        f"(re-save it with torch.export.save); {NO_CODE}\n"
    )


def test_pt2_that_is_not_an_archive(tmp_path: Path) -> None:
    bad = tmp_path / "junk.pt2"
    bad.write_bytes(b"not a zip file")
    result = invoke("layers", "--model", bad)
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: {bad}: not a torch.export program: BadZipFile: File is not a zip file\n"


def test_safe_pt2_loads_and_computes_what_the_eager_model_does(tiny_pt2: Path) -> None:
    loaded = load_model(str(tiny_pt2))
    torch.manual_seed(0)
    eager = Tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), eager(x))
    assert loaded.input.size == (16, 16)
    assert loaded.weights_sha256 == hashlib.sha256(tiny_pt2.read_bytes()).hexdigest()
    result = invoke("layers", "--model", tiny_pt2, "--size", "16")
    assert result.exit_code == 0, result.output
    assert result.output == (
        "layer  type    output   axes   rf   stride  f     z -> a\n"
        "conv   Conv2d  4x16x16  C,H,W  3x3  1x1     relu  add -> :relu\n"
        ":relu  relu    4x16x16  C,H,W  3x3  1x1     relu  :relu\n"
    )


def test_pt2_whose_module_cannot_be_built_is_a_one_line_error(tiny_pt2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: torch.export.ExportedProgram) -> nn.Module:
        raise RuntimeError("cannot unlift this program\nsecond line of detail")

    monkeypatch.setattr(torch.export.ExportedProgram, "module", fail)
    result = invoke("layers", "--model", tiny_pt2)
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: {tiny_pt2}: the torch.export program cannot be made into a module: "
        "RuntimeError: cannot unlift this program\n"
    )


# ---------------------------------------------------------------------------- models are left unchanged


def test_model_unchanged_after_discovery_and_capture() -> None:
    model = zoo.resnet18().train()  # train mode: a forward in train mode would update BN statistics
    before = snapshot(model)
    x = torch.randn(2, 3, 64, 64)
    layers = discover(model, x[:1])
    assert_unchanged(model, before)
    for names in (["conv1"], ["layer1.0.relu#2", "layer2.0"], ["fc"]):
        with capture(model, layers, names) as run:
            run(x)
            assert not model.training  # eval during capture
        assert_unchanged(model, before)


def test_mixed_training_flags_are_restored_module_by_module() -> None:
    """A model in train mode with a frozen (eval) part, as in fine-tuning with frozen batch norm."""
    model = zoo.resnet18().train()
    model.layer2.eval()
    before = snapshot(model)
    layers = discover(model, torch.zeros(1, 3, 64, 64))
    assert_unchanged(model, before)
    with capture(model, layers, ["conv1"]) as run:
        run(torch.zeros(1, 3, 64, 64))
    assert_unchanged(model, before)


def test_model_unchanged_after_a_failing_forward() -> None:
    class Failing(zoo.ReusedReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.conv1(x))
            if x.shape[0] > 1:
                raise RuntimeError("boom")
            return self.act(self.conv2(h))

    model = Failing().train()
    before = snapshot(model)
    layers = discover(model, torch.zeros(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="boom"), capture(model, layers, ["conv2"]) as run:
        run(torch.zeros(2, 3, 8, 8))
    assert_unchanged(model, before)


def test_inplace_flags_and_hooks_after_extract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """extract() on a factory model: the module fmap loaded keeps its in-place flags and has no hooks."""
    monkeypatch.chdir(REPO)
    built: list[nn.Module] = []
    fake = types.ModuleType("fmap_test_factories")

    def make() -> nn.Module:
        built.append(zoo.resnet18())
        return built[-1]

    fake.make = make  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fmap_test_factories", fake)
    images = write_images(tmp_path / "img", 1)
    extract(
        extract_options(
            images,
            out=tmp_path / "o.h5",
            model="fmap_test_factories:make",
            layers=["layer1.0.conv2"],
            device="cpu",
            size=SIZE,
        )
    )
    (model,) = built
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    before = snapshot(zoo.resnet18().eval())
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------- early stop


def test_extracting_conv1_stops_the_forward_pass_early() -> None:
    model = zoo.resnet18()
    calls = {"layer4": 0, "fc": 0}
    handles = [
        getattr(model, name).register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
        for name in calls
    ]
    x = torch.randn(2, 3, 64, 64)
    layers = discover(model, x[:1])
    after_discovery = dict(calls)
    assert after_discovery["fc"] <= 1
    with capture(model, layers, ["conv1"]) as run:
        for _ in range(3):
            got = run(x)
            assert close(got["conv1"].z, model.conv1(x).detach())
    assert calls == after_discovery, "layer4/fc ran while only conv1 was wanted"
    with capture(model, layers, ["fc"]) as run:
        run(x)
        run(x)
    assert calls == {k: v + 2 for k, v in after_discovery.items()}
    for handle in handles:
        handle.remove()


# ---------------------------------------------------------------------------- model sources


def test_file_factory_with_model_args(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    kwargs = parse_model_args(["width=4", "num_classes=3", "seed=2"])
    assert kwargs == {"width": 4, "num_classes": 3, "seed": 2}  # numbers parsed as JSON
    assert parse_model_args(["kind=leaky_relu"]) == {"kind": "leaky_relu"}
    loaded = load_model(f"{ZOO}:resnet18", model_args=kwargs)
    assert loaded.module.conv1.out_channels == 4 and loaded.module.fc.out_features == 3
    assert not loaded.module.training
    want = zoo.resnet18(width=4, num_classes=3, seed=2)
    for key, value in want.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    assert loaded.description["model_args"] == kwargs


def test_cli_file_factory_model_arg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = invoke(
        "layers", "--model", f"{ZOO}:resnet18", "--model-arg", "width=8", "--size", "64,64", "--layers", "conv1,fc"
    )
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"conv1", "fc"}
    assert rows["conv1"][2] == "8x32x32" and rows["fc"][2] == "10"


def test_package_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fmap_test_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def make(channels=4):\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, channels, 3), nn.ReLU(inplace=True), nn.Conv2d(channels, 2, 1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("fmap_test_pkg.nets:make", model_args={"channels": 5})
    assert loaded.module[0].out_channels == 5
    x = torch.randn(2, 3, 9, 9)
    got = capture_all(loaded.module, x, ["0", "1", "2"])
    ref = recorded(loaded.module, x)
    assert got["layers"]["0"].nonlinearity == "relu" and got["layers"]["2"].nonlinearity == "none"
    assert close(got["maps"]["0"].z, ref["0"][1]) and close(got["maps"]["0"].a, ref["1"][1])
    assert (got["maps"]["0"].z < 0).any()
    assert close(got["maps"]["2"].z, ref["2"][1]) and got["maps"]["2"].a is None


def save_weights(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in state.items()})
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def test_weights_formats_give_identical_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    trained = zoo.resnet18(seed=1)  # the factory's default is seed 0: the weights file must win
    state = trained.state_dict()
    images = write_images(tmp_path / "img", 2)
    layers = ["conv1", "layer1.0.conv2", "layer2.0", "fc"]
    results = {}
    for suffix in (".pt", ".pth", ".npz", ".safetensors"):
        weights = save_weights(state, tmp_path / f"w{suffix}")
        out = tmp_path / f"out{suffix}.h5"
        extract(
            extract_options(
                images,
                out=out,
                model=f"{ZOO}:resnet18",
                weights=str(weights),
                layers=layers,
                device="cpu",
                size=SIZE,
                save_input=True,
            )
        )
        with h5py.File(out, "r") as f:
            assert f.attrs["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
            results[suffix] = {n: (f["layers"][n]["preactivation"][()],) for n in layers}
            x = torch.from_numpy(f["input"][()])
    ref = recorded(trained, x)
    untrained = recorded(zoo.resnet18(seed=0), x)
    for suffix, got in results.items():
        for name in layers:
            np.testing.assert_array_equal(got[name][0], results[".pt"][name][0])
        assert close(got["conv1"][0], ref["conv1"][1]), suffix
        assert close(got["fc"][0], ref["fc"][1]), suffix
        assert not close(got["conv1"][0], untrained["conv1"][1])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("missing", ["missing", "layer1.0.bn2.running_var"]),
        ("unexpected", ["unexpected", "fc.extra"]),
        ("shape", ["fc.weight", "(3, 64)", "(10, 64)"]),
    ],
)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bad_state_dict_is_a_one_line_error(
    change: str, expected: list[str], suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    state = dict(zoo.resnet18().state_dict())
    if change == "missing":
        del state["layer1.0.bn2.running_var"]
    elif change == "unexpected":
        state["fc.extra"] = torch.zeros(3)
    else:
        state["fc.weight"] = torch.zeros(3, 64)
    weights = save_weights(state, tmp_path / f"bad{suffix}")
    image = write_images(tmp_path / "img", 1)[0]
    out = tmp_path / "out.h5"
    result = invoke(
        "extract",
        image,
        "--model",
        f"{ZOO}:resnet18",
        "--weights",
        weights,
        "--size",
        "64,64",
        "--device",
        "cpu",
        "-o",
        out,
    )
    line = one_line_error(result, 1)
    for text in expected:
        assert text in line, line
    assert not out.exists()
    assert not list(tmp_path.glob(".out.h5*")), "temporary file left behind"


def test_torchvision_and_timm_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("torchvision", "torchvision.models", "timm"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    for library in ("torchvision", "timm"):
        result = invoke("layers", "--model", f"{library}:resnet18")
        line = one_line_error(result, 1)
        assert f"{library} is not installed" in line, line
        with pytest.raises(ModelError, match=f"{library} is not installed"):
            load_model(f"{library}:resnet18")


class InterpolationMode(enum.Enum):
    """As torchvision's: the member's value is the name fmap reads."""

    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


class ImageClassification:
    """As torchvision's preset (``transforms/_presets.py``): its keywords kept as attributes, with its defaults."""

    def __init__(
        self,
        *,
        crop_size: int,
        resize_size: int = 256,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    ) -> None:
        self.crop_size, self.resize_size = [crop_size], [resize_size]
        self.mean, self.std, self.interpolation = list(mean), list(std), interpolation


class ObjectDetection:
    """As torchvision's detection preset: no resize, crop or normalisation to read."""


# The recipe of torchvision's ResNet-18 IMAGENET1K_V1 weights
CLASSIC_RECIPE = functools.partial(ImageClassification, crop_size=224)


def fake_torchvision(
    monkeypatch: pytest.MonkeyPatch, preset: Callable[[], Any] = CLASSIC_RECIPE
) -> list[tuple[str, Any, dict[str, Any]]]:
    """A torchvision whose only model is resnet18 (from tests/zoo.py), with DEFAULT weights
    ``ResNet18_Weights.IMAGENET1K_V9`` whose ``transforms`` is ``preset``."""
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    class ResNet18_Weights:  # noqa: N801  # torchvision's name
        name = "IMAGENET1K_V9"
        transforms = staticmethod(preset)
        DEFAULT: Any = None

    ResNet18_Weights.DEFAULT = ResNet18_Weights()

    def get_model(name: str, weights: Any = None, **kwargs: Any) -> nn.Module:
        calls.append((name, weights, kwargs))
        if name != "resnet18":
            raise ValueError(f"Unknown model {name}")
        return zoo.resnet18(**kwargs)

    package, models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    models.get_model = get_model  # type: ignore[attr-defined]
    models.get_model_weights = lambda name: ResNet18_Weights  # type: ignore[attr-defined]
    package.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def test_torchvision_short_form_with_a_fake_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_torchvision(monkeypatch)
    loaded = load_model("torchvision:resnet18", model_args={"width": 8})
    assert calls == [("resnet18", None, {"width": 8})]
    assert loaded.input.size == (224, 224) and not loaded.module.training
    image = write_images(tmp_path / "img", 1)[0]
    out = tmp_path / "tv.h5"
    result = invoke(
        "extract",
        image,
        "--model",
        "torchvision:resnet18",
        "--model-arg",
        "width=8",
        "--size",
        "64,64",
        "--layers",
        "layer1.0.conv2",
        "--device",
        "cpu",
        "--save-input",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        ref = recorded(zoo.resnet18(width=8), torch.from_numpy(f["input"][()]))
        assert close(f["layers/layer1.0.conv2/preactivation"][()], ref["layer1.0.conv2"][1])
        assert f.attrs["model_source"] == "torchvision:resnet18"
    load_model("torchvision:resnet18", weights="pretrained")
    assert calls[-1][1] == "DEFAULT"  # the library's own weights
    result = invoke("layers", "--model", "torchvision:resnet99")
    line = one_line_error(result, 1)
    assert "resnet99" in line and "Unknown model" in line


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("raising_factory", "calling it failed: RuntimeError: factory exploded on purpose"),
        ("not_a_module", "returned dict, not a torch.nn.Module"),
        ("no_such_factory", "has no callable 'no_such_factory'"),
        ("NOT_CALLABLE", "has no callable 'NOT_CALLABLE'"),
    ],
)
def test_bad_file_factory_is_a_clean_error(
    factory: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    image = write_images(tmp_path / "img", 1)[0]
    out = tmp_path / "out.h5"
    result = invoke("extract", image, "--model", f"{ZOO}:{factory}", "--device", "cpu", "-o", out)
    line = one_line_error(result, 1)
    assert expected in line and factory in line, line
    assert not out.exists()


def test_missing_python_file_and_module(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_line_error(invoke("layers", "--model", "nowhere.py:make"), 1)
    assert "nowhere.py" in line and "no such Python file" in line
    line = one_line_error(invoke("layers", "--model", "fmap_no_such_package.nets:make"), 1)
    assert "cannot import fmap_no_such_package.nets" in line


# ---------------------------------------------------------------------------- layer selection and `fmap layers`


@pytest.fixture(scope="module")
def resnet_layers() -> dict[str, LayerInfo]:
    return discover(zoo.resnet18(), torch.zeros(1, 3, 64, 64))


def select(layers: dict[str, LayerInfo], patterns: list[str]) -> list[str]:
    return select_layers(layers, patterns, load_model(f"{REPO / ZOO}:resnet18"))


def test_layer_globs(resnet_layers: dict[str, LayerInfo]) -> None:
    model = zoo.resnet18()
    assert select(resnet_layers, ["layer*.*.conv2"]) == [f"layer{i}.{j}.conv2" for i in range(1, 5) for j in range(2)]
    under_layer1 = [p for p, _ in model.named_modules() if p.startswith("layer1.")]
    reused = [f"layer1.{j}.relu#2" for j in range(2)]
    assert set(select(resnet_layers, ["layer1.*"])) == set(under_layer1) | set(reused)
    assert select(resnet_layers, ["fc", "conv1", "layer1.0.relu#2"]) == ["conv1", "layer1.0.relu#2", "fc"]
    assert select(resnet_layers, ["layer?.0.downsample.[0]"]) == [f"layer{i}.0.downsample.0" for i in (2, 3, 4)]


def test_cli_comma_list_of_globs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    result = invoke("layers", "--model", f"{ZOO}:resnet18", "--size", "64,64", "--layers", "layer4.*.conv2, conv1")
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert names == ["conv1", "layer4.0.conv2", "layer4.1.conv2"]


@pytest.mark.parametrize(
    ("pattern", "hint"), [("layer1.0.conv3", "did you mean 'layer1.0.conv"), ("layer9.*", "did you mean")]
)
def test_unknown_layer_is_a_usage_error_with_a_hint(
    pattern: str, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resnet_layers: dict
) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(UnknownLayerError, match="did you mean"):
        select(resnet_layers, [pattern])
    result = invoke("layers", "--model", f"{ZOO}:resnet18", "--size", "64,64", "--layers", f"conv1,{pattern}")
    assert result.exit_code == 2, result.output
    assert hint in result.stderr and pattern in result.stderr
    image = write_images(tmp_path / "img", 1)[0]
    out = tmp_path / "out.h5"
    result = invoke(
        "extract",
        image,
        "--model",
        f"{ZOO}:resnet18",
        "--size",
        "64,64",
        "--layers",
        pattern,
        "--device",
        "cpu",
        "-o",
        out,
    )
    assert result.exit_code == 2 and hint in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def layers_table(monkeypatch: pytest.MonkeyPatch, size: str) -> dict[str, list[str]]:
    """`fmap layers` rows: name -> [type, output, rf, stride, f, path] (every map is C,H,W here)."""
    monkeypatch.chdir(REPO)
    result = invoke("layers", "--model", f"{ZOO}:resnet18", "--size", size)
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split()[:7] == ["layer", "type", "output", "axes", "rf", "stride", "f"]
    rows = {}
    for line in lines:
        name, kind, output, axes, *cols = line.split(None, 7)
        assert axes == ("C" if output.count("x") == 0 else "C,H,W"), line
        rows[name] = [kind, output, *cols, ""][:6]
    return rows


def test_fmap_layers_lists_every_layer(monkeypatch: pytest.MonkeyPatch, resnet_layers: dict) -> None:
    rows = layers_table(monkeypatch, "64,64")
    model = zoo.resnet18()
    modules = [p for p, _ in model.named_modules() if p]
    reused = [f"layer{i}.{j}.relu#2" for i in range(1, 5) for j in range(2)]
    assert set(rows) == set(modules) | set(reused)
    assert list(rows) == list(resnet_layers)  # forward order
    assert rows["conv1"][:5] == ["Conv2d", "8x32x32", "7x7", "2x2", "relu"]
    assert rows["conv1"][5] == "bn1 -> relu"
    assert rows["maxpool"][:4] == ["MaxPool2d", "8x16x16", "11x11", "4x4"]
    assert rows["layer1.0.conv2"][:5] == ["Conv2d", "8x16x16", "27x27", "4x4", "relu"]
    assert rows["layer1.0.conv2"][5] == "layer1.0.bn2 -> add(+maxpool) -> layer1.0.relu#2"
    assert rows["layer1.0.relu#2"][:2] == ["ReLU", "8x16x16"] and rows["layer1.0.relu#2"][4] == "relu"
    assert rows["layer2.0.conv1"][:5] == ["Conv2d", "16x8x8", "51x51", "8x8", "relu"]
    assert rows["layer4.1.conv2"][1] == "64x2x2"
    assert rows["fc"][0] == "Linear" and rows["fc"][1] == "10" and rows["fc"][4] == "none"


def linearised(model: nn.Module) -> nn.Module:
    """Same geometry, but every path positive and linear: |weights|, no ReLU, average instead of max pooling.

    The gradient of one output unit w.r.t. the input is then nonzero exactly on its receptive field.
    """
    lin = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for module in lin.modules():
            if isinstance(module, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
                module.weight.copy_(module.weight.abs() + 0.01)
    for path, module in list(lin.named_modules()):
        parent = lin.get_submodule(path.rpartition(".")[0]) if "." in path else lin
        child = path.rpartition(".")[2]
        if isinstance(module, nn.ReLU):
            setattr(parent, child, nn.Identity())
        elif isinstance(module, nn.MaxPool2d):
            setattr(parent, child, nn.AvgPool2d(module.kernel_size, module.stride, module.padding))
    return lin


def empirical_field(model: nn.Module, layer: str, size: int, unit: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) input pixels on which the layer's unit (channel 0) depends."""
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    out: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: out.append(o))
    model(x)
    handle.remove()
    out[0][0, 0, unit[0], unit[1]].backward()
    assert x.grad is not None
    rows = torch.nonzero(x.grad[0].abs().sum(0).sum(1) > 0).flatten()
    cols = torch.nonzero(x.grad[0].abs().sum(0).sum(0) > 0).flatten()
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


def test_receptive_field_matches_an_empirical_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 96
    rows = layers_table(monkeypatch, f"{size},{size}")
    lin = linearised(zoo.resnet18())
    for layer in ("conv1", "maxpool", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.downsample.0"):
        h = int(rows[layer][1].split("x")[1])
        centre = h // 2
        top, bottom, left, right = empirical_field(lin, layer, size, (centre, centre))
        assert top > 0 and bottom < size - 1 and left > 0 and right < size - 1, (layer, "touches the border")
        rf = bottom - top + 1
        assert right - left + 1 == rf
        top2, *_ = empirical_field(lin, layer, size, (centre + 1, centre))
        stride = top2 - top
        assert rows[layer][2] == f"{rf}x{rf}", (layer, rows[layer][2], rf)
        assert rows[layer][3] == f"{stride}x{stride}", (layer, rows[layer][3], stride)
    assert rows["layer2.0.conv1"][2] == "51x51"  # 7 + 2*2 + 4 convs * 2*4 + 2*4: the measurement is not trivial


# ---------------------------------------------------------------------------- default layers and the pairing rule


def test_default_layers_are_the_convs_paired_with_a_nonlinearity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    out = tmp_path / "default.h5"
    images = write_images(tmp_path / "img", 1)
    extract(extract_options(images, out=out, model=f"{ZOO}:resnet18", device="cpu", size=SIZE))
    model = zoo.resnet18()
    layers = discover(model, torch.zeros(1, 3, 64, 64))
    with h5py.File(out, "r") as f:
        chosen = list(f.attrs["layers"])
        for name in chosen:
            assert f["layers"][name].attrs["nonlinearity"] == "relu"
            assert "activation" in f["layers"][name]
    main_path = [n for n in conv_names(model) if "downsample" not in n]
    assert [n for n in chosen if "downsample" not in n] == main_path  # every main-path conv, in order
    assert "fc" not in chosen  # nothing follows fc
    downsample = [n for n in conv_names(model) if "downsample" in n]
    # a downsample conv is a default layer exactly when the pairing rule gives it a nonlinearity
    assert [n for n in chosen if "downsample" in n] == [n for n in downsample if layers[n].nonlinearity != "none"]
    assert len(chosen) == len(main_path) + len([n for n in chosen if "downsample" in n])


def test_residual_pairing_does_not_depend_on_operand_order() -> None:
    """relu(identity + conv2(.)) pairs conv2 with the relu, like relu(conv2(.) + identity) does.

    The rule follows z through a residual add whichever operand z is.
    """
    model = zoo.OperandOrder()
    x = torch.randn(2, 3, 8, 8)
    got = capture_all(model, x, ["conv2", "relu#2"])
    info, m = got["layers"]["conv2"], got["maps"]
    with torch.no_grad():
        identity = torch.relu(model.conv1(x))
        z = model.conv2(identity)
        a = torch.relu(identity + z)
    assert close(m["conv2"].z, z)
    assert info.nonlinearity == "relu", info.path_to_activation
    assert info.path_to_activation[-1] == "relu#2" and info.path_to_activation[0].startswith("add(+")
    assert m["conv2"].a is not None and close(m["conv2"].a, a)


def test_downsample_conv_pairs_through_bn_and_the_residual_add(resnet_layers: dict[str, LayerInfo]) -> None:
    """The identity branch's conv: z -> downsample.1 (bn) -> add -> relu#2, as the pairing rule reads."""
    info = resnet_layers["layer2.0.downsample.0"]
    assert info.nonlinearity == "relu", info.path_to_activation
    assert info.path_to_activation[0] == "layer2.0.downsample.1"
    assert info.path_to_activation[1].startswith("add(+")
    assert info.path_to_activation[-1] == "layer2.0.relu#2"


# ---------------------------------------------------------------------------- bad --layers and --size


def unknown_layer(name: str, hint: str, model: Path) -> str:
    return (
        f"Error: --layers: no layer '{name}' in model 'tiny'; did you mean '{hint}'? available: conv1, pool1, conv2 "
        f"(run 'fmap layers --model {model}' for the full list)"
    )


@pytest.mark.parametrize("name", ["conv3", "conv_1"])
def test_unknown_layer(good: list[Path], tiny_model: Path, outdir: Path, name: str) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--layers", name)
    assert line == unknown_layer(name, {"conv3": "conv2", "conv_1": "conv1"}[name], tiny_model)


def test_unknown_layer_among_good_ones(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--layers", "conv1,convv2")
    assert line == unknown_layer("convv2", "conv2", tiny_model)


TOO_SMALL = "layer 'conv2': kernel_size (3, 3) does not fit its 1x1 input; use a larger --size or a smaller kernel"


def test_size_too_small_for_kernels(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    line = error_line(invoke("extract", *good, "-m", tiny_model, "-o", outdir / "out.h5", "--size", "2"), 2)
    assert line == f"Error: --size 2,2: {tiny_model}: {TOO_SMALL}"
    assert_left_clean(outdir)


def test_layers_command_size_too_small(tiny_model: Path) -> None:
    line = error_line(invoke("layers", "-m", tiny_model, "--size", "2"), 2)  # a bad flag value: usage error
    assert line == f"Error: --size 2,2: {tiny_model}: {TOO_SMALL}"


# ---------------------------------------------------------------------------- --device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_requested_without_cuda(good: list[Path], tiny_model: Path, outdir: Path, device: str) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--device", device)
    assert line == f"Error: --device {device}: CUDA is not available (torch {torch.__version__}); use --device cpu"


@pytest.mark.parametrize("device", ["gpu", "tpu0", "meta"])
def test_unknown_device(good: list[Path], tiny_model: Path, outdir: Path, device: str) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--device", device)
    which = "unsupported" if device == "meta" else "unknown"  # 'meta' is a torch device, not one to compute on
    assert line == f"Error: --device: {which} device '{device}'; use cpu, cuda, cuda:N or auto"


# ---------------------------------------------------------------------------- built-in models


def test_unknown_builtin_name() -> None:
    assert error_line(invoke("layers", "-m", "edgez"), 2) == (
        "Error: --model: cannot understand 'edgez'; did you mean 'edges'? give a built-in name (edges), "
        "a .toml/.json spec, a .pt2 program, package.module:factory, file.py:factory, torchvision:NAME or timm:NAME"
    )


# ---------------------------------------------------------------------------- weights files


def weights_case(tmp_path: Path, weights: dict[str, np.ndarray] | None, name: str = "tiny.npz") -> Path:
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    spec = directory / "tiny.toml"
    spec.write_text(TINY_SPEC.replace('"tiny.npz"', f'"{name}"'))
    if weights is not None:
        np.savez(directory / name, **weights)
    return spec


def test_missing_weights_file(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None)
    line = extract_fails(good, spec, outdir, 1)
    assert line == f"Error: {spec.parent / 'tiny.npz'}: weights file not found"


def test_npz_missing_key(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    weights = tiny_weights()
    del weights["conv2.bias"]
    spec = weights_case(tmp_path, weights)
    line = extract_fails(good, spec, outdir, 1)
    assert line == (
        f"Error: {spec.parent / 'tiny.npz'}: missing weights conv2.bias (the file has conv1.weight, conv1.bias, "
        "conv2.weight)"
    )


def test_npz_extra_key(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    weights = {**tiny_weights(), "conv3.weight": np.zeros((2, 5, 1, 1), np.float32)}
    spec = weights_case(tmp_path, weights)
    line = extract_fails(good, spec, outdir, 1)
    assert line == f"Error: {spec.parent / 'tiny.npz'}: unexpected weights conv3.weight"


def test_npz_wrong_shape(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    weights = {**tiny_weights(), "conv1.weight": np.zeros((4, 3, 5, 5), np.float32)}
    spec = weights_case(tmp_path, weights)
    line = extract_fails(good, spec, outdir, 1)
    assert line == f"Error: {spec.parent / 'tiny.npz'}: conv1.weight has shape (4, 3, 5, 5), expected (4, 3, 3, 3)"


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_npz_non_finite(tmp_path: Path, good: list[Path], outdir: Path, bad_value: float) -> None:
    weights = tiny_weights()
    weights["conv2.weight"][1, 2, 0, 1] = bad_value
    spec = weights_case(tmp_path, weights)
    line = extract_fails(good, spec, outdir, 1)
    assert line == f"Error: {spec.parent / 'tiny.npz'}: conv2.weight contains NaN or infinite values"


def test_corrupt_npz(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None)
    (spec.parent / "tiny.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    line = extract_fails(good, spec, outdir, 1)
    assert line.startswith(f"Error: {spec.parent / 'tiny.npz'}: cannot read weights: ")  # then zipfile's words


def test_unsupported_weights_extension(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None, name="tiny.bin")
    (spec.parent / "tiny.bin").write_bytes(b"\0" * 64)
    line = extract_fails(good, spec, outdir, 1)
    assert line == (
        f"Error: {spec.parent / 'tiny.bin'}: unsupported weights format '.bin'; use .npz, .pt, .pth or .safetensors"
    )


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "nested_state_dict"])
def test_pt_state_dict_matches_npz(
    tmp_path: Path, good: list[Path], tiny_model: Path, outdir: Path, wrapped: bool
) -> None:
    spec = weights_case(tmp_path, None, name="tiny.pt")
    state = {key: torch.from_numpy(value) for key, value in tiny_weights().items()}
    torch.save({"state_dict": state} if wrapped else state, spec.parent / "tiny.pt")
    npz_out, pt_out = outdir / "npz.h5", outdir / "pt.h5"
    assert invoke("extract", *good, "-m", tiny_model, "-o", npz_out).exit_code == 0
    result = invoke("extract", *good, "-m", spec, "-o", pt_out)
    assert result.exit_code == 0, result.output
    a, b = maps_of(npz_out), maps_of(pt_out)
    assert a and sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def _touch_marker(path: str) -> None:  # pragma: no cover - must never run
    Path(path).write_text("code from a weights file ran")


class Payload:
    """Unpickling this would run _touch_marker: a weights file must never get that far."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


@pytest.mark.parametrize("how", ["torch_save", "plain_pickle", "os_system"])
def test_pickled_code_in_pt_refused(tmp_path: Path, good: list[Path], outdir: Path, how: str) -> None:
    marker = tmp_path / "MARKER"
    spec = weights_case(tmp_path, None, name="tiny.pt")
    target = spec.parent / "tiny.pt"
    state: dict[str, object] = {key: torch.from_numpy(value) for key, value in tiny_weights().items()}
    state["conv1.weight"] = Payload(str(marker))
    if how == "torch_save":
        torch.save(state, target)
    elif how == "plain_pickle":
        target.write_bytes(pickle.dumps(state))
    else:

        class System:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        with open(target, "wb") as handle:
            pickle.Pickler(handle).dump({"conv1.weight": System()})
    line = extract_fails(good, spec, outdir, 1)
    assert line == (
        f"Error: {target}: holds Python objects, not just tensors; fmap only loads plain state dicts "
        "(torch.load weights_only=True) and never runs code from a weights file"
    )
    assert not marker.exists()


def test_pt_not_a_state_dict(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None, name="tiny.pt")
    torch.save([torch.zeros(3)], spec.parent / "tiny.pt")
    line = extract_fails(good, spec, outdir, 1)
    assert line == f"Error: {spec.parent / 'tiny.pt'}: expected a state dict (a mapping of names to tensors)"
