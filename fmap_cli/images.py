"""Decode images and preprocess them into network input, with Pillow and numpy only.

Semantics follow torchvision's ``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on PIL
images: EXIF orientation applied; any mode converted to RGB (alpha composited onto a background
colour, 16-bit greyscale scaled by 1/65535 instead of clipped); the shorter side resized with
antialiased bilinear interpolation; a centre crop; pixels scaled to [0, 1]; per-channel
``(x - mean) / std``.

Refused, with a message naming the file: anything but a regular file (a FIFO would block, /dev/zero
never ends), files over ``MAX_FILE_BYTES``, images over ``MAX_PIXELS`` and images with one side over
``MAX_ASPECT`` times the other.
"""

from __future__ import annotations

import hashlib
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, first_line

_HIGH_DEPTH_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
# Pillow refuses images over 2x this many pixels and only warns above it; fmap refuses both.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# A file is read whole (its bytes are hashed, then decoded), so its size is bounded. 1 GiB is above
# any image within MAX_PIXELS stored uncompressed at 8 bytes a pixel (16-bit RGBA: 716 MB).
MAX_FILE_BYTES = 1 << 30
# Longer side / shorter side above this is refused: resizing such a strip makes a picture of one
# stretched row or column, nothing a CNN can use.
MAX_ASPECT = 100
# The picture is resized whole, then cropped, when the resized picture has at most this many pixels
# (or 4x the crop's): bit-identical to torchvision's Resize + CenterCrop, at a bounded cost. Beyond,
# only the part the crop keeps is resized: resized whole, a 1x5000 strip would take 1 GB.
WHOLE_RESIZE_PIXELS = 1 << 22
# What a path that is not a regular file is, for the message.
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True)
class Preprocessing:
    """Every parameter of the preprocessing, recorded in the output file.

    ``size`` None means --no-resize: images are fed at their own size (all must be equal).
    ``resize`` is the shorter side before the crop (torchvision ``Resize(resize)``); None resizes
    just enough to cover ``size``.
    """

    size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
    background: tuple[int, int, int] = (255, 255, 255)

    def describe(self) -> dict[str, Any]:
        """The steps applied, in order, as JSON-able data."""
        steps: list[dict[str, Any]] = [
            {"step": "exif_transpose"},
            {
                "step": "to_rgb",
                "alpha_background": list(self.background),
                "high_bit_depth": "16-bit greyscale divided by 65535, replicated to 3 channels",
            },
        ]
        if self.size is not None:
            shorter = self.resize if self.resize is not None else "cover"
            steps.append({"step": "resize", "shorter_side": shorter, "interpolation": "bilinear", "antialias": True})
            steps.append({"step": "center_crop", "size": list(self.size)})
        steps.append({"step": "to_float", "scale": "1/255 (8-bit)", "range": [0.0, 1.0]})
        steps.append({"step": "normalize", "mean": list(self.mean), "std": list(self.std)})
        return {"input_size": list(self.size) if self.size else "native", "steps": steps}


