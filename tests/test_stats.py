"""Statistics: computed while writing (store/stats.py) equal numpy over the stored maps, and read back
(analysis.py) they give the same answers as a scan of the maps."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from crafted import craft, with_reference_stats, without_stats
from helpers import check_stats_match_maps, invoke, ok, run_extract, write_photos

from fmap_cli.analysis import layer_stats, scan_layer
from fmap_cli.store.stats import ChannelStats
from fmap_cli.summary import Details, read_summary

# ---------------------------------------------------------------------------- written while extracting


def test_write_time_statistics_match_numpy(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 7, size=(22, 30))
    out = tmp_path / "out.h5"
    ok(run_extract(images, tiny_model, out, "-b", "3"))  # batches of 3, 3, 1 merged
    check_stats_match_maps(out)
    with h5py.File(out, "r") as f:
        stats = f["layers/conv1/stats"]
        assert stats["image_max"].shape == (7, 4)
        assert stats["image_argmax"].shape == (7, 4, 2)
        assert stats["activation_std"].shape == (4,)
        assert stats["image_zero_fraction"][...].max() > 0  # relu zeros exist: the zero check means something


@pytest.mark.parametrize(("mean", "std"), [(1000.0, 0.01), (-50.0, 0.001), (0.0, 1.0)])
def test_std_of_a_channel_far_from_zero_is_numpys(mean: float, std: float) -> None:
    """sum(x^2) - n * mean^2 in float32 squares loses the spread of a channel whose mean dwarfs it."""
    values = (mean + std * np.random.default_rng(3).standard_normal((5, 2, 30, 30))).astype(np.float32)
    stats = ChannelStats.empty(2)
    stats.update(values[:2])
    stats.update(values[2:])  # merged batches, as the writer does
    expected = values.astype(np.float64).std(axis=(0, 2, 3))
    np.testing.assert_allclose(stats.summary()["std"], expected, rtol=1e-4)


# ---------------------------------------------------------------------------- read back, or scanned


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


def test_stats_and_scan_give_the_same_answers(all_layers_file: Path, tmp_path: Path) -> None:
    """Write-time stats (the writer's, and numpy's from whole maps) and a scan of the maps agree."""
    scanned = without_stats(all_layers_file, tmp_path / "old.h5")
    reference = with_reference_stats(all_layers_file, tmp_path / "ref.h5")
    details = Details(channels=True, top=2, hist_bins=8)
    results = {}
    for label, path in (("writer", all_layers_file), ("scan", scanned), ("numpy", reference)):
        data = read_summary(path, details).to_dict()
        sources = {layer.pop("stats_source") for layer in data["layers"]}
        results[label] = (data, sources)
        for key in ("path", "file_bytes"):  # the files differ in what they store, not in what they say
            data.pop(key)
    assert results["scan"][1] == {"scan"} and results["numpy"][1] == {"file"}
    _close(results["numpy"][0], results["scan"][0])
    with h5py.File(all_layers_file, "r") as f:
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
    layer = json.loads(ok(invoke("inspect", str(path), "--json")).stdout)["layers"][0]
    assert layer["stats_source"] == "file"
    expected = {"min": 0.0, "max": 7.0, "mean": 1.5, "std": 2.0, "negative_fraction": None, "zero_fraction": 0.25}
    assert layer["activation"] == expected  # no '<role>_negatives' in this crafted stats group: null
    assert layer["dead_channels"] == [1]
    assert "zeros  25.0%" in ok(invoke("inspect", str(path))).stdout
