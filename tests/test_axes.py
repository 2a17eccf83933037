"""Maps labelled with their own axes (issue 9, section 2b): channels-last, token and 1-D maps are
stored exactly as the model computed them, with an ``axes`` attribute; statistics, dead channels,
``inspect``, ``render``, ``merge`` and ``--append`` follow the labels. Every number is checked
against numpy computed over the channel axis the test names itself."""

from __future__ import annotations

from pathlib import Path

import h5py
import layouts
import numpy as np
import pytest
import torch
from conftest import REPO, make_photo
from helpers import error_line, invoke, ok
from PIL import Image

from fmap_cli import colormaps
from fmap_cli.fields import ATTENTION, MERGED
from fmap_cli.render import GridLayout

# layer -> (axes, position of the channel axis) as the test knows them from the models' code
EXPECTED = {
    "channels_last_relu": {"block.2": ("N,H,W,C", 3), "block.4": ("N,H,W,C", 3), "stem": ("N,C,H,W", 1)},
    "channels_last": {"block.2": ("N,H,W,C", 3)},
    "vit": {"mlp.0": ("N,T,D", 2), "attention": ("N,T,D", 2), "patch": ("N,C,H,W", 1)},
    "rows_as_channels": {"conv": ("N,C,L", 1)},
    "windows": {"mlp.1": ("N,P,Q,C", 3), "mlp.0": ("N,P,Q,C", 3), "conv": ("N,C,H,W", 1)},
}
SIZE = 16


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"img{i}.png")
        make_photo(SIZE, SIZE, seed=i).save(paths[-1])
    return paths


def extract(images: list[Path], factory: str, out: Path, *extra: object) -> Path:
    layers = ",".join(EXPECTED.get(factory, EXPECTED["vit"]))
    ok(invoke("extract", *images, "--model", f"{REPO}/tests/layouts.py:{factory}", "--size", SIZE,
              "--layers", layers, "--device", "cpu", "--compression", "none", "-o", out, *extra))  # fmt: skip
    return out


def others(ndim: int, channel: int) -> tuple[int, ...]:
    return tuple(d for d in range(ndim) if d != channel)


def check_statistics(path: Path, expected: dict[str, tuple[str, int]]) -> None:
    """The stored statistics equal numpy's over the channel axis named in ``expected``."""
    with h5py.File(path, "r") as f:
        for name, (_, c) in expected.items():
            group = f["layers"][name]
            stats = group["stats"]
            for role in ("preactivation", "activation"):
                if role not in group:
                    continue
                values = group[role][()].astype(np.float64)
                over = others(values.ndim, c)
                for stat, want in (("min", values.min(axis=over)), ("max", values.max(axis=over)),
                                   ("mean", values.mean(axis=over)), ("std", values.std(axis=over)),
                                   ("negatives", (values < 0).mean(axis=over))):  # fmt: skip
                    np.testing.assert_allclose(stats[f"{role}_{stat}"][()], want, rtol=1e-5, atol=1e-6,
                                               err_msg=f"{name} {role}_{stat}")  # fmt: skip
            described = group[str(stats.attrs["role"])][()]
            per_image = others(described.ndim, c)[1:]
            np.testing.assert_array_equal(stats["image_max"][()], described.max(axis=per_image))
            np.testing.assert_allclose(stats["image_mean"][()], described.mean(axis=per_image, dtype=np.float64),
                                       rtol=1e-5, atol=1e-7)  # fmt: skip
            np.testing.assert_array_equal(
                stats["image_zero_fraction"][()], (described == 0).mean(axis=per_image).astype(np.float32)
            )
            moved = np.moveaxis(described, c, 1)  # (N, C, ...) by numpy itself
            flat = moved.reshape(*moved.shape[:2], -1)
            width = moved.shape[3] if moved.ndim == 4 else 1
            where = np.stack(np.divmod(flat.argmax(axis=2), width), axis=-1)
            np.testing.assert_array_equal(stats["image_argmax"][()], where, err_msg=f"{name} image_argmax")


