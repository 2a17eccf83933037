"""Pictures of a layer's maps for ``fmap render``: every channel in one grid, one channel as a heat
map over the input image, or a channel's top-K receptive-field patches. h5py, numpy and Pillow only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from . import colormaps
from .analysis import layer_stats
from .drawing import BACKGROUND, LINE_H, RED, LegendLine, fit, legend, stack, write
from .errors import FmapError, UsageError, did_you_mean
from .receptive import overlay, top_patches
from .store import schema
from .store.atomic import AtomicOutput, check_target
from .store.axes import layer_axes, layer_tokens, pictures
from .store.layout import file_kind
from .store.reader import check_channel, layer_group, printable, reading

ROLES = ("activation", "preactivation", "both")
SCALES = ("tile", "layer")
TILE_MIN = 48  # maps smaller than this (longer side) are enlarged by an integer factor
PAD = 6  # between cells; the dead-channel frame is drawn inside it
GAP = 2  # between the z and a tiles of one channel (--role both)
FRAME = (160, 160, 160)


@dataclass(frozen=True)
class RenderOptions:
    """What to draw; ``role`` and ``scale`` apply to the grid only (None: their defaults)."""

    file: Path
    layer: str | None = None  # needed for maps files
    image: str = "0"  # index or stored path (or file name) of the image
    role: str | None = None  # activation (default when the layer has a), preactivation, both
    scale: str | None = None  # tile (default) or layer
    overlay: int | None = None  # channel to overlay on the input image
    top: int | None = None  # K patches of --channel
    channel: int | None = None
    full: bool = False  # projection files: whole pictures instead of receptive-field crops


def render(options: RenderOptions) -> Image.Image:
    """The picture ``options`` ask for.

    Raises:
        UsageError, UnknownLayerError: options that do not fit together or do not fit the file.
        FmapFileError: not a complete fmap file, or damaged; FmapError: the input image is needed but
            neither stored nor readable.
    """
    _check(options)
    with reading(options.file, kinds=(schema.MAPS, schema.PROJECTION, schema.OCCLUSION)) as f:
        if file_kind(f) == schema.PROJECTION:
            return _projection_figure(f, options)
        if file_kind(f) == schema.OCCLUSION:
            return _occlusion_figure(f, options)
        if options.full:
            raise UsageError("--full draws projection files (fmap project); for maps files leave it out")
        if options.layer is None:
            raise UsageError("--layer L is needed for maps files (which layer to draw?)")
        group = layer_group(f, options.layer)
        if options.top is not None:
            assert options.channel is not None  # _check
            check_channel(group, options.channel)
            stats = layer_stats(group)
            c = options.channel
            return top_patches(f, group, c, options.top, stats.image_max[:, c], stats.image_argmax[:, c])
        n = image_index(f, options.image)
        if options.overlay is not None:
            check_channel(group, options.overlay)
            return overlay(f, group, options.overlay, n)
        return grid(f, group, n, options.role, options.scale or "tile")


def _projection_figure(f: h5py.File, options: RenderOptions) -> Image.Image:
    """Zeiler's Fig. 2 for a projection file (``projection_views.figure``)."""
    given = [flag for flag, value in (("--layer", options.layer), ("--role", options.role), ("--scale", options.scale),
             ("--overlay", options.overlay), ("--top", options.top), ("--channel", options.channel),
             ("--image", None if options.image == "0" else options.image)) if value is not None]  # fmt: skip
    if given:
        raise UsageError(f"{', '.join(given)}: for maps files; a projection file is drawn whole (--full: uncropped)")
    from .projection_views import figure

    return figure(f, options.full)


def _occlusion_figure(f: h5py.File, options: RenderOptions) -> Image.Image:
    """Zeiler's Fig. 7 rows for an occlusion file (``occlusion_views.figure``)."""
    given = [flag for flag, value in (("--layer", options.layer), ("--role", options.role), ("--scale", options.scale),
             ("--overlay", options.overlay), ("--top", options.top), ("--channel", options.channel))
             if value is not None]  # fmt: skip
    if options.full:
        raise UsageError("--full draws projection files (fmap project); for occlusion files leave it out")
    if given:
        raise UsageError(f"{', '.join(given)}: for maps files; an occlusion file is drawn per --image (INDEX|PATH|all)")
    from .occlusion_views import figure

    return figure(f, options.image)


def _check(options: RenderOptions) -> None:
    grid_only = [flag for flag, value in (("--role", options.role), ("--scale", options.scale)) if value]
    if options.overlay is not None and options.top is not None:
        raise UsageError("--overlay and --top draw different pictures; give one of them")
    if (options.top is None) != (options.channel is None):
        raise UsageError("--top K needs --channel C (and --channel is only used with --top)")
    if grid_only and (options.overlay is not None or options.top is not None):
        raise UsageError(f"{' and '.join(grid_only)} apply to the channel grid, not to --overlay or --top")
    if options.role is not None and options.role not in ROLES:
        raise UsageError(f"--role must be one of {', '.join(ROLES)}, got {options.role!r}")
    if options.scale is not None and options.scale not in SCALES:
        raise UsageError(f"--scale must be one of {', '.join(SCALES)}, got {options.scale!r}")


