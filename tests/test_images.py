"""Image decoding and preprocessing (fmap_cli.images): modes, EXIF orientation, resize/crop semantics."""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
import tomllib
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import REPO, SAMPLES, TINY_SPEC, make_photo, tiny_weights
from crafted import craft
from helpers import extract_fails, truncated_jpeg
from PIL import Image

from fmap_cli import images
from fmap_cli.cli import cli
from fmap_cli.errors import ImageError
from fmap_cli.extract import ModelChoice, preprocessing_for
from fmap_cli.images import MAX_PIXELS, Preprocessing, check_image, decode_image, load_batch, preprocess
from fmap_cli.spec import load_spec

MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)
# With mean 0 and std 1 the output is exactly the [0, 1] pixels: handy for checking values.
IDENTITY = Preprocessing(size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def pixels01(path: Path, **kwargs) -> np.ndarray:
    """decode + preprocess at native size without normalisation: (3, H, W) in [0, 1]."""
    return preprocess(decode_image(path, **kwargs), IDENTITY)


# ---------------------------------------------------------------- every mode -> finite (3, H, W) float32


def _save_l(path: Path) -> None:
    Image.fromarray(np.arange(12 * 10, dtype=np.uint8).reshape(12, 10), "L").save(path)


def _save_la(path: Path) -> None:
    grey = np.full((12, 10), 100, np.uint8)
    alpha = np.tile(np.linspace(0, 255, 10).astype(np.uint8), (12, 1))
    Image.merge("LA", [Image.fromarray(grey, "L"), Image.fromarray(alpha, "L")]).save(path)


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (10, 12), 0)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 - 3) * 3)
    for x in range(10):
        image.putpixel((x, 3), 1)
        image.putpixel((x, 6), 2)
    if transparent:
        image.info["transparency"] = 0
    return image


def _save_p(path: Path) -> None:
    _palette(False).save(path)


def _save_p_transparent(path: Path) -> None:
    _palette(True).save(path, transparency=0)


def _save_rgba(path: Path) -> None:
    rgb = np.asarray(make_photo(12, 10, seed=3))
    alpha = np.tile(np.linspace(0, 255, 10).astype(np.uint8), (12, 1))[..., None]
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(path)


def _save_cmyk(path: Path) -> None:
    make_photo(12, 10, seed=4).convert("CMYK").save(path)


def _save_i16(path: Path) -> None:
    Image.fromarray((np.arange(12 * 10, dtype=np.uint16) * 500).reshape(12, 10)).save(path)


def _save_bilevel(path: Path) -> None:
    Image.fromarray(np.arange(12 * 10).reshape(12, 10) % 3 == 0).convert("1").save(path)


MODE_FILES = {
    "L.png": (_save_l, ("L",)),
    "LA.png": (_save_la, ("LA",)),
    "P.png": (_save_p, ("P",)),
    "P_transparent.png": (_save_p_transparent, ("P",)),
    "RGBA.png": (_save_rgba, ("RGBA",)),
    "CMYK.jpg": (_save_cmyk, ("CMYK",)),
    "CMYK.tif": (_save_cmyk, ("CMYK",)),
    "I16.png": (_save_i16, ("I;16", "I")),
    "bilevel.png": (_save_bilevel, ("1",)),
}


@pytest.mark.parametrize("name", sorted(MODE_FILES))
@pytest.mark.parametrize("size", [None, (8, 6)], ids=["native", "resized"])
def test_every_mode_preprocesses_to_finite_rgb(tmp_path: Path, name: str, size: tuple[int, int] | None) -> None:
    save, modes = MODE_FILES[name]
    path = tmp_path / name
    save(path)
    with Image.open(path) as raw:
        assert raw.mode in modes  # the file really exercises this mode
    decoded = decode_image(path)
    assert decoded.original_size == (12, 10)
    assert decoded.image.mode in ("RGB", "F")
    out = preprocess(decoded, Preprocessing(size=size, mean=MEAN, std=STD))
    assert out.dtype == np.float32
    assert out.shape == (3, *(size or (12, 10)))
    assert np.all(np.isfinite(out))
    unnormalised = out * np.asarray(STD, np.float32)[:, None, None] + np.asarray(MEAN, np.float32)[:, None, None]
    assert unnormalised.min() >= -1e-5 and unnormalised.max() <= 1 + 1e-5


def test_p_with_transparency_keeps_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    _save_p_transparent(path)
    with Image.open(path) as raw:
        assert "transparency" in raw.info
    x = pixels01(path)
    assert np.array_equal(x[:, 0, 0], [1.0, 1.0, 1.0])  # palette index 0 is transparent: background white
    assert np.array_equal(x[:, 3, 0], [1.0, 0.0, 0.0])  # index 1: opaque red
    assert np.array_equal(x[:, 6, 0], [0.0, 1.0, 0.0])  # index 2: opaque green


