"""Small PyTorch models for tests/test_models.py, built here because torchvision/timm are not dependencies.

Every factory is deterministic (seeded), so the same call gives the same weights in the test
process, in ``fmap`` loading ``tests/zoo.py:NAME`` and in a ``torch.export`` program.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------- torchvision-style ResNet-18


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """As in torchvision: ONE in-place ReLU module used twice, ``out += identity``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet layout (stem, layer1..layer4, avgpool, fc) with a configurable width."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights, and batch norms with random affine parameters and running statistics.

    So no batch norm is an identity and every pre-activation has both signs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(7)
    return model


def resnet18(width: int = 8, num_classes: int = 10, seed: int = 0) -> ResNet:
    """A torchvision-style ResNet-18 ([2, 2, 2, 2] BasicBlocks), random weights and BN statistics."""
    return randomize(ResNet((2, 2, 2, 2), width=width, num_classes=num_classes), seed)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- nonlinearity call sites


class ReusedReLU(nn.Module):
    """One ReLU module called twice: ``act`` after conv1, ``act#2`` after conv2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


def apply_f(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The nonlinearity call site ``kind`` applied to x (in place for relu_)."""
    if kind == "F.relu":
        return F.relu(x)
    if kind == "torch.relu":
        return torch.relu(x)
    if kind == "relu_":
        return x.relu_()
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "leaky_relu":
        return F.leaky_relu(x, 0.2)
    raise ValueError(kind)


class Block(nn.Module):
    """A user module (not torch.nn): conv, then the functional nonlinearity."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_f(self.kind, self.conv(x))


class FunctionalNet(nn.Module):
    """conv1 -> f (':f') -> block (conv -> f, 'block:f') -> conv3 -> f (':f#2') -> fc (no f)."""

    def __init__(self, kind: str = "F.relu", seed: int = 0) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block(kind, 4)
        self.conv3 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6, 3)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = apply_f(self.kind, self.conv1(x))
        x = self.block(x)
        x = apply_f(self.kind, self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def functional_net(kind: str = "F.relu", seed: int = 0) -> FunctionalNet:
    return FunctionalNet(kind, seed)


def reused_relu(seed: int = 0) -> ReusedReLU:
    return randomize(ReusedReLU(), seed)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- models torch.fx cannot trace


class Branchy(nn.Module):
    """Data-dependent control flow: the branch taken depends on the input's values.

    Bright inputs (mean > 0) run conv2 on h, dark ones on -h and an extra conv+tanh before it;
    relu2 follows conv2 on both branches.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.extra = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu1(self.conv1(x))
        if x.mean() > 0:
            h = self.conv2(h)
        else:
            h = torch.tanh(self.extra(h))
            h = self.conv2(-h)
        return self.relu2(h)


def branchy(seed: int = 0) -> Branchy:
    return Branchy(seed)


class OperandOrder(nn.Module):
    """A residual block written ``identity + out`` (the joining tensor first), then ReLU."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.relu(self.conv1(x))
        out = self.conv2(identity)
        return self.relu(identity + out)


# ---------------------------------------------------------------------------- broken factories


def raising_factory(**kwargs: Any) -> nn.Module:
    raise RuntimeError("factory exploded on purpose")


def not_a_module() -> dict[str, int]:
    return {"not": 1}


NOT_CALLABLE = 3


def resnet18_full(seed: int = 0) -> ResNet:
    """The real ResNet-18 size (11.7 M parameters), random weights: for benchmarks."""
    return resnet18(width=64, num_classes=1000, seed=seed)
