"""Bad input through the CLI: exit code, one error line naming the culprit, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import tomllib
import weakref
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import TINY_SPEC, make_photo, tiny_weights
from PIL import Image

from fmap_cli.cli import cli
from fmap_cli.errors import ImageError
from fmap_cli.images import check_image, decode_image
from fmap_cli.store.writer import BackgroundWriter

# ---------------------------------------------------------------- helpers


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(result: Result, code: int) -> str:
    """Check a clean failure and return its one 'Error:' line.

    Click puts its 'Usage:/Try' hint above usage errors and fmap logs progress to stderr, so the
    rule checked is: exactly one 'Error:' line, it is the last line of stderr, nothing on stdout,
    no traceback, and no exception other than click's SystemExit escaped.
    """
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\n{result.output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    return errors[0]


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def assert_left_clean(outdir: Path, before: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    left = {p.name for p in outdir.iterdir()}
    assert left == set(before), f"left behind: {sorted(left - set(before))}"
    assert not list(outdir.glob(".out.h5.*.partial"))


def extract_fails(
    images: list[Path], model: Path, outdir: Path, code: int, *extra: object, must_name: tuple[str, ...] = ()
) -> str:
    out = outdir / "out.h5"
    before = {p.name for p in outdir.iterdir()}
    result = invoke("extract", *images, "-m", model, "-o", out, *extra)
    line = error_line(result, code)
    for name in must_name:
        assert name in line, f"{name!r} not in {line!r}"
    assert_left_clean(outdir, before)
    return line


@pytest.fixture
def good(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        path = tmp_path / f"good{i}.png"
        make_photo(30, 40, seed=i).save(path)
        paths.append(path)
    return paths


def truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut in half: the header reads, the full decode fails."""
    full = path.with_name("full_" + path.name)
    make_photo(48, 64, seed=9).save(full, quality=90)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    full.unlink()
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose IHDR is patched to claim width x height (CRC recomputed)."""
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def maps_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            f"{layer}/{role}": f[f"layers/{layer}/{role}"][...]
            for layer in f["layers"]
            for role in ("preactivation", "activation")
            if role in f[f"layers/{layer}"]
        }


# ---------------------------------------------------------------- bad image files


def test_truncated_jpeg_fails_at_decode_not_header(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    bad = truncated_jpeg(tmp_path / "cut.jpg")
    check_image(str(bad))  # the header check passes ...
    with pytest.raises(ImageError, match="cannot decode"):  # ... the full decode does not
        decode_image(bad)
    line = extract_fails([bad], tiny_model, outdir, 1, must_name=(str(bad),))
    assert "decode" in line


def test_jpeg_truncated_in_header(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    full = tmp_path / "full.jpg"
    make_photo(48, 64).save(full)
    bad = tmp_path / "head.jpg"
    bad.write_bytes(full.read_bytes()[:100])
    with pytest.raises(ImageError):
        check_image(str(bad))
    extract_fails([bad], tiny_model, outdir, 1, must_name=(str(bad),))


def test_zero_byte_file(tmp_path: Path, tiny_model: Path, good: list[Path], outdir: Path) -> None:
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    line = extract_fails([good[0], bad], tiny_model, outdir, 1, must_name=(str(bad),))
    assert "empty" in line


def test_text_file_named_jpg(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture\n" * 20)
    line = extract_fails([bad], tiny_model, outdir, 1, must_name=(str(bad),))
    assert "not an image" in line


def test_missing_file(tmp_path: Path, tiny_model: Path, good: list[Path], outdir: Path) -> None:
    bad = tmp_path / "nope.jpg"
    line = extract_fails([*good, bad], tiny_model, outdir, 1, must_name=(str(bad),))
    assert "no such file" in line


def test_directory_given_as_image(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    result = invoke("extract", folder, "-m", tiny_model, "-o", outdir / "out.h5")
    assert result.exit_code in (1, 2)
    line = error_line(result, result.exit_code)
    assert "folder.png" in line
    assert_left_clean(outdir)


def test_decompression_bomb_refused_quickly(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    bomb = png_claiming(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 100
    with pytest.raises(Image.DecompressionBombError):  # the patched IHDR (and its CRC) is valid
        Image.open(bomb)
    started = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        check_image(str(bomb))
    line = extract_fails([bomb], tiny_model, outdir, 1, must_name=(str(bomb),))
    assert "decompression bomb" in line
    assert time.perf_counter() - started < 10


def test_image_just_over_pillow_warning_limit_refused(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    """Between MAX_IMAGE_PIXELS and 2x it Pillow only warns; fmap must still refuse."""
    side = int((Image.MAX_IMAGE_PIXELS or 89_478_485) ** 0.5) + 10
    bomb = png_claiming(tmp_path / "big.png", side, side)
    line = extract_fails([bomb], tiny_model, outdir, 1, must_name=(str(bomb),))
    assert "decompression bomb" in line


def test_bad_file_in_middle_after_batches_written(tmp_path: Path, tiny_model: Path, good: list[Path], outdir: Path):
    bad = truncated_jpeg(tmp_path / "middle.jpg")
    images = [good[0], good[1], bad, good[2]]
    out = outdir / "out.h5"
    appended = []
    real_append = BackgroundWriter.append

    def counting_append(self: BackgroundWriter, batch: object) -> None:
        real_append(self, batch)
        appended.append(1)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BackgroundWriter, "append", counting_append)
        result = invoke("extract", *images, "-m", tiny_model, "-o", out, "--batch-size", "1")
    line = error_line(result, 1)
    assert str(bad) in line
    assert len(appended) == 2  # two batches really went to the writer first
    assert_left_clean(outdir)


def test_bad_file_in_middle_with_overwrite_keeps_old_file(
    tmp_path: Path, tiny_model: Path, good: list[Path], outdir: Path
) -> None:
    out = outdir / "out.h5"
    assert invoke("extract", good[0], "-m", tiny_model, "-o", out).exit_code == 0
    old = out.read_bytes()
    bad = truncated_jpeg(tmp_path / "middle.jpg")
    result = invoke("extract", good[0], bad, good[1], "-m", tiny_model, "-o", out, "--batch-size", "1", "--overwrite")
    assert str(bad) in error_line(result, 1)
    assert out.read_bytes() == old  # a failed --overwrite run does not destroy the previous result
    assert_left_clean(outdir, {"out.h5"})


def test_existing_output_untouched_without_overwrite(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    out = outdir / "out.h5"
    out.write_bytes(b"precious bytes")
    line = extract_fails(good, tiny_model, outdir, 2, must_name=(str(out), "--overwrite"))
    assert "exists" in line
    assert out.read_bytes() == b"precious bytes"


def test_output_directory_missing(good: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "nonexistent" / "dir" / "out.h5"
    result = invoke("extract", *good, "-m", tiny_model, "-o", out)
    assert result.exit_code in (1, 2)
    line = error_line(result, result.exit_code)
    assert str(out.parent) in line
    assert not (tmp_path / "nonexistent").exists()


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize("name", ["conv3", "conv_1"])
def test_unknown_layer(good: list[Path], tiny_model: Path, outdir: Path, name: str) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--layers", name, must_name=("--layers", f"'{name}'"))
    for available in ("conv1", "pool1", "conv2"):
        assert available in line
    if name == "conv_1":
        assert "did you mean 'conv1'" in line
    else:
        assert "did you mean 'conv" in line


def test_unknown_layer_among_good_ones(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    extract_fails(good, tiny_model, outdir, 2, "--layers", "conv1,convv2", must_name=("'convv2'", "'conv2'"))


@pytest.mark.parametrize("value", ["0", "abc", "1,2,3", "-5", "10,0", ""])
def test_bad_size_values(good: list[Path], tiny_model: Path, outdir: Path, value: str) -> None:
    extract_fails(good, tiny_model, outdir, 2, "--size", value, must_name=("--size",))


def test_size_too_small_for_kernels(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    line = error_line(invoke("extract", *good, "-m", tiny_model, "-o", outdir / "out.h5", "--size", "2"), 2)
    assert "conv2" in line and line.startswith("Error: --size 2,2: ")
    assert_left_clean(outdir)


def test_layers_command_size_too_small(tiny_model: Path) -> None:
    line = error_line(invoke("layers", "-m", tiny_model, "--size", "2"), 2)  # a bad flag value: usage error
    assert "conv2" in line and "--size 2,2" in line


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_bad_batch_size(good: list[Path], tiny_model: Path, outdir: Path, value: str) -> None:
    extract_fails(good, tiny_model, outdir, 2, "--batch-size", value, must_name=("--batch-size",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when CUDA is missing")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_requested_without_cuda(good: list[Path], tiny_model: Path, outdir: Path, device: str) -> None:
    line = extract_fails(good, tiny_model, outdir, 2, "--device", device, must_name=("--device",))
    assert "CUDA" in line


@pytest.mark.parametrize("device", ["gpu", "tpu0", "meta"])
def test_unknown_device(good: list[Path], tiny_model: Path, outdir: Path, device: str) -> None:
    extract_fails(good, tiny_model, outdir, 2, "--device", device, must_name=("--device", device))


def test_no_resize_with_different_sizes(images: list[Path], tiny_model: Path, outdir: Path) -> None:
    # images: 30x40, 48x36, 25x25 -> the second is the first odd one
    line = extract_fails(images, tiny_model, outdir, 1, "--no-resize", must_name=(str(images[1]),))
    assert "--no-resize" in line


def test_no_resize_with_different_sizes_across_batches(images: list[Path], tiny_model: Path, outdir: Path) -> None:
    result = invoke("extract", *images, "-m", tiny_model, "-o", outdir / "out.h5", "--no-resize", "-b", "1")
    assert result.exit_code in (1, 2)
    line = error_line(result, result.exit_code)
    assert str(images[1]) in line and "--no-resize" in line
    assert_left_clean(outdir)


def test_size_with_no_resize(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    extract_fails(good, tiny_model, outdir, 2, "--size", "32", "--no-resize", must_name=("--size", "--no-resize"))


def test_no_images_is_usage_error(tiny_model: Path, outdir: Path) -> None:
    result = invoke("extract", "-m", tiny_model, "-o", outdir / "out.h5")
    error_line(result, 2)
    assert_left_clean(outdir)


# ---------------------------------------------------------------- model spec errors


def write_spec(directory: Path, text: str, name: str = "spec.toml") -> Path:
    directory.mkdir(exist_ok=True)
    np.savez(directory / "tiny.npz", **tiny_weights())
    path = directory / name
    path.write_text(text)
    return path


SPEC_ERRORS = {
    "negative_kernel": (
        TINY_SPEC.replace("kernel_size = 3", "kernel_size = -3", 1),
        ("layer 'conv1'", "kernel_size must be a positive integer", "-3"),
    ),
    "unknown_key": (
        TINY_SPEC.replace("kernel_size = 3", "kernal_size = 3", 1),
        ("layer 'conv1'", "unknown key 'kernal_size'", "did you mean 'kernel_size'"),
    ),
    "unknown_type": (
        TINY_SPEC.replace('type = "conv2d"', 'type = "conv2dd"', 1),
        ("layer 'conv1'", "type", "'conv2dd'", "did you mean 'conv2d'"),
    ),
    "unknown_activation": (
        TINY_SPEC.replace('activation = "relu"', 'activation = "rleu"', 1),
        ("layer 'conv1'", "activation", "'rleu'", "did you mean 'relu'"),
    ),
    "missing_weights_key": (
        TINY_SPEC.replace('weights = "tiny.npz"\n', ""),
        ("[model]", "'weights'"),
    ),
    "missing_required": (
        TINY_SPEC.replace("out_channels = 5\n", ""),
        ("layer 'conv2'", "out_channels"),
    ),
    "bad_stride_in_second_layer": (
        TINY_SPEC.replace("stride = 2", "stride = 0"),
        ("layer 'conv2'", "stride", "positive integer"),
    ),
    "bad_input_size": (
        TINY_SPEC.replace("size = [20, 24]", "size = [20, 24, 3]"),
        ("[input]", "size"),
    ),
    "toml_syntax": (
        TINY_SPEC.replace("kernel_size = 3", "kernel_size = = 3", 1),
        ("cannot parse",),
    ),
}


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_spec_errors_in_layers_command(tmp_path: Path, case: str) -> None:
    text, expected = SPEC_ERRORS[case]
    spec = write_spec(tmp_path / "model", text)
    line = error_line(invoke("layers", "-m", spec), 1)
    assert str(spec) in line
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


@pytest.mark.parametrize("case", sorted(SPEC_ERRORS))
def test_spec_errors_in_extract(tmp_path: Path, good: list[Path], outdir: Path, case: str) -> None:
    text, expected = SPEC_ERRORS[case]
    spec = write_spec(tmp_path / "model", text)
    extract_fails(good, spec, outdir, 1, must_name=(str(spec), *expected))


def test_json_spec_equivalent_to_toml(tmp_path: Path, good: list[Path], tiny_model: Path) -> None:
    json_spec = write_spec(tmp_path / "json_model", json.dumps(tomllib.loads(TINY_SPEC)), name="tiny.json")
    toml_out, json_out = tmp_path / "toml.h5", tmp_path / "json.h5"
    assert invoke("extract", *good, "-m", tiny_model, "-o", toml_out).exit_code == 0
    result = invoke("extract", *good, "-m", json_spec, "-o", json_out)
    assert result.exit_code == 0, result.output
    a, b = maps_of(toml_out), maps_of(json_out)
    assert sorted(a) == sorted(b) and a
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert "conv1" in invoke("layers", "-m", json_spec).stdout


def test_json_spec_syntax_error(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "m", '{"model": {"name": "x",', name="bad.json")
    line = error_line(invoke("layers", "-m", spec), 1)
    assert str(spec) in line and "cannot parse" in line


def test_nonexistent_spec(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = tmp_path / "missing.toml"
    assert str(spec) in error_line(invoke("layers", "-m", spec), 1)
    extract_fails(good, spec, outdir, 1, must_name=(str(spec),))


@pytest.mark.parametrize("name", ["spec.yaml", "spec", "tiny.npz"])
def test_wrong_extension_spec(tmp_path: Path, good: list[Path], outdir: Path, name: str) -> None:
    spec = tmp_path / "m" / name
    if name != "tiny.npz":  # a valid spec under a wrong name; tiny.npz is the weights file itself
        write_spec(spec.parent, TINY_SPEC, name=name)
    else:
        write_spec(spec.parent, TINY_SPEC)
    # an unrecognisable --model value is a usage error (exit 2) naming the flag and the value
    line = error_line(invoke("layers", "-m", spec), 2)
    assert str(spec) in line and "--model" in line and ".toml/.json spec" in line
    extract_fails(good, spec, outdir, 2, must_name=(str(spec),))


def test_unknown_builtin_name() -> None:
    line = error_line(invoke("layers", "-m", "edgez"), 2)
    assert "edgez" in line and "did you mean 'edges'" in line


# ---------------------------------------------------------------- weights errors


def weights_case(tmp_path: Path, weights: dict[str, np.ndarray] | None, name: str = "tiny.npz") -> Path:
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    spec = directory / "tiny.toml"
    spec.write_text(TINY_SPEC.replace('"tiny.npz"', f'"{name}"'))
    if weights is not None:
        np.savez(directory / name, **weights)
    return spec


def test_missing_weights_file(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None)
    extract_fails(good, spec, outdir, 1, must_name=(str(spec.parent / "tiny.npz"),))


def test_npz_missing_key(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    weights = tiny_weights()
    del weights["conv2.bias"]
    spec = weights_case(tmp_path, weights)
    line = extract_fails(good, spec, outdir, 1, must_name=("conv2.bias", "tiny.npz"))
    assert "missing" in line


def test_npz_extra_key(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    weights = {**tiny_weights(), "conv3.weight": np.zeros((2, 5, 1, 1), np.float32)}
    spec = weights_case(tmp_path, weights)
    line = extract_fails(good, spec, outdir, 1, must_name=("conv3.weight", "tiny.npz"))
    assert "unexpected" in line


def test_npz_wrong_shape(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    weights = {**tiny_weights(), "conv1.weight": np.zeros((4, 3, 5, 5), np.float32)}
    spec = weights_case(tmp_path, weights)
    extract_fails(good, spec, outdir, 1, must_name=("conv1.weight", "(4, 3, 5, 5)", "(4, 3, 3, 3)", "tiny.npz"))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_npz_non_finite(tmp_path: Path, good: list[Path], outdir: Path, bad_value: float) -> None:
    weights = tiny_weights()
    weights["conv2.weight"][1, 2, 0, 1] = bad_value
    spec = weights_case(tmp_path, weights)
    line = extract_fails(good, spec, outdir, 1, must_name=("conv2.weight", "tiny.npz"))
    assert "NaN" in line


def test_corrupt_npz(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None)
    (spec.parent / "tiny.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    extract_fails(good, spec, outdir, 1, must_name=(str(spec.parent / "tiny.npz"),))


def test_unsupported_weights_extension(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None, name="tiny.bin")
    (spec.parent / "tiny.bin").write_bytes(b"\0" * 64)
    extract_fails(good, spec, outdir, 1, must_name=("tiny.bin",))


@pytest.mark.parametrize("wrapped", [False, True], ids=["state_dict", "nested_state_dict"])
def test_pt_state_dict_matches_npz(
    tmp_path: Path, good: list[Path], tiny_model: Path, outdir: Path, wrapped: bool
) -> None:
    spec = weights_case(tmp_path, None, name="tiny.pt")
    state = {key: torch.from_numpy(value) for key, value in tiny_weights().items()}
    torch.save({"state_dict": state} if wrapped else state, spec.parent / "tiny.pt")
    npz_out, pt_out = outdir / "npz.h5", outdir / "pt.h5"
    assert invoke("extract", *good, "-m", tiny_model, "-o", npz_out).exit_code == 0
    result = invoke("extract", *good, "-m", spec, "-o", pt_out)
    assert result.exit_code == 0, result.output
    a, b = maps_of(npz_out), maps_of(pt_out)
    assert a and sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


MARKER_ENV = "FMAP_TEST_MARKER"


def _touch_marker(path: str) -> None:  # pragma: no cover - must never run
    Path(path).write_text("code from a weights file ran")


class Payload:
    """Unpickling this would run _touch_marker: a weights file must never get that far."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch_marker, (self.marker,))