def test_p_without_transparency_uses_palette_colours(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    _save_p(path)
    x = pixels01(path)
    assert np.array_equal(x[:, 0, 0], [0.0, 0.0, 0.0])  # index 0 is black, not the background
    assert np.array_equal(x[:, 3, 0], [1.0, 0.0, 0.0])


# ---------------------------------------------------------------- specific values


def test_rgba_alpha_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent: background
    rgba[0, 1] = (0, 0, 0, 128)  # half transparent black: half way to white
    rgba[0, 2] = (200, 100, 50, 255)  # opaque: unchanged
    rgba[1, :] = (255, 0, 0, 128)  # half transparent red over white
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)

    x = pixels01(path)
    assert np.array_equal(x[:, 0, 0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(x[:, 0, 1], [127.5 / 255] * 3, atol=1.0 / 255)
    np.testing.assert_allclose(x[:, 0, 2], np.array([200, 100, 50]) / 255, atol=1e-7)
    np.testing.assert_allclose(x[:, 1, 0], [1.0, 127.5 / 255, 127.5 / 255], atol=1.0 / 255)

    normalised = preprocess(decode_image(path), Preprocessing(size=None, mean=MEAN, std=STD))
    expected = (1.0 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(normalised[:, 0, 0], expected, rtol=1e-6)


def test_alpha_background_is_configurable(tmp_path: Path) -> None:
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)
    rgba[0, 1] = (200, 200, 200, 128)
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    x = pixels01(path, background=(0, 64, 255))
    np.testing.assert_allclose(x[:, 0, 0], np.array([0, 64, 255]) / 255, atol=1e-7)
    np.testing.assert_allclose(x[:, 0, 1], (np.array([200, 200, 200]) + np.array([0, 64, 255])) / 2 / 255, atol=1 / 255)


def test_la_alpha_composited(tmp_path: Path) -> None:
    grey = Image.fromarray(np.array([[0, 0, 80]], np.uint8), "L")
    alpha = Image.fromarray(np.array([[0, 128, 255]], np.uint8), "L")
    path = tmp_path / "la.png"
    Image.merge("LA", [grey, alpha]).save(path)
    x = pixels01(path)
    assert np.array_equal(x[:, 0, 0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(x[:, 0, 1], [127.5 / 255] * 3, atol=1 / 255)
    np.testing.assert_allclose(x[:, 0, 2], [80 / 255] * 3, atol=1e-7)


def test_16bit_greyscale_scaled_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 1000, 32768, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")
    decoded = decode_image(path)
    assert decoded.original_size == (1, 4)
    x = preprocess(decoded, IDENTITY)
    assert x.shape == (3, 1, 4)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])
    assert x[0, 0, 3] == pytest.approx(1.0, abs=1e-7)  # not 257 (8-bit scale) nor clipped early
    assert x[0, 0, 2] == pytest.approx(0.5, abs=1e-4)
    assert x[0, 0, 1] == pytest.approx(1000 / 65535, abs=1e-7)  # 8-bit scaling would clip this to 1.0
    assert x[0, 0, 0] == 0.0

    normalised = preprocess(decoded, Preprocessing(size=None, mean=MEAN, std=STD))
    np.testing.assert_allclose(normalised[:, 0, 3], (1.0 - np.asarray(MEAN)) / np.asarray(STD), rtol=1e-6)


def test_16bit_greyscale_resized_stays_in_range(tmp_path: Path) -> None:
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(path)
    x = preprocess(decode_image(path), Preprocessing(size=(10, 10), mean=(0, 0, 0), std=(1, 1, 1)))
    np.testing.assert_allclose(x, 1.0, atol=1e-6)


def test_l_replicates_to_three_equal_channels(tmp_path: Path) -> None:
    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10) * 2
    path = tmp_path / "l.png"
    Image.fromarray(grey, "L").save(path)
    x = pixels01(path)
    for c in range(3):
        assert np.array_equal(x[c], grey.astype(np.float32) / np.float32(255))


def test_bilevel_values(tmp_path: Path) -> None:
    bits = np.array([[True, False], [False, True]])
    path = tmp_path / "b.png"
    Image.fromarray(bits).convert("1").save(path)
    x = pixels01(path)
    assert np.array_equal(x, np.broadcast_to(bits.astype(np.float32), (3, 2, 2)))


@pytest.mark.parametrize("suffix,atol", [(".tif", 0.0), (".jpg", 0.03)])
def test_cmyk_converted(tmp_path: Path, suffix: str, atol: float) -> None:
    path = tmp_path / f"cmyk{suffix}"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(path)  # pure cyan
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    x = pixels01(path)
    np.testing.assert_allclose(x[:, 4, 4], [0.0, 1.0, 1.0], atol=atol)


# ---------------------------------------------------------------- EXIF orientation


def _upright() -> np.ndarray:
    return np.asarray(make_photo(40, 30, seed=7))  # H=40, W=30: non-square


# Stored pixels for each EXIF orientation, derived from the tag's meaning (where the stored
# row 0 / column 0 lie in the upright picture U), independently of Pillow's transpose table.
STORED = {
    2: lambda u: u[:, ::-1],  # mirrored horizontally
    3: lambda u: u[::-1, ::-1],  # rotated 180
    4: lambda u: u[::-1, :],  # mirrored vertically
    5: lambda u: u.transpose(1, 0, 2),  # stored[i, j] = U[j, i]
    6: lambda u: np.rot90(u, 1),  # stored[i, j] = U[j, W-1-i]: displayed after 90 deg clockwise
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),  # stored[i, j] = U[H-1-j, W-1-i]
    8: lambda u: np.rot90(u, -1),  # stored[i, j] = U[H-1-j, i]: displayed after 90 deg counter-clockwise
}


