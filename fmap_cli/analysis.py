"""Reading a layer's statistics: the file's write-time ``stats`` group or, for files without one, a
chunked scan of the maps with the writer's own accumulators (same numbers); top-K and histograms.
h5py and numpy only.

Memory stays at one block of about ``SCAN_BYTES`` plus the (N, C) per-image arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import h5py
import numpy as np

from .store import schema
from .store.axes import channels_first, channels_first_order, layer_axes
from .store.stats import SUMMARY, ChannelStats, image_stats

SCAN_BYTES = 8 << 20  # one block of a map read at a time
CHANNEL_FIELDS = SUMMARY


@dataclass(frozen=True)
class ChannelSummary:
    """Per channel (C,), over every image and position, float64."""

    min: np.ndarray
    max: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    negatives: np.ndarray  # fraction of values below zero


@dataclass(frozen=True)
class LayerStats:
    """What ``/layers/<L>/stats`` holds, from the file (``source`` "file") or a scan ("scan")."""

    role: str  # map the image_* arrays describe: "activation", or "preactivation" when there is no a
    image_max: np.ndarray  # (N, C) float32
    image_mean: np.ndarray  # (N, C) float32
    image_zero_fraction: np.ndarray  # (N, C) float32
    image_argmax: np.ndarray  # (N, C, 2) int64: (row, col) of image_max
    preactivation: ChannelSummary
    activation: ChannelSummary | None
    source: str

    @property
    def dead(self) -> np.ndarray:
        """(C,) bool: a is zero everywhere on every image (never for layers without a)."""
        a = self.activation
        if a is None:
            return np.zeros(self.preactivation.min.shape, dtype=bool)
        dead: np.ndarray = (a.min == 0) & (a.max == 0)
        return dead


def layer_stats(group: h5py.Group) -> LayerStats:
    """The statistics of one layer group: its ``stats`` group when present, else a chunked scan."""
    stored = group.get(schema.STATS)
    if stored is None:
        return scan_layer(group)
    has_a = f"{schema.ACTIVATION}_min" in stored

    def channel(role: str) -> ChannelSummary:
        def read(name: str) -> np.ndarray:
            ds = stored.get(f"{role}_{name}")  # 'negatives' may be missing from early files
            return ds[...].astype(np.float64) if ds is not None else np.full(stored["image_max"].shape[1], np.nan)

        return ChannelSummary(*(read(name) for name in CHANNEL_FIELDS))

    role = stored.attrs.get("role", schema.ACTIVATION if has_a else schema.PREACTIVATION)
    return LayerStats(
        role=role.decode() if isinstance(role, bytes) else str(role),
        image_max=stored["image_max"][...],
        image_mean=stored["image_mean"][...],
        image_zero_fraction=stored["image_zero_fraction"][...],
        image_argmax=stored["image_argmax"][...].astype(np.int64),
        preactivation=channel(schema.PREACTIVATION),
        activation=channel(schema.ACTIVATION) if has_a else None,
        source="file",
    )


def blocks(shape: tuple[int, ...], chunks: tuple[int, ...] | None, itemsize: int) -> Iterator[tuple[slice, slice]]:
    """(images, channels) slices covering a map of ``shape``, each about SCAN_BYTES, chunk-aligned."""
    n, c = shape[:2]
    per_channel = int(np.prod(shape[2:], dtype=np.int64)) * itemsize
    if c * per_channel <= SCAN_BYTES:
        n_step, c_step = max(1, SCAN_BYTES // max(1, c * per_channel)), c
    else:
        c_chunk = chunks[1] if chunks else 1
        c_step = max(1, SCAN_BYTES // per_channel)
        c_step = max(c_chunk, c_step - c_step % c_chunk) if c_step >= c_chunk else c_step
        n_step = 1
    for n0 in range(0, n, n_step):
        for c0 in range(0, c, c_step):
            yield slice(n0, min(n, n0 + n_step)), slice(c0, min(c, c0 + c_step))


def scan_layer(group: h5py.Group) -> LayerStats:
    """Compute :class:`LayerStats` from the maps themselves, block by block, with the writer's
    own accumulators (so a scan and write-time statistics agree), over the maps' channel axis."""
    z = group[schema.PREACTIVATION]
    a = group.get(schema.ACTIVATION)
    maps = {schema.PREACTIVATION: z} | ({schema.ACTIVATION: a} if a is not None else {})
    role = schema.ACTIVATION if a is not None else schema.PREACTIVATION
    axes = layer_axes(group)
    order = channels_first_order(axes)
    first = order == list(range(z.ndim))  # channels first as stored: blocks of channels can be read
    n, c = z.shape[0], z.shape[order[1]]
    per_image = {
        "image_max": np.zeros((n, c), dtype=np.float32),
        "image_mean": np.zeros((n, c), dtype=np.float32),
        "image_zero_fraction": np.zeros((n, c), dtype=np.float32),
        "image_argmax": np.zeros((n, c, 2), dtype=np.int64),
    }
    running: dict[tuple[str, int], tuple[slice, ChannelStats]] = {}  # (role, first channel) -> block
    shape = tuple(z.shape[i] for i in order)
    for ns, cs in blocks(shape, z.chunks if first else None, z.dtype.itemsize):
        for name, ds in maps.items():
            block = ds[ns, cs] if first else channels_first(ds[ns], axes)[:, cs]  # (n, c, ...)
            _, acc = running.setdefault((name, cs.start), (cs, ChannelStats.empty(cs.stop - cs.start)))
            acc.update(block)
            if name == role:
                for key, values in image_stats(block).items():
                    per_image[key][ns, cs] = values

    def channel(name: str) -> ChannelSummary:
        parts = [(cs, acc.summary()) for (role_, _), (cs, acc) in sorted(running.items()) if role_ == name]
        merged = {key: np.zeros(c) for key in CHANNEL_FIELDS}
        for cs, summary in parts:
            for key in CHANNEL_FIELDS:
                merged[key][cs] = summary[key]
        return ChannelSummary(*(merged[key] for key in CHANNEL_FIELDS))

    return LayerStats(
        role=role,
        **per_image,
        preactivation=channel(schema.PREACTIVATION),
        activation=channel(schema.ACTIVATION) if a is not None else None,
        source="scan",
    )


def top_images(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``values`` (N,), largest first; ties by index, NaN last."""
    keyed = np.where(np.isnan(values), -np.inf, values.astype(np.float64))
    return np.argsort(-keyed, kind="stable")[:k]


def histogram(ds: h5py.Dataset, lo: float, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the finite values of ``ds`` in ``bins`` equal bins over [lo, hi], read block by block.

    Returns:
        The bin edges (bins + 1,) and counts (bins,) int64; no bins when the range is not finite.
    """
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for ns, cs in blocks(ds.shape, ds.chunks, ds.dtype.itemsize):
        x = ds[ns, cs].ravel()
        counts += np.histogram(x[np.isfinite(x)], bins=edges)[0]
    return edges, counts
