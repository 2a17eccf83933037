"""The CLI (fmap_cli.cli) through click's CliRunner: help, option parsing, what goes to stdout and
stderr (the output path, --quiet, the progress line), and the happy paths of each command."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import SAMPLES, TINY_SPEC, tiny_weights
from helpers import FMAP, error_line, extract_fails, ok, run_extract, script_env, write_photos

from fmap_cli import __version__
from fmap_cli.cli import cli


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, f"fmap {' '.join(args)} -> {result.exit_code}\n{result.output}"
    assert result.exception is None
    return result


def extract(*args: str) -> Result:
    return invoke("extract", "--device", "cpu", *args)


# ---------------------------------------------------------------------------- help and version


def test_top_level_help_lists_every_command() -> None:
    result = invoke("--help")
    assert "Usage:" in result.stdout
    for name in cli.commands:
        assert name in result.stdout
    assert set(cli.commands) >= {"extract", "inspect", "layers", "models", "schema"}


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_has_help(name: str) -> None:
    command = cli.commands[name]
    assert command.help and command.help.strip()
    result = invoke(name, "--help")
    assert f"Usage: cli {name}" in result.stdout or f"Usage: fmap {name}" in result.stdout
    first_line = command.help.strip().splitlines()[0]
    assert first_line[:40] in " ".join(result.stdout.split())


def test_short_help_option() -> None:
    assert "Usage:" in invoke("-h").stdout


def test_version() -> None:
    result = invoke("--version")
    assert result.stdout.strip() == f"fmap, version {__version__}"


# ---------------------------------------------------------------------------- extract


def test_extract_prints_only_the_path_on_stdout(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "maps.h5"
    result = extract(*map(str, images), "-m", str(tiny_model), "-o", str(out))
    assert result.stdout == f"{out}\n"
    assert "model tiny" in result.stderr and "wrote 3 images" in result.stderr
    assert str(out) not in result.stderr
    assert out.is_file()
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


def test_default_layers_are_those_with_a_nonlinearity(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "d.h5"
    extract(str(images[0]), "-m", str(tiny_model), "-o", str(out))
    with h5py.File(out, "r") as f:
        assert sorted(f["layers"]) == ["conv1", "conv2"]
        assert list(f.attrs["layers"]) == ["conv1", "conv2"]


def test_layers_option_selects_and_orders(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "l.h5"
    extract(str(images[0]), "-m", str(tiny_model), "--layers", "conv2, pool1", "-o", str(out))
    with h5py.File(out, "r") as f:
        assert sorted(f["layers"]) == ["conv2", "pool1"]
        assert list(f.attrs["layers"]) == ["pool1", "conv2"]  # forward order, not the order asked


def test_layers_option_repeated_adds_up(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    """-l conv1 -l conv2 stores both (click kept only the last one: conv2 alone, silently)."""
    out = tmp_path / "l.h5"
    extract(str(images[0]), "-m", str(tiny_model), "-l", "conv2", "--layers", "pool1,conv2", "-o", str(out))
    with h5py.File(out, "r") as f:
        assert list(f.attrs["layers"]) == ["pool1", "conv2"]
    result = invoke("layers", "-m", str(tiny_model), "-l", "conv1", "-l", "pool1")
    assert [line.split()[0] for line in result.output.splitlines()[1:] if line.strip()] == ["conv1", "pool1"]


def test_overwrite_replaces_existing_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    extract(str(images[0]), "-m", str(tiny_model), "-o", str(out))
    with h5py.File(out, "r") as f:
        assert f.attrs["n_images"] == 1
    extract(*map(str, images), "-m", str(tiny_model), "-o", str(out), "--overwrite", "--layers", "conv1")
    with h5py.File(out, "r") as f:
        assert f.attrs["n_images"] == 3
        assert f["images/path"].asstr()[...].tolist() == [str(p) for p in images]
        assert sorted(f["layers"]) == ["conv1"]


def test_size_changes_input_shape(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    extract(*map(str, images[:2]), "-m", str(tiny_model), "--size", "16,20", "--save-input", "-o", str(out))
    with h5py.File(out, "r") as f:
        assert f["input"].shape == (2, 3, 16, 20)
        assert f["layers/conv1/preactivation"].shape == (2, 4, 16, 20)
        assert f["layers/conv2/preactivation"].shape == (2, 5, 3, 4)  # pool -> 8x10, 3x3 stride 2 -> 3x4
        assert json.loads(f.attrs["preprocessing"])["input_size"] == [16, 20]


# ---------------------------------------------------------------------------- models and layers


def test_models_lists_edges_as_default() -> None:
    result = invoke("models")
    first = result.stdout.splitlines()[0]
    assert first.startswith("edges (default)")
    assert "conv1, pool1, conv2" in result.stdout


def layer_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    assert lines[0].split()[0] == "layer"
    return {line.split()[0]: line.split() for line in lines[1:]}


def test_layers_shows_shapes_and_receptive_fields() -> None:
    rows = layer_rows(invoke("layers").stdout)
    assert list(rows) == ["conv1", "pool1", "conv2"]
    assert rows["conv1"][1:7] == ["conv2d", "16x112x112", "C,H,W", "7x7", "2x2", "relu"]
    assert rows["pool1"][1:7] == ["maxpool2d", "16x56x56", "C,H,W", "9x9", "4x4", "none"]
    assert rows["conv2"][1:7] == ["conv2d", "16x56x56", "C,H,W", "17x17", "4x4", "relu"]


def test_layers_size_option_changes_shapes(tiny_model: Path) -> None:
    rows = layer_rows(invoke("layers", "--size", "64").stdout)
    assert [rows[name][2] for name in ("conv1", "pool1", "conv2")] == ["16x32x32", "16x16x16", "16x16x16"]
    rows = layer_rows(invoke("layers", "--size", "64,96").stdout)
    assert [rows[name][2] for name in ("conv1", "pool1", "conv2")] == ["16x32x48", "16x16x24", "16x16x24"]
    rows = layer_rows(invoke("layers", "-m", str(tiny_model)).stdout)
    assert [rows[name][2] for name in ("conv1", "pool1", "conv2")] == ["4x20x24", "4x10x12", "5x4x5"]


# ---------------------------------------------------------------------------- inspect


@pytest.fixture
def maps_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> Path:
    out = tmp_path / "maps.h5"
    extract(*map(str, images), "-m", str(tiny_model), "--layers", "conv1,pool1,conv2", "-o", str(out))
    return out


def test_inspect_text(maps_file: Path, images: list[Path]) -> None:
    text = invoke("inspect", str(maps_file)).stdout
    for name in ("conv1", "pool1", "conv2"):
        assert f"  {name}  " in text
    assert text.count("dead channels:") == 2  # pool1 has no activation
    for path in images:
        assert str(path) in text
    assert "images: 3" in text
    assert "tiny" in text


def test_inspect_json_matches_numpy(maps_file: Path) -> None:
    data = json.loads(invoke("inspect", str(maps_file), "--json").stdout)
    assert data["n_images"] == 3 and data["model_name"] == "tiny"
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert list(layers) == ["conv1", "pool1", "conv2"]
    with h5py.File(maps_file, "r") as f:
        for name, layer in layers.items():
            group = f["layers"][name]
            z = group["preactivation"][...]
            assert layer["shape"] == list(z.shape)
            on_disk = sum(ds.id.get_storage_size() for ds in group.values() if ds.name.endswith("activation"))
            raw = sum(ds.size * 4 for ds in group.values() if ds.name.endswith("activation"))
            assert layer["bytes_on_disk"] == on_disk > 0
            assert layer["compression_ratio"] == pytest.approx(raw / on_disk, abs=1e-4)
            stats = layer["preactivation"]
            assert stats["min"] == pytest.approx(float(z.min()))
            assert stats["max"] == pytest.approx(float(z.max()))
            assert stats["mean"] == pytest.approx(float(z.astype(np.float64).mean()), rel=1e-6, abs=1e-9)
            assert stats["std"] == pytest.approx(float(z.astype(np.float64).std()), rel=1e-5)
            if "activation" not in group:  # zeros are counted in the map the per-image stats describe
                assert stats["zero_fraction"] == pytest.approx(float((z == 0).mean()))
                assert layer["activation"] is None and layer["dead_channels"] == []
                continue
            assert stats["zero_fraction"] is None
            a = group["activation"][...]
            stats = layer["activation"]
            assert stats["min"] == pytest.approx(float(a.min())) and stats["min"] >= 0
            assert stats["max"] == pytest.approx(float(a.max()))
            assert stats["mean"] == pytest.approx(float(a.astype(np.float64).mean()), rel=1e-6, abs=1e-9)
            assert stats["zero_fraction"] == pytest.approx(float((a == 0).mean()))
            assert 0 < stats["zero_fraction"] < 1
            dead = [int(c) for c in np.flatnonzero(~(a != 0).any(axis=(0, 2, 3)))]
            assert layer["dead_channels"] == dead


def test_inspect_reports_a_dead_channel(images: list[Path], tmp_path: Path) -> None:
    spec = tmp_path / "deadnet.toml"
    spec.write_text(TINY_SPEC.replace('weights = "tiny.npz"', 'weights = "deadnet.npz"'))
    weights = tiny_weights()
    weights["conv1.weight"][2] = 0.0
    weights["conv1.bias"][2] = -1.0  # z = -1 everywhere: channel 2 never fires
    np.savez(tmp_path / "deadnet.npz", **weights)
    out = tmp_path / "dead.h5"
    extract(*map(str, images), "-m", str(spec), "--layers", "conv1", "-o", str(out))
    with h5py.File(out, "r") as f:
        z = f["layers/conv1/preactivation"][...]
        assert np.all(z[:, 2] == np.float32(-1.0))
        alive = (f["layers/conv1/activation"][...] != 0).any(axis=(0, 2, 3))
        assert alive.tolist() == [True, True, False, True]  # the other channels do fire
    data = json.loads(invoke("inspect", str(out), "--json").stdout)
    assert data["layers"][0]["dead_channels"] == [2]
    assert "dead channels: 1/4 (2)" in invoke("inspect", str(out)).stdout


def test_inspect_shows_saved_input(tiny_model: Path, images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "in.h5"
    extract(str(images[0]), "-m", str(tiny_model), "--save-input", "-o", str(out))
    assert "/input" in invoke("inspect", str(out)).stdout
    assert json.loads(invoke("inspect", str(out), "--json").stdout)["input_saved"] is True


def test_sample_image_default_model(tmp_path: Path) -> None:
    out = tmp_path / "cat.h5"
    extract(str(SAMPLES / "cat.jpg"), "-o", str(out))
    data = json.loads(invoke("inspect", str(out), "--json").stdout)
    assert data["model_source"] == "builtin:edges"
    assert data["images"] == [{"path": str(SAMPLES / "cat.jpg"), "original_size": [300, 451]}]
    assert [layer["shape"] for layer in data["layers"]] == [[1, 16, 112, 112], [1, 16, 56, 56]]


# ---------------------------------------------------------------------------- option values refused


@pytest.mark.parametrize("value", ["0", "abc", "1,2,3", "-5", "10,0", ""])
def test_bad_size_values(good: list[Path], tiny_model: Path, outdir: Path, value: str) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--size", value)
    assert line == (
        f"Error: Invalid value for '--size': expected a positive integer N or H,W (e.g. 224 or 224,320), got {value!r}"
    )


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_batch_size(good: list[Path], tiny_model: Path, outdir: Path, value: str) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--batch-size", value)
    assert line.startswith("Error: Invalid value for '-b' / '--batch-size': ")  # then click's words


def test_size_with_no_resize(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--size", "32", "--no-resize")
    assert line == "Error: --size and --no-resize cannot be used together"


@pytest.mark.parametrize("value", ["zstd", "gzip:10", "lzf:3", "none:1", "gzip:x"])
def test_bad_compression_is_a_usage_error(tmp_path: Path, tiny_model: Path, value: str) -> None:
    images = write_photos(tmp_path / "imgs", 1)
    for option in ("--compression", "--z-compression"):
        line = error_line(run_extract(images, tiny_model, tmp_path / "out.h5", option, value), 2)
        assert line == f"Error: Invalid value for '{option}': expected none, lzf, gzip or gzip:0-9, got {value!r}"


@pytest.mark.parametrize("value", ["x", "z,x", "", "b"])
def test_bad_store_is_a_usage_error(tmp_path: Path, tiny_model: Path, value: str) -> None:
    images = write_photos(tmp_path / "imgs", 1)
    out = tmp_path / "out.h5"
    line = error_line(run_extract(images, tiny_model, out, "--store", value), 2)
    assert line == f"Error: Invalid value for --store: expected z, a or z,a, got {value!r}"
    assert not out.exists()


# ---------------------------------------------------------------------------- stdout, stderr and the progress line


def test_stdout_is_exactly_the_output_path(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    result = ok(run_extract(images, tiny_model, out))
    assert result.stdout == f"{out}\n"
    assert "wrote 2 images" in result.stderr  # logs go to stderr
    assert "\r" not in result.stderr  # CliRunner's stderr is not a terminal: no progress line


def test_quiet_leaves_stderr_empty(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    result = ok(run_extract(images, tiny_model, out, "--quiet"))
    assert result.stderr == ""
    assert result.stdout == f"{out}\n"
    result = ok(run_extract(images, tiny_model, tmp_path / "q.h5", "-q", "--json"))
    assert result.stderr == ""
    assert json.loads(result.stdout)["images_written"] == 2


def run_with_terminal_stderr(args: Sequence[object]) -> tuple[int, str, str]:
    """Run the installed script with stderr on a pseudo-terminal: (exit code, stdout, stderr)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(FMAP), *map(str, args)], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=script_env()
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    proc.wait(timeout=60)
    os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals")