def _save_oriented(path: Path, upright: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(STORED[orientation](upright))).save(path, exif=exif)


def test_stored_transforms_match_pillow() -> None:
    """Sanity check of the table above for the cases the brief spells out with Pillow transposes."""
    u = _upright()
    image = Image.fromarray(u)
    assert np.array_equal(STORED[6](u), np.asarray(image.transpose(Image.Transpose.ROTATE_90)))
    assert np.array_equal(STORED[3](u), np.asarray(image.transpose(Image.Transpose.ROTATE_180)))
    assert np.array_equal(STORED[8](u), np.asarray(image.transpose(Image.Transpose.ROTATE_270)))
    h, w = u.shape[:2]
    stored7 = STORED[7](u)
    assert stored7.shape[:2] == (w, h)
    assert np.array_equal(stored7[0, 0], u[h - 1, w - 1])  # stored row 0 = right side, col 0 = bottom


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_orientation_decodes_upright(tmp_path: Path, orientation: int) -> None:
    upright = _upright()
    Image.fromarray(upright).save(tmp_path / "upright.png")
    path = tmp_path / f"o{orientation}.png"
    _save_oriented(path, upright, orientation)
    with Image.open(path) as raw:
        assert raw.getexif().get(0x0112) == orientation
        stored = np.asarray(raw)
    if orientation >= 5:
        assert stored.shape[:2] == (30, 40)  # really stored sideways
    reference = decode_image(tmp_path / "upright.png")
    decoded = decode_image(path)
    assert decoded.original_size == (40, 30) == reference.original_size
    assert np.array_equal(np.asarray(decoded.image), upright)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(reference.image))


def _tiny(tmp_path: Path, extra_input: str = "") -> Path:
    spec_text = TINY_SPEC.replace("[input]\n", "[input]\n" + extra_input)
    spec = tmp_path / "tiny_images.toml"
    spec.write_text(spec_text)
    np.savez(tmp_path / "tiny.npz", **tiny_weights())
    return spec


def _extract(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["extract", *args])
    assert result.exit_code == 0, result.output
    assert result.exception is None


def test_exif_orientation_through_cli_gives_identical_maps(tmp_path: Path) -> None:
    upright = _upright()
    paths = [tmp_path / "upright.png"]
    Image.fromarray(upright).save(paths[0])
    for orientation in (3, 6, 8):
        paths.append(tmp_path / f"o{orientation}.png")
        _save_oriented(paths[-1], upright, orientation)
    spec = _tiny(tmp_path)
    out = tmp_path / "maps.h5"
    _extract([*map(str, paths), "-m", str(spec), "-o", str(out), "--layers", "conv1,conv2", "--save-input"])
    with h5py.File(out, "r") as f:
        assert f["images/original_size"][...].tolist() == [[40, 30]] * 4
        x = f["input"][...]
        assert not np.array_equal(x[0], x[0, :, ::-1])  # the picture is not symmetric
        for i in range(1, 4):
            assert np.array_equal(x[i], x[0])
            for layer in ("conv1", "conv2"):
                for role in ("preactivation", "activation"):
                    ds = f[f"layers/{layer}/{role}"]
                    assert np.array_equal(ds[i], ds[0]), (paths[i].name, layer, role)


def test_sample_rocket_exif_is_portrait() -> None:
    path = SAMPLES / "rocket_exif_rotated.jpg"
    with Image.open(path) as raw:
        assert raw.width > raw.height  # stored sideways (landscape)
    decoded = decode_image(path)
    h, w = decoded.original_size
    assert h > w
    assert (h, w) == (decoded.image.height, decoded.image.width) == (427, 320)


