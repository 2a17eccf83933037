"""Appending rows to an open fmap file: a batch's image records, maps and statistics, failure
records, and the rows copied from another file when a run is seeded. h5py and numpy only.

Map chunks are compressed in a thread pool (ISA-L, else zlib: ``chunks.write_rows``) and written
as stored bytes; per-image statistics are computed in the same pool while this thread writes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from ..errors import FmapError
from . import schema
from .axes import channels_first, joined, layer_axes
from .chunks import COMPRESSORS, copy_rows, write_rows
from .layout import STR, LayerRecord, Storage, create_dataset, create_group, safe_text
from .stats import ChannelStats, image_stats

FLOAT16_MAX = float(np.finfo(np.float16).max)
Failure = tuple[int, str, str]  # (position in the input list, path, reason)


@dataclass(frozen=True)
class Batch:
    """One batch for the writer: image records and every layer's maps (float32, on the host)."""

    paths: Sequence[str]
    original_sizes: np.ndarray  # (N, 2)
    sha256: Sequence[str]
    indices: Sequence[int]  # positions in the whole input list
    maps: Mapping[str, tuple[np.ndarray | None, np.ndarray | None]]  # layer -> (z, a)
    pixels: np.ndarray | None = None  # (N, 3, H, W), stored only with /input


