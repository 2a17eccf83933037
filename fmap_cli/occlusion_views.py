"""Occlusion files (``fmap occlude``) for people: the summary ``fmap inspect`` prints and the picture
``fmap render`` draws, a row of Zeiler & Fergus's Fig. 7 per image: the input, the drop of a feature
map's total activation, the probability of the class and the top-1 label, each value drawn where
its occluder was centred. h5py, numpy and Pillow only, never torch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageDraw

from . import colormaps
from .drawing import BACKGROUND, LINE_H, LegendLine, fit, legend, stack, text_width, write
from .receptive import input_picture
from .render import image_index
from .store import schema
from .store.occlusion import OcclusionImage, read_image
from .store.reader import printable
from .summary import Header, json_safe

ROW_LIMIT = 16  # --image all draws at most this many images, one row each
CHANNEL_PANELS = 3  # per image: the stored channels with the largest drops, at most this many
SUMMARY_CHANNELS = 4  # per image in ``fmap inspect``: the channels with the largest drops
PANEL_MIN = 160  # panels smaller than this (longer side) are enlarged by an integer factor
GAP = 8  # between panels
DIM = 0.55  # the input is darkened under a map so the map stands out
ALPHA = 0.85  # opacity of a map where it is strongest
# Colours of the labels that occur, most frequent first; the rest share OTHER.
LABEL_COLOURS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
OTHER = (160, 160, 160)


# ---------------------------------------------------------------------------- summary (fmap inspect)


@dataclass
class ChannelDrop:
    """One channel of L on one image: its total unoccluded, and where covering lowers it most."""

    channel: int
    baseline: float
    lowest: float  # the smallest total over every occluder position
    drop: float  # baseline - lowest
    at: list[int]  # [y, x]: top-left corner of that position


@dataclass
class ClassChange:
    """The class of one image: its probability unoccluded, and where covering lowers it most."""

    target: int
    name: str | None
    probability: float
    lowest: float
    at: list[int]  # [y, x]
    top_class: int  # the unoccluded top-1
    labels: int  # how many different top-1 labels occur over the positions


@dataclass
class OccludedImage:
    """One image of an occlusion file, as ``fmap inspect`` reports it."""

    index: int
    path: str
    channels: list[ChannelDrop]  # the largest drops first
    classes: ClassChange | None


@dataclass
class OcclusionSummary(Header):
    """What ``fmap inspect`` reports about an occlusion file."""

    kind: str
    n_images: int
    input_saved: bool
    preprocessing: dict[str, Any]
    patch: list[int]
    stride: list[int]
    fill: list[float]
    fill_name: str
    grid: list[int]  # [Gy, Gx]
    layer: str | None
    role: str | None
    channel_choice: str | None
    n_channels: int
    n_classes: int
    class_choice: str | None
    class_names_source: str | None
    images: list[OccludedImage]
    missing_sources: list[str] = field(default_factory=list)  # as FileSummary (virtual files): never here

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data (non-finite numbers become None)."""
        data = asdict(self)
        del data["missing_sources"]
        finite: dict[str, Any] = json_safe(data)
        return finite


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def occlusion_summary(f: h5py.File, path: str) -> OcclusionSummary:
    """Summarise an occlusion file opened with ``reader.open_fmap`` (rows checked)."""
    group = f[schema.OCCLUSION]
    images = [_image_summary(read_image(f, n)) for n in range(len(f["N"]))]  # /N: checked against every row
    activity = group.get("activity")
    return OcclusionSummary(
        **Header.read(f, path),
        kind=schema.OCCLUSION,
        n_images=len(images),
        input_saved=schema.INPUT in f,
        preprocessing=json.loads(_text(f.attrs.get("preprocessing")) or "{}"),
        patch=[int(v) for v in f.attrs["patch"]],
        stride=[int(v) for v in f.attrs["stride"]],
        fill=[float(v) for v in f.attrs["fill"]],
        fill_name=_text(f.attrs.get("fill_name")) or "?",
        grid=[len(group["y"]), len(group["x"])],
        layer=_text(f.attrs.get("layer")),
        role=None if activity is None else _text(activity.attrs.get("role")),
        channel_choice=_text(f.attrs.get("channel_choice")),
        n_channels=0 if activity is None else int(activity.shape[1]),
        n_classes=int(f.attrs.get("n_classes", 0)),
        class_choice=_text(f.attrs.get("class_choice")),
        class_names_source=_text(f.attrs.get("class_names_source")),
        images=images,
    )


