"""The store's guarantees: atomic, locked output that never replaces what it must not, continuation
(--resume, --append) that never loses or duplicates work, and clean failures when the disk does."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner, Result
from conftest import extract_options, make_photo

from fmap_cli.cli import cli
from fmap_cli.errors import FmapError, StoppedError, UsageError
from fmap_cli.extract import extract
from fmap_cli.store.atomic import AtomicOutput, check_target, partial_files
from fmap_cli.store.merge import merge_shards


def invoke(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


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


# ---------------------------------------------------------------------------- --resume


def killed_run(photos: list[Path], tiny_model: Path, out: Path) -> Path:
    """The temporary file a run stopped after its first batch keeps."""
    with pytest.raises(StoppedError):
        extract(
            extract_options(photos, out, model=str(tiny_model), device="cpu", batch_size=1),
            stop_requested=iter([None, None, 15]).__next__,
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
