"""Write maps to an fmap HDF5 file (schema in ``schema.py``), batch by batch, atomically.

A new file is built under a hidden temporary name beside OUT, flushed after every batch, and
renamed onto OUT only after ``complete`` is set, so a file at OUT is always finished. An error
removes the temporary file; an interruption (signal) keeps it for ``--resume``. ``--append``
works in place on a finished file with ``complete`` cleared until it is done. Imports only h5py
and numpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..errors import FmapError, StoppedError, first_line
from . import schema
from .chunks import COMPRESSORS, chunk_shape, copy_rows, write_rows
from .stats import SUMMARY, ChannelStats, image_stats

STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class LayerRecord:
    """What the file says about one layer besides its maps."""

    name: str
    type: str
    hyperparameters: dict[str, Any]
    input: str  # nearest upstream stored dataset, or "input" (the image tensor)
    input_via: str  # layers applied between that dataset and this layer, "a -> b"; "" if none
    nonlinearity: str  # "none" when the layer has no nonlinearity
    nonlinearity_params: dict[str, Any]  # e.g. {"negative_slope": 0.1}
    path_to_activation: str  # what lies between z and a, e.g. "bn1 -> add(+maxpool) -> relu"
    a_is_f_of_z: bool  # nothing but f lies between z and a
    output_shape: tuple[int, ...]  # per image: (C, H, W) or (C,)
    receptive_field: tuple[int, int]
    receptive_field_stride: tuple[int, int]
    receptive_field_start: tuple[float, float]
    channel_descriptions: tuple[str, ...] = ()

    @property
    def has_activation(self) -> bool:
        return self.nonlinearity != "none"


Codec = tuple[str | None, int]  # (h5py filter "gzip" / "lzf" / None, gzip level)


@dataclass(frozen=True)
class Storage:
    """How maps are stored: a codec per role, the dtype, and which roles are kept.

    Defaults from ../shared/HDF5-NOTES.md: sparse a compresses 2-3.5x with gzip level 1 (shuffle
    hurts it); dense z gains under 1.2x for about 20x the write time, so it is stored raw.
    """

    preactivation: Codec = (None, 0)
    activation: Codec = ("gzip", 1)
    dtype: str = "float32"  # or "float16"
    roles: frozenset[str] = frozenset({schema.PREACTIVATION, schema.ACTIVATION})

    def describe(self) -> dict[str, Any]:
        """JSON-able, recorded in the file and compared by --append."""
        return {
            "dtype": self.dtype,
            "roles": sorted(self.roles),
            "preactivation": list(self.preactivation),
            "activation": list(self.activation),
        }


@dataclass(frozen=True)
class Batch:
    """One batch for the writer: image records and every layer's maps (float32, on the host)."""

    paths: Sequence[str]
    original_sizes: np.ndarray  # (N, 2)
    sha256: Sequence[str]
    indices: Sequence[int]  # positions in the whole input list
    maps: Mapping[str, tuple[np.ndarray, np.ndarray | None]]  # layer -> (z, a)
    pixels: np.ndarray | None = None  # (N, 3, H, W), stored only with /input


def safe_text(value: str) -> str:
    """Text as valid UTF-8: undecodable bytes from file names or argv (surrogate escapes) become
    backslash escapes, so h5py can store them and every reader can show them."""
    return os.fsencode(value).decode("utf-8", "backslashreplace")


PARTIAL = "partial"


def temporary_path(out: Path) -> Path:
    """A new hidden name to build ``out`` under before it is renamed onto it: process id and a
    random part, so a run never writes over the file of another (or of the run it resumes).

    Long names are shortened so the temporary name still fits the usual 255-byte limit.
    """
    return out.with_name(f".{out.name[:200]}.{os.getpid()}-{secrets.token_hex(3)}.{PARTIAL}")