@dataclass(frozen=True)
class DecodedImage:
    """One image file, decoded and oriented, with what the output file records about it."""

    path: str
    image: Image.Image  # mode "RGB", or "F" (values in [0, 1]) for high-bit-depth greyscale
    original_size: tuple[int, int]  # (H, W) after EXIF orientation
    sha256: str


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images, ready to become a tensor."""

    paths: list[str]
    original_sizes: np.ndarray  # (N, 2) int64
    sha256: list[str]
    pixels: np.ndarray  # (N, 3, H, W) float32, normalised
    indices: list[int]  # positions in the whole input list


def _not_regular(path: str, mode: int) -> ImageError | None:
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return ImageError(f"{path}: not a regular file ({kind}); give an image file")


@contextmanager
def _open_image_file(path: str) -> Iterator[tuple[BinaryIO, int]]:
    """Open an image file for reading: a regular file of at most ``MAX_FILE_BYTES``.

    The path is checked with stat() before open(): opening a FIFO blocks until a writer comes, and a
    device such as /dev/zero never ends. The open file is checked again, without blocking, in case
    the path changed in between.

    Yields:
        The open file and its size in bytes.

    Raises:
        ImageError: missing, unreadable, not a regular file, or too large; the message names it.
    """
    try:
        error = _not_regular(path, Path(path).stat().st_mode)
        if error is not None:
            raise error
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        handle = os.fdopen(os.open(path, flags), "rb")
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with handle:
        info = os.fstat(handle.fileno())
        error = _not_regular(path, info.st_mode)
        if error is not None:
            raise error
        if info.st_size > MAX_FILE_BYTES:
            raise _too_large(path, f"{info.st_size} bytes")
        yield handle, info.st_size


def _too_large(path: str, detail: str) -> ImageError:
    return ImageError(f"{path}: too large for an image file ({detail}; limit {MAX_FILE_BYTES} bytes)")


def _read(path: str) -> bytes:
    with _open_image_file(path) as (handle, _):
        try:
            data = handle.read(MAX_FILE_BYTES + 1)  # bounded even if the file grows while read
        except OSError as exc:
            raise ImageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_large(path, "it grew while read")
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes), not an image")
    return data


def _identify(path: str, source: BinaryIO, size: int) -> Image.Image:
    """Open lazily (header only), refusing non-images and decompression bombs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            if image.width * image.height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels")
    except UnidentifiedImageError:
        kind = "empty file (0 bytes), not an image" if size == 0 else "not an image file Pillow can read"
        raise ImageError(f"{path}: {kind}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(path, exc) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot read image header: {first_line(exc)}") from None
    return image


def _bomb(path: str, exc: Exception) -> ImageError:
    return ImageError(
        f"{path}: refused as a possible decompression bomb ({first_line(exc)}; limit {MAX_PIXELS} pixels)"
    )


def _check_shape(path: str, height: int, width: int) -> None:
    """Refuse a picture too elongated to resize (see MAX_ASPECT)."""
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise ImageError(
            f"{path}: size {height}x{width} is too elongated to use "
            f"(one side over {MAX_ASPECT} times the other); crop it first"
        )


def check_image(path: str) -> tuple[int, int]:
    """Cheap early check reading only the header: the file is an image of a sane size.

    Returns:
        Its (H, W) after EXIF orientation.
    """
    with _open_image_file(path) as (handle, size), _identify(path, handle, size) as image:
        height, width = image.height, image.width
        try:
            orientation = image.getexif().get(0x0112, 1)
        except (OSError, ValueError, SyntaxError):  # a broken EXIF block fails at decode, with its name
            orientation = 1
    if orientation in (5, 6, 7, 8):
        height, width = width, height
    _check_shape(path, height, width)
    return height, width


