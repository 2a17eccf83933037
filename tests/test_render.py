"""fmap render: the channel grid, the receptive-field overlay and the top-K patches, as PNGs."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import extract_options
from crafted import craft
from PIL import Image

from fmap_cli import colormaps
from fmap_cli.cli import cli
from fmap_cli.drawing import BACKGROUND, LINE_H, RED
from fmap_cli.extract import extract
from fmap_cli.receptive import PATCH_SIZE, Geometry, input_picture, upsample
from fmap_cli.render import GridLayout

FMAP = Path(sys.executable).parent / "fmap"


def invoke(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, f"fmap {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result


def render(*args: str) -> Image.Image:
    out = Path(invoke("render", *args).stdout.strip())
    return Image.open(out).convert("RGB")


def centre(picture: Image.Image, box: tuple[int, int, int, int]) -> tuple[int, int, int]:
    left, top, right, bottom = box
    return picture.getpixel(((left + right) // 2, (top + bottom) // 2))


# ---------------------------------------------------------------------------- the grid


@pytest.fixture
def constant_file(tmp_path: Path) -> Path:
    """5 channels of 8x8 constant maps on 2 images: a = c (channel 0 dead), z = c - 2."""
    z = np.broadcast_to((np.arange(5) - 2.0)[None, :, None, None], (2, 5, 8, 8)).astype(np.float32)
    return craft(tmp_path / "const.h5", {"conv": (z, np.maximum(z + 2, 0))})


def test_grid_size_tiles_labels_and_colours(constant_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    picture = render(str(constant_file), "--layer", "conv", "--scale", "layer", "-o", str(out))
    layout = GridLayout.fit(5, (8, 8), 1)
    assert (layout.columns, layout.rows) == (2, 3)  # close to square
    assert layout.tile == (48, 48)  # 8x8 maps enlarged 6 times
    assert picture.width >= layout.size[0] and picture.height > layout.size[1]  # legend below (maybe wider)
    for c in range(5):
        expect = tuple(colormaps.SEQUENTIAL[round(c / 4 * (colormaps.SIZE - 1))])
        assert centre(picture, layout.tile_box(c)) == expect, c
        left, top, _, bottom = layout.label_box(c)
        label = np.asarray(picture.crop((left, top, left + 12, bottom)))
        assert (label != BACKGROUND).any(axis=2).sum() > 5, f"no label on channel {c}"
    assert centre(picture, layout.tile_box(0)) == (0, 0, 0)  # zero is black
    empty = layout.tile_box(5)  # the sixth cell of the 2x3 grid is empty
    assert centre(picture, empty) == BACKGROUND


def test_dead_channel_is_framed_in_red(constant_file: Path, tmp_path: Path) -> None:
    picture = render(str(constant_file), "--layer", "conv", "-o", str(tmp_path / "g.png"))
    layout = GridLayout.fit(5, (8, 8), 1)
    for c in range(5):
        left, top, _, bottom = layout.tile_box(c)
        frame = picture.getpixel((left - 3, (top + bottom) // 2))
        assert (frame == RED) == (c == 0), c
    label = np.asarray(picture.crop(layout.label_box(0)))
    assert (label == RED).all(axis=2).any()  # the word 'dead'
    assert centre(picture, layout.tile_box(3)) == tuple(colormaps.SEQUENTIAL[-1])  # --scale tile: its own max


def test_preactivation_is_diverging_and_zero_is_white(constant_file: Path, tmp_path: Path) -> None:
    args = ["--layer", "conv", "--role", "both", "--scale", "layer", "-o", str(tmp_path / "b.png")]
    picture = render(str(constant_file), *args)
    layout = GridLayout.fit(5, (8, 8), 2)
    for c in range(5):
        z = c - 2.0
        expect_z = tuple(colormaps.DIVERGING[round((0.5 + 0.5 * z / 2) * (colormaps.SIZE - 1))])
        assert centre(picture, layout.tile_box(c, 0)) == expect_z, c
        expect_a = tuple(colormaps.SEQUENTIAL[round(c / 4 * (colormaps.SIZE - 1))])
        assert centre(picture, layout.tile_box(c, 1)) == expect_a, c
    assert centre(picture, layout.tile_box(2, 0)) == (255, 255, 255)  # z = 0 is white
    assert centre(picture, layout.tile_box(0, 0))[2] > 90 > centre(picture, layout.tile_box(0, 0))[0]  # blue
    assert centre(picture, layout.tile_box(4, 0))[0] > 90 > centre(picture, layout.tile_box(4, 0))[2]  # red


def test_grid_of_an_extracted_file_by_image_path(
    tiny_model: Path, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "maps.h5"
    extract(extract_options([str(p) for p in images], out=out, model=str(tiny_model), device="cpu"))
    picture = render(str(out), "--layer", "conv2", "--image", images[1].name, "-o", str(tmp_path / "p.png"))
    with h5py.File(out, "r") as f:
        channels, h, w = f["layers/conv2/activation"].shape[1:]
    layout = GridLayout.fit(channels, (h, w), 1)
    assert picture.width >= layout.size[0] and picture.height > layout.size[1]
    monkeypatch.chdir(tmp_path)
    names = {
        ("--image", "0"): "maps.conv1.png",
        ("--image", "2"): "maps.conv1.2.png",  # it was maps.conv1.png too: the second render collided
        ("--image", images[1].name, "--role", "both"): f"maps.conv1.{images[1].name}.both.png",
        ("--overlay", "1", "--image", "1"): "maps.conv1.overlay1.1.png",
        ("--top", "2", "--channel", "3"): "maps.conv1.top2-c3.png",
    }
    for args, name in names.items():
        default = Path(invoke("render", str(out), "--layer", "conv1", *args).stdout.strip())
        assert default == Path(name) and (tmp_path / default).is_file()


# ---------------------------------------------------------------------------- overlay alignment

SPOT_SPEC = """\
[model]
name = "spot"
weights = "spot.npz"

