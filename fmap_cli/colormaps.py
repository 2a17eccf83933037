"""Colour tables for pictures of maps, built in code from a few anchor colours (numpy only).

``SEQUENTIAL`` runs from black (zero, or the low end) through purple and orange to pale yellow with
rising brightness, for activations; ``DIVERGING`` runs blue -> white -> red, for pre-activations
centred on zero. Both have an odd number of entries so the midpoint (zero of ``DIVERGING``) is
exactly one entry: pure white.
"""

from __future__ import annotations

import numpy as np

SIZE = 257  # odd: t = 0.5 falls on one entry
NAN_COLOUR = (128, 128, 128)


def interpolate(anchors: list[tuple[int, int, int]], size: int = SIZE) -> np.ndarray:
    """A (size, 3) uint8 table through ``anchors``, evenly spaced, linearly interpolated in RGB."""
    points = np.asarray(anchors, dtype=np.float64)  # (K, 3)
    where = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, size)
    table = np.stack([np.interp(t, where, points[:, i]) for i in range(3)], axis=1)
    return np.rint(table).astype(np.uint8)


# Dark to light, each anchor brighter than the last (an inferno-like ramp).
SEQUENTIAL = interpolate(
    [(0, 0, 0), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39),
     (252, 255, 164)]
)  # fmt: skip
# Negative blue, zero white, positive red (ColorBrewer RdBu end colours).
DIVERGING = interpolate([(5, 48, 97), (67, 147, 195), (255, 255, 255), (214, 96, 77), (103, 0, 31)])


def apply(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Colours (..., 3) uint8 for values ``t`` in [0, 1] (clipped); NaN becomes grey."""
    t = np.asarray(t, dtype=np.float64)
    index = np.rint(np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(table) - 1)).astype(np.intp)
    rgb: np.ndarray = table[index]
    rgb[np.isnan(t)] = NAN_COLOUR
    return rgb


def sequential(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` in [lo, hi] on the sequential table (lo black); a flat range maps to black."""
    span = hi - lo
    t = (np.asarray(values, dtype=np.float64) - lo) / span if span > 0 else np.zeros(np.shape(values))
    return apply(SEQUENTIAL, np.where(np.isnan(values), np.nan, t))


def diverging(values: np.ndarray, limit: float) -> np.ndarray:
    """``values`` in [-limit, limit] on the diverging table, zero white; limit 0 gives white."""
    t = 0.5 + 0.5 * np.asarray(values, dtype=np.float64) / limit if limit > 0 else np.full(np.shape(values), 0.5)
    return apply(DIVERGING, np.where(np.isnan(values), np.nan, t))
