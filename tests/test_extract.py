"""The pipeline (fmap_cli.extract): what a run does with bad images (--skip-bad), its --json summary,
shards of an input list, memory bounded by the batch, and stopping on a signal with nothing
half-done left behind.

Every run uses the tiny spec model of conftest.py on images of a few pixels, so each extraction
takes a fraction of a second.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from click.testing import Result
from conftest import extract_options, make_photo
from helpers import (
    FMAP,
    LAYERS,
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
    shard_attrs,
    stored_index,
    stored_paths,
    truncated_jpeg,
    wait_for_rows,
    write_photos,
)

from fmap_cli import extract as pipeline
from fmap_cli.errors import StoppedError
from fmap_cli.store.writer import WRITE_BEHIND, BackgroundWriter, MapWriter

# ---------------------------------------------------------------------------- bad images and --skip-bad


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[list[Path], dict[int, str]]:
    """Good and bad images interleaved: (the list, {position of a bad one: word its reason contains})."""
    good = write_photos(tmp_path / "imgs", 3)
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
    result = ok(run_extract(images, tiny_model, out, "--skip-bad", "--json", "-b", "2"), 1)
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
    result = ok(run_extract(images, tiny_model, out, "--skip-bad"), 1)
    assert result.stdout == f"{out}\n"


def test_bad_image_without_skip_bad_leaves_nothing(tmp_path: Path, tiny_model: Path, mixed: tuple) -> None:
    images, _ = mixed
    out = tmp_path / "out.h5"
    line = error_line(run_extract(images, tiny_model, out, "-b", "1"), 1)
    # every header is read before any image is decoded: the text file fails before the cut JPEG
    assert line == f"Error: {images[3]}: not an image file Pillow can read"
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
    line = error_line(run_extract(bad, tiny_model, out, "--skip-bad"), 1)
    if kind == "header":
        reasons = "; ".join(f"{path}: not an image file Pillow can read" for path in bad)
        assert line == f"Error: no image could be read (3 failed: {reasons})"
    else:
        assert line.startswith(f"Error: no image could be read (3 failed: {bad[0]}: cannot decode image: ")
    assert not out.exists() and not partials(out)


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
    assert line.startswith(f"Error: {bad}: cannot decode image: ")  # then Pillow's words
    assert len(appended) == 2  # two batches really went to the writer first
    assert_left_clean(outdir)


def test_no_resize_with_different_sizes(images: list[Path], tiny_model: Path, outdir: Path) -> None:
    # images: 30x40, 48x36, 25x25 -> the second is the first odd one
    line = extract_fails(images, tiny_model, outdir, 1, "--no-resize")
    assert line == (
        f"Error: {images[1]}: size 48x36 differs from {images[0]} (30x40); --no-resize needs images of equal size"
    )


def test_no_resize_with_different_sizes_across_batches(images: list[Path], tiny_model: Path, outdir: Path) -> None:
    result = invoke("extract", *images, "-m", tiny_model, "-o", outdir / "out.h5", "--no-resize", "-b", "1")
    assert error_line(result, 1) == (
        f"Error: {images[1]}: size 48x36 differs from {images[0]} (30x40); --no-resize needs images of equal size"
    )
    assert_left_clean(outdir)


# ---------------------------------------------------------------------------- --json


def test_json_summary(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    result = ok(run_extract(images, tiny_model, out, "--json"))
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert summary["output"] == str(out)
    assert summary["images_written"] == 3
    assert summary["images_failed"] == []
    assert summary["layers"] == LAYERS
    assert summary["bytes"] == out.stat().st_size > 0
    assert isinstance(summary["seconds"], int | float) and 0 <= summary["seconds"] < 60


# ---------------------------------------------------------------------------- shards


def test_shards_are_disjoint_contiguous_and_cover_the_list(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 10)
    seen: list[int] = []
    fingerprints = set()
    for k in range(3):
        out = tmp_path / f"shard{k}.h5"
        ok(run_extract(images, tiny_model, out, "--shard", f"{k}/3"))
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


def test_more_array_tasks_than_images_is_no_error(tmp_path: Path, tiny_model: Path) -> None:
    """A SLURM array larger than the input list: the empty task exits 0 and writes nothing, and
    the merge of the others does not miss it."""
    images = write_photos(tmp_path / "imgs", 2)
    outs = [tmp_path / f"shard_{k}.h5" for k in range(3)]
    results = [run_extract(images, tiny_model, out, "--shard", f"{k}/3") for k, out in enumerate(outs)]
    assert [r.exit_code for r in results] == [0, 0, 0]
    empty = [k for k, out in enumerate(outs) if not out.exists()]
    assert empty == [0]  # 2 images over 3 shares: share 0 is [0, 0)
    assert results[0].stdout == "" and "is empty: nothing to write" in results[0].stderr
    merged = tmp_path / "all.h5"
    done = invoke("merge", *[out for out in outs if out.exists()], "-o", merged)
    assert done.exit_code == 0, done.output
    assert stored_index(merged) == [0, 1]


# ---------------------------------------------------------------------------- memory is O(batch)


def test_memory_is_bounded_by_the_batch(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer receives one batch at a time, and decoding runs only a bounded number of batches
    ahead of the model: never the whole list."""
    images = write_photos(tmp_path / "imgs", 60, size=(10, 12))
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