# ---------------------------------------------------------------- resize and centre crop


def _torchvision_way(image: Image.Image, resized_hw: tuple[int, int], crop_hw: tuple[int, int]) -> np.ndarray:
    """Resize to the (hand-computed) size with bilinear, then torchvision's CenterCrop offsets."""
    new_h, new_w = resized_hw
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    th, tw = crop_hw
    # torchvision CenterCrop: int(round((h - th) / 2.0)); Python's round gives an int, halves to even
    top = round((new_h - th) / 2.0)
    left = round((new_w - tw) / 2.0)
    pixels = np.asarray(image)[top : top + th, left : left + tw]
    assert pixels.shape[:2] == (th, tw)
    return pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)


# (image H, W), crop (H, W), resize (shorter side or None = cover), hand-computed resized (H, W)
RESIZE_CASES = [
    # cover: 20/60 > 24/90, so H -> 20 and W -> int(90 * 20 / 60) = 30; crop left = 3
    ((60, 90), (20, 24), None, (20, 30)),
    # cover: 24/60 > 20/90, so W -> 24 and H -> int(90 * 24 / 60) = 36; crop top = 6
    ((90, 60), (20, 24), None, (36, 24)),
    # cover: H -> 20, W -> int(90 * 20 / 61) = 29 (truncated); left = round(4.5) = 4
    ((61, 90), (20, 20), None, (20, 29)),
    # square crop of a square image: no resize needed beyond scaling
    ((50, 50), (20, 20), None, (20, 20)),
    # already the crop size: no resize at all
    ((20, 24), (20, 24), None, (20, 24)),
    # Resize(32): shorter side H=60 -> 32, W -> int(32 * 90 / 60) = 48; crop top 6, left 12
    ((60, 90), (20, 24), 32, (32, 48)),
    # Resize(25) on a portrait: W=60 -> 25, H -> int(25 * 90 / 60) = 37 (37.5 truncated); top = round(8.5) = 8
    ((90, 60), (20, 20), 25, (37, 25)),
    # Resize(256) + CenterCrop(224) shape of the classic ImageNet pipeline, scaled down: 30 then 28
    ((45, 60), (28, 28), 30, (30, 40)),
]


@pytest.mark.parametrize("image_hw,crop,resize,resized", RESIZE_CASES)
def test_resize_and_crop_match_torchvision_semantics(
    tmp_path: Path, image_hw: tuple[int, int], crop: tuple[int, int], resize: int | None, resized: tuple[int, int]
) -> None:
    path = tmp_path / "photo.png"
    make_photo(*image_hw, seed=11).save(path)
    decoded = decode_image(path)
    prep = Preprocessing(size=crop, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=resize)
    got = preprocess(decoded, prep)
    with Image.open(path) as raw:
        expected = _torchvision_way(raw.convert("RGB"), resized, crop)
    assert got.shape == (3, *crop)
    assert np.array_equal(got, expected)