def _lowest(values: np.ndarray, image: OcclusionImage) -> tuple[float, list[int]]:
    """The smallest value of a (Gy, Gx) map and the top-left corner of its (first) position."""
    k = int(np.argmin(values))
    i, j = divmod(k, values.shape[1])
    return float(values[i, j]), [int(image.y[i]), int(image.x[j])]


def _image_summary(image: OcclusionImage) -> OccludedImage:
    channels = []
    if image.activity is not None and image.channel is not None and image.baseline is not None:
        for k, channel in enumerate(image.channel):
            lowest, at = _lowest(image.activity[k], image)
            base = float(image.baseline[k])
            channels.append(ChannelDrop(int(channel), base, lowest, base - lowest, at))
        channels.sort(key=lambda c: -c.drop if math.isfinite(c.drop) else math.inf)
    classes = None
    if image.probability is not None and image.label is not None and image.target is not None:
        lowest, at = _lowest(image.probability, image)
        name = image.class_names[image.target] if image.class_names is not None else None
        classes = ClassChange(
            image.target, name, float(image.target_probability or math.nan), lowest, at,
            -1 if image.top_class is None else image.top_class, len(np.unique(image.label)),
        )  # fmt: skip
    return OccludedImage(image.index, image.path, channels, classes)


def format_occlusion_summary(summary: OcclusionSummary) -> str:
    """The human-readable report ``fmap inspect`` prints for an occlusion file."""
    s = summary
    fill = ", ".join(f"{v:.3g}" for v in s.fill)
    lines = [
        *s.header_lines(f"fmap occlusion file (schema v{s.schema_version})"),
        f"occluder: {s.patch[0]}x{s.patch[1]} pixels, fill {s.fill_name} (R, G, B = {fill} before normalising), "
        f"stride {s.stride[0]}x{s.stride[1]}: {s.grid[0]}x{s.grid[1]} positions",
    ]
    if s.layer is not None:
        symbol = "a" if s.role == schema.ACTIVATION else "z"
        lines.append(f"layer: {s.layer}, total {symbol} of {s.n_channels} channel(s) per image ({s.channel_choice})")
    if s.n_classes:
        names = f", names from {s.class_names_source}" if s.class_names_source else ""
        lines.append(f"classes: {s.n_classes} ({s.class_choice}{names})")
    lines.append(f"images: {s.n_images}" + ("  (input tensor saved in /input)" if s.input_saved else ""))
    for image in s.images[:10]:
        lines.append(f"  [{image.index}] {image.path}")
        for c in image.channels[:SUMMARY_CHANNELS]:
            share = f" ({c.drop / c.baseline:.0%})" if c.baseline > 0 else ""
            lines.append(
                f"      channel {c.channel}: total {c.baseline:.4g} unoccluded; largest drop {c.drop:.4g}{share} "
                f"to {c.lowest:.4g} with the occluder at y={c.at[0]} x={c.at[1]}"
            )
        if len(image.channels) > SUMMARY_CHANNELS:
            lines.append(f"      ... and {len(image.channels) - SUMMARY_CHANNELS} more channels (smaller drops)")
        if image.classes is not None:
            k = image.classes
            name = f" '{k.name}'" if k.name is not None else ""
            top = "" if k.top_class == k.target else f"; unoccluded top-1 is {k.top_class}"
            lines.append(
                f"      class {k.target}{name}: p = {k.probability:.4g} unoccluded; lowest {k.lowest:.4g} with the "
                f"occluder at y={k.at[0]} x={k.at[1]}; {k.labels} different top-1 label(s){top}"
            )
    if len(s.images) > 10:
        lines.append(f"  ... and {len(s.images) - 10} more")
    return "\n".join(printable(line) for line in lines)


# ---------------------------------------------------------------------------- picture (fmap render)


