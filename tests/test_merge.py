"""fmap merge: shards of one job -> one file equal to an unsharded run (raw chunk copy or virtual)."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, TINY_SPEC, extract_options, make_photo, tiny_weights

from fmap_cli.cli import cli
from fmap_cli.errors import FmapFileError, UsageError
from fmap_cli.extract import extract
from fmap_cli.inputs import Shard
from fmap_cli.store import merge as merging
from fmap_cli.store.merge import merge_shards, pool_channel_stats
from fmap_cli.store.reader import SPARE_FILES, missing_sources
from fmap_cli.store.schema import SCHEMA

LAYERS = ("conv1", "conv2")
ROLES = ("preactivation", "activation")

Make = Callable[..., Path]


@dataclass(frozen=True)
class Job:
    """A tiny model and a dozen small images of different sizes, made once for this module."""

    model: Path
    photos: list[str]
    folder: Path

    def run(self, out: Path, shard: tuple[int, int] | None = None, images: list[str] | None = None, **options) -> Path:
        extract(
            extract_options(
                images or self.photos,
                out=out,
                model=str(self.model),
                shard=Shard(*shard) if shard else None,
                device="cpu",
                batch_size=1,  # the same batches in every run: maps are bit-identical
                **options,
            )
        )
        return out


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Job:
    """The job, with its three shards (0/3, 1/3, 2/3) and an unsharded run in ``folder``."""
    root = tmp_path_factory.mktemp("job")
    (root / "tiny.toml").write_text(TINY_SPEC)
    np.savez(root / "tiny.npz", **tiny_weights())
    (root / "photos").mkdir()
    photos = []
    for i in range(12):
        path = root / "photos" / f"img{i:02d}.png"
        make_photo(20 + 2 * i, 30 - i, seed=i).save(path)
        photos.append(str(path))
    made = Job(root / "tiny.toml", photos, root / "made")
    made.folder.mkdir()
    for k in range(3):
        made.run(made.folder / f"shard_{k}.h5", (k, 3))
    made.run(made.folder / "whole.h5")
    return made


@pytest.fixture
def make(job: Job, tmp_path: Path) -> Make:
    """make(name, shard=(k, n), images=None, **options) -> a finished file in tmp_path/shards."""
    (tmp_path / "shards").mkdir(exist_ok=True)
    return lambda name, *args, **options: job.run(tmp_path / "shards" / name, *args, **options)


@pytest.fixture
def shards(job: Job, tmp_path: Path) -> list[Path]:
    """This test's own copies of shards 0/3, 1/3, 2/3 of the dozen images, in tmp_path/shards."""
    (tmp_path / "shards").mkdir(exist_ok=True)
    return [Path(shutil.copy(job.folder / f"shard_{k}.h5", tmp_path / "shards")) for k in range(3)]


@pytest.fixture
def whole(job: Job) -> Path:
    """The same images extracted without --shard (read only)."""
    return job.folder / "whole.h5"


def merged_maps(path: Path) -> dict[tuple[str, str], np.ndarray]:
    with h5py.File(path, "r") as f:
        return {(layer, role): f[f"layers/{layer}/{role}"][...] for layer in LAYERS for role in ROLES}


# ---------------------------------------------------------------------------- the merged file


