"""Which images a run processes: paths, directories, path lists, and this job's shard of them.

No image is opened here; only names are collected, in a deterministic order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

# Files in a directory are taken by extension; files named explicitly are always taken.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)


@dataclass(frozen=True)
class Shard:
    """Share ``index`` (0-based) of ``count`` deterministic shares of the input list."""

    index: int
    count: int

    def select(self, items: Sequence[str]) -> list[tuple[int, str]]:
        """(position in the whole list, path) of this shard's contiguous block of ``items``."""
        start = len(items) * self.index // self.count
        stop = len(items) * (self.index + 1) // self.count
        return list(enumerate(items))[start:stop]


def parse_shard(text: str) -> Shard:
    """``K/N`` -> Shard, with 0 <= K < N."""
    head, sep, tail = text.partition("/")
    try:
        index, count = int(head), int(tail)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard: expected K/N with 0 <= K < N (K counts from 0), got {text!r}")
    return Shard(index, count)


def shard_from_env(environ: Mapping[str, str]) -> Shard | None:
    """The shard of a SLURM array task (SLURM_ARRAY_TASK_ID relative to SLURM_ARRAY_TASK_MIN).

    Returns:
        None outside an array task (no SLURM_ARRAY_TASK_ID).

    Raises:
        UsageError: the variables do not make a shard, or SLURM_ARRAY_TASK_COUNT is missing (every
            task would then process every image).
    """
    task, count = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_TASK_COUNT")
    if task is None:
        return None
    if count is None:
        raise UsageError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --shard K/N")
    try:
        index = int(task) - int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        return parse_shard(f"{index}/{int(count)}")
    except (ValueError, UsageError):
        raise UsageError(
            f"SLURM_ARRAY_TASK_ID={task}, SLURM_ARRAY_TASK_COUNT={count}: not a valid shard; pass --shard K/N"
        ) from None


def read_path_list(source: str, nul: bool = False) -> list[str]:
    """Paths from a file (``-`` = stdin), one a line, or NUL-separated (``find -print0``)."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as handle:
                data = handle.read()
    except OSError as exc:
        raise UsageError(f"--files-from {source}: cannot read: {exc.strerror or exc}") from None
    parts = data.split(b"\0") if nul else data.splitlines()
    return [os.fsdecode(part) for part in parts if part.strip()]


def expand(paths: Iterable[str], recursive: bool = False) -> list[str]:
    """Paths with directories replaced by the images inside them (sorted; deeper with ``recursive``).

    Raises:
        UsageError: a directory holds no images (at its top level, without ``recursive``).
    """
    result: list[str] = []
    for path in paths:
        if not Path(path).is_dir():
            result.append(path)  # explicitly named: taken whatever its extension (bad files fail later)
            continue
        found = _images_in(Path(path), recursive)
        if not found:
            deeper = not recursive and any(p.is_dir() for p in Path(path).iterdir())
            hint = (
                "; add --recursive to search below"
                if deeper
                else f" (by extension: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
            raise UsageError(f"{path}: a directory with no images{' at its top level' if deeper else ''}{hint}")
        result.extend(found)
    return result


def _images_in(directory: Path, recursive: bool) -> list[str]:
    pattern = "**/*" if recursive else "*"
    found = [p for p in directory.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return [str(p) for p in sorted(found)]
