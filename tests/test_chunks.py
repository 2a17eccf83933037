"""gzip chunks written by fmap (ISA-L, else zlib) are standard zlib streams: Python's zlib, h5dump
and xarray read them, and the zlib fallback writes the same maps."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from fmap_cli.cli import cli
from fmap_cli.store import chunks

isal = pytest.importorskip("isal", reason="isal (ISA-L) is not installed: only the zlib fallback can be tested")
ISAL = f"isal {isal.__version__}"
ZLIB = f"zlib {zlib.ZLIB_RUNTIME_VERSION}"


def extract(images: list[Path], model: Path, out: Path, *options: str) -> Path:
    args = ["extract", *map(str, images), "-m", str(model), "-o", str(out), "-q", "-b", "2", *options]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def maps(f: h5py.File) -> Iterator[h5py.Dataset]:
    """Every map dataset (z and a of every layer)."""
    for group in f["layers"].values():
        for role in ("preactivation", "activation"):
            if role in group:
                yield group[role]


def chunk_offsets(ds: h5py.Dataset) -> list[tuple[int, ...]]:
    return [ds.id.get_chunk_info(i).chunk_offset for i in range(ds.id.get_num_chunks())]


def without_isal(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on, write as where ``import isal`` fails."""
    monkeypatch.setitem(sys.modules, "isal", None)  # None in sys.modules makes the import raise ImportError
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    monkeypatch.setattr(chunks, "deflater", chunks.find_deflaters())


def test_gzip_levels_map_to_isal_levels() -> None:
    assert [chunks.deflater(n).describe() for n in range(10)] == [
        f"{ZLIB} level 0",  # stored: ISA-L has no such level
        *(f"{ISAL} level {level}" for level in (1, 1, 1, 2, 2, 2, 3, 3, 3)),
    ]


def test_without_isal_every_level_is_zlib(monkeypatch: pytest.MonkeyPatch) -> None:
    without_isal(monkeypatch)
    assert [chunks.deflater(n).describe() for n in range(10)] == [f"{ZLIB} level {n}" for n in range(10)]


def test_compressor_attribute_names_each_role_when_they_differ() -> None:
    gzip1, gzip6, raw = ("gzip", 1), ("gzip", 6), (None, 0)
    assert chunks.describe_compressors({"preactivation": raw, "activation": gzip1}) == f"{ISAL} level 1"
    assert chunks.describe_compressors({"preactivation": gzip1, "activation": gzip1}) == f"{ISAL} level 1"
    assert chunks.describe_compressors({"preactivation": gzip6, "activation": gzip1}) == (
        f"preactivation: {ISAL} level 2; activation: {ISAL} level 1"
    )
    assert chunks.describe_compressors({"preactivation": raw, "activation": ("lzf", 0)}) == "none"


