"""Pillow helpers shared by the pictures of ``fmap render``: text, legend strips, stacking.

Saving goes through ``store.atomic`` (``render.render_png``), like every file fmap writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
RED = (220, 0, 0)
LINE_H = 13  # one line of the default font
BAR_W, BAR_H = 120, 10  # a legend's colour bar
FONT = ImageFont.load_default()


def text_width(text: str) -> int:
    """Width in pixels of ``text`` in the default font."""
    return int(np.ceil(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=FONT)))


def fit(text: str, width: int) -> str:
    """``text``, shortened from the left with '...' to fit ``width`` pixels."""
    if text_width(text) <= width:
        return text
    while text and text_width("..." + text) > width:
        text = text[1:]
    return "..." + text


def write(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, fill: tuple[int, int, int] = INK) -> None:
    """Draw one line of text with its top-left corner at ``xy``."""
    draw.text(xy, text, fill=fill, font=FONT)


@dataclass(frozen=True)
class LegendLine:
    """One line of a legend: an optional colour bar (a (K, 3) table) with end labels, and text."""

    text: str
    table: np.ndarray | None = None
    left: str = ""
    right: str = ""


def legend(lines: list[LegendLine], width: int) -> Image.Image:
    """A legend strip at least ``width`` wide: each line's bar, its end labels, then its text."""
    pad = 4
    rows = []
    for line in lines:
        x = pad
        if line.table is not None:
            x += text_width(line.left) + 3 + BAR_W + 3 + text_width(line.right) + 8
        rows.append((line, x))
    width = max(width, *(x + text_width(line.text) + pad for line, x in rows))
    strip = Image.new("RGB", (width, pad + LINE_H * len(lines) + pad), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for k, (line, x_text) in enumerate(rows):
        y = pad + k * LINE_H
        if line.table is not None:
            x = pad
            write(draw, (x, y), line.left)
            x += text_width(line.left) + 3
            t = np.linspace(0, len(line.table) - 1, BAR_W).round().astype(int)
            bar = np.repeat(line.table[t][None], BAR_H, axis=0)  # (BAR_H, BAR_W, 3)
            strip.paste(Image.fromarray(bar, "RGB"), (x, y + 1))
            write(draw, (x + BAR_W + 3, y), line.right)
        write(draw, (x_text, y), line.text)
    return strip


def stack(parts: list[Image.Image]) -> Image.Image:
    """Pictures one above the other, left-aligned, on the background colour."""
    width = max(part.width for part in parts)
    out = Image.new("RGB", (width, sum(part.height for part in parts)), BACKGROUND)
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    return out
