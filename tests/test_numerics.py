"""Numerical correctness: every stored map is checked against an independent numpy computation.

The references below (conv2d, maxpool2d, preprocessing, receptive fields) are written here in
plain numpy from their definitions; nothing in them calls torch, scipy or fmap's own geometry.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zoo
from click.testing import CliRunner
from conftest import SAMPLES, extract_options, make_photo, tiny_weights
from PIL import Image

from fmap_cli.cli import cli
from fmap_cli.errors import VerificationError
from fmap_cli.extract import extract
from fmap_cli.spec import builtin_spec_path, geometry, load_spec
from fmap_cli.verify import verify_pairs

ZOO_FILE = Path(zoo.__file__)

TINY_MEAN = np.array([0.5, 0.4, 0.3])  # from conftest.TINY_SPEC
TINY_STD = np.array([0.25, 0.2, 0.3])
TINY_SIZE = (20, 24)  # (H, W)


# ---------------------------------------------------------------------------- references


def ref_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Cross-correlation as in CNNs, in float64: explicit loop over kernel offsets on the padded input."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, c, h, wd = x.shape
    o, c_w, kh, kw = w.shape
    assert c == c_w
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding : padding + h, padding : padding + wd] = x
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + np.asarray(b, dtype=np.float64)[None, :, None, None]


def ref_maxpool2d(x: np.ndarray, kernel: int, stride: int | None = None) -> np.ndarray:
    """Max over every kernel x kernel window (no padding), keeping x's dtype (max is exact)."""
    stride = stride or kernel
    n, c, h, w = x.shape
    ho, wo = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    out = np.full((n, c, ho, wo), -np.inf, dtype=x.dtype)
    for i in range(kernel):
        for j in range(kernel):
            out = np.maximum(
                out, x[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            )
    return out


def test_reference_conv_matches_a_hand_computed_value() -> None:
    """The reference itself: one output element computed by hand."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 2, 5, 6))
    w = rng.normal(size=(3, 2, 3, 3))
    b = rng.normal(size=3)
    out = ref_conv2d(x, w, b, stride=2, padding=1)
    assert out.shape == (1, 3, 3, 3)
    # output (o=1, r=1, c=2) looks at padded rows 2..4, cols 4..6 = input rows 1..3, cols 3..5 (col 6 is padding)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = float(np.sum(xp[0, :, 2:5, 4:7] * w[1]) + b[1])
    assert out[0, 1, 1, 2] == pytest.approx(expected)
    pooled = ref_maxpool2d(np.arange(16.0).reshape(1, 1, 4, 4), 2)
    assert pooled[0, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]


# ---------------------------------------------------------------------------- helpers


def run(images: list[Path], out: Path, **kwargs) -> Path:
    kwargs.setdefault("device", "cpu")
    extract(extract_options([str(p) for p in images], out=out, **kwargs))
    return out


def read(path: Path, name: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[name][...]


# ---------------------------------------------------------------------------- tiny model


@pytest.fixture
def tiny_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> Path:
    return run(images, tmp_path / "tiny.h5", model=str(tiny_model), save_input=True, layers=["conv1", "pool1", "conv2"])


def test_conv1_preactivation_equals_reference_conv_of_input(tiny_file: Path) -> None:
    w = tiny_weights()
    x = read(tiny_file, "input")
    z = read(tiny_file, "layers/conv1/preactivation")
    assert x.shape == (3, 3, *TINY_SIZE)
    assert z.dtype == np.float32
    expected = ref_conv2d(x, w["conv1.weight"], w["conv1.bias"], stride=1, padding=1)
    assert z.shape == expected.shape == (3, 4, *TINY_SIZE)
    np.testing.assert_allclose(z, expected, atol=1e-5, rtol=1e-5)
    assert (z < 0).any() and (z > 0).any()  # a genuine pre-activation, not already rectified


def test_conv1_activation_is_exactly_relu_of_preactivation(tiny_file: Path) -> None:
    z = read(tiny_file, "layers/conv1/preactivation")
    a = read(tiny_file, "layers/conv1/activation")
    assert (z < 0).any()
    assert np.array_equal(a, np.maximum(z, np.float32(0)))
    assert not np.array_equal(a, z)


def test_conv2_input_is_pooled_conv1_activation(tiny_file: Path) -> None:
    w = tiny_weights()
    a1 = read(tiny_file, "layers/conv1/activation")
    pool_z = read(tiny_file, "layers/pool1/preactivation")
    z2 = read(tiny_file, "layers/conv2/preactivation")
    pooled = ref_maxpool2d(a1, 2)
    assert np.array_equal(pool_z, pooled)  # max pooling is exact
    expected = ref_conv2d(pooled, w["conv2.weight"], w["conv2.bias"], stride=2, padding=0)
    assert z2.shape == expected.shape == (3, 5, 4, 5)
    np.testing.assert_allclose(z2, expected, atol=1e-5, rtol=1e-5)
    # and NOT the conv of the unrectified conv1 output: proves the relu sits between them
    wrong = ref_conv2d(
        ref_maxpool2d(read(tiny_file, "layers/conv1/preactivation"), 2), w["conv2.weight"], w["conv2.bias"], 2, 0
    )
    assert not np.allclose(z2, wrong, atol=1e-5, rtol=1e-5)
    a2 = read(tiny_file, "layers/conv2/activation")
    assert np.array_equal(a2, np.maximum(z2, np.float32(0)))


def test_input_attributes_name_the_dataflow(tiny_file: Path) -> None:
    with h5py.File(tiny_file, "r") as f:
        assert f["layers/conv1"].attrs["input"] == "input"
        assert f["layers/pool1"].attrs["input"] == "/layers/conv1/activation"
        assert f["layers/conv2"].attrs["input"] == "/layers/pool1/preactivation"
        for name in ("conv1", "pool1", "conv2"):
            source = f["layers"][name].attrs["input"]
            assert source.lstrip("/") in f  # each names a dataset that exists in this file
            assert f["layers"][name].attrs["input_via"] == ""


def test_input_names_only_stored_datasets(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    only_conv2 = run(images, tmp_path / "c2.h5", model=str(tiny_model), layers=["conv2"])
    default = run(images, tmp_path / "default.h5", model=str(tiny_model))  # conv1, conv2: pool1 unstored
    with h5py.File(only_conv2, "r") as f:
        assert (f["layers/conv2"].attrs["input"], f["layers/conv2"].attrs["input_via"]) == ("input", "conv1 -> pool1")
    with h5py.File(default, "r") as f:
        assert "pool1" not in f["layers"]
        conv2 = f["layers/conv2"].attrs
        assert (conv2["input"], conv2["input_via"]) == ("/layers/conv1/activation", "pool1")
        w = tiny_weights()
        expected = ref_conv2d(
            ref_maxpool2d(f["layers/conv1/activation"][...], 2), w["conv2.weight"], w["conv2.bias"], 2, 0
        )
        np.testing.assert_allclose(f["layers/conv2/preactivation"][...], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- built-in edges model


@pytest.fixture(scope="module")
def edges_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edges") / "cat.h5"
    return run([SAMPLES / "cat.jpg"], out, save_input=True, layers=["conv1", "pool1", "conv2"])


def test_edges_conv1_equals_reference_conv(edges_file: Path) -> None:
    with np.load(builtin_spec_path("edges").with_name("edges.npz")) as npz:
        w, b = npz["conv1.weight"], npz["conv1.bias"]
        w2, b2 = npz["conv2.weight"], npz["conv2.bias"]
    assert w.shape == (16, 3, 7, 7)
    x = read(edges_file, "input")
    assert x.shape == (1, 3, 224, 224)
    z = read(edges_file, "layers/conv1/preactivation")
    expected = ref_conv2d(x, w, b, stride=2, padding=3)
    assert z.shape == expected.shape == (1, 16, 112, 112)
    np.testing.assert_allclose(z, expected, atol=1e-4, rtol=1e-4)
    a = read(edges_file, "layers/conv1/activation")
    assert (z < 0).any()
    assert np.array_equal(a, np.maximum(z, np.float32(0)))
    # conv2 (3x3, stride 1, pad 1) on the 2x2-pooled conv1 activation
    z2 = read(edges_file, "layers/conv2/preactivation")
    np.testing.assert_allclose(z2, ref_conv2d(ref_maxpool2d(a, 2), w2, b2, 1, 1), atol=1e-4, rtol=1e-4)


def test_edges_receptive_fields_from_the_formula(edges_file: Path) -> None:
    # rf_l = rf_{l-1} + (k_l - 1) * jump_{l-1};  jump_l = jump_{l-1} * s_l;  rf_0 = jump_0 = 1
    layers = [("conv1", 7, 2), ("pool1", 2, 2), ("conv2", 3, 1)]  # (name, kernel, stride) of edges.toml
    rf, jump, expected = 1, 1, {}
    for name, k, s in layers:
        rf, jump = rf + (k - 1) * jump, jump * s
        expected[name] = (rf, jump)
    assert expected == {"conv1": (7, 2), "pool1": (9, 4), "conv2": (17, 4)}
    with h5py.File(edges_file, "r") as f:
        for name, (rf, jump) in expected.items():
            attrs = f["layers"][name].attrs
            assert attrs["receptive_field"].tolist() == [rf, rf], name
            assert attrs["receptive_field_stride"].tolist() == [jump, jump], name


def test_geometry_matches_stored_torch_shapes_at_non_square_size(
    tiny_model: Path, images: list[Path], tmp_path: Path
) -> None:
    size = (21, 30)
    out = run(images[:2], tmp_path / "g.h5", model=str(tiny_model), size=size, layers=["conv1", "pool1", "conv2"])
    geo = {g.name: g.output_shape for g in geometry(load_spec(tiny_model), size)}
    # independent arithmetic: conv1 pad 1 keeps 21x30, pool /2 -> 10x15, conv2 k3 s2 -> 4x7
    assert geo == {"conv1": (4, 21, 30), "pool1": (4, 10, 15), "conv2": (5, 4, 7)}
    with h5py.File(out, "r") as f:
        for name, shape in geo.items():
            group = f["layers"][name]
            assert group["preactivation"].shape == (2, *shape), name
            assert tuple(group.attrs["output_shape"].tolist()) == shape, name


# ---------------------------------------------------------------------------- preprocessing


def test_input_equals_independent_preprocessing(tiny_model: Path, tmp_path: Path) -> None:
    paths = []
    for seed in range(2):
        path = tmp_path / f"exact{seed}.png"
        make_photo(*TINY_SIZE, seed=seed + 10).save(path)  # already the model's size: no resize, no crop
        paths.append(path)
    out = run(paths, tmp_path / "in.h5", model=str(tiny_model), save_input=True)
    x = read(out, "input")
    expected = []
    for path in paths:
        rgb = np.asarray(Image.open(path), dtype=np.float64)  # (H, W, 3), R, G, B
        assert rgb.shape == (*TINY_SIZE, 3)
        normalised = (rgb / 255.0 - TINY_MEAN) / TINY_STD
        expected.append(normalised.transpose(2, 0, 1))  # channels first, in R, G, B order
    expected = np.stack(expected)
    assert x.dtype == np.float32 and x.shape == expected.shape
    np.testing.assert_allclose(x, expected, atol=2e-6, rtol=0)
    # the channel order matters: the reversed (BGR) order must not match
    assert not np.allclose(x, expected[:, ::-1], atol=1e-3)


# ---------------------------------------------------------------------------- batching and order


@pytest.fixture
def five_images(images: list[Path], tmp_path: Path) -> list[Path]:
    extra = []
    for i, (h, w) in enumerate([(64, 50), (22, 26)]):
        path = tmp_path / f"extra{i}.png"
        make_photo(h, w, seed=20 + i).save(path)
        extra.append(path)
    return [*images, *extra]


MAP_NAMES = ("input", "layers/conv1/preactivation", "layers/conv1/activation", "layers/conv2/preactivation",
             "layers/conv2/activation")  # fmt: skip


def test_batch_size_changes_maps_only_by_float32_rounding(
    tiny_model: Path, five_images: list[Path], tmp_path: Path
) -> None:
    # oneDNN picks convolution kernels by batch shape, so sums are accumulated in another order:
    # the promise is float32 rounding across batch sizes, and bit-identical reruns (next test).
    files = {
        bs: run(five_images, tmp_path / f"bs{bs}.h5", model=str(tiny_model), save_input=True, batch_size=bs)
        for bs in (1, 2, 16)
    }
    reference = {name: read(files[16], name) for name in MAP_NAMES}
    assert reference["layers/conv1/preactivation"].shape[0] == 5
    for bs in (1, 2):
        for name in MAP_NAMES:
            maps = read(files[bs], name)
            np.testing.assert_allclose(maps, reference[name], rtol=1e-5, atol=1e-5, err_msg=f"--batch-size {bs}")
        assert np.array_equal(read(files[bs], "input"), reference["input"])  # preprocessing is exact
        with h5py.File(files[bs], "r") as f:
            assert f["N"][...].tolist() == [0, 1, 2, 3, 4]
            assert f.attrs["n_images"] == 5


def test_reruns_are_bit_identical(tiny_model: Path, five_images: list[Path], tmp_path: Path) -> None:
    first = run(five_images, tmp_path / "a.h5", model=str(tiny_model), batch_size=2)
    second = run(five_images, tmp_path / "b.h5", model=str(tiny_model), batch_size=2)
    for name in MAP_NAMES[1:]:
        assert np.array_equal(read(first, name), read(second, name)), name


def test_images_are_stacked_in_the_order_given(tiny_model: Path, five_images: list[Path], tmp_path: Path) -> None:
    order = [five_images[i] for i in (3, 0, 4, 2, 1)]
    one_by_one = run(order, tmp_path / "bs1.h5", model=str(tiny_model), save_input=True, batch_size=1)
    batched = run(order, tmp_path / "batch.h5", model=str(tiny_model), save_input=True)
    for path in (one_by_one, batched):
        with h5py.File(path, "r") as f:
            assert f["images/path"].asstr()[...].tolist() == [str(p) for p in order]
    stacked = {name: read(one_by_one, name) for name in MAP_NAMES}
    together = {name: read(batched, name) for name in MAP_NAMES}
    for i, path in enumerate(order):
        single = run([path], tmp_path / f"single{i}.h5", model=str(tiny_model), save_input=True)
        for name in MAP_NAMES:
            alone = read(single, name)[0]
            assert np.array_equal(stacked[name][i], alone), (i, name)
            # row i of a batched run is image i (bit-exactness across batch sizes is tested above)
            np.testing.assert_allclose(together[name][i], alone, atol=1e-5, rtol=1e-5, err_msg=f"{i} {name}")
    # different images really give different maps, so the comparisons above are about order
    for name in MAP_NAMES:
        assert not np.allclose(stacked[name][0], stacked[name][1], atol=1e-3), name


# ---------------------------------------------------------------------------- verification


def test_verify_flag_passes_on_good_files(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "v.h5"
    result = extract(
        extract_options([str(p) for p in images], out=out, model=str(tiny_model), device="cpu", verify=True)
    )
    with h5py.File(out, "r") as f:
        expected = sum(f["layers"][n]["preactivation"].size for n in ("conv1", "conv2"))
        assert verify_pairs(f).values == expected
    assert result.values_verified == 2 * expected  # every stored z and a, against an independent forward pass
    cli_out = tmp_path / "cli.h5"
    res = CliRunner().invoke(
        cli, ["extract", *map(str, images), "-m", str(tiny_model), "--device", "cpu", "--verify", "-o", str(cli_out)]
    )
    assert res.exit_code == 0, res.output
    assert "verified" in res.stderr
    assert cli_out.is_file()


@pytest.mark.parametrize(
    ("dataset", "index", "change"),
    [
        ("layers/conv2/activation", (1, 2, 1, 1), lambda v: v + np.float32(1e-3)),
        ("layers/conv1/activation", (0, 0, 0, 0), lambda v: np.float32(np.nan)),
        ("layers/conv1/preactivation", (2, 3, 5, 7), lambda v: np.abs(v) + np.float32(1)),  # relu(new) > old a
    ],
)
def test_verify_pairs_detects_one_tampered_value(tiny_model, images, tmp_path, dataset, index, change) -> None:
    good = run(images, tmp_path / "good.h5", model=str(tiny_model))
    bad = tmp_path / "bad.h5"
    shutil.copyfile(good, bad)
    with h5py.File(bad, "r+") as f:
        ds = f[dataset]
        ds[index] = change(ds[index])
    with h5py.File(good, "r") as f:
        assert verify_pairs(f).values > 0
    with h5py.File(bad, "r") as f, pytest.raises(VerificationError, match=dataset.split("/")[1]):
        verify_pairs(f)


# ---------------------------------------------------------------------------- the model's own forward


def plain_convs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every conv output of an ordinary forward pass (hooks, copies), the way a user would run it."""
    found: dict[str, np.ndarray] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, out, name=name: found.__setitem__(name, out.detach().clone().numpy()))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Conv2d)
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return found