def test_resize_crop_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    make_photo(60, 90, seed=2).save(path)
    got = preprocess(decode_image(path), Preprocessing(size=(20, 24), mean=MEAN, std=STD))
    with Image.open(path) as raw:
        expected01 = _torchvision_way(raw, (20, 30), (20, 24))
    expected = (expected01 - np.asarray(MEAN, np.float32)[:, None, None]) / np.asarray(STD, np.float32)[:, None, None]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_no_resize_keeps_native_size(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    make_photo(33, 47, seed=1).save(path)
    got = pixels01(path)
    with Image.open(path) as raw:
        expected = np.asarray(raw).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    assert np.array_equal(got, expected)


def test_spec_resize_field_is_shorter_side_before_crop(tmp_path: Path) -> None:
    spec_path = _tiny(tmp_path, extra_input="resize = 32\n")
    spec = load_spec(spec_path)
    assert spec.input.resize == 32
    prep = preprocessing_for(spec.input, ModelChoice())
    assert (prep.size, prep.resize) == ((20, 24), 32)
    assert preprocessing_for(spec.input, ModelChoice(size=(20, 24))).resize is None  # --size replaces the resize rule
    assert preprocessing_for(spec.input, ModelChoice(no_resize=True)).size is None  # --no-resize

    image = tmp_path / "photo.png"
    make_photo(60, 90, seed=5).save(image)
    out = tmp_path / "maps.h5"
    _extract([str(image), "-m", str(spec_path), "-o", str(out), "--save-input"])
    with Image.open(image) as raw:
        expected01 = _torchvision_way(raw, (32, 48), (20, 24))  # Resize(32) + CenterCrop((20, 24))
        cover01 = _torchvision_way(raw, (20, 30), (20, 24))
    mean = np.asarray(MEAN, np.float32)[:, None, None]
    std = np.asarray(STD, np.float32)[:, None, None]
    with h5py.File(out, "r") as f:
        stored = f["input"][0]
        steps = json.loads(f.attrs["preprocessing"])["steps"]
    np.testing.assert_allclose(stored, (expected01 - mean) / std, rtol=1e-6, atol=1e-6)
    assert not np.allclose(stored, (cover01 - mean) / std, atol=1e-3)  # differs from the cover rule
    resize = next(step for step in steps if step["step"] == "resize")
    assert (resize["shorter_side"], resize["interpolation"], resize["crop_mode"]) == (32, "bilinear", "center")


# ---------------------------------------------------------------- describe()


def test_describe_is_json_and_lists_steps() -> None:
    prep = Preprocessing(size=(20, 24), mean=MEAN, std=STD, resize=32, background=(1, 2, 3))
    described = prep.describe()
    assert json.loads(json.dumps(described)) == described
    names = [step["step"] for step in described["steps"]]
    assert names == ["exif_transpose", "to_rgb", "resize", "center_crop", "to_float", "normalize"]
    assert described["input_size"] == [20, 24]
    by_name = {step["step"]: step for step in described["steps"]}
    assert by_name["resize"]["shorter_side"] == 32
    assert by_name["center_crop"]["size"] == [20, 24]
    assert by_name["normalize"] == {"step": "normalize", "mean": list(MEAN), "std": list(STD)}
    assert by_name["to_rgb"]["alpha_background"] == [1, 2, 3]


def test_describe_native_and_cover() -> None:
    native = Preprocessing(size=None, mean=MEAN, std=STD).describe()
    json.dumps(native)
    assert native["input_size"] == "native"
    assert [s["step"] for s in native["steps"]] == ["exif_transpose", "to_rgb", "to_float", "normalize"]
    cover = Preprocessing(size=(20, 20), mean=MEAN, std=STD).describe()
    assert next(s for s in cover["steps"] if s["step"] == "resize")["shorter_side"] == "cover"


def test_tiny_spec_parses_as_expected() -> None:
    """Guard for the constants above: they are the tiny model's normalisation."""
    raw = tomllib.loads(TINY_SPEC)
    assert tuple(raw["input"]["mean"]) == MEAN and tuple(raw["input"]["std"]) == STD


# ---------------------------------------------------------------- the whole resize is bounded by the output


def _whole_resize_then_crop(
    image: Image.Image, new_size: tuple[int, int], crop: tuple[int, int, int, int], resample: int = Image.BILINEAR
) -> np.ndarray:
    return np.asarray(image.resize(new_size, resample).crop(crop))


@pytest.mark.parametrize("name", ["bilinear", "bicubic", "lanczos", "nearest"])
def test_resize_of_part_is_close_to_the_whole_resize(name: str) -> None:
    """The bounds _resize_part states: Pillow rounds the box to float32, so 8-bit values may flip a
    rounding per pass (bilinear: at most 2/255; bicubic and lanczos, whose kernels have negative
    lobes: more than 2/255 for under 2% of the values of pixel noise), float ("F") values differ by
    under 1e-5 (the sampling positions agree); nearest picks a neighbouring pixel for under 2%."""
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}.get(name, Image.NEAREST)
    rng = np.random.default_rng(0)
    far = differing = total = 0
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(3, 200, 2))
        new_w, new_h = (int(v) for v in rng.integers(2, 300, 2))
        width, height = (int(v) for v in rng.integers(1, 60, 2))
        left, top = (new_w - width) // 2, (new_h - height) // 2  # may be negative: the crop is larger
        kept = (max(left, 0), max(top, 0), min(left + width, new_w), min(top + height, new_h))
        noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # worst case: no smooth areas
        part = np.asarray(images._resize_part(noise, (new_w, new_h), kept, resample)).astype(int)
        whole = _whole_resize_then_crop(noise, (new_w, new_h), kept, resample).astype(int)
        assert part.shape == whole.shape
        if name == "bilinear":
            assert np.abs(part - whole).max() <= 2
        far += int(np.count_nonzero(np.abs(part - whole) > 2))
        differing += int(np.count_nonzero(part != whole))
        total += part.size
        grey = Image.fromarray(rng.random((h, w), dtype=np.float32), "F")
        if name != "nearest":
            part_f = np.asarray(images._resize_part(grey, (new_w, new_h), kept, resample))
            whole_f = _whole_resize_then_crop(grey, (new_w, new_h), kept, resample)
            np.testing.assert_allclose(part_f, whole_f, rtol=0, atol=1e-5)
    assert far < 0.02 * total
    assert differing < 0.15 * total  # rounding flips, not a different resampling


