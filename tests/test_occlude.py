"""fmap occlude (Zeiler & Fergus's occlusion sensitivity): the file it writes, checked against
independent numpy computations on crafted models, and what inspect and render show of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import Result
from conftest import REPO, make_photo
from helpers import error_line, invoke, ok, stop_after
from PIL import Image
from test_schema import check_attr, undocumented

from fmap_cli import __version__, occlusion_views
from fmap_cli.errors import StoppedError, UsageError
from fmap_cli.extract import Inputs, ModelChoice
from fmap_cli.models import load_model
from fmap_cli.occlusion import OccludeOptions, Occluder, class_names, fill_rgb, occlude, positions
from fmap_cli.spec import IMAGENET_MEAN, IMAGENET_STD
from fmap_cli.store import schema

FMAP = Path(sys.executable).parent / "fmap"
H, W = 24, 20  # the test images, fed at their own size (--no-resize)
REGION = (8, 16, 4, 12)  # rows 8..15, columns 4..11: the only pixels the crafted models look at
MEAN = np.asarray(IMAGENET_MEAN)  # factory models get ImageNet normalisation
STD = np.asarray(IMAGENET_STD)
# Channel k of layer 'feat' of RegionNet: a = relu(WEIGHTS[k] . (x * mask) + BIAS[k]), mask = REGION.
WEIGHTS = np.array([[1.0, 2.0, -1.0], [0.5, 0.5, 0.5]])
BIAS = np.array([10.0, 0.0])

MODELS = f'''
import torch
from torch import nn

REGION = {REGION}


class Tail(nn.Module):
    """After the feature layer: records how many images reach it (the early stop leaves it out)."""

    def __init__(self, counter, classify):
        super().__init__()
        self.counter, self.classify = counter, classify

    def forward(self, x):
        if self.counter:
            with open(self.counter, "a") as f:
                f.write(f"{{x.shape[0]}}\\n")
        return x.mean(dim=(2, 3)) if self.classify else x.mean(dim=(2, 3), keepdim=True)  # (N, 2) or (N, 2, 1, 1)


class RegionNet(nn.Module):
    """Layer 'feat' (1x1 conv, then relu) sees only REGION; the rest of the image is multiplied by 0."""

    def __init__(self, counter="", classify=False, scale=1.0):
        super().__init__()
        self.scale = scale  # other than 1: the output is not the tail's own (no layer's z is the output)
        mask = torch.zeros(1, 1, {H}, {W})
        mask[..., REGION[0]:REGION[1], REGION[2]:REGION[3]] = 1
        self.register_buffer("mask", mask)
        self.feat = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.feat.weight[:] = torch.tensor({WEIGHTS.tolist()}).reshape(2, 3, 1, 1)
            self.feat.bias[:] = torch.tensor({BIAS.tolist()})
        self.relu = nn.ReLU()
        self.tail = Tail(counter, classify)

    def forward(self, x):
        out = self.tail(self.relu(self.feat(x * self.mask)))
        return out if self.scale == 1 else out * self.scale


class RegionClassifier(nn.Module):
    """Three classes: score 0 is 0, score 1 is 4 x the mean normalised red of REGION, score 2 is 1."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(1, 3)
        with torch.no_grad():
            self.head.weight[:] = torch.tensor([[0.0], [4.0], [0.0]])
            self.head.bias[:] = torch.tensor([0.0, 0.0, 1.0])

    def forward(self, x):
        red = x[:, 0, REGION[0]:REGION[1], REGION[2]:REGION[3]].mean(dim=(1, 2))  # (N,)
        return self.head(red[:, None])  # (N, 3)


def region_net(counter="", classify=False, scale=1.0):
    return RegionNet(counter, classify, scale)


def region_classifier():
    return RegionClassifier()
