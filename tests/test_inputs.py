"""Which images a run takes (fmap_cli.inputs): paths, directories (sorted, --recursive), lists
(--files-from, -0), and the shard of a SLURM array task or --shard."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest
from conftest import make_photo
from helpers import (
    assert_left_clean,
    error_line,
    invoke,
    ok,
    partials,
    run_extract,
    shard_attrs,
    stored_index,
    stored_paths,
    write_photos,
)

from fmap_cli.errors import UsageError
from fmap_cli.inputs import Shard, shard_from_env

# ---------------------------------------------------------------------------- paths, directories and lists

BY_EXTENSION = "(by extension: .bmp, .gif, .jfif, .jpeg, .jpg, .pbm, .pgm, .png, .ppm, .tif, .tiff, .webp)"


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
    ok(run_extract([folder], tiny_model, out))
    assert stored_paths(out) == [str(folder / n) for n in ("a.jpg", "b.png", "c.JPEG")]
    assert stored_index(out) == [0, 1, 2]

    deep = tmp_path / "deep.h5"
    ok(run_extract([folder], tiny_model, deep, "--recursive"))
    assert stored_paths(deep) == [str(folder / n) for n in ("a.jpg", "b.png", "c.JPEG", "sub/d.png")]
    ok(run_extract([folder], tiny_model, tmp_path / "deep2.h5", "-r"))
    assert stored_paths(tmp_path / "deep2.h5") == stored_paths(deep)


def test_directories_and_files_keep_command_line_order(tmp_path: Path, tiny_model: Path) -> None:
    first = write_photos(tmp_path / "one", 2)
    second = write_photos(tmp_path / "two", 2, start=10)
    single = write_photos(tmp_path / "single", 1, start=20)[0]
    out = tmp_path / "out.h5"
    ok(run_extract([tmp_path / "two", single, tmp_path / "one"], tiny_model, out))
    assert stored_paths(out) == [str(p) for p in (*second, single, *first)]


def test_directory_with_only_subdirectories_needs_recursive(tmp_path: Path, tiny_model: Path) -> None:
    top = tmp_path / "top"
    write_photos(top / "inner", 2)
    out = tmp_path / "out.h5"
    line = error_line(run_extract([top], tiny_model, out), 2)
    assert line == f"Error: {top}: a directory with no images at its top level; add --recursive to search below"
    assert not out.exists()
    ok(run_extract([top], tiny_model, out, "-r"))
    assert len(stored_paths(out)) == 2


def test_empty_directory_is_a_usage_error(tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("text")
    line = error_line(run_extract([empty], tiny_model, tmp_path / "out.h5"), 2)
    assert line == f"Error: {empty}: a directory with no images {BY_EXTENSION}"  # says which files count


def test_directory_given_as_image(tmp_path: Path, tiny_model: Path, outdir: Path) -> None:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    line = error_line(invoke("extract", folder, "-m", tiny_model, "-o", outdir / "out.h5"), 2)
    assert line == f"Error: {folder}: a directory with no images {BY_EXTENSION}"
    assert_left_clean(outdir)


def test_files_from_file(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 4)
    listing = tmp_path / "list.txt"
    # CRLF line ends and blank lines are tolerated
    listing.write_bytes(f"{images[2]}\r\n\n{images[0]}\n{images[3]}\n".encode())
    out = tmp_path / "out.h5"
    ok(run_extract([images[1]], tiny_model, out, "--files-from", listing))  # positional paths first
    assert stored_paths(out) == [str(images[i]) for i in (1, 2, 0, 3)]
    assert stored_index(out) == [0, 1, 2, 3]


def test_files_from_stdin(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    ok(run_extract([], tiny_model, out, "--files-from", "-", input="".join(f"{p}\n" for p in reversed(images))))
    assert stored_paths(out) == [str(p) for p in reversed(images)]


def test_nul_separated_list_with_newline_in_a_name(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "imgs"
    plain = write_photos(folder, 2)
    odd = folder / "new\nline.png"
    make_photo(16, 18, seed=7).save(odd)
    data = b"\0".join(os.fsencode(p) for p in (plain[0], odd, plain[1])) + b"\0"
    out = tmp_path / "out.h5"
    ok(run_extract([], tiny_model, out, "--files-from", "-", "-0", input=data))
    assert stored_paths(out) == [str(plain[0]), str(odd), str(plain[1])]

    listing = tmp_path / "list.bin"
    listing.write_bytes(data)
    ok(run_extract([], tiny_model, tmp_path / "file.h5", "--files-from", listing, "--null"))
    assert stored_paths(tmp_path / "file.h5") == stored_paths(out)


def test_explicitly_named_non_image_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "imgs"
    write_photos(folder, 2)
    notes = folder / "notes.txt"
    notes.write_text("this is not a picture\n")
    ok(run_extract([folder], tiny_model, tmp_path / "dir.h5"))  # skipped by extension in a directory ...
    assert len(stored_paths(tmp_path / "dir.h5")) == 2
    out = tmp_path / "out.h5"
    line = error_line(run_extract([folder, notes], tiny_model, out), 1)  # ... an error when named
    assert line == f"Error: {notes}: not an image file Pillow can read"
    assert not out.exists() and not partials(out)
    ok(run_extract([folder, notes], tiny_model, out, "--skip-bad"), 1)  # recorded as a failure with --skip-bad
    with h5py.File(out, "r") as f:
        assert f["failures/path"].asstr()[...].tolist() == [str(notes)]
        assert f["failures/index"][...].tolist() == [2]


def test_missing_listed_file_is_an_error(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 1)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{images[0]}\n{tmp_path / 'gone.png'}\n")
    line = error_line(run_extract([], tiny_model, tmp_path / "out.h5", "--files-from", listing), 1)
    assert line == f"Error: {tmp_path / 'gone.png'}: no such file"


@pytest.mark.parametrize("how", ["nothing", "empty list", "missing list"])
def test_no_inputs_is_a_usage_error(tmp_path: Path, tiny_model: Path, how: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    extra = {
        "nothing": [],
        "empty list": ["--files-from", empty],
        "missing list": ["--files-from", tmp_path / "no.txt"],
    }
    said = {
        "missing list": f"--files-from {tmp_path / 'no.txt'}: cannot read: No such file or directory",
    }.get(how, "no images to process (give paths, directories or --files-from)")
    out = tmp_path / "out.h5"
    assert error_line(run_extract([], tiny_model, out, *extra[how]), 2) == f"Error: {said}"
    assert not out.exists()


def test_no_images_is_usage_error(tiny_model: Path, outdir: Path) -> None:
    result = invoke("extract", "-m", tiny_model, "-o", outdir / "out.h5")
    assert error_line(result, 2) == "Error: no images to process (give paths, directories or --files-from)"
    assert_left_clean(outdir)


# ---------------------------------------------------------------------------- shards


def test_no_array_task_means_no_shard() -> None:
    assert shard_from_env({}) is None
    assert shard_from_env({"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_JOB_ID": "17"}) is None


def test_array_task_id_counts_from_min() -> None:
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}) == Shard(2, 4)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
    assert shard_from_env(env) == Shard(1, 3)  # --array=4-6: task 5 is the second share


def test_array_task_id_without_count_is_refused() -> None:
    """Without the count every task would silently process every image."""
    for env in (
        {"SLURM_ARRAY_TASK_ID": "3"},
        {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"},
    ):
        with pytest.raises(UsageError) as caught:
            shard_from_env(env)
        assert str(caught.value) == ("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shard K/N")


def test_array_task_outside_its_count_is_refused() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}
    with pytest.raises(UsageError, match=r"^SLURM_ARRAY_TASK_ID=7, SLURM_ARRAY_TASK_COUNT=3: not a valid shard"):
        shard_from_env(env)


@pytest.mark.parametrize("value", ["3/3", "x", "-1/3", "1/0", "1", "1/3/5", "a/b"])
def test_bad_shard_is_a_usage_error(tmp_path: Path, tiny_model: Path, value: str) -> None:
    images = write_photos(tmp_path / "imgs", 3)
    out = tmp_path / "out.h5"
    line = error_line(run_extract(images, tiny_model, out, "--shard", value), 2)
    assert line == f"Error: --shard: expected K/N with 0 <= K < N (K counts from 0), got {value!r}"
    assert not out.exists()


SLURM_TASK = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"}


def test_shard_from_slurm_environment(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 10)
    out = tmp_path / "out.h5"
    ok(run_extract(images, tiny_model, out, env=SLURM_TASK))
    assert shard_attrs(out) == (1, 3)
    assert stored_index(out) == [3, 4, 5]


def test_explicit_shard_overrides_slurm(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 10)
    out = tmp_path / "out.h5"
    ok(run_extract(images, tiny_model, out, "--shard", "2/4", env=SLURM_TASK))
    assert shard_attrs(out) == (2, 4)
    assert stored_index(out) == [5, 6]


def test_invalid_slurm_environment_is_a_usage_error(tmp_path: Path, tiny_model: Path) -> None:
    images = write_photos(tmp_path / "imgs", 3)
    env = {**SLURM_TASK, "SLURM_ARRAY_TASK_ID": "7"}  # 7 - 4 = 3, not below 3
    line = error_line(run_extract(images, tiny_model, tmp_path / "out.h5", env=env), 2)
    assert line == "Error: SLURM_ARRAY_TASK_ID=7, SLURM_ARRAY_TASK_COUNT=3: not a valid shard; pass --shard K/N"
