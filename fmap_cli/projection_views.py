"""Projection files (``fmap project``) for people: the summary ``fmap inspect`` prints and the picture
``fmap render`` draws, Zeiler & Fergus's Fig. 2 layout (each projection above the image patch it
came from). h5py, numpy and Pillow only, never torch.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageDraw

from .drawing import BACKGROUND, LINE_H, LegendLine, fit, legend, stack, write
from .geometry import Geometry
from .receptive import OVERLAY_MIN, PATCH_SIZE, crop, preprocessing_of, source_name, to_picture
from .store.projection import Projections, read_projections
from .store.reader import printable
from .summary import Header, json_safe, text

GAP = 6  # between cells
BOX = (255, 64, 64)  # the unit's receptive field, drawn on whole pictures (--full)
FULL_COLUMNS = 3  # image + projection pairs per row with --full


# ---------------------------------------------------------------------------- summary (fmap inspect)


@dataclass
class ProjectedUnit:
    """One projection of a projection file, as ``fmap inspect`` reports it."""

    image: int
    path: str
    row: int  # -1 for a whole map
    col: int
    value: float  # the activation projected
    projection_min: float
    projection_max: float
    nonzero: list[int] | None  # [top, left, bottom, right) of the non-zero pixels; None when all are zero
    inside_field: bool | None  # every non-zero pixel lies in the unit's receptive field (None: no field)


@dataclass
class ProjectionSummary(Header):
    """What ``fmap inspect`` reports about a projection file."""

    kind: str
    source_file: str
    source_input_list_sha256: str
    method: str
    rule: str
    layer: str
    channel: int
    units_kind: str  # "unit" or "whole map"
    input_shape: list[int]  # (3, H, W)
    receptive_field: list[int]
    units: list[ProjectedUnit]
    file_bytes: int
    missing_sources: list[str] = field(default_factory=list)  # as FileSummary (virtual files): never here

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data (non-finite numbers become None)."""
        data = asdict(self)
        del data["missing_sources"]
        return {key: json_safe(value) for key, value in data.items()}


def projection_summary(f: h5py.File, path: str) -> ProjectionSummary:
    """Summarise a projection file opened with ``reader.open_fmap``."""
    p = read_projections(f)
    attrs = f.attrs
    return ProjectionSummary(
        **Header.read(f, path),
        kind="projection",
        source_file=text(attrs.get("source_file", "?")),
        source_input_list_sha256=text(attrs.get("source_input_list_sha256", "")),
        method=p.method,
        rule=text(f["projection"].attrs.get("rule", "")),
        layer=p.layer,
        channel=p.channel,
        units_kind=p.units,
        input_shape=[int(n) for n in p.projection.shape[1:]],
        receptive_field=[int(n) for n in p.geometry.field],
        units=[_unit(p, k) for k in range(len(p.image))],
        file_bytes=Path(f.filename).stat().st_size,
    )


def _unit(p: Projections, k: int) -> ProjectedUnit:
    values = p.projection[k]  # (3, H, W)
    rows, cols = np.nonzero(np.any(values != 0, axis=0))
    nonzero = None if rows.size == 0 else [int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1]
    inside = None
    if nonzero is not None and p.row[k] >= 0 and _known(p.geometry):
        left, top, right, bottom = p.geometry.box(int(p.row[k]), int(p.col[k]))
        inside = top <= nonzero[0] and left <= nonzero[1] and nonzero[2] <= bottom and nonzero[3] <= right
    return ProjectedUnit(
        image=int(p.image[k]),
        path=p.path[k],
        row=int(p.row[k]),
        col=int(p.col[k]),
        value=float(p.value[k]),
        projection_min=float(values.min(initial=0.0)),
        projection_max=float(values.max(initial=0.0)),
        nonzero=nonzero,
        inside_field=inside,
    )


def _known(geometry: Geometry) -> bool:
    return min(*geometry.field, *geometry.stride) >= 0 and all(map(math.isfinite, geometry.start))


def format_projection_summary(s: ProjectionSummary) -> str:
    """The human-readable report ``fmap inspect`` prints for a projection file."""
    shape = "x".join(str(n) for n in s.input_shape)
    each = "one unit each" if s.units_kind == "unit" else "each a whole map of the channel"
    field_ = "x".join(str(n) for n in s.receptive_field) if min(s.receptive_field) > 0 else "unknown"
    written, model = s.header_lines(f"fmap projection file, schema v{s.schema_version}")
    lines = [
        written,
        f"source: {s.source_file} (input list {s.source_input_list_sha256[:16]})",
        model,
        f"projection: {s.method} of layer {s.layer} channel {s.channel}: {len(s.units)} x {shape} ({each}), "
        f"in the network's input space; receptive field {field_}",
        *textwrap.wrap(f"rule: {s.rule}", 100, subsequent_indent="  "),
        "units (value [image] path, unit, projection min .. max, non-zero pixels):",
    ]
    for u in s.units:
        where = "whole map" if u.row < 0 else f"unit ({u.row}, {u.col})"
        if u.nonzero is None:
            support = "all zero"
        else:
            top, left, bottom, right = u.nonzero
            support = f"rows {top}..{bottom - 1}, cols {left}..{right - 1}"
            if u.inside_field is not None:
                support += (
                    " (inside its receptive field)" if u.inside_field else " (REACHES BEYOND its receptive field)"
                )
        lines.append(
            f"  {u.value:>10.4g} [{u.image}] {u.path}  {where}  {u.projection_min:.4g} .. {u.projection_max:.4g}"
            f"  {support}"
        )
    # stored text (paths, names) is untrusted: no control character reaches the terminal
    return "\n".join(printable(line) for line in lines)


