"""Batch jobs and pipelines (issue 4): inputs, stdout/stderr, exit codes, storage options,
write-time statistics, --resume, --append, --shard and memory bounded by the batch size.

Every run uses the tiny spec model of conftest.py on images of a few pixels, so each extraction
takes a fraction of a second.
"""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import TINY_SPEC, extract_options, make_photo, tiny_weights

from fmap_cli import extract as pipeline
from fmap_cli.cli import cli
from fmap_cli.errors import StoppedError
from fmap_cli.store.writer import WRITE_BEHIND, MapWriter

FMAP = Path(sys.executable).parent / "fmap"
LAYERS = ["conv1", "conv2"]
ROLES = ("preactivation", "activation")
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")

# ---------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run on a cluster node must not pick up that node's SLURM array task as a shard."""
    for name in SLURM:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and on a busy machine they make each
    convolution many times slower (threads spin waiting for each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def script_env() -> dict[str, str]:
    """Environment for the installed script: one torch thread, as in-process."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def invoke(*args: object, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)


def ok(result: Result, code: int = 0) -> Result:
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\n{result.output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def error_line(result: Result, code: int) -> str:
    """A clean failure: exit ``code``, nothing on stdout, no traceback; returns the 'Error:' line."""
    ok(result, code)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def extract(images: Sequence[object], model: Path, out: Path, *extra: object, **kw: Any) -> Result:
    return invoke("extract", *images, "-m", model, "-o", out, *extra, **kw)


def photos(folder: Path, n: int, start: int = 0, size: tuple[int, int] = (16, 18), ext: str = "png") -> list[Path]:
    """``n`` distinct small images ``folder/img{start..}.ext``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:03d}.{ext}"
        make_photo(*size, seed=i).save(path)
        paths.append(path)
    return paths


def truncated_jpeg(path: Path) -> Path:
    """A real JPEG cut in half: its header reads, its full decode fails."""
    make_photo(48, 64, seed=9).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def partials(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.*.partial"))


def stored_paths(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return f["images/path"].asstr()[...].tolist()


def stored_index(path: Path) -> list[int]:
    with h5py.File(path, "r") as f:
        return f["images/index"][...].tolist()


def maps_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            f"{layer}/{role}": f[f"layers/{layer}/{role}"][...]
            for layer in f["layers"]
            for role in ROLES
            if role in f[f"layers/{layer}"]
        }


def stats_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            f"{layer}/{name}": f[f"layers/{layer}/stats/{name}"][...]
            for layer in f["layers"]
            for name in f[f"layers/{layer}/stats"]
        }


