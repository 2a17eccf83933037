"""fmap inspect's report (summary.py): its whole text on a file with known statistics, the same with
and without stored statistics, --channels, --top, --hist, and stored text (paths, names) printed with
its control characters escaped."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from crafted import craft, with_reference_stats, without_stats
from helpers import error_line, ok

from fmap_cli.cli import cli


def fmap(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def known(path: Path, names: tuple[str, str] = ("conv", "pool"), **attrs: str) -> Path:
    """Two images; layer ``conv`` z (2, 2, 2, 2) with a = relu(z), its channel 1 dead; layer ``pool``
    z (2, 1, 1, 1) = 5 and -5, without a. Fixed version and time, so the report is known exactly."""
    z = np.array(
        [
            [[[-2, -1], [1, 2]], [[-1, -1], [-1, -1]]],
            [[[0, 1], [2, 3]], [[-3, -3], [-3, -3]]],
        ],
        dtype=np.float32,
    )
    pool = np.array([5, -5], dtype=np.float32).reshape(2, 1, 1, 1)
    craft(path, {names[0]: (z, np.maximum(z, 0)), names[1]: (pool, None)}, image_paths=attrs.pop("paths", None))
    with h5py.File(path, "r+") as f:
        f.attrs.update({"fmap_version": "9.9.9", "created": "2024-01-02T03:04:05Z", **attrs})
    return path


def storage_line(path: Path, map_bytes: int) -> str:
    """The report's storage line, from the file's size (which depends on HDF5's own layout)."""
    size = path.stat().st_size
    rest = f"{(size - map_bytes) / 1024:.1f} KiB"
    return f"file: {size / 1024:.1f} KiB: maps {map_bytes} B ({map_bytes / size:.0%}), statistics and metadata {rest}"


def test_whole_text_report(tmp_path: Path) -> None:
    # conv z: channel 0 holds -2 -1 1 2 0 1 2 3, channel 1 four -1 and four -3: min -3, max 3,
    # mean -10/16, E[z^2] 64/16 so std sqrt(4 - 0.625^2) = 1.8998, negatives (2 + 8)/16.
    # conv a: 0 0 1 2 0 1 2 3 and zeros: mean 9/16, E[a^2] 19/16 so std 0.9333; zero fraction per
    # image and channel 2/4, 1, 1/4, 1: mean 0.6875. Channel 1 is dead (a = 0 everywhere).
    path = known(tmp_path / "known.h5")
    result = fmap("inspect", path)
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (
        f"{path}: fmap schema v1, written by fmap 9.9.9 at 2024-01-02T03:04:05Z on cpu\n"
        "model: crafted (tests)\n"
        "images: 2\n"
        f"{storage_line(path, 128 + 8)}\n"
        "  [0] img0.png  (32x32)\n"
        "  [1] img1.png  (32x32)\n"
        "layers:\n"
        "  conv  conv2d -> relu  2x2x2x2 (N,C,H,W) float32  128 B on disk (1.00x)  input: input\n"
        "    z preactivation  min         -3  max          3  mean     -0.625  std        1.9  negatives  62.5%\n"
        "    a activation     min          0  max          3  mean     0.5625  std     0.9333  zeros  68.8%\n"
        "    dead channels: 1/2 (1)\n"
        "  pool  conv2d -> none  2x1x1x1 (N,C,H,W) float32  8 B on disk (1.00x)  input: input\n"
        "    z preactivation  min         -5  max          5  mean          0  std          5  negatives  50.0%\n"
        "    a (none: no nonlinearity follows this layer)\n"
    )


CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # every control character but the newline


def test_stored_text_is_printed_with_control_characters_escaped(tmp_path: Path) -> None:
    paths = ["\x1b]0;pwned\x07a.png", "b\x1b[2J\x9b\x7f\n.png"]
    path = known(tmp_path / "evil.h5", ("c\x1bv", "pool"), paths=paths, model_name="m\x1b[31mred", device="\x1b[2J")
    result = fmap("inspect", path, "--channels", "--top", "1", "--hist")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        f"{path}: fmap schema v1, written by fmap 9.9.9 at 2024-01-02T03:04:05Z on \\x1b[2J",
        "model: m\\x1b[31mred (tests)",
        "images: 2",
        storage_line(path, 128 + 8),
        "  [0] \\x1b]0;pwned\\x07a.png  (32x32)",
        "  [1] b\\x1b[2J\\x9b\\x7f\\x0a.png  (32x32)",
    ]
    assert lines[7].startswith("  c\\x1bv  conv2d -> relu  2x2x2x2 (N,C,H,W) float32")
    assert "         0: 3 [1] b\\x1b[2J\\x9b\\x7f\\x0a.png" in lines
    assert not CONTROL.search(result.stdout)
    data = json.loads(fmap("inspect", path, "--json").stdout)  # JSON escapes them itself
    assert [image["path"] for image in data["images"]] == paths and data["model_name"] == "m\x1b[31mred"
    wrong = fmap("inspect", path, "--layer", "nope")
    assert wrong.exit_code == 2
    assert wrong.stderr.splitlines()[-1] == f"Error: layer 'nope' not in {path}; stored layers: c\\x1bv, pool"


# ---------------------------------------------------------------------------- --channels, --top, --hist