'''


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "occlusion_models.py"
    path.write_text(MODELS)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    """Two smooth random pictures of H x W pixels."""
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"photo{i}.png")
        make_photo(H, W, seed=10 + i).save(paths[-1])
    return paths


@pytest.fixture
def square(tmp_path: Path) -> Path:
    """Black, with REGION white."""
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    pixels[REGION[0] : REGION[1], REGION[2] : REGION[3]] = 255
    path = tmp_path / "square.png"
    Image.fromarray(pixels, "RGB").save(path)
    return path


def run(images: list[Path], model: str, out: Path, *extra: object, code: int = 0) -> Result:
    """``fmap occlude`` on the CPU at the images' own size (unless --size), saving /input for the recomputations."""
    size = [] if "--size" in extra else ["--no-resize"]
    args = ["occlude", *images, "-m", model, "--device", "cpu", *size, "--save-input", "-o", out, *extra]
    return ok(invoke(*args), code)


def occluded_copy(x: np.ndarray, top: int, left: int, patch: tuple[int, int], fill: np.ndarray) -> np.ndarray:
    """(3, H, W) normalised input with the square at (top, left), filled with ``fill`` (normalised)."""
    copy = x.astype(np.float64)  # a new array
    copy[:, top : top + patch[0], left : left + patch[1]] = fill[:, None, None]
    return copy


def region_totals(x: np.ndarray) -> np.ndarray:
    """RegionNet's channel totals of one (3, H, W) input, in numpy: sum over the map of a."""
    mask = np.zeros((H, W))
    mask[REGION[0] : REGION[1], REGION[2] : REGION[3]] = 1
    z = np.einsum("kc,chw->khw", WEIGHTS, x * mask) + BIAS[:, None, None]
    return np.maximum(z, 0).sum(axis=(1, 2))  # (2,)


def normalised(rgb: tuple[float, float, float]) -> np.ndarray:
    return (np.asarray(rgb) - MEAN) / STD


def covers_region(y: np.ndarray, x: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """(Gy, Gx): whether the square at each position overlaps REGION."""
    rows = (y < REGION[1]) & (y + patch[0] > REGION[0])
    cols = (x < REGION[3]) & (x + patch[1] > REGION[2])
    return rows[:, None] & cols[None, :]


# ---------------------------------------------------------------------------- occluder positions


def test_positions_cover_every_pixel_and_end_flush_with_the_edge() -> None:
    assert positions(24, 6, 4).tolist() == [0, 4, 8, 12, 16, 18]  # 18 = 24 - 6 added: flush
    assert positions(20, 6, 4).tolist() == [0, 4, 8, 12, 14]
    assert positions(24, 8, 8).tolist() == [0, 8, 16]  # 16 = 24 - 8 reached: nothing added
    assert positions(24, 24, 8).tolist() == [0]
    assert positions(24, 10, 10).tolist() == [0, 10, 14]
    for size in range(1, 30):
        for patch in range(1, size + 1):
            for stride in range(1, patch + 1):  # a stride over the patch is refused (pixels left uncovered)
                corners = positions(size, patch, stride)
                covered = np.zeros(size, dtype=bool)
                for top in corners:
                    covered[top : top + patch] = True
                assert covered.all(), (size, patch, stride)
                assert corners[0] == 0 and corners[-1] == size - patch, (size, patch, stride)
                assert np.all(np.diff(corners) >= 1) and np.all(np.diff(corners) <= stride), (size, patch, stride)
    with pytest.raises(
        UsageError, match=r"^--patch 25 is larger than the input \(24 pixels\); give a smaller --patch$"
    ):
        positions(24, 25, 8)


def test_fill_values_are_the_documented_ones() -> None:
    mean = (0.485, 0.456, 0.406)
    assert fill_rgb("grey", mean) == (0.5, 0.5, 0.5)  # the paper's grey square, in [0, 1] pixel space
    assert fill_rgb("mean", mean) == mean  # zero after normalising
    assert fill_rgb("zero", mean) == (0.0, 0.0, 0.0)  # black
    assert fill_rgb("255,0,51", mean) == (1.0, 0.0, 0.2)
    for bad in ("pink", "256,0,0", "1,2", "-1,0,0", ""):
        with pytest.raises(UsageError, match=r"^--fill: expected grey, mean, zero or R,G,B \(each 0-255\), got "):
            fill_rgb(bad, mean)


# ---------------------------------------------------------------------------- the activity of a feature map


@pytest.mark.parametrize("fill", ["grey", "mean", "zero", "255,0,128"])
def test_activity_drops_exactly_where_the_occluder_covers_the_region(
    fill: str, models: Path, photos: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "occ.h5"
    patch = (6, 6)
    run(photos, f"{models}:region_net", out, "--layer", "feat", "--patch", "6", "--stride", "4", "--fill", fill)
    rgb = fill_rgb(fill, IMAGENET_MEAN)
    with h5py.File(out, "r") as f:
        assert f.attrs["fmap_file_kind"] == schema.OCCLUSION and f.attrs["complete"] == 1
        assert f.attrs["layer"] == "feat" and f.attrs["channel_choice"] == "strongest"
        assert f.attrs["patch"].tolist() == [6, 6] and f.attrs["stride"].tolist() == [4, 4]
        assert f.attrs["fill"].tolist() == list(rgb) and f.attrs["fill_name"] == fill
        group = f["occlusion"]
        y, x = group["y"][...], group["x"][...]
        assert y.tolist() == [0, 4, 8, 12, 16, 18] and x.tolist() == [0, 4, 8, 12, 14]
        assert group["activity"].attrs["role"] == "activation"
        assert "probability" not in group  # RegionNet outputs maps, not class scores
        inputs = f["input"][...]  # (N, 3, H, W): the unoccluded images as the network saw them
        for n in range(2):
            baseline = region_totals(inputs[n])
            assert group["channel"][n].tolist() == [int(np.argmax(baseline))] == [0]  # the strongest
            assert np.isclose(group["baseline"][n, 0], baseline[0], rtol=1e-6)
            expected = np.array(
                [[region_totals(occluded_copy(inputs[n], t, left, patch, normalised(rgb)))[0] for left in x] for t in y]
            )
            activity = group["activity"][n, 0]
            assert np.allclose(activity, expected, rtol=1e-6), np.abs(activity - expected).max()
            covered = covers_region(y, x, patch)
            assert np.allclose(activity[~covered], group["baseline"][n, 0], rtol=1e-6, atol=0)
            assert np.all(np.abs(activity[covered] - group["baseline"][n, 0]) > 1e-3)


def test_channel_all_and_a_list_of_channels(models: Path, photos: list[Path], tmp_path: Path) -> None:
    for channels, expected in (("all", [0, 1]), ("1", [1]), ("1,0,1", [1, 0])):
        out = tmp_path / f"occ_{channels}.h5"
        run(photos[:1], f"{models}:region_net", out, "--layer", "feat", "--channel", channels, "--patch", "8")
        with h5py.File(out, "r") as f:
            group = f["occlusion"]
            assert f.attrs["channel_choice"] == ("all" if channels == "all" else "given")
            assert group["channel"][0].tolist() == expected
            assert group["activity"].shape == (1, len(expected), 3, 3)  # y: 0, 8, 16; x: 0, 8, 12
            totals = region_totals(f["input"][0])
            assert np.allclose(group["baseline"][0], totals[expected], rtol=1e-6)
            for k, channel in enumerate(expected):
                grey = normalised((0.5,) * 3)
                want = [[region_totals(occluded_copy(f["input"][0], t, left, (8, 8), grey))[channel]
                         for left in group["x"]] for t in group["y"]]  # fmt: skip
                assert np.allclose(group["activity"][0, k], want, rtol=1e-6, atol=1e-9)


def tail_calls(counter: Path) -> list[int]:
    """The batch sizes that reached RegionNet's tail, in order."""
    return [int(line) for line in counter.read_text().split()] if counter.exists() else []


def test_the_forward_pass_stops_at_the_layer_unless_class_scores_are_needed(
    models: Path, photos: list[Path], tmp_path: Path
) -> None:
    counter = tmp_path / "calls.txt"
    arg = ["--model-arg", f"counter={counter}"]
    grid = 6 * 5  # positions of a 6x6 square, stride 4, on 24x20
    # not a classifier: the tail runs for the layer list and for the check of the output, never on a copy
    run(photos, f"{models}:region_net", tmp_path / "a.h5", "--layer", "feat", "--patch", "6", "--stride", "4", *arg)
    assert tail_calls(counter) == [1, 1]
    # a classifier, --no-class: the layer list only
    counter.unlink()
    run(photos, f"{models}:region_net", tmp_path / "b.h5", "--layer", "feat", "--patch", "6", "--stride", "4",
        "--no-class", *arg, "--model-arg", "classify=true")  # fmt: skip
    assert tail_calls(counter) == [1]
    # a classifier: every copy goes through the whole network, --batch-size copies at a time (after the
    # layer list, the output check and the check that the tail's z is the output)
    counter.unlink()
    run(photos, f"{models}:region_net", tmp_path / "c.h5", "--layer", "feat", "--patch", "6", "--stride", "4",
        "-b", "7", *arg, "--model-arg", "classify=true")  # fmt: skip
    per_image = [1, *[7] * (grid // 7), grid % 7]  # the unoccluded image, then the copies
    assert tail_calls(counter) == [1, 1, 1, *per_image, *per_image]
    with h5py.File(tmp_path / "c.h5", "r") as f, h5py.File(tmp_path / "b.h5", "r") as g:
        assert f.attrs["n_classes"] == 2 and "n_classes" not in g.attrs
        assert np.array_equal(f["occlusion/activity"][...], g["occlusion/activity"][...])


@pytest.mark.parametrize(("scale", "passes"), [(1.0, "one pass per batch"), (2.0, "two passes per batch")])
def test_class_maps_with_a_layer_in_one_pass_or_two(
    scale: float, passes: str, models: Path, photos: list[Path], tmp_path: Path
) -> None:
    """The scores are the tail's z (one capture pass), or computed after it (capture, then a plain pass)."""
    out = tmp_path / "both.h5"
    result = run(photos[:1], f"{models}:region_net", out, "--layer", "feat", "--patch", "6", "--stride", "4",
                 "--model-arg", "classify=true", "--model-arg", f"scale={scale}")  # fmt: skip
    assert f"; {passes} " in result.stderr, result.stderr
    with h5py.File(out, "r") as f:
        group = f["occlusion"]
        x0, y, x = f["input"][0], group["y"][...], group["x"][...]
        grey = normalised((0.5, 0.5, 0.5))

        def probabilities(image: np.ndarray) -> np.ndarray:
            return softmax(scale * region_totals(image) / (H * W))  # the tail: the mean of feat's a

        assert group["top_class"][0] == group["class"][0] == int(np.argmax(probabilities(x0)))
        p = np.array([[probabilities(occluded_copy(x0, t, left, (6, 6), grey)) for left in x] for t in y])
        assert np.allclose(group["probability"][0], p[..., int(group["class"][0])], rtol=1e-5, atol=1e-7)
        assert np.array_equal(group["label"][0], p.argmax(axis=-1))
        want = [[region_totals(occluded_copy(x0, t, left, (6, 6), grey))[0] for left in x] for t in y]
        assert np.allclose(group["activity"][0, 0], want, rtol=1e-6)


def test_layer_without_a_nonlinearity_sums_z(models: Path, photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "z.h5"
    run(photos[:1], f"{models}:region_net", out, "--layer", "tail", "--patch", "12", "--stride", "12")
    with h5py.File(out, "r") as f:
        group = f["occlusion"]
        assert group["activity"].attrs["role"] == "preactivation"
        mean_a = region_totals(f["input"][0]) / (H * W)  # tail = the mean of feat's a, a (2, 1, 1) map
        assert group["channel"][0].tolist() == [0]
        assert np.isclose(group["baseline"][0, 0], mean_a[0], rtol=1e-6)


# ---------------------------------------------------------------------------- class probability and label


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max())
    return e / e.sum()


def classifier_scores(x: np.ndarray) -> np.ndarray:
    """RegionClassifier by hand: [0, 4 * mean red of REGION, 1]."""
    red = x[0, REGION[0] : REGION[1], REGION[2] : REGION[3]].mean()
    return np.array([0.0, 4.0 * red, 1.0])


@pytest.mark.parametrize("target", [None, 2])
def test_probability_and_label_maps_match_a_hand_computation(
    target: int | None, models: Path, square: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cls.h5"
    extra = [] if target is None else ["--class", str(target)]
    run([square], f"{models}:region_classifier", out, "--patch", "8", "--stride", "4", *extra)
    with h5py.File(out, "r") as f:
        group = f["occlusion"]
        assert "activity" not in group and "layer" not in f.attrs
        assert f.attrs["n_classes"] == 3 and f.attrs["class_choice"] == ("top1" if target is None else "given")
        x0 = f["input"][0]
        unoccluded = softmax(classifier_scores(x0))
        assert int(np.argmax(unoccluded)) == 1  # the white square makes class 1 the top-1
        assert group["top_class"][0] == 1
        assert group["class"][0] == (1 if target is None else target)  # default: the unoccluded top-1
        k = int(group["class"][0])
        assert np.isclose(group["class_probability"][0], unoccluded[k], rtol=1e-6)
        y, x = group["y"][...], group["x"][...]
        assert y.tolist() == [0, 4, 8, 12, 16] and x.tolist() == [0, 4, 8, 12]
        grey = normalised((0.5, 0.5, 0.5))
        p = np.array([[softmax(classifier_scores(occluded_copy(x0, t, left, (8, 8), grey))) for left in x] for t in y])
        assert np.allclose(group["probability"][0], p[..., k], rtol=1e-5, atol=1e-7)
        assert np.array_equal(group["label"][0], p.argmax(axis=-1))
        assert group["label"][0][2, 1] == 2  # the square covered exactly: class 1 loses to class 2
        assert set(np.unique(group["label"][0])) == {1, 2}
        assert "class_names" not in group  # a factory model has no class names
    assert undocumented(out) == []


def test_model_without_class_scores_needs_a_layer(models: Path, photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    line = error_line(run(photos, f"{models}:region_net", out, "--patch", "8", code=2), 2)
    assert line == (
        "Error: model 'region_net' does not output class scores (N, K); give --layer L to record the activity "
        "of a feature map (see 'fmap layers')"
    )
    assert not out.exists() and not list(tmp_path.glob(".x.h5*"))


# ---------------------------------------------------------------------------- class names from the model


def fake_libraries(monkeypatch: pytest.MonkeyPatch, models: Path) -> None:
    """torchvision and timm stand-ins whose models are RegionClassifier, with class names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("occlusion_models_for_fakes", models)
    assert spec is not None and spec.loader is not None
    crafted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crafted)
    tv, tv_models = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    categories = {"categories": ["cat", "square", "other"]}
    # transforms: no ImageClassification recipe, so fmap's default preprocessing (--size is given below)
    weights = types.SimpleNamespace(DEFAULT=types.SimpleNamespace(meta=categories, name="V1", transforms=object))
    tv_models.get_model = lambda name, weights=None, **kw: crafted.region_classifier()  # type: ignore[attr-defined]
    tv_models.get_model_weights = lambda name: weights  # type: ignore[attr-defined]
    tv.models = tv_models  # type: ignore[attr-defined]

    def create_model(name: str, pretrained: bool = False, **kw: Any) -> Any:
        model = crafted.region_classifier()
        model.pretrained_cfg = {"input_size": (3, H, W), "crop_pct": 1.0}
        return model

    class ImageNetInfo:
        def __init__(self, subset: str) -> None:
            assert subset == "imagenet-3"

        def label_descriptions(self) -> list[str]:
            return ["tench, Tinca tinca", "white square", "goldfish"]

    timm, timm_data = types.ModuleType("timm"), types.ModuleType("timm.data")
    timm.create_model = create_model  # type: ignore[attr-defined]
    timm_data.infer_imagenet_subset = lambda model: "imagenet-3"  # type: ignore[attr-defined]
    recipe = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "mean": MEAN, "std": STD}
    timm_data.resolve_model_data_config = lambda model: {**recipe, **model.pretrained_cfg}  # type: ignore[attr-defined]
    timm_data.ImageNetInfo = ImageNetInfo  # type: ignore[attr-defined]
    timm.data = timm_data  # type: ignore[attr-defined]
    for name, module in (("torchvision", tv), ("torchvision.models", tv_models), ("timm", timm),
                         ("timm.data", timm_data)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize(
    ("library", "names", "source"),
    [
        ("torchvision", ["cat", "square", "other"], "meta['categories']"),
        ("timm", ["tench, Tinca tinca", "white square", "goldfish"], "timm ImageNetInfo('imagenet-3')"),
    ],
)
def test_class_names_come_from_the_library_with_its_pretrained_weights(
    library: str, names: list[str], source: str, models: Path, square: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    fake_libraries(monkeypatch, models)
    out = tmp_path / "named.h5"
    run([square], f"{library}:crafted", out, "--weights", "pretrained", "--patch", "8", "--size", f"{H},{W}")
    with h5py.File(out, "r") as f:
        assert f["occlusion/class_names"].asstr()[...].tolist() == names
        assert source in f.attrs["class_names_source"]
        assert f["occlusion/class"][0] == 1
    summary = invoke("inspect", out).stdout
    assert f"class 1 '{names[1]}': p = " in summary
    # without the library's own weights, the classes are the user's: no names
    own = tmp_path / "own.h5"
    run([square], f"{library}:crafted", own, "--patch", "8", "--size", f"{H},{W}")
    with h5py.File(own, "r") as f:
        assert "class_names" not in f["occlusion"] and "class_names_source" not in f.attrs


def test_class_names_of_the_real_libraries() -> None:
    """Optional (needs torchvision and timm, as in .venv-zoo): the names the real libraries give."""
    torchvision = pytest.importorskip("torchvision")
    timm = pytest.importorskip("timm")
    loaded = load_model("torchvision:resnet18")
    pretrained = type(loaded)(**{**vars(loaded), "description": {**loaded.description, "weights": "pretrained"}})
    names, source = class_names(pretrained, 1000) or ([], "")
    assert names[:2] == ["tench", "goldfish"] and "ResNet18_Weights" in source, source
    assert class_names(pretrained, 10) is None  # a head of another size: names would not fit
    assert class_names(loaded, 1000) is None  # random weights
    module = timm.create_model("resnet18", pretrained=False)
    timm_loaded = type(loaded)(module, "resnet18", "timm:resnet18", loaded.input, "", {
        "source": "timm:resnet18", "weights": "pretrained"})  # fmt: skip
    names, source = class_names(timm_loaded, 1000) or ([], "")
    assert names[0] == "tench, Tinca tinca" and "imagenet-1k" in source
    del torchvision


# ---------------------------------------------------------------------------- the file


def test_every_schema_node_of_an_occlusion_file_is_there_with_its_dtype(
    models: Path, photos: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "full.h5"
    run(photos, f"{models}:region_net", out, "--layer", "feat", "--channel", "all", "--patch", "6",
        "--model-arg", "classify=true")  # fmt: skip
    with h5py.File(out, "r") as f:
        n = int(f.attrs["n_images"])
        assert n == 2
        for node in schema.OCCLUSION_SCHEMA:
            if node.path not in f:
                assert not node.required or node.path in ("/C", "/H", "/W"), node.path
                assert node.path in ("/failures", "/failures/index", "/failures/path", "/failures/reason",
                                     "/occlusion/class_names"), node.path  # fmt: skip
                continue
            obj = f[node.path]
            assert isinstance(obj, h5py.Group if node.kind == "group" else h5py.Dataset), node.path
            if node.kind == "dataset":
                ndim = len([part for part in node.shape.strip("()").split(",") if part.strip()])
                assert obj.ndim == ndim, (node.path, obj.shape)
                if node.shape.startswith("(N"):
                    assert obj.shape[0] == n, node.path
                if node.dtype != "str":
                    assert obj.dtype == np.dtype(node.dtype), (node.path, obj.dtype)
            for attr in node.attrs:
                if attr.name in obj.attrs:
                    check_attr(attr, obj.attrs[attr.name], node.path)
                else:
                    assert not attr.required, (node.path, attr.name)
        assert f["occlusion/activity"].dims[0].label == "N" and f["occlusion/activity"].dims[3].label == "x"
        assert f["occlusion/activity"].dims[2][0].name == "/occlusion/y"
        assert (
            f["occlusion/activity"].attrs["description"]
            == schema.node_for("/occlusion/activity", "occlusion").description
        )
    assert undocumented(out) == []


def test_json_skip_bad_and_an_existing_output(models: Path, photos: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "occ.h5"
    result = run([photos[0], bad, photos[1]], f"{models}:region_net", out, "--layer", "feat", "--patch", "12",
                 "--stride", "12", "--skip-bad", "--json", code=1)  # fmt: skip
    printed = json.loads(result.stdout)
    assert printed["output"] == str(out) and printed["images_written"] == 2 and printed["positions"] == 2 * 2
    assert printed["grid"] == [2, 2] and printed["layer"] == "feat" and printed["classes"] == 0
    assert [(f["index"], Path(f["path"]).name) for f in printed["images_failed"]] == [(1, "bad.png")]
    with h5py.File(out, "r") as f:
        assert f["images/index"][...].tolist() == [0, 2]
        assert f["failures/index"][...].tolist() == [1]
    line = error_line(run(photos, f"{models}:region_net", out, "--layer", "feat", code=2), 2)
    assert line == f"Error: {out}: already exists; pass --overwrite to replace it"
    line = error_line(run([bad], f"{models}:region_net", tmp_path / "no.h5", "--layer", "feat", code=1), 1)
    assert line.startswith(f"Error: {bad}: ") and not (tmp_path / "no.h5").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--channel", "1"], "--channel needs --layer (which layer's channels?)"),
        (["--no-class"], "--no-class needs --layer: there would be nothing to record"),
        (["--layer", "feat", "--class", "1", "--no-class"], "--class and --no-class cannot be used together"),
        (["--layer", "feat", "--channel", "2"], "--channel 2 out of range: layer 'feat' has channels 0..1"),
        (["--layer", "feat", "--class", "0"], "--class 0: model 'region_net' does not output class scores (N, K)"),
        (
            ["--layer", "feat", "--patch", "30"],
            "--patch 30 is larger than the input (24 pixels); give a smaller --patch",
        ),
        (
            ["--layer", "feat", "--patch", "8,21"],
            "--patch 21 is larger than the input (20 pixels); give a smaller --patch",
        ),
        (["--layer", "feat", "--fill", "pink"], "--fill: expected grey, mean, zero or R,G,B (each 0-255), got 'pink'"),
        (["--layer", "feat", "--patch", "4", "--stride", "5"], "--stride 5 is larger than --patch 4: pixels between"),
        (["--layer", "*"], "--layer takes one layer; '*' matches 3: feat, relu, tail"),
        (["--layer", "feet"], "--layer: no layer 'feet' in model 'region_net'; did you mean 'feat'? "),
        (["--layer", "feat", "--channel", "x"], "Invalid value for '--channel': expected a channel C, channels "),
        (["--layer", "feat", "--stride", "0"], "Invalid value for '--stride': expected a positive integer N or H,W"),
    ],
)
def test_usage_errors(args: list[str], message: str, models: Path, photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    line = error_line(run(photos, f"{models}:region_net", out, "--patch", "8", *args, code=2), 2)
    assert line.startswith(f"Error: {message}"), line
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))


def test_class_out_of_range(models: Path, square: Path, tmp_path: Path) -> None:
    line = error_line(run([square], f"{models}:region_classifier", tmp_path / "o.h5", "--patch", "8", "--class", "3",
                          code=2), 2)  # fmt: skip
    assert line == "Error: --class 3 out of range: model 'region_classifier' outputs 3 class scores (0..2)"


def test_a_signal_leaves_nothing(models: Path, photos: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "occ.h5"
    stop, progress = stop_after(1)
    options = OccludeOptions(
        Inputs([str(p) for p in photos]), out, ModelChoice(f"{models}:region_net", device="cpu", no_resize=True),
        layer="feat", occluder=Occluder((6, 6), (4, 4)),
    )  # fmt: skip
    with pytest.raises(StoppedError, match=r"^interrupted by signal 15; no output written$"):
        occlude(options, stop_requested=stop, progress=progress)
    assert not out.exists() and not list(tmp_path.glob(".occ.h5*"))


# ---------------------------------------------------------------------------- inspect and render


@pytest.fixture
def both(models: Path, photos: list[Path], tmp_path: Path) -> Path:
    """Both photos, layer feat (both channels) and class maps (RegionNet with a 2-class tail)."""
    out = tmp_path / "both.h5"
    run(photos, f"{models}:region_net", out, "--layer", "feat", "--channel", "all", "--patch", "6", "--stride", "4",
        "--model-arg", "classify=true")  # fmt: skip
    return out


def test_inspect_reports_baseline_largest_drop_and_the_class(both: Path) -> None:
    text = invoke("inspect", both).stdout
    with h5py.File(both, "r") as f:
        group = f["occlusion"]
        y, x = group["y"][...], group["x"][...]
        lines = [
            f"{both}: fmap occlusion file (schema v{schema.SCHEMA_VERSION}), written by fmap {__version__} at "
            f"{f.attrs['created']} on cpu",
            f"model: region_net ({f.attrs['model_source']})",
            "occluder: 6x6 pixels, fill grey (R, G, B = 0.5, 0.5, 0.5 before normalising), stride 4x4: 6x5 positions",
            "layer: feat, total a of 2 channel(s) per image (all)",
            "classes: 2 (top1)",
            "images: 2  (input tensor saved in /input)",
        ]
        for n in range(2):
            lines.append(f"  [{n}] {f['images/path'].asstr()[n]}")
            drops = []
            for k in range(2):
                activity, base = group["activity"][n, k], float(group["baseline"][n, k])
                i, j = np.unravel_index(np.argmin(activity), activity.shape)
                low = float(activity[i, j])
                drops.append((base - low, k, base, low, int(y[i]), int(x[j])))
            for drop, k, base, low, at_y, at_x in sorted(drops, key=lambda d: -d[0]):
                share = f" ({drop / base:.0%})" if base > 0 else ""
                lines.append(f"      channel {k}: total {base:.4g} unoccluded; largest drop {drop:.4g}{share} to "
                             f"{low:.4g} with the occluder at y={at_y} x={at_x}")  # fmt: skip
            p = group["probability"][n]
            i, j = np.unravel_index(np.argmin(p), p.shape)
            k, labels = int(group["class"][n]), len(np.unique(group["label"][n]))
            lines.append(f"      class {k}: p = {float(group['class_probability'][n]):.4g} unoccluded; lowest "
                         f"{float(p[i, j]):.4g} with the occluder at y={y[i]} x={x[j]}; {labels} different top-1 "
                         "label(s)")  # fmt: skip
    assert text == "\n".join(lines) + "\n"
    data = json.loads(invoke("inspect", both, "--json").stdout)
    assert data["kind"] == "occlusion" and data["grid"] == [6, 5] and data["n_channels"] == 2
    drops = [c["drop"] for c in data["images"][0]["channels"]]
    assert drops == sorted(drops, reverse=True) and sorted(c["channel"] for c in data["images"][0]["channels"]) == [
        0,
        1,
    ]
    line = error_line(invoke("inspect", both, "--channels"), 2)
    assert line == (f"Error: {both} is an occlusion file: --layer, --channel, --channels, --top and --hist "
                    "describe maps files")  # fmt: skip


def test_render_draws_each_value_around_its_occluder_centre(both: Path, tmp_path: Path) -> None:
    out = tmp_path / "fig7.png"
    assert invoke("render", both, "--image", "1", "-o", out).stdout == f"{out}\n"
    picture = np.asarray(Image.open(out).convert("RGB"))
    zoom = -(-occlusion_views.PANEL_MIN // max(H, W))  # 7
    panels = 1 + 2 + 2  # input, two channels, probability, label
    gap, top = occlusion_views.GAP, 2 * occlusion_views.LINE_H + 4
    assert picture.shape[1] >= gap + panels * (W * zoom + gap)  # the legend may be wider
    with h5py.File(both, "r") as f:
        base = np.rint(np.clip(f["input"][1] * STD[:, None, None] + MEAN[:, None, None], 0, 1) * 255)  # (3, H, W)
        drops = f["occlusion/baseline"][1][:, None, None] - f["occlusion/activity"][1]
        order = np.argsort([-drops[k].max() for k in range(2)], kind="stable")
        y, x = f["occlusion/y"][...], f["occlusion/x"][...]
    first = picture[top : top + H * zoom, gap : gap + W * zoom]  # the input panel
    assert np.abs(first[::zoom, ::zoom] - base.transpose(1, 2, 0)).max() <= 1
    base = first[::zoom, ::zoom].transpose(2, 0, 1).astype(np.float64)  # the input as drawn
    panel = picture[top : top + H * zoom, gap + (W * zoom + gap) : gap + 2 * (W * zoom + gap) - gap]
    drop = drops[order[0]]
    for i, t in enumerate(y):
        for j, left in enumerate(x):
            r, c = int(t) + 3, int(left) + 3  # the centre pixel of the 6x6 square
            shown = panel[r * zoom + zoom // 2, c * zoom + zoom // 2]
            dimmed = np.rint(occlusion_views.DIM * base[:, r, c])
            if drop[i, j] <= 0:  # no drop: the darkened input, nothing drawn over it
                assert np.array_equal(shown, dimmed), (i, j)
            elif drop[i, j] > 0.05 * drop.max():
                assert not np.array_equal(shown, dimmed), (i, j)
    corner = panel[0, 0]  # no occluder is centred at (0, 0): the darkened input
    assert np.array_equal(corner, np.rint(occlusion_views.DIM * base[:, 0, 0]))


def test_render_image_all_has_a_stated_limit(both: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = Image.open(invoke("render", both, "-o", tmp_path / "one.png").stdout.strip())
    two = Image.open(invoke("render", both, "--image", "all", "-o", tmp_path / "two.png").stdout.strip())
    assert two.width == one.width and two.height > one.height
    monkeypatch.setattr(occlusion_views, "ROW_LIMIT", 1)
    limited = Image.open(invoke("render", both, "--image", "all", "-o", tmp_path / "lim.png").stdout.strip())
    assert limited.height > one.height and limited.height < two.height  # one row and one more legend line
    assert f"{both.stem}.all.png" == "both.all.png"
    monkeypatch.chdir(tmp_path)
    assert invoke("render", both, "--image", "all").stdout == "both.all.png\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "feat"], "--layer: for maps files; an occlusion file is drawn per --image (INDEX|PATH|all)"),
        (["--role", "both"], "--role: for maps files; an occlusion file is drawn per --image (INDEX|PATH|all)"),
        (["--full"], "--full draws projection files (fmap project); for occlusion files leave it out"),
        (["--image", "2"], "--image 2 out of range: the file has images 0..1"),
    ],
)
def test_render_usage_errors(args: list[str], message: str, both: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.png"
    assert error_line(invoke("render", both, "-o", out, *args), 2) == f"Error: {message}"
    assert not out.exists()


@pytest.mark.skipif(not FMAP.is_file(), reason=f"console script not installed at {FMAP}")
def test_inspect_and_render_of_an_occlusion_file_do_not_import_torch(both: Path, tmp_path: Path) -> None:
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text('raise ImportError("torch must not be imported")\n')
    env = dict(os.environ, PYTHONPATH=str(poison))
    for args in (["inspect", str(both)], ["render", str(both), "--image", "all", "-o", str(tmp_path / "r.png")]):
        proc = subprocess.run([str(FMAP), *args], capture_output=True, text=True, env=env, timeout=120, check=False,
                              cwd=REPO)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "torch" not in proc.stderr
