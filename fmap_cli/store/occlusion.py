"""Occlusion files (``fmap occlude``): written image by image, read back for ``inspect`` and ``render``.

The layout is ``schema.OCCLUSION_SCHEMA``, created through ``layout.py``'s checked helpers (nothing
the schema does not document); the image records, ``/input`` and ``/failures`` are written by the
same ``RowWriter`` as in maps files. The file is built under ``atomic.py``'s locked temporary name,
flushed after every image and published only when complete; a failed write (disk full) is one
error and removes it. An interrupted run leaves nothing: occlusion has no ``--resume``. h5py and
numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FmapFileError
from . import schema
from .atomic import AtomicOutput
from .layout import STR, Storage, create_dataset, create_group, create_images, growing, safe_text, set_attrs, start_file
from .reader import DAMAGED, printable
from .rows import Batch, RowWriter
from .writer import FileWriter, WriteGuard

GROUP = schema.OCCLUSION
ACTIVITY, CHANNEL, BASELINE = "activity", "channel", "baseline"
PROBABILITY, LABEL, CLASS = "probability", "label", "class"
CLASS_PROBABILITY, TOP_CLASS, CLASS_NAMES = "class_probability", "top_class", "class_names"


@dataclass(frozen=True)
class OcclusionLayout:
    """What every image of an occlusion file shares, fixed before the first image is written."""

    y: np.ndarray  # (Gy,) int64: top-left rows of the occluder positions
    x: np.ndarray  # (Gx,) int64: top-left columns
    channels: int = 0  # channels of L recorded per image; 0 without --layer
    role: str = schema.ACTIVATION  # the map summed: activation, or preactivation when L has no a
    classes: int = 0  # K class scores; 0 without class maps
    class_names: Sequence[str] | None = None  # K names, when the model has them
    input_shape: tuple[int, int, int] | None = None  # (3, H, W) with --save-input


@dataclass(frozen=True)
class OcclusionRow:
    """One image's results, and the records every fmap file keeps about an image."""

    path: str
    original_size: tuple[int, int]  # (H, W) before preprocessing
    sha256: str
    index: int  # position in the whole input list
    pixels: np.ndarray | None = None  # (3, H, W) float32, the unoccluded input (--save-input)
    activity: np.ndarray | None = None  # (n_channels, Gy, Gx): total activation per position
    channel: np.ndarray | None = None  # (n_channels,) int64
    baseline: np.ndarray | None = None  # (n_channels,): totals on the unoccluded image
    probability: np.ndarray | None = None  # (Gy, Gx): probability of ``target``
    label: np.ndarray | None = None  # (Gy, Gx) int64: top-1 class
    target: int = -1  # the class of ``probability``
    target_probability: float = float("nan")  # its probability on the unoccluded image
    top_class: int = -1  # top-1 class of the unoccluded image


def _describe(ds: h5py.HLObject, **extra: Any) -> None:
    """The schema's own description of a node, stored on it (a reader needs nothing else)."""
    set_attrs(ds, description=schema.node_for(ds.name, GROUP).description, **extra)


def _create(f: h5py.File, layout: OcclusionLayout, attrs: Mapping[str, Any]) -> list[Any]:
    """Every node of an empty occlusion file (``complete`` = 0); returns them, to keep open."""
    start_file(f, GROUP, n_images=0)
    set_attrs(f, **attrs)
    keep: list[Any] = []
    create_images(f, keep)
    if layout.input_shape is not None:
        pixels = growing(f, schema.INPUT, layout.input_shape, np.float32, keep)
        set_attrs(pixels, axes=",".join(schema.DIM_NAMES))
        for dim_index, (dim, length) in enumerate(zip(schema.DIM_NAMES[1:], layout.input_shape, strict=True), 1):
            scale = create_dataset(f, dim, keep, data=np.arange(length, dtype=np.int64))
            scale.make_scale(dim)
            pixels.dims[dim_index].attach_scale(scale)
            pixels.dims[dim_index].label = dim
    group = create_group(f, GROUP, keep)
    set_attrs(group, description=schema.OCCLUSION_METHOD)
    for axis, values in (("y", layout.y), ("x", layout.x)):
        scale = create_dataset(group, axis, keep, data=np.asarray(values, dtype=np.int64))
        scale.make_scale(axis)
        _describe(scale)
    grid = (len(layout.y), len(layout.x))
    if layout.channels:
        activity = growing(group, ACTIVITY, (layout.channels, *grid), np.float32, keep)
        _describe(activity, role=layout.role)
        _attach_grid(activity, group, first=2)
        activity.dims[1].label = "channel"
        for name, dtype in ((CHANNEL, np.int64), (BASELINE, np.float32)):
            ds = growing(group, name, (layout.channels,), dtype, keep)
            ds.dims[1].label = "channel"
            _describe(ds)
    if layout.classes:
        for name, dtype in ((PROBABILITY, np.float32), (LABEL, np.int64)):
            ds = growing(group, name, grid, dtype, keep)
            _attach_grid(ds, group, first=1)
            _describe(ds)
        for name, dtype in ((CLASS, np.int64), (CLASS_PROBABILITY, np.float32), (TOP_CLASS, np.int64)):
            _describe(growing(group, name, (), dtype, keep))
        if layout.class_names is not None:
            names = np.array([safe_text(n) for n in layout.class_names], dtype=STR)
            _describe(create_dataset(group, CLASS_NAMES, keep, data=names))
    return keep


