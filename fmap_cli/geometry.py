"""Receptive-field geometry: where a layer's units look in the input image. Pure Python, so the
torch-free readers (``render``) share it with the forward pass (``pairing.py``) and spec files.

Along each axis, unit i of a layer sees ``field`` input pixels centred on input pixel
``start + i * stride``. The input itself is field 1, stride 1, start 0. A window (convolution or
pooling) with kernel k, stride s, padding p and dilation d spans ``k' = d * (k - 1) + 1`` units of
its input, so::

    field' = field + (k' - 1) * stride
    start' = start + ((k' - 1) / 2 - p) * stride
    stride' = stride * s

The field counts padding too: near the border part of it lies outside the image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import FmapError

Pair = tuple[int, int]  # (H, W)


class Stored(Protocol):
    """Anything with a name and attributes, like an ``h5py.Group`` (not imported: no h5py here)."""

    @property
    def name(self) -> str | None: ...

    @property
    def attrs(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Geometry:
    """Receptive field of a layer's units: unit (i, j) is centred at input pixel start + (i, j) * stride."""

    field: Pair = (1, 1)  # input pixels (H, W) seen by one unit
    stride: Pair = (1, 1)  # input pixels between neighbouring units
    start: tuple[float, float] = (0.0, 0.0)  # (row, col) of the centre of unit (0, 0)

    @classmethod
    def whole(cls, size: Pair, stride: Pair = (0, 0)) -> Geometry:
        """Every unit sees the whole ``size`` (H, W) input, e.g. after flatten or global pooling.

        ``stride`` is (0, 0) for flat features, which have no neighbours in space; global pooling
        keeps a map (1 x 1), so its stride is the input size.
        """
        return cls(size, stride, ((size[0] - 1) / 2, (size[1] - 1) / 2))

    def after_window(self, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair = (1, 1)) -> Geometry:
        """The geometry after a convolution or pooling window on a map of this geometry."""
        span = [dilation[axis] * (kernel[axis] - 1) for axis in (0, 1)]  # k' - 1
        return Geometry(
            field=(self.field[0] + span[0] * self.stride[0], self.field[1] + span[1] * self.stride[1]),
            stride=(self.stride[0] * stride[0], self.stride[1] * stride[1]),
            start=(
                self.start[0] + (span[0] / 2 - padding[0]) * self.stride[0],
                self.start[1] + (span[1] / 2 - padding[1]) * self.stride[1],
            ),
        )

    @staticmethod
    def union(parts: Sequence[tuple[Geometry, Pair]], size: Pair) -> Geometry:
        """A map of ``size`` (H, W) units whose unit (i, j) combines unit (i, j) of every part (an
        elementwise op, a concatenation of channels): it sees what any of them sees.

        ``parts`` are (geometry, extent (H, W)) of each operand. An operand of extent 1 along an
        axis is broadcast there: its one unit serves every unit, like the (N, C, 1, 1) scale of a
        squeeze-and-excitation block (so is an operand of stride 0). Units keep the stride of the
        first operand that moves along the axis. The field is the smallest one, centred on each
        unit, that holds every operand's field for every unit: operands with different fields or
        starts give their exact union, and a broadcast whole-image operand gives a field about
        twice the image, so that every unit's box holds the whole image.
        """
        axes = []
        for axis in (0, 1):
            n = size[axis]
            moving = [g.stride[axis] for g, extent in parts if extent[axis] > 1 and g.stride[axis]]
            step = parts[0][0].stride[axis] if n == 1 else (moving or [0])[0]
            lo, hi = math.inf, -math.inf
            for geo, extent in parts:
                own = geo.stride[axis] if extent[axis] > 1 else 0
                for i in {0, n - 1}:  # box edges are linear in i: the extremes are at the ends
                    centre = geo.start[axis] + i * (own - step)  # relative to unit i's own centre
                    lo = min(lo, centre - (geo.field[axis] - 1) / 2)
                    hi = max(hi, centre + (geo.field[axis] - 1) / 2)
            axes.append((round(hi - lo) + 1, step, (lo + hi) / 2))
        return Geometry((axes[0][0], axes[1][0]), (axes[0][1], axes[1][1]), (axes[0][2], axes[1][2]))

    def centre(self, row: int, col: int) -> tuple[float, float]:
        """Input-pixel coordinates (row, col) of the centre of unit (row, col)'s field."""
        return (self.start[0] + row * self.stride[0], self.start[1] + col * self.stride[1])

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of unit (row, col)'s receptive field, in input pixels."""
        centre = self.centre(row, col)
        top = round(centre[0] - (self.field[0] - 1) / 2)
        left = round(centre[1] - (self.field[1] - 1) / 2)
        return left, top, left + self.field[1], top + self.field[0]

    @classmethod
    def of(cls, group: Stored) -> Geometry:
        """The geometry stored on a layer group of an fmap file.

        Raises:
            FmapError: the file does not know it (e.g. an op whose geometry could not be traced).
        """
        field = [int(v) for v in group.attrs.get("receptive_field", (-1, -1))]
        stride = [int(v) for v in group.attrs.get("receptive_field_stride", (-1, -1))]
        start = [float(v) for v in group.attrs.get("receptive_field_start", (math.nan, math.nan))]
        if min(*field, *stride) < 0 or not all(map(math.isfinite, start)):
            name = (group.name or "").rsplit("/", 1)[-1]
            raise FmapError(f"layer '{name}': receptive field unknown in this file, so its units cannot be placed")
        return cls((field[0], field[1]), (stride[0], stride[1]), (start[0], start[1]))
