"""Opening fmap files for reading: the one place that checks a file is a complete fmap file of a
schema version this fmap reads, and that finds a stored layer or channel. h5py and numpy only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FmapError, FmapFileError, UnknownLayerError, UsageError, did_you_mean, first_line
from . import schema


@contextmanager
def open_fmap(path: str | Path, missing_sources_ok: bool = False) -> Iterator[h5py.File]:
    """Open a complete fmap file for reading.

    Args:
        path: the file.
        missing_sources_ok: open a virtual (merged) file even when shard files it reads from are
            gone (their rows read as NaN); ``inspect`` does, to report them.

    Raises:
        FmapFileError: missing, not HDF5, not written by fmap, incomplete, a newer schema, or
            a virtual file whose source files are missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FmapFileError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise FmapFileError(f"{path}: not an HDF5 file (or it is corrupt)") from None
    try:
        version = f.attrs.get("fmap_schema_version")
        if version is None:
            raise FmapFileError(f"{path}: an HDF5 file, but not written by fmap (no fmap_schema_version)")
        if not isinstance(version, int | np.integer):
            raise FmapFileError(f"{path}: damaged fmap file: fmap_schema_version is {version!r}, not an integer")
        if int(version) > schema.SCHEMA_VERSION:
            raise FmapFileError(
                f"{path}: schema version {int(version)} is newer than this fmap reads "
                f"({schema.SCHEMA_VERSION}); upgrade fmap"
            )
        if int(f.attrs.get("complete", 0)) != 1:
            raise FmapFileError(
                f"{path}: incomplete file (complete=0): the run writing it did not finish; "
                "rerun that command (with --resume, or --append if it was appending)"
            )
        gone = missing_sources(f) if int(f.attrs.get("virtual", 0)) else []
        if gone and not missing_sources_ok:
            raise FmapFileError(
                f"{path}: virtual file whose source files are missing: {', '.join(gone)}; "
                "their images would read as NaN (put the shards back beside it)"
            )
        yield f
    finally:
        f.close()


@contextmanager
def reading(path: str | Path, missing_sources_ok: bool = False) -> Iterator[h5py.File]:
    """:func:`open_fmap`, turning any inconsistency inside the file into a one-line FmapFileError."""
    with open_fmap(path, missing_sources_ok) as f:
        try:
            yield f
        except FmapError:
            raise
        except Exception as exc:  # any inconsistency in a file claiming to be fmap's is damage
            raise FmapFileError(f"{path}: damaged fmap file: {type(exc).__name__}: {first_line(exc)}") from None


def layer_group(f: h5py.File, layer: str) -> h5py.Group:
    """The group of a stored layer.

    Raises:
        UnknownLayerError: not stored in this file; the message lists the stored layers.
    """
    stored = list(f[schema.LAYERS])
    if layer not in stored:
        raise UnknownLayerError(
            f"layer '{layer}' not in {f.filename}; {did_you_mean(layer, stored)}stored layers: {', '.join(stored)}"
        )
    return f[schema.LAYERS][layer]


def check_channel(group: h5py.Group, channel: int) -> None:
    """Raise UsageError unless ``channel`` is one of the layer's channels."""
    count = int(group.attrs["output_shape"][0])
    if not 0 <= channel < count:
        name = group.name.rsplit("/", 1)[-1]
        raise UsageError(f"channel {channel} out of range: layer '{name}' has channels 0..{count - 1}")

def missing_sources(f: h5py.File) -> list[str]:
    """Source files of ``f``'s virtual datasets that are missing or unreadable, as stored
    (relative to ``f``'s directory); HDF5 reads their rows as fill values (NaN maps) silently."""
    names: set[str] = set()

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            names.update(source.file_name for source in obj.virtual_sources())

    f.visititems(visit)
    base = Path(f.filename).resolve().parent
    return sorted(name for name in names if name != "." and not _readable(base / name))


def _readable(path: Path) -> bool:
    try:
        return path.is_file() and h5py.is_hdf5(path)
    except OSError:
        return False
