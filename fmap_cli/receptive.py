"""Where a unit looks in the input: the input pictures, heat-map overlays placed by receptive-field
geometry (``geometry.py``) and a channel's top-K receptive-field patches (for ``fmap render``).
h5py, numpy and Pillow only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from . import colormaps
from .analysis import top_images
from .drawing import BACKGROUND, LINE_H, LegendLine, fit, legend, stack, write
from .errors import FmapError, ImageError, first_line
from .geometry import Geometry
from .images import Preprocessing, decode_image, preprocess
from .store import schema
from .store.axes import layer_axes, pictures

ALPHA = 0.8  # opacity of the heat map where the unit fires most
DIM = 0.6  # the input image is darkened so the heat map stands out
OVERLAY_MIN = 256  # pictures smaller than this (longer side) are enlarged by an integer factor
PATCH_SIZE = 96  # longer side of a displayed patch
OUTSIDE = (128, 128, 128)  # patch pixels beyond the image border


def upsample(values: np.ndarray, geometry: Geometry, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map resampled onto the (H, W) input: bilinear between unit centres, flat beyond them."""
    values = np.atleast_2d(values)  # (h, w); a linear layer's single value is (1, 1)
    axes = []
    for axis in (0, 1):
        n = values.shape[axis]
        step = geometry.stride[axis]
        u = (np.arange(size[axis]) - geometry.start[axis]) / step if step else np.zeros(size[axis])
        u = np.clip(u, 0, n - 1)  # fractional unit index of every input pixel
        lo = np.floor(u).astype(np.intp)
        axes.append((lo, np.minimum(lo + 1, n - 1), u - lo))
    (r0, r1, fr), (c0, c1, fc) = axes
    top = values[r0][:, c0] * (1 - fc) + values[r0][:, c1] * fc
    bottom = values[r1][:, c0] * (1 - fc) + values[r1][:, c1] * fc
    result: np.ndarray = top * (1 - fr)[:, None] + bottom * fr[:, None]  # (H, W)
    return result


def preprocessing_of(f: h5py.File) -> Preprocessing:
    """The file's ``preprocessing`` record as a :class:`Preprocessing`.

    Raises:
        ValueError: a record fmap did not write (readers report a damaged file).
    """
    try:
        return Preprocessing.from_record(json.loads(f.attrs["preprocessing"]))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"attribute 'preprocessing' is not a record fmap can use: {first_line(exc)}") from None


def input_picture(f: h5py.File, n: int) -> np.ndarray:
    """Image ``n`` as the network saw it (after resize and crop), (H, W, 3) uint8: from /input, or
    re-read from its path and preprocessed again as the file records.

    Raises:
        FmapError: no /input and the image file is missing, unreadable or changed since extraction.
    """
    return to_picture(input_tensor(f, n), preprocessing_of(f))


def input_tensor(f: h5py.File, n: int) -> np.ndarray:
    """Image ``n`` as fed to the network, (3, H, W) float32 normalised: from /input, or re-read from
    its path (relative to where extract ran) and preprocessed again as the file records.

    Raises:
        FmapError: no /input and the image file is missing, unreadable or changed since extraction.
    """
    prep = preprocessing_of(f)
    if schema.INPUT in f:
        pixels: np.ndarray = f[schema.INPUT][n]  # (3, H, W), normalised
    else:
        path = f[schema.IMAGES]["path"].asstr()[n]
        where = str(f.attrs.get("working_directory", ""))
        if where and not Path(path).is_absolute() and not Path(path).exists():  # relative to where extract ran
            path = str(Path(where) / path)
        try:
            decoded = decode_image(path, prep.background)
        except ImageError as exc:
            raise FmapError(f"{exc}; the file has no /input (extract with --save-input to keep it)") from None
        if decoded.sha256 != f[schema.IMAGES]["sha256"].asstr()[n]:
            raise FmapError(f"{path}: changed since extraction (SHA-256 differs); extract with --save-input")
        pixels = preprocess(decoded, prep)
    return pixels


