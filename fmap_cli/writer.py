"""Write maps to an fmap HDF5 file (schema in ``schema.py``), batch by batch, atomically.

The file is built under a hidden temporary name beside OUT, flushed after every batch, and
renamed onto OUT only after ``complete`` is set; any error removes the temporary file, so OUT
is either absent or finished. Imports only h5py and numpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from . import __version__, schema
from .errors import FmapError, first_line

CHUNK_BYTES = 1 << 20  # one image x a block of channels, at most 1 MiB (../shared/HDF5-NOTES.md)
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


@dataclass(frozen=True)
class Storage:
    """Compression per role: an h5py filter name ("gzip", "lzf") or None, and the gzip level."""

    preactivation: str | None = None
    activation: str | None = "gzip"
    level: int = 1
    dtype: str = "float32"


def safe_text(value: str) -> str:
    """Text as valid UTF-8: undecodable bytes from file names or argv (surrogate escapes) become
    backslash escapes, so h5py can store them and every reader can show them."""
    return os.fsencode(value).decode("utf-8", "backslashreplace")


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk of one image x a block of channels, at most CHUNK_BYTES.

    Channels are halved first; a single channel larger than the limit is split into row blocks.
    """
    block = list(shape)  # one image's (C, H, W) or (C,)
    axis = 0
    while axis < len(block) and block[axis] > 1 and int(np.prod(block)) * itemsize > CHUNK_BYTES:
        block[axis] = (block[axis] + 1) // 2
        if block[axis] == 1:
            axis += 1
    return (1, *block)


def temporary_path(out: Path) -> Path:
    """The hidden name a file is built under before it is renamed onto ``out``.

    Long names are shortened so the temporary name still fits the usual 255-byte limit.
    """
    return out.with_name(f".{out.name[:200]}.{os.getpid()}.partial")


