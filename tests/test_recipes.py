"""The model's own preprocessing recipe (issue 10, section 1): interpolations and crop modes against
Pillow and numpy computed here, the recipes of torchvision weights and timm data configs (through
stand-ins for the libraries: CI installs neither; tests/test_zoo.py checks the real ones), the
--resize, --interpolation, --mean and --std flags, and what the file records."""

from __future__ import annotations

import functools
import json
import sys
import types
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import zoo
from conftest import TINY_SPEC, make_photo, tiny_weights
from helpers import error_line, extract_fails, invoke, ok
from PIL import Image
from test_models import ImageClassification, InterpolationMode, ObjectDetection, fake_torchvision
from torch import nn

from fmap_cli.images import DecodedImage, Preprocessing, preprocess
from fmap_cli.models import load_model

FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)


def prep(size: tuple[int, int], **kwargs: Any) -> Preprocessing:
    """No normalisation: values are pixels / 255."""
    return Preprocessing(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kwargs)


def run(picture: Image.Image, preprocessing: Preprocessing) -> np.ndarray:
    return preprocess(DecodedImage("photo", picture, (picture.height, picture.width), ""), preprocessing)


def as_input(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], as ToTensor."""
    return pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)


def padded(pixels: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], fill: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 with constant borders of ``fill`` (before, after) on each axis."""
    return np.stack([np.pad(pixels[..., c], (rows, cols), constant_values=fill[c]) for c in range(3)], axis=-1).astype(
        np.uint8
    )


# ---------------------------------------------------------------------------- interpolations


@pytest.mark.parametrize("name", list(FILTERS))
def test_interpolation_is_pillows_filter(name: str) -> None:
    # 60x90, Resize(32): H -> 32, W -> int(32 * 90 / 60) = 48; CenterCrop(20, 24): top 6, left 12
    photo = make_photo(60, 90, seed=4)
    got = run(photo, prep((20, 24), resize=32, interpolation=name))
    expected = np.asarray(photo.resize((48, 32), FILTERS[name]))[6:26, 12:36]
    assert np.array_equal(got, as_input(expected))


def test_interpolations_differ() -> None:
    """Each filter gives its own picture: the choice reaches the resize."""
    photo = make_photo(60, 90, seed=4)
    results = [run(photo, prep((20, 24), resize=32, interpolation=name)) for name in FILTERS]
    assert all(not np.array_equal(a, b) for i, a in enumerate(results) for b in results[i + 1 :])


# ---------------------------------------------------------------------------- crop modes


def test_center_crop_larger_than_the_picture_pads_as_torchvision() -> None:
    # 40x40, Resize(15) -> 15x15; CenterCrop(18) pads (18 - 15) // 2 = 1 before and 2 after with black
    photo = make_photo(40, 40, seed=5)
    got = run(photo, prep((18, 18), resize=15, interpolation="bicubic"))
    small = np.asarray(photo.resize((15, 15), Image.Resampling.BICUBIC))
    assert np.array_equal(got, as_input(padded(small, (1, 2), (1, 2), (0, 0, 0))))


def test_center_with_a_box_covers_it_rounding() -> None:
    # timm's ResizeKeepRatio for a non-square scale size (22, 18): ratio = min(60/22, 90/18) = 2.727...,
    # 60x90 -> round(22.0) x round(33.0) = 22x33; CenterCrop(20, 16): top 1, left round(8.5) = 8
    photo = make_photo(60, 90, seed=6)
    got = run(photo, prep((20, 16), resize=(22, 18), interpolation="bicubic"))
    expected = np.asarray(photo.resize((33, 22), Image.Resampling.BICUBIC))[1:21, 8:24]
    assert np.array_equal(got, as_input(expected))