def decode_image(path: str | os.PathLike[str], background: tuple[int, int, int] = (255, 255, 255)) -> DecodedImage:
    """Read, fully decode and orient one image; convert it to RGB (or "F" for 16-bit greyscale).

    Raises:
        ImageError: missing, empty, truncated, corrupt, oversized or too elongated file, or not a
            regular file; the message names it.
    """
    name = os.fsdecode(path)
    data = _read(name)
    image = _identify(name, BytesIO(data), len(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()  # some formats (GIF, ICO, ...) learn their size here, and check it again
        image = ImageOps.exif_transpose(image)
        _check_shape(name, image.height, image.width)
        image = _to_rgb(image, background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(name, exc) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{name}: cannot decode image: {first_line(exc)}") from None
    return DecodedImage(name, image, (image.height, image.width), hashlib.sha256(data).hexdigest())


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        scale = _HIGH_DEPTH_MODES[image.mode]
        values = np.asarray(image, dtype=np.float32) / scale
        return Image.fromarray(np.clip(values, 0.0, 1.0).astype(np.float32))  # 2-D float32 -> mode "F"
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _resize_and_crop(image: Image.Image, size: tuple[int, int], shorter: int | None) -> Image.Image:
    height, width = size
    h, w = image.height, image.width
    if shorter is None:  # just cover the crop, keeping the aspect ratio (= Resize(224) for 224x224)
        if height / h >= width / w:
            new_h, new_w = height, max(width, int(w * height / h))
        else:
            new_h, new_w = max(height, int(h * width / w)), width
    elif w <= h:  # torchvision: the shorter side gets `shorter`, the longer side is truncated
        new_w, new_h = shorter, int(shorter * h / w)
    else:
        new_h, new_w = shorter, int(shorter * w / h)
    # torchvision's CenterCrop offsets; a crop larger than the image pads with zeros.
    top, left = round((new_h - height) / 2.0), round((new_w - width) / 2.0)
    crop = (left, top, left + width, top + height)
    if new_h * new_w <= max(WHOLE_RESIZE_PIXELS, 4 * height * width):
        if (new_h, new_w) != (h, w):
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        return image.crop(crop)
    return _resize_part(image, (new_w, new_h), crop)


def _resize_part(image: Image.Image, new_size: tuple[int, int], crop: tuple[int, int, int, int]) -> Image.Image:
    """``image.resize(new_size).crop(crop)``, resizing only the part the crop keeps: O(crop) work.

    Pillow's ``box`` maps each output pixel to the source point a whole resize would, but rounds the
    box to float32; that may flip the rounding of a pixel once per pass (horizontal, vertical), so
    8-bit values differ from the whole resize by at most 2/255.
    """
    new_w, new_h = new_size
    w, h = image.size
    kept = (max(crop[0], 0), max(crop[1], 0), min(crop[2], new_w), min(crop[3], new_h))
    box = (kept[0] * w / new_w, kept[1] * h / new_h, kept[2] * w / new_w, kept[3] * h / new_h)
    part = image.resize((kept[2] - kept[0], kept[3] - kept[1]), Image.Resampling.BILINEAR, box=box)
    if kept == crop:
        return part
    padded = Image.new(image.mode, (crop[2] - crop[0], crop[3] - crop[1]))  # zeros, as Image.crop pads
    padded.paste(part, (kept[0] - crop[0], kept[1] - crop[1]))
    return padded


def preprocess(decoded: DecodedImage, prep: Preprocessing) -> np.ndarray:
    """One decoded image -> (3, H, W) float32, normalised."""
    image = decoded.image
    if prep.size is not None:
        image = _resize_and_crop(image, prep.size, prep.resize)
    if image.mode == "F":
        pixels = np.repeat(np.asarray(image, dtype=np.float32)[None], 3, axis=0)  # (3, H, W)
    else:
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)  # (3, H, W)
    mean = np.asarray(prep.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(prep.std, dtype=np.float32)[:, None, None]
    # C order: the transpose above keeps Pillow's (H, W, C) memory order, and a batch in that order is
    # channels-last to torch, whose convolutions then round differently from the model's own forward
    # on a contiguous batch (what torch.stack of ToTensor outputs gives)
    return np.ascontiguousarray((pixels - mean) / std, dtype=np.float32)


@dataclass(frozen=True)
class Failure:
    """An image skipped with --skip-bad."""

    index: int  # position in the whole input list
    path: str
    reason: str


def load_batch(
    items: Sequence[tuple[int, str]], prep: Preprocessing, skip_bad: bool = False
) -> tuple[ImageBatch | None, list[Failure]]:
    """Decode and preprocess ``(position, path)`` items into one batch, in the order given.

    With ``skip_bad``, an image that cannot be decoded becomes a Failure instead of an error.

    Raises:
        ImageError: a file cannot be decoded (without ``skip_bad``), or with ``size=None`` its size
            differs from the first.
    """
    kept: list[tuple[int, DecodedImage, np.ndarray]] = []
    failures: list[Failure] = []
    for index, path in items:
        try:
            decoded = decode_image(path, prep.background)
            kept.append((index, decoded, preprocess(decoded, prep)))
        except ImageError as exc:
            if not skip_bad:
                raise
            failures.append(Failure(index, os.fsdecode(path), str(exc).removeprefix(f"{path}: ")))
    if not kept:
        return None, failures
    first = kept[0][2].shape
    for _, decoded, array in kept:
        if array.shape != first:
            raise ImageError(
                f"{decoded.path}: size {decoded.original_size[0]}x{decoded.original_size[1]} differs from "
                f"{kept[0][1].path} ({first[1]}x{first[2]}); --no-resize needs images of equal size"
            )
    return (
        ImageBatch(
            paths=[d.path for _, d, _ in kept],
            original_sizes=np.asarray([d.original_size for _, d, _ in kept], dtype=np.int64).reshape(-1, 2),
            sha256=[d.sha256 for _, d, _ in kept],
            pixels=np.stack([a for _, _, a in kept]),
            indices=[i for i, _, _ in kept],
        ),
        failures,
    )
