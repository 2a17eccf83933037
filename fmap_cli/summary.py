"""Read an fmap HDF5 file and summarise it (``fmap inspect``), without torch.

Statistics come from each layer's write-time ``stats`` group, so the summary reads kilobytes even
of a huge file; files without one are scanned chunk by chunk (``analysis.py``), with the same
result. Only the histogram (``--hist``) always reads the maps, one block at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from .analysis import ChannelSummary, LayerStats, histogram, layer_stats, top_images
from .errors import UsageError
from .store import schema
from .store.axes import layer_axes
from .store.layout import file_kind
from .store.reader import channel_count, check_channel, layer_group, missing_sources, printable, reading

if TYPE_CHECKING:  # imported when a projection file is read (it loads Pillow)
    from .occlusion_views import OcclusionSummary
    from .projection_views import ProjectionSummary

HIST_BINS = 20


@dataclass
class RoleStats:
    """Value statistics of one map (z or a) over every image."""

    min: float
    max: float
    mean: float
    std: float
    negative_fraction: float
    zero_fraction: float | None  # only for the map the per-image statistics describe (a, else z)


@dataclass
class ChannelRow:
    """One channel of ``--channels``."""

    channel: int
    preactivation: dict[str, float]  # min, max, mean, std
    activation: dict[str, float] | None
    zero_fraction: float  # of a (of z when there is no a), over every image
    dead: bool


@dataclass
class TopImage:
    """One image of ``--top``: where a channel's maximum was largest."""

    index: int
    path: str
    value: float  # the channel's maximum on this image
    row: int  # position of that maximum in the map
    col: int


@dataclass
class Histogram:
    """Counts of a map's finite values in equal bins over its range."""

    role: str
    edges: list[float]
    counts: list[int]


@dataclass
class LayerSummary:
    """One stored layer: shape, storage and statistics of z and a."""

    name: str
    type: str
    nonlinearity: str
    input: str
    input_via: str
    shape: list[int]
    axes: list[str]  # the name of each axis of shape, N first (C, or D for tokens, is the channels')
    n_channels: int  # length of the channel axis
    tokens: str  # what the token axis T holds (token maps only), else ""
    field_note: str  # why the receptive field is unknown, when it is ("" when known)
    dtype: str
    bytes_on_disk: int
    bytes_raw: int
    preactivation: RoleStats
    activation: RoleStats | None
    stats_source: str  # "file" (write-time statistics) or "scan"
    dead_channels: list[int] = field(default_factory=list)
    channels: list[ChannelRow] | None = None
    top: dict[int, list[TopImage]] | None = None  # channel -> images, best first
    histogram: Histogram | None = None

    @property
    def compression_ratio(self) -> float:
        return self.bytes_raw / self.bytes_on_disk if self.bytes_on_disk else float("nan")


@dataclass(frozen=True)
class Details:
    """What ``fmap inspect`` adds to the summary on request."""

    layer: str | None = None  # only this layer
    channel: int | None = None  # only this channel (needs ``layer``)
    channels: bool = False  # per-channel table
    top: int = 0  # K images per channel that excite it most
    hist_bins: int = 0  # histogram of the activation values; 0: none


@dataclass
class Header:
    """Who wrote a file, when, on what and with which model: every kind of fmap file has it, and
    every ``fmap inspect`` report starts with it."""

    path: str
    schema_version: int
    fmap_version: str
    created: str
    device: str
    model_name: str
    model_source: str

    @staticmethod
    def read(f: h5py.File, path: str) -> dict[str, Any]:
        """The header's fields of ``f`` (opened with ``reader.open_fmap``), as keyword arguments of a
        summary; '?' where the file does not say."""
        said = ("fmap_version", "created", "device", "model_name", "model_source")
        return {"path": path, "schema_version": int(f.attrs["fmap_schema_version"])} | {
            key: text(f.attrs.get(key, "?")) for key in said
        }

    def header_lines(self, what: str) -> list[str]:
        """The report's first two lines; ``what`` says the kind of file and its schema version."""
        return [
            f"{self.path}: {what}, written by fmap {self.fmap_version} at {self.created} on {self.device}",
            f"model: {self.model_name} ({self.model_source})",
        ]


