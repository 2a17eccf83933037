"""Continuing work on a file: ``--resume`` a killed run from its temporary file, ``--append`` to a
finished one. Both check fingerprints first, so nothing is mixed into a file made differently.
h5py and numpy only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FmapError, FmapFileError, UsageError, first_line
from ..images import Failure
from . import schema
from .atomic import busy, in_use, partial_files, writer_pid
from .reader import printable

# What must match for maps to belong in one file, with the words used when one differs.
FINGERPRINT = {
    "model_spec": "model",
    "weights_sha256": "weights",
    "preprocessing": "preprocessing",
    "layers": "layers",
    "storage": "storage (--dtype, --compression, --store)",
    "input_saved": "--save-input",
    "shard": "--shard",
}


def fingerprint(attrs: Mapping[str, Any], input_saved: bool) -> dict[str, str]:
    """The comparable parts of a file's root attributes (as strings)."""
    result = {key: _text(attrs.get(key)) for key in FINGERPRINT}
    result["preprocessing"] = _steps(result["preprocessing"])
    result["input_saved"] = str(input_saved)
    result["shard"] = f"{_text(attrs.get('shard_index'))}/{_text(attrs.get('shard_count'))}"
    return result


def file_fingerprint(f: h5py.File) -> dict[str, str]:
    """The fingerprint of an open fmap file."""
    return fingerprint(f.attrs, schema.INPUT in f)


def _steps(text: str) -> str:
    """A preprocessing record without its 'recipe' (where the values came from, which options gave
    them): the same steps are the same preprocessing, however the command line said so."""
    try:
        record = json.loads(text)
    except ValueError:
        return text
    if isinstance(record, dict):
        record.pop("recipe", None)
    return json.dumps(record, sort_keys=True)


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return ",".join(_text(v) for v in value.tolist())
    return value.decode() if isinstance(value, bytes) else str(value)


def differences(theirs: Mapping[str, str], ours: Mapping[str, str]) -> list[str]:
    """The fingerprint parts that differ, as users know them, with both values when they are short."""
    found = []
    for key, words in FINGERPRINT.items():
        a, b = theirs.get(key, ""), ours.get(key, "")
        if a == b:
            continue
        if key == "weights_sha256":
            a, b = a[:12], b[:12]
        found.append(f"{words} ({printable(a)} vs {printable(b)})" if max(len(a), len(b)) <= 60 else words)
    return found


@dataclass(frozen=True)
class Resumable:
    """A killed run's temporary file and how far it got."""

    path: Path
    handled: frozenset[int]  # input-list positions already written or recorded as failures
    failures: list[Failure]  # recorded so far


def find_resumable(
    out: Path, ours: Mapping[str, str], list_sha256: str, work: Sequence[tuple[int, str]], log: Any
) -> Resumable | None:
    """The newest temporary file of a run writing ``out`` that this run can continue, or None.

    A file that cannot be read, or whose images no longer match their files' content, means a
    fresh start (said through ``log``); one made with another model or input list is an error.
    """
    candidates = partial_files(out)
    if not candidates:
        log(f"--resume: no temporary file of an earlier run beside {out}; starting from the beginning")
        return None
    path = candidates[0]
    if in_use(path):  # a run writing it now: never touch its file
        pid = writer_pid(path)
        raise FmapError(
            f"--resume: {path} is being written by a running fmap (process {pid}); wait for it to finish or stop it"
        )
    try:
        with h5py.File(path, "r") as f:
            theirs = file_fingerprint(f)
            their_list = str(f.attrs.get("input_list_sha256", ""))
            n = int(f.attrs["n_images"])
            indices = f["images/index"][:n].tolist()
            hashes = f["images/sha256"].asstr()[:n].tolist()
            failures = []
            if "failures" in f:
                group = f["failures"]
                columns = (group["index"][...].tolist(), group["path"].asstr()[...], group["reason"].asstr()[...])
                failures = [Failure(int(i), str(p), str(r)) for i, p, r in zip(*columns, strict=True)]
    except (OSError, KeyError, ValueError) as exc:
        log(f"--resume: {path.name} is unreadable ({type(exc).__name__}); starting from the beginning")
        path.unlink(missing_ok=True)
        return None
    differ = differences(theirs, ours) + (["input list"] if their_list != list_sha256 else [])
    if differ:
        raise UsageError(
            f"--resume: {path} differs from this run in: {'; '.join(differ)}; delete it or run without --resume"
        )
    handled = frozenset([*indices, *(f.index for f in failures)])
    by_index = dict(work)
    for index, digest in zip(indices, hashes, strict=True):
        if _file_sha256(by_index.get(index)) != digest:
            log(f"--resume: {by_index.get(index)} changed since it was written; starting from the beginning")
            path.unlink(missing_ok=True)
            return None
    log(f"--resume: continuing {path.name}: {n} images kept, {sum(i not in handled for i, _ in work)} to go")
    return Resumable(path, handled, failures)


