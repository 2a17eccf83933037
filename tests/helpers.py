"""Helpers shared by the test files (imported like conftest: ``from helpers import ...``): running fmap
in-process and checking how it ended, small images on disk, and reading fmap files back."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from click.testing import CliRunner, Result
from conftest import make_photo

from fmap_cli.cli import cli

FMAP = Path(sys.executable).parent / "fmap"  # the installed script
LAYERS = ["conv1", "conv2"]  # the tiny model's default layers (those with a nonlinearity)
ROLES = ("preactivation", "activation")

# ---------------------------------------------------------------------------- running fmap


def script_env() -> dict[str, str]:
    """Environment for the installed script: one torch thread, as in-process."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def invoke(*args: object, input: str | bytes | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)


def run_extract(images: Sequence[object], model: Path, out: Path, *extra: object, **kw: Any) -> Result:
    """``fmap extract IMAGES... -m MODEL -o OUT EXTRA...``, in-process."""
    return invoke("extract", *images, "-m", model, "-o", out, *extra, **kw)


def ok(result: Result, code: int = 0) -> Result:
    """The command ended with exit ``code``, without a traceback or an escaped exception."""
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}\n{result.output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def error_line(result: Result, code: int) -> str:
    """Check a clean failure and return its one 'Error:' line.

    Click puts its 'Usage:/Try' hint above usage errors and fmap logs progress to stderr, so the
    rule checked is: exit ``code``, exactly one 'Error:' line, it is the last line of stderr,
    nothing on stdout, no traceback, and no exception other than click's SystemExit escaped.
    """
    ok(result, code)
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    return errors[0]


def assert_left_clean(outdir: Path, before: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Nothing in ``outdir`` but ``before``: no output, no temporary file."""
    left = {p.name for p in outdir.iterdir()}
    assert left == set(before), f"left behind: {sorted(left - set(before))}"
    assert not list(outdir.glob(".out.h5.*.partial"))


def extract_fails(
    images: Sequence[Path], model: Path, outdir: Path, code: int, *extra: object, must_name: tuple[str, ...] = ()
) -> str:
    """``fmap extract`` into ``outdir/out.h5`` fails cleanly with ``code``, naming every ``must_name``
    and leaving ``outdir`` as it was; returns the 'Error:' line."""
    out = outdir / "out.h5"
    before = {p.name for p in outdir.iterdir()}
    line = error_line(run_extract(images, model, out, *extra), code)
    for name in must_name:
        assert name in line, f"{name!r} not in {line!r}"
    assert_left_clean(outdir, before)
    return line


def stop_after(batches: int, signum: int = 15) -> tuple[Callable[[], int | None], Callable[[int, int], None]]:
    """``(stop_requested, progress)`` for ``fmap_cli.extract.extract``: the signal is 'received' once
    ``batches`` batches have been handled. Keyed to progress, not to a count of polls: the library
    also polls while it waits (for a decoding thread, for room in the writer's queue), as often as
    timing makes it."""
    handled: list[int] = []
    return (lambda: signum if len(handled) >= batches else None), (lambda done, total: handled.append(done))


# ---------------------------------------------------------------------------- images on disk


def write_photos(
    folder: Path, n: int, start: int = 0, size: tuple[int, int] = (16, 18), ext: str = "png"
) -> list[Path]:
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


# ---------------------------------------------------------------------------- reading fmap files back


def partials(out: Path) -> list[Path]:
    """The temporary files of runs writing ``out``."""
    return list(out.parent.glob(f".{out.name}.*.partial"))


def wait_for_rows(out: Path, proc: subprocess.Popen, rows: int, timeout: float = 60) -> int:
    """Poll the temporary file of ``proc``, a running ``fmap extract -o out``, until it holds at least
    ``rows`` images; returns how many it holds then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for partial in partials(out):
            try:  # the writer holds an HDF5 lock: read without locking, and retry a torn read
                with h5py.File(partial, "r", locking=False) as f:
                    held = int(f.attrs["n_images"])
            except (OSError, KeyError, ValueError):
                continue
            if held >= rows:
                return held
        time.sleep(0.005)
    raise AssertionError(f"{out}: the run never held {rows} images in its temporary file; exit {proc.poll()}")


def stored_paths(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        return f["images/path"].asstr()[...].tolist()


def stored_index(path: Path) -> list[int]:
    with h5py.File(path, "r") as f:
        return f["images/index"][...].tolist()


def shard_attrs(path: Path) -> tuple[int, int]:
    with h5py.File(path, "r") as f:
        return int(f.attrs["shard_index"]), int(f.attrs["shard_count"])


def maps_of(path: Path) -> dict[str, np.ndarray]:
    """Every stored map: ``{"<layer>/<role>": (N, C, H, W)}``."""
    with h5py.File(path, "r") as f:
        return {
            f"{layer}/{role}": f[f"layers/{layer}/{role}"][...]
            for layer in f["layers"]
            for role in ROLES
            if role in f[f"layers/{layer}"]
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
