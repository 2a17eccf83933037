"""Receptive fields recorded on the graph patterns of modern architectures (concatenation,
squeeze-and-excitation, in-place joins, channels-last blocks, channel shuffle, padding, tokens),
checked against the gradient of units with respect to the input (``rf_probe.py``), never against
fmap's own geometry code: weights positive so nothing cancels, the input positive noise."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from rf_probe import check_box, gradient_box, positive_weights
from torch import nn

from fmap_cli import fields
from fmap_cli.capture import LayerInfo, discover
from fmap_cli.errors import FmapError
from fmap_cli.geometry import Geometry


def conv(cin: int, cout: int, k: int, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2 if padding is None else padding)


# ----------------------------------------------------------------------------------- the patterns
class InceptionBranches(nn.Module):
    """Branches with different kernels, concatenated: the narrowest branch first."""

    def __init__(self, cin: int, order: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.b1 = conv(cin, 2, 1)
        self.b3 = nn.Sequential(conv(cin, 2, 1), conv(2, 2, 3))
        self.b5 = nn.Sequential(conv(cin, 2, 1), conv(2, 2, 5))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(cin, 2, 1))
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b1(x), self.b3(x), self.b5(x), self.pool(x)]
        return torch.cat([branches[i] for i in self.order], 1)


class Inception(nn.Module):
    def __init__(self, order: tuple[int, ...] = (0, 1, 2, 3)) -> None:
        super().__init__()
        self.stem = conv(3, 4, 3, stride=2)
        self.mixed = InceptionBranches(4, order)
        self.after = conv(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.mixed(self.stem(x)))


class DenseLayer(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = conv(cin, 2, 3)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return F.relu(self.conv(torch.cat(features, 1)))


class Dense(nn.Module):
    """DenseNet: every layer reads the concatenation of all earlier features."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 2, 1)
        self.layers = nn.ModuleList(DenseLayer(2 + 2 * i) for i in range(3))
        self.transition = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(features))
        return self.transition(torch.cat(features, 1))


class Fire(nn.Module):
    """SqueezeNet's fire module: squeeze, then 1x1 and 3x3 expansions concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 4, 3, stride=2, padding=0)
        self.squeeze = conv(4, 2, 1)
        self.expand1x1 = conv(2, 2, 1)
        self.expand3x3 = conv(2, 2, 3)
        self.after = conv(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(self.stem(x)))
        return self.after(torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], 1))


class SqueezeExcitation(nn.Module):
    """``scale * x`` (torchvision's order: the small operand first) or ``x * scale``."""

    def __init__(self, channels: int, scale_first: bool) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, 2, 1)
        self.fc2 = nn.Conv2d(2, channels, 1)
        self.scale_first = scale_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))) * 1e-3)  # (N, C, 1, 1)
        return scale * x if self.scale_first else x * scale


class SENet(nn.Module):
    def __init__(self, scale_first: bool) -> None:
        super().__init__()
        self.conv1 = conv(3, 4, 3, stride=2)
        self.se = SqueezeExcitation(4, scale_first)
        self.conv2 = conv(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.se(self.conv1(x)))


class InPlace(nn.Module):
    """``out += y`` where out starts as a constant, and ``a.mul_(b)`` of two maps."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = conv(3, 2, 1)
        self.wide = conv(3, 2, 5)
        self.after = conv(2, 2, 3)
        self.register_buffer("base", torch.ones(1, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base.clone()  # no field: independent of the image
        out = out.expand(x.shape[0], 2, x.shape[2], x.shape[3]).contiguous()
        out += self.narrow(x)
        a = self.narrow(x)
        a.mul_(self.wide(x))
        return self.after(out + a)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, then channels-last LayerNorm and MLP, layer scale, back, residual."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.stem = conv(3, dim, 2, stride=2, padding=0)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.after = conv(dim, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return self.after(x + y.permute(0, 3, 1, 2))


class Shuffle(nn.Module):
    """ShuffleNetV2: split channels, one half through a branch, concatenate, shuffle (5-D view)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv(3, 4, 3, stride=2)
        self.branch = nn.Sequential(conv(2, 2, 1), nn.Conv2d(2, 2, 3, padding=1, groups=2), conv(2, 2, 1))
        self.after = conv(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), dim=1)
        n, c, h, w = out.shape
        out = torch.transpose(out.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, c, h, w)
        return self.after(out)