def check_stats_match_maps(path: Path) -> None:
    """/layers/<L>/stats equal numpy computed from the stored (float32) maps."""
    with h5py.File(path, "r") as f:
        assert int(f.attrs["n_images"]) == f["images/path"].shape[0]
        for layer in f.attrs["layers"]:
            group = f[f"layers/{layer}"]
            stats = group["stats"]
            role = stats.attrs["role"]
            assert role == "activation"  # both tiny layers have a relu
            maps = {r: group[r][...] for r in ROLES if r in group}
            x = maps[role]
            n, c, _, width = x.shape
            flat = x.reshape(n, c, -1)
            np.testing.assert_array_equal(stats["image_max"][...], flat.max(axis=2), err_msg=f"{layer} image_max")
            np.testing.assert_allclose(
                stats["image_mean"][...], flat.mean(axis=2, dtype=np.float64), rtol=1e-5, atol=1e-7
            )
            np.testing.assert_array_equal(
                stats["image_zero_fraction"][...], (flat == 0).mean(axis=2).astype(np.float32)
            )
            rows, cols = np.divmod(flat.argmax(axis=2), width)
            np.testing.assert_array_equal(stats["image_argmax"][...], np.stack([rows, cols], axis=-1))
            for r, values in maps.items():
                v = values.astype(np.float64)
                np.testing.assert_array_equal(stats[f"{r}_min"][...], v.min(axis=(0, 2, 3)), err_msg=f"{layer} {r}_min")
                np.testing.assert_array_equal(stats[f"{r}_max"][...], v.max(axis=(0, 2, 3)), err_msg=f"{layer} {r}_max")
                np.testing.assert_allclose(stats[f"{r}_mean"][...], v.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(stats[f"{r}_std"][...], v.std(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)


def assert_same_result(got: Path, want: Path) -> None:
    """Two files hold the same images in the same order with the same maps and statistics."""
    assert stored_paths(got) == stored_paths(want)
    assert stored_index(got) == stored_index(want)
    got_maps, want_maps = maps_of(got), maps_of(want)
    assert got_maps.keys() == want_maps.keys()
    for key in want_maps:
        np.testing.assert_allclose(got_maps[key], want_maps[key], rtol=1e-5, atol=1e-6, err_msg=key)
    got_stats, want_stats = stats_of(got), stats_of(want)
    assert got_stats.keys() == want_stats.keys()
    for key in want_stats:
        np.testing.assert_allclose(got_stats[key], want_stats[key], rtol=1e-5, atol=1e-6, err_msg=key)
    with h5py.File(got, "r") as f:
        assert int(f.attrs["complete"]) == 1


def make_partial(
    images: Sequence[Path], model: Path, out: Path, batch_size: int = 2, batches: int = 2, **kw: Any
) -> Path:
    """What a run interrupted after ``batches`` batches leaves: its temporary file beside ``out``.

    The library polls ``stop_requested`` before and after every batch; answering SIGTERM at the
    poll after batch ``batches`` stops it there, deterministically.
    """
    polls = 0

    def stop() -> int | None:
        nonlocal polls
        polls += 1
        return signal.SIGTERM if polls >= 2 * batches else None

    options = extract_options([str(p) for p in images], out=out, model=str(model), batch_size=batch_size, **kw)
    with pytest.raises(StoppedError):
        pipeline.extract(options, stop_requested=stop)
    assert not out.exists()
    [partial] = partials(out)
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["n_images"]) == batch_size * batches
        assert int(f.attrs["complete"]) == 0
    return partial


def spec_with_weights(folder: Path, name: str, weights: dict[str, np.ndarray]) -> Path:
    spec = folder / f"{name}.toml"
    spec.write_text(TINY_SPEC.replace('weights = "tiny.npz"', f'weights = "{name}.npz"'))
    np.savez(folder / f"{name}.npz", **weights)
    return spec


# ---------------------------------------------------------------- 1. inputs


def test_directory_expands_to_its_images_sorted(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, seed in (("b.png", 1), ("a.jpg", 2), ("c.JPEG", 3)):
        make_photo(16, 18, seed=seed).save(folder / name, format="JPEG" if "J" in name.upper() else "PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "README").write_text("no extension")
    (folder / "folder.png").mkdir()  # a directory with an image extension: not an image
    (folder / "sub").mkdir()
    make_photo(16, 18, seed=4).save(folder / "sub" / "d.png")
    out = tmp_path / "out.h5"
    ok(extract([folder], tiny_model, out))
    assert stored_paths(out) == [str(folder / n) for n in ("a.jpg", "b.png", "c.JPEG")]
    assert stored_index(out) == [0, 1, 2]

    deep = tmp_path / "deep.h5"
    ok(extract([folder], tiny_model, deep, "--recursive"))
    assert stored_paths(deep) == [str(folder / n) for n in ("a.jpg", "b.png", "c.JPEG", "sub/d.png")]
    ok(extract([folder], tiny_model, tmp_path / "deep2.h5", "-r"))
    assert stored_paths(tmp_path / "deep2.h5") == stored_paths(deep)


def test_directories_and_files_keep_command_line_order(tmp_path: Path, tiny_model: Path) -> None:
    first = photos(tmp_path / "one", 2)
    second = photos(tmp_path / "two", 2, start=10)
    single = photos(tmp_path / "single", 1, start=20)[0]
    out = tmp_path / "out.h5"
    ok(extract([tmp_path / "two", single, tmp_path / "one"], tiny_model, out))
    assert stored_paths(out) == [str(p) for p in (*second, single, *first)]


def test_directory_with_only_subdirectories_needs_recursive(tmp_path: Path, tiny_model: Path) -> None:
    top = tmp_path / "top"
    photos(top / "inner", 2)
    out = tmp_path / "out.h5"
    line = error_line(extract([top], tiny_model, out), 2)
    assert str(top) in line and "--recursive" in line
    assert not out.exists()
    ok(extract([top], tiny_model, out, "-r"))
    assert len(stored_paths(out)) == 2


def test_empty_directory_is_a_usage_error(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("text")
    line = error_line(extract([empty], tiny_model, tmp_path / "out.h5"), 2)
    assert str(empty) in line and ".png" in line  # says which extensions count


def test_files_from_file(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 4)
    listing = tmp_path / "list.txt"
    # CRLF line ends and blank lines are tolerated
    listing.write_bytes(f"{images[2]}\r\n\n{images[0]}\n{images[3]}\n".encode())
    out = tmp_path / "out.h5"
    ok(extract([images[1]], tiny_model, out, "--files-from", listing))  # positional paths first
    assert stored_paths(out) == [str(images[i]) for i in (1, 2, 0, 3)]
    assert stored_index(out) == [0, 1, 2, 3]


def test_files_from_stdin(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    ok(extract([], tiny_model, out, "--files-from", "-", input="".join(f"{p}\n" for p in reversed(images))))
    assert stored_paths(out) == [str(p) for p in reversed(images)]


def test_nul_separated_list_with_newline_in_a_name(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "imgs"
    plain = photos(folder, 2)
    odd = folder / "new\nline.png"
    make_photo(16, 18, seed=7).save(odd)
    data = b"\0".join(os.fsencode(p) for p in (plain[0], odd, plain[1])) + b"\0"
    out = tmp_path / "out.h5"
    ok(extract([], tiny_model, out, "--files-from", "-", "-0", input=data))
    assert stored_paths(out) == [str(plain[0]), str(odd), str(plain[1])]

    listing = tmp_path / "list.bin"
    listing.write_bytes(data)
    ok(extract([], tiny_model, tmp_path / "file.h5", "--files-from", listing, "--null"))
    assert stored_paths(tmp_path / "file.h5") == stored_paths(out)


def test_explicitly_named_non_image_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "imgs"
    photos(folder, 2)
    notes = folder / "notes.txt"
    notes.write_text("this is not a picture\n")
    ok(extract([folder], tiny_model, tmp_path / "dir.h5"))  # skipped by extension in a directory ...
    assert len(stored_paths(tmp_path / "dir.h5")) == 2
    out = tmp_path / "out.h5"
    line = error_line(extract([folder, notes], tiny_model, out), 1)  # ... an error when named
    assert str(notes) in line
    assert not out.exists() and not partials(out)
    ok(extract([folder, notes], tiny_model, out, "--skip-bad"), 1)  # recorded as a failure with --skip-bad
    with h5py.File(out, "r") as f:
        assert f["failures/path"].asstr()[...].tolist() == [str(notes)]
        assert f["failures/index"][...].tolist() == [2]


def test_missing_listed_file_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images[0]}\n{tmp_path / 'gone.png'}\n")
    line = error_line(extract([], tiny_model, tmp_path / "out.h5", "--files-from", listing), 1)
    assert "gone.png" in line


@pytest.mark.parametrize("how", ["nothing", "empty list", "missing list"])
def test_no_inputs_is_a_usage_error(tmp_path: Path, tiny_model: Path, how: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    extra = {
        "nothing": [],
        "empty list": ["--files-from", empty],
        "missing list": ["--files-from", tmp_path / "no.txt"],
    }
    out = tmp_path / "out.h5"
    error_line(extract([], tiny_model, out, *extra[how]), 2)
    assert not out.exists()


# ---------------------------------------------------------------- 2. stdout and stderr


def test_stdout_is_exactly_the_output_path(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    result = ok(extract(images, tiny_model, out))
    assert result.stdout == f"{out}\n"
    assert "wrote 2 images" in result.stderr  # logs go to stderr
    assert "\r" not in result.stderr  # CliRunner's stderr is not a terminal: no progress line


def test_json_summary(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    result = ok(extract(images, tiny_model, out, "--json"))
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["output"] == str(out)
    assert summary["images_written"] == 3
    assert summary["images_failed"] == []
    assert summary["layers"] == LAYERS
    assert summary["bytes"] == out.stat().st_size > 0
    assert isinstance(summary["seconds"], int | float) and 0 <= summary["seconds"] < 60


def test_quiet_leaves_stderr_empty(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    result = ok(extract(images, tiny_model, out, "--quiet"))
    assert result.stderr == ""
    assert result.stdout == f"{out}\n"
    result = ok(extract(images, tiny_model, tmp_path / "q.h5", "-q", "--json"))
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
    images = photos(tmp_path / "imgs", 4)
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


# ---------------------------------------------------------------- 3. exit codes and --skip-bad


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[list[Path], dict[int, str]]:
    """Good and bad images interleaved: (the list, {position of a bad one: word its reason contains})."""
    good = photos(tmp_path / "imgs", 3)
    cut = truncated_jpeg(tmp_path / "imgs" / "cut.jpg")  # header fine, decode fails
    text = tmp_path / "imgs" / "notes.jpg"
    text.write_text("this is not a picture\n" * 20)
    empty = tmp_path / "imgs" / "empty.png"
    empty.write_bytes(b"")
    images = [good[0], cut, good[1], text, empty, good[2]]
    return images, {1: "decode", 3: "not an image", 4: "empty"}


def test_skip_bad_records_failures_and_exits_1(tmp_path: Path, tiny_model: Path, mixed: tuple) -> None:
    images, bad = mixed
    out = tmp_path / "out.h5"
    result = ok(extract(images, tiny_model, out, "--skip-bad", "--json", "-b", "2"), 1)
    summary = json.loads(result.stdout)  # results still on stdout
    assert summary["images_written"] == 3
    failed = {f["index"]: f for f in summary["images_failed"]}
    assert sorted(failed) == sorted(bad)
    for index, word in bad.items():
        assert failed[index]["path"] == str(images[index])
        assert word in failed[index]["reason"]
    assert "3 failed" in result.stderr
    assert out.exists() and not partials(out)
    good = [i for i in range(len(images)) if i not in bad]
    assert stored_paths(out) == [str(images[i]) for i in good]
    assert stored_index(out) == good
    with h5py.File(out, "r") as f:
        assert int(f.attrs["complete"]) == 1
        assert int(f.attrs["n_images"]) == 3
        assert int(f.attrs["n_inputs"]) == len(images)
        for key in maps_of(out):
            assert f[f"layers/{key}"].shape[0] == 3
            assert np.isfinite(f[f"layers/{key}"][...]).all()  # every row written (fill value is NaN)
        recorded = f["failures/index"][...].tolist()
        paths = f["failures/path"].asstr()[...].tolist()
        reasons = f["failures/reason"].asstr()[...].tolist()
    assert sorted(recorded) == sorted(bad)
    for index, path, reason in zip(recorded, paths, reasons, strict=True):
        assert path == str(images[index])
        assert bad[index] in reason
        assert str(images[index]) not in reason  # the reason alone, readable next to its path
    check_stats_match_maps(out)


def test_skip_bad_output_path_on_stdout(tmp_path: Path, tiny_model: Path, mixed: tuple) -> None:
    images, _ = mixed
    out = tmp_path / "out.h5"
    result = ok(extract(images, tiny_model, out, "--skip-bad"), 1)
    assert result.stdout == f"{out}\n"


def test_bad_image_without_skip_bad_leaves_nothing(tmp_path: Path, tiny_model: Path, mixed: tuple) -> None:
    images, _ = mixed
    out = tmp_path / "out.h5"
    line = error_line(extract(images, tiny_model, out, "-b", "1"), 1)
    assert str(images[1]) in line or str(images[3]) in line
    assert not out.exists() and not partials(out)


@pytest.mark.parametrize("kind", ["header", "decode"])
def test_all_bad_with_skip_bad(tmp_path: Path, tiny_model: Path, kind: str) -> None:
    bad = []
    for i in range(3):
        path = tmp_path / f"bad{i}.jpg"
        if kind == "header":
            path.write_text("not a picture")
        else:
            truncated_jpeg(path)
        bad.append(path)
    out = tmp_path / "out.h5"
    line = error_line(extract(bad, tiny_model, out, "--skip-bad"), 1)
    assert "no image" in line and str(bad[0]) in line
    assert not out.exists() and not partials(out)


# ---------------------------------------------------------------- 4. storage options


def test_float16_maps_equal_float32_cast(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 3)
    full, half = tmp_path / "f32.h5", tmp_path / "f16.h5"
    ok(extract(images, tiny_model, full))
    ok(extract(images, tiny_model, half, "--dtype", "float16"))
    want, got = maps_of(full), maps_of(half)
    assert got.keys() == want.keys() and len(got) == 4
    for key in want:
        assert want[key].dtype == np.float32
        assert got[key].dtype == np.float16, key
        np.testing.assert_array_equal(got[key], want[key].astype(np.float16), err_msg=key)
    assert half.stat().st_size < full.stat().st_size
    with h5py.File(half, "r") as f:
        assert json.loads(f.attrs["storage"])["dtype"] == "float16"


def test_float16_overflow_is_a_clean_error(tmp_path: Path) -> None:
    weights = tiny_weights()
    weights["conv1.weight"] = weights["conv1.weight"] * 1e6  # z of conv1 far beyond 65504
    huge = spec_with_weights(tmp_path, "huge", weights)
    images = photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    ok(extract(images, huge, tmp_path / "f32.h5"))  # fine in float32
    line = error_line(extract(images, huge, out, "--dtype", "float16"), 1)
    assert "conv1" in line and "--dtype" in line and "float16" in line
    assert not out.exists() and not partials(out)


def codecs(path: Path) -> dict[str, tuple[Any, Any]]:
    with h5py.File(path, "r") as f:
        return {
            f"{layer}/{role}": (f[f"layers/{layer}/{role}"].compression, f[f"layers/{layer}/{role}"].compression_opts)
            for layer in f["layers"]
            for role in ROLES
        }


@pytest.mark.parametrize(
    ("options", "z", "a"),
    [
        ([], (None, None), ("gzip", 1)),
        (["--compression", "lzf"], (None, None), ("lzf", None)),
        (["--compression", "none"], (None, None), (None, None)),
        (["--compression", "gzip:4"], (None, None), ("gzip", 4)),
        (["--compression", "gzip"], (None, None), ("gzip", 1)),
        (["--z-compression", "gzip"], ("gzip", 1), ("gzip", 1)),
        (["--z-compression", "lzf", "--compression", "none"], ("lzf", None), (None, None)),
        (["--z-compression", "gzip:6", "--compression", "lzf"], ("gzip", 6), ("lzf", None)),
    ],
)
def test_compression_options(tmp_path: Path, tiny_model: Path, options: list[str], z: tuple, a: tuple) -> None:
    images = photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    ok(extract(images, tiny_model, out, *options))
    found = codecs(out)
    for layer in LAYERS:
        assert found[f"{layer}/preactivation"] == z
        assert found[f"{layer}/activation"] == a
    ok(extract(images, tiny_model, tmp_path / "plain.h5", "--compression", "none"))
    want = maps_of(tmp_path / "plain.h5")
    for key, values in maps_of(out).items():  # lossless
        np.testing.assert_array_equal(values, want[key])


@pytest.mark.parametrize(
    ("options", "z", "a"),
    [
        # each codec keeps its own level
        (["--compression", "gzip:4", "--z-compression", "gzip:9"], ("gzip", 9), ("gzip", 4)),
        # level 0 is a valid gzip level (store only), not "default"
        (["--compression", "gzip:0"], (None, None), ("gzip", 0)),
    ],
)
def test_compression_levels_are_honoured(
    tmp_path: Path, tiny_model: Path, options: list[str], z: tuple, a: tuple
) -> None:
    images = photos(tmp_path / "imgs", 1)
    out = tmp_path / "out.h5"
    ok(extract(images, tiny_model, out, *options))
    found = codecs(out)
    assert found["conv1/preactivation"] == z
    assert found["conv1/activation"] == a


@pytest.mark.parametrize("value", ["zstd", "gzip:10", "lzf:3", "none:1", "gzip:x"])
def test_bad_compression_is_a_usage_error(tmp_path: Path, tiny_model: Path, value: str) -> None:
    images = photos(tmp_path / "imgs", 1)
    for option in ("--compression", "--z-compression"):
        line = error_line(extract(images, tiny_model, tmp_path / "out.h5", option, value), 2)
        assert option in line


def test_store_a_only(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 3)
    both, only_a = tmp_path / "both.h5", tmp_path / "a.h5"
    ok(extract(images, tiny_model, both))
    ok(extract(images, tiny_model, only_a, "--store", "a"))
    with h5py.File(only_a, "r") as f:
        for layer in LAYERS:
            group = f[f"layers/{layer}"]
            assert "preactivation" not in group
            assert "activation" in group
            assert "preactivation_mean" in group["stats"]  # z statistics still computed while writing
    want = maps_of(both)
    for key, values in maps_of(only_a).items():
        np.testing.assert_array_equal(values, want[key])
    want_stats = stats_of(both)
    got_stats = stats_of(only_a)
    assert got_stats.keys() == want_stats.keys()
    for key in want_stats:
        np.testing.assert_allclose(got_stats[key], want_stats[key], rtol=1e-6, err_msg=key)
    assert only_a.stat().st_size < both.stat().st_size


def test_store_z_only(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 2)
    out = tmp_path / "z.h5"
    ok(extract(images, tiny_model, out, "--store", "z"))
    with h5py.File(out, "r") as f:
        for layer in LAYERS:
            group = f[f"layers/{layer}"]
            assert "activation" not in group
            assert "preactivation" in group
            assert int(group.attrs["has_activation"]) == 0
            assert "activation_max" in group["stats"]
    ok(extract(images, tiny_model, tmp_path / "zz.h5", "--store", "z,z"))


@pytest.mark.parametrize("value", ["x", "z,x", "", "b"])
def test_bad_store_is_a_usage_error(tmp_path: Path, tiny_model: Path, value: str) -> None:
    images = photos(tmp_path / "imgs", 1)
    out = tmp_path / "out.h5"
    line = error_line(extract(images, tiny_model, out, "--store", value), 2)
    assert "--store" in line
    assert not out.exists()


def test_write_time_statistics_match_numpy(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 7, size=(22, 30))
    out = tmp_path / "out.h5"
    ok(extract(images, tiny_model, out, "-b", "3"))  # batches of 3, 3, 1 merged
    check_stats_match_maps(out)
    with h5py.File(out, "r") as f:
        stats = f["layers/conv1/stats"]
        assert stats["image_max"].shape == (7, 4)
        assert stats["image_argmax"].shape == (7, 4, 2)
        assert stats["activation_std"].shape == (4,)
        assert stats["image_zero_fraction"][...].max() > 0  # relu zeros exist: the zero check means something


# ---------------------------------------------------------------- 5. --resume


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path, tiny_model: Path) -> None:
    """The installed script, SIGKILLed while writing, then --resume: same file as one clean run."""
    folder = tmp_path / "imgs"
    images = photos(folder, 200, size=(12, 12))
    out = tmp_path / "out.h5"
    proc = subprocess.Popen(
        [str(FMAP), "extract", folder, "-m", tiny_model, "-o", out, "-b", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=script_env(),
    )
    kept = 0
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            found = partials(out)
            if found:
                try:  # the writer holds an HDF5 lock: read without locking, retry on a torn read
                    with h5py.File(found[0], "r", locking=False) as f:
                        kept = int(f.attrs["n_images"])
                except (OSError, KeyError, ValueError):
                    kept = 0
                if kept >= 3:
                    break
            time.sleep(0.005)
        assert kept >= 3, f"never saw 3 images written; exit {proc.poll()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the run finished before it was killed"
    [partial] = partials(out)
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["complete"]) == 0

    # the resume runs in a process of its own too: a crash (e.g. HDF5 on a damaged file) fails this
    # test instead of killing pytest
    resumed = subprocess.run(
        [str(FMAP), "extract", folder, "-m", tiny_model, "-o", out, "--resume"],
        capture_output=True,
        text=True,
        env=script_env(),
        timeout=120,
    )
    assert resumed.returncode == 0, f"exit {resumed.returncode}\n{resumed.stderr}"
    assert resumed.stdout == f"{out}\n"
    assert "continuing" in resumed.stderr, resumed.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(extract([folder], tiny_model, reference))
    assert stored_paths(out) == [str(p) for p in images]
    assert_same_result(out, reference)
    check_stats_match_maps(out)


def test_resume_from_interrupted_partial(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 9)
    out = tmp_path / "out.h5"
    make_partial(images, tiny_model, out, batch_size=2, batches=2)
    result = ok(extract(images, tiny_model, out, "--resume", "-b", "2", "--json"))
    assert "continuing" in result.stderr and "4 images kept" in result.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(extract(images, tiny_model, reference, "-b", "4"))
    assert_same_result(out, reference)
    check_stats_match_maps(out)


def test_resume_without_partial_starts_fresh(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    result = ok(extract(images, tiny_model, out, "--resume"))
    assert "starting from the beginning" in result.stderr
    assert "no temporary file" in result.stderr
    assert stored_paths(out) == [str(p) for p in images]
    assert not partials(out)


def test_resume_from_corrupt_partial_starts_over(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 6)
    out = tmp_path / "out.h5"
    partial = make_partial(images, tiny_model, out)
    partial.write_bytes(partial.read_bytes()[:7])
    result = ok(extract(images, tiny_model, out, "--resume"))
    assert "unreadable" in result.stderr and "starting from the beginning" in result.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(extract(images, tiny_model, reference))
    assert_same_result(out, reference)


def test_resume_from_partial_with_no_images_yet(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed after creating its temporary file but before its first batch was written
    (e.g. while the first images decode) leaves a partial with n_images = 0 and no channel statistics."""
    images = photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    orphan = out.with_name(f".{out.name}.99999-0a1b2c.partial")  # as a killed process 99999 would name it

    class KilledError(Exception):
        pass

    def killed_before_first_batch(self: MapWriter, batch: Any) -> None:
        self.file().flush()
        orphan.write_bytes(self.path.read_bytes())  # the file as a SIGKILL here would leave it
        raise KilledError

    with monkeypatch.context() as patch:
        patch.setattr(MapWriter, "append", killed_before_first_batch)
        with pytest.raises(KilledError):
            pipeline.extract(extract_options([str(p) for p in images], out=out, model=str(tiny_model)))
    assert partials(out) == [orphan]
    ok(extract(images, tiny_model, out, "--resume"))
    assert stored_paths(out) == [str(p) for p in images]
    assert not partials(out)
    check_stats_match_maps(out)


@pytest.mark.parametrize("differ", ["weights", "input list"])
def test_resume_partial_made_differently_is_a_usage_error(tmp_path: Path, tiny_model: Path, differ: str) -> None:
    images = photos(tmp_path / "imgs", 6)
    out = tmp_path / "out.h5"
    partial = make_partial(images, tiny_model, out)
    before = partial.read_bytes()
    model = tiny_model
    if differ == "weights":
        model = spec_with_weights(tmp_path, "other", tiny_weights(seed=1))
    else:
        images = [*images, *photos(tmp_path / "more", 1, start=50)]
    line = error_line(extract(images, model, out, "--resume"), 2)
    assert differ in line and "--resume" in line
    assert partial.read_bytes() == before  # kept for a run that matches
    assert not out.exists()


def test_resume_with_changed_image_starts_over(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 6)
    out = tmp_path / "out.h5"
    make_partial(images, tiny_model, out)
    make_photo(16, 18, seed=99).save(images[1])  # written before the interruption, changed since
    result = ok(extract(images, tiny_model, out, "--resume"))
    assert "changed since it was written" in result.stderr and "starting from the beginning" in result.stderr
    assert str(images[1]) in result.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(extract(images, tiny_model, reference))
    assert_same_result(out, reference)


def test_resume_with_skip_bad_processes_every_image(tmp_path: Path, tiny_model: Path) -> None:
    """--skip-bad records bad headers before the first batch; a resumed run must still do every
    good image between the last written batch and a bad image further down the list."""
    images = photos(tmp_path / "imgs", 9)
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_text("not an image")
    images.insert(8, bad)  # positions 0-7 good, 8 bad, 9 good
    out = tmp_path / "out.h5"
    make_partial(images, tiny_model, out, batch_size=2, batches=2, skip_bad=True)  # 0-3 written
    ok(extract(images, tiny_model, out, "--resume", "--skip-bad", "-b", "2"), 1)
    assert stored_index(out) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    with h5py.File(out, "r") as f:
        assert f["failures/index"][...].tolist() == [8]  # recorded once
    check_stats_match_maps(out)


# ---------------------------------------------------------------- 6. --append


def test_append_adds_images(tmp_path: Path, tiny_model: Path) -> None:
    old = photos(tmp_path / "imgs", 3)
    new = photos(tmp_path / "imgs", 2, start=10)
    out = tmp_path / "out.h5"
    ok(extract(old, tiny_model, out))
    before = maps_of(out)
    result = ok(extract(new, tiny_model, out, "--append", "--json"))
    assert json.loads(result.stdout)["output"] == str(out)
    assert not partials(out)
    with h5py.File(out, "r") as f:
        assert int(f.attrs["n_images"]) == 5
        assert int(f.attrs["n_inputs"]) == 5
        assert int(f.attrs["complete"]) == 1
    assert stored_paths(out) == [str(p) for p in (*old, *new)]
    after = maps_of(out)
    for key, values in before.items():
        np.testing.assert_array_equal(after[key][:3], values, err_msg=key)  # old maps untouched
    reference = tmp_path / "ref.h5"
    ok(extract([*old, *new], tiny_model, reference))
    for key, values in maps_of(reference).items():
        np.testing.assert_allclose(after[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    check_stats_match_maps(out)  # statistics cover old and new images


def test_append_indices_continue_after_old_inputs(tmp_path: Path, tiny_model: Path) -> None:
    old = photos(tmp_path / "imgs", 3)
    new = photos(tmp_path / "imgs", 2, start=10)
    out = tmp_path / "out.h5"
    ok(extract(old, tiny_model, out))
    ok(extract(new, tiny_model, out, "--append"))
    assert stored_index(out) == [0, 1, 2, 3, 4]


def test_append_reports_images_written_by_this_run(tmp_path: Path, tiny_model: Path) -> None:
    old = photos(tmp_path / "imgs", 3)
    new = photos(tmp_path / "imgs", 2, start=10)
    out = tmp_path / "out.h5"
    ok(extract(old, tiny_model, out))
    result = ok(extract(new, tiny_model, out, "--append", "--json"))
    assert json.loads(result.stdout)["images_written"] == 2


def test_interrupted_append_leaves_out_unchanged_and_rerun_appends_once(tmp_path: Path, tiny_model: Path) -> None:
    """An --append stopped part-way leaves OUT exactly as it was (the appended file is built beside
    it); rerunning the same command (as its message says) gives old + new images, each once, with
    indices continuing after the old list."""
    old = photos(tmp_path / "imgs", 3)
    new = photos(tmp_path / "imgs", 4, start=10)
    out = tmp_path / "out.h5"
    ok(extract(old, tiny_model, out))
    polls = 0

    def stop() -> int | None:
        nonlocal polls
        polls += 1
        return signal.SIGTERM if polls >= 4 else None  # after 2 batches of 1

    before = out.read_bytes()
    options = extract_options([str(p) for p in new], out=out, model=str(tiny_model), batch_size=1, append=True)
    with pytest.raises(StoppedError) as stopped:
        pipeline.extract(options, stop_requested=stop)
    assert str(stopped.value) == f"interrupted by signal 15; {out} is unchanged; rerun the same command to append"
    assert out.read_bytes() == before and not partials(out)
    ok(extract(new, tiny_model, out, "--append"))
    assert stored_paths(out) == [str(p) for p in (*old, *new)]
    assert stored_index(out) == list(range(7))
    with h5py.File(out, "r") as f:
        assert int(f.attrs["complete"]) == 1
        assert int(f.attrs["n_images"]) == 7
        assert int(f.attrs["n_inputs"]) == 7
    check_stats_match_maps(out)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("model", "model"),
        ("weights", "weights"),
        ("layers", "layers"),
        ("dtype", "--dtype"),
        ("store", "--store"),
        ("save-input", "--save-input"),
    ],
)
def test_append_made_differently_is_refused(tmp_path: Path, tiny_model: Path, change: str, named: str) -> None:
    old = photos(tmp_path / "imgs", 2)
    new = photos(tmp_path / "imgs", 1, start=10)
    out = tmp_path / "out.h5"
    ok(extract(old, tiny_model, out))
    before = out.read_bytes()
    model, extra = tiny_model, []
    if change == "model":
        model = tmp_path / "wider.toml"
        model.write_text(TINY_SPEC.replace("out_channels = 5", "out_channels = 6"))
        weights = tiny_weights()
        weights["conv2.weight"] = np.concatenate([weights["conv2.weight"], weights["conv2.weight"][:1]])
        weights["conv2.bias"] = np.concatenate([weights["conv2.bias"], weights["conv2.bias"][:1]])
        np.savez(tmp_path / "tiny.npz", **weights)  # same weights file name, so only the model differs
    elif change == "weights":
        model = spec_with_weights(tmp_path, "other", tiny_weights(seed=3))
    else:
        extra = {"layers": ["--layers", "conv1"], "dtype": ["--dtype", "float16"], "store": ["--store", "a"]}.get(
            change, ["--save-input"]
        )
    line = error_line(extract(new, model, out, "--append", *extra), 2)
    assert named in line and "--append" in line
    assert out.read_bytes() == before
    assert not partials(out)


def test_append_to_missing_file(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 1)
    out = tmp_path / "missing.h5"
    line = error_line(extract(images, tiny_model, out, "--append"), 2)
    assert str(out) in line
    assert not out.exists()


@pytest.mark.parametrize("other", ["--overwrite", "--resume"])
def test_append_with_overwrite_or_resume(tmp_path: Path, tiny_model: Path, other: str) -> None:
    images = photos(tmp_path / "imgs", 1)
    out = tmp_path / "out.h5"
    ok(extract(images, tiny_model, out))
    before = out.read_bytes()
    line = error_line(extract(images, tiny_model, out, "--append", other), 2)
    assert other in line
    assert out.read_bytes() == before


# ---------------------------------------------------------------- 7. --shard


def shard_attrs(path: Path) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        return int(f.attrs["shard_index"]), int(f.attrs["shard_count"])


def test_shards_are_disjoint_contiguous_and_cover_the_list(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 10)
    seen: list[int] = []
    fingerprints = set()
    for k in range(3):
        out = tmp_path / f"shard{k}.h5"
        ok(extract(images, tiny_model, out, "--shard", f"{k}/3"))
        assert shard_attrs(out) == (k, 3)
        index = stored_index(out)
        assert index, f"shard {k} is empty"
        assert index == list(range(index[0], index[-1] + 1))  # contiguous
        assert stored_paths(out) == [str(images[i]) for i in index]  # global positions
        seen += index
        with h5py.File(out, "r") as f:
            assert int(f.attrs["n_inputs"]) == 10
            fingerprints.add(f.attrs["input_list_sha256"])
    assert seen == list(range(10))  # disjoint, in order, covering
    assert len(fingerprints) == 1  # every shard records the whole list's fingerprint


@pytest.mark.parametrize("value", ["3/3", "x", "-1/3", "1/0", "1", "1/3/5", "a/b"])
def test_bad_shard_is_a_usage_error(tmp_path: Path, tiny_model: Path, value: str) -> None:
    images = photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    line = error_line(extract(images, tiny_model, out, "--shard", value), 2)
    assert "--shard" in line
    assert not out.exists()


SLURM_TASK = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}


def test_shard_from_slurm_environment(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 10)
    out = tmp_path / "out.h5"
    ok(extract(images, tiny_model, out, env=SLURM_TASK))
    assert shard_attrs(out) == (1, 3)
    assert stored_index(out) == [3, 4, 5]


def test_explicit_shard_overrides_slurm(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 10)
    out = tmp_path / "out.h5"
    ok(extract(images, tiny_model, out, "--shard", "2/4", env=SLURM_TASK))
    assert shard_attrs(out) == (2, 4)
    assert stored_index(out) == [5, 6]


def test_invalid_slurm_environment_is_a_usage_error(tmp_path: Path, tiny_model: Path) -> None:
    images = photos(tmp_path / "imgs", 3)
    env = {**SLURM_TASK, "SLURM_ARRAY_TASK_ID": "7"}  # 7 - 4 = 3, not below 3
    line = error_line(extract(images, tiny_model, tmp_path / "out.h5", env=env), 2)
    assert "SLURM_ARRAY_TASK_ID" in line and "--shard" in line


# ---------------------------------------------------------------- 8. memory is O(batch)


def test_memory_is_bounded_by_the_batch(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer receives one batch at a time, and decoding runs only a bounded number of batches
    ahead of the model: never the whole list."""
    images = photos(tmp_path / "imgs", 60, size=(10, 12))
    workers, batch_size = 2, 4
    largest: list[int] = []
    lead = {"decoded": 0, "written": 0, "most_ahead": 0}
    real_load, real_append = pipeline.load_batch, MapWriter.append

    def load(*args: Any, **kw: Any) -> Any:
        result = real_load(*args, **kw)
        lead["decoded"] += 1  # += on a dict item under the GIL; worst case the count is off by one
        lead["most_ahead"] = max(lead["most_ahead"], lead["decoded"] - lead["written"])
        return result

    def append(self: MapWriter, batch: Any) -> None:
        arrays = [m for pair in batch.maps.values() for m in pair if m is not None]
        largest.append(max(a.shape[0] for a in arrays))
        assert all(a.shape[0] == len(batch.paths) for a in arrays)
        lead["written"] += 1
        real_append(self, batch)

    monkeypatch.setattr(pipeline, "load_batch", load)
    monkeypatch.setattr(MapWriter, "append", append)
    out = tmp_path / "out.h5"
    options = extract_options(
        [str(p) for p in images], out=out, model=str(tiny_model), batch_size=batch_size, workers=workers
    )
    result = pipeline.extract(options)
    assert result.images_written == 60
    assert len(largest) == 15 and max(largest) == batch_size
    assert lead["decoded"] == 15
    # decoded ahead + in the forward pass + queued for the writer thread + being written: a constant
    assert lead["most_ahead"] <= pipeline.DECODE_AHEAD * workers + 1 + WRITE_BEHIND + 1, lead
    with h5py.File(out, "r") as f:
        for key in maps_of(out):
            ds = f[f"layers/{key}"]
            assert ds.maxshape[0] is None  # resizable along N: appended batch by batch
            assert ds.chunks is not None and ds.chunks[0] == 1


def test_more_array_tasks_than_images_is_no_error(tmp_path: Path, tiny_model: Path) -> None:
    """A SLURM array larger than the input list: the empty task exits 0 and writes nothing, and
    the merge of the others does not miss it."""
    images = photos(tmp_path / "imgs", 2)
    outs = [tmp_path / f"shard_{k}.h5" for k in range(3)]
    results = [extract(images, tiny_model, out, "--shard", f"{k}/3") for k, out in enumerate(outs)]
    assert [r.exit_code for r in results] == [0, 0, 0]
    empty = [k for k, out in enumerate(outs) if not out.exists()]
    assert empty == [0]  # 2 images over 3 shares: share 0 is [0, 0)
    assert results[0].stdout == "" and "is empty: nothing to write" in results[0].stderr
    merged = tmp_path / "all.h5"
    done = invoke("merge", *[out for out in outs if out.exists()], "-o", merged)
    assert done.exit_code == 0, done.output
    assert stored_index(merged) == [0, 1]