@pytest.mark.parametrize(
    ("resize", "box"),
    [((30, 28), (30, 28)), (26, (26, 26)), (None, (20, 24))],  # a box; N = N x N; None = the crop's size
)
def test_squash_resizes_both_sides_to_the_box(resize: Any, box: tuple[int, int]) -> None:
    photo = make_photo(60, 90, seed=7)
    got = run(photo, prep((20, 24), resize=resize, crop_mode="squash", interpolation="bicubic"))
    whole = np.asarray(photo.resize((box[1], box[0]), Image.Resampling.BICUBIC))
    top, left = round((box[0] - 20) / 2), round((box[1] - 24) / 2)  # torchvision CenterCrop
    assert np.array_equal(got, as_input(whole[top : top + 20, left : left + 24]))


def test_border_fits_the_picture_and_pads_with_the_mean_colour() -> None:
    # timm crop_mode border, box 32x32: ratio = max(70/32, 90/32) = 2.8125; 70x90 -> round(24.89) x
    # round(32.0) = 25x32 (truncating would give 24); CenterCropOrPad(28): rows padded (28 - 25) // 2 = 1
    # before and 2 after, columns cropped from round(2.0) = 2; the fill is round(255 * mean) = (128, 102, 76)
    photo = make_photo(70, 90, seed=8)
    p = Preprocessing((28, 28), MEAN, STD, resize=32, crop_mode="border", interpolation="bicubic")
    got = run(photo, p)
    small = np.asarray(photo.resize((32, 25), Image.Resampling.BICUBIC))[:, 2:30]
    expected = as_input(padded(small, (1, 2), (0, 0), (128, 102, 76)))
    mean, std = np.float32(MEAN)[:, None, None], np.float32(STD)[:, None, None]
    np.testing.assert_allclose(got, (expected - mean) / std, rtol=0, atol=1e-6)


def test_border_of_a_high_bit_depth_picture_pads_with_the_mean_colour() -> None:
    """16-bit greyscale (mode "F", values in [0, 1]) is padded with the same 8-bit colour."""
    grey = Image.fromarray(np.linspace(0, 1, 70 * 90, dtype=np.float32).reshape(70, 90), "F")
    got = run(grey, prep((28, 28), resize=32, crop_mode="border"))
    assert np.array_equal(got[:, 0, :], np.zeros((3, 28), np.float32))  # mean 0: black rows above
    resized = np.asarray(grey.resize((32, 25), Image.Resampling.BILINEAR))[:, 2:30]
    assert np.array_equal(got[0, 1:26], resized)


# ---------------------------------------------------------------------------- what the file records


CASES = [
    Preprocessing((20, 24), MEAN, STD),
    Preprocessing((20, 24), MEAN, STD, resize=32, interpolation="lanczos", recipe="here", overridden=("--resize",)),
    Preprocessing((20, 16), MEAN, STD, resize=(22, 18), interpolation="bicubic"),
    Preprocessing((28, 28), MEAN, STD, resize=(32, 32), crop_mode="border", background=(1, 2, 3)),
    Preprocessing((20, 24), MEAN, STD, resize=(30, 28), crop_mode="squash", interpolation="nearest"),
    Preprocessing(None, MEAN, STD, recipe="spec"),
]


@pytest.mark.parametrize("p", CASES)
def test_record_reads_back_as_the_same_preprocessing(p: Preprocessing) -> None:
    """What ``fmap project`` re-reads images with (receptive.preprocessing_of) is what was applied."""
    record = json.loads(json.dumps(p.describe()))
    again = Preprocessing.from_record(record)
    assert again.describe() == record
    photo = make_photo(50, 70, seed=2)
    assert np.array_equal(run(photo, again), run(photo, p))


def test_record_of_an_older_file_reads_as_bilinear_centre_crop() -> None:
    older = {
        "input_size": [20, 24],
        "steps": [
            {"step": "resize", "shorter_side": 32, "interpolation": "bilinear", "antialias": True},
            {"step": "center_crop", "size": [20, 24]},
            {"step": "normalize", "mean": list(MEAN), "std": list(STD)},
        ],
    }
    assert Preprocessing.from_record(older) == Preprocessing((20, 24), MEAN, STD, resize=32)