@pytest.mark.parametrize("factory", ["channels_last_relu", "channels_last", "vit", "rows_as_channels", "windows"])
def test_axes_labels_and_statistics_follow_the_channel_axis(factory: str, images: list[Path], tmp_path: Path) -> None:
    out = extract(images, factory, tmp_path / "out.h5", "--save-input", "--verify")
    expected = EXPECTED[factory]
    model = getattr(layouts, factory)()
    with h5py.File(out, "r") as f:
        assert f["input"].attrs["axes"] == "N,C,H,W"
        x = torch.from_numpy(f["input"][()])
        for name, (axes, c) in expected.items():
            group = f["layers"][name]
            for role in ("preactivation", "activation"):
                if role in group:
                    ds = group[role]
                    assert ds.attrs["axes"] == axes, (name, role)
                    assert [dim.label for dim in ds.dims] == axes.split(","), (name, role)
                    assert [len(dim[0]) for dim in list(ds.dims)[1:]] == list(ds.shape[1:]), (name, role)
            assert tuple(group["stats/image_max"].shape) == (3, group["preactivation"].shape[c])
        if factory.startswith("channels_last"):  # stored as the model computed it: (N, H, W, C), no transpose
            with torch.no_grad():
                want = model.block[2](model.block[1](model.stem(x).permute(0, 2, 3, 1)))
            np.testing.assert_allclose(f["layers/block.2/preactivation"][()], want.numpy(), rtol=1e-5, atol=1e-5)
    check_statistics(out, expected)


def test_token_maps_describe_their_tokens(images: list[Path], tmp_path: Path) -> None:
    out = extract(images, "vit", tmp_path / "vit.h5")
    with h5py.File(out, "r") as f:
        group = f["layers/mlp.0"]
        assert group["activation"].shape == (3, 17, 12)
        assert (int(group.attrs["token_prefix"]), group.attrs["token_grid"].tolist()) == (1, [4, 4])
        assert group.attrs["tokens"] == (
            "1 token not from the image grid (e.g. a class token), then 4x4 = 16 patch tokens, row-major"
        )
        assert group.attrs["receptive_field_note"] == ATTENTION
        assert "receptive_field_note" not in f["layers/patch"].attrs  # known there
        assert "tokens" not in f["layers/patch"].attrs
    shuffled = extract(images, "vit_shuffled", tmp_path / "shuffled.h5")
    with h5py.File(shuffled, "r") as f:
        group = f["layers/mlp.0"]
        assert group["activation"].attrs["axes"] == "N,T,D"
        assert "token_prefix" not in group.attrs and "token_grid" not in group.attrs
        assert group.attrs["tokens"].endswith("fmap could not tell which token is which patch")