@dataclass
class FileSummary(Header):
    """What ``fmap inspect`` reports about a maps file."""

    n_images: int
    images: list[dict[str, Any]]
    input_saved: bool
    preprocessing: dict[str, Any]
    layers: list[LayerSummary]
    missing_sources: list[str]  # virtual files only: shard files that are gone (their rows read as NaN)
    file_bytes: int  # the file's size
    map_bytes: int  # stored bytes of every map (z, a) and /input; the rest is statistics and metadata

    @property
    def other_bytes(self) -> int:
        """Statistics, image records and HDF5's own metadata."""
        return max(0, self.file_bytes - self.map_bytes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data; NaN and infinities (e.g. maps that overflowed) become None (null)."""
        data = asdict(self)
        for layer, out in zip(self.layers, data["layers"], strict=True):
            out["compression_ratio"] = round(layer.compression_ratio, 4)
            if layer.top is not None:  # JSON keys are strings: a list keeps channels as numbers
                out["top"] = [{"channel": c, "images": images} for c, images in out["top"].items()]
        finite: dict[str, Any] = json_safe(data)
        return finite


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities (anywhere in lists and dicts) as None, for JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def text(value: Any) -> str:
    """An attribute's value as text (h5py gives bytes for fixed-length strings)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _role_stats(channels: ChannelSummary, zeros: np.ndarray | None) -> RoleStats:
    """Whole-map statistics from per-channel ones (every channel holds the same number of values)."""
    if channels.mean.size == 0:
        return RoleStats(math.nan, math.nan, math.nan, math.nan, math.nan, None if zeros is None else math.nan)
    mean = float(channels.mean.mean())
    second = float(np.mean(channels.std**2 + channels.mean**2))  # pooled E[x^2]
    return RoleStats(
        min=float(channels.min.min()),
        max=float(channels.max.max()),
        mean=mean,
        std=math.sqrt(max(second - mean**2, 0.0)) if math.isfinite(second) else math.nan,
        negative_fraction=float(channels.negatives.mean()),  # every channel holds as many values
        zero_fraction=None if zeros is None else float(zeros.mean(dtype=np.float64)),
    )


def _storage_bytes(*datasets: h5py.Dataset) -> tuple[int, int]:
    on_disk = sum(ds.id.get_storage_size() for ds in datasets)
    raw = sum(ds.size * ds.dtype.itemsize for ds in datasets)
    return on_disk, raw


def read_summary(path: str | Path, details: Details = Details()) -> FileSummary | ProjectionSummary | OcclusionSummary:
    """Summarise an fmap file: metadata, images, and per layer storage and z/a statistics.

    Raises:
        FmapFileError: not a complete fmap file, or damaged.
        UnknownLayerError, UsageError: ``details`` names a layer or channel the file lacks.
    """
    if details.channel is not None and details.layer is None:
        raise UsageError("--channel needs --layer (which layer's channel?)")
    with reading(path, missing_sources_ok=True, kinds=(schema.MAPS, schema.PROJECTION, schema.OCCLUSION)) as f:
        if file_kind(f) == schema.PROJECTION:
            return _projection_summary(f, str(path), details)
        if file_kind(f) == schema.OCCLUSION:
            return _occlusion_summary(f, str(path), details)
        return _summarise(f, str(path), details)


def _projection_summary(f: h5py.File, path: str, details: Details) -> ProjectionSummary:
    if details != Details():
        raise UsageError(f"{printable(path)} is a projection file: --layer, --channel, --channels, --top and --hist "
                         "describe maps files")  # fmt: skip
    from .projection_views import projection_summary

    return projection_summary(f, path)


def _occlusion_summary(f: h5py.File, path: str, details: Details) -> OcclusionSummary:
    if details != Details():
        raise UsageError(f"{printable(path)} is an occlusion file: --layer, --channel, --channels, --top and --hist "
                         "describe maps files")  # fmt: skip
    from .occlusion_views import occlusion_summary

    return occlusion_summary(f, path)


def _summarise(f: h5py.File, path: str, details: Details) -> FileSummary:
    images = f[schema.IMAGES]
    paths = images["path"].asstr()[...]
    sizes = images["original_size"][...]
    names = list(f[schema.LAYERS]) if details.layer is None else [details.layer]
    layers = [_layer_summary(layer_group(f, name), name, list(paths), details) for name in names]
    order = [text(n) for n in f.attrs.get("layers", [])]
    layers.sort(key=lambda layer: order.index(layer.name) if layer.name in order else len(order))
    return FileSummary(
        missing_sources=missing_sources(f) if int(f.attrs.get("virtual", 0)) else [],
        **Header.read(f, path),
        n_images=int(f.attrs.get("n_images", len(paths))),
        images=[{"path": p, "original_size": [int(h), int(w)]} for p, (h, w) in zip(paths, sizes, strict=True)],
        input_saved=schema.INPUT in f,
        preprocessing=json.loads(text(f.attrs.get("preprocessing", "{}"))),
        layers=layers,
        file_bytes=Path(f.filename).stat().st_size,
        map_bytes=_map_bytes(f),
    )


def _map_bytes(f: h5py.File) -> int:
    """Stored bytes of every map and of /input (0 for a virtual file: its maps are in the shards)."""
    groups = f[schema.LAYERS].values()
    maps = [group[role] for group in groups for role in (schema.PREACTIVATION, schema.ACTIVATION) if role in group]
    if schema.INPUT in f:
        maps.append(f[schema.INPUT])
    return sum(_storage_bytes(ds)[0] for ds in maps)


def _layer_summary(group: h5py.Group, name: str, paths: list[str], details: Details) -> LayerSummary:
    stats = layer_stats(group)
    maps = [group[role] for role in (schema.PREACTIVATION, schema.ACTIVATION) if role in group]
    unknown = int(np.asarray(group.attrs.get("receptive_field", (0, 0)))[0]) < 0
    on_disk, raw = _storage_bytes(*maps)
    a_role = stats.role == schema.ACTIVATION
    zeros = stats.image_zero_fraction
    summary = LayerSummary(
        name=name,
        type=text(group.attrs.get("type", "?")),
        nonlinearity=text(group.attrs.get("nonlinearity", "none")),
        input=text(group.attrs.get("input", "?")),
        input_via=text(group.attrs.get("input_via", "")),
        shape=list(maps[0].shape),
        axes=list(layer_axes(group)),
        n_channels=channel_count(group),
        tokens=text(group.attrs.get("tokens", "")),
        field_note=text(group.attrs.get("receptive_field_note", "unknown")) if unknown else "",
        dtype=str(maps[0].dtype),
        bytes_on_disk=on_disk,
        bytes_raw=raw,
        preactivation=_role_stats(stats.preactivation, None if a_role else zeros),
        activation=None if stats.activation is None else _role_stats(stats.activation, zeros),
        stats_source=stats.source,
        dead_channels=[int(c) for c in np.flatnonzero(stats.dead)],
    )
    if details.channel is not None:
        check_channel(group, details.channel)
    wanted = range(stats.image_max.shape[1]) if details.channel is None else [details.channel]
    if details.channels:
        summary.channels = [_channel_row(stats, c) for c in wanted]
    if details.top:
        summary.top = {c: _top(stats, c, details.top, paths) for c in wanted}
    if details.hist_bins:
        summary.histogram = _histogram(group, stats, details.hist_bins)
    return summary


def _channel_row(stats: LayerStats, c: int) -> ChannelRow:
    def values(summary: ChannelSummary) -> dict[str, float]:
        return {key: float(getattr(summary, key)[c]) for key in ("min", "max", "mean", "std")}

    return ChannelRow(
        channel=c,
        preactivation=values(stats.preactivation),
        activation=None if stats.activation is None else values(stats.activation),
        zero_fraction=float(stats.image_zero_fraction[:, c].mean(dtype=np.float64)),
        dead=bool(stats.dead[c]),
    )


def _top(stats: LayerStats, c: int, k: int, paths: list[str]) -> list[TopImage]:
    values = stats.image_max[:, c]
    return [
        TopImage(int(n), paths[n], float(values[n]), *(int(v) for v in stats.image_argmax[n, c]))
        for n in top_images(values, k)
    ]


def _histogram(group: h5py.Group, stats: LayerStats, bins: int) -> Histogram | None:
    if stats.role not in group:  # the map was not stored (statistics only)
        return None
    channels = stats.activation if stats.role == schema.ACTIVATION and stats.activation else stats.preactivation
    lo, hi = float(channels.min.min(initial=np.inf)), float(channels.max.max(initial=-np.inf))
    edges, counts = histogram(group[stats.role], lo, hi, bins)
    return Histogram(stats.role, [float(e) for e in edges], [int(n) for n in counts])


# ---------------------------------------------------------------------------- text report


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _stats_line(symbol: str, role: str, stats: RoleStats) -> str:
    fraction = (  # a: how sparse; z: how much the nonlinearity cuts
        f"  zeros {stats.zero_fraction:6.1%}"
        if symbol == "a" and stats.zero_fraction is not None
        else f"  negatives {stats.negative_fraction:6.1%}"
    )
    return (
        f"    {symbol} {role:<14} min {stats.min:>10.4g}  max {stats.max:>10.4g}  mean {stats.mean:>10.4g}  "
        f"std {stats.std:>10.4g}{fraction}"
    )


def _storage_line(summary: FileSummary) -> str:
    if summary.map_bytes == 0:  # a virtual file: the maps are in the shards
        return f"file: {_size(summary.file_bytes)}"
    share = summary.map_bytes / summary.file_bytes if summary.file_bytes else float("nan")
    return (
        f"file: {_size(summary.file_bytes)}: maps {_size(summary.map_bytes)} ({share:.0%}), statistics and "
        f"metadata {_size(summary.other_bytes)}"
    )


def format_summary(summary: FileSummary | ProjectionSummary | OcclusionSummary) -> str:
    """The human-readable report ``fmap inspect`` prints."""
    if not isinstance(summary, FileSummary):
        from .occlusion_views import OcclusionSummary, format_occlusion_summary

        if isinstance(summary, OcclusionSummary):
            return format_occlusion_summary(summary)
        from .projection_views import format_projection_summary

        return format_projection_summary(summary)
    lines = [
        *summary.header_lines(f"fmap schema v{summary.schema_version}"),
        f"images: {summary.n_images}" + ("  (input tensor saved in /input)" if summary.input_saved else ""),
        _storage_line(summary),
    ]
    if summary.missing_sources:
        lines.append(
            "WARNING: virtual file: source files missing, their images read as NaN: "
            + ", ".join(summary.missing_sources)
        )
    for i, image in enumerate(summary.images[:10]):
        h, w = image["original_size"]
        lines.append(f"  [{i}] {image['path']}  ({h}x{w})")
    if len(summary.images) > 10:
        lines.append(f"  ... and {len(summary.images) - 10} more")
    lines.append("layers:")
    for layer in summary.layers:
        lines += _layer_lines(layer)
    # stored text (paths, names) is untrusted: escape control characters line by line, so none
    # reaches the terminal and a stored newline cannot fake a line of the report
    return "\n".join(printable(line) for line in lines)


def _layer_lines(layer: LayerSummary) -> list[str]:
    shape = "x".join(str(n) for n in layer.shape)
    lines = [
        f"  {layer.name}  {layer.type} -> {layer.nonlinearity}  {shape} ({','.join(layer.axes)}) {layer.dtype}  "
        + (
            f"{_size(layer.bytes_on_disk)} on disk ({layer.compression_ratio:.2f}x)"
            if layer.bytes_on_disk
            else "virtual (stored in the shard files)"
        )
        + f"  input: {layer.input}"
        + (f" via {layer.input_via}" if layer.input_via else ""),
    ]
    if layer.tokens:
        lines.append(f"    tokens (T): {layer.tokens}")
    if layer.field_note:
        lines.append(f"    receptive field unknown: {layer.field_note}")
    lines.append(_stats_line("z", schema.PREACTIVATION, layer.preactivation))
    if layer.activation is None:
        lines.append("    a (none: no nonlinearity follows this layer)")
    else:
        lines.append(_stats_line("a", schema.ACTIVATION, layer.activation))
        dead = layer.dead_channels
        listed = ", ".join(str(c) for c in dead[:20]) + (", ..." if len(dead) > 20 else "")
        lines.append(f"    dead channels: {len(dead)}/{layer.n_channels}" + (f" ({listed})" if dead else ""))
    if layer.channels is not None:
        lines += _channel_lines(layer.channels)
    if layer.top is not None:
        symbol = "a" if layer.activation is not None else "z"
        lines.append(f"    top images per channel, by the channel's max {symbol} (value [index] path):")
        for c, images in layer.top.items():
            best = "; ".join(f"{image.value:.4g} [{image.index}] {image.path}" for image in images)
            lines.append(f"      {c:>4}: {best}")
    if layer.histogram is not None:
        lines += _histogram_lines(layer.histogram)
    return lines


def _channel_lines(rows: list[ChannelRow]) -> list[str]:
    roles = [("z", schema.PREACTIVATION)] + ([("a", schema.ACTIVATION)] if rows and rows[0].activation else [])
    header = "    channel" + "".join(f"{s + ' ' + k:>11}" for s, _ in roles for k in ("min", "max", "mean", "std"))
    lines = [header + "   zeros  dead"]
    for row in rows:
        cells = [row.preactivation] + ([row.activation] if row.activation else [])
        numbers = "".join(f"{cell[k]:>11.4g}" for cell in cells for k in ("min", "max", "mean", "std"))
        lines.append(f"    {row.channel:>7}{numbers}  {row.zero_fraction:6.1%}  {'dead' if row.dead else ''}".rstrip())
    return lines


def _histogram_lines(hist: Histogram, width: int = 40) -> list[str]:
    symbol = "a" if hist.role == schema.ACTIVATION else "z"
    if not hist.counts:
        return [f"    histogram of {symbol}: no finite values"]
    total = sum(hist.counts)
    peak = math.log1p(max(hist.counts))
    lines = [f"    histogram of {symbol} ({len(hist.counts)} bins; bar length ~ log count):"]
    for lo, hi, n in zip(hist.edges, hist.edges[1:], hist.counts, strict=False):
        bar = "#" * (math.ceil(width * math.log1p(n) / peak) if n and peak else 0)
        share = n / total if total else 0.0
        lines.append(f"      [{lo:>10.4g}, {hi:>10.4g})  {n:>12}  {share:6.1%}  {bar}")
    return lines
