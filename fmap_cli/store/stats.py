"""Statistics computed while writing (``/layers/<L>/stats``), so readers need not scan the maps.

Per image and channel: max, mean, fraction of zeros and the (row, col) of the max. Per channel over
every image: min, max, mean, std and the fraction of negative values, kept as running values
(Chan et al.'s pairwise merge, float64) that survive --resume and --append and combine across
shards. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schema import CHANNEL_STATS

SUMMARY = CHANNEL_STATS  # stored per role as <role>_<name>, (C,)


@dataclass
class ChannelStats:
    """Running per-channel min, max, mean and std of one role's maps."""

    count: int  # values seen per channel
    mean: np.ndarray  # (C,)
    m2: np.ndarray  # (C,) sum of squared deviations from the mean
    min: np.ndarray  # (C,)
    max: np.ndarray  # (C,)
    negatives: np.ndarray  # (C,) how many values were < 0

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        """No values seen yet."""
        zeros = np.zeros(channels, dtype=np.float64)
        return cls(0, zeros, zeros.copy(), np.full(channels, np.inf), np.full(channels, -np.inf), zeros.copy())

    @classmethod
    def restore(cls, summary: dict[str, np.ndarray], count: int) -> ChannelStats:
        """Continue from a stored :meth:`summary` of ``count`` values per channel."""
        mean = np.asarray(summary["mean"], dtype=np.float64)
        return cls(
            int(count),
            mean.copy(),
            np.asarray(summary["std"], dtype=np.float64) ** 2 * count,
            np.asarray(summary["min"], dtype=np.float64),
            np.asarray(summary["max"], dtype=np.float64),
            np.asarray(summary.get("negatives", np.zeros_like(mean)), dtype=np.float64) * count,
        )

    def update(self, values: np.ndarray) -> None:
        """Merge a batch of maps (n, C, ...) into the running statistics."""
        axes = (0, *range(2, values.ndim))  # every axis but the channels'; no float64 copy of the maps
        count = values.size // values.shape[1]
        if count == 0:
            return
        total = values.sum(axis=axes, dtype=np.float64)
        mean = total / count
        # squares of deviations from the mean, not of the values: sum(x^2) - total * mean cancels (a
        # channel of mean 1000 and std 0.01 came out at std 0.02). The mean is rounded to the maps'
        # float32, which adds count * (its rounding)^2: under 1e-14 of mean^2 per value.
        centred = np.subtract(values, mean.reshape(1, -1, *(1,) * (values.ndim - 2)), dtype=np.float32)
        m2 = np.square(centred, out=centred).sum(axis=axes, dtype=np.float64)
        negatives = np.count_nonzero(values < 0, axis=axes).astype(np.float64)
        self.merge(ChannelStats(count, mean, m2, values.min(axis=axes), values.max(axis=axes), negatives))

    def merge(self, other: ChannelStats) -> None:
        """Combine with statistics of other values of the same channels (pairwise update)."""
        total = self.count + other.count
        if other.count == 0:
            return
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / total
        self.mean = self.mean + delta * other.count / total
        self.count = total
        self.min = np.minimum(self.min, other.min)  # NaN propagates, as in np.min
        self.max = np.maximum(self.max, other.max)
        self.negatives = self.negatives + other.negatives

    def summary(self) -> dict[str, np.ndarray]:
        """min, max, mean, std (population) and negatives (the fraction < 0), each (C,) float64;
        NaN before any value."""
        if self.count == 0:
            return {name: np.full(self.mean.shape, np.nan) for name in SUMMARY}
        return {
            "min": self.min.astype(np.float64),
            "max": self.max.astype(np.float64),
            "mean": self.mean.copy(),
            "std": np.sqrt(self.m2 / self.count),
            "negatives": self.negatives / self.count,
        }


def image_stats(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Per image and channel of a batch of maps (n, C, H, W) or (n, C): image_max, image_mean and
    image_zero_fraction (n, C) float32, and image_argmax (n, C, 2) int32, the (row, col) of the
    first maximum (row-major)."""
    maps = np.asarray(maps)
    n, c = maps.shape[:2]
    width = maps.shape[3] if maps.ndim == 4 else 1
    x = maps.reshape(n, c, -1)  # (n, C, H*W)
    size = x.shape[2]
    where = x.argmax(axis=2)  # (n, C)
    return {
        "image_max": np.take_along_axis(x, where[..., None], axis=2)[..., 0].astype(np.float32),
        "image_mean": (x.sum(axis=2, dtype=np.float64) / size).astype(np.float32),
        "image_zero_fraction": ((size - np.count_nonzero(x, axis=2)) / size).astype(np.float32),
        "image_argmax": np.stack(np.divmod(where, width), axis=-1).astype(np.int32),
    }