@pytest.mark.parametrize("how", ["torch_save", "plain_pickle", "os_system"])
def test_pickled_code_in_pt_refused(tmp_path: Path, good: list[Path], outdir: Path, how: str) -> None:
    marker = tmp_path / "MARKER"
    spec = weights_case(tmp_path, None, name="tiny.pt")
    target = spec.parent / "tiny.pt"
    state: dict[str, object] = {key: torch.from_numpy(value) for key, value in tiny_weights().items()}
    state["conv1.weight"] = Payload(str(marker))
    if how == "torch_save":
        torch.save(state, target)
    elif how == "plain_pickle":
        target.write_bytes(pickle.dumps(state))
    else:

        class System:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        with open(target, "wb") as handle:
            pickle.Pickler(handle).dump({"conv1.weight": System()})
    line = extract_fails(good, spec, outdir, 1, must_name=(str(target),))
    assert "weights_only" in line or "never runs code" in line
    assert not marker.exists()


def test_pt_not_a_state_dict(tmp_path: Path, good: list[Path], outdir: Path) -> None:
    spec = weights_case(tmp_path, None, name="tiny.pt")
    torch.save([torch.zeros(3)], spec.parent / "tiny.pt")
    line = extract_fails(good, spec, outdir, 1, must_name=("tiny.pt",))
    assert "state dict" in line


