"""The file format contract (schema.SCHEMA), read back with plain h5py, xarray and a bare subprocess."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES, extract_options, make_photo
from helpers import stop_after

from fmap_cli.cli import cli
from fmap_cli.errors import StoppedError
from fmap_cli.extract import extract
from fmap_cli.store import schema
from fmap_cli.store.layout import create_dataset, file_kind, set_attrs
from fmap_cli.store.schema import SCHEMA, SCHEMA_VERSION, Attr

MIB = 1 << 20
ALL_LAYERS = ["conv1", "pool1", "conv2"]


def run(images: list[Path], out: Path, **kwargs) -> Path:
    kwargs.setdefault("device", "cpu")
    extract(extract_options([str(p) for p in images], out=out, **kwargs))
    return out


@pytest.fixture
def full_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> Path:
    """Every layer (incl. pool1, which has no nonlinearity), with /input."""
    return run(images, tmp_path / "full.h5", model=str(tiny_model), layers=ALL_LAYERS, save_input=True)


@pytest.fixture
def default_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> Path:
    """Default layers, no /input."""
    return run(images, tmp_path / "default.h5", model=str(tiny_model))


# ---------------------------------------------------------------------------- attribute types


def is_str(value: object) -> bool:
    return isinstance(value, str)


def check_attr(attr: Attr, value: object, where: str) -> None:
    """Check one attribute value against the dtype SCHEMA documents for it."""
    kind = attr.dtype
    msg = f"{where}@{attr.name}: {value!r} is not {kind}"
    if kind == "str":
        assert is_str(value), msg
    elif kind == "str (JSON)":
        assert is_str(value), msg
        json.loads(value)  # type: ignore[arg-type]
    elif kind == "str[]":
        arr = np.asarray(value)
        assert arr.ndim == 1 and arr.size > 0 and all(is_str(v) for v in arr), msg
    elif kind in ("int8", "int64"):
        assert isinstance(value, np.integer) and np.asarray(value).dtype == np.dtype(kind), msg
        assert np.asarray(value).ndim == 0, msg
    elif kind.endswith("]"):  # int64[], int64[2], float64[2]
        base, length = kind[:-1].split("[")
        arr = np.asarray(value)
        assert isinstance(value, np.ndarray) and arr.dtype == np.dtype(base) and arr.ndim == 1, msg
        if length:
            assert arr.shape == (int(length),), msg
    else:
        raise AssertionError(f"test does not know schema dtype {kind!r} ({where}@{attr.name}); extend check_attr")


def expand(path: str, layers: list[str]) -> list[str]:
    return [path.replace("{layer}", name) for name in layers] if "{layer}" in path else [path]


@pytest.mark.parametrize("which", ["full_file", "default_file"])
def test_every_schema_node_and_attribute_is_present_with_its_dtype(which: str, request) -> None:
    path: Path = request.getfixturevalue(which)
    with h5py.File(path, "r") as f:
        stored = list(f.attrs["layers"])
        assert stored == (ALL_LAYERS if which == "full_file" else ["conv1", "conv2"])
        assert sorted(f["layers"]) == sorted(stored)
        n = int(f.attrs["n_images"])
        assert n == 3
        checked = 0
        for node in SCHEMA:
            for name in expand(node.path, stored):
                layer_group = f[name.rsplit("/", 1)[0]] if node.path.endswith("/activation") else None
                if not node.required:
                    if name in ("/input", "/C", "/H", "/W"):  # the input tensor and its scales
                        assert (name in f) == (which == "full_file"), name
                    elif node.path.endswith("/activation"):
                        assert (name in f) == bool(layer_group.attrs["has_activation"]), name
                    elif node.path.endswith("/preactivation"):  # absent only with --store a
                        assert name in f, name
                    if name not in f:
                        continue
                assert name in f, f"missing {name}"
                obj = f[name]
                if node.kind == "group":
                    assert isinstance(obj, h5py.Group), name
                else:
                    assert isinstance(obj, h5py.Dataset), name
                    if node.shape.startswith("(N, ...)"):  # a map: as many axes as it names
                        assert obj.ndim == len(obj.attrs["axes"].split(",")), (name, obj.shape, obj.attrs["axes"])
                    else:
                        ndim = len([part for part in node.shape.strip("()").split(",") if part.strip()])
                        assert obj.ndim == ndim, (name, obj.shape, node.shape)
                    if node.shape.startswith("(N"):
                        assert obj.shape[0] == n, (name, obj.shape, node.shape)
                    if node.dtype == "str":
                        assert h5py.check_string_dtype(obj.dtype) is not None, name
                        assert all(is_str(v) for v in obj.asstr()[...]), name
                    else:
                        assert obj.dtype in [np.dtype(t) for t in node.dtype.split("|")], (name, obj.dtype)
                for attr in node.attrs:
                    if attr.name not in obj.attrs:
                        assert not attr.required, f"{name}: missing required attribute {attr.name}"
                        continue
                    check_attr(attr, obj.attrs[attr.name], name)
                    checked += 1
        assert checked > 40


def test_root_attribute_values(full_file: Path, tiny_model: Path) -> None:
    with h5py.File(full_file, "r") as f:
        attrs = f.attrs
        assert attrs["complete"] == 1 and attrs["complete"].dtype == np.int8
        assert attrs["fmap_schema_version"] == SCHEMA_VERSION == 3
        assert isinstance(attrs["fmap_schema_version"], np.integer)
        created = datetime.fromisoformat(attrs["created"])
        assert created.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - created) < timedelta(minutes=10)
        spec = json.loads(attrs["model_spec"])
        assert [layer["name"] for layer in spec["layers"]] == ALL_LAYERS
        assert spec["model"]["name"] == attrs["model_name"] == "tiny"
        prep = json.loads(attrs["preprocessing"])
        normalize = [step for step in prep["steps"] if step["step"] == "normalize"]
        assert normalize == [{"step": "normalize", "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}]
        for name in ALL_LAYERS:
            hyper = json.loads(f["layers"][name].attrs["hyperparameters"])
            assert hyper["kernel_size"] == ([3, 3] if name.startswith("conv") else [2, 2])
        glossary = attrs["glossary"].lower()
        for phrase in ("feature map", "activation map", "pre-activation"):
            assert phrase in glossary
        assert attrs["weights_sha256"] == hashlib.sha256(tiny_model.with_suffix(".npz").read_bytes()).hexdigest()
        assert attrs["n_images"] == 3 and attrs["device"] == "cpu"


def test_preactivation_and_activation_attributes(full_file: Path) -> None:
    with h5py.File(full_file, "r") as f:
        for name in ("conv1", "conv2"):
            group = f["layers"][name]
            z, a = group["preactivation"], group["activation"]
            assert (z.attrs["role"], z.attrs["symbol"]) == ("preactivation", "z")
            assert (a.attrs["role"], a.attrs["symbol"]) == ("activation", "a")
            assert a.attrs["nonlinearity"] == "relu" == group.attrs["nonlinearity"]
            assert "rectified feature map" in a.attrs["also_known_as"]
            assert group.attrs["has_activation"] == 1 and group.attrs["has_activation"].dtype == np.int8
            assert "note" not in group.attrs
            for ds in (z, a):
                assert ds.dtype == np.float32
                assert ds.ndim == 4 and ds.shape[0] == 3
                assert tuple(ds.shape[1:]) == tuple(group.attrs["output_shape"].tolist())
                assert ds.attrs["description"] and ds.attrs["long_name"]


def test_layer_without_nonlinearity_has_no_activation(full_file: Path) -> None:
    with h5py.File(full_file, "r") as f:
        pool = f["layers/pool1"]
        assert "preactivation" in pool
        assert "activation" not in pool
        assert pool.attrs["has_activation"] == 0 and pool.attrs["has_activation"].dtype == np.int8
        assert pool.attrs["nonlinearity"] == "none"
        assert "activation" in pool.attrs["note"]
        assert pool["preactivation"].attrs["role"] == "preactivation"


# ---------------------------------------------------------------------------- dimensions, xarray


def map_datasets(f: h5py.File) -> list[h5py.Dataset]:
    found = [f["layers"][name][role] for name in f["layers"] for role in ("preactivation", "activation")
             if role in f["layers"][name]]  # fmt: skip
    return found


def test_dimension_labels_and_scales(full_file: Path) -> None:
    with h5py.File(full_file, "r") as f:
        maps = map_datasets(f)
        assert len(maps) == 5
        for ds in maps:
            assert tuple(d.label for d in ds.dims) == ("N", "C", "H", "W"), ds.name
            group = ds.parent
            for axis, scale_name in enumerate(("N", "C", "H", "W")):
                assert len(ds.dims[axis]) == 1, (ds.name, scale_name)
                scale = ds.dims[axis][0]
                expected = f["N"] if scale_name == "N" else group[scale_name]
                assert scale == expected, (ds.name, scale_name)
                assert scale[...].tolist() == list(range(ds.shape[axis]))
        assert tuple(d.label for d in f["input"].dims) == ("N", "C", "H", "W")
        assert f["images/path"].dims[0].label == "N"


@pytest.mark.parametrize("save_input", [False, True], ids=["without-input", "with-input"])
def test_xarray_reads_named_dims(tiny_model: Path, images: list[Path], tmp_path: Path, save_input: bool) -> None:
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    out = run(images, tmp_path / "x.h5", model=str(tiny_model), save_input=save_input)
    with h5py.File(out, "r") as f:
        shape = f["layers/conv1/preactivation"].shape
        z = f["layers/conv1/preactivation"][...]
    with xr.open_dataset(out, group="layers/conv1", engine="h5netcdf") as ds:
        assert {"preactivation", "activation"} <= set(ds.data_vars)
        for var in ("preactivation", "activation"):
            assert ds[var].dims == ("N", "C", "H", "W")
        assert dict(ds.sizes) == dict(zip(("N", "C", "H", "W"), shape, strict=True))
        assert np.array_equal(ds["preactivation"].values, z)


# ---------------------------------------------------------------------------- storage


def check_chunks(ds: h5py.Dataset) -> None:
    assert ds.chunks is not None, ds.name
    assert ds.chunks[0] == 1, (ds.name, ds.chunks)
    assert int(np.prod(ds.chunks)) * ds.dtype.itemsize <= MIB, (ds.name, ds.chunks)


def test_chunking_and_compression(tmp_path: Path) -> None:
    # the edges model at 224: conv1 is 16x112x112 float32 = 784 KiB per image, pool1/conv2 196 KiB
    out = run([SAMPLES / "cat.jpg", SAMPLES / "coffee.png"], tmp_path / "e.h5", layers=ALL_LAYERS, save_input=True)
    with h5py.File(out, "r") as f:
        for ds in [*map_datasets(f), f["input"]]:
            check_chunks(ds)
        for ds in map_datasets(f):
            if ds.attrs["role"] == "activation":
                assert ds.compression == "gzip" and ds.compression_opts == 1, ds.name
                assert ds.shuffle is False, ds.name
            else:
                assert ds.compression is None, ds.name
                assert not ds.shuffle
        assert f["layers/conv1/activation"].chunks == (1, 16, 112, 112)


def test_chunks_stay_under_1_mib_when_one_channel_is_larger(tiny_model: Path, tmp_path: Path) -> None:
    """README: 'chunks of one image x a block of channels (at most 1 MiB)'. At 600x600 a single
    float32 channel is 1.4 MiB, so a chunk must also split H (or W) to keep that promise."""
    image = tmp_path / "big.png"
    make_photo(600, 600, seed=3).save(image)
    out = run([image], tmp_path / "big.h5", model=str(tiny_model), size=(600, 600), layers=ALL_LAYERS, save_input=True)
    with h5py.File(out, "r") as f:
        for ds in [*map_datasets(f), f["input"]]:
            check_chunks(ds)


# ---------------------------------------------------------------------------- images


def test_image_records_round_trip(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    unicode_dir = tmp_path / "données"
    unicode_dir.mkdir()
    odd = unicode_dir / "straße_猫.png"
    make_photo(33, 21, seed=7).save(odd)
    given = [str(images[0]), str(odd), str(images[1]), str(images[2])]
    out = run([Path(p) for p in given], tmp_path / "img.h5", model=str(tiny_model))
    with h5py.File(out, "r") as f:
        assert f["images/path"].asstr()[...].tolist() == given
        assert f["images/original_size"][...].tolist() == [[30, 40], [33, 21], [48, 36], [25, 25]]
        stored = f["images/sha256"].asstr()[...].tolist()
        assert stored == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in given]
        assert f["N"][...].tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------------- documentation of the schema


def test_schema_command_lists_every_node_and_attribute() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"version {SCHEMA_VERSION}" in text
    for node in SCHEMA:
        assert f"{node.path}  [" in text, node.path
        for attr in node.attrs:
            assert f"@{attr.name} (" in text, attr.name


def test_schema_json_lists_every_node_with_types() -> None:
    result = CliRunner().invoke(cli, ["schema", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["fmap_schema_version"] == SCHEMA_VERSION
    assert printed["readable_versions"] == [1, 2, 3]
    assert list(printed["kinds"]) == list(schema.KINDS)
    maps = printed["kinds"]["maps"]
    assert [node["path"] for node in maps] == [node.path for node in SCHEMA]
    by_path = {node["path"]: node for node in maps}
    assert by_path["/layers/{layer}/stats/image_argmax"] == {
        "path": "/layers/{layer}/stats/image_argmax",
        "kind": "dataset",
        "dtype": "int32",
        "shape": "(N, C, 2)",
        "required": True,
        "description": "Per image and channel: (row, col) of image_max in the channel's map (the first, row-major): "
        "along H and W whatever their order among the axes; for maps with one axis besides the channels (T, L), "
        "(index, 0); for flat maps (0, 0). int64 in schema version 1.",
        "attributes": [],
    }
    storage = next(a for a in by_path["/"]["attributes"] if a["name"] == "storage")
    assert storage["dtype"] == "str (JSON)" and storage["required"] is True


# ---------------------------------------------------------------------------- the reverse contract


def undocumented(path: Path) -> list[str]:
    """Every group, dataset and attribute in ``path`` that the schema of its kind does not document."""
    found: list[str] = []

    def check(name: str, obj: h5py.HLObject) -> None:
        where = "/" + name if name else "/"
        try:
            schema.node_for(where, kind)
        except schema.SchemaError:
            found.append(where)
            return
        for key in obj.attrs:
            if key in schema.HDF5_DIMENSION_ATTRS and isinstance(obj, h5py.Dataset):
                continue
            try:
                schema.attr_for(where, key, kind)
            except schema.SchemaError:
                found.append(f"{where}@{key}")

    with h5py.File(path, "r") as f:
        kind = file_kind(f)
        check("", f)
        f.visititems(check)
    return found


def cli_ok(*args: str, code: int = 0) -> None:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output


def test_every_written_node_and_attribute_is_documented(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    """Files from extract (all options that add nodes), --append, --resume, merge (copy and virtual)."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [str(p) for p in images]
    model = ["--model", str(tiny_model), "--device", "cpu"]
    made = {}
    made["full"] = tmp_path / "full.h5"
    cli_ok("extract", *paths, str(bad), *model, "--layers", "conv1,pool1,conv2", "--save-input", "--skip-bad",
           "-o", str(made["full"]), code=1)  # fmt: skip
    made["a_only"] = tmp_path / "a_only.h5"
    cli_ok("extract", *paths, *model, "--store", "a", "--dtype", "float16", "-o", str(made["a_only"]))
    made["appended"] = tmp_path / "appended.h5"
    cli_ok("extract", paths[0], *model, "-o", str(made["appended"]))
    cli_ok("extract", *paths[1:], *model, "-o", str(made["appended"]), "--append")
    made["resumed"] = tmp_path / "resumed.h5"
    stop, progress = stop_after(1)
    with pytest.raises(StoppedError):  # stopped after its first batch: its temporary file is kept
        extract(extract_options(paths, made["resumed"], model=str(tiny_model), device="cpu", batch_size=1),
                stop_requested=stop, progress=progress)  # fmt: skip
    cli_ok("extract", *paths, *model, "-b", "1", "-o", str(made["resumed"]), "--resume")
    shards = [tmp_path / f"shard_{k}.h5" for k in range(2)]
    for k, shard in enumerate(shards):
        cli_ok("extract", *paths, *model, "--shard", f"{k}/2", "-o", str(shard))
    made["merged"], made["virtual"] = tmp_path / "merged.h5", tmp_path / "virtual.h5"
    cli_ok("merge", *map(str, shards), "-o", str(made["merged"]))
    cli_ok("merge", *map(str, shards), "-o", str(made["virtual"]), "--virtual")
    made["occlusion"] = tmp_path / "occlusion.h5"
    cli_ok("occlude", *paths, str(bad), *model, "--layer", "conv2", "--channel", "all", "--patch", "8",
           "--save-input", "--skip-bad", "-o", str(made["occlusion"]), code=1)  # fmt: skip
    made["projection"] = tmp_path / "projection.h5"
    cli_ok("project", str(made["full"]), "--layer", "conv2", "--channel", "1", "--device", "cpu",
           "-o", str(made["projection"]))  # fmt: skip
    with h5py.File(made["resumed"], "r") as f:
        assert int(f.attrs["n_images"]) == 3 and "append_base" not in f.attrs
    for kind, path in {**made, "shard": shards[0]}.items():
        assert undocumented(path) == [], kind