def partial_files(out: Path) -> list[Path]:
    """Temporary files that runs writing ``out`` left behind, newest first."""
    found = out.parent.glob(f".{out.name[:200]}.*.{PARTIAL}")
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class MapWriter:
    """Context manager that appends batches of maps and makes the file final on success.

    ``mode`` is "new" (a fresh temporary file), "resume" (continue ``resume_from``, a temporary
    file of a killed run) or "append" (add to the finished file at ``out``, in place).

    >>> with MapWriter(out, layers, attrs) as writer:
    ...     writer.append(batch)
    """

    out: Path
    layers: Sequence[LayerRecord]
    attrs: Mapping[str, Any]  # root attributes from the caller (model, versions, preprocessing, ...)
    input_shape: tuple[int, int, int] | None = None  # (3, H, W) to store /input, else None
    storage: Storage = field(default_factory=Storage)
    mode: str = "new"  # or "append": add to the finished file at `out`, in place
    seed: Path | None = None  # a new file starts with the images already in this one
    n_images: int = 0
    _file: h5py.File | None = None
    _path: Path | None = None  # the file being written
    _channel_stats: dict[tuple[str, str], ChannelStats] = field(default_factory=dict)
    _compressors: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(COMPRESSORS, thread_name_prefix="fmap-gzip")
    )

    def __enter__(self) -> MapWriter:
        try:
            if self.mode == "new":
                self._path = temporary_path(self.out)
                self._file = h5py.File(self._path, "w")
                self._create()
                if self.seed is not None:
                    self._seed_from(self.seed)
            else:
                self._path = self.out
                self._file = h5py.File(self._path, "r+")
                self._reopen()
        except BaseException as exc:  # KeyboardInterrupt included: never leave a new temporary file
            self._abandon(remove=self.mode == "new")
            if isinstance(exc, OSError):
                reason = exc.strerror or first_line(exc)
                raise FmapError(f"{self.out}: cannot write output file ({self._path}): {reason}") from None
            raise
        return self

    @property
    def path(self) -> Path:
        """The file being written (temporary name, or OUT when appending)."""
        assert self._path is not None
        return self._path

    # ----------------------------------------------------------------------------- creating
    def _create(self) -> None:
        f = self._file
        assert f is not None
        f.attrs["fmap_schema_version"] = np.int64(schema.SCHEMA_VERSION)
        f.attrs["complete"] = np.int8(0)
        f.attrs["fmap_version"] = __version__
        f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        f.attrs["n_images"] = np.int64(0)
        f.attrs["layers"] = np.array([layer.name for layer in self.layers], dtype=STR)
        f.attrs["glossary"] = schema.GLOSSARY
        f.attrs["pairing_rule"] = schema.PAIRING_RULE
        f.attrs["storage"] = json.dumps(self.storage.describe())
        for key, value in self.attrs.items():
            f.attrs[key] = safe_text(value) if isinstance(value, str) else value
        n_scale = f.create_dataset("N", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        n_scale.make_scale("N")
        images = f.create_group(schema.IMAGES)
        columns = (("path", STR, ()), ("sha256", STR, ()), ("original_size", np.int64, (2,)), ("index", np.int64, ()))
        for name, dtype, shape in columns:
            self._growing(images, name, shape, dtype)
        if self.input_shape is not None:
            _create_scales(f, self.input_shape)
            self._create_map(f, schema.INPUT, self.input_shape, (None, 0))
        layers = f.create_group(schema.LAYERS)
        for layer in self.layers:
            self._create_layer(layers, layer)

    def _growing(self, group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any) -> h5py.Dataset:
        """A dataset along N (resizable, on the N scale) with rows of ``shape``."""
        ds = group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(1024, *shape))
        ds.dims[0].attach_scale(group.file["N"])
        ds.dims[0].label = "N"
        return ds

    def _create_layer(self, parent: h5py.Group, layer: LayerRecord) -> None:
        group = parent.create_group(layer.name)
        group.attrs["type"] = layer.type
        group.attrs["hyperparameters"] = json.dumps(layer.hyperparameters, ensure_ascii=True)
        group.attrs["input"] = layer.input
        group.attrs["input_via"] = layer.input_via
        group.attrs["nonlinearity"] = layer.nonlinearity
        group.attrs["has_activation"] = np.int8(self._stores(layer, schema.ACTIVATION))
        group.attrs["nonlinearity_params"] = json.dumps(layer.nonlinearity_params, ensure_ascii=True)
        group.attrs["path_to_activation"] = layer.path_to_activation
        group.attrs["a_is_f_of_z"] = np.int8(layer.a_is_f_of_z)
        if not layer.has_activation:
            group.attrs["note"] = schema.NO_ACTIVATION_NOTE
        group.attrs["output_shape"] = np.asarray(layer.output_shape, dtype=np.int64)
        group.attrs["receptive_field"] = np.asarray(layer.receptive_field, dtype=np.int64)
        group.attrs["receptive_field_stride"] = np.asarray(layer.receptive_field_stride, dtype=np.int64)
        group.attrs["receptive_field_start"] = np.asarray(layer.receptive_field_start, dtype=np.float64)
        if layer.channel_descriptions:
            group.attrs["channel_descriptions"] = np.array(layer.channel_descriptions, dtype=STR)
        _create_scales(group, layer.output_shape)
        if self._stores(layer, schema.PREACTIVATION):
            z = self._create_map(group, schema.PREACTIVATION, layer.output_shape, self.storage.preactivation)
            z.attrs["role"] = schema.PREACTIVATION
            z.attrs["symbol"] = "z"
            z.attrs["long_name"] = schema.preactivation_long_name(layer.name, layer.nonlinearity)
            z.attrs["description"] = schema.preactivation_description(layer.name, layer.type, layer.nonlinearity)
        if self._stores(layer, schema.ACTIVATION):
            a = self._create_map(group, schema.ACTIVATION, layer.output_shape, self.storage.activation)
            a.attrs["role"] = schema.ACTIVATION
            a.attrs["symbol"] = "a"
            a.attrs["nonlinearity"] = layer.nonlinearity
            a.attrs["also_known_as"] = schema.also_known_as(layer.nonlinearity)
            a.attrs["long_name"] = f"activation a = {layer.nonlinearity}(z) of {layer.name}"
            a.attrs["description"] = schema.activation_description(layer.name, layer.nonlinearity)
        stats = group.create_group(schema.STATS)
        stats.attrs["role"] = schema.ACTIVATION if layer.has_activation else schema.PREACTIVATION
        channels = layer.output_shape[0]
        for name in ("image_max", "image_mean", "image_zero_fraction"):
            self._growing(stats, name, (channels,), np.float32)
        self._growing(stats, "image_argmax", (channels, 2), np.int64)
        for role in self._roles(layer):
            self._channel_stats[(layer.name, role)] = ChannelStats.empty(channels)

    def _stores(self, layer: LayerRecord, role: str) -> bool:
        return role in self.storage.roles and (role == schema.PREACTIVATION or layer.has_activation)

    def _roles(self, layer: LayerRecord) -> list[str]:
        return [schema.PREACTIVATION, schema.ACTIVATION] if layer.has_activation else [schema.PREACTIVATION]

    def _create_map(self, group: h5py.Group, name: str, shape: tuple[int, ...], codec: Codec) -> h5py.Dataset:
        dtype = np.dtype(self.storage.dtype)
        options: dict[str, Any] = {}
        if codec[0] is not None:
            options["compression"] = codec[0]
            if codec[0] == "gzip":
                options["compression_opts"] = codec[1]
        ds = group.create_dataset(
            name,
            shape=(0, *shape),
            maxshape=(None, *shape),
            dtype=dtype,
            chunks=chunk_shape(shape, dtype.itemsize),
            fillvalue=np.nan,
            **options,
        )
        ds.dims[0].attach_scale(group.file["N"])
        for axis, dim in enumerate(schema.DIM_NAMES[: len(shape) + 1]):
            ds.dims[axis].label = dim
            if axis > 0:
                ds.dims[axis].attach_scale(group[dim])
        return ds

    # ----------------------------------------------------------------------------- reopening
    def _reopen(self) -> None:
        """Continue a finished file (--append): cleared ``complete`` until done, statistics restored."""
        f = self._file
        assert f is not None
        self.n_images = int(f.attrs["n_images"])
        # what the file held before, so an interrupted append can be finished by running it again
        base = {"n_inputs": int(f.attrs["n_inputs"]), "input_list_sha256": str(f.attrs["input_list_sha256"])}
        f.attrs["append_base"] = json.dumps(base)
        f.attrs["complete"] = np.int8(0)  # until this run finishes
        for key, value in self.attrs.items():
            if key not in ("created", "command"):
                f.attrs[key] = safe_text(value) if isinstance(value, str) else value
        self._restore_channel_stats(f)
        f.flush()

    def _seed_from(self, source: Path) -> None:
        """Start with the first ``n_images`` images of another file (a killed run's temporary file,
        or a file an interrupted --append left incomplete), copied chunk by chunk.

        The source is only read: HDF5 may crash writing into a file whose writer was killed, while
        everything it flushed reads back intact (../shared/HDF5-NOTES.md section 3).
        """
        f = self._file
        assert f is not None
        with h5py.File(source, "r") as old:
            n = int(old.attrs["n_images"])

            def visit(name: str, dst: Any) -> None:
                growing = isinstance(dst, h5py.Dataset) and dst.maxshape and dst.maxshape[0] is None
                if growing and name in old and not name.startswith("failures/"):
                    dst.resize(n, axis=0)
                    copy_rows(old[name], dst, n)

            f.visititems(visit)
            if "failures" in old:
                self.add_failures(list(zip(old["failures/index"][...].tolist(), old["failures/path"].asstr()[...],
                                           old["failures/reason"].asstr()[...], strict=True)))  # fmt: skip
            self.n_images = n
            f.attrs["n_images"] = np.int64(n)
        self._recount_channel_stats()
        f.flush()

    def _restore_channel_stats(self, f: h5py.File) -> None:
        """Running statistics of a finished file, from its stored per-channel summary."""
        for layer in self.layers:
            stats = f[schema.LAYERS][layer.name][schema.STATS]
            per_image = int(np.prod(layer.output_shape[1:], dtype=np.int64))
            for role in self._roles(layer):
                stored = {name: stats[f"{role}_{name}"][...] for name in SUMMARY if f"{role}_{name}" in stats}
                self._channel_stats[(layer.name, role)] = ChannelStats.restore(stored, self.n_images * per_image)

    def _recount_channel_stats(self) -> None:
        """Running statistics of the seeded images, recomputed from their maps: a killed writer's
        stored summary may already count a batch that its n_images does not."""
        f = self.file()
        for layer in self.layers:
            group = f[schema.LAYERS][layer.name]
            for role in self._roles(layer):
                running = ChannelStats.empty(layer.output_shape[0])
                if role in group:
                    for start in range(0, self.n_images, 64):
                        running.update(group[role][start : start + 64].astype(np.float32))
                self._channel_stats[(layer.name, role)] = running
            if self.n_images:
                self._write_channel_stats(layer, group[schema.STATS])

    # ----------------------------------------------------------------------------- writing
    def append(self, batch: Batch) -> None:
        """Append one batch: image records, maps of every layer, their statistics, and /input."""
        f = self._file
        assert f is not None, "append() outside 'with'"
        start = self.n_images
        stop = start + len(batch.paths)

        def put(ds: h5py.Dataset, values: Any) -> None:
            ds.resize(stop, axis=0)
            ds[start:stop] = values

        put(f["N"], np.arange(start, stop, dtype=np.int64))
        put(f["images/path"], [safe_text(p) for p in batch.paths])
        put(f["images/sha256"], list(batch.sha256))
        put(f["images/original_size"], batch.original_sizes)
        put(f["images/index"], np.asarray(batch.indices, dtype=np.int64))
        if self.input_shape is not None and batch.pixels is not None:
            put(f[schema.INPUT], batch.pixels)
        # Statistics are computed by the pool while this thread writes (numpy lets go of the GIL);
        # each task owns one layer's running statistics.
        pending = {layer.name: self._compressors.submit(self._layer_stats, layer, batch) for layer in self.layers}
        for layer in self.layers:
            z, a = batch.maps[layer.name]
            group = f[schema.LAYERS][layer.name]
            for role, values in ((schema.PREACTIVATION, z), (schema.ACTIVATION, a)):
                if values is not None and self._stores(layer, role):
                    ds = group[role]
                    ds.resize(stop, axis=0)
                    write_rows(ds, start, self._cast(layer.name, values), self._compressors)
        for layer in self.layers:
            stats = f[schema.LAYERS][layer.name][schema.STATS]
            for name, values in pending[layer.name].result().items():
                put(stats[name], values)
            self._write_channel_stats(layer, stats)
        self.n_images = stop
        f.attrs["n_images"] = np.int64(stop)
        f.flush()  # a killed run leaves a readable file holding every finished batch

    def _layer_stats(self, layer: LayerRecord, batch: Batch) -> dict[str, np.ndarray]:
        """Update one layer's running per-channel statistics; return its per-image ones."""
        z, a = batch.maps[layer.name]
        for role, values in ((schema.PREACTIVATION, z), (schema.ACTIVATION, a)):
            if values is not None and role in self._roles(layer):
                self._channel_stats[(layer.name, role)].update(values)
        return image_stats(a if layer.has_activation else z)

    def _cast(self, layer: str, values: np.ndarray) -> np.ndarray:
        if self.storage.dtype != "float16":
            return values
        peak = float(np.max(np.abs(values), initial=0.0))
        if not peak <= FLOAT16_MAX:
            raise FmapError(f"layer '{layer}': values up to {peak:.4g} overflow float16; use --dtype float32")
        return values.astype(np.float16)

    def _write_channel_stats(self, layer: LayerRecord, stats: h5py.Group) -> None:
        for role in self._roles(layer):
            for name, values in self._channel_stats[(layer.name, role)].summary().items():
                key = f"{role}_{name}"
                if key in stats:
                    stats[key][...] = values
                else:
                    stats.create_dataset(key, data=values)

    def add_failures(self, failures: Sequence[tuple[int, str, str]]) -> None:
        """Record images skipped with --skip-bad: (position in the input list, path, reason)."""
        f = self._file
        assert f is not None
        if not failures:
            return
        if "failures" not in f:
            group = f.create_group("failures")
            for name, dtype in (("index", np.int64), ("path", STR), ("reason", STR)):
                group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
        group = f["failures"]
        start = group["index"].shape[0]
        columns = zip(*failures, strict=True)
        for name, values in zip(("index", "path", "reason"), columns, strict=True):
            group[name].resize(start + len(failures), axis=0)
            group[name][start:] = [safe_text(v) if isinstance(v, str) else v for v in values]
        f.flush()

    # ----------------------------------------------------------------------------- finishing
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish()
        elif self.mode == "new" and not self._keep_for_resume(exc):
            self._abandon(remove=True)
        else:  # a resumable temporary file, or a file being appended to: keep what is flushed
            self._abandon(remove=False)

    def _keep_for_resume(self, exc: BaseException | None) -> bool:
        """An interrupted run (signal, Ctrl-C) keeps its temporary file once it holds a batch."""
        return isinstance(exc, StoppedError | KeyboardInterrupt) and self.n_images > 0

    def finish(self) -> None:
        """Mark the file complete, make it durable and, for a new file, rename it onto ``out``."""
        f = self._file
        assert f is not None and self._path is not None
        if self.n_images == 0:
            self._abandon(remove=self.mode == "new")
            raise FmapError(f"{self.out}: no images were written")
        self._compressors.shutdown(wait=True)
        _sort_failures(f)
        try:
            if "append_base" in f.attrs:
                del f.attrs["append_base"]
            f.attrs["complete"] = np.int8(1)
            f.close()
            self._file = None
            with open(self._path, "rb+") as handle:
                os.fsync(handle.fileno())
            if self._path != self.out:
                self._path.replace(self.out)
        except BaseException as exc:
            self._abandon(remove=self._path != self.out)
            if isinstance(exc, OSError):
                raise FmapError(f"{self.out}: cannot move finished file into place: {exc}") from None
            raise
        _fsync_dir(self.out.parent)

    def file(self) -> h5py.File:
        """The open file (for checks that run before it becomes final, e.g. --verify)."""
        assert self._file is not None
        return self._file

    def _abandon(self, remove: bool) -> None:
        self._compressors.shutdown(wait=True)
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        if remove and self._path is not None and self._path != self.out:
            with contextlib.suppress(OSError):  # e.g. never created: the original error is what matters
                self._path.unlink()