class Padded(nn.Module):
    """Asymmetric F.pad and nn.ZeroPad2d before convolutions without padding (timm's 'same')."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv(3, 2, 3, stride=2, padding=0)
        self.pad = nn.ZeroPad2d((2, 0, 1, 3))  # left, right, top, bottom
        self.conv2 = conv(2, 2, 3, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.pad(self.conv1(F.pad(x, (0, 1, 1, 0)))))


class Layout(nn.Module):
    """Slices with a step, unbind and stack, a channel mean broadcast back (CBAM's spatial attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv(3, 2, 3)
        self.conv2 = conv(2, 2, 3)
        self.conv3 = conv(2, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)[:, :, 1:, ::2]  # rows from the second, every other column
        a, b = self.conv2(x).unbind(1)  # (N, H, W) each
        y = torch.stack([b, a], dim=1)
        return self.conv3(y * y.mean(1, keepdim=True))


class Tokens(nn.Module):
    """A ViT block: patches as tokens, a class token, attention, a head on the class token."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        return self.head(x[:, 0])


# ----------------------------------------------------------------------------------- the check
def every_tap(x: torch.Tensor, kernel_size: int, stride: int | None = None, padding: int = 0, dilation: int = 1,
              ceil_mode: bool = False, return_indices: bool = False) -> torch.Tensor:  # fmt: skip
    """Max pooling's windows, averaged: the gradient of a max reaches only the largest tap."""
    assert dilation == 1 and not return_indices
    return AVG_POOL(x, kernel_size, stride, padding, ceil_mode)


AVG_POOL = F.avg_pool2d


def module_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of every module's first call, kept in the autograd graph of ``x`` (max pooling
    measured as average pooling: the same windows)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(mod: nn.Module, args: object, out: torch.Tensor, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                outputs.setdefault(name, out.clone())  # a clone: later in-place ops do not touch it

        handles.append(module.register_forward_hook(hook))
    try:
        with mock.patch.object(F, "max_pool2d", every_tap):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def units(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Corners, edges and the middle of a (h, w) map."""
    h, w = shape
    return sorted({(i, j) for i in {0, h // 2, h - 1} for j in {0, w // 2, w - 1}})


def assert_fields_measured(model: nn.Module, size: tuple[int, int], channels_last: tuple[str, ...] = ()
                           ) -> dict[str, LayerInfo]:  # fmt: skip
    """Every module layer's recorded field against the gradients of some of its units."""
    positive_weights(model)
    layers = discover(model, torch.zeros(1, 3, *size))
    x = (torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) + 0.5).requires_grad_(True)
    outputs = module_outputs(model, x)
    checked = 0
    for name, y in outputs.items():
        info = layers.get(name)
        if info is None or y.dim() not in (2, 4):
            continue
        assert info.receptive_field[0] > 0, f"{name}: field unknown ({info.field_note})"
        geo = Geometry(info.receptive_field, info.stride, info.start)
        y = y.permute(0, 3, 1, 2) if name in channels_last else y
        grid = (y.shape[2], y.shape[3]) if y.dim() == 4 else (1, 1)
        for i, j in units(grid):
            unit = y[0, :, i, j].sum() if y.dim() == 4 else y[0].sum()
            problem = check_box(geo, i, j, gradient_box(unit, x), size)
            assert not problem, f"{name} {info.receptive_field} start {info.start}: {problem}"
        checked += 1
    assert checked >= 3
    return layers


# ----------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_concatenated_branches_see_the_widest_branch_whatever_the_order(order: tuple[int, ...]) -> None:
    layers = assert_fields_measured(Inception(order), (40, 44))
    # 3x3 stride 2, then the 5x5 branch: 3 + 4 * 2; then a 3x3 conv: + 2 * 2
    assert layers["mixed"].receptive_field == (11, 11)
    assert layers["after"].receptive_field == (15, 15)


def test_dense_concatenation_of_all_earlier_features() -> None:
    layers = assert_fields_measured(Dense(), (24, 28))
    assert layers["layers.2.conv"].receptive_field == (7, 7)  # reads stem (1) and layers 0, 1 (3, 5): 5 + 2
    assert layers["transition"].receptive_field == (8, 8)  # the widest of the four (layer 2's 7), then 2x2


def test_fire_module() -> None:
    layers = assert_fields_measured(Fire(), (30, 26))
    assert layers["after"].receptive_field == (7, 7)


@pytest.mark.parametrize("scale_first", [True, False])
def test_squeeze_and_excitation_either_operand_order(scale_first: bool) -> None:
    """Every unit after ``scale * x`` depends on the whole image: its box must hold it."""
    size = (32, 36)
    layers = assert_fields_measured(SENet(scale_first), size)
    geo = Geometry(layers["se"].receptive_field, layers["se"].stride, layers["se"].start)
    assert layers["se"].stride == layers["conv1"].stride == (2, 2)
    for i, j in units((16, 18)):
        left, top, right, bottom = geo.box(i, j)
        assert left <= 0 and top <= 0 and right >= size[1] and bottom >= size[0]


def test_in_place_joins() -> None:
    """``out += y`` with a constant ``out`` takes y's field; ``a.mul_(b)`` the union of a and b."""
    layers = assert_fields_measured(InPlace(), (20, 20))
    assert layers["after"].receptive_field == (7, 7)


def test_channels_last_block() -> None:
    layers = assert_fields_measured(ConvNeXtBlock(), (32, 28), channels_last=("norm", "pwconv1", "act", "pwconv2"))
    assert layers["pwconv2"].receptive_field == (2 + 6 * 2, 2 + 6 * 2)
    assert layers["after"].receptive_field == (18, 18)


def test_channel_split_and_shuffle() -> None:
    layers = assert_fields_measured(Shuffle(), (28, 24))
    assert layers["after"].receptive_field == (3 + 2 * 2 + 2 * 2, 3 + 2 * 2 + 2 * 2)


def test_padding_shifts_the_start() -> None:
    layers = assert_fields_measured(Padded(), (23, 25))
    assert layers["conv1"].start == (0.0, 1.0)  # a row padded on top: without it, (1.0, 1.0)
    assert layers["pad"].start == (-2.0, -3.0)  # a row on top and two columns on the left, at stride 2
    assert layers["conv2"].start == (0.0, -1.0)


def test_slices_unbind_stack_and_channel_reductions() -> None:
    layers = assert_fields_measured(Layout(), (21, 26))
    assert layers["conv2"].stride == (1, 2) and layers["conv2"].start == (1.0, 0.0)
    assert layers["conv3"].receptive_field == (7, 11)


def test_tokens_have_no_place_in_the_image_and_say_why() -> None:
    model = Tokens().eval()
    layers = discover(model, torch.zeros(1, 3, 32, 32))
    assert layers["patch"].receptive_field == (4, 4)
    for name in ("norm", "qkv"):
        assert layers[name].receptive_field == (-1, -1) and math.isnan(layers[name].start[0])
        assert layers[name].field_note == fields.MERGED
    for name in ("proj", "head"):
        assert layers[name].receptive_field == (-1, -1)
        assert layers[name].field_note == fields.ATTENTION
    group = type("Group", (), {"name": "/layers/qkv", "attrs": {"receptive_field": (-1, -1)}})()
    with pytest.raises(FmapError, match="receptive field unknown"):
        Geometry.of(group)


def test_flat_features_after_global_pooling_see_the_whole_image() -> None:
    model = nn.Sequential(conv(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    layers = assert_fields_measured(model, (20, 24))
    assert layers["3"].receptive_field == (20, 24) and layers["3"].stride == (0, 0)


def test_exported_programs_record_the_same_fields() -> None:
    """A ``torch.export`` program runs aten ops (convolution, cat, mul, permute, view, ...)."""
    for model in (Inception(), SENet(scale_first=True), ConvNeXtBlock(), Shuffle(), Padded()):
        model.eval()
        x = torch.zeros(1, 3, 32, 32)
        eager = discover(model, x)
        module = torch.export.export(model, (x,)).module()
        object.__setattr__(module, "fmap_exported", True)  # as models.load_exported marks it
        exported = discover(module, x)
        compared = 0
        for name, info in exported.items():
            if name in eager and eager[name].type == info.type:
                got = (info.receptive_field, info.stride, info.start)
                assert got == (eager[name].receptive_field, eager[name].stride, eager[name].start), name
                compared += 1
        assert compared >= 3, type(model).__name__
