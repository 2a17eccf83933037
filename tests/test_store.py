"""The store's guarantees: atomic, locked output that never replaces what it must not, the storage
options (--dtype, --compression, --store), continuation (--resume, --append) that never loses or
duplicates work, and clean failures when the disk does."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import Result
from conftest import TINY_SPEC, extract_options, make_photo, tiny_weights
from helpers import (
    FMAP,
    LAYERS,
    ROLES,
    assert_left_clean,
    check_stats_match_maps,
    error_line,
    extract_fails,
    invoke,
    maps_of,
    ok,
    partials,
    run_extract,
    script_env,
    stop_after,
    stored_index,
    stored_paths,
    truncated_jpeg,
    wait_for_rows,
    write_photos,
)

from fmap_cli.errors import FmapError, StoppedError, UsageError
from fmap_cli.extract import extract
from fmap_cli.store.atomic import AtomicOutput, check_target, partial_files
from fmap_cli.store.merge import merge_shards
from fmap_cli.store.writer import MapWriter


def last_line(result: Result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(4):
        path = tmp_path / f"p{i}.png"
        make_photo(30, 40, seed=i).save(path)
        paths.append(path)
    return paths


SHA = "[0-9a-f]{12}"  # the start of a fingerprint, as error messages show it


def model_args(tiny_model: Path) -> list[str]:
    return ["-m", str(tiny_model), "--device", "cpu"]


def n_images(path: Path) -> int:
    with h5py.File(path, "r") as f:
        return int(f.attrs["n_images"])


# ---------------------------------------------------------------------------- where output may go


@pytest.mark.parametrize("command", ["extract", "merge"])
def test_output_that_is_not_a_regular_file_is_never_replaced(
    command: str, photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    """-o /dev/null --overwrite (as root) used to replace the device node with an HDF5 file."""
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    link = tmp_path / "null.h5"
    link.symlink_to(os.devnull)
    for target, kind in ((fifo, "a FIFO"), (link, "a character device")):
        if command == "extract":
            result = invoke("extract", photos[0], *model_args(tiny_model), "-o", target, "--overwrite")
        else:
            result = invoke("merge", photos[0], "-o", target, "--overwrite")
        assert result.exit_code == 2, result.output
        assert last_line(result) == f"Error: -o {target}: exists and is not a regular file ({kind}); give a file name"
    assert fifo.is_fifo() and link.is_symlink() and str(link.readlink()) == os.devnull
    assert partial_files(fifo) == [] and partial_files(link) == []


def test_symlink_to_a_regular_file_is_an_output_like_any_file(tmp_path: Path) -> None:
    target = tmp_path / "real.h5"
    target.write_bytes(b"old")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="already exists; pass --overwrite"):
        check_target(link, overwrite=False)
    check_target(link, overwrite=True)


def test_publish_never_replaces_an_output_that_appeared_meanwhile(tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    with AtomicOutput(out) as output:
        output.path.write_bytes(b"ours")
        out.write_bytes(b"theirs")  # another run published first
        with pytest.raises(FmapError) as caught:
            output.publish()
    assert str(caught.value) == (
        f"{out}: appeared while this run was writing (another run with the same output?); "
        f"not replaced: this run's file is kept as {output.path}"
    )
    assert out.read_bytes() == b"theirs" and output.path.read_bytes() == b"ours"


def test_two_runs_with_the_same_output_the_second_to_finish_fails(
    photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.h5"
    other = tmp_path / "other.h5"
    extract(extract_options(photos[:1], other, model=str(tiny_model), device="cpu"))

    def other_run_finishes() -> None:  # polled between batches: the other run publishes meanwhile
        if not out.exists():
            other.replace(out)

    options = extract_options(photos, out, model=str(tiny_model), device="cpu", batch_size=2)
    with pytest.raises(FmapError, match=r"appeared while this run was writing") as caught:
        extract(options, stop_requested=lambda: other_run_finishes())
    assert n_images(out) == 1  # the other run's file, untouched
    kept = partial_files(out)
    assert [str(p) for p in kept] == [str(caught.value).rsplit(" kept as ", 1)[1]]
    assert n_images(kept[0]) == 4


def test_an_empty_shard_with_overwrite_removes_an_older_output(
    photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "shard_0.h5"
    out.write_bytes(b"from an earlier job")
    result = invoke("extract", *photos, *model_args(tiny_model), "--shard", "0/6", "-o", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "shard 0/6 (from --shard or SLURM_ARRAY_*) of 4 input(s) is empty: nothing to write; "
        "fmap merge does not expect it",
        f"removed the older {out} (--overwrite)",
    ]
    assert not out.exists()


def test_bad_file_in_middle_with_overwrite_keeps_old_file(
    tmp_path: Path, tiny_model: Path, good: list[Path], outdir: Path
) -> None:
    out = outdir / "out.h5"
    assert invoke("extract", good[0], "-m", tiny_model, "-o", out).exit_code == 0
    old = out.read_bytes()
    bad = truncated_jpeg(tmp_path / "middle.jpg")
    result = invoke("extract", good[0], bad, good[1], "-m", tiny_model, "-o", out, "--batch-size", "1", "--overwrite")
    assert error_line(result, 1).startswith(f"Error: {bad}: cannot decode image: ")  # then Pillow's words
    assert out.read_bytes() == old  # a failed --overwrite run does not destroy the previous result
    assert_left_clean(outdir, {"out.h5"})


def test_existing_output_untouched_without_overwrite(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    out = outdir / "out.h5"
    out.write_bytes(b"precious bytes")
    line = extract_fails(good, tiny_model, outdir, 2)
    assert line == f"Error: {out}: already exists; pass --overwrite to replace it"
    assert out.read_bytes() == b"precious bytes"


def test_output_directory_missing(good: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "nonexistent" / "dir" / "out.h5"
    line = error_line(invoke("extract", *good, "-m", tiny_model, "-o", out), 2)
    assert line == f"Error: -o {out}: directory {out.parent} does not exist"
    assert not (tmp_path / "nonexistent").exists()


def test_output_is_an_existing_directory(good: list[Path], tiny_model: Path, outdir: Path) -> None:
    target = outdir / "maps.h5"
    target.mkdir()
    line = error_line(invoke("extract", *good, "-m", tiny_model, "-o", target), 2)
    assert line.startswith("Error: Invalid value for '-o' / '--output': ") and "maps.h5" in line  # click's words
    assert_left_clean(outdir, {"maps.h5"})
    assert target.is_dir() and not any(target.iterdir())


# ---------------------------------------------------------------------------- storage: --dtype, --compression, --store


def test_float16_maps_equal_float32_cast(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 3)
    full, half = tmp_path / "f32.h5", tmp_path / "f16.h5"
    ok(run_extract(images, tiny_model, full))
    ok(run_extract(images, tiny_model, half, "--dtype", "float16"))
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
    images = write_photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    ok(run_extract(images, huge, tmp_path / "f32.h5"))  # fine in float32
    line = error_line(run_extract(images, huge, out, "--dtype", "float16"), 1)
    assert re.fullmatch(r"Error: layer 'conv1': values up to \S+ overflow float16; use --dtype float32", line), line
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
    images = write_photos(tmp_path / "imgs", 2)
    out = tmp_path / "out.h5"
    ok(run_extract(images, tiny_model, out, *options))
    found = codecs(out)
    for layer in LAYERS:
        assert found[f"{layer}/preactivation"] == z
        assert found[f"{layer}/activation"] == a
    ok(run_extract(images, tiny_model, tmp_path / "plain.h5", "--compression", "none"))
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
    images = write_photos(tmp_path / "imgs", 1)
    out = tmp_path / "out.h5"
    ok(run_extract(images, tiny_model, out, *options))
    found = codecs(out)
    assert found["conv1/preactivation"] == z
    assert found["conv1/activation"] == a


def test_store_a_only(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 3)
    both, only_a = tmp_path / "both.h5", tmp_path / "a.h5"
    ok(run_extract(images, tiny_model, both))
    ok(run_extract(images, tiny_model, only_a, "--store", "a"))
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
    images = write_photos(tmp_path / "imgs", 2)
    out = tmp_path / "z.h5"
    ok(run_extract(images, tiny_model, out, "--store", "z"))
    with h5py.File(out, "r") as f:
        for layer in LAYERS:
            group = f[f"layers/{layer}"]
            assert "activation" not in group
            assert "preactivation" in group
            assert int(group.attrs["has_activation"]) == 0
            assert "activation_max" in group["stats"]
    ok(run_extract(images, tiny_model, tmp_path / "zz.h5", "--store", "z,z"))


# ---------------------------------------------------------------------------- --resume


def killed_run(photos: list[Path], tiny_model: Path, out: Path) -> Path:
    """The temporary file a run stopped after its first batch keeps."""
    stop, progress = stop_after(1)
    with pytest.raises(StoppedError):
        extract(
            extract_options(photos, out, model=str(tiny_model), device="cpu", batch_size=1),
            stop_requested=stop,
            progress=progress,
        )
    (kept,) = partial_files(out)
    return kept


def test_resume_never_touches_the_file_of_a_run_still_writing(
    photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.h5"
    kept = killed_run(photos, tiny_model, out)
    with AtomicOutput(out) as live:  # a live run's temporary file: newest, and locked
        live.path.write_bytes(b"half-written")
        os.utime(live.path, (kept.stat().st_mtime + 10,) * 2)
        result = invoke("extract", *photos, *model_args(tiny_model), "-b", "1", "-o", out, "--resume")
        assert result.exit_code == 1, result.output
        assert last_line(result) == (
            f"Error: --resume: {live.path} is being written by a running fmap (process {os.getpid()}); "
            "wait for it to finish or stop it"
        )
        assert live.path.read_bytes() == b"half-written" and kept.exists() and not out.exists()


@pytest.mark.parametrize("name", ["run[1].h5", "a*b?.h5"])
def test_resume_finds_its_file_whatever_the_name(
    name: str, photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / name
    kept = killed_run(photos, tiny_model, out)
    result = invoke("extract", *photos, *model_args(tiny_model), "-b", "1", "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert f"--resume: continuing {kept.name}: 1 images kept, 3 to go" in result.stderr
    assert n_images(out) == 4 and partial_files(out) == [] and not kept.exists()


def test_resume_ignores_the_temporary_files_of_other_outputs(
    photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    """x.h5's files are not x.h5.2.h5's: a glob on '.x.h5.*.partial' matched both."""
    longer = tmp_path / "x.h5.2.h5"
    theirs = killed_run(photos, tiny_model, longer)
    out = tmp_path / "x.h5"
    assert partial_files(out) == []
    result = invoke("extract", *photos, *model_args(tiny_model), "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert f"--resume: no temporary file of an earlier run beside {out}; starting from the beginning" in result.stderr
    assert theirs.exists()


def stats_of(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {
            f"{layer}/{name}": f[f"layers/{layer}/stats/{name}"][...]
            for layer in f["layers"]
            for name in f[f"layers/{layer}/stats"]
        }


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

    SIGTERM is 'received' once ``batches`` batches are handled; the library polls for it right after
    each, so it stops there, deterministically.
    """
    stop_requested, progress = stop_after(batches)
    options = extract_options([str(p) for p in images], out=out, model=str(model), batch_size=batch_size, **kw)
    with pytest.raises(StoppedError):
        extract(options, stop_requested=stop_requested, progress=progress)
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


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path: Path, tiny_model: Path) -> None:
    """The installed script, SIGKILLed while writing, then --resume: same file as one clean run."""
    folder = tmp_path / "imgs"
    images = write_photos(folder, 200, size=(12, 12))
    out = tmp_path / "out.h5"
    proc = subprocess.Popen(
        [str(FMAP), "extract", folder, "-m", tiny_model, "-o", out, "-b", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=script_env(),
    )
    try:
        wait_for_rows(out, proc, 3)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "the run finished before it was killed"
    [partial] = partials(out)
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["complete"]) == 0
        kept = int(f.attrs["n_images"])
    assert kept >= 3

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
    assert f"--resume: continuing {partial.name}: {kept} images kept, {200 - kept} to go" in resumed.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(run_extract([folder], tiny_model, reference))
    assert stored_paths(out) == [str(p) for p in images]
    assert_same_result(out, reference)
    check_stats_match_maps(out)