def _sort_failures(f: h5py.File) -> None:
    """Order /failures by input position (header failures are found before decode failures)."""
    if "failures" not in f:
        return
    group = f["failures"]
    order = np.argsort(group["index"][...], kind="stable")
    for name in ("index", "path", "reason"):
        group[name][...] = group[name][...][order]


def _create_scales(group: h5py.Group, shape: tuple[int, ...]) -> None:
    """Index datasets C, H, W (as many as ``shape`` has) in ``group``, made dimension scales."""
    for dim, length in zip(schema.DIM_NAMES[1:], shape, strict=False):
        group.create_dataset(dim, data=np.arange(length, dtype=np.int64)).make_scale(dim)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITE_BEHIND = 2  # batches that may wait for the writer thread


class BackgroundWriter:
    """Feeds a MapWriter from a thread, so writing (compression, statistics) overlaps the next
    forward pass; at most ``depth`` batches wait, so memory stays O(batch).

    >>> with BackgroundWriter(writer) as sink:
    ...     sink.append(batch)  # returns once the batch is queued
    """

    def __init__(self, writer: MapWriter, depth: int = WRITE_BEHIND) -> None:
        self.writer = writer
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="fmap-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain: after a failure nothing more is written
            kind, payload = item
            try:
                if kind == "batch":
                    self.writer.append(payload)
                else:
                    self.writer.add_failures(payload)
            except BaseException as exc:  # handed to the main thread, which raises it
                self._error = exc

    def _put(self, item: tuple[str, Any]) -> None:
        self._raise()
        self._queue.put(item)

    def append(self, batch: Batch) -> None:
        """Queue one batch (blocks while ``depth`` batches wait)."""
        self._put(("batch", batch))

    def add_failures(self, failures: Sequence[tuple[int, str, str]]) -> None:
        """Queue failure records (kept in order with the batches)."""
        if failures:
            self._put(("failures", list(failures)))

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        interrupted = isinstance(exc, StoppedError | KeyboardInterrupt)
        if exc_type is not None and not interrupted and self._error is None:
            self._error = StoppedError(0)  # a failed run: nothing more is written; the real error follows
            self._queue.put(None)
            self._thread.join()
            return
        # success, or an interruption: what is queued is finished work, kept for --resume
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise()
        self._error = None