def test_writing_an_undocumented_attribute_is_refused(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "x.h5", "w") as f:
        with pytest.raises(schema.SchemaError, match=r"^attribute 'colour' of / is not in the fmap schema$"):
            set_attrs(f, colour="blue")
        with pytest.raises(schema.SchemaError, match=r"^/extra is not in the fmap schema$"):
            create_dataset(f, "extra", data=[1])
        assert list(f.attrs) == [] and list(f) == []


# ---------------------------------------------------------------------------- a reader without fmap

READER = textwrap.dedent(
    """
    import sys
    import h5py
    import numpy as np

    path = sys.argv[1]
    with h5py.File(path, "r") as f:
        assert int(f.attrs["complete"]) == 1
        pairs = 0
        for name, group in f["layers"].items():
            by_symbol = {}
            for ds in group.values():
                if isinstance(ds, h5py.Dataset) and "symbol" in ds.attrs:
                    by_symbol[ds.attrs["symbol"]] = ds
            z = by_symbol["z"]
            assert z.attrs["role"] == "preactivation", name
            if "a" in by_symbol:
                a = by_symbol["a"]
                assert a.attrs["role"] == "activation" and a.attrs["nonlinearity"] == "relu", name
                zv, av = z[...], a[...]
                assert (zv < 0).any() and not (av < 0).any(), name
                assert np.array_equal(av, np.maximum(zv, 0)), name
                pairs += 1
        print("pairs", pairs)
    assert "fmap_cli" not in sys.modules, sorted(m for m in sys.modules if m.startswith("fmap"))
    assert "torch" not in sys.modules
    """
)


def test_plain_h5py_reader_in_a_subprocess(full_file: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", READER, str(full_file)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pairs 2"