def cells(corners: np.ndarray, patch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which occluder position each pixel along one axis shows: the one whose centre is nearest,
    within half a step of it (so values sit at the occluder centres, not stretched over the image).

    Returns (index, inside): (size,) position index per pixel, and whether a position covers it.
    """
    centres = corners.astype(np.float64) + patch / 2  # (G,)
    if len(centres) > 1:
        first, last = (centres[1] - centres[0]) / 2, (centres[-1] - centres[-2]) / 2
    else:
        first = last = patch / 2
    bounds = (centres[:-1] + centres[1:]) / 2  # between neighbouring centres
    pixel = np.arange(size) + 0.5
    index = np.searchsorted(bounds, pixel, side="right")
    inside = (pixel >= centres[0] - first) & (pixel < centres[-1] + last)
    return index, inside


def _placed(values: np.ndarray, image: OcclusionImage, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A (Gy, Gx) map at pixel resolution, (H, W), and the (H, W) mask of pixels it covers."""
    rows, in_rows = cells(image.y, image.patch[0], size[0])
    cols, in_cols = cells(image.x, image.patch[1], size[1])
    return values[rows][:, cols], in_rows[:, None] & in_cols[None, :]


def _over(base: np.ndarray, colours: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colours`` (H, W, 3) over the darkened ``base`` with opacity ``alpha`` (H, W)."""
    a = alpha[..., None]
    mixed = DIM * base.astype(np.float64) * (1 - a) + colours.astype(np.float64) * a
    result: np.ndarray = np.rint(mixed).astype(np.uint8)
    return result


def _enlarged(picture: np.ndarray, zoom: int) -> Image.Image:
    image = Image.fromarray(picture, "RGB")
    return image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)


@dataclass(frozen=True)
class _Panel:
    title: str
    picture: np.ndarray  # (H, W, 3) uint8


def _panels(image: OcclusionImage, base: np.ndarray) -> tuple[list[_Panel], list[tuple[tuple[int, int, int], str]]]:
    """The pictures of one row, and the label legend (colour, text) when there is a label map."""
    size = (base.shape[0], base.shape[1])
    panels = [_Panel(f"[{image.index}] input", base)]
    if image.activity is not None and image.channel is not None and image.baseline is not None:
        drops = image.baseline[:, None, None] - image.activity  # (n_channels, Gy, Gx): > 0 where covering lowers it
        order = sorted(range(len(image.channel)), key=lambda k: -float(np.nanmax(drops[k])))
        for k in order[:CHANNEL_PANELS]:
            drop, inside = _placed(drops[k], image, size)
            peak = float(np.nanmax(drops[k]))
            t = np.clip(drop / peak, 0, 1) if peak > 0 else np.zeros(size)
            alpha = np.where(inside, ALPHA * np.sqrt(t), 0.0)  # sqrt: small drops stay visible
            colours = colormaps.apply(colormaps.SEQUENTIAL, t)
            title = f"ch {int(image.channel[k])}: drop up to {peak:.3g} of {float(image.baseline[k]):.3g}"
            panels.append(_Panel(title, _over(base, colours, alpha)))
    labels: list[tuple[tuple[int, int, int], str]] = []
    if image.probability is not None and image.label is not None and image.target is not None:
        p, inside = _placed(image.probability.astype(np.float64), image, size)
        colours = colormaps.apply(colormaps.SEQUENTIAL, p)
        panels.append(_Panel(f"p({image.class_name(image.target)})", _over(base, colours, np.where(inside, ALPHA, 0))))
        counts = Counter(int(v) for v in image.label.ravel())
        ranked = [k for k, _ in counts.most_common()]
        palette = {k: LABEL_COLOURS[i] for i, k in enumerate(ranked[: len(LABEL_COLOURS)])}
        table = np.asarray([palette.get(k, OTHER) for k in ranked], dtype=np.uint8)  # (L, 3)
        where = {k: i for i, k in enumerate(ranked)}
        indices = np.vectorize(where.__getitem__, otypes=[np.intp])(image.label)  # (Gy, Gx)
        placed, inside = _placed(indices, image, size)
        panels.append(_Panel("top-1 label", _over(base, table[placed], np.where(inside, ALPHA, 0))))
        total = image.label.size
        for k in ranked[: len(LABEL_COLOURS)]:
            labels.append((palette[k], f"{image.class_name(k)}: {counts[k] / total:.0%} of positions"))
        rest = ranked[len(LABEL_COLOURS) :]
        if rest:
            share = sum(counts[k] for k in rest) / total
            labels.append((OTHER, f"{len(rest)} other labels: {share:.0%} of positions"))
    return panels, labels


def _row(image: OcclusionImage, base: np.ndarray) -> Image.Image:
    """One image's row: captioned panels side by side, then its label legend."""
    panels, labels = _panels(image, base)
    zoom = max(1, math.ceil(PANEL_MIN / max(base.shape[:2])))
    width, height = base.shape[1] * zoom, base.shape[0] * zoom
    row = Image.new("RGB", (GAP + len(panels) * (width + GAP), LINE_H * 2 + 4 + height + GAP), BACKGROUND)
    draw = ImageDraw.Draw(row)
    write(draw, (GAP, 2), fit(image.path, row.width - 2 * GAP))
    for i, panel in enumerate(panels):
        x = GAP + i * (width + GAP)
        write(draw, (x, LINE_H + 2), fit(panel.title, width))
        row.paste(_enlarged(panel.picture, zoom), (x, 2 * LINE_H + 4))
    if not labels:
        return row
    swatch = LINE_H - 3
    strip = Image.new("RGB", (row.width, 4 + LINE_H * len(labels)), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    x = GAP + (len(panels) - 1) * (width + GAP)  # under the label panel
    x = max(GAP, min(x, strip.width - swatch - 4 - max(text_width(text) for _, text in labels)))
    for k, (colour, text) in enumerate(labels):
        y = 2 + k * LINE_H
        draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=colour)
        write(draw, (x + swatch + 4, y), text)
    return stack([row, strip])


def chosen_images(f: h5py.File, image: str) -> list[int]:
    """The images ``--image`` names: an index or stored path, or ``all`` (the first ROW_LIMIT)."""
    if image == "all":
        return list(range(min(len(f["N"]), ROW_LIMIT)))
    return [image_index(f, image)]


def figure(f: h5py.File, image: str) -> Image.Image:
    """Zeiler & Fergus's Fig. 7 rows for the images ``--image`` names (``all``: up to ROW_LIMIT).

    Raises:
        UsageError: ``image`` names no image of the file.
        FmapError: the input picture is needed, but the file has no /input and the image file is gone.
    """
    indices = chosen_images(f, image)
    images = [read_image(f, n) for n in indices]
    rows = [_row(occluded, input_picture(f, occluded.index)) for occluded in images]
    width = max(row.width for row in rows)
    first = images[0]
    fill = _text(f.attrs.get("fill_name", "?"))
    lines = [
        LegendLine(f"occluder {first.patch[0]}x{first.patch[1]} ({fill}), {len(first.y)}x{len(first.x)} positions"),
        LegendLine("each value is drawn at its occluder's centre; none where no occluder was centred"),
    ]
    if first.activity is not None:
        symbol = "a" if f[schema.OCCLUSION]["activity"].attrs.get("role") == schema.ACTIVATION else "z"
        layer = _text(f.attrs.get("layer"))
        drop = f"ch: drop of the channel's total {symbol} ({layer})"
        lines.append(LegendLine(drop, colormaps.SEQUENTIAL, "0", "max"))
        stored = f[schema.OCCLUSION]["activity"].shape[1]
        if stored > CHANNEL_PANELS:
            lines.append(LegendLine(f"the {CHANNEL_PANELS} channels of {stored} with the largest drops"))
    if first.probability is not None:
        lines.append(LegendLine("p: probability of the class with the occluder there", colormaps.SEQUENTIAL, "0", "1"))
    n_images = len(f["N"])
    if image == "all" and n_images > ROW_LIMIT:
        lines.append(LegendLine(f"--image all draws the first {ROW_LIMIT} of {n_images} images; --image I draws one"))
    return stack([*rows, legend(lines, width)])
