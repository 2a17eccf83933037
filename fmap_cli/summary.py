"""Read an fmap HDF5 file and summarise it (``fmap inspect``), chunk by chunk, without torch.

Memory stays at one chunk (at most about 1 MiB) whatever the file's size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import schema
from .errors import FmapFileError, first_line


@dataclass
class RoleStats:
    """Value statistics of one map dataset over every image."""

    min: float
    max: float
    mean: float
    fraction: float  # of zeros for a, of negatives for z
    fraction_of: str  # "zeros" or "negatives"


@dataclass
class LayerSummary:
    """One stored layer: shape, storage and statistics of z and a."""

    name: str
    type: str
    nonlinearity: str
    input: str
    input_via: str
    shape: list[int]
    dtype: str
    bytes_on_disk: int
    bytes_raw: int
    preactivation: RoleStats
    activation: RoleStats | None
    dead_channels: list[int] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_raw / self.bytes_on_disk if self.bytes_on_disk else float("nan")


@dataclass
class FileSummary:
    """What ``fmap inspect`` reports."""

    path: str
    schema_version: int
    fmap_version: str
    created: str
    model_name: str
    model_source: str
    device: str
    n_images: int
    images: list[dict[str, Any]]
    input_saved: bool
    preprocessing: dict[str, Any]
    layers: list[LayerSummary]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data; NaN and infinities (e.g. maps that overflowed) become None (null)."""
        data = asdict(self)
        for layer, out in zip(self.layers, data["layers"], strict=True):
            out["compression_ratio"] = round(layer.compression_ratio, 4)
        return _finite(data)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


