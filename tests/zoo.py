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
            elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
                fan_in = module.in_proj_weight.shape[1]
                module.in_proj_weight.copy_(torch.randn(module.in_proj_weight.shape, generator=gen) * fan_in**-0.5)
                if module.in_proj_bias is not None:
                    module.in_proj_bias.copy_(torch.randn(module.in_proj_bias.shape, generator=gen) * 0.1)
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.2)
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


# ---------------------------------------------------------------------------- --verify (tests/test_verify.py)


class ResidualNet(nn.Module):
    """A stem (conv, batch norm, in-place ReLU) and two torchvision BasicBlocks, the second with a
    downsampling shortcut: batch norm between z and a, residual adds, one ReLU module used twice."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 16, stride=2, downsample=nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
        self.fc = nn.Linear(16, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def residual_net(seed: int = 0) -> ResidualNet:
    return ResidualNet(seed)


# ---------------------------------------------------------------------------- loading (MNASNet-style)


class ConvHead(nn.Module):
    """conv (3 -> 4, 3x3) then head (4 -> 2, 1x1), seeded: the base of small models whose forward does
    something to conv's output on its way to head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class Versioned(nn.Module):
    """Like torchvision's MNASNet: its ``_load_from_state_dict`` needs the state dict's module version."""

    _version = 2

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BrokenLoading(Versioned):
    """A module whose own loading code fails whatever the file holds."""

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("this module refuses every state dict\nsecond line of the message")


def versioned(seed: int = 0) -> Versioned:
    return Versioned(seed)


def broken_loading(seed: int = 0) -> BrokenLoading:
    return BrokenLoading(seed)


# ---------------------------------------------------------------------------- replicas (tests/test_replicas.py)
# The graph patterns of the torchvision/timm families, small, written the way those libraries write them.


class BasicConv2d(nn.Module):
    """Inception/GoogLeNet: conv, batch norm, then a functional in-place ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    """Four branches concatenated along channels (one after an average pool)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 4, 1)
        self.branch5x5_1 = BasicConv2d(cin, 3, 1)
        self.branch5x5_2 = BasicConv2d(3, 4, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 3, 1)
        self.branch3x3dbl_2 = BasicConv2d(3, 4, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3, pool], 1)


class InceptionNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.stem = BasicConv2d(3, 6, 3, padding=1, stride=2)
        self.mixed = InceptionA(6)
        self.fc = nn.Linear(14, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixed(F.max_pool2d(self.stem(x), kernel_size=3, stride=2))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    """DenseNet: batch norm, in-place ReLU, 1x1 conv, batch norm, ReLU, 3x3 conv on the concatenation of
    every earlier feature map (given as a list, as torchvision does)."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        concatenated = torch.cat(features, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concatenated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, cin: int, growth: int, layers: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, init: torch.Tensor) -> torch.Tensor:
        features = [init]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(6))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("denseblock1", DenseBlock(6, 4, 3))
        self.features.add_module("norm5", nn.BatchNorm2d(18))
        self.classifier = nn.Linear(18, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Fire(nn.Module):
    """SqueezeNet: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated; every ReLU in place."""

    def __init__(self, cin: int, squeeze: int, expand1x1: int, expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat(
            [self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1
        )


class SqueezeNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
            Fire(8, 4, 6, 6),
            Fire(12, 4, 6, 6),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(12, 5, 1), nn.ReLU(inplace=True))
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.classifier(self.features(x)), 1), 1)


class SqueezeExcitation(nn.Module):
    """torchvision's: pool, 1x1 conv, ReLU, 1x1 conv, Hardsigmoid, then ``scale * input`` (the small operand first)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class SqueezeExciteGate(nn.Module):
    """timm's: mean, 1x1 conv, SiLU module, 1x1 conv, then ``x * x_se.sigmoid()`` (a functional gate)."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, squeeze, 1)
        self.act1 = nn.SiLU(inplace=True)
        self.conv_expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * x_se.sigmoid()


class SEBlock(nn.Module):
    """MobileNetV3 / EfficientNet: expand 1x1 (Hardswish), depthwise 3x3 (Hardswish), squeeze-and-excitation,
    project 1x1 with batch norm and no nonlinearity, residual add."""

    def __init__(self, channels: int, expanded: int, timm_style: bool = False) -> None:
        super().__init__()
        act = nn.SiLU if timm_style else nn.Hardswish
        self.expand = nn.Sequential(nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), act())
        self.depthwise = nn.Sequential(
            nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False), nn.BatchNorm2d(expanded), act()
        )
        self.se: nn.Module = SqueezeExciteGate(expanded, 4) if timm_style else SqueezeExcitation(expanded, 4)
        self.project = nn.Sequential(nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class SENet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.mbv3 = SEBlock(6, 12)
        self.effnet = SEBlock(6, 12, timm_style=True)
        self.fc = nn.Linear(6, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.effnet(self.mbv3(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2: pointwise expand (ReLU6 in place), depthwise 3x3 (ReLU6 in place), linear pointwise project."""

    def __init__(self, channels: int, expanded: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.ReLU6(inplace=True)
            ),
            nn.Sequential(
                nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False),
                nn.BatchNorm2d(expanded),
                nn.ReLU6(inplace=True),
            ),
            nn.Conv2d(expanded, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(
                nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU6(inplace=True)
            ),
            InvertedResidual(6, 18),
            InvertedResidual(6, 18),
        )
        self.classifier = nn.Linear(6, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNetV2's: a 5-D view, a transpose, and back."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 (stride 1): split the channels in two, convolve one half, concatenate, shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch2 = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)


class ShuffleNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(8), ShuffleUnit(8))
        self.fc = nn.Linear(8, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.conv1(x)).mean([2, 3]))


