"""What ``path_to_activation`` and the input provenance say on patterns of timm and ViT models: a
parameter operand is no join, and a layer fed through plain ops (reshapes, a class token, a
position embedding) still names where its input came from."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zoo
from helpers import assert_left_clean, error_line, invoke, ok, run_extract, write_photos
from torch import nn

from fmap_cli.capture import capture, discover
from fmap_cli.errors import ModelError
from fmap_cli.layers import provenance


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm's: a BatchNorm2d subclass (so fmap looks into it) calling F.batch_norm with its own
    parameters and statistics, then dropout and the nonlinearity as children."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = BatchNormAct2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.ones(4, 1, 1))
        self.shortcut = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        return F.relu(self.gamma * self.conv2(x) + self.shortcut(x))


def test_a_parameter_operand_is_no_join() -> None:
    layers = discover(Blocks().eval(), torch.zeros(1, 3, 8, 8))
    assert layers["conv1"].path_to_activation == ["batch_norm", "bn1.drop", "bn1.act"]
    assert layers["conv2"].path_to_activation == ["mul", "add(+shortcut)", ":relu"]  # a map joins: named
    assert layers["shortcut"].path_to_activation == ["add(+conv2)", ":relu"]


class ViT(nn.Module):
    """Patches as tokens, a class token and position embedding, an encoder block, a head."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 5, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, 4, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.norm(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return self.head(x[:, 0])


def test_inputs_are_found_through_plain_ops() -> None:
    layers = discover(ViT().eval(), torch.zeros(1, 3, 8, 8))
    assert provenance(layers, "norm", {"patch"}) == ("/layers/patch/preactivation", "")
    assert provenance(layers, "norm", set()) == ("input", "patch")
    assert provenance(layers, "head", {"norm"}) == ("/layers/norm/preactivation", "attn")
    assert provenance(layers, "head", set()) == ("input", "patch -> norm -> attn")


class Masks(nn.Module):
    """An integer map (a pass-through layer's) that the model then changes with ``|=``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mask = nn.Identity()
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask((self.conv(x) > 0).to(torch.int64))
        m |= 2  # also &=, ^=, <<=, >>=: Python's in-place operators on integer tensors
        return self.head(m.float())


def test_bitwise_in_place_operators_do_not_change_a_held_map() -> None:
    model = Masks().eval()
    x = torch.randn(2, 3, 8, 8)
    layers = discover(model, x)
    with capture(model, layers, ["mask", "head"]) as run:
        z = run(x)["mask"].z
    assert z is not None and torch.equal(z, (F.conv2d(x, model.conv.weight, model.conv.bias, padding=1) > 0).long())


SCRIPTED = """
import torch
import torch.nn.functional as F
from torch import nn


@torch.jit.script
def relu_(x: torch.Tensor) -> torch.Tensor:  # fmap sees no op inside TorchScript
    return x.relu_()


class Net(nn.Module):
    def __init__(self, scripted: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.scripted = scripted
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return self.head(relu_(z) if self.scripted else F.relu(z))


def with_scripted_conv() -> nn.Module:
    model = Net(scripted=False)
    model.conv = torch.jit.script(model.conv)
    return model
"""
CHANGED = (
    "Error: layer 'conv': its map z was changed in place by an op fmap cannot see (in TorchScript or a C++ "
    "extension); switch that op's in-place mode off or choose another layer"
)


@pytest.mark.parametrize("layers", [["conv", "head"], ["conv"]])
def test_a_held_map_changed_by_an_op_fmap_cannot_see_is_refused(tmp_path: Path, layers: list[str]) -> None:
    """conv's z is held by reference; a relu_ inside TorchScript then writes into it. Wanting head too,
    the first batch's full pass runs the relu_; wanting conv alone, it stops before, and the
    replay of the second batch (which stops at the next op fmap sees) runs it."""
    (tmp_path / "scripted.py").write_text(SCRIPTED)
    images = write_photos(tmp_path / "images", 5)
    outdir = tmp_path / "out"
    outdir.mkdir()
    result = run_extract(
        images, Path(f"{tmp_path / 'scripted.py'}:Net"), outdir / "out.h5", "-b", "2", "-l", ",".join(layers)
    )
    assert error_line(result, 1) == CHANGED
    assert_left_clean(outdir)


def test_replayed_batches_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "scripted.py").write_text(SCRIPTED)
    spec = importlib.util.spec_from_file_location("scripted", tmp_path / "scripted.py")  # TorchScript reads the source
    assert spec is not None and spec.loader is not None
    scripted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scripted)
    model = scripted.Net().eval()
    x = torch.randn(2, 3, 8, 8)
    layers = discover(model, x)
    with capture(model, layers, ["conv"]) as run:
        z = run(x)["conv"].z  # the full pass stops before the relu_
        assert z is not None and torch.equal(z, F.conv2d(x, model.conv.weight, model.conv.bias, padding=1))
        for _ in range(2):  # replays
            with pytest.raises(ModelError, match=r"^layer 'conv': its map z was changed in place"):
                run(x)


def test_without_the_in_place_op_the_maps_are_the_layer_s(tmp_path: Path) -> None:
    (tmp_path / "scripted.py").write_text(SCRIPTED)
    images = write_photos(tmp_path / "images", 5)
    out = tmp_path / "out.h5"
    model = f"{tmp_path / 'scripted.py'}:Net"
    ok(
        run_extract(
            images,
            Path(model),
            out,
            "-b",
            "2",
            "--size",
            "8",
            "--save-input",
            "-l",
            "conv",
            "--model-arg",
            "scripted=false",
        )
    )
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with h5py.File(out, "r") as f:
        x = torch.from_numpy(f["input"][:])
        z, a = f["layers/conv/preactivation"][:], f["layers/conv/activation"][:]
    want = F.conv2d(x, conv.weight, conv.bias, padding=1).detach().numpy()
    assert np.allclose(z, want, rtol=1e-5, atol=1e-5)
    assert np.allclose(a, np.maximum(want, 0), rtol=1e-5, atol=1e-5)


def test_a_torchscript_module_is_refused_when_the_model_is_loaded(tmp_path: Path) -> None:
    (tmp_path / "scripted.py").write_text(SCRIPTED)
    result = invoke("layers", "-m", f"{tmp_path / 'scripted.py'}:with_scripted_conv")
    assert error_line(result, 1) == (
        f"Error: --model {tmp_path / 'scripted.py'}:with_scripted_conv: its module 'conv' is TorchScript "
        "(torch.jit.script or trace), whose calls and ops fmap cannot see to capture maps; return the plain "
        "nn.Module, without torch.jit"
    )


class ThroughNumpy(zoo.ConvHead):
    """Writes into conv's output through numpy, which no version counter follows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        np.maximum(z.numpy(), 0, out=z.numpy())
        return self.head(z)


def test_a_write_through_numpy_leaves_held_maps_as_computed() -> None:
    """In the full pass (the first batch) and in the replays of its plan."""
    model = ThroughNumpy().eval()
    layers = discover(model, torch.zeros(1, 3, 8, 8))
    with capture(model, layers, ["conv", "head"]) as run:
        for seed in range(3):
            x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            z = run(x)["conv"].z
            assert z is not None and torch.equal(z, F.conv2d(x, model.conv.weight, model.conv.bias, padding=1))