def test_whole_resize_kept_for_ordinary_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to WHOLE_RESIZE_PIXELS the result is bit-identical to resize-then-crop (RESIZE_CASES above
    check values); only larger resizes take the part-only path."""
    calls: list[tuple[int, int]] = []
    real = images._resize_part

    def spy(
        image: Image.Image, new_size: tuple[int, int], crop: tuple[int, int, int, int], resample: int
    ) -> Image.Image:
        calls.append(new_size)
        return real(image, new_size, crop, resample)

    monkeypatch.setattr(images, "_resize_part", spy)
    photo = make_photo(480, 640, seed=3)
    decoded = images.DecodedImage("photo", photo, (480, 640), "")
    preprocess(decoded, Preprocessing(size=(224, 224), mean=(0, 0, 0), std=(1, 1, 1), resize=256))
    assert calls == []
    got = preprocess(decoded, Preprocessing(size=(224, 224), mean=(0, 0, 0), std=(1, 1, 1), resize=4000))
    assert calls == [(5333, 4000)]  # 21 M pixels if resized whole
    expected = _whole_resize_then_crop(photo, (5333, 4000), (2554, 1888, 2778, 2112))
    assert np.abs(got * 255 - expected.transpose(2, 0, 1)).max() <= 2 + 1e-3


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limit and /proc/self/statm are Linux's")
def test_strip_resize_memory_is_bounded_by_the_output() -> None:
    """A 1x40000 strip resized whole for a 224x224 crop is 224 x 8,960,000 pixels (6 GB); only the
    crop's part is resized. Run in a child under a 1 GiB address-space margin: the whole resize
    fails there with MemoryError instead of taking the machine's memory."""
    child = textwrap.dedent(
        """
        import resource
        import numpy as np
        from PIL import Image
        from fmap_cli.images import DecodedImage, Preprocessing, preprocess

        mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (1 << 30), resource.RLIM_INFINITY))
        strip = Image.new("RGB", (1, 40000), (10, 20, 30))  # W=1, H=40000: refused by decode_image
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = preprocess(DecodedImage("strip", strip, (40000, 1), ""), Preprocessing((224, 224), (0, 0, 0), (1, 1, 1)))
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        assert x.shape == (3, 224, 224) and np.allclose(x[:, 100, 100], np.array([10, 20, 30]) / 255)
        print(grown)
        """
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout) < 64 << 20  # peak RSS growth, bytes: measured about 3 MiB


# ---------------------------------------------------------------- sizes refused from the header


@pytest.mark.parametrize("hw", [(40000, 1), (1, 40000), (4000, 3), (3, 4000), (201, 2)])
def test_elongated_image_refused(tmp_path: Path, hw: tuple[int, int]) -> None:
    path = tmp_path / "strip.png"
    Image.new("RGB", (hw[1], hw[0]), (10, 20, 30)).save(path)
    message = f"{path}: size {hw[0]}x{hw[1]} is too elongated to use (one side over 100 times the other); crop it first"
    with pytest.raises(ImageError) as header:
        check_image(str(path))
    assert str(header.value) == message
    with pytest.raises(ImageError) as decoded:
        decode_image(path)
    assert str(decoded.value) == message


def test_elongated_after_exif_orientation_names_the_upright_size(tmp_path: Path) -> None:
    path = tmp_path / "strip.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 3 high x 400 wide, upright 400 high x 3 wide
    Image.new("RGB", (400, 3)).save(path, exif=exif)
    with pytest.raises(ImageError, match=r"size 400x3 is too elongated"):
        check_image(str(path))
    with pytest.raises(ImageError, match=r"size 400x3 is too elongated"):
        decode_image(path)


def test_aspect_limit_is_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "strip.png"
    make_photo(2, 200, seed=1).save(path)
    assert check_image(str(path)) == (2, 200)
    got = preprocess(decode_image(path), Preprocessing(size=(20, 24), mean=(0, 0, 0), std=(1, 1, 1)))
    with Image.open(path) as raw:
        assert np.array_equal(got, _torchvision_way(raw.convert("RGB"), (20, 2000), (20, 24)))


def _extract_error(*args: str) -> Result:
    return CliRunner().invoke(cli, ["extract", *args])


def test_elongated_image_refused_by_extract_before_compute(tmp_path: Path, tiny_model: Path) -> None:
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 40000)).save(strip)
    assert strip.stat().st_size < 1000
    out = tmp_path / "out.h5"
    result = _extract_error(str(strip), "-m", str(tiny_model), "-o", str(out))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        f"Error: {strip}: size 40000x1 is too elongated to use (one side over 100 times the other); crop it first"
    )
    assert not out.exists()


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header claims width x height (CRC recomputed)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- what is not a regular image file

DEV_ZERO = Path("/dev/zero")


