"""Image decoding and preprocessing (fmap_cli.images): modes, EXIF orientation, resize/crop semantics."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES, TINY_SPEC, make_photo, tiny_weights
from PIL import Image

from fmap_cli.cli import cli
from fmap_cli.extract import preprocessing_for
from fmap_cli.images import Preprocessing, decode_image, preprocess
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
    prep = preprocessing_for(spec.input, None, False)
    assert (prep.size, prep.resize) == ((20, 24), 32)
    assert preprocessing_for(spec.input, (20, 24), False).resize is None  # --size replaces the resize rule
    assert preprocessing_for(spec.input, None, True).size is None  # --no-resize

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
    assert {"step": "resize", "shorter_side": 32, "interpolation": "bilinear", "antialias": True} in steps


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