# ---------------------------------------------------------------- fmap inspect on bad files


@pytest.fixture
def fmap_file(tmp_path: Path, good: list[Path], tiny_model: Path) -> Path:
    out = tmp_path / "valid.h5"
    result = invoke("extract", *good, "-m", tiny_model, "-o", out)
    assert result.exit_code == 0, result.output
    assert invoke("inspect", out).exit_code == 0
    return out


def _modified(source: Path, name: str, **attrs: object) -> Path:
    copy = source.with_name(name)
    shutil.copy(source, copy)
    with h5py.File(copy, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
    return copy


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_incomplete(fmap_file: Path, as_json: bool) -> None:
    bad = _modified(fmap_file, "incomplete.h5", complete=np.int8(0))
    line = error_line(invoke("inspect", bad, *(["--json"] if as_json else [])), 1)
    assert str(bad) in line and "incomplete" in line


def test_inspect_newer_schema(fmap_file: Path) -> None:
    bad = _modified(fmap_file, "newer.h5", fmap_schema_version=np.int64(99))
    line = error_line(invoke("inspect", bad), 1)
    assert str(bad) in line and "99" in line and "newer" in line


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_inspect_truncated(fmap_file: Path, fraction: float) -> None:
    bad = fmap_file.with_name("truncated.h5")
    data = fmap_file.read_bytes()
    bad.write_bytes(data[: int(len(data) * fraction)])
    result = invoke("inspect", bad)
    assert result.exit_code != 0
    assert str(bad) in error_line(result, result.exit_code)


def test_inspect_not_hdf5_and_missing(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    assert str(text) in error_line(invoke("inspect", text), 1)
    missing = tmp_path / "missing.h5"
    assert str(missing) in error_line(invoke("inspect", missing), 1)


def test_inspect_hdf5_not_from_fmap(tmp_path: Path) -> None:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    line = error_line(invoke("inspect", other), 1)
    assert str(other) in line and "fmap" in line


def test_inspect_damaged_structure(fmap_file: Path) -> None:
    bad = fmap_file.with_name("damaged.h5")
    shutil.copy(fmap_file, bad)
    with h5py.File(bad, "r+") as f:
        del f["images/original_size"]
    line = error_line(invoke("inspect", bad), 1)
    assert str(bad) in line


# ---------------------------------------------------------------- SIGTERM
#
# fmap installs a SIGTERM handler so that a batch scheduler's kill still removes the temporary
# file. The in-process tests below send the signal at chosen points (deterministically); the
# subprocess test does it for real.


@pytest.fixture
def restore_sigterm():
    """``fmap extract`` installs a SIGTERM handler in this process: put the old one back afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler right after this call returns


def _stopped_cleanly(result: Result, outdir: Path, images: list[Path], model: Path, *extra: str) -> None:
    """No OUT; at most one temporary file, kept only if it holds a batch, and --resume finishes it
    into exactly what an uninterrupted run writes."""
    assert result.exit_code != 0, f"SIGTERM did not stop the run:\n{result.output}"
    assert result.stdout == ""
    out = outdir / "out.h5"
    assert not out.exists()
    partials = list(outdir.glob(".out.h5.*.partial"))
    assert len(partials) <= 1, partials
    if not partials:
        assert_left_clean(outdir)
        return
    with h5py.File(partials[0], "r") as f:
        assert int(f.attrs["complete"]) == 0 and int(f.attrs["n_images"]) >= 1
    resumed = invoke("extract", *images, "-m", model, "-o", out, "--resume", *extra)
    assert resumed.exit_code == 0, resumed.output
    assert_left_clean(outdir, {"out.h5"})
    fresh = outdir.parent / "fresh.h5"
    assert invoke("extract", *images, "-m", model, "-o", fresh, *extra).exit_code == 0
    with h5py.File(out, "r") as a, h5py.File(fresh, "r") as b:
        assert a["images/path"].asstr()[...].tolist() == b["images/path"].asstr()[...].tolist()
        for name in ("layers/conv1/preactivation", "layers/conv2/activation"):
            np.testing.assert_allclose(a[name][...], b[name][...], rtol=1e-5, atol=1e-5)


def test_sigterm_after_a_batch_is_flushed(
    monkeypatch: pytest.MonkeyPatch, restore_sigterm: None, good: list[Path], tiny_model: Path, outdir: Path
) -> None:
    flush = h5py.File.flush
    calls = []

    def flush_then_term(self: h5py.File) -> None:
        flush(self)
        calls.append(1)
        if len(calls) == 2:  # after the second batch is on disk
            _sigterm_self()

    monkeypatch.setattr(h5py.File, "flush", flush_then_term)
    result = invoke("extract", *good, "-m", tiny_model, "-o", outdir / "out.h5", "-b", "1")
    assert len(calls) >= 2  # batches queued for the writer when the signal came are finished too
    assert result.exit_code == 128 + signal.SIGTERM
    assert "Traceback" not in result.output
    monkeypatch.setattr(h5py.File, "flush", flush)
    _stopped_cleanly(result, outdir, good, tiny_model, "-b", "1")


def test_sigterm_just_after_temporary_file_created(
    monkeypatch: pytest.MonkeyPatch, restore_sigterm: None, good: list[Path], tiny_model: Path, outdir: Path
) -> None:
    """The moment the temporary file appears on disk (h5py.File has created it, not yet returned)."""
    init = h5py.File.__init__
    calls = []

    def init_then_term(self: h5py.File, name: object, mode: str = "r", *args: object, **kwargs: object) -> None:
        init(self, name, mode, *args, **kwargs)
        if mode == "w" and str(name).endswith(".partial"):
            calls.append(name)
            assert Path(str(name)).exists()
            _sigterm_self()

    monkeypatch.setattr(h5py.File, "__init__", init_then_term)
    result = invoke("extract", *good, "-m", tiny_model, "-o", outdir / "out.h5")
    assert calls
    monkeypatch.undo()
    _stopped_cleanly(result, outdir, good, tiny_model)


def test_sigterm_during_a_weakref_callback_still_stops(
    monkeypatch: pytest.MonkeyPatch, restore_sigterm: None, good: list[Path], tiny_model: Path, outdir: Path
) -> None:
    """h5py's object registry runs weakref callbacks all the time; a signal landing in one must not be lost."""
    flush = h5py.File.flush
    calls = []

    class Thing:
        pass

    def flush_then_term_in_callback(self: h5py.File) -> None:
        flush(self)
        calls.append(1)
        if len(calls) == 1:
            thing = Thing()
            ref = weakref.ref(thing, lambda _: _sigterm_self())
            del thing  # the callback runs here, and with it fmap's SIGTERM handler
            assert ref() is None

    monkeypatch.setattr(h5py.File, "flush", flush_then_term_in_callback)
    result = invoke("extract", *good, "-m", tiny_model, "-o", outdir / "out.h5", "-b", "1")
    assert calls
    monkeypatch.undo()
    _stopped_cleanly(result, outdir, good, tiny_model, "-b", "1")


def test_sigterm_while_finishing_cleans_up(
    monkeypatch: pytest.MonkeyPatch, restore_sigterm: None, good: list[Path], tiny_model: Path, outdir: Path
) -> None:
    """A SIGTERM that lands while the finished file is being fsync'ed (before the rename)."""
    fsync = os.fsync
    calls = []

    def fsync_then_term(fd: int) -> None:
        fsync(fd)
        calls.append(fd)
        if len(calls) == 1:  # the temporary file's fsync, before it is renamed onto OUT
            _sigterm_self()

    monkeypatch.setattr(os, "fsync", fsync_then_term)
    out = outdir / "out.h5"
    result = invoke("extract", *good, "-m", tiny_model, "-o", out)
    assert calls
    # OUT is either absent or finished (too late to stop is fine); never a temporary file left.
    left = {p.name for p in outdir.iterdir()}
    assert left <= {"out.h5"}, f"exit {result.exit_code}, left {sorted(left)}"
    if out.exists():
        assert invoke("inspect", out).exit_code == 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_extraction_cleans_up(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    """The real thing: the installed script, sent SIGTERM while it writes."""
    fmap = Path(sys.executable).with_name("fmap")
    if not fmap.exists():
        pytest.skip("installed fmap script not found next to the interpreter")
    photo = tmp_path / "photo.png"
    make_photo(64, 64).save(photo)
    images = [photo] * 400
    out = outdir / "out.h5"
    command = [str(fmap), "extract", *map(str, images), "-m", str(tiny_model), "-o", str(out), "-b", "1"]
    proc = subprocess.Popen([*command, "--size", "48"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(outdir.glob(".out.h5.*.partial")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(0.2)  # let a few batches land
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, f"exit {proc.returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert stdout == ""
    assert not out.exists()
    partials = list(outdir.glob(".out.h5.*.partial"))
    assert len(partials) <= 1
    if partials:
        assert "--resume" in stderr  # the message says how to continue
        resumed = subprocess.run([*command, "--size", "48", "--resume"], capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        with h5py.File(out, "r") as f:
            assert int(f.attrs["n_images"]) == len(images)
            assert f["images/index"][...].tolist() == list(range(len(images)))
        assert_left_clean(outdir, {"out.h5"})


def test_output_is_an_existing_directory(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    target = outdir / "maps.h5"
    target.mkdir()
    line = error_line(invoke("extract", *good, "-m", tiny_model, "-o", target), 2)
    assert "maps.h5" in line
    assert_left_clean(outdir, {"maps.h5"})
    assert target.is_dir() and not any(target.iterdir())


def test_spec_not_utf8(tmp_path: Path) -> None:
    spec = tmp_path / "latin1.toml"
    spec.write_bytes(TINY_SPEC.replace('name = "tiny"', 'name = "tiny\xe9"').encode("latin-1"))
    line = error_line(invoke("layers", "-m", spec), 1)
    assert str(spec) in line and "UTF-8" in line
