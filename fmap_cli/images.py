"""Decode images and preprocess them into network input, with Pillow and numpy only.

Semantics follow torchvision's ``Resize`` + ``CenterCrop`` + ``ToTensor`` + ``Normalize`` on PIL
images (and timm's eval transforms for its ``crop_mode`` squash and border): EXIF orientation
applied; any mode converted to RGB (alpha composited onto a background colour, 16-bit greyscale
scaled by 1/65535 instead of clipped); a resize with Pillow's filter of the recipe's interpolation
(what torchvision's ``Resize`` calls on a PIL image); a centre crop, padded where the picture is
smaller; pixels scaled to [0, 1]; per-channel ``(x - mean) / std``.

Refused, with a message naming the file: anything but a regular file (a FIFO would block, /dev/zero
never ends), files over ``MAX_FILE_BYTES``, images over ``MAX_PIXELS`` and images with one side over
``MAX_ASPECT`` times the other.
"""

from __future__ import annotations

import hashlib
import math
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
from .spec import CROP_MODES

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
# Pillow's filter for each of spec.INTERPOLATIONS.
FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
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
    ``resize`` with ``crop_mode`` "center": an int is the shorter side before the crop (torchvision
    ``Resize(resize)``, the longer side truncated); an (H, W) box is covered keeping the aspect ratio,
    sides rounded (timm's ``ResizeKeepRatio``); None covers ``size`` (sides truncated). With "squash"
    the picture is resized to the box, aspect ratio lost; with "border" it is fitted inside the box
    keeping the aspect ratio (sides rounded) and the crop pads it with the mean colour. An int N is
    an N x N box there, None the box ``size``.
    """

    size: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | tuple[int, int] | None = None
    background: tuple[int, int, int] = (255, 255, 255)
    interpolation: str = "bilinear"  # a key of FILTERS
    crop_mode: str = "center"  # one of spec.CROP_MODES
    recipe: str = "fmap default"  # where the values come from
    overridden: tuple[str, ...] = ()  # the options that replaced the recipe's values

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """8-bit colour of the pixels the crop adds beyond the picture: the mean colour for "border"
        (timm's ``CenterCropOrPad`` fill), black otherwise (torchvision's ``CenterCrop``)."""
        if self.crop_mode == "border":
            return (round(255 * self.mean[0]), round(255 * self.mean[1]), round(255 * self.mean[2]))
        return (0, 0, 0)

    def describe(self) -> dict[str, Any]:
        """The steps applied, in order, and where their values come from, as JSON-able data."""
        steps: list[dict[str, Any]] = [
            {"step": "exif_transpose"},
            {
                "step": "to_rgb",
                "alpha_background": list(self.background),
                "high_bit_depth": "16-bit greyscale divided by 65535, replicated to 3 channels",
            },
        ]
        if self.size is not None:
            steps.append(self._resize_step())
            steps.append({"step": "center_crop", "size": list(self.size), "pad_fill": list(self.pad_fill)})
        steps.append({"step": "to_float", "scale": "1/255 (8-bit)", "range": [0.0, 1.0]})
        steps.append({"step": "normalize", "mean": list(self.mean), "std": list(self.std)})
        return {
            "input_size": list(self.size) if self.size else "native",
            "recipe": {"source": self.recipe, "overridden_by": list(self.overridden)},
            "steps": steps,
        }

    def _resize_step(self) -> dict[str, Any]:
        step: dict[str, Any] = {"step": "resize", "crop_mode": self.crop_mode}
        box = self.resize_box()
        if box is None:
            shorter = self.resize if isinstance(self.resize, int) else "cover"
            step["shorter_side"] = shorter
            step["rule"] = (
                f"shorter side to {shorter}, the other scaled and truncated (torchvision Resize({shorter}))"
                if isinstance(shorter, int)
                else "just cover the crop keeping the aspect ratio, sides truncated"
            )
        else:
            step["box"] = list(box)
            step["rule"] = {
                "center": "cover the box keeping the aspect ratio, sides rounded (timm ResizeKeepRatio)",
                "squash": "both sides to the box, aspect ratio not kept (timm crop_mode squash)",
                "border": "fit inside the box keeping the aspect ratio, sides rounded (timm crop_mode border)",
            }[self.crop_mode]
        step["interpolation"] = self.interpolation
        step["antialias"] = self.interpolation != "nearest"  # Pillow widens every other filter when shrinking
        return step

    def resize_box(self) -> tuple[int, int] | None:
        """The (H, W) box the picture is resized against, or None for a shorter-side rule."""
        if self.crop_mode == "center":
            return self.resize if isinstance(self.resize, tuple) else None
        if isinstance(self.resize, int):
            return (self.resize, self.resize)
        return self.resize or self.size

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Preprocessing:
        """The inverse of :meth:`describe`: a file's ``preprocessing`` record (older files without
        interpolation, crop mode or recipe were bilinear, centre-cropped, with fmap's default recipe)."""
        steps = {step["step"]: step for step in record["steps"]}
        size = record["input_size"]
        resize_step = steps.get("resize", {})
        resize: int | tuple[int, int] | None = None
        if "box" in resize_step:
            resize = (int(resize_step["box"][0]), int(resize_step["box"][1]))
        elif isinstance(resize_step.get("shorter_side"), int):
            resize = int(resize_step["shorter_side"])
        recipe = record.get("recipe", {})
        prep = cls(
            size=None if size == "native" else (int(size[0]), int(size[1])),
            mean=tuple(steps["normalize"]["mean"]),
            std=tuple(steps["normalize"]["std"]),
            resize=resize,
            background=tuple(steps.get("to_rgb", {}).get("alpha_background", (255, 255, 255))),
            interpolation=resize_step.get("interpolation", "bilinear"),
            crop_mode=resize_step.get("crop_mode", CROP_MODES[0]),
            recipe=recipe.get("source", "fmap default"),
            overridden=tuple(recipe.get("overridden_by", ())),
        )
        # values the steps would use without complaint, or fail on far from the record
        resized = () if prep.resize is None else prep.resize if isinstance(prep.resize, tuple) else (prep.resize,)
        numbers = [*prep.mean, *prep.std]
        if prep.interpolation not in FILTERS:
            raise ValueError(f"interpolation {prep.interpolation!r} is not one of {', '.join(FILTERS)}")
        if prep.crop_mode not in CROP_MODES:
            raise ValueError(f"crop mode {prep.crop_mode!r} is not one of {', '.join(CROP_MODES)}")
        finite = all(isinstance(v, int | float) and math.isfinite(v) for v in numbers)
        if len(prep.mean) != 3 or len(prep.std) != 3 or not finite or min(prep.std) <= 0:
            raise ValueError(
                f"normalize needs 3 finite means and 3 positive stds, not {list(prep.mean)} and {list(prep.std)}"
            )
        if min((*(prep.size or ()), *resized), default=1) < 1:
            raise ValueError(f"sizes must be positive, not input_size {size} and resize {prep.resize}")
        return prep


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


def _resized_size(h: int, w: int, size: tuple[int, int], prep: Preprocessing) -> tuple[int, int]:
    """(H, W) an h x w picture is resized to before the crop to ``size`` (see Preprocessing)."""
    height, width = size
    box = prep.resize_box()
    if box is None and isinstance(prep.resize, int):  # torchvision Resize(int): the longer side truncated
        shorter = prep.resize
        return (int(shorter * h / w), shorter) if w <= h else (shorter, int(shorter * w / h))
    if box is None:  # just cover the crop, keeping the aspect ratio
        if height / h >= width / w:
            return height, max(width, int(w * height / h))
        return max(height, int(h * width / w)), width
    if prep.crop_mode == "squash":
        return box
    # timm's ResizeKeepRatio: one scale for both sides, the smaller ratio to cover the box, the larger to fit in it
    ratios = (h / box[0], w / box[1])
    ratio = min(ratios) if prep.crop_mode == "center" else max(ratios)
    return max(1, round(h / ratio)), max(1, round(w / ratio))


def _crop_start(length: int, crop: int) -> int:
    """Where a centred crop starts along one side, as torchvision's ``center_crop``: a crop longer than
    the side pads ``(crop - length) // 2`` before it (negative start), a shorter one starts at the
    rounded centre offset."""
    return -((crop - length) // 2) if crop > length else round((length - crop) / 2.0)


def _resize_and_crop(image: Image.Image, size: tuple[int, int], prep: Preprocessing) -> np.ndarray:
    """Resize and centre-crop one picture to ``size``: (3, H, W) float32 in [0, 1], padded with
    ``prep.pad_fill`` where the crop is larger."""
    height, width = size
    new_h, new_w = _resized_size(image.height, image.width, size, prep)
    top, left = _crop_start(new_h, height), _crop_start(new_w, width)
    # the part of the crop inside the resized picture; the rest is padding
    kept = (max(left, 0), max(top, 0), min(left + width, new_w), min(top + height, new_h))
    resample = FILTERS[prep.interpolation]
    if (new_h, new_w) == (image.height, image.width):  # torchvision's Resize leaves it as it is
        part = image.crop(kept)
    elif new_h * new_w <= max(WHOLE_RESIZE_PIXELS, 4 * height * width):
        part = image.resize((new_w, new_h), resample).crop(kept)
    else:
        part = _resize_part(image, (new_w, new_h), kept, resample)
    values = _to_float(part)  # (3, h, w)
    if kept == (left, top, left + width, top + height):
        return values
    padded = np.empty((3, height, width), dtype=np.float32)
    padded[:] = (np.asarray(prep.pad_fill, dtype=np.float32) / np.float32(255.0))[:, None, None]
    padded[:, kept[1] - top : kept[3] - top, kept[0] - left : kept[2] - left] = values
    return padded


def _resize_part(
    image: Image.Image, new_size: tuple[int, int], kept: tuple[int, int, int, int], resample: Image.Resampling
) -> Image.Image:
    """``image.resize(new_size).crop(kept)``, resizing only the part kept: O(crop) work.

    Pillow's ``box`` maps each output pixel to the source point a whole resize would, but rounds the
    box to float32; that may flip the rounding of a pixel once per pass (horizontal, vertical): 8-bit
    values differ from the whole resize by at most 2/255 with bilinear; bicubic and lanczos amplify
    the flips (on pixel noise, under 2% of the values differ by more); nearest may take the
    neighbouring pixel (under 2%). Float ("F") values differ by under 1e-5.
    """
    new_w, new_h = new_size
    w, h = image.size
    box = (kept[0] * w / new_w, kept[1] * h / new_h, kept[2] * w / new_w, kept[3] * h / new_h)
    return image.resize((kept[2] - kept[0], kept[3] - kept[1]), resample, box=box)


def _to_float(image: Image.Image) -> np.ndarray:
    """A picture as (3, H, W) float32 in [0, 1]."""
    if image.mode == "F":
        return np.repeat(np.asarray(image, dtype=np.float32)[None], 3, axis=0)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


def preprocess(decoded: DecodedImage, prep: Preprocessing) -> np.ndarray:
    """One decoded image -> (3, H, W) float32, normalised."""
    pixels = _to_float(decoded.image) if prep.size is None else _resize_and_crop(decoded.image, prep.size, prep)
    mean = np.asarray(prep.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(prep.std, dtype=np.float32)[:, None, None]
    # C order: the transpose in _to_float keeps Pillow's (H, W, C) memory order, and a batch in that order
    # is channels-last to torch, whose convolutions then round differently from the model's own forward
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
