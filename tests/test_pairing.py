"""What ``path_to_activation`` and the input provenance say on patterns of timm and ViT models: a
parameter operand is no join, and a layer fed through plain ops (reshapes, a class token, a
position embedding) still names where its input came from."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmap_cli.capture import capture, discover
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