def image_index(f: h5py.File, image: str) -> int:
    """The index of ``image``: an index 0..N-1, a path as stored, or a stored path's file name.

    Raises:
        UsageError: out of range, or no (or more than one) stored image matches.
    """
    paths = list(f[schema.IMAGES]["path"].asstr()[...])
    if re.fullmatch(r"-?\d+", image):
        n = int(image)
        if not 0 <= n < len(paths):
            raise UsageError(f"--image {n} out of range: the file has images 0..{len(paths) - 1}")
        return n
    matches = [i for i, p in enumerate(paths) if p == image] or [
        i for i, p in enumerate(paths) if Path(p).name == Path(image).name
    ]
    if len(matches) != 1:
        why = "matches several images" if matches else "is not an image in this file"
        hint = printable(did_you_mean(image, paths))  # a stored path: untrusted text
        raise UsageError(f"--image {image!r} {why}; {hint}give an index 0..{len(paths) - 1} or a stored path")
    return matches[0]


def default_output(options: RenderOptions) -> Path:
    """``<file stem>.<layer>[.overlayC|.topK-cC][.<image>][.<role>][.<scale>].png`` in the current
    directory, naming every choice that changes the picture (the image unless it is image 0; role
    and scale when given); for occlusion and projection files ``<file stem>[.full][.<image>].png``."""
    image = "" if options.image == "0" or options.top is not None else "." + _safe(options.image)
    if options.layer is None:
        return Path(f"{options.file.stem}{'.full' if options.full else ''}{image}.png")
    what = ""
    if options.overlay is not None:
        what = f".overlay{options.overlay}"
    elif options.top is not None:
        what = f".top{options.top}-c{options.channel}"
    grid = "".join(f".{value}" for value in (options.role, options.scale) if value is not None)
    return Path(f"{options.file.stem}.{_safe(options.layer)}{what}{image}{grid}.png")


