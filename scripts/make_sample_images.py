"""Build the small sample photographs in ``sample_images/`` from scikit-image's data.

Usage::

    python scripts/make_sample_images.py [--photos DIR] [--out DIR]

``--photos`` defaults to ``../shared/photos`` relative to the repository root and
must hold chelsea.png, rocket.jpg, coffee.png, astronaut.png and camera.png.
The output is deterministic for a given Pillow version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageOps

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PHOTOS = REPO_ROOT.parent / "shared" / "photos"
DEFAULT_OUT = REPO_ROOT / "sample_images"

JPEG_QUALITY = 85
EXIF_ORIENTATION_TAG = 0x0112  # 274
ORIENTATION_ROTATE_90_CW = 6  # "display = stored rotated 90 degrees clockwise"


def _open_rgb(path: Path) -> Image.Image:
    """Open an image, apply any EXIF orientation and convert it to RGB."""
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def _resize_width(im: Image.Image, width: int) -> Image.Image:
    """Resize ``im`` to ``width`` pixels wide, keeping the aspect ratio."""
    height = round(im.height * width / im.width)
    return im.resize((width, height), Image.Resampling.LANCZOS)


def make_cat(photos: Path, out: Path) -> Path:
    """cat.jpg: chelsea.png re-encoded as a landscape JPEG at full size."""
    dst = out / "cat.jpg"
    _open_rgb(photos / "chelsea.png").save(dst, "JPEG", quality=JPEG_QUALITY)
    return dst


def make_rocket(photos: Path, out: Path) -> Path:
    """rocket_exif_rotated.jpg: portrait rocket stored sideways with EXIF Orientation=6.

    scikit-image's rocket.jpg is a 640x427 landscape frame, so a centred 320x427
    portrait crop (rocket plus the two nearer towers) is taken first.  The stored
    pixels are that upright crop rotated 90 degrees counter-clockwise; Orientation=6
    tells viewers (and ``ImageOps.exif_transpose``) to rotate it back clockwise.
    """
    dst = out / "rocket_exif_rotated.jpg"
    src = _open_rgb(photos / "rocket.jpg")
    crop_w = min(src.width, (src.height * 3) // 4)
    left = (src.width - crop_w) // 2
    upright = src.crop((left, 0, left + crop_w, src.height))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ORIENTATION_ROTATE_90_CW
    stored.save(dst, "JPEG", quality=JPEG_QUALITY, exif=exif.tobytes())
    return dst


def make_coffee(photos: Path, out: Path) -> Path:
    """coffee.png: coffee.png downscaled to 400 pixels wide."""
    dst = out / "coffee.png"
    _resize_width(_open_rgb(photos / "coffee.png"), 400).save(dst, "PNG", optimize=True)
    return dst


def make_astronaut(photos: Path, out: Path) -> Path:
    """astronaut.jpg: astronaut.png downscaled to 384x384 and JPEG-encoded."""
    dst = out / "astronaut.jpg"
    im = _open_rgb(photos / "astronaut.png").resize((384, 384), Image.Resampling.LANCZOS)
    im.save(dst, "JPEG", quality=JPEG_QUALITY)
    return dst


def make_camera_gray(photos: Path, out: Path) -> Path:
    """camera_gray.png: the grayscale cameraman downscaled to 320x320, mode 'L'."""
    dst = out / "camera_gray.png"
    with Image.open(photos / "camera.png") as im:
        gray = im.convert("L").resize((320, 320), Image.Resampling.LANCZOS)
    gray.save(dst, "PNG", optimize=True)
    return dst


def verify(out: Path) -> None:
    """Check the properties the rest of the project relies on; raise on failure."""
    with Image.open(out / "rocket_exif_rotated.jpg") as im:
        orientation = im.getexif().get(EXIF_ORIENTATION_TAG)
        if orientation != ORIENTATION_ROTATE_90_CW:
            raise AssertionError(f"rocket orientation tag is {orientation!r}, expected 6")
        if im.width <= im.height:
            raise AssertionError(f"rocket stored pixels should be landscape, got {im.size}")
        upright = ImageOps.exif_transpose(im)
        if upright.width >= upright.height:
            raise AssertionError(f"rocket after exif_transpose not portrait: {upright.size}")
    with Image.open(out / "cat.jpg") as im:
        if im.format != "JPEG" or im.width <= im.height:
            raise AssertionError("cat.jpg should be a landscape JPEG")
    with Image.open(out / "camera_gray.png") as im:
        if im.mode != "L":
            raise AssertionError(f"camera_gray.png mode is {im.mode}, expected L")
    total = sum(p.stat().st_size for p in out.iterdir() if p.suffix in {".jpg", ".png"})
    if total >= 2 * 1024 * 1024:
        raise AssertionError(f"sample images total {total} bytes, must be under 2 MB")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="source photo dir")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output dir")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    makers = (make_cat, make_rocket, make_coffee, make_astronaut, make_camera_gray)
    for make in makers:
        dst = make(args.photos, args.out)
        with Image.open(dst) as im:
            size, mode = im.size, im.mode
        kb = dst.stat().st_size / 1024
        print(f"{dst.name:26s} {size[0]}x{size[1]} {mode:3s} {kb:6.1f} kB")
    verify(args.out)
    print("verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