# ---------------------------------------------------------------------------- signals


# fmap's CLI records SIGTERM (and SIGINT) and the pipeline polls for it between batches, so that a
# batch scheduler's kill still removes the temporary file, or keeps it with the batches written for
# --resume. The in-process tests below send the signal at chosen points (deterministically); the
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
    """Exit 128 + SIGTERM; no OUT; at most one temporary file, kept only if it holds a batch (the error
    line says which, and how to continue), and --resume finishes it into exactly what an
    uninterrupted run writes."""
    line = error_line(result, 128 + signal.SIGTERM)
    out = outdir / "out.h5"
    assert not out.exists()
    kept = partials(out)
    assert len(kept) <= 1, kept
    if not kept:
        assert line == "Error: interrupted by signal 15; no output written"
        assert_left_clean(outdir)
        return
    with h5py.File(kept[0], "r") as f:
        assert int(f.attrs["complete"]) == 0 and int(f.attrs["n_images"]) >= 1
        n_images = int(f.attrs["n_images"])
    assert line == (
        f"Error: interrupted by signal 15; {n_images} images kept in {kept[0]}; "
        "rerun the same command with --resume to continue"
    )
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
        ok(result)
        assert invoke("inspect", out).exit_code == 0
    else:
        assert error_line(result, 128 + signal.SIGTERM) == "Error: interrupted by signal 15; no output written"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_during_extraction_cleans_up(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    """The real thing: the installed script, sent SIGTERM once its temporary file holds a batch, exits
    128 + 15 keeping that file, and --resume finishes it."""
    if not FMAP.exists():
        pytest.skip("installed fmap script not found next to the interpreter")
    photo = tmp_path / "photo.png"
    make_photo(64, 64).save(photo)
    images = [photo] * 150  # batches of 1 at --size 48: the run lasts well beyond its first batch
    out = outdir / "out.h5"
    command = [str(FMAP), "extract", *map(str, images), "-m", str(tiny_model), "-o", str(out), "-b", "1"]
    command += ["--size", "48"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env())
    try:
        wait_for_rows(out, proc, 1)  # a batch is in the temporary file: the run is well under way
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, f"exit {proc.returncode}; stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert stdout == ""
    assert not out.exists(), "the run finished before the signal came"
    [partial] = partials(out)
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["complete"]) == 0
        kept = int(f.attrs["n_images"])
    assert 1 <= kept < len(images)
    assert stderr.splitlines()[-1] == (  # the message says how to continue
        f"Error: interrupted by signal 15; {kept} images kept in {partial}; "
        "rerun the same command with --resume to continue"
    )
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=script_env(), timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(out, "r") as f:
        assert int(f.attrs["n_images"]) == len(images)
        assert f["images/index"][...].tolist() == list(range(len(images)))
    assert_left_clean(outdir, {"out.h5"})


def test_a_signal_ends_a_wait_for_a_stuck_decoder(tmp_path: Path, tiny_model: Path, monkeypatch) -> None:
    """A read that never returns (a hung network file system) must not make SIGTERM wait for it."""
    import threading

    release, decoded = threading.Event(), threading.Event()
    real_load = pipeline.load_batch

    def stuck(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        decoded.set()
        return real_load(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_batch", stuck)
    images = write_photos(tmp_path / "imgs", 2)
    polls = iter([None] * 3)
    try:
        with pytest.raises(StoppedError) as caught:
            pipeline.extract(
                extract_options(images, tmp_path / "out.h5", model=str(tiny_model)),
                stop_requested=lambda: next(polls, signal.SIGTERM),
            )
        assert not decoded.is_set()  # stopped while the read still hung, not after it gave up
    finally:
        release.set()
    assert str(caught.value) == "interrupted by signal 15; no output written"
    assert not partials(tmp_path / "out.h5")


FOLDING_MODEL = """
import torch
from torch import nn


class Windows(nn.Module):
    '''Like Swin's window attention: 2x2 windows folded into the batch axis around a conv.'''

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.inner = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        n, c, h, w = x.shape
        windows = x.reshape(n, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(n * 4, c, h // 2, w // 2)
        y = torch.relu(self.inner(windows))
        return y.reshape(n, 2, 2, c, h // 2, w // 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def windows() -> nn.Module:
    torch.manual_seed(0)
    return Windows()
"""


def test_a_layer_that_folds_the_batch_axis_is_one_line(tmp_path: Path) -> None:
    """Swin's attention layers have one row per window: the writer used to crash with a traceback; now
    --layers refuses them before any image is read."""
    factory = tmp_path / "windows.py"
    factory.write_text(FOLDING_MODEL)
    images = write_photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    args = ["--model", f"{factory}:windows", "--size", "16", "-o", out, "--device", "cpu"]
    line = error_line(invoke("extract", *images, *args, "--layers", "inner"), 2)
    assert line == (
        "Error: --layers: layer 'inner' folds other data into the batch axis (4 rows per image, e.g. the windows of "
        f"window attention), so fmap cannot store it per image; leave it out of --layers (run 'fmap layers "
        f"--model {factory}:windows' to list the layers)"
    )
    assert not out.exists() and not partials(out)
    ok(invoke("extract", *images, *args, "--layers", "stem"))
