"""Opening fmap files for reading: the one place that checks a file is a complete fmap file of a
schema version this fmap reads, and that finds a stored layer or channel. h5py and numpy only.

Every reader (``inspect``, ``render``, ``merge``) opens files through :func:`open_fmap`, which
treats the file as untrusted: before any data is read it checks the root attributes' types, that
every dataset along N holds ``n_images`` rows, that no data is kept outside the file (external
links, external raw storage), and that virtual datasets read only from other, ordinary files beside
it (HDF5 crashes the process on a virtual dataset that reads from itself).
"""

from __future__ import annotations

import re
import resource
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import h5py
import numpy as np

from ..errors import FmapError, FmapFileError, UnknownLayerError, UsageError, did_you_mean, first_line
from . import schema
from .axes import channel_axis, layer_axes
from .layout import file_kind

DAMAGED = "damaged fmap file"
SPARE_FILES = 64  # descriptors kept for what a reader opens besides a virtual file's sources
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: terminals act on them


def printable(text: str) -> str:
    r"""``text`` safe to print on a terminal: control characters (C0, DEL, C1) as ``\xNN``.

    >>> printable("a\x1b[2Jb")
    'a\\x1b[2Jb'
    """
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


@contextmanager
def open_fmap(
    path: str | Path, missing_sources_ok: bool = False, kinds: tuple[str, ...] = (schema.MAPS,)
) -> Iterator[h5py.File]:
    """Open a complete fmap file for reading, checked as described in the module docstring.

    Args:
        path: the file.
        missing_sources_ok: open a virtual (merged) file even when shard files it reads from are
            gone (their rows read as NaN); ``inspect`` does, to report them.
        kinds: the kinds of fmap file (``schema.KINDS``) the caller reads.

    Raises:
        FmapFileError: missing, not a regular file, not HDF5, not written by fmap, incomplete, a
            schema version this fmap does not read, damaged (attributes of the wrong type, datasets
            with a row count other than ``n_images``, unsafe virtual datasets, external links or
            external storage),
            or a virtual file whose source files are missing or more than this process may open.
    """
    path = Path(path)
    shown = printable(str(path))
    _check_regular_file(path, shown)
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise FmapFileError(f"{shown}: not an HDF5 file (or it is corrupt)") from None
    try:
        try:
            virtual = _check_file(f, path, shown, kinds)
        except FmapError:
            raise
        except Exception as exc:  # unreadable attributes or links: damage, not a bug in fmap
            raise FmapFileError(f"{shown}: {DAMAGED}: {type(exc).__name__}: {printable(first_line(exc))}") from None
        if virtual:
            _room_for(len(_source_files(f)), shown)
        gone = missing_sources(f) if virtual else []
        if gone and not missing_sources_ok:
            raise FmapFileError(
                f"{shown}: virtual file whose source files are missing: {', '.join(gone)}; "
                "their images would read as NaN (put the shards back beside it)"
            )
        yield f
    finally:
        f.close()


@contextmanager
def reading(
    path: str | Path, missing_sources_ok: bool = False, kinds: tuple[str, ...] = (schema.MAPS,)
) -> Iterator[h5py.File]:
    """:func:`open_fmap`, turning any inconsistency inside the file into a one-line FmapFileError."""
    with open_fmap(path, missing_sources_ok, kinds) as f:
        try:
            yield f
        except FmapError:
            raise
        except Exception as exc:  # any inconsistency in a file claiming to be fmap's is damage
            message = f"{path}: {DAMAGED}: {type(exc).__name__}: {first_line(exc)}"
            raise FmapFileError(printable(message)) from None


def layer_group(f: h5py.File, layer: str) -> h5py.Group:
    """The group of a stored layer.

    Raises:
        UnknownLayerError: not stored in this file; the message lists the stored layers.
    """
    stored = list(f[schema.LAYERS])
    if layer not in stored:
        raise UnknownLayerError(
            printable(
                f"layer '{layer}' not in {f.filename}; {did_you_mean(layer, stored)}stored layers: {', '.join(stored)}"
            )
        )
    return f[schema.LAYERS][layer]


def check_channel(group: h5py.Group, channel: int) -> None:
    """Raise UsageError unless ``channel`` is one of the layer's channels (along its channel axis)."""
    count = channel_count(group)
    if not 0 <= channel < count:
        name = printable(group.name.rsplit("/", 1)[-1])
        raise UsageError(f"channel {channel} out of range: layer '{name}' has channels 0..{count - 1}")