class RowWriter:
    """Appends rows to an open fmap file and keeps its running per-channel statistics.

    Args:
        f: the file, open for writing, with its layout already created.
        layers: its stored layers.
        storage: how maps are stored.
        n_images: rows already in the file.
        stats: running statistics per (layer, role) of those rows.
        keep: objects to keep open until :meth:`close` (see ``layout.create_layout``).
    """

    def __init__(
        self,
        f: h5py.File,
        layers: Sequence[LayerRecord],
        storage: Storage,
        n_images: int = 0,
        stats: dict[tuple[str, str], ChannelStats] | None = None,
        keep: Sequence[Any] = (),
    ) -> None:
        self.f = f
        self.layers = list(layers)
        self.storage = storage
        self.n_images = n_images
        self.stats = stats or {
            (layer.name, role): ChannelStats.empty(layer.channels) for layer in layers for role in layer.roles
        }
        self._pool = ThreadPoolExecutor(COMPRESSORS, thread_name_prefix="fmap-gzip")
        # Datasets stay open while writing: closing one flushes its chunk cache, and a write that
        # fails there (disk full) is one h5py can only print, never raise.
        self._open: dict[str, h5py.Dataset] = {
            obj.name.lstrip("/"): obj for obj in keep if isinstance(obj, h5py.Dataset)
        }
        self._keep = list(keep)

    def _ds(self, path: str) -> h5py.Dataset:
        if path not in self._open:
            self._open[path] = self.f[path]
        return self._open[path]

    def close(self) -> None:
        """Stop the compression threads (the file stays open, its datasets are let go)."""
        self._pool.shutdown(wait=True)
        self._open.clear()
        self._keep.clear()

    def append(self, batch: Batch) -> None:
        """Append one batch: image records, maps of every layer, their statistics, and /input;
        then flush, so a killed run leaves a readable file holding every finished batch."""
        f = self.f
        start = self.n_images
        stop = start + len(batch.paths)

        def put(ds: h5py.Dataset, values: Any) -> None:
            ds.resize(stop, axis=0)
            ds[start:stop] = values

        put(self._ds("N"), np.arange(start, stop, dtype=np.int64))
        put(self._ds("images/path"), [safe_text(p) for p in batch.paths])
        put(self._ds("images/sha256"), list(batch.sha256))
        put(self._ds("images/original_size"), batch.original_sizes)
        put(self._ds("images/index"), np.asarray(batch.indices, dtype=np.int64))
        if schema.INPUT in f and batch.pixels is not None:
            put(self._ds(schema.INPUT), batch.pixels)
        # each task owns one layer's running statistics
        pending = {layer.name: self._pool.submit(self._layer_stats, layer, batch) for layer in self.layers}
        for layer in self.layers:
            for role, values in zip((schema.PREACTIVATION, schema.ACTIVATION), batch.maps[layer.name], strict=True):
                if values is not None and self.storage.stores(layer, role):
                    ds = self._ds(f"{schema.LAYERS}/{layer.name}/{role}")
                    ds.resize(stop, axis=0)
                    write_rows(ds, start, self._cast(layer.name, values), self._pool)
        for layer in self.layers:
            for name, values in pending[layer.name].result().items():
                put(self._ds(f"{schema.LAYERS}/{layer.name}/{schema.STATS}/{name}"), values)
            self._write_channel_stats(layer)
        self.n_images = stop
        f.attrs["n_images"] = np.int64(stop)
        f.flush()

    def _layer_stats(self, layer: LayerRecord, batch: Batch) -> dict[str, np.ndarray]:
        """Update one layer's running per-channel statistics; return its per-image ones (both over
        the channel axis, wherever the maps' axes put it)."""
        z, a = batch.maps[layer.name]
        for role, values in ((schema.PREACTIVATION, z), (schema.ACTIVATION, a)):
            if values is not None and role in layer.roles:
                self.stats[(layer.name, role)].update(channels_first(values, layer.map_axes))
        described = a if layer.has_activation else z
        assert described is not None, "capture returns the map the statistics describe"
        return image_stats(channels_first(described, layer.map_axes))

    def _cast(self, layer: str, values: np.ndarray) -> np.ndarray:
        if self.storage.dtype != "float16":
            return values
        peak = float(np.max(np.abs(values), initial=0.0))
        if not peak <= FLOAT16_MAX:
            raise FmapError(f"layer '{layer}': values up to {peak:.4g} overflow float16; use --dtype float32")
        return values.astype(np.float16)

    def _write_channel_stats(self, layer: LayerRecord) -> None:
        stats = f"{schema.LAYERS}/{layer.name}/{schema.STATS}"
        for role in layer.roles:
            for name, values in self.stats[(layer.name, role)].summary().items():
                key = f"{stats}/{role}_{name}"
                if key in self.f:
                    self._ds(key)[...] = values
                else:
                    self._open[key] = create_dataset(
                        self.f[stats], f"{role}_{name}", self._keep, data=values.astype(np.float32)
                    )

    def add_failures(self, failures: Sequence[Failure]) -> None:
        """Record images skipped with --skip-bad: (position in the input list, path, reason)."""
        if not failures:
            return
        if schema.FAILURES not in self.f:
            group = create_group(self.f, schema.FAILURES, self._keep)
            for name, dtype in (("index", np.int64), ("path", STR), ("reason", STR)):
                ds = create_dataset(group, name, self._keep, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
                self._open[ds.name.lstrip("/")] = ds
        start = self._ds(f"{schema.FAILURES}/index").shape[0]
        columns = zip(*failures, strict=True)
        for name, values in zip(("index", "path", "reason"), columns, strict=True):
            ds = self._ds(f"{schema.FAILURES}/{name}")
            ds.resize(start + len(failures), axis=0)
            ds[start:] = [safe_text(v) if isinstance(v, str) else v for v in values]
        self.f.flush()

    def sort_failures(self) -> None:
        """Order /failures by input position (header failures are found before decode failures)."""
        if schema.FAILURES not in self.f:
            return
        group = self.f[schema.FAILURES]
        order = np.argsort(group["index"][...], kind="stable")
        for name in ("index", "path", "reason"):
            group[name][...] = group[name][...][order]

    def seed_from(self, old: h5py.File, stats: dict[tuple[str, str], ChannelStats] | None = None) -> None:
        """Start with the first ``n_images`` images of another file (a killed run's temporary file,
        or OUT when appending), copied chunk by chunk, and its failures.

        ``stats``: the running statistics of those images (:func:`stored_stats` of a finished
        file); None counts them again from the maps, as a killed writer's stored summary may
        already count a batch that its n_images does not.

        The source is only read: HDF5 may crash writing into a file whose writer was killed, while
        everything it flushed reads back intact (../shared/HDF5-NOTES.md section 3).
        """
        n = int(old.attrs["n_images"])
        for layer in self.layers:  # maps are only continued along the axes they were written with
            group = old[schema.LAYERS][layer.name]
            try:
                theirs = layer_axes(group)
            except ValueError as exc:
                raise FmapError(f"{old.filename}: damaged fmap file: {exc}") from None
            if theirs != layer.map_axes:
                raise FmapError(
                    f"{old.filename}: layer '{layer.name}' has maps with axes {joined(theirs)}, this run's are "
                    f"{joined(layer.map_axes)}; write a new file instead"
                )

        def visit(name: str, dst: Any) -> None:
            growing = isinstance(dst, h5py.Dataset) and dst.maxshape and dst.maxshape[0] is None
            if growing and name in old and not name.startswith(f"{schema.FAILURES}/"):
                dst.resize(n, axis=0)
                copy_rows(old[name], dst, n)

        self.f.visititems(visit)
        if schema.FAILURES in old:
            group = old[schema.FAILURES]
            columns = (group["index"][...].tolist(), group["path"].asstr()[...], group["reason"].asstr()[...])
            self.add_failures(list(zip(*columns, strict=True)))
        self.n_images = n
        self.f.attrs["n_images"] = np.int64(n)
        if stats is None:
            self._recount_stats()
        else:
            self.stats = stats
            for layer in self.layers:
                self._write_channel_stats(layer)
        self.f.flush()

    def _recount_stats(self) -> None:
        """Running statistics of the seeded images, recomputed from their maps."""
        for layer in self.layers:
            group = self.f[schema.LAYERS][layer.name]
            for role in layer.roles:
                running = ChannelStats.empty(layer.channels)
                if role in group:
                    for start in range(0, self.n_images, 64):
                        block = group[role][start : start + 64].astype(np.float32)
                        running.update(channels_first(block, layer.map_axes))
                self.stats[(layer.name, role)] = running
            if self.n_images:
                self._write_channel_stats(layer)


def stored_stats(f: h5py.File, layers: Sequence[LayerRecord]) -> dict[tuple[str, str], ChannelStats]:
    """Running statistics of a finished file, from its stored per-channel summary.

    Raises:
        FmapError: a layer without stored statistics (the file cannot be continued).
    """
    n_images = int(f.attrs["n_images"])
    found = {}
    for layer in layers:
        stats = f[schema.LAYERS][layer.name].get(schema.STATS, {})
        per_image = int(np.prod(layer.output_shape, dtype=np.int64)) // layer.channels  # values per channel
        for role in layer.roles:
            keys = {name: f"{role}_{name}" for name in schema.CHANNEL_STATS}
            stored = {name: stats[key][...] for name, key in keys.items() if key in stats}
            if not {"min", "max", "mean", "std"} <= stored.keys():
                raise FmapError(f"{f.filename}: layer '{layer.name}' has no stored statistics of {role}")
            found[(layer.name, role)] = ChannelStats.restore(stored, n_images * per_image)
    return found