# ---------------------------------------------------------------------------- picture (fmap render)


def display(values: np.ndarray) -> np.ndarray:
    """A (3, H, W) projection as an (H, W, 3) uint8 picture: zero mid grey, scaled symmetrically to
    its own largest magnitude, each colour channel from its own input channel."""
    limit = float(np.abs(values).max(initial=0.0))
    scaled = values / limit if limit > 0 else np.zeros_like(values)
    rgb: np.ndarray = np.rint(127.5 + 127.5 * scaled).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)
    return rgb


def figure(f: h5py.File, full: bool = False) -> Image.Image:
    """Zeiler & Fergus's Fig. 2 for one channel: the projections, each cropped to its unit's receptive
    field, above the matching image patches; ``full`` (and whole-map files): uncropped, beside the
    whole input images."""
    p = read_projections(f)
    prep = preprocessing_of(f)
    pictures = [to_picture(p.input[k], prep) for k in range(len(p.image))]
    shown = [display(p.projection[k]) for k in range(len(p.image))]
    whole = full or p.units == "whole map" or not _known(p.geometry) or not len(p.image)
    body = _whole_pictures(p, pictures, shown) if whole else _patches(p, pictures, shown)
    source = printable(text(f.attrs.get("source_file", "?")))
    title = f"{p.layer} channel {p.channel}: {p.method} projections of {len(p.image)} "
    title += "whole maps" if p.units == "whole map" else "units"
    lines = [
        LegendLine(fit(f"{title} ({source})", max(body.width, 300))),
        LegendLine("projections: zero = mid grey, each scaled to its own largest |value|, RGB as the network input"),
    ]
    if not whole:
        field_ = f"{p.geometry.field[0]}x{p.geometry.field[1]}"
        lines.append(LegendLine(f"top: projections cropped to each unit's {field_} receptive field; below: the image"))
        lines.append(LegendLine("patches ([image] activation, file); grey = beyond the image"))
    elif p.units == "unit" and _known(p.geometry):
        lines.append(LegendLine("red box: the unit's receptive field"))
    return stack([legend(lines[:1], body.width), body, legend(lines[1:], body.width)])


def _patches(p: Projections, pictures: list[np.ndarray], shown: list[np.ndarray]) -> Image.Image:
    """Two rows: the projections cropped to the receptive field, and the image patches under them."""
    scale = PATCH_SIZE / max(p.geometry.field)
    size = (max(1, round(p.geometry.field[1] * scale)), max(1, round(p.geometry.field[0] * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    label_h = 2 * LINE_H + 4
    strip = Image.new("RGB", (GAP + len(shown) * (size[0] + GAP), GAP + 2 * size[1] + GAP + label_h), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for k in range(len(shown)):
        box = p.geometry.box(int(p.row[k]), int(p.col[k]))
        x = GAP + k * (size[0] + GAP)
        strip.paste(crop(shown[k], box).resize(size, resample), (x, GAP))
        strip.paste(crop(pictures[k], box).resize(size, resample), (x, 2 * GAP + size[1]))
        y = 2 * GAP + 2 * size[1] + 2
        write(draw, (x, y), fit(f"[{p.image[k]}] {p.value[k]:.4g}", size[0]))
        write(draw, (x, y + LINE_H), fit(printable(source_name(p.path[k])), size[0]))
    return strip


def _whole_pictures(p: Projections, pictures: list[np.ndarray], shown: list[np.ndarray]) -> Image.Image:
    """Each unit's whole input image beside its whole projection, in rows of FULL_COLUMNS pairs."""
    if not shown:
        return Image.new("RGB", (300, GAP), BACKGROUND)
    h, w = shown[0].shape[:2]
    zoom = max(1, math.ceil(OVERLAY_MIN / 2 / max(h, w)))
    tile = (w * zoom, h * zoom)
    cell = (2 * tile[0] + GAP, tile[1] + LINE_H + 2)
    columns = min(FULL_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    canvas = Image.new("RGB", (GAP + columns * (cell[0] + 2 * GAP), GAP + rows * (cell[1] + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for k in range(len(shown)):
        row, col = divmod(k, columns)
        x, y = GAP + col * (cell[0] + 2 * GAP), GAP + row * (cell[1] + GAP)
        where = "whole map" if p.row[k] < 0 else f"({p.row[k]}, {p.col[k]})"
        label = f"[{p.image[k]}] {p.value[k]:.4g} {where} {printable(source_name(p.path[k]))}"
        write(draw, (x, y), fit(label, cell[0]))
        for i, picture in enumerate((pictures[k], shown[k])):
            left = x + i * (tile[0] + GAP)
            image = Image.fromarray(picture, "RGB").resize(tile, Image.Resampling.NEAREST)
            canvas.paste(image, (left, y + LINE_H + 2))
            if p.row[k] >= 0 and _known(p.geometry):
                b_left, b_top, b_right, b_bottom = p.geometry.box(int(p.row[k]), int(p.col[k]))
                b_left, b_top, b_right, b_bottom = max(b_left, 0), max(b_top, 0), min(b_right, w), min(b_bottom, h)
                draw.rectangle(
                    (left + b_left * zoom, y + LINE_H + 2 + b_top * zoom,
                     left + b_right * zoom - 1, y + LINE_H + 2 + b_bottom * zoom - 1),
                    outline=BOX,
                )  # fmt: skip
    return canvas