@contextmanager
def open_fmap(path: str | Path) -> Iterator[h5py.File]:
    """Open a complete fmap file for reading.

    Raises:
        FmapFileError: missing, not HDF5, not written by fmap, incomplete, or a newer schema.
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
            raise FmapFileError(f"{path}: incomplete file (complete=0): the run that wrote it did not finish")
        yield f
    finally:
        f.close()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def scan(ds: h5py.Dataset, count: str) -> tuple[RoleStats, np.ndarray]:
    """Statistics of a map dataset, read one chunk at a time.

    Returns the stats and, per channel (axis 1), whether any value is non-zero.
    """
    lo, hi, total, hits, n = np.inf, -np.inf, 0.0, 0, 0
    nonzero = np.zeros(ds.shape[1], dtype=bool)
    if ds.size:
        for sel in ds.iter_chunks():
            block = ds[sel]
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
            total += float(block.sum(dtype=np.float64))
            hits += int(np.count_nonzero(block == 0) if count == "zeros" else np.count_nonzero(block < 0))
            n += block.size
            nonzero[sel[1]] |= np.any(block.reshape(block.shape[0], block.shape[1], -1) != 0, axis=(0, 2))
    stats = RoleStats(
        min=lo if n else float("nan"),
        max=hi if n else float("nan"),
        mean=total / n if n else float("nan"),
        fraction=hits / n if n else float("nan"),
        fraction_of=count,
    )
    return stats, nonzero


def _storage_bytes(*datasets: h5py.Dataset) -> tuple[int, int]:
    on_disk = sum(ds.id.get_storage_size() for ds in datasets)
    raw = sum(ds.size * ds.dtype.itemsize for ds in datasets)
    return on_disk, raw


def read_summary(path: str | Path) -> FileSummary:
    """Summarise an fmap file: metadata, images, and per layer storage and z/a statistics."""
    with open_fmap(path) as f:
        try:
            return _summarise(f, str(path))
        except Exception as exc:  # any inconsistency in a file claiming to be fmap's is damage
            raise FmapFileError(f"{path}: damaged fmap file: {type(exc).__name__}: {first_line(exc)}") from None


def _summarise(f: h5py.File, path: str) -> FileSummary:
    images = f[schema.IMAGES]
    paths = images["path"].asstr()[...]
    sizes = images["original_size"][...]
    layers = []
    for name in f[schema.LAYERS]:
        group = f[schema.LAYERS][name]
        z = group[schema.PREACTIVATION]
        a = group.get(schema.ACTIVATION)
        z_stats, _ = scan(z, "negatives")
        a_stats, alive = scan(a, "zeros") if a is not None else (None, None)
        on_disk, raw = _storage_bytes(*([z] if a is None else [z, a]))
        layers.append(
            LayerSummary(
                name=name,
                type=_text(group.attrs.get("type", "?")),
                nonlinearity=_text(group.attrs.get("nonlinearity", "none")),
                input=_text(group.attrs.get("input", "?")),
                input_via=_text(group.attrs.get("input_via", "")),
                shape=list(z.shape),
                dtype=str(z.dtype),
                bytes_on_disk=on_disk,
                bytes_raw=raw,
                preactivation=z_stats,
                activation=a_stats,
                dead_channels=[] if alive is None else [int(c) for c in np.flatnonzero(~alive)],
            )
        )
    order = [_text(n) for n in f.attrs.get("layers", [])]
    layers.sort(key=lambda layer: order.index(layer.name) if layer.name in order else len(order))
    return FileSummary(
        path=path,
        schema_version=int(f.attrs["fmap_schema_version"]),
        fmap_version=_text(f.attrs.get("fmap_version", "?")),
        created=_text(f.attrs.get("created", "?")),
        model_name=_text(f.attrs.get("model_name", "?")),
        model_source=_text(f.attrs.get("model_source", "?")),
        device=_text(f.attrs.get("device", "?")),
        n_images=int(f.attrs.get("n_images", len(paths))),
        images=[{"path": p, "original_size": [int(h), int(w)]} for p, (h, w) in zip(paths, sizes, strict=True)],
        input_saved=schema.INPUT in f,
        preprocessing=json.loads(_text(f.attrs.get("preprocessing", "{}"))),
        layers=layers,
    )


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _stats_line(symbol: str, role: str, stats: RoleStats) -> str:
    return (
        f"    {symbol} {role:<14} min {stats.min:>10.4g}  max {stats.max:>10.4g}  mean {stats.mean:>10.4g}  "
        f"{stats.fraction_of} {stats.fraction:6.1%}"
    )


def format_summary(summary: FileSummary) -> str:
    """The human-readable report ``fmap inspect`` prints."""
    lines = [
        f"{summary.path}: fmap schema v{summary.schema_version}, written by fmap {summary.fmap_version} "
        f"at {summary.created} on {summary.device}",
        f"model: {summary.model_name} ({summary.model_source})",
        f"images: {summary.n_images}" + ("  (input tensor saved in /input)" if summary.input_saved else ""),
    ]
    for i, image in enumerate(summary.images[:10]):
        h, w = image["original_size"]
        lines.append(f"  [{i}] {image['path']}  ({h}x{w})")
    if len(summary.images) > 10:
        lines.append(f"  ... and {len(summary.images) - 10} more")
    lines.append("layers:")
    for layer in summary.layers:
        shape = "x".join(str(n) for n in layer.shape)
        lines.append(
            f"  {layer.name}  {layer.type} -> {layer.nonlinearity}  {shape} {layer.dtype}  "
            f"{_size(layer.bytes_on_disk)} on disk ({layer.compression_ratio:.2f}x)  input: {layer.input}"
            + (f" via {layer.input_via}" if layer.input_via else "")
        )
        lines.append(_stats_line("z", schema.PREACTIVATION, layer.preactivation))
        if layer.activation is None:
            lines.append("    a (none: no nonlinearity follows this layer)")
            continue
        lines.append(_stats_line("a", schema.ACTIVATION, layer.activation))
        channels = layer.shape[1]
        dead = layer.dead_channels
        listed = ", ".join(str(c) for c in dead[:20]) + (", ..." if len(dead) > 20 else "")
        lines.append(f"    dead channels: {len(dead)}/{channels}" + (f" ({listed})" if dead else ""))
    return "\n".join(lines)