def _attach_grid(ds: h5py.Dataset, group: h5py.Group, first: int) -> None:
    for axis, name in enumerate(("y", "x"), start=first):
        ds.dims[axis].attach_scale(group[name])
        ds.dims[axis].label = name


class OcclusionWriter(FileWriter):
    """Writes an occlusion file image by image; publishes it when the ``with`` block succeeds.

    >>> with OcclusionWriter.create(out, layout, attrs) as writer:
    ...     writer.append(row)
    """

    def __init__(self, rows: RowWriter, guard: WriteGuard, output: AtomicOutput, layout: OcclusionLayout) -> None:
        super().__init__(rows, guard, output)
        self.layout = layout

    @classmethod
    def create(
        cls, out: Path, layout: OcclusionLayout, attrs: Mapping[str, Any], overwrite: bool = False
    ) -> OcclusionWriter:
        """A new file under a temporary name beside ``out``.

        Args:
            attrs: root attributes (model, preprocessing, input list, occluder: schema.OCCLUSION_SCHEMA).

        Raises:
            FmapError: the temporary file cannot be written.
        """
        build = lambda f: RowWriter(f, [], Storage(), keep=_create(f, layout, attrs))  # noqa: E731
        return cls(*cls._open(out, overwrite, build), layout)

    def append(self, row: OcclusionRow) -> None:
        """Write one image's results and records, then flush.

        Raises:
            FmapError: the disk is full, or another write error.
        """
        self._guarded(lambda: self._write(row))

    def _write(self, row: OcclusionRow) -> None:
        group = self.rows.f[GROUP]
        n = self.rows.n_images
        values: dict[str, Any] = {}
        if self.layout.channels:
            values |= {ACTIVITY: row.activity, CHANNEL: row.channel, BASELINE: row.baseline}
        if self.layout.classes:
            values |= {PROBABILITY: row.probability, LABEL: row.label, CLASS: row.target,
                       CLASS_PROBABILITY: row.target_probability, TOP_CLASS: row.top_class}  # fmt: skip
        for name, value in values.items():
            ds = group[name]
            ds.resize(n + 1, axis=0)
            ds[n] = value
        # the records last: RowWriter.append sets n_images and flushes, so a row counts once complete
        pixels = None if row.pixels is None else row.pixels[None]  # (1, 3, H, W)
        size = np.asarray([row.original_size], dtype=np.int64)
        self.rows.append(Batch([row.path], size, [row.sha256], [row.index], {}, pixels))


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class OcclusionImage:
    """One image of an occlusion file, as ``inspect`` and ``render`` use it."""

    index: int
    path: str
    y: np.ndarray  # (Gy,) top-left rows
    x: np.ndarray  # (Gx,)
    patch: tuple[int, int]
    channel: np.ndarray | None  # (n_channels,)
    baseline: np.ndarray | None  # (n_channels,)
    activity: np.ndarray | None  # (n_channels, Gy, Gx)
    target: int | None
    target_probability: float | None
    top_class: int | None
    probability: np.ndarray | None  # (Gy, Gx)
    label: np.ndarray | None  # (Gy, Gx)
    class_names: list[str] | None

    def class_name(self, k: int) -> str:
        """``k``, with its name when the file has one."""
        if self.class_names is not None and 0 <= k < len(self.class_names):
            return f"{k} '{self.class_names[k]}'"
        return str(k)


def read_image(f: h5py.File, n: int) -> OcclusionImage:
    """Image ``n`` of an occlusion file opened with ``reader.open_fmap`` (rows already checked).

    Raises:
        FmapFileError: the grid or the per-image datasets do not fit together (damage).
    """
    group = f[GROUP]
    y, x = group["y"][...].astype(np.int64), group["x"][...].astype(np.int64)
    grid = (len(y), len(x))

    def row(name: str) -> np.ndarray | None:
        if name not in group:
            return None
        value: np.ndarray = group[name][n]
        return value

    activity, probability, label = row(ACTIVITY), row(PROBABILITY), row(LABEL)
    for name, values in ((ACTIVITY, activity), (PROBABILITY, probability), (LABEL, label)):
        if values is not None and values.shape[-2:] != grid:
            raise FmapFileError(printable(f"{f.filename}: {DAMAGED}: /{GROUP}/{name} does not match /{GROUP}/y, x"))
    names = group[CLASS_NAMES].asstr()[...].tolist() if CLASS_NAMES in group else None
    target, top = row(CLASS), row(TOP_CLASS)
    chance = row(CLASS_PROBABILITY)
    return OcclusionImage(
        index=n,
        path=f[schema.IMAGES]["path"].asstr()[n],
        y=y,
        x=x,
        patch=(int(f.attrs["patch"][0]), int(f.attrs["patch"][1])),
        channel=row(CHANNEL),
        baseline=row(BASELINE),
        activity=activity,
        target=None if target is None else int(target),
        target_probability=None if chance is None else float(chance),
        top_class=None if top is None else int(top),
        probability=probability,
        label=label,
        class_names=names,
    )