@pytest.fixture
def never_opened(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``never_opened(*paths)``: opening any of them fails the test at once, so a regression fails
    instead of blocking (an open() of a FIFO waits for a writer) or filling the memory (/dev/zero)."""
    refused: set[Path] = set()
    real_open, real_os_open = builtins.open, os.open

    def check(file: object) -> None:
        if isinstance(file, str | os.PathLike) and Path(file).resolve() in refused:
            raise AssertionError(f"{file} was opened")

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        check(file)
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path: Any, *args: Any, **kwargs: Any) -> int:
        check(path)
        return real_os_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    return lambda *paths: refused.update(Path(p).resolve() for p in paths)


def _special_files(tmp_path: Path) -> list[tuple[str, str]]:
    """(path, kind) of files that are not regular files, on this machine."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    found = [(str(fifo), "a FIFO"), (str(tmp_path), "a directory")]
    for device in ("/dev/zero", "/dev/urandom"):
        if Path(device).exists():
            found.append((device, "a character device"))
    sock = tmp_path / "s.png"
    if len(str(sock)) < 100:  # AF_UNIX paths are short
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(sock))
        server.close()  # the socket file stays
        found.append((str(sock), "a socket"))
    return found


def test_not_regular_files_refused_before_open(tmp_path: Path, never_opened: Callable[..., None]) -> None:
    special = _special_files(tmp_path)
    never_opened(*(path for path, _ in special))
    for path, kind in special:
        message = f"{path}: not a regular file ({kind}); give an image file"
        for read in (check_image, decode_image):
            with pytest.raises(ImageError) as caught:
                read(path)
            assert str(caught.value) == message, read
        batch, failures = load_batch([(3, path)], Preprocessing((8, 8), (0, 0, 0), (1, 1, 1)), skip_bad=True)
        assert batch is None
        assert [(f.index, f.path, f.reason) for f in failures] == [(3, path, message.removeprefix(f"{path}: "))]