def _safe(text: str) -> str:
    """``text`` as part of a file name: letters, digits, '.', '_' and '-' kept, the rest '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def render_png(options: RenderOptions, out: Path | None = None, overwrite: bool = False) -> Path:
    """Render and write the PNG atomically; returns its path (``default_output`` without ``out``).

    Raises:
        UsageError: ``out`` cannot be published (exists without ``overwrite``, is not a regular
            file, is the input file, or its directory is missing); see also :func:`render`.
        FmapError: the PNG could not be written.
    """
    out = out or default_output(options)
    check_target(out, overwrite, [options.file], flag="-o")  # before any work
    picture = render(options)
    with AtomicOutput(out, overwrite) as tmp:
        try:
            picture.save(tmp.path, format="PNG")
        except OSError as exc:
            raise FmapError(f"{out}: cannot write: {exc.strerror or exc}") from None
        tmp.publish()
    return out


# ---------------------------------------------------------------------------- the channel grid


@dataclass(frozen=True)
class GridLayout:
    """Where each tile of a grid lies: cells of a label strip over one tile (two with --role both)."""

    channels: int
    tile: tuple[int, int]  # (height, width) of one tile in pixels, after enlarging
    zoom: int  # integer enlargement of each map unit
    panels: int  # tiles per channel: 1, or 2 (z then a)
    columns: int
    top: int  # height of the title above the cells

    @classmethod
    def fit(cls, channels: int, map_size: tuple[int, int], panels: int, top: int = LINE_H + 4) -> GridLayout:
        """A layout of ``channels`` cells as close to square as the cell shape allows."""
        zoom = max(1, math.ceil(TILE_MIN / max(map_size)))
        tile = (map_size[0] * zoom, map_size[1] * zoom)
        cell_w = panels * tile[1] + (panels - 1) * GAP + PAD
        cell_h = LINE_H + tile[0] + PAD
        columns = max(1, min(channels, round(math.sqrt(channels * cell_h / cell_w))))
        return cls(channels, tile, zoom, panels, columns, top)

    @property
    def rows(self) -> int:
        return math.ceil(self.channels / self.columns)

    @property
    def cell(self) -> tuple[int, int]:
        """(width, height) of one cell, padding included."""
        return self.panels * self.tile[1] + (self.panels - 1) * GAP + PAD, LINE_H + self.tile[0] + PAD

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the grid, title included."""
        return PAD + self.columns * self.cell[0], self.top + PAD + self.rows * self.cell[1]

    def label_box(self, channel: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a channel's label strip."""
        x, y = self._origin(channel)
        return x, y, x + self.cell[0] - PAD, y + LINE_H

    def tile_box(self, channel: int, panel: int = 0) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a channel's tile ``panel`` (0, or 1 for a with --role both)."""
        x, y = self._origin(channel)
        left = x + panel * (self.tile[1] + GAP)
        return left, y + LINE_H, left + self.tile[1], y + LINE_H + self.tile[0]

    def _origin(self, channel: int) -> tuple[int, int]:
        row, col = divmod(channel, self.columns)
        return PAD + col * self.cell[0], self.top + PAD + row * self.cell[1]


def _colour(values: np.ndarray, symbol: str, scale_of: np.ndarray) -> np.ndarray:
    """(H, W, 3) colours of a map: a from black up, z blue-white-red around zero; the range is
    taken from ``scale_of`` (the tile itself, or the whole layer)."""
    finite = scale_of[np.isfinite(scale_of)]
    if symbol == "z":
        return colormaps.diverging(values, float(np.abs(finite).max(initial=0.0)))
    return colormaps.sequential(values, min(0.0, float(finite.min(initial=0.0))), float(finite.max(initial=0.0)))


def grid(f: h5py.File, group: h5py.Group, n: int, role: str | None, scale: str) -> Image.Image:
    """Every channel's map of image ``n``, labelled, dead channels framed in red, with a legend."""
    has_a = schema.ACTIVATION in group
    role = role or (schema.ACTIVATION if has_a else schema.PREACTIVATION)
    name = group.name.rsplit("/", 1)[-1]
    if role != schema.PREACTIVATION and not has_a:
        raise UsageError(f"layer '{name}' has no activation (no nonlinearity follows it); use --role preactivation")
    wanted = {"activation": [schema.ACTIVATION], "preactivation": [schema.PREACTIVATION]}.get(
        role, [schema.PREACTIVATION, schema.ACTIVATION]
    )
    axes, tokens = layer_axes(group), layer_tokens(group)
    try:  # role -> (C, rows, columns) along the maps' own axes
        maps = {r: pictures(group[r][n].astype(np.float64), axes, tokens) for r in wanted}
    except ValueError as exc:
        raise UsageError(f"layer '{printable(name)}': {exc}; fmap render draws maps on the image grid") from None
    channels, h, w = next(iter(maps.values())).shape
    dead = layer_stats(group).dead if has_a else np.zeros(channels, dtype=bool)
    layout = GridLayout.fit(channels, (h, w), len(maps))
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    path = f[schema.IMAGES]["path"].asstr()[n]
    write(draw, (PAD, 2), fit(f"{name}  image [{n}] {path}", layout.size[0] - PAD))
    for c in range(channels):
        for panel, (r, values) in enumerate(maps.items()):
            symbol = "a" if r == schema.ACTIVATION else "z"
            rgb = _colour(values[c], symbol, values if scale == "layer" else values[c])
            tile = Image.fromarray(rgb.astype(np.uint8), "RGB").resize(
                (layout.tile[1], layout.tile[0]), Image.Resampling.NEAREST
            )
            left, top, right, bottom = layout.tile_box(c, panel)
            canvas.paste(tile, (left, top))
            draw.rectangle((left - 1, top - 1, right, bottom), outline=RED if dead[c] else FRAME)
        left, top, right, _ = layout.label_box(c)
        suffix = " z|a" if len(maps) == 2 else ""
        write(draw, (left, top), f"{c}{suffix}")
        if dead[c]:
            write(draw, (right - 24, top), "dead", RED)
            _, tile_top, tile_right, tile_bottom = layout.tile_box(c, len(maps) - 1)
            draw.rectangle((left - 3, tile_top - 3, tile_right + 2, tile_bottom + 2), outline=RED, width=2)
    return stack([canvas, legend(_legend_lines(maps, scale, bool(dead.any())), canvas.width)])


def _legend_lines(maps: dict[str, np.ndarray], scale: str, any_dead: bool) -> list[LegendLine]:
    lines = []
    for r, values in maps.items():
        finite = values[np.isfinite(values)]
        lo, hi = float(finite.min(initial=0.0)), float(finite.max(initial=0.0))
        if r == schema.ACTIVATION:
            left, right = ("0", "tile max") if scale == "tile" else (f"{min(lo, 0.0):.3g}", f"{hi:.3g}")
            table = colormaps.SEQUENTIAL
        else:
            limit = max(abs(lo), abs(hi))
            left, right = ("-max|z|", "+max|z|") if scale == "tile" else (f"{-limit:.3g}", f"{limit:.3g}")
            table = colormaps.DIVERGING
        how = "each tile scaled to itself" if scale == "tile" else "one scale for the layer"
        symbol = "a" if r == schema.ACTIVATION else "z (0 = white)"
        lines.append(LegendLine(f"{symbol}: {how}; values on this image {lo:.4g} .. {hi:.4g}", table, left, right))
    if any_dead:
        lines.append(LegendLine("red frame: dead channel (a = 0 on every image in the file)"))
    return lines
