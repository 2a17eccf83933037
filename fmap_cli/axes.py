"""Naming the axes of a layer's maps (for ``pairing.py``): channels first or last, image rows and
columns, tokens, features. Maps are stored as the model computed them, so the names must say
where everything is.

The receptive-field tracking (``fields.py``) knows which dims hold the image's rows and columns,
or which dim runs over every image position (tokens); the one other dim is then the channels. Where
it knows neither (after an op it does not follow), the layer's own op decides: a linear layer works
along the last dim (channels last), a convolution along dim 1 (channels first). Other layers take
the axes of their input's layer when their output has its shape, else channels first.
"""

from __future__ import annotations

from collections.abc import Sequence

from .fields import Field
from .store.axes import Axes, Tokens, valid

LINEAR_TYPES = ("Linear", "linear", "LazyLinear", "Bilinear", "NonDynamicallyQuantizableLinear")
CONV_PREFIXES = ("Conv", "conv", "LazyConv")


def _named(ndim: int, known: dict[int, str], channel: str) -> Axes | None:
    """N, the names in ``known``, and ``channel`` for the one dim left (None unless exactly one is)."""
    left = [d for d in range(1, ndim) if d not in known]
    if len(left) != 1 or 0 in known:
        return None
    names = {0: "N", **known, left[0]: channel}
    return tuple(names[d] for d in range(ndim))


def _spatial(count: int) -> list[str]:
    return ["H", "W"] if count == 2 else ["L"] if count == 1 else []


def from_field(field: Field | None, shape: Sequence[int]) -> tuple[Axes, Tokens | None] | None:
    """The axes where the receptive-field tracking tells, else None."""
    ndim = len(shape)
    if field is None:
        return None
    if field.axes is not None:
        found = _named(ndim, {field.axes[0]: "H", field.axes[1]: "W"}, "C")
        return (found, None) if found else None
    if field.merged is not None:
        found = _named(ndim, {field.merged: "T"}, "D")
        if found is None:
            return None
        tokens = Tokens(field.tokens[0], (field.tokens[1], field.tokens[2])) if field.tokens is not None else Tokens()
        return found, tokens if tokens.fits(shape[field.merged]) else Tokens()
    if field.geometry is not None and ndim == 2:
        return ("N", "C"), None  # flat features
    return None


def detect(
    field: Field | None,
    shape: Sequence[int],
    layer_type: str,
    upstream: tuple[Sequence[int], Axes, Tokens | None] | None,
) -> tuple[Axes, Tokens | None]:
    """The axes of a layer's maps (N first) and, for token maps, what the tokens are.

    Args:
        field: the receptive field of the layer's output.
        shape: the output's shape, N included.
        layer_type: the module class or function (Linear, Conv2d, relu, ...).
        upstream: (shape, axes, tokens) of the layer whose output is this layer's input, if known.
    """
    ndim = len(shape)
    found = from_field(field, shape)
    if found is not None:
        return found
    same = upstream is not None and tuple(upstream[0]) == tuple(shape) and valid(upstream[1])
    if layer_type in LINEAR_TYPES:  # along the last dim: channels last
        if upstream is not None and same and upstream[1][-1] in ("C", "D"):
            return upstream[1], upstream[2]
        return ("N", *_spatial(ndim - 2), "C"), None
    if layer_type.startswith(CONV_PREFIXES):
        return ("N", "C", *_spatial(ndim - 2)), None
    if upstream is not None and same:
        return upstream[1], upstream[2]
    return ("N", "C", *_spatial(ndim - 2)), None