def test_symlink_to_an_image_is_read(tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    make_photo(12, 10).save(photo)
    link = tmp_path / "link.png"
    link.symlink_to(photo)
    assert check_image(str(link)) == (12, 10)
    assert decode_image(link).sha256 == decode_image(photo).sha256


def test_symlink_to_a_device_refused(tmp_path: Path, never_opened: Callable[..., None]) -> None:
    if not DEV_ZERO.exists():
        pytest.skip("no /dev/zero")
    never_opened(DEV_ZERO)
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    with pytest.raises(ImageError, match=r"zero\.png: not a regular file \(a character device\)"):
        decode_image(link)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_extract_refuses_a_fifo_or_device(
    tmp_path: Path, tiny_model: Path, kind: str, never_opened: Callable[..., None]
) -> None:
    if kind == "fifo":
        path, what = tmp_path / "pipe.png", "a FIFO"
        os.mkfifo(path)
    elif DEV_ZERO.exists():
        path, what = DEV_ZERO, "a character device"
    else:
        pytest.skip("no /dev/zero")
    never_opened(path)
    out = tmp_path / "out.h5"
    result = _extract_error(str(path), "-m", str(tiny_model), "-o", str(out))
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == f"Error: {path}: not a regular file ({what}); give an image file"
    assert not out.exists()


def test_file_over_the_byte_limit_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "photo.png"
    make_photo(12, 10).save(path)
    size = path.stat().st_size
    monkeypatch.setattr(images, "MAX_FILE_BYTES", size - 1)
    message = f"{path}: too large for an image file ({size} bytes; limit {size - 1} bytes)"
    for read in (check_image, decode_image):
        with pytest.raises(ImageError) as caught:
            read(str(path))
        assert str(caught.value) == message
    monkeypatch.setattr(images, "MAX_FILE_BYTES", size)
    assert decode_image(path).original_size == (12, 10)


def test_empty_file_still_says_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    for read in (check_image, decode_image):
        with pytest.raises(ImageError) as caught:
            read(str(path))
        assert str(caught.value) == f"{path}: empty file (0 bytes), not an image"


# ---------------------------------------------------------------- render re-reads stored image paths


def _render_overlay(path: Path, out: Path, *how: str) -> Result:
    return CliRunner().invoke(cli, ["render", str(path), "--layer", "conv", "-o", str(out), *how])


NO_INPUT = "; the file has no /input (extract with --save-input to keep it)"


@pytest.mark.parametrize("how", [("--overlay", "0"), ("--top", "1", "--channel", "0")], ids=["overlay", "top"])
def test_render_refuses_stored_paths_that_are_not_image_files(
    tmp_path: Path, how: tuple[str, ...], never_opened: Callable[..., None]
) -> None:
    """A hostile or odd fmap file: /images/path names a FIFO, /dev/zero or a decompression bomb."""
    z = np.ones((1, 2, 4, 4), dtype=np.float32)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    bomb = _png_claiming(tmp_path / "bomb.png", 30000, 30000)
    stored = [(fifo, f"Error: {fifo}: not a regular file (a FIFO); give an image file{NO_INPUT}\n")]
    if DEV_ZERO.exists():
        stored.append(
            (DEV_ZERO, f"Error: /dev/zero: not a regular file (a character device); give an image file{NO_INPUT}\n")
        )
    never_opened(fifo, DEV_ZERO)
    out = tmp_path / "o.png"
    for i, (path, line) in enumerate(stored):
        fmap_file = craft(tmp_path / f"hostile{i}.h5", {"conv": (z, z)}, image_paths=[str(path)])
        result = _render_overlay(fmap_file, out, *how)
        assert (result.exit_code, result.output) == (1, line)
        assert not out.exists()
    fmap_file = craft(tmp_path / "bomb.h5", {"conv": (z, z)}, image_paths=[str(bomb)])
    result = _render_overlay(fmap_file, out, *how)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output  # Pillow words the middle part
    assert result.output.startswith(f"Error: {bomb}: refused as a possible decompression bomb (Image size (9")
    assert result.output.endswith(f"; limit {images.MAX_PIXELS} pixels){NO_INPUT}\n")


def test_render_refuses_a_stored_image_over_the_byte_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photo = tmp_path / "photo.png"
    make_photo(32, 32).save(photo)
    size = photo.stat().st_size
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    z = np.ones((1, 2, 4, 4), dtype=np.float32)
    fmap_file = craft(tmp_path / "big.h5", {"conv": (z, z)}, image_paths=[str(photo)])
    result = _render_overlay(fmap_file, tmp_path / "o.png", "--overlay", "0")
    assert result.exit_code == 1
    assert result.output == f"Error: {photo}: too large for an image file ({size} bytes; limit 100 bytes){NO_INPUT}\n"


# ---------------------------------------------------------------- bad image files through extract


def test_truncated_jpeg_fails_at_decode_not_header(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    check_image(str(bad))  # the header check passes ...
    with pytest.raises(ImageError, match="cannot decode"):  # ... the full decode does not
        decode_image(bad)
    line = extract_fails([bad], tiny_model, outdir, 1)
    assert line.startswith(f"Error: {bad}: cannot decode image: ")  # then Pillow's words


def test_jpeg_truncated_in_header(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    full = tmp_path / "full.jpg"
    make_photo(48, 64).save(full)
    bad = tmp_path / "head.jpg"
    bad.write_bytes(full.read_bytes()[:100])
    with pytest.raises(ImageError):
        check_image(str(bad))
    line = extract_fails([bad], tiny_model, outdir, 1)
    assert line.startswith(f"Error: {bad}: cannot read image header: ")  # then Pillow's words


def test_zero_byte_file(tmp_path: Path, tiny_model: Path, good: list[Path], outdir: Path) -> None:
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    line = extract_fails([good[0], bad], tiny_model, outdir, 1)
    assert line == f"Error: {bad}: empty file (0 bytes), not an image"


def test_text_file_named_jpg(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture\n" * 20)
    line = extract_fails([bad], tiny_model, outdir, 1)
    assert line == f"Error: {bad}: not an image file Pillow can read"


def test_missing_file(tmp_path: Path, tiny_model: Path, good: list[Path], outdir: Path) -> None:
    bad = tmp_path / "nope.jpg"
    line = extract_fails([*good, bad], tiny_model, outdir, 1)
    assert line == f"Error: {bad}: no such file"


def test_decompression_bomb_refused_quickly(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    bomb = _png_claiming(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 100
    with pytest.raises(Image.DecompressionBombError):  # the patched IHDR (and its CRC) is valid
        Image.open(bomb)
    started = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        check_image(str(bomb))
    line = extract_fails([bomb], tiny_model, outdir, 1)
    assert line.startswith(f"Error: {bomb}: refused as a possible decompression bomb (")  # then Pillow's words
    assert line.endswith(f"; limit {MAX_PIXELS} pixels)")
    assert time.perf_counter() - started < 10


def test_image_just_over_pillow_warning_limit_refused(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    """Between MAX_IMAGE_PIXELS and 2x it Pillow only warns; fmap must still refuse."""
    side = int((Image.MAX_IMAGE_PIXELS or 89_478_485) ** 0.5) + 10
    bomb = _png_claiming(tmp_path / "big.png", side, side)
    line = extract_fails([bomb], tiny_model, outdir, 1)
    assert line.startswith(f"Error: {bomb}: refused as a possible decompression bomb (")  # then Pillow's words
    assert line.endswith(f"; limit {MAX_PIXELS} pixels)")