class Permute(nn.Module):
    """torchvision.ops.misc.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's: LayerNorm over channels of an (N, C, H, W) map, through two permutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, LayerNorm and an MLP channels-last (Linear, GELU, Linear), layer scale, residual."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        gen = torch.Generator().manual_seed(seed)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1, generator=gen) + 0.5)
        self.stochastic_depth = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.stochastic_depth(self.layer_scale * self.block(x))
        result += x
        return result


class ConvNeXt(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNorm2d(8, eps=1e-6))
        self.stages = nn.Sequential(CNBlock(8, seed + 1), CNBlock(8, seed + 2))
        self.head = nn.Linear(8, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean([2, 3]))


class EncoderBlock(nn.Module):
    """ViT (torchvision): pre-norm multi-head self-attention and MLP, each with a residual add, on tokens."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class WindowBlock(nn.Module):
    """Swin: channels-last map, shifted windows (roll, window partition by view/permute), attention from a
    qkv Linear, MLP with GELU, residual adds."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, c = x.shape
        ws = self.window
        x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        x = x.view(n, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        q, k, v = self.qkv(x).reshape(x.shape[0], ws * ws, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(x.shape[0], ws * ws, c)
        x = self.proj(x)
        x = x.view(n, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        return torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A patch-embedding conv, then a Swin block on the channels-last map and a ViT block on the tokens
    (class token first, learned position embedding)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        dim = 8
        self.conv_proj = nn.Conv2d(3, dim, 4, stride=4)
        self.swin = WindowBlock(dim, 2, window=2, shift=1)
        gen = torch.Generator().manual_seed(seed)
        self.class_token = nn.Parameter(torch.randn(1, 1, dim, generator=gen))
        self.pos_embedding = nn.Parameter(torch.randn(1, 17, dim, generator=gen) * 0.1)
        self.encoder = nn.Sequential(EncoderBlock(dim, 2))
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, 5)
        randomize(self, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.swin(self.conv_proj(x).permute(0, 2, 3, 1))  # (N, 4, 4, D) for a 16 x 16 input
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.encoder(x))[:, 0])


def inception(seed: int = 0) -> InceptionNet:
    return InceptionNet(seed)


def densenet(seed: int = 0) -> DenseNet:
    return DenseNet(seed)


def squeezenet(seed: int = 0) -> SqueezeNet:
    return SqueezeNet(seed)


def se_net(seed: int = 0) -> SENet:
    return SENet(seed)


def mobilenet_v2(seed: int = 0) -> MobileNetV2:
    return MobileNetV2(seed)


def shufflenet(seed: int = 0) -> ShuffleNet:
    return ShuffleNet(seed)


def convnext(seed: int = 0) -> ConvNeXt:
    return ConvNeXt(seed)


def transformer(seed: int = 0) -> Transformer:
    return Transformer(seed)