def _file_sha256(path: str | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


@dataclass(frozen=True)
class Appendable:
    """A finished file new images can be added to."""

    n_inputs: int  # positions of new images continue from here
    list_sha256: str
    input_lists: list[dict[str, Any]]  # the lists that added images so far (see the schema)
    new_sha256: str  # the list this run would append

    @property
    def done_before(self) -> bool:
        """This list already added its images to the file (a finished append run again)."""
        return any(entry.get("sha256") == self.new_sha256 for entry in self.input_lists)


def check_appendable(out: Path, ours: Mapping[str, str], list_sha256: str) -> Appendable:
    """Check that ``out`` is a finished fmap file made the same way as this run.

    Raises:
        UsageError: missing, not fmap, another schema version, made differently (names what
            differs), or incomplete.
        FmapError: another fmap run is writing it.
        FmapFileError: a damaged fmap file (an attribute or dataset missing or of the wrong type).
    """
    if not out.is_file():
        raise UsageError(f"--append: {out} does not exist or is not a regular file; run without --append to create it")
    if in_use(out):
        raise busy(out)
    try:
        with h5py.File(out, "r") as f:
            if "fmap_schema_version" not in f.attrs:
                raise UsageError(f"--append: {out} is not an fmap file")
            if int(f.attrs["fmap_schema_version"]) != schema.SCHEMA_VERSION:
                raise UsageError(
                    f"--append: {out} has schema version {int(f.attrs['fmap_schema_version'])}, this fmap "
                    f"writes {schema.SCHEMA_VERSION}; write a new file instead"
                )
            for key in ("n_images", "n_inputs", "input_list_sha256"):
                if key not in f.attrs:
                    raise FmapFileError(f"--append: {out} is a damaged fmap file: attribute '{key}' is missing")
            if int(f.attrs.get("complete", 0)) != 1:
                raise UsageError(
                    f"--append: {out} is incomplete (complete=0); finish the run that wrote it with --resume"
                )
            theirs = file_fingerprint(f)
            n_inputs = int(f.attrs["n_inputs"])
            list_hash = str(f.attrs["input_list_sha256"])
            lists = json.loads(str(f.attrs["input_lists"])) if "input_lists" in f.attrs else None
    except OSError:
        raise UsageError(f"--append: {out} is not a readable HDF5 file") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise FmapFileError(f"--append: {out} is a damaged fmap file ({first_line(exc)})") from None
    differ = differences(theirs, ours)
    if differ:
        raise UsageError(f"--append: {out} differs from this run in: {'; '.join(differ)}; write a new file instead")
    lists = lists if lists is not None else [{"sha256": list_hash, "n_inputs": n_inputs}]
    return Appendable(n_inputs, list_hash, lists, list_sha256)


def appended_list_sha256(previous: str, added: str) -> str:
    """Fingerprint of an input list grown by --append: the old fingerprint followed by the new list's."""
    return hashlib.sha256(f"{previous}\n{added}".encode()).hexdigest()
