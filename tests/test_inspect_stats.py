"""fmap inspect with write-time statistics: the same answers as a scan, --channels, --top, --hist."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import extract_options
from crafted import craft, with_reference_stats, without_stats

from fmap_cli.analysis import layer_stats, scan_layer
from fmap_cli.cli import cli
from fmap_cli.extract import extract
from fmap_cli.summary import Details, read_summary


def invoke(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, f"fmap {' '.join(args)} -> {result.exit_code}\n{result.output}"
    return result


@pytest.fixture
def extracted(tiny_model: Path, images: list[Path], tmp_path: Path) -> Path:
    out = tmp_path / "maps.h5"
    options = extract_options(
        [str(p) for p in images],
        out=out,
        model=str(tiny_model),
        layers=["conv1", "pool1", "conv2"],
        device="cpu",
    )
    extract(options)
    return out


def _close(x: object, y: object, path: str = "") -> None:
    """Equal JSON data, floats to 1e-6 relative."""
    if isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9), path
    elif isinstance(x, dict) and isinstance(y, dict):
        assert x.keys() == y.keys(), path
        for key in x:
            _close(x[key], y[key], f"{path}.{key}")
    elif isinstance(x, list) and isinstance(y, list):
        assert len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y, strict=True)):
            _close(a, b, f"{path}[{i}]")
    else:
        assert x == y, path


def test_stats_and_scan_give_the_same_answers(extracted: Path, tmp_path: Path) -> None:
    """Write-time stats (the writer's, and numpy's from whole maps) and a scan of the maps agree."""
    scanned = without_stats(extracted, tmp_path / "old.h5")
    reference = with_reference_stats(extracted, tmp_path / "ref.h5")
    details = Details(channels=True, top=2, hist_bins=8)
    results = {}
    for label, path in (("writer", extracted), ("scan", scanned), ("numpy", reference)):
        data = read_summary(path, details).to_dict()
        sources = {layer.pop("stats_source") for layer in data["layers"]}
        results[label] = (data, sources)
        data.pop("path")
    assert results["scan"][1] == {"scan"} and results["numpy"][1] == {"file"}
    _close(results["numpy"][0], results["scan"][0])
    with h5py.File(extracted, "r") as f:
        if all("stats" in group for group in f["layers"].values()):  # once the writer stores them
            _close(results["writer"][0], results["scan"][0])
    with h5py.File(reference, "r") as f:
        for group in f["layers"].values():
            stored, scan = layer_stats(group), scan_layer(group)
            assert (stored.source, scan.source) == ("file", "scan")
            for key in ("image_max", "image_mean", "image_zero_fraction", "image_argmax"):
                np.testing.assert_array_equal(getattr(stored, key), getattr(scan, key), err_msg=key)
            for role in ("preactivation", "activation"):
                if getattr(stored, role) is None:
                    assert getattr(scan, role) is None
                    continue
                for key in ("min", "max", "mean", "std"):
                    expect, got = getattr(getattr(stored, role), key), getattr(getattr(scan, role), key)
                    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-9, err_msg=f"{role}_{key}")


def test_text_report_is_the_same_with_and_without_stats(extracted: Path, tmp_path: Path) -> None:
    scanned = without_stats(extracted, tmp_path / "maps.h5.old")
    reference = with_reference_stats(extracted, tmp_path / "maps.h5.ref")
    args = ("--channels", "--top", "3", "--hist")
    texts = [invoke("inspect", str(p), *args).stdout.split("\n", 1)[1] for p in (scanned, reference)]
    assert texts[0] == texts[1]


def test_default_inspect_reads_stats_not_maps(tmp_path: Path) -> None:
    """With a stats group, inspect trusts it: maps full of NaN do not show up."""
    z = np.full((2, 3, 4, 4), np.nan, dtype=np.float32)
    path = craft(tmp_path / "f.h5", {"conv": (z, z.copy())}, stats=False)
    with h5py.File(path, "r+") as f:
        stats = f["layers/conv"].create_group("stats")
        stats.attrs["role"] = "activation"
        for name in ("image_max", "image_mean"):
            stats[name] = np.ones((2, 3), dtype=np.float32)
        stats["image_zero_fraction"] = np.full((2, 3), 0.25, dtype=np.float32)
        stats["image_argmax"] = np.zeros((2, 3, 2), dtype=np.int64)
        for role in ("preactivation", "activation"):
            for key, value in (("min", 0.0), ("max", 7.0), ("mean", 1.5), ("std", 2.0)):
                stats[f"{role}_{key}"] = np.full(3, value)
        stats["activation_max"][1] = 0.0  # channel 1: min = max = 0, dead
    layer = json.loads(invoke("inspect", str(path), "--json").stdout)["layers"][0]
    assert layer["stats_source"] == "file"
    expected = {"min": 0.0, "max": 7.0, "mean": 1.5, "std": 2.0, "negative_fraction": None, "zero_fraction": 0.25}
    assert layer["activation"] == expected  # no '<role>_negatives' in this crafted stats group: null
    assert layer["dead_channels"] == [1]
    assert "zeros  25.0%" in invoke("inspect", str(path)).stdout


# ---------------------------------------------------------------------------- --top on a crafted file


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
    data = json.loads(invoke("inspect", str(path), "--layer", "conv", "--channel", "0", "--top", "3", "--json").stdout)
    (layer,) = data["layers"]
    assert layer["stats_source"] == ("file" if stats else "scan")
    (top,) = layer["top"]
    assert top["channel"] == 0
    got = [(i["index"], i["path"], round(i["value"], 6), i["row"], i["col"]) for i in top["images"]]
    assert got == [(1, "/data/cat1.jpg", 0.9, 2, 3), (3, "/data/cat3.jpg", 0.9, 1, 1), (2, "/data/cat2.jpg", 0.5, 5, 6)]
    text = invoke("inspect", str(path), "--top", "2").stdout
    assert "       0: 0.9 [1] /data/cat1.jpg; 0.9 [3] /data/cat3.jpg\n" in text
    assert "       1: 0.4 [4] /data/cat4.jpg; 0.3 [3] /data/cat3.jpg\n" in text


def test_channels_table_and_dead_flag(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 3, 5, 5)).astype(np.float32)
    z[:, 2] = -1.0  # channel 2 never fires
    a = np.maximum(z, 0)
    path = craft(tmp_path / "c.h5", {"conv": (z, a)})
    layer = json.loads(invoke("inspect", str(path), "--channels", "--json").stdout)["layers"][0]
    assert [row["dead"] for row in layer["channels"]] == [False, False, True]
    row = layer["channels"][0]
    values = z[:, 0].astype(np.float64)
    assert row["preactivation"] == pytest.approx(
        {"min": values.min(), "max": values.max(), "mean": values.mean(), "std": values.std()}
    )
    assert row["activation"]["max"] == pytest.approx(float(a[:, 0].max()))
    assert row["zero_fraction"] == pytest.approx(float((a[:, 0] == 0).mean()))
    lines = invoke("inspect", str(path), "--channels").stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("channel"))
    assert "z min" in lines[header] and "a std" in lines[header] and lines[header].endswith("zeros  dead")
    assert lines[header + 3].split()[0] == "2" and lines[header + 3].endswith("100.0%  dead")
    assert not lines[header + 1].endswith("dead")
    one = json.loads(invoke("inspect", str(path), "--layer", "conv", "--channel", "1", "--channels", "--json").stdout)
    assert [row["channel"] for row in one["layers"][0]["channels"]] == [1]


def test_histogram_counts_every_value(tmp_path: Path) -> None:
    a = np.zeros((2, 2, 4, 4), dtype=np.float32)
    a[0, 0, 0, :4] = [1, 2, 3, 4]
    a[1, 1, 3, 3] = 4
    path = craft(tmp_path / "h.h5", {"conv": (a - 1, a)})
    layer = json.loads(invoke("inspect", str(path), "--hist", "--json").stdout)["layers"][0]
    hist = layer["histogram"]
    assert hist["role"] == "activation"
    counts, edges = np.histogram(a, bins=20, range=(0.0, 4.0))
    assert hist["counts"] == counts.tolist() and hist["edges"] == pytest.approx(edges.tolist())
    assert sum(hist["counts"]) == a.size
    text = invoke("inspect", str(path), "--hist").stdout
    assert "histogram of a (20 bins" in text
    first = next(line for line in text.splitlines() if line.strip().startswith("[         0,"))
    assert f"{a.size - 5}" in first and first.endswith("#" * 40)


def test_inspect_detail_errors(tmp_path: Path) -> None:
    path = top_file(tmp_path, True)
    result = invoke("inspect", str(path), "--channel", "0", code=2)
    assert "Error: --channel needs --layer" in result.output
    result = invoke("inspect", str(path), "--layer", "cnv", code=2)
    assert "Error: layer 'cnv' not in" in result.output and "did you mean 'conv'?" in result.output
    result = invoke("inspect", str(path), "--layer", "conv", "--channel", "2", "--top", "1", code=2)
    assert "Error: channel 2 out of range: layer 'conv' has channels 0..1" in result.output
    assert invoke("inspect", str(path), "--top", "0", code=2).exit_code == 2