def to_picture(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """A normalised (3, H, W) input tensor as the (H, W, 3) uint8 picture it came from."""
    mean = np.asarray(prep.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(prep.std, dtype=np.float32)[:, None, None]
    rgb = np.clip(pixels * std + mean, 0.0, 1.0) * 255.0
    picture: np.ndarray = np.rint(rgb).astype(np.uint8).transpose(1, 2, 0)
    return picture


def role_map(group: h5py.Group) -> h5py.Dataset:
    """The map a channel's response is read from: a, or z when the layer has no a."""
    return group[schema.ACTIVATION] if schema.ACTIVATION in group else group[schema.PREACTIVATION]


def overlay(f: h5py.File, group: h5py.Group, channel: int, n: int) -> Image.Image:
    """Channel ``channel``'s map of image ``n`` as a heat map over the input, placed by receptive field."""
    geometry = Geometry.of(group)
    base = input_picture(f, n).astype(np.float64)  # (H, W, 3)
    ds = role_map(group)
    values = pictures(ds[n].astype(np.float64), layer_axes(group), None)[channel]  # (rows, columns)
    lo, hi = min(0.0, float(np.nanmin(values))), float(np.nanmax(values))
    heat = upsample(values, geometry, base.shape[:2])
    t = np.clip((heat - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros(heat.shape)
    alpha = ALPHA * np.sqrt(t)[..., None]  # sqrt: weak responses stay visible
    mixed = DIM * base * (1 - alpha) + colormaps.apply(colormaps.SEQUENTIAL, t) * alpha
    picture = Image.fromarray(np.rint(mixed).astype(np.uint8), "RGB")
    zoom = max(1, math.ceil(OVERLAY_MIN / max(picture.size)))
    picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.Resampling.NEAREST)
    symbol = "a" if ds.name.endswith(schema.ACTIVATION) else "z"
    path = f[schema.IMAGES]["path"].asstr()[n]
    lines = [
        LegendLine(f"{symbol} of channel {channel}", colormaps.SEQUENTIAL, f"{lo:.3g}", f"{hi:.3g}"),
        LegendLine(fit(f"image [{n}] {path}", max(picture.width, 200))),
        LegendLine(
            f"placed by receptive field {geometry.field[0]}x{geometry.field[1]}, "
            f"stride {geometry.stride[0]}x{geometry.stride[1]}"
        ),
    ]
    return stack([picture, legend(lines, picture.width)])


def top_patches(f: h5py.File, group: h5py.Group, channel: int, k: int, image_max: np.ndarray,
                image_argmax: np.ndarray) -> Image.Image:  # fmt: skip
    """The receptive fields of the ``k`` units (one per image) where ``channel`` fires most, in a strip.

    ``image_max`` (N,) and ``image_argmax`` (N, 2) are the channel's per-image statistics.
    """
    geometry = Geometry.of(group)
    paths = f[schema.IMAGES]["path"].asstr()[...]
    scale = PATCH_SIZE / max(geometry.field)
    size = (max(1, round(geometry.field[1] * scale)), max(1, round(geometry.field[0] * scale)))
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    gap, label_h = 6, 2 * LINE_H + 4
    order = top_images(image_max, k)
    strip = Image.new("RGB", (gap + len(order) * (size[0] + gap), gap + size[1] + label_h), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for rank, n in enumerate(order):
        row, col = (int(v) for v in image_argmax[n])
        patch = crop(input_picture(f, int(n)), geometry.box(row, col)).resize(size, resample)
        x = gap + rank * (size[0] + gap)
        strip.paste(patch, (x, gap))
        write(draw, (x, gap + size[1] + 2), fit(f"[{n}] {image_max[n]:.4g}", size[0]))
        write(draw, (x, gap + size[1] + 2 + LINE_H), fit(source_name(paths[n]), size[0]))
    symbol = "a" if role_map(group).name.endswith(schema.ACTIVATION) else "z"
    name = group.name.rsplit("/", 1)[-1]
    note = LegendLine(
        f"{name} channel {channel}: top {len(order)} images by max {symbol} ([index] value), "
        f"receptive field {geometry.field[0]}x{geometry.field[1]} around the maximum; grey = beyond the image"
    )
    return stack([strip, legend([note], strip.width)])


def crop(picture: np.ndarray, box: tuple[int, int, int, int]) -> Image.Image:
    """``box`` of a (H, W, 3) picture; the part beyond its border is grey."""
    left, top, right, bottom = box
    out = np.empty((bottom - top, right - left, 3), dtype=np.uint8)
    out[...] = OUTSIDE
    h, w = picture.shape[:2]
    r0, r1, c0, c1 = max(top, 0), min(bottom, h), max(left, 0), min(right, w)
    if r0 < r1 and c0 < c1:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = picture[r0:r1, c0:c1]
    return Image.fromarray(out, "RGB")


def source_name(path: str) -> str:
    """A short name for an image path (its file name)."""
    return Path(path).name or path