@dataclass
class MapWriter:
    """Context manager that appends batches of maps and renames the file into place on success.

    >>> with MapWriter(out, layers, attrs) as writer:
    ...     writer.append(paths, sizes, sha256, {"conv1": (z, a)})
    """

    out: Path
    layers: Sequence[LayerRecord]
    attrs: Mapping[str, Any]  # root attributes from the caller (model, versions, preprocessing, ...)
    input_shape: tuple[int, int, int] | None = None  # (3, H, W) to store /input, else None
    storage: Storage = field(default_factory=Storage)
    overwrite: bool = False
    n_images: int = 0
    _file: h5py.File | None = None

    @property
    def tmp(self) -> Path:
        return temporary_path(self.out)

    def __enter__(self) -> MapWriter:
        if self.out.exists() and not self.overwrite:
            raise FmapError(f"{self.out}: already exists; pass --overwrite to replace it")
        if not self.out.parent.is_dir():
            raise FmapError(f"{self.out}: directory {self.out.parent} does not exist")
        try:
            self._file = h5py.File(self.tmp, "w")
            self._create()
        except BaseException as exc:  # KeyboardInterrupt included: never leave the temporary file
            self._discard()
            if isinstance(exc, OSError):
                reason = exc.strerror or first_line(exc)
                raise FmapError(
                    f"{self.out}: cannot create output file beside it ({self.tmp.name}): {reason}"
                ) from None
            raise
        return self

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
        for key, value in self.attrs.items():
            f.attrs[key] = safe_text(value) if isinstance(value, str) else value
        n_scale = f.create_dataset("N", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
        n_scale.make_scale("N")
        images = f.create_group(schema.IMAGES)
        columns = (("path", STR, ()), ("sha256", STR, ()), ("original_size", np.int64, (2,)), ("index", np.int64, ()))
        for name, dtype, shape in columns:
            ds = images.create_dataset(
                name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(1024, *shape)
            )
            ds.dims[0].attach_scale(n_scale)
            ds.dims[0].label = "N"
        if self.input_shape is not None:
            _create_scales(f, self.input_shape)
            self._create_map(f, schema.INPUT, self.input_shape, None)
        layers = f.create_group(schema.LAYERS)
        for layer in self.layers:
            self._create_layer(layers, layer)

    def _create_layer(self, parent: h5py.Group, layer: LayerRecord) -> None:
        group = parent.create_group(layer.name)
        group.attrs["type"] = layer.type
        group.attrs["hyperparameters"] = json.dumps(layer.hyperparameters, ensure_ascii=True)
        group.attrs["input"] = layer.input
        group.attrs["input_via"] = layer.input_via
        group.attrs["nonlinearity"] = layer.nonlinearity
        group.attrs["has_activation"] = np.int8(layer.has_activation)
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
        z = self._create_map(group, schema.PREACTIVATION, layer.output_shape, self.storage.preactivation)
        z.attrs["role"] = schema.PREACTIVATION
        z.attrs["symbol"] = "z"
        z.attrs["long_name"] = schema.preactivation_long_name(layer.name, layer.nonlinearity)
        z.attrs["description"] = schema.preactivation_description(layer.name, layer.type, layer.nonlinearity)
        if layer.has_activation:
            a = self._create_map(group, schema.ACTIVATION, layer.output_shape, self.storage.activation)
            a.attrs["role"] = schema.ACTIVATION
            a.attrs["symbol"] = "a"
            a.attrs["nonlinearity"] = layer.nonlinearity
            a.attrs["also_known_as"] = schema.also_known_as(layer.nonlinearity)
            a.attrs["long_name"] = f"activation a = {layer.nonlinearity}(z) of {layer.name}"
            a.attrs["description"] = schema.activation_description(layer.name, layer.nonlinearity)

    def _create_map(
        self, group: h5py.Group, name: str, shape: tuple[int, ...], compression: str | None
    ) -> h5py.Dataset:
        dtype = np.dtype(self.storage.dtype)
        chunks = chunk_shape(shape, dtype.itemsize)
        options: dict[str, Any] = {}
        if compression is not None:
            options["compression"] = compression
            if compression == "gzip":
                options["compression_opts"] = self.storage.level
        ds = group.create_dataset(
            name,
            shape=(0, *shape),
            maxshape=(None, *shape),
            dtype=dtype,
            chunks=chunks,
            fillvalue=np.nan,
            **options,
        )
        f = group.file
        ds.dims[0].attach_scale(f["N"])
        for axis, dim in enumerate(schema.DIM_NAMES[: len(shape) + 1]):
            ds.dims[axis].label = dim
            if axis > 0:
                ds.dims[axis].attach_scale(group[dim])
        return ds

    def append(
        self,
        paths: Sequence[str],
        original_sizes: np.ndarray,
        sha256: Sequence[str],
        maps: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
        pixels: np.ndarray | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        """Append one batch: image records, every layer's (z, a) and, if stored, the input tensor.

        ``indices`` are the images' positions in the whole input list (default: consecutive).
        """
        f = self._file
        assert f is not None, "append() outside 'with'"
        start, count = self.n_images, len(paths)
        stop = start + count

        def put(ds: h5py.Dataset, values: Any) -> None:
            ds.resize(stop, axis=0)
            ds[start:stop] = values

        put(f["N"], np.arange(start, stop, dtype=np.int64))
        put(f["images/path"], [safe_text(p) for p in paths])
        put(f["images/sha256"], list(sha256))
        put(f["images/original_size"], original_sizes)
        put(f["images/index"], np.arange(start, stop) if indices is None else np.asarray(indices, dtype=np.int64))
        if self.input_shape is not None and pixels is not None:
            put(f[schema.INPUT], pixels)
        for layer in self.layers:
            z, a = maps[layer.name]
            group = f[schema.LAYERS][layer.name]
            put(group[schema.PREACTIVATION], z)
            if layer.has_activation:
                put(group[schema.ACTIVATION], a)
        self.n_images = stop
        f.attrs["n_images"] = np.int64(stop)
        f.flush()  # a killed run leaves a readable temporary file holding every finished batch

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        self.finish()

    def finish(self) -> None:
        """Mark the file complete, make it durable and rename it onto ``out``."""
        f = self._file
        assert f is not None
        if self.n_images == 0:
            self._discard()
            raise FmapError(f"{self.out}: no images were written")
        try:
            f.attrs["complete"] = np.int8(1)
            f.close()
            self._file = None
            with open(self.tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            self.tmp.replace(self.out)
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError):
                raise FmapError(f"{self.out}: cannot move finished file into place: {exc}") from None
            raise
        _fsync_dir(self.out.parent)

    def file(self) -> h5py.File:
        """The open temporary file (for checks that run before the rename, e.g. --verify)."""
        assert self._file is not None
        return self._file

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        with contextlib.suppress(OSError):  # e.g. never created: the original error is what matters
            self.tmp.unlink()


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