def test_describe_names_every_step() -> None:
    described = Preprocessing((28, 28), MEAN, STD, resize=32, crop_mode="border", interpolation="bicubic").describe()
    resize, crop = described["steps"][2:4]
    assert resize == {
        "step": "resize",
        "crop_mode": "border",
        "box": [32, 32],
        "rule": "fit inside the box keeping the aspect ratio, sides rounded (timm crop_mode border)",
        "interpolation": "bicubic",
        "antialias": True,
    }
    assert crop == {"step": "center_crop", "size": [28, 28], "pad_fill": [128, 102, 76]}
    assert described["recipe"] == {"source": "fmap default", "overridden_by": []}


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        TINY_SPEC.replace("std = [0.25, 0.2, 0.3]\n", 'std = [0.25, 0.2, 0.3]\ninterpolation = "lanczos"\n')
    )
    np.savez(tmp_path / "tiny.npz", **tiny_weights())
    return path


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    make_photo(60, 90, seed=9).save(path)
    return path


def stored(out: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with h5py.File(out, "r") as f:
        return f["input"][0], json.loads(f.attrs["preprocessing"])


def test_spec_interpolation_and_flags_are_applied_and_recorded(spec: Path, photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "spec.h5"
    ok(invoke("extract", photo, "-m", spec, "--device", "cpu", "--save-input", "-o", out))
    x, record = stored(out)
    # the spec's [input]: crop 20x24 just covered (60x90 -> 20x30, left 3) with lanczos
    expected = as_input(np.asarray(Image.open(photo).resize((30, 20), Image.Resampling.LANCZOS))[:, 3:27])
    np.testing.assert_allclose(x, (expected - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None])
    assert record["recipe"] == {"source": "the model spec's [input]", "overridden_by": []}
    assert record["steps"][2]["interpolation"] == "lanczos"

    out = tmp_path / "flags.h5"
    flags = ("--resize", 32, "--interpolation", "nearest", "--mean", "0.1,0.2,0.3", "--std", "0.5,1,2")
    ok(invoke("extract", photo, "-m", spec, "--device", "cpu", "--save-input", *flags, "-o", out))
    x, record = stored(out)
    # Resize(32): 60x90 -> 32x48, crop 20x24 at top 6, left 12
    expected = as_input(np.asarray(Image.open(photo).resize((48, 32), Image.Resampling.NEAREST))[6:26, 12:36])
    want = (expected - np.float32([0.1, 0.2, 0.3])[:, None, None]) / np.float32([0.5, 1, 2])[:, None, None]
    np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)
    assert record["recipe"]["overridden_by"] == ["--resize", "--interpolation", "--mean", "--std"]
    assert record["steps"][2]["shorter_side"] == 32
    assert record["steps"][-1] == {"step": "normalize", "mean": [0.1, 0.2, 0.3], "std": [0.5, 1.0, 2.0]}


DAMAGED_RECORDS = {  # what the record's steps get: (step, key, value), and what the error says after the record
    "interpolation": (("resize", "interpolation", "cubic"), "interpolation 'cubic' is not one of bilinear, bicubic, "
                      "nearest, lanczos"),
    "crop_mode": (("resize", "crop_mode", "zoom"), "crop mode 'zoom' is not one of center, squash, border"),
    "mean": (("normalize", "mean", [1, 2]), "normalize needs 3 finite means and 3 positive stds, not [1, 2] and "
             "[0.25, 0.2, 0.3]"),
    "std": (("normalize", "std", [0.25, 0, 0.3]), "normalize needs 3 finite means and 3 positive stds, not "
            "[0.5, 0.4, 0.3] and [0.25, 0, 0.3]"),
    "resize": (("resize", "shorter_side", 0), "sizes must be positive, not input_size [20, 24] and resize 0"),
    "steps": (None, "'steps'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DAMAGED_RECORDS))
def test_a_damaged_record_is_a_damaged_file(case: str, spec: Path, photo: Path, tmp_path: Path) -> None:
    """project re-reads the record: a value it would use without complaint, or fail on far from the
    record (Pillow, numpy), is refused naming the attribute."""
    out = tmp_path / "maps.h5"
    ok(invoke("extract", photo, "-m", spec, "--device", "cpu", "--resize", 30, "-o", out))
    change, says = DAMAGED_RECORDS[case]
    with h5py.File(out, "r+") as f:
        record = json.loads(f.attrs["preprocessing"])
        if change is None:
            del record["steps"]
        else:
            next(step for step in record["steps"] if step["step"] == change[0])[change[1]] = change[2]
        f.attrs["preprocessing"] = json.dumps(record)
    result = invoke("project", out, "--layer", "conv2", "--channel", 0, "-o", tmp_path / "p.h5")
    assert error_line(result, 1) == (
        f"Error: {out}: damaged fmap file: ValueError: attribute 'preprocessing' is not a record fmap can use: {says}"
    )
    assert not (tmp_path / "p.h5").exists()


def test_append_takes_the_same_steps_however_the_options_say_them(spec: Path, photo: Path, tmp_path: Path) -> None:
    """The record's 'recipe' says which options gave the values; --append compares the steps."""
    out, second = tmp_path / "maps.h5", tmp_path / "second.png"
    make_photo(40, 50, seed=2).save(second)
    ok(invoke("extract", photo, "-m", spec, "--device", "cpu", "-o", out))
    with h5py.File(out, "r") as f:
        steps = json.loads(f.attrs["preprocessing"])["steps"]
    same = ("--interpolation", "lanczos", "--mean", ",".join(map(str, MEAN)))  # the spec's own values
    ok(invoke("extract", second, "-m", spec, "--device", "cpu", *same, "--append", "-o", out))
    with h5py.File(out, "r") as f:
        assert int(f.attrs["n_images"]) == 2
        assert json.loads(f.attrs["preprocessing"])["steps"] == steps
    other = invoke(
        "extract", second, "-m", spec, "--device", "cpu", "--interpolation", "bicubic", "--append", "-o", out
    )
    assert error_line(other, 2) == (
        f"Error: --append: {out} differs from this run in: preprocessing; write a new file instead"
    )


def test_size_with_resize_keeps_the_resize(spec: Path, photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "sized.h5"
    ok(invoke("extract", photo, "-m", spec, "--device", "cpu", "--save-input", "--size", 16, "--resize", 20, "-o", out))
    x, record = stored(out)
    # Resize(20): 60x90 -> 20x30; crop 16x16 at top 2, left 7
    expected = as_input(np.asarray(Image.open(photo).resize((30, 20), Image.Resampling.LANCZOS))[2:18, 7:23])
    np.testing.assert_allclose(x, (expected - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None])
    assert record["recipe"]["overridden_by"] == ["--size", "--resize"]


def test_occlude_takes_the_same_flags(spec: Path, photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "occ.h5"
    flags = ("--layer", "conv2", "--no-class", "--patch", 8, "--stride", 8, "--interpolation", "bicubic")
    ok(invoke("occlude", photo, "-m", spec, "--device", "cpu", "--resize", 24, *flags, "-o", out))
    with h5py.File(out, "r") as f:
        record = json.loads(f.attrs["preprocessing"])
    assert record["steps"][2]["shorter_side"] == 24 and record["steps"][2]["interpolation"] == "bicubic"
    assert record["recipe"]["overridden_by"] == ["--resize", "--interpolation"]


# ---------------------------------------------------------------------------- flags refused


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--mean", "1,2", "expected three numbers R,G,B (e.g. 0.485,0.456,0.406), got '1,2'"),
        ("--mean", "a,b,c", "expected three numbers R,G,B (e.g. 0.485,0.456,0.406), got 'a,b,c'"),
        ("--mean", "nan,0,0", "expected three numbers R,G,B (e.g. 0.485,0.456,0.406), got 'nan,0,0'"),
        ("--std", "0.2,0,0.2", "expected three numbers R,G,B greater than 0 (e.g. 0.229,0.224,0.225), got '0.2,0,0.2'"),
        ("--std", "-1,1,1", "expected three numbers R,G,B greater than 0 (e.g. 0.229,0.224,0.225), got '-1,1,1'"),
        ("--std", "inf,1,1", "expected three numbers R,G,B greater than 0 (e.g. 0.229,0.224,0.225), got 'inf,1,1'"),
        ("--resize", "0", "0 is not in the range 1<=x<=2147483647."),
        ("--resize", str(10**400), f"{10**400} is not in the range 1<=x<=2147483647."),
        ("--interpolation", "cubic", "'cubic' is not one of 'bilinear', 'bicubic', 'nearest', 'lanczos'."),
    ],
)
def test_bad_recipe_flags(
    good: list[Path], tiny_model: Path, outdir: Path, flag: str, value: str, message: str
) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, flag, value)
    assert line == f"Error: Invalid value for '{flag}': {message}"


@pytest.mark.parametrize("flags", [("--resize", "30"), ("--interpolation", "bicubic")])
def test_resize_flags_with_no_resize(good: list[Path], tiny_model: Path, outdir: Path, flags: tuple[str, str]) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, *flags, "--no-resize")
    assert line == f"Error: {flags[0]} and --no-resize cannot be used together"


@pytest.mark.parametrize(
    ("flags", "shown"),
    [
        (("--std", "1e-40,1,1"), "mean 0.5,0.4,0.3 and std 1e-40,1,1 would normalise pixels to 1.5e+40"),
        (("--mean", "1e39,0,0", "--std", "1,1,1"), "mean 1e+39,0,0 and std 1,1,1 would normalise pixels to 1e+39"),
    ],
)
def test_a_normalisation_past_float32_is_refused(
    good: list[Path], tiny_model: Path, outdir: Path, flags: tuple[str, ...], shown: str
) -> None:
    """It gave NaN maps and exit 0: (x - mean) / std overflowed float32."""
    line = extract_fails(good, tiny_model, outdir, 2, *flags)
    assert line == f"Error: --mean/--std: {shown}, beyond float32 (3.4e+38); give a larger --std"


def test_occlude_refuses_a_bad_std(good: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    result = invoke("occlude", good[0], "-m", tiny_model, "--layer", "conv2", "--std", "1,1", "-o", tmp_path / "o.h5")
    line = error_line(result, 2)
    assert line == (
        "Error: Invalid value for '--std': expected three numbers R,G,B greater than 0 (e.g. 0.229,0.224,0.225), "
        "got '1,1'"
    )


def test_spec_interpolation_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SPEC.replace("[input]\n", '[input]\ninterpolation = "bicubc"\n'))
    line = error_line(invoke("layers", "-m", path), 1)
    assert line == (
        f"Error: {path}: [input]: interpolation must be one of bilinear, bicubic, nearest, lanczos, got 'bicubc' "
        "(did you mean 'bicubic'?)"
    )


# ---------------------------------------------------------------------------- torchvision recipes


def test_torchvision_recipe_is_the_default_weights(
    tmp_path: Path, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = functools.partial(
        ImageClassification, crop_size=40, resize_size=46, interpolation=InterpolationMode.BICUBIC, std=(0.5, 0.5, 0.5)
    )
    fake_torchvision(monkeypatch, recipe)
    loaded = load_model("torchvision:resnet18", model_args={"width": 8})
    assert loaded.input.recipe == (
        "torchvision ResNet18_Weights.IMAGENET1K_V9, the model's DEFAULT weights (not loaded: the weights are random)"
    )
    loaded = load_model("torchvision:resnet18", "pretrained", {"width": 8})
    assert loaded.input.recipe.endswith("DEFAULT weights (loaded)")
    weights = tmp_path / "weights.pt"
    torch.save(zoo.resnet18(width=8).state_dict(), weights)
    loaded = load_model("torchvision:resnet18", str(weights), {"width": 8})
    assert loaded.input.recipe.endswith("DEFAULT weights (not loaded: the weights are from --weights)")
    out = tmp_path / "tv.h5"
    args = ("--model-arg", "width=8", "--layers", "conv1", "--device", "cpu", "--save-input", "-o", out)
    ok(invoke("extract", photo, "--model", "torchvision:resnet18", *args))
    x, record = stored(out)
    # Resize(46): 60x90 -> 46x69; CenterCrop(40): top 3, left round(14.5) = 14 (halves round to even)
    resized = np.asarray(Image.open(photo).resize((69, 46), Image.Resampling.BICUBIC))
    expected = (as_input(resized[3:43, 14:54]) - np.float32([0.485, 0.456, 0.406])[:, None, None]) / np.float32(0.5)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    assert record["recipe"]["source"].startswith("torchvision ResNet18_Weights.IMAGENET1K_V9")
    assert (record["steps"][2]["shorter_side"], record["steps"][2]["interpolation"]) == (46, "bicubic")


def test_torchvision_weights_without_a_classification_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_torchvision(monkeypatch, ObjectDetection)
    loaded = load_model("torchvision:resnet18", model_args={"width": 8})
    assert (loaded.input.size, loaded.input.resize, loaded.input.interpolation) == ((224, 224), 256, "bilinear")
    assert loaded.input.recipe == (
        "fmap default for torchvision models (the recipe of ResNet18_Weights.IMAGENET1K_V9 is ObjectDetection)"
    )


# ---------------------------------------------------------------------------- timm recipes


def fake_timm(monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]) -> None:
    """A timm whose models are tests/zoo.py's resnet18 and whose data config is ``config``."""

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        model = zoo.resnet18(**kwargs)
        model.pretrained_cfg = {"architecture": name, "tag": "a1_in1k"}
        return model

    package, data = types.ModuleType("timm"), types.ModuleType("timm.data")
    package.create_model = create_model  # type: ignore[attr-defined]
    data.resolve_model_data_config = lambda model: dict(config)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", package)
    monkeypatch.setitem(sys.modules, "timm.data", data)


TIMM_CONFIG = {"input_size": (3, 40, 40), "interpolation": "bicubic", "crop_pct": 0.9, "mean": MEAN, "std": STD}


@pytest.mark.parametrize("mode", ["center", "squash", "border"])
def test_timm_recipe_from_its_data_config(
    mode: str, tmp_path: Path, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_timm(monkeypatch, {**TIMM_CONFIG, "crop_mode": mode})
    out = tmp_path / "timm.h5"
    args = ("--model-arg", "width=8", "--layers", "conv1", "--device", "cpu", "--save-input", "-o", out)
    ok(invoke("extract", photo, "--model", "timm:resnet18", *args))
    x, record = stored(out)
    source = Image.open(photo)
    # timm: scale size floor(40 / 0.9) = 44
    if mode == "center":  # Resize(44): 60x90 -> 44x66; CenterCrop(40): top 2, left 13
        pixels = np.asarray(source.resize((66, 44), Image.Resampling.BICUBIC))[2:42, 13:53]
    elif mode == "squash":  # Resize((44, 44)); CenterCrop(40): top 2, left 2
        pixels = np.asarray(source.resize((44, 44), Image.Resampling.BICUBIC))[2:42, 2:42]
    else:  # fit 44x44: ratio 90/44, 60x90 -> round(29.33) x 44 = 29x44; rows padded 5 + 6, columns from 2
        small = np.asarray(source.resize((44, 29), Image.Resampling.BICUBIC))[:, 2:42]
        pixels = padded(small, (5, 6), (0, 0), (128, 102, 76))
    expected = (as_input(pixels) - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None]
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    assert (
        record["recipe"]["source"]
        == "timm data config of resnet18.a1_in1k, crop_pct 0.9 (not loaded: the weights are random)"
    )
    assert record["steps"][2]["crop_mode"] == mode


def test_timm_recipe_fmap_cannot_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_timm(monkeypatch, {**TIMM_CONFIG, "crop_mode": "center", "interpolation": "hamming"})
    line = error_line(invoke("layers", "--model", "timm:resnet18", "--model-arg", "width=8"), 1)
    assert line == (
        "Error: --model timm:resnet18: its recipe resizes with 'hamming' in crop mode 'center'; fmap applies "
        "interpolations bilinear, bicubic, nearest, lanczos in crop modes center, squash, border"
    )