def channel_count(group: h5py.Group) -> int:
    """How many channels a stored layer has: the length of its maps' channel axis (C, or D for tokens)."""
    return int(group.attrs["output_shape"][channel_axis(layer_axes(group)) - 1])


def missing_sources(f: h5py.File) -> list[str]:
    """Source files of ``f``'s virtual datasets that are missing or unreadable, as stored
    (relative to ``f``'s directory); HDF5 reads their rows as fill values (NaN maps) silently."""
    base = Path(f.filename).resolve().parent
    return sorted(name for name in _source_files(f) if name != "." and not _readable(base / name))


def _source_files(f: h5py.File) -> set[str]:
    return {source.file_name for _, ds in _virtual_datasets(f) for source in ds.virtual_sources()}


def _room_for(sources: int, shown: str) -> None:
    """HDF5 holds every source file of a virtual dataset open while it reads across them, and
    reads those it cannot open (past the open-file limit, often 1024) as fill values without an
    error: raise this process's soft limit to fit them all, up to the hard limit.

    Raises:
        FmapFileError: more sources than the hard limit lets this process open.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = sources + SPARE_FILES
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise FmapFileError(
            f"{shown}: virtual file over {sources} shard files, more than this process may open at once "
            f"(ulimit -n {hard}); their images would read as NaN (raise the limit, or merge without --virtual)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _readable(path: Path) -> bool:
    try:
        return path.is_file() and h5py.is_hdf5(path)
    except OSError:
        return False


# ---------------------------------------------------------------------------- attributes


def shown_value(value: Any) -> str:
    """A stored value as one-line messages show it: short, control characters escaped."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    if isinstance(value, np.ndarray):
        text = repr(value.ravel()[:4].tolist())
        text = text if value.size <= 4 else text[:-1] + ", ...]"
    elif isinstance(value, np.generic):
        text = repr(value.item())
    else:
        text = repr(value)
    return printable(text if len(text) <= 60 else text[:57] + "...")


def int_attr(
    node: h5py.HLObject,
    name: str,
    path: str,
    expected: str,
    valid: Callable[[int], bool] = lambda number: True,
    default: int | None = None,
    damaged: str = DAMAGED,
) -> int:
    """The integer attribute ``name`` of ``node``, or ``default`` when it is absent.

    Args:
        path: the file as messages name it.
        expected: what a valid value is, in words, e.g. "0 or 1".
        valid: whether an integer value is valid.
        damaged: what messages call the file.

    Raises:
        FmapFileError: absent without a default, or not one integer for which ``valid`` holds.
    """
    value = node.attrs.get(name)
    if value is None:
        if default is None:
            raise FmapFileError(f"{path}: {damaged}: no attribute '{name}'")
        return default
    if isinstance(value, np.integer) and valid(int(value)):  # h5py gives numpy scalars, never bool
        return int(value)
    raise FmapFileError(f"{path}: {damaged}: attribute '{name}' is {shown_value(value)}, not {expected}")


def _flag(f: h5py.File, name: str, path: str) -> bool:
    return int_attr(f, name, path, "0 or 1", lambda n: n in (0, 1), default=0) == 1


def _check_version(f: h5py.File, path: str) -> None:
    if "fmap_schema_version" not in f.attrs:
        raise FmapFileError(f"{path}: an HDF5 file, but not written by fmap (no fmap_schema_version)")
    version = int_attr(f, "fmap_schema_version", path, "an integer")
    readable = schema.READABLE_VERSIONS
    if version in readable:
        return
    listed = ", ".join(str(v) for v in readable)
    if version > max(readable):
        raise FmapFileError(f"{path}: schema version {version} is newer than this fmap reads ({listed}); upgrade fmap")
    if version < min(readable):
        raise FmapFileError(
            f"{path}: schema version {version} is older than any this fmap reads ({listed}); "
            "read it with the fmap that wrote it, or extract the images again"
        )
    raise FmapFileError(f"{path}: schema version {version} is not one this fmap reads ({listed})")


