"""Projection files (``fmap project``): single activations of one channel projected back to the input.

The file is built in memory (projections are K images, never a dataset's worth) and written under
``atomic.py``'s temporary name in one plain write, so a full disk is an ordinary ``OSError``; the
layout goes through ``layout.py`` (only what ``schema.PROJECTION_SCHEMA`` documents). h5py and
numpy only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FmapError, FmapFileError
from ..geometry import Geometry
from . import schema
from .atomic import AtomicOutput
from .chunks import chunk_shape
from .layout import STR, create_dataset, create_group, safe_text, set_attrs, start_file
from .reader import DAMAGED, printable

UNIT = "unit"


@dataclass(frozen=True)
class Projections:
    """K projections of units of one channel, and where each starts (K along every array)."""

    method: str  # a key of schema.PROJECTION_METHODS
    layer: str
    channel: int
    units: str  # "unit" or "whole map" (schema.UNIT_KINDS)
    geometry: Geometry  # of the layer's units
    image: np.ndarray  # (K,) int64: index into the source file
    path: list[str]  # (K,) the image paths as the source file stores them
    row: np.ndarray  # (K,) int64; -1 for a whole map
    col: np.ndarray  # (K,) int64
    value: np.ndarray  # (K,) float32: the activation projected
    projection: np.ndarray  # (K, 3, H, W) float32, the network's input space
    input: np.ndarray  # (K, 3, H, W) float32: each unit's input tensor

    @property
    def description(self) -> str:
        """One sentence for the ``description`` attribute of /projection."""
        start = "one unit" if self.units == "unit" else "the whole map of the channel on one image"
        return (
            f"{self.method} projection of channel {self.channel} of layer '{self.layer}' to the input pixels, "
            f"starting from {start} per row, in the network's input space (before de-normalisation)."
        )


def write_projections(out: Path, projections: Projections, attrs: Mapping[str, Any], overwrite: bool = False) -> None:
    """Write ``projections`` as a projection file at ``out``, atomically.

    Args:
        out: the output path (checked by the caller with ``atomic.check_target`` before any work).
        attrs: root attributes of the model and the source file (see ``schema.PROJECTION_SCHEMA``).
        overwrite: replace ``out`` if it exists.

    Raises:
        FmapError: the file cannot be written (disk full, ...) or ``out`` appeared meanwhile.
    """
    data = _file_image(projections, attrs)
    with AtomicOutput(out, overwrite) as tmp:
        try:
            tmp.path.write_bytes(data)
        except OSError as exc:
            raise FmapError(f"cannot write {out}: {exc.strerror or exc}") from None
        tmp.publish()


def _file_image(p: Projections, attrs: Mapping[str, Any]) -> bytes:
    """The whole HDF5 file, built in memory."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        start_file(f, schema.PROJECTION, **attrs, n_units=len(p.image))
        for name, values in ((schema.PROJECTION, p.projection), (schema.INPUT, p.input)):
            values = np.ascontiguousarray(values, dtype=np.float32)
            chunks = chunk_shape(values.shape[1:], 4) if len(values) else None
            create_dataset(f, name, data=values, chunks=chunks, compression="gzip", compression_opts=1)
        set_attrs(
            f[schema.PROJECTION],
            role=schema.PROJECTION,
            method=p.method,
            rule=f"{schema.PROJECTION_METHODS[p.method]} {schema.PROJECTED_NONLINEARITIES}",
            layer=p.layer,
            channel=p.channel,
            units=p.units,
            receptive_field=p.geometry.field,
            receptive_field_stride=p.geometry.stride,
            receptive_field_start=p.geometry.start,
            description=p.description,
        )
        unit = create_group(f, UNIT)
        create_dataset(unit, "image", data=np.asarray(p.image, dtype=np.int64))
        create_dataset(unit, "path", data=np.array([safe_text(path) for path in p.path], dtype=STR))
        create_dataset(unit, "row", data=np.asarray(p.row, dtype=np.int64))
        create_dataset(unit, "col", data=np.asarray(p.col, dtype=np.int64))
        create_dataset(unit, "value", data=np.asarray(p.value, dtype=np.float32))
        set_attrs(f, complete=1)  # last: the bytes reach disk only under the temporary name
    return buffer.getvalue()


def read_projections(f: h5py.File) -> Projections:
    """The projections of a projection file opened with ``reader.open_fmap`` (which checked its nodes).

    Raises:
        FmapFileError: the datasets do not fit together, or an attribute is not one fmap writes.
    """
    where = printable(str(f.filename))
    ds = f[schema.PROJECTION]
    method, units = _text(ds.attrs.get("method")), _text(ds.attrs.get("units"))
    if method not in schema.PROJECTION_METHODS or units not in schema.UNIT_KINDS:
        raise FmapFileError(f"{where}: {DAMAGED}: /projection has method {method!r} and units {units!r}")
    projection, pixels = ds[...], f[schema.INPUT][...]
    if projection.ndim != 4 or projection.shape[1] != 3 or projection.shape != pixels.shape:
        raise FmapFileError(
            f"{where}: {DAMAGED}: /projection {projection.shape} and /input {pixels.shape} are not both (K, 3, H, W)"
        )
    if int(f.attrs.get("n_units", -1)) != len(projection):
        raise FmapFileError(f"{where}: {DAMAGED}: n_units is not the {len(projection)} projections stored")
    unit = f[UNIT]
    try:
        geometry = Geometry.of(ds)
    except FmapError:  # e.g. an op whose geometry could not be traced: pictures then show whole images
        geometry = Geometry((-1, -1), (-1, -1), (float("nan"), float("nan")))
    return Projections(
        method=method,
        layer=_text(ds.attrs.get("layer")),
        channel=int(ds.attrs.get("channel", -1)),
        units=units,
        geometry=geometry,
        image=unit["image"][...].astype(np.int64),
        path=[str(p) for p in unit["path"].asstr()[...]],
        row=unit["row"][...].astype(np.int64),
        col=unit["col"][...].astype(np.int64),
        value=unit["value"][...].astype(np.float32),
        projection=projection.astype(np.float32),
        input=pixels.astype(np.float32),
    )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
