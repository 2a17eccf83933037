"""store/reader.py: what every reader (inspect, render, merge) refuses before reading any data, with
one line and exit 1: attributes of the wrong type, unreadable schema versions, row counts other
than n_images, unsafe virtual datasets (which crash HDF5), external links, and non-regular files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import REPO, TINY_SPEC, make_photo, tiny_weights
from h5py import h5d, h5p, h5s, h5t
from helpers import error_line

from fmap_cli.cli import cli
from fmap_cli.errors import FmapFileError
from fmap_cli.store import schema
from fmap_cli.store.reader import open_fmap, printable

MAP = "layers/conv2/activation"  # what inspect --hist and render --layer conv2 read


def fmap(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result: Result, message: str, code: int = 1) -> None:
    """One line on stderr, nothing on stdout, the exit code."""
    assert (result.exit_code, result.stdout, result.stderr) == (code, "", f"Error: {message}\n")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file written by ``fmap extract`` from three tiny images (read only: tests copy it)."""
    root = tmp_path_factory.mktemp("extracted")
    (root / "tiny.toml").write_text(TINY_SPEC)
    np.savez(root / "tiny.npz", **tiny_weights())
    photos = []
    for i in range(3):
        photos.append(root / f"img{i}.png")
        make_photo(20 + i, 24, seed=i).save(photos[-1])
    out = root / "maps.h5"
    result = fmap("extract", *photos, "-m", root / "tiny.toml", "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def good(extracted: Path, tmp_path: Path) -> Path:
    """This test's own copy of the extracted file, in tmp_path/files."""
    (tmp_path / "files").mkdir()
    return Path(shutil.copy(extracted, tmp_path / "files" / "good.h5"))


def copy_with(source: Path, name: str, **attrs: object) -> Path:
    """A copy of ``source`` beside it with root attributes set (None: deleted)."""
    copy = Path(shutil.copy(source, source.with_name(name)))
    with h5py.File(copy, "r+") as f:
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value
    return copy


# ---------------------------------------------------------------------------- root attributes

NAN = np.float64("nan")


@pytest.mark.parametrize(
    ("attr", "value", "says"),
    [
        ("complete", "yes", "'yes', not 0 or 1"),
        ("complete", np.array([1, 1], dtype=np.int8), "[1, 1], not 0 or 1"),
        ("complete", NAN, "nan, not 0 or 1"),
        ("complete", np.int8(2), "2, not 0 or 1"),
        ("virtual", "no", "'no', not 0 or 1"),
        ("virtual", np.arange(6), "[0, 1, 2, 3, ...], not 0 or 1"),
        ("virtual", NAN, "nan, not 0 or 1"),
        ("n_images", "3", "'3', not a count of images (an integer >= 0)"),
        ("n_images", np.int64(-1), "-1, not a count of images (an integer >= 0)"),
        ("n_images", np.float64(3.0), "3.0, not a count of images (an integer >= 0)"),
        ("fmap_schema_version", "2", "'2', not an integer"),
        ("fmap_schema_version", np.float64(1.0), "1.0, not an integer"),
        ("fmap_schema_version", np.array([1, 2]), "[1, 2], not an integer"),
    ],
)
def test_attribute_of_the_wrong_type(good: Path, attr: str, value: object, says: str) -> None:
    bad = copy_with(good, "bad.h5", **{attr: value})
    assert_refused(fmap("inspect", bad), f"{bad}: damaged fmap file: attribute '{attr}' is {says}")


def test_attribute_shown_escaped_and_short(good: Path) -> None:
    value = "\x1b]0;pwned\x07" + "x" * 100
    bad = copy_with(good, "bad.h5", complete=value)
    shown = repr(value)[:57] + "..."  # repr escapes the control characters
    assert_refused(fmap("inspect", bad), f"{bad}: damaged fmap file: attribute 'complete' is {shown}, not 0 or 1")


def test_missing_n_images(good: Path) -> None:
    bad = copy_with(good, "bad.h5", n_images=None)
    assert_refused(fmap("inspect", bad), f"{bad}: damaged fmap file: no attribute 'n_images'")


def test_every_readable_version_opens(good: Path) -> None:
    assert schema.SCHEMA_VERSION in schema.READABLE_VERSIONS
    for version in schema.READABLE_VERSIONS:
        ok = copy_with(good, f"v{version}.h5", fmap_schema_version=np.int64(version))
        assert fmap("inspect", ok).exit_code == 0


def test_unreadable_versions(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readable = ", ".join(str(v) for v in schema.READABLE_VERSIONS)
    newer = copy_with(good, "newer.h5", fmap_schema_version=np.int64(max(schema.READABLE_VERSIONS) + 1))
    assert_refused(
        fmap("inspect", newer),
        f"{newer}: schema version {max(schema.READABLE_VERSIONS) + 1} is newer than this fmap reads ({readable}); "
        "upgrade fmap",
    )
    older = copy_with(good, "older.h5", fmap_schema_version=np.int64(min(schema.READABLE_VERSIONS) - 1))
    assert_refused(
        fmap("inspect", older),
        f"{older}: schema version {min(schema.READABLE_VERSIONS) - 1} is older than any this fmap reads "
        f"({readable}); read it with the fmap that wrote it, or extract the images again",
    )
    monkeypatch.setattr(schema, "READABLE_VERSIONS", (1, 3))
    gap = copy_with(good, "gap.h5", fmap_schema_version=np.int64(2))
    assert_refused(fmap("inspect", gap), f"{gap}: schema version 2 is not one this fmap reads (1, 3)")


# ---------------------------------------------------------------------------- files inspect cannot read


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_incomplete(good: Path, as_json: bool) -> None:
    bad = copy_with(good, "incomplete.h5", complete=np.int8(0))
    line = error_line(fmap("inspect", bad, *(["--json"] if as_json else [])), 1)
    assert line == (
        f"Error: {bad}: incomplete file (complete=0): the run writing it did not finish; rerun that command "
        "(with --resume, or --append if it was appending)"
    )


def test_inspect_newer_schema(good: Path) -> None:
    bad = copy_with(good, "newer.h5", fmap_schema_version=np.int64(99))
    readable = ", ".join(str(v) for v in schema.READABLE_VERSIONS)
    line = error_line(fmap("inspect", bad), 1)
    assert line == f"Error: {bad}: schema version 99 is newer than this fmap reads ({readable}); upgrade fmap"


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_inspect_truncated(good: Path, fraction: float) -> None:
    bad = good.with_name("truncated.h5")
    data = good.read_bytes()
    bad.write_bytes(data[: int(len(data) * fraction)])
    assert error_line(fmap("inspect", bad), 1) == f"Error: {bad}: not an HDF5 file (or it is corrupt)"


def test_inspect_not_hdf5_and_missing(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    assert error_line(fmap("inspect", text), 1) == f"Error: {text}: not an HDF5 file (or it is corrupt)"
    missing = tmp_path / "missing.h5"
    assert error_line(fmap("inspect", missing), 1) == f"Error: {missing}: no such file"


def test_inspect_hdf5_not_from_fmap(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    line = error_line(fmap("inspect", other), 1)
    assert line == f"Error: {other}: an HDF5 file, but not written by fmap (no fmap_schema_version)"


def test_inspect_damaged_structure(good: Path) -> None:
    bad = good.with_name("damaged.h5")
    shutil.copy(good, bad)
    with h5py.File(bad, "r+") as f:
        del f["images/original_size"]
    line = error_line(fmap("inspect", bad), 1)
    assert line.startswith(f"Error: {bad}: damaged fmap file: ")  # then h5py's words
    assert "original_size" in line


# ---------------------------------------------------------------------------- rows along N


def _replace(path: Path, name: str, rows: int) -> None:
    """Give dataset ``name`` ``rows`` rows (of its own first row)."""
    with h5py.File(path, "r+") as f:
        old = f[name][...]
        del f[name]
        f[name] = np.repeat(old[:1], rows, axis=0)


@pytest.mark.parametrize(
    ("n_images", "dataset", "rows", "says"),
    [
        (2, None, 0, "n_images is 2 but /N has length 3"),
        (4, None, 0, "n_images is 4 but /N has length 3"),
        (None, "images/sha256", 4, "n_images is 3 but /images/sha256 has length 4"),
        (None, "images/path", 2, "n_images is 3 but /images/path has length 2"),
        (None, MAP, 2, f"n_images is 3 but /{MAP} has length 2"),
        (None, "layers/conv1/stats/image_max", 5, "n_images is 3 but /layers/conv1/stats/image_max has length 5"),
    ],
)
def test_n_images_must_match_the_rows(
    good: Path, n_images: int | None, dataset: str | None, rows: int, says: str
) -> None:
    bad = copy_with(good, "bad.h5", **({} if n_images is None else {"n_images": np.int64(n_images)}))
    if dataset is not None:
        _replace(bad, dataset, rows)
    message = f"{bad}: damaged fmap file: {says}"
    assert_refused(fmap("inspect", bad), message)
    assert_refused(fmap("render", bad, "--layer", "conv2", "-o", bad.with_suffix(".png")), message)
    with pytest.raises(FmapFileError, match="has length"), open_fmap(bad):
        pass


def test_missing_required_dataset(good: Path) -> None:
    bad = copy_with(good, "bad.h5")
    with h5py.File(bad, "r+") as f:
        del f["N"]
    assert_refused(fmap("inspect", bad), f"{bad}: damaged fmap file: /N is missing or not a dataset")


# ---------------------------------------------------------------------------- virtual datasets


def make_virtual(path: Path, source: str, marked: bool = True, dataset: str = MAP) -> Path:
    """Turn ``dataset`` of ``path`` into a virtual dataset over ``source``'s ``dataset``."""
    with h5py.File(path, "r+") as f:
        shape, dtype = f[dataset].shape, f[dataset].dtype
        del f[dataset]
        layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
        layout[...] = h5py.VirtualSource(source, dataset, shape=shape)
        f.create_virtual_dataset(dataset, layout, fillvalue=np.nan)
        if marked:
            f.attrs["virtual"] = np.int8(1)
    return path


def commands(bad: Path) -> list[list[str]]:
    """Every reader of ``bad``: inspect, inspect --hist, render, merge."""
    out = bad.parent / "out"
    return [
        ["inspect", str(bad)],
        ["inspect", str(bad), "--hist"],
        ["render", str(bad), "--layer", "conv2", "-o", f"{out}.png"],
        ["merge", str(bad), "-o", f"{out}.h5"],
    ]


RUN_ALL = """
import json, sys
from click.testing import CliRunner
from fmap_cli.cli import cli
results = [CliRunner().invoke(cli, args) for args in json.loads(sys.argv[1])]
print(json.dumps([[r.exit_code, r.stdout, r.stderr] for r in results]))
"""


def run_isolated(bad: Path) -> list[tuple[int, str, str]]:
    """Every reader of ``bad``, in a child process: a crash in HDF5 fails the test, not pytest."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_ALL, json.dumps(commands(bad))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"crashed (exit {done.returncode}):\n{done.stderr[-2000:]}"
    return [tuple(r) for r in json.loads(done.stdout)]


@pytest.mark.parametrize(
    ("source", "says"),
    [
        (".", "reads from '.', the file itself"),
        ("self.h5", "reads from 'self.h5', the file itself"),
        ("./self.h5", "reads from './self.h5', the file itself"),
    ],
)
def test_virtual_dataset_reading_its_own_file_is_refused(good: Path, source: str, says: str) -> None:
    bad = make_virtual(good.rename(good.with_name("self.h5")), source)
    expected = (1, "", f"Error: {bad}: damaged fmap file: virtual dataset /{MAP} {says}; refused\n")
    assert run_isolated(bad) == [expected] * 4
    assert not list(bad.parent.glob("out*"))


def test_virtual_datasets_reading_each_other_are_refused(good: Path) -> None:
    a = make_virtual(good.rename(good.with_name("a.h5")), "b.h5")
    b = make_virtual(Path(shutil.copy(a, a.with_name("b.h5"))), "a.h5")
    for bad, other in ((a, "b.h5"), (b, "a.h5")):
        expected = (
            1,
            "",
            f"Error: {bad}: damaged fmap file: virtual dataset /{MAP} reads from '{other}', "
            f"whose {MAP} is itself a virtual dataset; refused\n",
        )
        assert run_isolated(bad) == [expected] * 4


def _outside(tmp_path: Path) -> str:
    other = tmp_path / "elsewhere.h5"
    shutil.copy(tmp_path / "files" / "good.h5", other)
    return str(other)


@pytest.mark.parametrize(
    ("source", "says"),
    [
        (_outside, "outside the file's directory"),
        (lambda tmp_path: "../elsewhere.h5", "outside the file's directory"),
        (lambda tmp_path: "sub/../../elsewhere.h5", "outside the file's directory"),
        (lambda tmp_path: "shard\x1b[2J.h5", "a name with control characters"),
    ],
)
def test_virtual_source_outside_the_directory_is_refused(good: Path, tmp_path: Path, source, says: str) -> None:
    name = source(tmp_path)
    bad = make_virtual(copy_with(good, "bad.h5"), name)
    shown = repr(name)  # control characters escaped, as in the message
    for args in commands(bad):
        assert_refused(
            fmap(*args), f"{bad}: damaged fmap file: virtual dataset /{MAP} reads from {shown}, {says}; refused"
        )
    assert not list(bad.parent.glob("out*"))


def test_virtual_source_that_is_a_fifo_is_refused(good: Path) -> None:
    os.mkfifo(good.with_name("fifo.h5"))
    bad = make_virtual(copy_with(good, "bad.h5"), "fifo.h5")
    for args in commands(bad):
        assert_refused(
            fmap(*args),
            f"{bad}: damaged fmap file: virtual dataset /{MAP} reads from 'fifo.h5', "
            "not a regular file (a FIFO); refused",
        )


def test_virtual_dataset_with_a_file_name_pattern_is_refused(good: Path) -> None:
    """A printf-style source name ('%b': one file per block) can name the file itself (here '0')."""
    bad = copy_with(good, "0")
    with h5py.File(bad, "r+") as f:
        del f[MAP]
        shape, unlimited = (3, 5, 4, 5), (h5s.UNLIMITED, 5, 4, 5)
        space = h5s.create_simple(shape, unlimited)  # image k read from the file named "k"
        space.select_hyperslab((0, 0, 0, 0), (h5s.UNLIMITED, 1, 1, 1), block=(1, 5, 4, 5))
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_virtual(space, b"%b", MAP.encode(), h5s.create_simple((1, 5, 4, 5)))
        h5d.create(f.id, MAP.encode(), h5t.NATIVE_FLOAT, h5s.create_simple(shape, unlimited), dcpl)
        f.attrs["virtual"] = np.int8(1)
    expected = (
        1,
        "",
        f"Error: {bad}: damaged fmap file: virtual dataset /{MAP} reads from '%b', "
        "a name pattern (%), which fmap never writes; refused\n",
    )
    assert run_isolated(bad) == [expected] * 4


def test_virtual_dataset_in_a_file_not_marked_virtual_is_refused(good: Path) -> None:
    shutil.copy(good, good.with_name("shard.h5"))  # a harmless source: what is refused is the file
    bad = make_virtual(copy_with(good, "bad.h5"), "shard.h5", marked=False)
    for args in commands(bad):
        assert_refused(
            fmap(*args),
            f"{bad}: damaged fmap file: /{MAP} is a virtual dataset, but the file is not a virtual (merged) file "
            "(no attribute virtual = 1); refused",
        )


def test_virtual_dataset_over_a_sibling_file_is_read(good: Path) -> None:
    shutil.copy(good, good.with_name("shard.h5"))
    fine = make_virtual(copy_with(good, "fine.h5"), "shard.h5")
    result = fmap("inspect", fine, "--hist", "--json")
    assert result.exit_code == 0, result.output
    expected = json.loads(fmap("inspect", good, "--hist", "--json").stdout)
    assert [layer["histogram"] for layer in json.loads(result.stdout)["layers"]] == [
        layer["histogram"] for layer in expected["layers"]
    ]


def test_external_link_is_refused(good: Path) -> None:
    bad = copy_with(good, "bad.h5")
    with h5py.File(bad, "r+") as f:
        f["layers/conv2/extra"] = h5py.ExternalLink("good.h5", "/N")
    for args in commands(bad):
        assert_refused(
            fmap(*args),
            f"{bad}: damaged fmap file: /layers/conv2/extra is an external link to 'good.h5'; "
            "fmap files never hold one (refused)",
        )


def test_external_raw_storage_is_refused(good: Path) -> None:
    # HDF5 would read any file named there: /etc/shadow, or a FIFO (and wait forever)
    good.with_name("raw.bin").write_bytes(bytes(4 * 3 * 5 * 4 * 5))
    bad = copy_with(good, "bad.h5")
    with h5py.File(bad, "r+") as f:
        shape = f[MAP].shape
        del f[MAP]
        f.create_dataset(MAP, shape=shape, dtype=np.float32, external=[("raw.bin", 0, h5py.h5f.UNLIMITED)])
    for args in commands(bad):
        assert_refused(
            fmap(*args),
            f"{bad}: damaged fmap file: /{MAP} keeps its data in the external file 'raw.bin'; "
            "fmap files never do (refused)",
        )


# ---------------------------------------------------------------------------- not a regular file


def test_fifo_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "maps.h5"
    os.mkfifo(fifo)
    message = f"{fifo}: not a regular file (a FIFO)"
    # a child process with a timeout: opening a FIFO for reading would wait for a writer forever
    done = subprocess.run(
        [sys.executable, "-m", "fmap_cli", "inspect", str(fifo)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", f"Error: {message}\n")
    assert_refused(fmap("render", fifo, "--layer", "conv2", "-o", tmp_path / "out.png"), message)
    assert_refused(fmap("merge", fifo, "-o", tmp_path / "out.h5"), message)
    assert_refused(fmap("inspect", tmp_path / "missing.h5"), f"{tmp_path / 'missing.h5'}: no such file")


def test_printable_escapes_c0_del_and_c1() -> None:
    assert printable("a\x1b[2J\x07\x7f\x9b\n\tb\u00e9\u732b") == "a\\x1b[2J\\x07\\x7f\\x9b\\x0a\\x09b\u00e9\u732b"