def test_every_chunk_decompresses_with_zlib_to_the_maps(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    """Each stored chunk, inflated by Python's zlib, is byte for byte the chunk of the same maps
    written uncompressed."""
    packed = extract(images, tiny_model, tmp_path / "gzip.h5", "--z-compression", "gzip:6")
    plain = extract(images, tiny_model, tmp_path / "raw.h5", "--compression", "none")
    with h5py.File(packed, "r") as f, h5py.File(plain, "r") as g:
        assert f.attrs["compressor"] == f"preactivation: {ISAL} level 2; activation: {ISAL} level 1"
        assert g.attrs["compressor"] == "none"
        checked = 0
        for ds in maps(f):
            raw = g[ds.name]
            assert (ds.compression, raw.compression) == ("gzip", None)
            assert ds.compression_opts == (6 if ds.name.endswith("preactivation") else 1)  # as asked
            offsets = chunk_offsets(ds)
            per_image = np.prod([-(-n // c) for n, c in zip(ds.shape[1:], ds.chunks[1:], strict=True)])
            assert len(offsets) == len(images) * per_image and offsets == chunk_offsets(raw)
            for offset in offsets:
                mask, data = ds.id.read_direct_chunk(offset)
                assert mask == 0  # the deflate filter applied
                assert zlib.decompress(data) == raw.id.read_direct_chunk(offset)[1], (ds.name, offset)
                checked += 1
        assert checked >= 4 * len(images)


def test_edge_chunks_are_padded_then_compressed(tmp_path: Path) -> None:
    """Chunks that overhang the dataset (channels and rows not multiples of the chunk) hold the
    values at their corner and zeros beyond, as HDF5 itself writes them."""
    rng = np.random.default_rng(0)
    values = np.maximum(rng.normal(size=(3, 5, 7, 9)), 0).astype(np.float32)
    with h5py.File(tmp_path / "edge.h5", "w") as f, ThreadPoolExecutor(2) as pool:
        ds = f.create_dataset("a", shape=(0, 5, 7, 9), maxshape=(None, 5, 7, 9), chunks=(1, 2, 4, 9),
                              dtype=np.float32, compression="gzip", compression_opts=1)  # fmt: skip
        ds.resize(3, axis=0)
        chunks.write_rows(ds, 0, values, pool)
        assert np.array_equal(ds[...], values)
        for offset in chunk_offsets(ds):
            n, c, h, _ = offset
            expected = np.zeros((2, 4, 9), dtype=np.float32)
            block = values[n, c : c + 2, h : h + 4]
            expected[: block.shape[0], : block.shape[1]] = block
            assert zlib.decompress(ds.id.read_direct_chunk(offset)[1]) == expected.tobytes(), offset


def test_h5dump_reads_an_isal_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump (hdf5-tools) not installed: HDF5's own reader cannot be checked here")
    out = extract(images, tiny_model, tmp_path / "isal.h5", "--z-compression", "gzip:1")
    plain = extract(images, tiny_model, tmp_path / "raw.h5", "--compression", "none")
    with h5py.File(out, "r") as f:
        assert f.attrs["compressor"] == f"{ISAL} level 1"
    with h5py.File(plain, "r") as g:
        expected = {ds.name: ds[...] for ds in maps(g)}
    assert len(expected) == 4
    for name, values in expected.items():
        dumped = tmp_path / "dump.bin"
        subprocess.run(["h5dump", "-d", name, "-b", "LE", "-o", str(dumped), str(out)], capture_output=True, check=True)
        assert np.array_equal(np.fromfile(dumped, dtype="<f4").reshape(values.shape), values), name


def test_xarray_reads_an_isal_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    out = extract(images, tiny_model, tmp_path / "isal.h5", "--z-compression", "gzip:1")
    plain = extract(images, tiny_model, tmp_path / "raw.h5", "--compression", "none")
    with h5py.File(out, "r") as f:
        assert f.attrs["compressor"] == f"{ISAL} level 1"
    with xr.open_dataset(out, group="layers/conv2", engine="h5netcdf") as ds, h5py.File(plain, "r") as g:
        for role in ("preactivation", "activation"):
            assert np.array_equal(ds[role].values, g[f"layers/conv2/{role}"][...]), role


def test_zlib_fallback_and_isal_write_the_same_maps(
    tiny_model: Path, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = extract(images, tiny_model, tmp_path / "isal.h5", "--z-compression", "gzip:1")
    without_isal(monkeypatch)
    slow = extract(images, tiny_model, tmp_path / "zlib.h5", "--z-compression", "gzip:1")
    with h5py.File(fast, "r") as f, h5py.File(slow, "r") as g:
        assert (f.attrs["compressor"], g.attrs["compressor"]) == (f"{ISAL} level 1", f"{ZLIB} level 1")
        assert f.attrs["storage"] == g.attrs["storage"]  # --append and merge treat them as one kind
        differ = 0
        for ds in maps(f):
            assert np.array_equal(ds[...], g[ds.name][...]), ds.name
            differ += sum(
                ds.id.read_direct_chunk(o)[1] != g[ds.name].id.read_direct_chunk(o)[1] for o in chunk_offsets(ds)
            )
        assert differ > 0  # two compressors did write them
