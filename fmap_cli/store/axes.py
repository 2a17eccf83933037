"""The axes of stored maps: their names (the ``axes`` attribute of every map dataset), reading them
from a file (files of schema versions 1 and 2 are channels first), and a channels-first view of a
map for statistics and pictures. Maps are stored exactly as the model computed them; only these
views reorder them. numpy and h5py only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from . import schema

Axes = tuple[str, ...]  # e.g. ("N", "H", "W", "C")


def default_axes(ndim: int) -> Axes:
    """The axes of a map of ``ndim`` dims in a file without labels (schema versions 1 and 2)."""
    return tuple(schema.DIM_NAMES[:ndim])


def joined(axes: Sequence[str]) -> str:
    """The ``axes`` attribute's text, e.g. 'N,H,W,C'."""
    return ",".join(axes)


def valid(axes: Sequence[str]) -> bool:
    """N first, names from the schema, each once, exactly one channel axis (C or D)."""
    return (
        len(axes) >= 2
        and axes[0] == "N"
        and all(name in schema.AXES for name in axes)
        and len(set(axes)) == len(axes)
        and sum(name in schema.CHANNEL_AXES for name in axes) == 1
    )


def dataset_axes(ds: h5py.Dataset) -> Axes:
    """The axes of a stored map: its ``axes`` attribute, or channels first in older files.

    Raises:
        ValueError: a label that does not name the dataset's axes as the schema allows (readers
            report it as a damaged file).
    """
    value = ds.attrs.get("axes")
    if value is None:
        axes, says = (
            default_axes(ds.ndim),
            f"{ds.name} has no axes attribute (read as {joined(default_axes(ds.ndim))!r})",
        )
    else:
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        axes, says = tuple(text.split(",")), f"{ds.name} has axes {text!r}"
        if len(axes) != ds.ndim or not valid(axes):
            raise ValueError(f"{says}, which do not name its {ds.ndim} axes")
    # fmap labels the dimension scales as 'axes' names them: a label edited or removed in one place only is damage
    labels = tuple(str(label) for label in (dim.label for dim in ds.dims))
    if any(labels) and labels != axes:
        raise ValueError(f"{says}, but its dimensions are labelled {joined(labels)!r}")
    return axes


def layer_axes(group: h5py.Group) -> Axes:
    """The axes of a layer's maps (z and a share them).

    Raises:
        ValueError: a label that does not fit its map, or z and a labelled differently.
    """
    found = {dataset_axes(group[role]) for role in (schema.PREACTIVATION, schema.ACTIVATION) if role in group}
    if len(found) > 1:
        raise ValueError(f"{group.name}: z and a have different axes ({' and '.join(sorted(map(joined, found)))})")
    return found.pop() if found else default_axes(len(group.attrs["output_shape"]) + 1)


def channel_axis(axes: Sequence[str]) -> int:
    """The position of the channel axis (C, or D for tokens)."""
    return next(i for i, name in enumerate(axes) if name in schema.CHANNEL_AXES)


def channels_first_order(axes: Sequence[str]) -> list[int]:
    """The transposition that puts a map in the order N, channels, then H before W (other axes as stored)."""
    rest = [i for i, name in enumerate(axes) if i and name not in schema.CHANNEL_AXES]
    if "H" in axes and "W" in axes:
        rest.sort(key=lambda i: ("H", "W").index(axes[i]) if axes[i] in ("H", "W") else -1)
    return [0, channel_axis(axes), *rest]


def channels_first(values: np.ndarray, axes: Sequence[str]) -> np.ndarray:
    """A view of maps (n, ...) labelled ``axes`` in channels-first order (no copy)."""
    order = channels_first_order(axes)
    return values if order == list(range(values.ndim)) else values.transpose(order)


@dataclass(frozen=True)
class Tokens:
    """What the token axis T of a map holds, where fmap could tell: ``prefix`` tokens not from the
    image grid (e.g. a class token), then a ``grid`` of patch tokens, row-major, up to T's end."""

    prefix: int | None = None
    grid: tuple[int, int] | None = None

    def fits(self, length: int) -> bool:
        """Whether a T axis of ``length`` tokens is the prefix and then the grid."""
        return self.prefix is not None and self.grid is not None and self.prefix + self.grid[0] * self.grid[1] == length

    def describe(self) -> str:
        """The layer's ``tokens`` attribute."""
        if self.prefix is None or self.grid is None:
            return (
                "a sequence over image positions (rows and columns merged into one axis); fmap could not tell "
                "which token is which patch"
            )
        rows, cols = self.grid
        patches = f"{rows}x{cols} = {rows * cols} patch tokens, row-major"
        if not self.prefix:
            return patches
        what = "token" if self.prefix == 1 else "tokens"
        return f"{self.prefix} {what} not from the image grid (e.g. a class token), then {patches}"


def layer_tokens(group: h5py.Group) -> Tokens | None:
    """What a stored token map's T axis holds (None for maps without tokens); Tokens() when unknown.

    Raises:
        ValueError: token attributes that do not fit the maps (readers report a damaged file).
    """
    axes = layer_axes(group)
    if "T" not in axes:
        return None
    prefix, grid = group.attrs.get("token_prefix"), group.attrs.get("token_grid")
    if prefix is None or grid is None:
        return Tokens()
    length = int(group.attrs["output_shape"][axes.index("T") - 1])
    says = f"{group.name}: token_prefix {np.asarray(prefix).tolist()!r} and token_grid {np.asarray(grid).tolist()!r}"
    integers = np.asarray(prefix).dtype.kind in "iu" and np.asarray(grid).dtype.kind in "iu"
    if not integers or np.ndim(prefix) != 0 or np.shape(grid) != (2,):
        raise ValueError(f"{says} are not an integer and a pair of integers")
    found = Tokens(int(prefix), (int(grid[0]), int(grid[1])))
    if int(prefix) < 0 or min(grid) < 1 or not found.fits(length):
        raise ValueError(f"{says} do not fit {length} tokens")
    return found


def pictures(values: np.ndarray, axes: Sequence[str], tokens: Tokens | None) -> np.ndarray:
    """One image's maps (without N) as (C, rows, columns) pictures along the right axes: H and W as
    they are; patch tokens on their grid (prefix tokens left out); another axis (L) as one row;
    flat features as 1x1.

    Raises:
        ValueError: token maps whose tokens fmap could not place on the image grid (the reason, in words).
    """
    maps: np.ndarray = channels_first(values[None], axes)[0]  # (C, ...)
    if tokens is not None:
        if tokens.prefix is None or tokens.grid is None:
            raise ValueError("its maps are token sequences whose tokens fmap could not place on the image grid")
        maps = maps[:, tokens.prefix :].reshape(maps.shape[0], *tokens.grid)
    elif maps.ndim == 2:
        maps = maps[:, None, :]
    else:
        maps = maps.reshape(maps.shape[0], *(maps.shape[1:] or (1, 1)))
    return maps