def _check_file(f: h5py.File, path: Path, shown: str, kinds: tuple[str, ...]) -> bool:
    """Every check of :func:`open_fmap` that reads no data; returns whether the file is virtual."""
    _check_version(f, shown)
    kind = file_kind(f)
    if kind not in kinds:
        wanted = " or ".join(f"'{k}'" for k in kinds)
        raise FmapFileError(f"{shown}: an fmap file of kind '{printable(kind)}'; this command reads {wanted} files")
    if not _flag(f, "complete", shown):
        raise FmapFileError(
            f"{shown}: incomplete file (complete=0): the run writing it did not finish; "
            "rerun that command (with --resume, or --append if it was appending)"
        )
    virtual = _flag(f, "virtual", shown)
    if kind != schema.MAPS:  # other kinds: their nodes, as their schema lists them
        _check_links(f, shown)
        _check_storage(f, path, shown, virtual)
        _check_nodes(f, shown, kind)
        return virtual
    n_images = int_attr(f, "n_images", shown, "a count of images (an integer >= 0)", lambda n: n >= 0)
    _check_links(f, shown)
    _check_storage(f, path, shown, virtual)
    _check_rows(f, shown, n_images)
    return virtual


# ---------------------------------------------------------------------------- rows


def _along_n(f: h5py.File) -> Iterator[tuple[str, Any]]:
    """(name, node) of every dataset whose first axis is the images: required ones always
    (None when absent), the others when present."""
    yield "/N", f.get("N")
    images = f.get(schema.IMAGES)
    yield f"/{schema.IMAGES}/path", images.get("path") if isinstance(images, h5py.Group) else None
    if isinstance(images, h5py.Group):
        yield from ((f"/{schema.IMAGES}/{key}", images[key]) for key in images if key != "path")
    if schema.INPUT in f:
        yield f"/{schema.INPUT}", f[schema.INPUT]
    layers = f.get(schema.LAYERS)
    for group in layers.values() if isinstance(layers, h5py.Group) else ():
        if not isinstance(group, h5py.Group):
            continue
        for role in (schema.PREACTIVATION, schema.ACTIVATION):
            if role in group:
                yield group[role].name, group[role]
        stats = group.get(schema.STATS)
        if isinstance(stats, h5py.Group):  # per image (N, C) and (N, C, 2); the rest is per channel
            yield from ((stats[key].name, stats[key]) for key in stats if key.startswith("image_"))


def _check_rows(f: h5py.File, path: str, n_images: int) -> None:
    for name, node in _along_n(f):
        if not isinstance(node, h5py.Dataset):
            raise FmapFileError(printable(f"{path}: {DAMAGED}: {name} is missing or not a dataset"))
        shape = node.shape or ()  # None for an empty dataspace
        if not shape or shape[0] != n_images:
            length = f"length {shape[0]}" if shape else "no length (a scalar)"
            raise FmapFileError(printable(f"{path}: {DAMAGED}: n_images is {n_images} but {name} has {length}"))


def _check_nodes(f: h5py.File, path: str, kind: str) -> None:
    """Every required node of a ``kind`` file is there, a group or dataset as documented, and the
    datasets whose first axis the schema names alike (e.g. K) agree on its length."""
    lengths: dict[str, tuple[str, int]] = {}
    for node in schema.KINDS[kind]:
        obj = f.get(node.path)
        if obj is None:
            if node.required:
                raise FmapFileError(printable(f"{path}: {DAMAGED}: {node.path} is missing"))
            continue
        wanted = h5py.Group if node.kind == "group" else h5py.Dataset
        if not isinstance(obj, wanted):
            raise FmapFileError(printable(f"{path}: {DAMAGED}: {node.path} is not a {node.kind}"))
        axis = node.shape.strip("()").split(",")[0].strip()
        if node.kind != "dataset" or not axis.isalpha():
            continue
        length = obj.shape[0] if obj.shape else -1
        first = lengths.setdefault(axis, (node.path, length))
        if length != first[1]:
            raise FmapFileError(
                printable(f"{path}: {DAMAGED}: {node.path} has length {length} along {axis}, {first[0]} {first[1]}")
            )


# ---------------------------------------------------------------------------- links and virtual datasets