def test_resume_from_interrupted_partial(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 9)
    out = tmp_path / "out.h5"
    make_partial(images, tiny_model, out, batch_size=2, batches=2)
    result = ok(run_extract(images, tiny_model, out, "--resume", "-b", "2", "--json"))
    assert "continuing" in result.stderr and "4 images kept" in result.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(run_extract(images, tiny_model, reference, "-b", "4"))
    assert_same_result(out, reference)
    check_stats_match_maps(out)


def test_resume_without_partial_starts_fresh(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    result = ok(run_extract(images, tiny_model, out, "--resume"))
    assert "starting from the beginning" in result.stderr
    assert "no temporary file" in result.stderr
    assert stored_paths(out) == [str(p) for p in images]
    assert not partials(out)


def test_resume_from_corrupt_partial_starts_over(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 6)
    out = tmp_path / "out.h5"
    partial = make_partial(images, tiny_model, out)
    partial.write_bytes(partial.read_bytes()[:7])
    result = ok(run_extract(images, tiny_model, out, "--resume"))
    assert "unreadable" in result.stderr and "starting from the beginning" in result.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(run_extract(images, tiny_model, reference))
    assert_same_result(out, reference)


def test_resume_from_partial_with_no_images_yet(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed after creating its temporary file but before its first batch was written
    (e.g. while the first images decode) leaves a partial with n_images = 0 and no channel statistics."""
    images = write_photos(tmp_path / "imgs", 3)
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
            extract(extract_options([str(p) for p in images], out=out, model=str(tiny_model)))
    assert partials(out) == [orphan]
    ok(run_extract(images, tiny_model, out, "--resume"))
    assert stored_paths(out) == [str(p) for p in images]
    assert not partials(out)
    check_stats_match_maps(out)


@pytest.mark.parametrize("differ", ["weights", "input list"])
def test_resume_partial_made_differently_is_a_usage_error(tmp_path: Path, tiny_model: Path, differ: str) -> None:
    images = write_photos(tmp_path / "imgs", 6)
    out = tmp_path / "out.h5"
    partial = make_partial(images, tiny_model, out)
    before = partial.read_bytes()
    model = tiny_model
    if differ == "weights":
        model = spec_with_weights(tmp_path, "other", tiny_weights(seed=1))
    else:
        images = [*images, *write_photos(tmp_path / "more", 1, start=50)]
    line = error_line(run_extract(images, model, out, "--resume"), 2)
    differs = {"weights": rf"model; weights \({SHA} vs {SHA}\)", "input list": "input list"}[differ]
    assert re.fullmatch(
        rf"Error: --resume: {re.escape(str(partial))} differs from this run in: {differs}; "
        "delete it or run without --resume",
        line,
    ), line
    assert partial.read_bytes() == before  # kept for a run that matches
    assert not out.exists()


def test_resume_with_changed_image_starts_over(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 6)
    out = tmp_path / "out.h5"
    make_partial(images, tiny_model, out)
    make_photo(16, 18, seed=99).save(images[1])  # written before the interruption, changed since
    result = ok(run_extract(images, tiny_model, out, "--resume"))
    assert "changed since it was written" in result.stderr and "starting from the beginning" in result.stderr
    assert str(images[1]) in result.stderr
    assert not partials(out)
    reference = tmp_path / "ref.h5"
    ok(run_extract(images, tiny_model, reference))
    assert_same_result(out, reference)


def test_resume_with_skip_bad_processes_every_image(tmp_path: Path, tiny_model: Path) -> None:
    """--skip-bad records bad headers before the first batch; a resumed run must still do every
    good image between the last written batch and a bad image further down the list."""
    images = write_photos(tmp_path / "imgs", 9)
    bad = tmp_path / "imgs" / "bad.png"
    bad.write_text("not an image")
    images.insert(8, bad)  # positions 0-7 good, 8 bad, 9 good
    out = tmp_path / "out.h5"
    make_partial(images, tiny_model, out, batch_size=2, batches=2, skip_bad=True)  # 0-3 written
    ok(run_extract(images, tiny_model, out, "--resume", "--skip-bad", "-b", "2"), 1)
    assert stored_index(out) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    with h5py.File(out, "r") as f:
        assert f["failures/index"][...].tolist() == [8]  # recorded once
    check_stats_match_maps(out)


# ---------------------------------------------------------------------------- --append


def test_a_finished_append_run_again_adds_nothing(photos: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    """A scheduler that retries an append which did finish must not duplicate its images."""
    out = tmp_path / "out.h5"
    assert invoke("extract", *photos[:2], *model_args(tiny_model), "-o", out).exit_code == 0
    first = invoke("extract", *photos[2:], *model_args(tiny_model), "-o", out, "--append")
    assert first.exit_code == 0, first.output
    again = invoke("extract", *photos[2:], *model_args(tiny_model), "-o", out, "--append")
    assert again.exit_code == 0, again.output
    assert again.stderr == f"--append: these 2 inputs were already appended to {out}; nothing to do\n"
    assert again.stdout == ""
    same_as_first = invoke("extract", *photos[:2], *model_args(tiny_model), "-o", out, "--append")
    assert same_as_first.exit_code == 0 and "already appended" in same_as_first.stderr
    with h5py.File(out, "r") as f:
        assert f["images/path"].asstr()[...].tolist() == [str(p) for p in photos]
        assert int(f.attrs["complete"]) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f["layers/conv2"].pop("stats"), "{out}: layer 'conv2' has no stored statistics of preactivation"),
        (lambda f: f.attrs.__delitem__("n_images"), "--append: {out} is a damaged fmap file: attribute 'n_images' is "
                                                    "missing"),
    ],
    ids=["no-stats", "no-n_images"],
)  # fmt: skip
def test_append_to_a_damaged_file_is_one_line_and_leaves_it_as_it_was(
    damage, message: str, photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.h5"
    assert invoke("extract", *photos[:2], *model_args(tiny_model), "-o", out).exit_code == 0
    with h5py.File(out, "r+") as f:
        damage(f)
    before = out.read_bytes()
    result = invoke("extract", *photos[2:], *model_args(tiny_model), "-o", out, "--append")
    assert result.exit_code == 1, result.output
    assert last_line(result) == "Error: " + message.format(out=out)
    assert out.read_bytes() == before  # complete is still 1: nothing was touched


def test_append_while_another_append_runs_is_refused(photos: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    assert invoke("extract", *photos[:2], *model_args(tiny_model), "-o", out).exit_code == 0
    from fmap_cli.store.atomic import lock

    fd = lock(out)  # what a running --append holds
    try:
        result = invoke("extract", *photos[2:], *model_args(tiny_model), "-o", out, "--append")
    finally:
        os.close(fd)
    assert result.exit_code == 1, result.output
    assert last_line(result) == f"Error: {out}: in use by another fmap run; wait for it to finish"
    assert n_images(out) == 2


def test_append_adds_images(tmp_path: Path, tiny_model: Path) -> None:
    old = write_photos(tmp_path / "imgs", 3)
    new = write_photos(tmp_path / "imgs", 2, start=10)
    out = tmp_path / "out.h5"
    ok(run_extract(old, tiny_model, out))
    before = maps_of(out)
    result = ok(run_extract(new, tiny_model, out, "--append", "--json"))
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
    ok(run_extract([*old, *new], tiny_model, reference))
    for key, values in maps_of(reference).items():
        np.testing.assert_allclose(after[key], values, rtol=1e-5, atol=1e-6, err_msg=key)
    check_stats_match_maps(out)  # statistics cover old and new images


def test_append_names_every_library_that_compressed_its_chunks(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The appended file keeps OUT's chunks as stored: when they were compressed by the zlib fallback
    and this run's by ISA-L, `compressor` names both (it named this run's library alone)."""
    isal = pytest.importorskip("isal")
    from fmap_cli.store import chunks

    fast, fallback = f"isal {isal.__version__} level 1", f"zlib {zlib.ZLIB_RUNTIME_VERSION} level 1"
    out = tmp_path / "out.h5"
    with monkeypatch.context() as patch:
        patch.setattr(chunks, "deflater", chunks.zlib_deflater)
        ok(run_extract(write_photos(tmp_path / "imgs", 2), tiny_model, out))
    for start, expected in ((10, f"{fallback}, {fast}"), (20, f"{fallback}, {fast}")):  # the second adds nothing
        ok(run_extract(write_photos(tmp_path / "imgs", 1, start=start), tiny_model, out, "--append"))
        with h5py.File(out, "r") as f:
            assert f.attrs["compressor"] == expected
    with h5py.File(out, "r+") as f:  # a file from before the attribute: zlib, unrecorded
        del f.attrs["compressor"]
    ok(run_extract(write_photos(tmp_path / "imgs", 1, start=30), tiny_model, out, "--append"))
    with h5py.File(out, "r") as f:
        assert f.attrs["compressor"] == f"unrecorded (zlib), {fast}"
        assert int(f.attrs["n_images"]) == 5


def test_append_indices_continue_after_old_inputs(tmp_path: Path, tiny_model: Path) -> None:
    old = write_photos(tmp_path / "imgs", 3)
    new = write_photos(tmp_path / "imgs", 2, start=10)
    out = tmp_path / "out.h5"
    ok(run_extract(old, tiny_model, out))
    ok(run_extract(new, tiny_model, out, "--append"))
    assert stored_index(out) == [0, 1, 2, 3, 4]


def test_append_reports_images_written_by_this_run(tmp_path: Path, tiny_model: Path) -> None:
    old = write_photos(tmp_path / "imgs", 3)
    new = write_photos(tmp_path / "imgs", 2, start=10)
    out = tmp_path / "out.h5"
    ok(run_extract(old, tiny_model, out))
    result = ok(run_extract(new, tiny_model, out, "--append", "--json"))
    assert json.loads(result.stdout)["images_written"] == 2


def test_interrupted_append_leaves_out_unchanged_and_rerun_appends_once(tmp_path: Path, tiny_model: Path) -> None:
    """An --append stopped part-way leaves OUT exactly as it was (the appended file is built beside
    it); rerunning the same command (as its message says) gives old + new images, each once, with
    indices continuing after the old list."""
    old = write_photos(tmp_path / "imgs", 3)
    new = write_photos(tmp_path / "imgs", 4, start=10)
    out = tmp_path / "out.h5"
    ok(run_extract(old, tiny_model, out))
    before = out.read_bytes()
    options = extract_options([str(p) for p in new], out=out, model=str(tiny_model), batch_size=1, append=True)
    stop_requested, progress = stop_after(2)  # batches of 1
    with pytest.raises(StoppedError) as stopped:
        extract(options, stop_requested=stop_requested, progress=progress)
    assert str(stopped.value) == f"interrupted by signal 15; {out} is unchanged; rerun the same command to append"
    assert out.read_bytes() == before and not partials(out)
    ok(run_extract(new, tiny_model, out, "--append"))
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
    old = write_photos(tmp_path / "imgs", 2)
    new = write_photos(tmp_path / "imgs", 1, start=10)
    out = tmp_path / "out.h5"
    ok(run_extract(old, tiny_model, out))
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
    line = error_line(run_extract(new, model, out, "--append", *extra), 2)
    assert named in line
    differs = {
        "model": rf"model; weights \({SHA} vs {SHA}\)",  # a model of other shapes has other weights too
        "weights": rf"model; weights \({SHA} vs {SHA}\)",
        "layers": re.escape("layers (conv1,conv2 vs conv1)"),
        "dtype": re.escape("storage (--dtype, --compression, --store)"),
        "store": re.escape("storage (--dtype, --compression, --store)"),
        "save-input": re.escape("--save-input (False vs True)"),
    }[change]
    assert re.fullmatch(
        rf"Error: --append: {re.escape(str(out))} differs from this run in: {differs}; write a new file instead", line
    ), line
    assert out.read_bytes() == before
    assert not partials(out)


def test_append_to_missing_file(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 1)
    out = tmp_path / "missing.h5"
    line = error_line(run_extract(images, tiny_model, out, "--append"), 2)
    assert line == f"Error: --append: {out} does not exist or is not a regular file; run without --append to create it"
    assert not out.exists()


@pytest.mark.parametrize("other", ["--overwrite", "--resume"])
def test_append_with_overwrite_or_resume(tmp_path: Path, tiny_model: Path, other: str) -> None:
    images = write_photos(tmp_path / "imgs", 1)
    out = tmp_path / "out.h5"
    ok(run_extract(images, tiny_model, out))
    before = out.read_bytes()
    line = error_line(run_extract(images, tiny_model, out, "--append", other), 2)
    assert (
        line
        == {
            "--overwrite": "Error: --append cannot be combined with --overwrite or --shard",
            "--resume": "Error: --resume and --append cannot be used together",
        }[other]
    )
    assert out.read_bytes() == before


# ---------------------------------------------------------------------------- a full disk


def fsize_limit(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_is_one_line_and_leaves_nothing(photos: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    """A write error used to print a traceback, then 'Segmentation fault' (exit 139) at exit."""
    out = tmp_path / "out.h5"
    proc = subprocess.run(
        [sys.executable, "-m", "fmap_cli", "extract", *map(str, photos * 8), *model_args(tiny_model),
         "--size", "96", "-b", "2", "-o", str(out)],
        preexec_fn=fsize_limit(300_000), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"Error: cannot write {out}: File too large"
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))) == []


def test_file_size_limit_during_append_leaves_the_file_as_it_was(
    photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    """Appending in place left a file HDF5 could not open (its end-of-file written, its data not)."""
    out = tmp_path / "out.h5"
    args = [*model_args(tiny_model), "--size", "96", "-b", "2", "-o", str(out)]
    assert invoke("extract", *photos[:2], *args).exit_code == 0
    before = out.read_bytes()
    more = [str(p) for p in photos * 8]
    proc = subprocess.run(
        [sys.executable, "-m", "fmap_cli", "extract", *more, *args, "--append"],
        preexec_fn=fsize_limit(len(before) + 200_000), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == f"Error: cannot write {out}: File too large"
    assert out.read_bytes() == before and partial_files(out) == []
    rerun = invoke("extract", *more, *args, "--append")
    assert rerun.exit_code == 0, rerun.output
    with h5py.File(out, "r") as f:
        assert int(f.attrs["complete"]) == 1
        assert f["images/path"].asstr()[...].tolist() == [str(p) for p in photos[:2]] + more


# ---------------------------------------------------------------------------- merge


def shards(photos: list[Path], tiny_model: Path, tmp_path: Path) -> list[Path]:
    made = []
    for k in range(2):
        path = tmp_path / f"shard_{k}.h5"
        assert invoke("extract", *photos, *model_args(tiny_model), "--shard", f"{k}/2", "-o", path).exit_code == 0
        made.append(path)
    return made


def test_merge_stopped_by_a_signal_leaves_nothing(photos: list[Path], tiny_model: Path, tmp_path: Path) -> None:
    parts = shards(photos, tiny_model, tmp_path)
    out = tmp_path / "all.h5"
    polls = iter([None] * 5 + [15])
    with pytest.raises(StoppedError) as caught:
        merge_shards(parts, out, stop_requested=lambda: next(polls, 15))
    assert str(caught.value) == "interrupted by signal 15; no output written"
    assert not out.exists() and partial_files(out) == []


@pytest.mark.parametrize(("signum", "code"), [(2, 130), (15, 143)])
def test_merge_exit_code_after_a_signal(
    signum: int, code: int, photos: list[Path], tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from contextlib import contextmanager

    from fmap_cli import cli as cli_module

    parts = shards(photos, tiny_model, tmp_path)

    @contextmanager
    def signal_arrived():  # as if the signal came just as the merge started
        yield [signum]

    monkeypatch.setattr(cli_module, "_signals_recorded", signal_arrived)
    out = tmp_path / "all.h5"
    result = invoke("merge", *parts, "-o", out)
    assert result.exit_code == code, result.output
    assert last_line(result) == f"Error: interrupted by signal {signum}; no output written"
    assert not out.exists() and partial_files(out) == []


# ---------------------------------------------------------------------------- sizes and names


WIDE_MODEL = """
import torch
from torch import nn


def wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 1024, 3, padding=1), nn.ReLU(), nn.Conv2d(1024, 16, 1), nn.ReLU())
"""


def test_a_file_is_sized_by_its_maps_on_a_wide_layer(photos: list[Path], tmp_path: Path) -> None:
    """Statistics datasets were chunked by 1024 images: one image through a layer of C channels cost
    5 x 1024 x C values of allocated chunks (MobileNetV2 at 64 px: 451 MB for 2.6 MB of maps)."""
    factory = tmp_path / "wide.py"
    factory.write_text(WIDE_MODEL)
    out = tmp_path / "out.h5"
    args = ["--model", f"{factory}:wide", "--device", "cpu", "--size", "16", "-o", out]
    assert invoke("extract", photos[0], *args).exit_code == 0
    with h5py.File(out, "r") as f:
        maps = [g[role] for g in f["layers"].values() for role in ("preactivation", "activation") if role in g]
        stored = sum(ds.id.get_storage_size() for ds in maps)
        assert maps[0].shape == (1, 1024, 16, 16) and len(f["layers"]) == 2
    assert out.stat().st_size <= 1.05 * stored + 64 * 1024 * 2


def test_temporary_names_fit_the_file_name_limit_in_bytes(tmp_path: Path) -> None:
    out = tmp_path / ("猫" * 80 + ".h5")  # 243 bytes: fits; its temporary name would not, uncut
    with AtomicOutput(out) as output:
        assert len(os.fsencode(output.path.name)) <= 255
        output.path.write_bytes(b"x")
        assert partial_files(out) == [output.path]
        output.publish()
    assert out.read_bytes() == b"x"


def test_differences_are_printed_with_control_characters_escaped(
    photos: list[Path], tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.h5"
    assert invoke("extract", *photos[:2], *model_args(tiny_model), "-o", out).exit_code == 0
    with h5py.File(out, "r+") as f:
        f.attrs["layers"] = np.array(["conv1\x1b[2J", "conv2"], dtype=h5py.string_dtype())
    result = invoke("extract", *photos[2:], *model_args(tiny_model), "-o", out, "--append")
    assert result.exit_code == 2, result.output
    assert last_line(result) == (
        f"Error: --append: {out} differs from this run in: layers (conv1\\x1b[2J,conv2 vs conv1,conv2); "
        "write a new file instead"
    )