@pytest.mark.parametrize("batch_size", [1, 4])
def test_maps_are_bit_identical_to_the_models_own_forward_on_input(
    batch_size: int, five_images: list[Path], tmp_path: Path
) -> None:
    """The batch handed to the model is contiguous NCHW, as torch.stack of ToTensor outputs: a
    channels-last batch (Pillow's memory order kept through a transpose) made oneDNN round every
    conv after the first differently (about 2e-6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        convs = ["*conv*", "*downsample.0"]
        out = run(five_images[:4], tmp_path / "out.h5", model=f"{ZOO_FILE}:resnet18", layers=convs,
                  save_input=True, batch_size=batch_size, size=(48, 48))  # fmt: skip
        model = zoo.resnet18().eval()
        with h5py.File(out, "r") as f:
            pixels = f["input"][...]
            for start in range(0, 4, batch_size):
                own = plain_convs(model, torch.from_numpy(pixels[start : start + batch_size]))
                assert len(own) == 20
                for name, values in own.items():
                    stored = f[f"layers/{name}/preactivation"][start : start + batch_size]
                    assert np.array_equal(stored, values), (name, float(np.abs(stored - values).max()))
    finally:
        torch.set_num_threads(threads)


def test_channels_last_is_recorded_and_differs_only_by_rounding(five_images: list[Path], tmp_path: Path) -> None:
    files = {
        layout: run(
            five_images[:4],
            tmp_path / f"{layout}.h5",
            model=f"{ZOO_FILE}:resnet18",
            layers=["*conv*", "*downsample.0"],
            size=(48, 48),
            memory_format=layout,
        )
        for layout in ("contiguous", "channels_last")
    }
    with h5py.File(files["contiguous"], "r") as a, h5py.File(files["channels_last"], "r") as b:
        assert (a.attrs["memory_format"], b.attrs["memory_format"]) == ("contiguous", "channels_last")
        for name in a["layers"]:
            z, z_cl = a[f"layers/{name}/preactivation"][...], b[f"layers/{name}/preactivation"][...]
            np.testing.assert_allclose(z_cl, z, rtol=1e-4, atol=1e-5, err_msg=name)
