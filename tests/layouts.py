"""Small models whose maps are not channels first (``--model tests/layouts.py:<factory>``), for the
axes labels: a ConvNeXt-like channels-last MLP, a ViT-like token sequence, MaxViT-like windows and a
1-D convolution."""

from __future__ import annotations

import torch
from torch import nn


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.eval()


class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class ChannelsLast(nn.Module):
    """ConvNeXt's block: conv, permute -> LayerNorm -> Linear -> f -> Linear -> permute. ``dead``: the
    first Linear's channel 2 is always negative, so with ReLU it is dead."""

    def __init__(self, act: nn.Module, dead: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 2, stride=2)
        self.block = nn.Sequential(
            Permute(0, 2, 3, 1), nn.LayerNorm(4), nn.Linear(4, 6), act, nn.Linear(6, 4), Permute(0, 3, 1, 2)
        )
        _seeded(self, 0)
        if dead:
            with torch.no_grad():
                self.block[2].weight[2] = 0.0
                self.block[2].bias[2] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x)) + self.stem(x)


class TinyViT(nn.Module):
    """Patch embedding (4x4 patches), class token, position embedding, self-attention and an MLP
    (Linear, GELU, Linear) on the tokens. ``shuffled``: the tokens are rolled, so fmap cannot tell
    which is which patch."""

    def __init__(self, shuffled: bool) -> None:
        super().__init__()
        self.shuffled = shuffled
        self.patch = nn.Conv2d(3, 6, 4, stride=4)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 6))
        self.pos = nn.Parameter(torch.zeros(1, 17, 6))  # 16 x 16 images: 4 x 4 patches + the class token
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        _seeded(self, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, 6)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        if self.shuffled:
            x = torch.roll(x, 1, dims=1)
        x = x + self.attention(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


class RowsAsChannels(nn.Module):
    """A 1-D convolution along the columns of a map whose rows were stacked into its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 2, stride=2)
        self.conv = nn.Conv1d(16, 5, 3)
        self.relu = nn.ReLU()
        _seeded(self, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.stem(x)  # (N, 2, 8, 8) for 16 x 16 images
        return self.relu(self.conv(z.reshape(z.shape[0], -1, z.shape[3])))  # (N, 5, 6)


class Windows(nn.Module):
    """MaxViT's window partition: (N, C, H, W) -> (N, windows, positions in a window, C), an MLP
    (LayerNorm, Linear, GELU, Linear) on that, then back to (N, C, H, W) and a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 2, stride=2)
        self.mlp = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4))
        self.conv = nn.Conv2d(4, 5, 3, padding=1)
        self.relu = nn.ReLU()
        _seeded(self, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, 4, 8, 8) for 16 x 16 images: 2 x 2 windows of 4 x 4
        n, c, h, w = x.shape
        windows = x.reshape(n, c, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(n, 4, 16, c)
        windows = windows + self.mlp(windows)
        x = windows.reshape(n, 2, 2, 4, 4, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
        return self.relu(self.conv(x))


def channels_last() -> ChannelsLast:
    return ChannelsLast(nn.GELU(), dead=False)


def channels_last_relu() -> ChannelsLast:
    return ChannelsLast(nn.ReLU(), dead=True)


def vit() -> TinyViT:
    return TinyViT(shuffled=False)


def vit_shuffled() -> TinyViT:
    return TinyViT(shuffled=True)


def windows() -> Windows:
    return Windows()


def rows_as_channels() -> RowsAsChannels:
    return RowsAsChannels()