def _check_links(f: h5py.File, path: str) -> None:
    """fmap never writes external links; one could lead a reader anywhere (even back into a
    crashing virtual dataset), so refuse them all."""

    def visit(name: str, link: Any) -> str | None:
        return name if isinstance(link, h5py.ExternalLink) else None

    found = f.visititems_links(visit)
    if found is not None:
        link = f.get(found, getlink=True)
        raise FmapFileError(
            f"{path}: {DAMAGED}: /{printable(found)} is an external link to {link.filename!r}; "
            "fmap files never hold one (refused)"
        )


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append((name, obj))

    f.visititems(visit)
    return found


def _virtual_datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    return [(name, ds) for name, ds in _datasets(f) if ds.is_virtual]


def _check_storage(f: h5py.File, path: Path, shown: str, virtual: bool) -> None:
    """Refuse data kept anywhere but in the file or, for a virtual file, in its shard files:
    external raw storage (HDF5 would read any file it names, even a FIFO), virtual datasets in a
    file not marked virtual, and sources that are not other ordinary files in (or below) the
    file's directory. HDF5 follows the sources when reading; one that leads back to a virtual
    dataset (the file itself, or a cycle) crashes the process."""
    base = path.parent
    for name, ds in _datasets(f):
        if ds.external:
            raise FmapFileError(
                f"{shown}: {DAMAGED}: /{printable(name)} keeps its data in the external file "
                f"{ds.external[0][0]!r}; fmap files never do (refused)"
            )
        if not ds.is_virtual:
            continue
        if not virtual:
            raise FmapFileError(
                f"{shown}: {DAMAGED}: /{printable(name)} is a virtual dataset, but the file is not a "
                "virtual (merged) file (no attribute virtual = 1); refused"
            )
        for source in ds.virtual_sources():
            why = _unsafe_source(source.file_name, source.dset_name, base, path)
            if why:
                raise FmapFileError(
                    f"{shown}: {DAMAGED}: virtual dataset /{printable(name)} reads from "
                    f"{source.file_name!r}, {why}; refused"
                )


def _unsafe_source(file_name: str, dset_name: str, base: Path, path: Path) -> str | None:
    """Why a virtual dataset's source cannot be read safely, or None."""
    if file_name == ".":  # HDF5's name for the virtual dataset's own file
        return "the file itself"
    parts = PurePosixPath(file_name).parts
    if not file_name or PurePosixPath(file_name).is_absolute() or ".." in parts:
        return "outside the file's directory"
    if _CONTROL.search(file_name):
        return "a name with control characters"
    if "%" in file_name.replace("%%", "") or "%" in dset_name.replace("%%", ""):  # printf-style: many files
        return "a name pattern (%), which fmap never writes"
    # HDF5 looks for a relative source beside the file first, then in the working directory
    for candidate in dict.fromkeys((base / file_name, Path(file_name))):
        try:
            mode = candidate.stat().st_mode
        except OSError:
            continue  # missing here: reported by missing_sources, read as fill values
        if not stat.S_ISREG(mode):
            return f"not a regular file ({_kind(mode)})"
        if candidate.samefile(path):
            return "the file itself"
        why = _source_leads_on(candidate, dset_name)
        if why:
            return why
    return None


def _source_leads_on(file: Path, dset_name: str) -> str | None:
    """Why the source dataset would lead HDF5 further (a virtual dataset, an external link), or None."""
    try:
        with h5py.File(file, "r") as src:
            node = ""
            for part in dset_name.strip("/").split("/"):
                node = f"{node}/{part}"
                if isinstance(src.get(node, getlink=True), h5py.ExternalLink):
                    return f"whose {printable(dset_name)} is reached through an external link"
            obj = src.get(dset_name)
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                return f"whose {printable(dset_name)} is itself a virtual dataset"
    except (OSError, ValueError, KeyError):  # unreadable: HDF5 reads its rows as fill values
        return None
    return None


# ---------------------------------------------------------------------------- the file itself


def _kind(mode: int) -> str:
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):  # fmt: skip
        if test(mode):
            return words
    return "an unusual kind of file"


def _check_regular_file(path: Path, shown: str) -> None:
    """Refuse anything but a regular file before opening it (opening a FIFO would block)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise FmapFileError(f"{shown}: no such file") from None
    except OSError as exc:
        raise FmapFileError(f"{shown}: cannot read: {exc.strerror or first_line(exc)}") from None
    if not stat.S_ISREG(mode):
        raise FmapFileError(f"{shown}: not a regular file ({_kind(mode)})")