[input]
size = [64, 72]
mean = [0.0, 0.0, 0.0]
std = [1.0, 1.0, 1.0]

[[layers]]
name = "conv1"
type = "conv2d"
out_channels = 1
kernel_size = 9
stride = 4
padding = 0
activation = "relu"
"""
DOT = (52, 20)  # input pixel (row, col): the centre of unit (12, 4), since start = 4 and stride = 4


@pytest.fixture
def spot_files(tmp_path: Path) -> tuple[Path, Path]:
    """A symmetric blob detector (9x9 Gaussian, stride 4) run on a black image with one white dot;
    the same extraction with and without --save-input."""
    spec = tmp_path / "spot.toml"
    spec.write_text(SPOT_SPEC)
    yy, xx = np.mgrid[-4:5, -4:5]
    gauss = np.exp(-(yy**2 + xx**2) / 8.0).astype(np.float32)
    np.savez(tmp_path / "spot.npz", **{"conv1.weight": np.stack([gauss] * 3)[None], "conv1.bias": np.zeros(1)})
    pixels = np.zeros((64, 72, 3), dtype=np.uint8)
    pixels[DOT] = 255
    image = tmp_path / "dot.png"
    Image.fromarray(pixels, "RGB").save(image)
    files = []
    for save_input in (True, False):
        out = tmp_path / f"spot{int(save_input)}.h5"
        extract(extract_options([str(image)], out=out, model=str(spec), device="cpu", save_input=save_input))
        files.append(out)
    return files[0], files[1]


def test_overlay_peak_lands_on_the_dot(spot_files: tuple[Path, Path]) -> None:
    with h5py.File(spot_files[0], "r") as f:
        group = f["layers/conv1"]
        geometry = Geometry.of(group)
        assert geometry == Geometry((9, 9), (4, 4), (4.0, 4.0))
        a = group["activation"][0, 0]  # (14, 16)
        heat = upsample(a, geometry, (64, 72))
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        assert abs(peak[0] - DOT[0]) <= 1 and abs(peak[1] - DOT[1]) <= 1, peak
        naive = np.asarray(Image.fromarray(a).resize((72, 64), Image.Resampling.BILINEAR))
        off = np.unravel_index(np.argmax(naive), naive.shape)
        assert abs(off[0] - DOT[0]) >= 3  # a plain stretch misses: the test tells them apart
        saved = input_picture(f, 0)
    with h5py.File(spot_files[1], "r") as f:  # no /input: the image is read again from its path
        reread = input_picture(f, 0)
    np.testing.assert_array_equal(saved, reread)
    assert tuple(saved[DOT]) == (255, 255, 255) and saved.sum() == 3 * 255


@pytest.mark.parametrize("which", [0, 1])
def test_overlay_png(spot_files: tuple[Path, Path], tmp_path: Path, which: int) -> None:
    out = tmp_path / f"overlay{which}.png"
    picture = render(str(spot_files[which]), "--layer", "conv1", "--overlay", "0", "-o", str(out))
    zoom = 4  # 64x72 enlarged to at least 256 on the longer side
    assert picture.width >= 72 * zoom and picture.height > 64 * zoom
    panel = np.asarray(picture)[: 64 * zoom, : 72 * zoom].astype(int)  # the legend may be wider
    heat = panel.sum(axis=2)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(peak[0] // zoom - DOT[0]) <= 1 and abs(peak[1] // zoom - DOT[1]) <= 1
    assert heat[2, 2] == 0  # far from the dot: black image, no heat


# ---------------------------------------------------------------------------- top-K patches


def test_top_patches_are_the_right_images_and_places(tmp_path: Path) -> None:
    """4 images, each a solid grey level with a red pixel at the centre of the unit where channel 1
    peaks; geometry: field 5, stride 2, start 2 (a 5x5 conv, stride 2, padding 0)."""
    maxima = [0.3, 0.9, 0.1, 0.6]
    units = [(0, 0), (3, 1), (2, 2), (1, 4)]
    a = np.zeros((4, 2, 5, 6), dtype=np.float32)
    pixels = np.zeros((4, 3, 14, 16), dtype=np.float32)
    for n, (value, (i, j)) in enumerate(zip(maxima, units, strict=True)):
        a[n, 1, i, j] = value
        pixels[n] = (n + 1) / 8
        pixels[n, :, 2 + 2 * i, 2 + 2 * j] = (1.0, 0.0, 0.0)
    paths = [f"/photos/p{n}.jpg" for n in range(4)]
    geometry = ((5, 5), (2, 2), (2.0, 2.0))
    path = craft(tmp_path / "t.h5", {"conv": (a, a)}, image_paths=paths, pixels=pixels, geometry=geometry)
    picture = render(str(path), "--layer", "conv", "--top", "3", "--channel", "1", "-o", str(tmp_path / "top.png"))
    gap = 6
    assert picture.width >= gap + 3 * (PATCH_SIZE + gap)
    for rank, n in enumerate([1, 3, 0]):
        x = gap + rank * (PATCH_SIZE + gap)
        assert picture.getpixel((x + PATCH_SIZE // 2, gap + PATCH_SIZE // 2)) == (255, 0, 0)  # the unit's centre
        grey = round((n + 1) / 8 * 255)
        assert picture.getpixel((x + 3, gap + PATCH_SIZE - 3)) in ((grey, grey, grey), (128, 128, 128))
        label = np.asarray(picture.crop((x, gap + PATCH_SIZE, x + PATCH_SIZE, gap + PATCH_SIZE + 2 * LINE_H)))
        assert (label != BACKGROUND).any(axis=2).sum() > 20
    # unit (0, 0) of image 0 is centred at pixel (2, 2): its 5x5 field lies inside the image
    x = gap + 2 * (PATCH_SIZE + gap)
    assert picture.getpixel((x + 1, gap + 1)) == (round(1 / 8 * 255),) * 3


# ---------------------------------------------------------------------------- errors


def test_render_usage_errors(constant_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    cases = [
        (["--overlay", "0", "--top", "2", "--channel", "0"], "--overlay and --top draw different pictures"),
        (["--top", "2"], "--top K needs --channel C"),
        (["--overlay", "0", "--role", "both"], "--role apply to the channel grid"),
        (["--image", "9"], "--image 9 out of range: the file has images 0..1"),
        (["--image", "nope.png"], "--image 'nope.png' is not an image in this file"),
        (["--overlay", "7"], "channel 7 out of range: layer 'conv' has channels 0..4"),
    ]
    for args, message in cases:
        result = invoke("render", str(constant_file), "--layer", "conv", "-o", str(out), *args, code=2)
        assert f"Error: {message}" in result.output, result.output
    result = invoke("render", str(constant_file), "--layer", "cnv", code=2)
    assert "did you mean 'conv'?" in result.output
    out.write_bytes(b"keep")
    result = invoke("render", str(constant_file), "--layer", "conv", "-o", str(out), code=2)
    assert f"Error: {out}: already exists; pass --overwrite to replace it" in result.output
    assert out.read_bytes() == b"keep"
    invoke("render", str(constant_file), "--layer", "conv", "-o", str(out), "--overwrite")
    assert Image.open(out).format == "PNG"


def test_render_needs_an_input_image(tmp_path: Path) -> None:
    z = np.ones((1, 2, 4, 4), dtype=np.float32)
    path = craft(tmp_path / "noinput.h5", {"conv": (z, z)}, image_paths=[str(tmp_path / "gone.png")])
    out = tmp_path / "o.png"
    result = invoke("render", str(path), "--layer", "conv", "--overlay", "0", "-o", str(out), code=1)
    assert result.output.count("\n") == 1
    assert "gone.png: no such file; the file has no /input (extract with --save-input to keep it)" in result.output
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


# ---------------------------------------------------------------------------- no torch


@pytest.mark.skipif(not FMAP.is_file(), reason=f"console script not installed at {FMAP}")
def test_render_and_inspect_details_do_not_import_torch(spot_files: tuple[Path, Path], tmp_path: Path) -> None:
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text('raise ImportError("torch must not be imported")\n')
    env = dict(os.environ, PYTHONPATH=str(poison))
    commands = [
        ["render", str(spot_files[1]), "--layer", "conv1", "-o", str(tmp_path / "g.png")],
        ["render", str(spot_files[1]), "--layer", "conv1", "--overlay", "0", "-o", str(tmp_path / "o.png")],
        ["render", str(spot_files[0]), "--layer", "conv1", "--top", "1", "--channel", "0",
         "-o", str(tmp_path / "t.png")],
        ["inspect", str(spot_files[0]), "--channels", "--top", "1", "--hist"],
    ]  # fmt: skip
    for args in commands:
        proc = subprocess.run([str(FMAP), *args], capture_output=True, text=True, env=env, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "torch" not in proc.stderr


def test_overlay_from_another_directory_finds_relative_image_paths(
    tmp_path: Path, tiny_model: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Paths are stored as given (relative here); the file records where extract ran."""
    monkeypatch.chdir(images[0].parent)
    out = tmp_path / "rel.h5"
    extract(extract_options([images[0].name], out=out, model=str(tiny_model), device="cpu"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with h5py.File(out, "r") as f:
        assert f["images/path"].asstr()[0] == images[0].name
        picture = input_picture(f, 0)
    assert picture.ndim == 3 and picture.shape[2] == 3
    result = CliRunner().invoke(cli, ["render", str(out), "--layer", "conv1", "--overlay", "0", "-o", "o.png"])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "o.png").is_file()


# ---------------------------------------------------------------------------- atomic output


def test_output_that_is_not_a_regular_file_is_refused(constant_file: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    null = tmp_path / "null.png"  # a link to /dev/null here, so a missing refusal replaces only the link
    null.symlink_to(os.devnull)
    for out, kind in ((fifo, "a FIFO"), (null, "a character device")):
        args = ["render", str(constant_file), "--layer", "conv", "-o", str(out), "--overwrite"]
        result = CliRunner().invoke(cli, args)
        assert (result.exit_code, result.stdout) == (2, "")
        said = f"Error: -o {out}: exists and is not a regular file ({kind}); give a file name"
        assert result.stderr.splitlines()[-1] == said
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and null.readlink() == Path(os.devnull)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["const.h5", "fifo.png", "null.png"]


def test_png_is_made_durable_and_leaves_no_temporary_file(
    constant_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(str(Path(f"/proc/self/fd/{fd}").readlink()))  # the file's name now
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "pictures" / "grid.png"
    out.parent.mkdir()
    for extra in ([], ["--overwrite"]):
        synced.clear()
        assert invoke("render", str(constant_file), "--layer", "conv", "-o", str(out), *extra).stdout == f"{out}\n"
        assert [p.name for p in out.parent.iterdir()] == ["grid.png"]
        written = [Path(p) for p in synced if Path(p).parent == out.parent]
        assert [p.name.startswith(".grid.png.") and p.name.endswith(".partial") for p in written] == [True]
        assert str(out.parent) in synced  # the rename is made durable too
        Image.open(out).verify()