def layer_block(stdout: str, name: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {name}  "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
    return lines[start:end]


def stats_line(symbol: str, role: str, values: np.ndarray, zeros: float | None) -> str:
    """The line inspect prints, from numpy's own numbers."""
    v = values.astype(np.float64)
    tail = f"  zeros {zeros:6.1%}" if zeros is not None else f"  negatives {(v < 0).mean():6.1%}"
    return (f"    {symbol} {role:<14} min {v.min():>10.4g}  max {v.max():>10.4g}  mean {v.mean():>10.4g}  "
            f"std {v.std():>10.4g}{tail}")  # fmt: skip


def test_inspect_follows_the_labels(images: list[Path], tmp_path: Path) -> None:
    cl = extract(images, "channels_last_relu", tmp_path / "cl.h5")
    text = ok(invoke("inspect", cl)).stdout
    with h5py.File(cl, "r") as f:
        z, a = f["layers/block.2/preactivation"][()], f["layers/block.2/activation"][()]
    dead = [c for c in range(6) if not a[..., c].any()]  # numpy, along the last axis
    assert 2 in dead and len(dead) < 6
    assert layer_block(text, "block.2") == [
        f"  block.2  Linear -> relu  3x8x8x6 (N,H,W,C) float32  {2 * a.nbytes / 1024:.1f} KiB on disk (1.00x)  input: "
        "/layers/stem/preactivation via block.0 -> block.1",
        stats_line("z", "preactivation", z, None),
        stats_line("a", "activation", a, float((a == 0).mean())),
        f"    dead channels: {len(dead)}/6 ({', '.join(str(c) for c in dead)})",
    ]
    vit = extract(images, "vit", tmp_path / "vit.h5")
    text = ok(invoke("inspect", vit, "--layer", "mlp.0")).stdout
    with h5py.File(vit, "r") as f:
        z, a = f["layers/mlp.0/preactivation"][()], f["layers/mlp.0/activation"][()]
    assert layer_block(text, "mlp.0")[:3] == [
        f"  mlp.0  Linear -> gelu  3x17x12 (N,T,D) float32  {2 * a.nbytes / 1024:.1f} KiB on disk (1.00x)  input: "
        "/layers/attention/preactivation",
        "    tokens (T): 1 token not from the image grid (e.g. a class token), then 4x4 = 16 patch tokens, row-major",
        f"    receptive field unknown: {ATTENTION}",
    ]
    assert layer_block(text, "mlp.0")[-1] == "    dead channels: 0/12"  # 12 features, not 17 tokens
    rows = ok(invoke("inspect", vit, "--layer", "mlp.0", "--channels")).stdout.splitlines()
    assert len([line for line in rows if line.strip().split(" ")[0].isdigit()]) == 12


def tile_colours(picture: Image.Image, layout: GridLayout, c: int, shape: tuple[int, int]) -> np.ndarray:
    """The colour at the centre of each unit of channel ``c``'s tile, (rows, columns, 3)."""
    left, top, _, _ = layout.tile_box(c)
    zoom = layout.zoom
    return np.array([[picture.getpixel((left + j * zoom + zoom // 2, top + i * zoom + zoom // 2))
                      for j in range(shape[1])] for i in range(shape[0])])  # fmt: skip


def expected_colours(values: np.ndarray) -> np.ndarray:
    return colormaps.sequential(values, min(0.0, float(values.min())), float(values.max())).astype(np.uint8)


@pytest.mark.parametrize(
    ("factory", "layer", "shape", "channel_map"),
    [
        ("channels_last_relu", "block.2", (8, 8), lambda a, c: a[:, :, c]),  # (H, W, C): channel c
        ("vit", "mlp.0", (4, 4), lambda a, c: a[1:, c].reshape(4, 4)),  # patch tokens on their grid
        ("rows_as_channels", "conv", (1, 6), lambda a, c: a[c][None]),  # along L
    ],
)
def test_render_draws_one_picture_per_channel_along_the_right_axes(
    factory: str, layer: str, shape: tuple[int, int], channel_map: object, images: list[Path], tmp_path: Path
) -> None:
    out = extract(images, factory, tmp_path / "out.h5")
    png = tmp_path / "grid.png"
    ok(invoke("render", out, "--layer", layer, "--image", "1", "-o", png))
    picture = Image.open(png).convert("RGB")
    with h5py.File(out, "r") as f:
        a = f[f"layers/{layer}/activation"][1]
    c_axis = EXPECTED[factory][layer][1] - 1
    channels = a.shape[c_axis]
    layout = GridLayout.fit(channels, shape, 1)
    assert picture.width >= layout.size[0] and picture.height > layout.size[1]
    for c in range(channels):
        want = expected_colours(channel_map(a, c))  # type: ignore[operator]
        np.testing.assert_array_equal(tile_colours(picture, layout, c, shape), want, err_msg=f"channel {c}")


def test_render_refuses_tokens_it_cannot_place(images: list[Path], tmp_path: Path) -> None:
    out = extract(images, "vit_shuffled", tmp_path / "shuffled.h5")
    line = error_line(invoke("render", out, "--layer", "mlp.0", "-o", tmp_path / "x.png"), 2)
    assert line == (
        "Error: layer 'mlp.0': its maps are token sequences whose tokens fmap could not place on the image grid; "
        "fmap render draws maps on the image grid"
    )


@pytest.mark.parametrize(
    ("attr", "value", "says"),
    [
        ("token_grid", 5, "token_prefix 1 and token_grid 5 are not an integer and a pair of integers"),
        ("token_grid", "ab", "token_prefix 1 and token_grid 'ab' are not an integer and a pair of integers"),
        ("token_grid", [4, 4, 1], "token_prefix 1 and token_grid [4, 4, 1] are not an integer and a pair of integers"),
        ("token_prefix", 1.5, "token_prefix 1.5 and token_grid [4, 4] are not an integer and a pair of integers"),
        ("token_prefix", -1, "token_prefix -1 and token_grid [4, 4] do not fit 17 tokens"),
        ("token_grid", [3, 3], "token_prefix 1 and token_grid [3, 3] do not fit 17 tokens"),
    ],
)
def test_damaged_token_attributes_are_a_damaged_file(
    attr: str, value: object, says: str, images: list[Path], tmp_path: Path
) -> None:
    out = extract(images[:1], "vit", tmp_path / "vit.h5")
    with h5py.File(out, "r+") as f:
        f["layers/mlp.0"].attrs[attr] = value
    line = error_line(invoke("render", out, "--layer", "mlp.0", "-o", tmp_path / "x.png"), 1)
    assert line == f"Error: {out}: damaged fmap file: ValueError: /layers/mlp.0: {says}"
    assert not (tmp_path / "x.png").exists()


def test_merge_keeps_the_labels_and_refuses_shards_that_differ(images: list[Path], tmp_path: Path) -> None:
    shards = [extract(images, "channels_last_relu", tmp_path / f"s{k}.h5", "--shard", f"{k}/2") for k in range(2)]
    merged = tmp_path / "merged.h5"
    ok(invoke("merge", *shards, "-o", merged))
    with h5py.File(merged, "r") as f:
        for name, (axes, _) in EXPECTED["channels_last_relu"].items():
            for role in ("preactivation", "activation"):
                if role in f["layers"][name]:
                    ds = f["layers"][name][role]
                    assert ds.attrs["axes"] == axes
                    assert [dim.label for dim in ds.dims] == axes.split(",")
    check_statistics(merged, EXPECTED["channels_last_relu"])  # pooled over the right axis
    with h5py.File(shards[1], "r+") as f:
        for role in ("preactivation", "activation"):
            relabel(f["layers/block.2"][role], "N,W,H,C")
    line = error_line(invoke("merge", *shards, "-o", tmp_path / "bad.h5"), 2)
    assert line.startswith(f"Error: {shards[1]}: differs from {shards[0]} in: the axes of the maps;")


def test_append_follows_the_labels(images: list[Path], tmp_path: Path) -> None:
    out = extract(images[:2], "vit", tmp_path / "out.h5")
    extract(images[2:], "vit", out, "--append")
    check_statistics(out, EXPECTED["vit"])
    with h5py.File(out, "r+") as f:
        assert f["layers/mlp.0/activation"].attrs["axes"] == "N,T,D"
        for role in ("preactivation", "activation"):
            relabel(f["layers/mlp.0"][role], "N,D,T")
    result = invoke("extract", images[0], "--model", f"{REPO}/tests/layouts.py:vit", "--size", SIZE, "--layers",
                    ",".join(EXPECTED["vit"]), "--compression", "none", "--append", "-o", out)  # fmt: skip
    assert error_line(result, 1) == (
        f"Error: {out}: layer 'mlp.0' has maps with axes N,D,T, this run's are N,T,D; write a new file instead"
    )


def relabel(ds: h5py.Dataset, axes: str) -> None:
    """Label a map's axes ``axes`` consistently: its attribute and its dimension labels."""
    ds.attrs["axes"] = axes
    for dim, name in zip(ds.dims, axes.split(","), strict=True):
        dim.label = name


def test_a_label_that_does_not_fit_is_a_damaged_file(images: list[Path], tmp_path: Path) -> None:
    out = extract(images, "channels_last", tmp_path / "out.h5")
    with h5py.File(out, "r+") as f:
        f["layers/block.2/activation"].attrs["axes"] = "N,H,C"
    line = error_line(invoke("inspect", out), 1)
    assert line == (
        f"Error: {out}: damaged fmap file: ValueError: /layers/block.2/activation has axes 'N,H,C', which do not "
        "name its 4 axes"
    )


@pytest.mark.parametrize("label", ["N,C,H,W", "N,W,H,C", "N,H,C,W"])
def test_a_label_its_dimension_labels_contradict_is_a_damaged_file(
    label: str, images: list[Path], tmp_path: Path
) -> None:
    out = extract(images, "channels_last_relu", tmp_path / "out.h5")
    with h5py.File(out, "r+") as f:
        f["layers/block.2/preactivation"].attrs["axes"] = label  # valid, but the maps are N,H,W,C
    says = (
        f"Error: {out}: damaged fmap file: ValueError: /layers/block.2/preactivation has axes '{label}', but its "
        "dimensions are labelled 'N,H,W,C'"
    )
    for command in (
        ["inspect", out],
        ["inspect", "--json", out],
        ["render", out, "--layer", "block.2", "-o", tmp_path / "r.png"],
    ):
        assert error_line(invoke(*command), 1) == says
    assert not (tmp_path / "r.png").exists()


def test_a_removed_label_is_a_damaged_file(images: list[Path], tmp_path: Path) -> None:
    """Read as channels first (as in files of schema versions 1 and 2), a channels-last map's dead
    channels were counted along W."""
    out = extract(images, "channels_last_relu", tmp_path / "out.h5")
    with h5py.File(out, "r+") as f:
        del f["layers/block.2/preactivation"].attrs["axes"]
        del f["layers/block.2/activation"].attrs["axes"]
    assert error_line(invoke("inspect", out), 1) == (
        f"Error: {out}: damaged fmap file: ValueError: /layers/block.2/preactivation has no axes attribute (read as "
        "'N,C,H,W'), but its dimensions are labelled 'N,H,W,C'"
    )


def test_field_notes_say_why_a_receptive_field_is_unknown(images: list[Path], tmp_path: Path) -> None:
    out = extract(images, "rows_as_channels", tmp_path / "out.h5")
    with h5py.File(out, "r") as f:
        assert f["layers/conv"].attrs["receptive_field_note"] == MERGED
        assert f["layers/conv"].attrs["receptive_field"].tolist() == [-1, -1]
    text = ok(invoke("inspect", out)).stdout
    assert f"    receptive field unknown: {MERGED}" in text


def test_occlude_totals_each_channel_along_the_channel_axis(images: list[Path], tmp_path: Path) -> None:
    maps = extract(images[:1], "channels_last_relu", tmp_path / "maps.h5")
    occ = tmp_path / "occ.h5"
    ok(invoke("occlude", images[0], "--model", f"{REPO}/tests/layouts.py:channels_last_relu", "--size", SIZE,
              "--layer", "block.2", "--channel", "all", "--patch", 8, "--device", "cpu", "-o", occ))  # fmt: skip
    with h5py.File(maps, "r") as f:
        a = f["layers/block.2/activation"][0].astype(np.float64)  # (H, W, C)
    with h5py.File(occ, "r") as f:
        assert f["occlusion/baseline"].shape == (1, 6)  # six channels, not eight rows
        np.testing.assert_allclose(f["occlusion/baseline"][0], a.sum(axis=(0, 1)), rtol=1e-5, atol=1e-5)


def test_project_seeds_the_unit_of_the_right_channel(images: list[Path], tmp_path: Path) -> None:
    """The gradient of one unit (row, col) of channel c of a channels-last Linear: only the stem
    pixels under that unit move it (a 2x2 patch of a 2x2-stride conv), and by torch's own gradient."""
    maps = extract(images, "channels_last", tmp_path / "maps.h5", "--save-input")
    out = tmp_path / "proj.h5"
    model_file = f"{REPO}/tests/layouts.py:channels_last"
    ok(invoke("project", maps, "--model", model_file, "--layer", "block.2", "--channel", 4, "--image", 1,
              "--unit", "3,5", "--method", "gradient", "--device", "cpu", "-o", out))  # fmt: skip
    model = layouts.channels_last()
    with h5py.File(maps, "r") as f:
        x = torch.from_numpy(f["input"][1:2]).requires_grad_(True)
    z = model.block[2](model.block[1](model.stem(x).permute(0, 2, 3, 1)))
    a = torch.nn.functional.gelu(z)
    (grad,) = torch.autograd.grad(a[0, 3, 5, 4], x)
    with h5py.File(out, "r") as f:
        projected = f["projection"][0]
        assert float(f["unit/value"][0]) == pytest.approx(a[0, 3, 5, 4].item(), rel=1e-5)
    np.testing.assert_allclose(projected, (grad * a[0, 3, 5, 4]).detach().numpy()[0], rtol=1e-4, atol=1e-6)
    moved = np.abs(projected).sum(axis=0)  # (H, W)
    assert np.flatnonzero(moved.sum(axis=1)).tolist() == [6, 7]  # rows 2*3, 2*3+1
    assert np.flatnonzero(moved.sum(axis=0)).tolist() == [10, 11]  # columns 2*5, 2*5+1


def test_project_seeds_a_token_given_as_index_0(images: list[Path], tmp_path: Path) -> None:
    """--unit INDEX,0 on token maps (as image_argmax stores their units): the gradient of token 3,
    by torch's own autograd through a forward hook on the GELU."""
    maps = extract(images, "vit", tmp_path / "maps.h5", "--save-input")
    out = tmp_path / "proj.h5"
    model_file = f"{REPO}/tests/layouts.py:vit"
    args = ["project", maps, "--model", model_file, "--layer", "mlp.0", "--channel", 5, "--image", 1]
    ok(invoke(*args, "--unit", "3,0", "--method", "gradient", "--device", "cpu", "-o", out))
    model = layouts.vit()
    held: list[torch.Tensor] = []
    model.mlp[1].register_forward_hook(lambda module, inputs, output: held.append(output))
    with h5py.File(maps, "r") as f:
        x = torch.from_numpy(f["input"][1:2]).requires_grad_(True)
    model(x)
    unit = held[0][0, 3, 5]
    (grad,) = torch.autograd.grad(unit, x)
    with h5py.File(out, "r") as f:
        assert (int(f["unit/row"][0]), int(f["unit/col"][0])) == (3, 0)
        assert float(f["unit/value"][0]) == pytest.approx(unit.item(), rel=1e-5)
        np.testing.assert_allclose(f["projection"][0], (grad * unit).detach().numpy()[0], rtol=1e-4, atol=1e-6)
    line = error_line(invoke(*args, "--unit", "0,3", "-o", tmp_path / "bad.h5"), 2)
    assert line == (
        "Error: --unit 0,3 out of range: layer 'mlp.0' maps are sequences of 17 positions (give INDEX,0 with "
        "INDEX 0..16)"
    )
    assert not (tmp_path / "bad.h5").exists()


def test_layers_that_fold_windows_into_the_batch_axis_are_refused_before_any_work(
    images: list[Path], tmp_path: Path
) -> None:
    """Swin's window attention runs on (N x windows, positions, C): no map per image to store."""
    out = tmp_path / "out.h5"
    result = invoke("extract", *images, "--model", f"{REPO}/tests/zoo.py:transformer", "--size", SIZE,
                    "--layers", "swin*", "--device", "cpu", "-o", out)  # fmt: skip
    assert error_line(result, 2) == (
        "Error: --layers: layer 'swin.qkv' and 1 more fold other data into the batch axis (4 rows per image, e.g. "
        "the windows of window attention), so fmap cannot store them per image; leave them out of --layers (run "
        f"'fmap layers --model {REPO}/tests/zoo.py:transformer' to list the layers)"
    )
    assert not out.exists()
    kept = "swin,swin.norm1,swin.norm2,swin.mlp*"
    ok(invoke("extract", *images, "--model", f"{REPO}/tests/zoo.py:transformer", "--size", SIZE,
              "--layers", kept, "--device", "cpu", "--verify", "-o", out))  # fmt: skip
    with h5py.File(out, "r") as f:  # the Swin block's own map, (N, H, W, C) before and after the windows
        labels = {name: f["layers"][name]["preactivation"].attrs["axes"] for name in f["layers"]}
    assert sorted(labels) == ["swin", "swin.mlp", "swin.mlp.0", "swin.mlp.1", "swin.mlp.2", "swin.norm1", "swin.norm2"]
    assert set(labels.values()) == {"N,H,W,C"}