def test_text_report_is_the_same_with_and_without_stats(all_layers_file: Path, tmp_path: Path) -> None:
    scanned = without_stats(all_layers_file, tmp_path / "maps.h5.old")
    reference = with_reference_stats(all_layers_file, tmp_path / "maps.h5.ref")
    args = ("--channels", "--top", "3", "--hist")
    texts = [
        [line for line in ok(fmap("inspect", str(p), *args)).stdout.splitlines()[1:] if not line.startswith("file: ")]
        for p in (scanned, reference)
    ]
    assert texts[0] == texts[1]


def top_file(tmp_path: Path, stats: bool) -> Path:
    """Channel 0's max per image is 0.1, 0.9, 0.5, 0.9, 0.0 at known positions; channel 1 grows with n."""
    a = np.zeros((5, 2, 6, 7), dtype=np.float32)
    for n, (value, row, col) in enumerate([(0.1, 0, 0), (0.9, 2, 3), (0.5, 5, 6), (0.9, 1, 1), (0.0, 0, 0)]):
        a[n, 0, row, col] = value
        a[n, 1] = n / 10
    paths = [f"/data/cat{n}.jpg" for n in range(5)]
    return craft(tmp_path / f"top{int(stats)}.h5", {"conv": (a - 0.05, a)}, image_paths=paths, stats=stats)


@pytest.mark.parametrize("stats", [True, False])
def test_top_k_images_by_max_activation(tmp_path: Path, stats: bool) -> None:
    path = top_file(tmp_path, stats)
    data = json.loads(
        ok(fmap("inspect", str(path), "--layer", "conv", "--channel", "0", "--top", "3", "--json")).stdout
    )
    (layer,) = data["layers"]
    assert layer["stats_source"] == ("file" if stats else "scan")
    (top,) = layer["top"]
    assert top["channel"] == 0
    got = [(i["index"], i["path"], round(i["value"], 6), i["row"], i["col"]) for i in top["images"]]
    assert got == [(1, "/data/cat1.jpg", 0.9, 2, 3), (3, "/data/cat3.jpg", 0.9, 1, 1), (2, "/data/cat2.jpg", 0.5, 5, 6)]
    text = ok(fmap("inspect", str(path), "--top", "2")).stdout
    assert "       0: 0.9 [1] /data/cat1.jpg; 0.9 [3] /data/cat3.jpg\n" in text
    assert "       1: 0.4 [4] /data/cat4.jpg; 0.3 [3] /data/cat3.jpg\n" in text


def test_channels_table_and_dead_flag(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 3, 5, 5)).astype(np.float32)
    z[:, 2] = -1.0  # channel 2 never fires
    a = np.maximum(z, 0)
    path = craft(tmp_path / "c.h5", {"conv": (z, a)})
    layer = json.loads(ok(fmap("inspect", str(path), "--channels", "--json")).stdout)["layers"][0]
    assert [row["dead"] for row in layer["channels"]] == [False, False, True]
    row = layer["channels"][0]
    values = z[:, 0].astype(np.float64)
    assert row["preactivation"] == pytest.approx(
        {"min": values.min(), "max": values.max(), "mean": values.mean(), "std": values.std()}
    )
    assert row["activation"]["max"] == pytest.approx(float(a[:, 0].max()))
    assert row["zero_fraction"] == pytest.approx(float((a[:, 0] == 0).mean()))
    lines = ok(fmap("inspect", str(path), "--channels")).stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("channel"))
    assert "z min" in lines[header] and "a std" in lines[header] and lines[header].endswith("zeros  dead")
    assert lines[header + 3].split()[0] == "2" and lines[header + 3].endswith("100.0%  dead")
    assert not lines[header + 1].endswith("dead")
    one = json.loads(ok(fmap("inspect", str(path), "--layer", "conv", "--channel", "1", "--channels", "--json")).stdout)
    assert [row["channel"] for row in one["layers"][0]["channels"]] == [1]


def test_histogram_counts_every_value(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 4, 4), dtype=np.float32)
    a[0, 0, 0, :4] = [1, 2, 3, 4]
    a[1, 1, 3, 3] = 4
    path = craft(tmp_path / "h.h5", {"conv": (a - 1, a)})
    layer = json.loads(ok(fmap("inspect", str(path), "--hist", "--json")).stdout)["layers"][0]
    hist = layer["histogram"]
    assert hist["role"] == "activation"
    counts, edges = np.histogram(a, bins=20, range=(0.0, 4.0))
    assert hist["counts"] == counts.tolist() and hist["edges"] == pytest.approx(edges.tolist())
    assert sum(hist["counts"]) == a.size
    text = ok(fmap("inspect", str(path), "--hist")).stdout
    assert "histogram of a (20 bins" in text
    first = next(line for line in text.splitlines() if line.strip().startswith("[         0,"))
    assert f"{a.size - 5}" in first and first.endswith("#" * 40)


def test_inspect_detail_errors(tmp_path: Path) -> None:
    path = top_file(tmp_path, True)
    line = error_line(fmap("inspect", str(path), "--channel", "0"), 2)
    assert line == "Error: --channel needs --layer (which layer's channel?)"
    line = error_line(fmap("inspect", str(path), "--layer", "cnv"), 2)
    assert line == f"Error: layer 'cnv' not in {path}; did you mean 'conv'? stored layers: conv"
    line = error_line(fmap("inspect", str(path), "--layer", "conv", "--channel", "2", "--top", "1"), 2)
    assert line == "Error: channel 2 out of range: layer 'conv' has channels 0..1"
    line = error_line(fmap("inspect", str(path), "--top", "0"), 2)
    assert line.startswith("Error: Invalid value for '--top': ")  # then click's words
