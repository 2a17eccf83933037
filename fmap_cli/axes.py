"""Naming the axes of a layer's maps (for ``pairing.py``): channels first or last, image rows and
columns, tokens, features. Maps are stored as the model computed them, so the names must say
where everything is.

The receptive-field tracking (``fields.py``) knows which dims hold the image's rows and columns,
or which dim runs over every image position (tokens), and which holds the channels where an op
said so (a convolution or batch norm: dim 1; a linear layer or layer norm: the last), followed
through permutes and reshapes. Dims it cannot place in the image are L (one) or P, Q (two, e.g.
windows and the positions in each). Where the tracking tells nothing, the layer's own op decides
(linear: channels last; convolution: channels first); other layers take the axes of their
input's layer when their output has its shape, else channels first.
"""

from __future__ import annotations

from collections.abc import Sequence

from .fields import Field
from .store.axes import Axes, Tokens, valid

LINEAR_TYPES = ("Linear", "linear", "LazyLinear", "Bilinear", "NonDynamicallyQuantizableLinear")
CONV_PREFIXES = ("Conv", "conv", "LazyConv")


def _spatial(count: int) -> list[str]:
    """Names of ``count`` dims of a convolution's own grid."""
    return ["H", "W"] if count == 2 else ["L"] if count == 1 else []


def _unplaced(count: int) -> list[str]:
    """Names of ``count`` dims that fmap cannot place in the image."""
    return ["P", "Q"] if count == 2 else ["L"] if count == 1 else []


def from_field(field: Field | None, shape: Sequence[int]) -> tuple[Axes, Tokens | None] | None:
    """The axes where the receptive-field tracking tells (rows and columns, tokens, the channel dim),
    else None."""
    if field is None:
        return None
    ndim = len(shape)
    names: dict[int, str] = {0: "N"}
    tokens = None
    if field.axes is not None:
        names |= {field.axes[0]: "H", field.axes[1]: "W"}
    elif field.merged is not None:
        names[field.merged] = "T"
        tokens = Tokens(field.tokens[0], (field.tokens[1], field.tokens[2])) if field.tokens is not None else Tokens()
        tokens = tokens if tokens.fits(shape[field.merged]) else Tokens()
    placed = len(names) > 1  # rows and columns, or tokens
    channel = "D" if field.merged is not None and field.axes is None else "C"
    left = [d for d in range(ndim) if d not in names]
    if field.channel in left:
        names[field.channel] = channel
        rest = [d for d in left if d != field.channel]
        if placed and rest:
            return None  # dims besides the placed ones and the channels: not named
        names |= dict(zip(rest, _unplaced(len(rest)), strict=False))
    elif len(left) == 1 and placed:
        names[left[0]] = channel  # the one dim left beside the rows and columns (or tokens)
    elif field.geometry is not None and ndim == 2:
        names[1] = "C"  # flat features
    if len(names) != ndim or len(set(names.values())) != ndim:
        return None
    return tuple(names[d] for d in range(ndim)), tokens


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
        return ("N", *_unplaced(ndim - 2), "C"), None
    if layer_type.startswith(CONV_PREFIXES):
        return ("N", "C", *_spatial(ndim - 2)), None
    if upstream is not None and same:
        return upstream[1], upstream[2]
    return ("N", "C", *_spatial(ndim - 2)), None