def test_merged_file_equals_an_unsharded_run(whole: Path, shards: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "all.h5"
    result = merge_shards([shards[2], shards[0], shards[1]], out)  # any order
    assert result.n_images == 12 and result.shards == shards and result.missing == []
    assert not list(tmp_path.glob("**/*.partial"))
    with h5py.File(out, "r") as f, h5py.File(whole, "r") as g:
        for name in ("path", "sha256"):
            assert f[f"images/{name}"].asstr()[...].tolist() == g[f"images/{name}"].asstr()[...].tolist()
        for name in ("images/index", "images/original_size", "N"):
            np.testing.assert_array_equal(f[name][...], g[name][...])
        for layer in LAYERS:
            per_image = [f"stats/{name}" for name in ("image_max", "image_mean", "image_zero_fraction", "image_argmax")]
            for name in [*ROLES, *per_image]:
                np.testing.assert_array_equal(f[f"layers/{layer}/{name}"][...], g[f"layers/{layer}/{name}"][...])
        assert_same_nodes_and_attributes(f, g)
        attrs = f.attrs
        assert attrs["n_images"] == 12 and attrs["complete"] == 1 and attrs["n_inputs"] == 12
        assert "shard_index" not in attrs and "shard_count" not in attrs and "virtual" not in attrs
        assert attrs["merged_from"].tolist() == [str(p) for p in shards]
        for key in ("model_spec", "weights_sha256", "preprocessing", "storage", "input_list_sha256"):
            assert attrs[key] == g.attrs[key], key
        assert attrs["layers"].tolist() == g.attrs["layers"].tolist()


def assert_same_nodes_and_attributes(f: h5py.File, g: h5py.File) -> None:
    """Every group and dataset of ``g`` is in ``f`` with the same attributes, dimension labels and scales."""
    names = _visit(g)
    assert sorted(names) == sorted(_visit(f)), set(names) ^ set(_visit(f))
    for name in names:
        theirs, ours = g[name], f[name]
        assert set(theirs.attrs) == set(ours.attrs), name
        for key in set(theirs.attrs) - {"DIMENSION_LIST", "REFERENCE_LIST"}:  # object references differ per file
            np.testing.assert_array_equal(ours.attrs[key], theirs.attrs[key], err_msg=f"{name}@{key}")
        if isinstance(theirs, h5py.Dataset):
            assert ours.is_scale == theirs.is_scale, name
            for axis, dim in enumerate(theirs.dims):
                assert ours.dims[axis].label == dim.label, name
                assert [s.name for s in ours.dims[axis].values()] == [s.name for s in dim.values()], name


def _visit(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return names


def test_channel_statistics_equal_numpy_over_the_merged_maps(shards: list[Path], tmp_path: Path) -> None:
    """The pooling is exact (next test); the tolerance is that of the shards' own write-time statistics."""
    out = merge_shards(shards, tmp_path / "all.h5").out
    maps = merged_maps(out)
    with h5py.File(out, "r") as f:
        for (layer, role), values in maps.items():
            x = values.astype(np.float64).transpose(1, 0, 2, 3).reshape(values.shape[1], -1)  # (C, N*H*W)
            stats = f[f"layers/{layer}/stats"]
            np.testing.assert_allclose(stats[f"{role}_mean"][...], x.mean(axis=1), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(stats[f"{role}_std"][...], x.std(axis=1), rtol=1e-6, atol=1e-9)
            np.testing.assert_array_equal(stats[f"{role}_min"][...], x.min(axis=1))
            np.testing.assert_array_equal(stats[f"{role}_max"][...], x.max(axis=1))


def test_pool_channel_stats_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.normal(i, 1 + i, size=(3, n)) for i, n in enumerate((5, 40, 1))]  # (C, values)
    parts = [
        ({"min": b.min(1), "max": b.max(1), "mean": b.mean(1), "std": b.std(1), "negatives": (b < 0).mean(1)},
         b.shape[1])
        for b in blocks
    ]  # fmt: skip
    pooled = None
    for summary, count in parts:  # one shard at a time, as merge visits them
        pooled = pool_channel_stats(pooled, summary, count)
    assert pooled is not None
    x = np.concatenate(blocks, axis=1)
    expected = {"min": x.min(1), "max": x.max(1), "mean": x.mean(1), "std": x.std(1), "negatives": (x < 0).mean(1)}
    for key, value in pooled.summary().items():
        np.testing.assert_allclose(value, expected[key], rtol=1e-12)


def test_merged_file_follows_the_schema(shards: list[Path], tmp_path: Path) -> None:
    out = merge_shards(shards, tmp_path / "all.h5").out
    with h5py.File(out, "r") as f:
        for node in SCHEMA:
            for name in {node.path.replace("{layer}", layer) for layer in LAYERS}:
                if node.required:
                    assert name in f, name
                if name in f:
                    missing = [a.name for a in node.attrs if a.required and a.name not in f[name].attrs]
                    assert not missing, (name, missing)
    result = CliRunner().invoke(cli, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "images: 12" in result.output


def test_map_chunks_are_copied_raw(shards: list[Path], tmp_path: Path) -> None:
    out = merge_shards(shards, tmp_path / "all.h5").out
    with h5py.File(out, "r") as f, h5py.File(shards[1], "r") as shard:
        first_row = int(shard["images/index"][0])  # rows of shard 1 start after shard 0's
        for role in ROLES:
            src, dst = shard[f"layers/conv1/{role}"], f[f"layers/conv1/{role}"]
            for key in ("chunks", "compression", "compression_opts", "shuffle"):
                assert getattr(dst, key) == getattr(src, key), key
            for row in range(src.shape[0]):
                assert dst.id.read_direct_chunk((first_row + row, 0, 0, 0)) == src.id.read_direct_chunk((row, 0, 0, 0))
        assert f["layers/conv1/activation"].compression == "gzip"


def test_xarray_sees_named_dimensions(shards: list[Path], tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    out = merge_shards(shards, tmp_path / "all.h5").out
    with xr.open_dataset(out, group="layers/conv1", engine="h5netcdf") as ds:
        assert ds["activation"].dims == ("N", "C", "H", "W")
        assert ds.sizes["N"] == 12
        np.testing.assert_array_equal(ds["activation"].values, merged_maps(out)[("conv1", "activation")])


def test_saved_input_and_a_single_stored_role(make: Make, tmp_path: Path) -> None:
    from fmap_cli.store.writer import Storage

    options = {"save_input": True, "storage": Storage(roles=frozenset({"activation"}))}
    parts = [make(f"s{k}.h5", (k, 2), **options) for k in (0, 1)]
    whole = make("whole.h5", **options)
    out = merge_shards(parts, tmp_path / "all.h5").out
    with h5py.File(out, "r") as f, h5py.File(whole, "r") as g:
        np.testing.assert_array_equal(f["input"][...], g["input"][...])
        assert "preactivation" not in f["layers/conv1"]
        assert tuple(d.label for d in f["input"].dims) == ("N", "C", "H", "W")
        assert f["input"].dims[1][0] == f["C"]
        z_mean = "layers/conv1/stats/preactivation_mean"  # kept for z although z is not stored
        np.testing.assert_allclose(f[z_mean][...], g[z_mean][...], rtol=1e-7)


def test_failures_of_skip_bad_are_concatenated(make: Make, job: Job, tmp_path: Path) -> None:
    photos = job.photos
    bad = [tmp_path / "broken1.png", tmp_path / "broken2.jpg"]
    for path in bad:
        path.write_bytes(b"not an image")
    images = [*photos[:2], str(bad[0]), *photos[2:9], str(bad[1]), *photos[9:]]  # bad at 2 and 10
    parts = [make(f"s{k}.h5", (k, 3), images=images, skip_bad=True) for k in range(3)]
    whole = make("whole.h5", images=images, skip_bad=True)
    out = merge_shards(parts, tmp_path / "all.h5").out
    with h5py.File(out, "r") as f, h5py.File(whole, "r") as g:
        assert f["failures/index"][...].tolist() == [2, 10]
        for name in ("path", "reason"):
            assert f[f"failures/{name}"].asstr()[...].tolist() == g[f"failures/{name}"].asstr()[...].tolist()
        assert f["images/index"][...].tolist() == g["images/index"][...].tolist()
        assert f.attrs["n_images"] == 12


# ---------------------------------------------------------------------------- refusing


def test_shards_of_a_different_run_are_refused(make: Make, shards: list[Path], job: Job) -> None:
    other = make("other.h5", (1, 3), layers=["conv1"])
    with pytest.raises(UsageError, match=r"other\.h5: differs from .*shard_0\.h5 in: layers \(conv1 vs conv1,conv2\)"):
        merge_shards([shards[0], other, shards[2]], shards[0].with_name("all.h5"))
    other_list = make("other_list.h5", (1, 3), images=job.photos[::-1])
    with pytest.raises(UsageError, match="in: input list"):
        merge_shards([shards[0], other_list, shards[2]], shards[0].with_name("all.h5"))
    other_count = make("other_count.h5", (1, 2))
    with pytest.raises(UsageError, match=r"shard count \(N of --shard K/N\)"):
        merge_shards([shards[0], other_count], shards[0].with_name("all.h5"))
    assert not shards[0].with_name("all.h5").exists()


def test_missing_share_is_reported(shards: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "all.h5"
    with pytest.raises(UsageError) as caught:
        merge_shards([shards[0], shards[2]], out)
    assert str(caught.value) == "missing shard 1/3 (images 4-7 of 12); pass --allow-missing to merge the shards given"
    assert not out.exists()
    said: list[str] = []
    result = merge_shards([shards[2], shards[0]], out, allow_missing=True, log=said.append)
    assert result.missing == ["shard 1/3 (images 4-7 of 12)"] and result.n_images == 8
    assert said == [f"warning: missing shard 1/3 (images 4-7 of 12): its images are not in {out}"]
    with h5py.File(out, "r") as f:
        assert f["images/index"][...].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
        assert f["N"][...].tolist() == list(range(8))


def test_duplicate_and_unsharded_files_are_refused(whole: Path, shards: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.h5"
    shutil.copy(shards[1], copy)
    with pytest.raises(UsageError, match=rf"shard 1/3 given twice: {shards[1]} and {copy}"):
        merge_shards([*shards, copy], tmp_path / "all.h5")
    with pytest.raises(UsageError, match=r"whole\.h5: not a shard"):
        merge_shards([whole], tmp_path / "all.h5")
    with h5py.File(copy, "r+") as f:
        f.attrs["complete"] = np.int8(0)
    with pytest.raises(FmapFileError, match=r"copy\.h5: incomplete file"):
        merge_shards([copy], tmp_path / "all.h5")


def test_an_error_while_writing_leaves_nothing(shards: list[Path], tmp_path: Path, monkeypatch) -> None:
    def fail(self: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merging._Merger, "_failures", fail)
    out = tmp_path / "all.h5"
    with pytest.raises(merging.FmapError, match="cannot write merged file: No space left on device"):
        merge_shards(shards, out)
    assert not out.exists() and not list(tmp_path.glob(".all.h5.*"))


# ---------------------------------------------------------------------------- --virtual


def test_virtual_file_reads_the_same_and_survives_a_move(shards: list[Path], tmp_path: Path, monkeypatch) -> None:
    standalone = merge_shards(shards, tmp_path / "all.h5").out
    virtual = merge_shards(shards, shards[0].with_name("virtual.h5"), virtual=True)
    assert virtual.raw_bytes == 0
    monkeypatch.chdir("/")
    for path in (virtual.out, tmp_path / "moved" / "virtual.h5"):
        if path.parent.name == "moved":  # the directory moved as a whole: sources are found beside the file
            shards[0].parent.rename(path.parent)
        with h5py.File(path, "r") as f:
            assert f.attrs["virtual"] == 1 and f.attrs["n_images"] == 12
            assert f["layers/conv1/activation"].is_virtual
            sources = {s.file_name for s in f["layers/conv1/activation"].virtual_sources()}
            assert sources == {"shard_0.h5", "shard_1.h5", "shard_2.h5"}  # relative to the file's directory
            assert missing_sources(f) == []
            assert f["images/index"][...].tolist() == list(range(12))
        for key, values in merged_maps(path).items():
            np.testing.assert_array_equal(values, merged_maps(standalone)[key])
    assert CliRunner().invoke(cli, ["inspect", str(tmp_path / "moved" / "virtual.h5")]).exit_code == 0


def test_virtual_file_reports_a_deleted_shard(shards: list[Path]) -> None:
    out = merge_shards(shards, shards[0].with_name("virtual.h5"), virtual=True).out
    shards[1].unlink()
    with h5py.File(out, "r") as f:
        assert missing_sources(f) == ["shard_1.h5"]
        assert np.isnan(f["layers/conv2/activation"][4:8]).all()  # what HDF5 silently returns
        assert f["images/index"][4:8].tolist() == [-1] * 4
    report = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "WARNING: virtual file: source files missing, their images read as NaN: shard_1.h5" in report.stdout
    assert report.exit_code == 1 and "source files missing: shard_1.h5" in report.stderr
    data = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).stdout)
    assert data["missing_sources"] == ["shard_1.h5"]
    rendered = CliRunner().invoke(cli, ["render", str(out), "--layer", "conv2", "-o", str(out.with_suffix(".png"))])
    assert rendered.exit_code == 1 and "shard_1.h5" in rendered.stderr
    assert not out.with_suffix(".png").exists()


# ---------------------------------------------------------------------------- command line


def test_cli_merge(shards: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "all.h5"
    runner = CliRunner()
    result = runner.invoke(cli, ["merge", *map(str, shards), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert result.stderr.startswith("merged 3 shards, 12 images in ")
    result = runner.invoke(cli, ["merge", *map(str, shards), "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.endswith(f"Error: {out}: already exists; pass --overwrite to replace it\n")
    result = runner.invoke(cli, ["merge", *map(str, shards), "-o", str(out), "--overwrite", "--virtual", "-q"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"{out}\n", "")


def test_cli_merge_errors(shards: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "all.h5"
    runner = CliRunner()
    result = runner.invoke(cli, ["merge", str(shards[0]), str(shards[2]), "-o", str(out)])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (
        "Error: missing shard 1/3 (images 4-7 of 12); pass --allow-missing to merge the shards given"
    )
    result = runner.invoke(cli, ["merge", str(shards[0]), str(shards[2]), "-o", str(out), "--allow-missing"])
    assert result.exit_code == 0 and result.stdout == f"{out}\n"
    assert "warning: missing shard 1/3 (images 4-7 of 12)" in result.stderr
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    result = runner.invoke(cli, ["merge", str(junk), "-o", str(tmp_path / "x.h5")])
    assert (result.exit_code, result.stderr) == (1, f"Error: {junk}: not an HDF5 file (or it is corrupt)\n")
    result = runner.invoke(cli, ["merge", "-o", str(tmp_path / "x.h5")])
    assert result.exit_code == 2 and "Missing argument 'SHARDS...'" in result.stderr
    assert not (tmp_path / "x.h5").exists()


# ---------------------------------------------------------------------------- damaged shard attributes


def _damage_shard(path: Path, attrs: dict[str, object], dataset: str | None = None) -> None:
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value
        if dataset is not None:
            del f[dataset]


@pytest.mark.parametrize(
    ("attrs", "dataset", "says"),
    [
        ({"shard_count": None}, None, "no attribute 'shard_count'"),
        ({"n_inputs": None}, None, "no attribute 'n_inputs'"),
        ({"input_list_sha256": None}, None, "no attribute 'input_list_sha256'"),
        ({}, "images/index", "/images/index is missing"),
        ({"shard_count": np.int64(0)}, None, "attribute 'shard_count' is 0, not a count (an integer >= 1)"),
        ({"shard_count": np.int64(-3)}, None, "attribute 'shard_count' is -3, not a count (an integer >= 1)"),
        ({"shard_count": "3"}, None, "attribute 'shard_count' is '3', not a count (an integer >= 1)"),
        ({"shard_index": np.int64(3)}, None, "attribute 'shard_index' is 3, not one of 0..2 (shard_count is 3)"),
        ({"shard_index": np.int64(-1)}, None, "attribute 'shard_index' is -1, not one of 0..2 (shard_count is 3)"),
        ({"n_inputs": np.int64(-12)}, None, "attribute 'n_inputs' is -12, not a count (an integer >= 0)"),
        ({"input_list_sha256": np.int64(7)}, None, "attribute 'input_list_sha256' is 7, not text"),
    ],
)
def test_damaged_shard_attributes(
    shards: list[Path], tmp_path: Path, attrs: dict[str, object], dataset: str | None, says: str
) -> None:
    _damage_shard(shards[1], attrs, dataset)
    with pytest.raises(FmapFileError) as caught:
        merge_shards(shards, tmp_path / "all.h5")
    assert str(caught.value) == f"{shards[1]}: damaged shard: {says}"
    result = CliRunner().invoke(cli, ["merge", *map(str, shards), "-o", str(tmp_path / "all.h5")])
    assert (result.exit_code, result.stdout, result.stderr) == (1, "", f"Error: {shards[1]}: damaged shard: {says}\n")
    assert not (tmp_path / "all.h5").exists()


def test_shard_index_of_the_wrong_type(shards: list[Path], tmp_path: Path) -> None:
    _damage_shard(shards[0], {"shard_index": np.array([0, 1])})
    result = CliRunner().invoke(cli, ["merge", *map(str, shards), "-o", str(tmp_path / "all.h5")])
    assert (result.exit_code, result.stderr) == (
        1,
        f"Error: {shards[0]}: damaged shard: attribute 'shard_index' is [0, 1], not one of 0..2 (shard_count is 3)\n",
    )


def _brute_force_missing(shards: list[merging.ShardFile]) -> list[str]:
    """The shares no shard covers, by visiting every share (the definition)."""
    first = shards[0]
    given = {s.shard.index for s in shards}
    every = [
        merging.ShardFile(Path(), Shard(k, first.shard.count), 0, first.n_inputs) for k in range(first.shard.count)
    ]
    return [m.describe() for m in every if m.shard.index not in given and len(m.share())]


def test_missing_shares_visits_only_shares_with_images() -> None:
    for count in range(1, 9):
        for n_inputs in range(10):
            for given in ({0}, {count - 1}, {0, count // 2}):
                shards = [merging.ShardFile(Path(f"{k}.h5"), Shard(k, count), 0, n_inputs) for k in sorted(given)]
                assert merging.missing_shares(shards) == _brute_force_missing(shards), (count, n_inputs, given)


def test_missing_shares_of_a_huge_claimed_count_returns_at_once() -> None:
    """A shard file may claim any shard_count: listing its missing shares must not visit them all."""
    code = (
        "from pathlib import Path; from fmap_cli.inputs import Shard; from fmap_cli.store.merge import ShardFile, "
        "missing_shares; print(missing_shares([ShardFile(Path('a.h5'), Shard(0, 10**12), 1, 10**12)])[-2:]); "
        "print(missing_shares([ShardFile(Path('a.h5'), Shard(5, 10**12), 0, 3)]))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"['shard {merging.MISSING_LISTED}/{10**12} (images {merging.MISSING_LISTED}-{merging.MISSING_LISTED} "
        f"of {10**12})', '{10**12 - 1 - merging.MISSING_LISTED} more shares']",
        "['shard 333333333333/1000000000000 (images 0-0 of 3)', 'shard 666666666666/1000000000000 (images 1-1 of 3)', "
        "'shard 999999999999/1000000000000 (images 2-2 of 3)']",
    ]


def test_virtual_merge_refuses_shards_outside_the_output_directory(shards: list[Path], tmp_path: Path) -> None:
    """Readers refuse virtual sources that leave the file's directory: merge must not write one."""
    out = tmp_path / "elsewhere" / "all.h5"
    out.parent.mkdir()
    result = CliRunner().invoke(cli, ["merge", *map(str, shards), "-o", str(out), "--virtual"])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1] == (
        f"Error: --virtual: {shards[0]} is not in {out.parent} or below it, where the virtual file all.h5 reads "
        "its shards from; write OUT beside the shards, or merge without --virtual"
    )
    assert list(out.parent.iterdir()) == []
    below = tmp_path / "all.h5"  # the shards lie in tmp_path/shards: below OUT's directory
    assert CliRunner().invoke(cli, ["merge", *map(str, shards), "-o", str(below), "--virtual"]).exit_code == 0
    assert CliRunner().invoke(cli, ["inspect", str(below)]).exit_code == 0


# ---------------------------------------------------------------------------- many shards, mixed compressors

MANY = 50  # shards, more than LIMITED lets a process open at once
LIMITED = """
import resource, sys
from pathlib import Path

import h5py

from fmap_cli.store.merge import merge_shards

out, kind, *paths = sys.argv[1:]
resource.setrlimit(resource.RLIMIT_NOFILE, (32, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:  # the limit bites: these shards cannot all be open at once
    opened = [h5py.File(p, "r") for p in paths]
except OSError as exc:
    print(exc.errno)
merge_shards([Path(p) for p in paths], Path(out), virtual=kind == "virtual")
"""


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """MANY one-image shards of a job of MANY images, fast: shard 0 extracted, the others its copies
    given their own share (shard_index, /images/index) and rows and statistics of their own."""
    root = tmp_path_factory.mktemp("many")
    (root / "tiny.toml").write_text(TINY_SPEC)
    np.savez(root / "tiny.npz", **tiny_weights())
    photos = [root / f"img{i:02d}.png" for i in range(MANY)]
    for i, path in enumerate(photos):
        make_photo(8, 8, seed=i).save(path)
    first = root / "shards" / "shard_00.h5"
    first.parent.mkdir()
    extract(extract_options(photos, out=first, model=str(root / "tiny.toml"), shard=Shard(0, MANY), device="cpu"))
    made = [first]
    for k in range(1, MANY):
        made.append(Path(shutil.copy(first, first.with_name(f"shard_{k:02d}.h5"))))
        with h5py.File(made[-1], "r+") as f:
            f.attrs["shard_index"] = np.int64(k)
            f["images/index"][0] = k
            f["images/original_size"][0] = (k, k + 1)
            maps, stats = f["layers/conv1/activation"], f["layers/conv1/stats"]
            maps[0] = maps[0] * k
            stats["activation_max"][...] = stats["activation_max"][...] * k
            stats["activation_mean"][...] = stats["activation_mean"][...] + k
    return made


@pytest.mark.parametrize("kind", ["copy", "virtual"])
def test_more_shards_than_a_process_may_open(many: list[Path], kind: str) -> None:
    """A SLURM array of MANY tasks merged under an open-file limit of 32 (HDF5 holds a descriptor
    per open file) gives the same file as merging them without the limit."""
    limited, free = (many[0].parent.parent / f"{name}_{kind}.h5" for name in ("limited", "free"))
    done = subprocess.run([sys.executable, "-c", LIMITED, str(limited), kind, *map(str, many)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (done.returncode, done.stdout) == (0, f"{errno.EMFILE}\n"), done.stderr
    merge_shards(many, free, virtual=kind == "virtual")
    with h5py.File(limited, "r") as f, h5py.File(free, "r") as g:
        assert_same_file(f, g)
        assert f["images/index"][...].tolist() == list(range(MANY))
        assert f["images/original_size"][1:, 0].tolist() == list(range(1, MANY))
        with h5py.File(many[0], "r") as shard:
            k = np.arange(MANY, dtype=np.float64)[:, None]  # (MANY, 1): shard k's values, as made above
            maps = shard["layers/conv1/activation"][0] * np.maximum(k, 1)[:, :, None, None]
            np.testing.assert_array_equal(f["layers/conv1/activation"][...], maps.astype(np.float32))
            stats = shard["layers/conv1/stats"]
            np.testing.assert_allclose(
                f["layers/conv1/stats/activation_mean"][...], (stats["activation_mean"][...] + k).mean(0), rtol=1e-6
            )
            np.testing.assert_array_equal(
                f["layers/conv1/stats/activation_max"][...],
                (stats["activation_max"][...] * np.maximum(k, 1)).max(0).astype(np.float32),
            )
        if kind == "virtual":
            assert len({s.file_name for s in f["layers/conv1/activation"].virtual_sources()}) == MANY


def assert_same_file(f: h5py.File, g: h5py.File) -> None:
    """The same nodes and attributes (the root's but its creation time), values, stored map chunks
    and virtual sources."""
    assert_same_nodes_and_attributes(f, g)
    assert set(f.attrs) == set(g.attrs)
    for key in set(g.attrs) - {"created"}:
        np.testing.assert_array_equal(f.attrs[key], g.attrs[key], err_msg=key)
    for name in _visit(g):
        ours, theirs = f[name], g[name]
        if not isinstance(theirs, h5py.Dataset):
            continue
        assert (ours.dtype, ours.chunks, ours.compression, ours.is_virtual) == (
            theirs.dtype, theirs.chunks, theirs.compression, theirs.is_virtual,
        ), name  # fmt: skip
        if theirs.dtype.kind == "O":
            assert ours.asstr()[...].tolist() == theirs.asstr()[...].tolist(), name
        else:
            np.testing.assert_array_equal(ours[...], theirs[...], err_msg=name)
        if theirs.is_virtual:
            where = [(s.file_name, s.dset_name) for s in theirs.virtual_sources()]
            assert [(s.file_name, s.dset_name) for s in ours.virtual_sources()] == where, name
        elif theirs.chunks is not None and theirs.chunks[0] == 1 and theirs.ndim > 1:
            assert stored_chunks(ours) == stored_chunks(theirs), name


def stored_chunks(ds: h5py.Dataset) -> list[tuple[tuple[int, ...], bytes]]:
    """Every chunk's offset and stored (compressed) bytes."""
    offsets = [ds.id.get_chunk_info(i).chunk_offset for i in range(ds.id.get_num_chunks())]
    return [(offset, ds.id.read_direct_chunk(offset)[1]) for offset in offsets]


def test_mixed_compressors_are_recorded(make: Make, whole: Path, tmp_path: Path, monkeypatch) -> None:
    """Shards compressed with ISA-L and with the zlib fallback (where isal does not import): the merged
    file names both, in shard order, and a shard from before the attribute as unrecorded."""
    isal = pytest.importorskip("isal")
    from fmap_cli.store import chunks

    parts = {k: make(f"s{k}.h5", (k, 3)) for k in (0, 2)}
    monkeypatch.setattr(chunks, "deflater", chunks.zlib_deflater)
    parts[1] = make("s1.h5", (1, 3))
    fast, fallback = f"isal {isal.__version__} level 1", f"zlib {zlib.ZLIB_RUNTIME_VERSION} level 1"

    def merged(name: str, virtual: bool = False) -> str | None:
        out = merge_shards([parts[2], parts[1], parts[0]], parts[0].with_name(name), virtual=virtual).out
        with h5py.File(out, "r") as f, h5py.File(whole, "r") as g:
            for layer in LAYERS:
                for role in ROLES:
                    np.testing.assert_array_equal(f[f"layers/{layer}/{role}"][...], g[f"layers/{layer}/{role}"][...])
            return f.attrs.get("compressor")

    assert merged("all.h5") == merged("virtual.h5", virtual=True) == f"{fast}, {fallback}"
    for k in (1, 0, 2):  # files written before the attribute; the last leaves none
        with h5py.File(parts[k], "r+") as f:
            del f.attrs["compressor"]
        if k == 1:
            assert merged("unrecorded.h5") == f"{fast}, unrecorded (zlib)"
    assert merged("none.h5") is None


READ_LIMITED = """
import resource, sys

import h5py
import numpy as np

from fmap_cli.errors import FmapFileError
from fmap_cli.store.reader import open_fmap

path = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (32, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
with h5py.File(path, "r") as f:  # HDF5 alone: the shards past the limit silently read as NaN
    print(np.isnan(f["layers/conv1/activation"][...]).any())
with open_fmap(path) as f:  # fmap raises its soft limit to fit every shard
    print(np.isnan(f["layers/conv1/activation"][...]).any())
resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
try:
    with open_fmap(path):
        pass
except FmapFileError as exc:
    print(exc)
"""


def test_virtual_file_over_more_shards_than_a_process_may_open(many: list[Path]) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < MANY + SPARE_FILES:
        pytest.skip(f"the hard open-file limit ({hard}) is below what this test raises the soft one to")
    out = merge_shards(many, many[0].parent.parent / "read.h5", virtual=True).out
    done = subprocess.run([sys.executable, "-c", READ_LIMITED, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "True",
        "False",
        f"{out}: virtual file over {MANY} shard files, more than this process may open at once (ulimit -n 32); "
        "their images would read as NaN (raise the limit, or merge without --virtual)",
    ]
