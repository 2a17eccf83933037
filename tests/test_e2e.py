"""The installed ``fmap`` console script, run in subprocesses as a user (or a batch job) would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from conftest import SAMPLES

FMAP = Path(sys.executable).parent / "fmap"

pytestmark = pytest.mark.skipif(not FMAP.is_file(), reason=f"console script not installed at {FMAP}")


def fmap(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FMAP), *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd, check=False
    )


@pytest.fixture(scope="module")
def cat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "cat.h5"
    proc = fmap("extract", str(SAMPLES / "cat.jpg"), "--layers", "conv1,conv2", "--device", "cpu", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out}\n"
    assert "wrote 1 image " in proc.stderr
    return out


def test_extract_then_inspect(cat_file: Path) -> None:
    with h5py.File(cat_file, "r") as f:
        assert sorted(f["layers"]) == ["conv1", "conv2"]
        assert f.attrs["complete"] == 1
        assert str(FMAP) in f.attrs["command"] or "fmap" in f.attrs["command"]
    proc = fmap("inspect", str(cat_file))
    assert proc.returncode == 0, proc.stderr
    assert "conv1" in proc.stdout and "conv2" in proc.stdout and "cat.jpg" in proc.stdout
    assert proc.stderr == ""


def test_extract_output_feeds_a_pipeline(tmp_path: Path) -> None:
    """The README's `fmap inspect "$(fmap extract ...)"` idiom, with a relative output path."""
    proc = subprocess.run(
        f'"{FMAP}" inspect --json "$("{FMAP}" extract "{SAMPLES / "astronaut.jpg"}" --device cpu -o rel.h5)"',
        shell=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["path"] == "rel.h5"
    assert (tmp_path / "rel.h5").is_file()


# ---------------------------------------------------------------------------- no torch for inspect / help


@pytest.fixture
def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment where `import torch` raises."""
    poison = tmp_path / "poison"
    (poison / "torch").mkdir(parents=True)
    (poison / "torch" / "__init__.py").write_text('raise ImportError("torch must not be imported")\n')
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(poison), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_poisoned_torch_really_breaks_extract(no_torch_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "never.h5"
    proc = fmap("extract", str(SAMPLES / "cat.jpg"), "-o", str(out), env=no_torch_env)
    assert proc.returncode == 1  # the ImportError escapes: Python's own exit status for it
    assert "torch must not be imported" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--help"], "Usage:"),
        (["--version"], "fmap, version"),
        (["inspect", "--help"], "Usage:"),
        (["extract", "--help"], "--save-input"),
        (["schema"], "/layers/{layer}/activation"),
        (["models"], "edges (default)"),
        (["layers", "--help"], "--model"),  # listing layers runs the model, so it may import torch
    ],
)
def test_commands_that_must_not_import_torch(no_torch_env: dict[str, str], args: list[str], expect: str) -> None:
    proc = fmap(*args, env=no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert expect in proc.stdout
    assert "torch" not in proc.stderr


def test_inspect_does_not_import_torch(no_torch_env: dict[str, str], cat_file: Path) -> None:
    normal = fmap("inspect", str(cat_file))
    proc = fmap("inspect", str(cat_file), env=no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == normal.stdout
    assert "dead channels" in proc.stdout
    proc = fmap("inspect", "--json", str(cat_file), env=no_torch_env)
    assert proc.returncode == 0, proc.stderr
    assert [layer["name"] for layer in json.loads(proc.stdout)["layers"]] == ["conv1", "conv2"]


def test_python_m_fmap_cli_without_torch(no_torch_env: dict[str, str], cat_file: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fmap_cli", "inspect", str(cat_file)],
        capture_output=True,
        text=True,
        env=no_torch_env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "conv2" in proc.stdout


# ---------------------------------------------------------------------------- inspect on files it cannot read


REFUSED = {
    "not-hdf5": "not an HDF5 file (or it is corrupt)",
    "foreign-hdf5": "an HDF5 file, but not written by fmap (no fmap_schema_version)",
    "missing": "no such file",
}


def bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.h5"
    text.write_text("this is not HDF5\n")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = [1, 2, 3]
        f.attrs["title"] = "someone else's file"
    return {"not-hdf5": text, "foreign-hdf5": foreign, "missing": tmp_path / "missing.h5"}


@pytest.mark.parametrize("kind", ["not-hdf5", "foreign-hdf5", "missing"])
def test_inspect_rejects_unreadable_files_in_one_line(tmp_path: Path, kind: str) -> None:
    path = bad_files(tmp_path)[kind]
    proc = fmap("inspect", str(path))
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr == f"Error: {path}: {REFUSED[kind]}\n"