def test_progress_line_only_on_a_terminal(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 4)
    out = tmp_path / "out.h5"
    code, stdout, stderr = run_with_terminal_stderr(["extract", *images, "-m", tiny_model, "-o", out, "-b", "2"])
    assert code == 0, stderr
    assert stdout == f"{out}\n"  # the progress line never reaches stdout
    assert "\r" in stderr and "img/s" in stderr and "4/4 images" in stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_silences_the_progress_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch, quiet: bool) -> None:
    from fmap_cli.cli import _Reporter  # private: imported here so a rename fails this test only

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    reporter = _Reporter(quiet)
    reporter.progress(3, 10)
    reporter.log("a message")
    reporter.done(10, 0, 2, 0.5)
    if quiet:
        assert terminal.getvalue() == ""
    else:
        assert "\r3/10 images" in terminal.getvalue() and "a message" in terminal.getvalue()


def test_help_shows_values_as_they_are_accepted() -> None:
    """Click prints a type's name upper-cased as its metavar ('NONE|LZF|GZIP[:N]', 'ALL'): values these
    types refuse in upper case. Every such option shows the name as it is."""
    shown = {}
    for command in cli.commands.values():
        for param in command.params:
            name = param.type.name
            if type(param.type).__module__ == "fmap_cli.cli" and name != name.upper():
                shown[f"{command.name} {param.opts[-1]}"] = (param.metavar, name)
    assert sorted(shown) == ["extract --compression", "extract --z-compression", "occlude --channel"]
    assert all(metavar == name for metavar, name in shown.values()), shown
    assert "  --compression none|lzf|gzip[:N]" in ok(CliRunner().invoke(cli, ["extract", "--help"])).stdout
