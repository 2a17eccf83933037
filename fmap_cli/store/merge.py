"""Combine the shard files of one ``fmap extract --shard K/N`` job into one file (``fmap merge``).

By default the result is standalone: every map chunk is copied as stored, compressed bytes and
all (``read_direct_chunk`` / ``write_direct_chunk``: nothing is decompressed or recompressed),
and the small datasets along N are read and written. With ``virtual=True`` every dataset along N
is an HDF5 virtual dataset over the shards, whose paths are stored relative to the output's
directory (moving the directory keeps it working). HDF5 reads the rows of a missing shard as fill
values without an error, so readers call :func:`fmap_cli.summary.missing_sources`. Per-channel statistics are
pooled exactly from the shards' own. h5py and numpy only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import FmapError, FmapFileError, UsageError, first_line
from ..inputs import Shard
from ..stopping import StopRequested, check
from . import schema
from .atomic import AtomicOutput, check_target
from .axes import joined, layer_axes
from .chunks import UNRECORDED, copy_rows
from .continuation import differences, file_fingerprint
from .layout import join_distinct, set_attrs, written_now
from .reader import channel_count, int_attr, open_fmap, printable, shown_value
from .stats import SUMMARY, ChannelStats

# Attributes the HDF5 dimension-scale API owns (they hold references into their own file).
DIMENSION_ATTRS = frozenset(schema.HDF5_DIMENSION_ATTRS)
# Root attributes that describe one run rather than the merged file; set afresh.
RUN_ATTRS = frozenset({"shard_index", "shard_count", "complete", "n_images", "created", "command", "fmap_version"})
# Root attributes that may differ between the shards of one job (where each ran, which library
# compressed its chunks): the merged file holds their distinct values in shard order, joined with
# ", "; a shard without one counts as the value given here.
JOINED = {"device": "?", "torch_version": "?", "compressor": UNRECORDED}
FAILURES = schema.FAILURES
BLOCK_BYTES = 64 << 20  # rows of small datasets read at a time


@dataclass(frozen=True)
class ShardFile:
    """One shard file, checked: its share of the input list and its image count."""

    path: Path
    shard: Shard
    n_images: int
    n_inputs: int

    def share(self) -> range:
        """Positions in the whole input list this shard was given."""
        return range(self.n_inputs * self.shard.index // self.shard.count,
                     self.n_inputs * (self.shard.index + 1) // self.shard.count)  # fmt: skip

    def describe(self) -> str:
        share = self.share()
        return f"shard {self.shard.index}/{self.shard.count} (images {share.start}-{share.stop - 1} of {self.n_inputs})"


@dataclass(frozen=True)
class MergeResult:
    """What ``fmap merge`` wrote."""

    out: Path
    n_images: int
    shards: list[Path]  # in shard order
    missing: list[str]  # shares not merged (only with allow_missing), e.g. "shard 2/4 (images 50-74 of 100)"
    raw_bytes: int  # stored (compressed) bytes copied as raw chunks; 0 for a virtual file
    seconds: float


def merge_shards(
    paths: Sequence[Path],
    out: Path,
    virtual: bool = False,
    overwrite: bool = False,
    allow_missing: bool = False,
    command: str = "",
    log: Callable[[str], None] = lambda message: None,
    stop_requested: StopRequested = lambda: None,
) -> MergeResult:
    """Merge shard files into ``out``, images in input order; nothing is left at ``out`` on error.

    Args:
        paths: shard files of one job, in any order.
        out: the merged file.
        virtual: write virtual datasets over the shards instead of copying their chunks.
        overwrite: replace an existing ``out``.
        allow_missing: merge the shards given even if some shares of the input list are missing.
        command: the command line, recorded in the file.
        log: receives messages for the user.
        stop_requested: polled between datasets; a signal number stops the merge (nothing is left).

    Raises:
        UsageError: shards of different jobs, duplicates, missing shares, or a bad output path.
        FmapFileError: a file that is not a complete fmap shard.
    """
    started = time.perf_counter()
    check_target(out, overwrite, paths)
    if virtual:
        _check_beside(out, paths)
    shards = check_shards([Path(p) for p in paths])
    missing = missing_shares(shards)
    if missing and not allow_missing:
        raise UsageError(f"missing {'; '.join(missing)}; pass --allow-missing to merge the shards given")
    for share in missing:
        log(f"warning: missing {share}: its images are not in {out}")
    raw_bytes = _write(shards, out, virtual, overwrite, command, stop_requested)
    n_images = sum(s.n_images for s in shards)
    return MergeResult(out, n_images, [s.path for s in shards], missing, raw_bytes, time.perf_counter() - started)


def _check_beside(out: Path, paths: Sequence[Path]) -> None:
    """A virtual file reads its shards by paths relative to its own directory, and readers refuse
    paths that leave it (an untrusted file could point anywhere): the shards must lie below it.

    Raises:
        UsageError: a shard outside OUT's directory.
    """
    base = out.resolve().parent
    for path in paths:
        if not Path(path).resolve().is_relative_to(base):
            raise UsageError(
                f"--virtual: {path} is not in {base} or below it, where the virtual file {out.name} reads its "
                "shards from; write OUT beside the shards, or merge without --virtual"
            )


# ----------------------------------------------------------------------------- checking shards
def read_shard(path: Path) -> tuple[ShardFile, dict[str, str]]:
    """A shard file's share and its fingerprint (what must match across the shards of a job).

    Raises:
        FmapFileError: missing, not a complete fmap file, a shard attribute or /images/index
            missing or out of range (names the file and the attribute), or rows outside its share.
        UsageError: an fmap file made without --shard.
    """
    with open_fmap(path) as f:  # checks n_images, virtual and the rows along N
        attrs = f.attrs
        if attrs.get("virtual", 0) or "shard_index" not in attrs:
            raise UsageError(f"{path}: not a shard (made without 'fmap extract --shard K/N')")
        found = _shard_file(f, path)
        ours = {k: v for k, v in file_fingerprint(f).items() if k != "shard"}
        ours["input list"] = f"{_digest(f, path)}/{found.n_inputs}"
        ours["schema"] = str(int(attrs["fmap_schema_version"]))
        ours["shard count"] = str(found.shard.count)
        ours["axes"] = _labels(f)
        index = _positions(f, path)
    share = found.share()
    if len(index) != found.n_images or (len(index) and (index[0] < share.start or index[-1] >= share.stop)):
        raise FmapFileError(f"{path}: damaged shard: its images are not those of {found.describe()}")
    if np.any(np.diff(index) <= 0):
        raise FmapFileError(f"{path}: damaged shard: /images/index is not increasing")
    return found, ours


DAMAGED_SHARD = "damaged shard"


def _shard_file(f: h5py.File, path: Path) -> ShardFile:
    """The share a shard file claims, each attribute checked (a shard file is untrusted input)."""
    shown = printable(str(path))
    count = int_attr(f, "shard_count", shown, "a count (an integer >= 1)", lambda n: n >= 1, damaged=DAMAGED_SHARD)
    within = f"one of 0..{count - 1} (shard_count is {count})"
    k = int_attr(f, "shard_index", shown, within, lambda i: 0 <= i < count, damaged=DAMAGED_SHARD)
    n_inputs = int_attr(f, "n_inputs", shown, "a count (an integer >= 0)", lambda n: n >= 0, damaged=DAMAGED_SHARD)
    return ShardFile(path, Shard(k, count), int(f.attrs["n_images"]), n_inputs)


def _digest(f: h5py.File, path: Path) -> str:
    value = f.attrs.get("input_list_sha256")
    if isinstance(value, bytes | np.bytes_):
        value = value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return value
    shown = printable(str(path))
    if value is None:
        raise FmapFileError(f"{shown}: {DAMAGED_SHARD}: no attribute 'input_list_sha256'")
    raise FmapFileError(f"{shown}: {DAMAGED_SHARD}: attribute 'input_list_sha256' is {shown_value(value)}, not text")


def _positions(f: h5py.File, path: Path) -> np.ndarray:
    """/images/index: each image's position in the whole input list."""
    name = f"{schema.IMAGES}/index"
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "iu":
        what = "is missing" if ds is None else "is not a list of positions (integers)"
        raise FmapFileError(f"{printable(str(path))}: {DAMAGED_SHARD}: /{name} {what}")
    return np.asarray(ds[...], dtype=np.int64)


# Fingerprint parts merge adds to resume.FINGERPRINT, with the words used when one differs.
EXTRA_PARTS = {"input list": "input list", "schema": "schema version", "shard count": "shard count (N of --shard K/N)",
               "axes": "the axes of the maps"}  # fmt: skip


def _labels(f: h5py.File) -> str:
    """Every layer's axes, e.g. 'conv1: N,C,H,W; fc: N,C' (the merged file copies the first shard's).

    Raises:
        FmapFileError: a map whose axes label does not fit it.
    """
    try:
        return "; ".join(f"{name}: {joined(layer_axes(group))}" for name, group in f[schema.LAYERS].items())
    except ValueError as exc:
        raise FmapFileError(printable(f"{f.filename}: {DAMAGED_SHARD}: {exc}")) from None


def check_shards(paths: Sequence[Path]) -> list[ShardFile]:
    """The shards, checked to belong to one job, in shard order.

    Raises:
        UsageError: no shards, shards of different jobs (names the file and what differs), or a
            share given twice.
        FmapFileError: see :func:`read_shard`.
    """
    if not paths:
        raise UsageError("no shard files given")
    read = [read_shard(p) for p in paths]
    first, reference = read[0]
    by_index: dict[int, ShardFile] = {}
    for shard, theirs in read:
        differ = differences(theirs, reference)
        differ += [words for key, words in EXTRA_PARTS.items() if theirs[key] != reference[key]]
        if differ:
            raise UsageError(
                f"{shard.path}: differs from {first.path} in: {'; '.join(differ)}; "
                "only the shards of one 'fmap extract --shard K/N' job can be merged"
            )
        twin = by_index.setdefault(shard.shard.index, shard)
        if twin is not shard:
            raise UsageError(f"shard {shard.shard.index}/{shard.shard.count} given twice: {twin.path} and {shard.path}")
    return [by_index[k] for k in sorted(by_index)]


MISSING_LISTED = 1000  # missing shares named one by one; then one entry counts the rest


def missing_shares(shards: Sequence[ShardFile]) -> list[str]:
    """The shares of the input list no shard covers, e.g. "shard 2/4 (images 50-74 of 100)", in
    order; past MISSING_LISTED of them, a last entry "K more shares" counts the rest."""
    first = shards[0]
    count, n_inputs = first.shard.count, first.n_inputs
    given = {s.shard.index for s in shards}
    # only min(count, n_inputs) shares hold images; a shard file may claim any count, so visit only
    # those, and stop after MISSING_LISTED (never a loop over every claimed share)
    holding = range(count) if count <= n_inputs else ((count * (p + 1) - 1) // n_inputs for p in range(n_inputs))
    listed: list[str] = []
    for k in holding:
        if len(listed) == MISSING_LISTED:
            break
        share = ShardFile(Path(), Shard(k, count), 0, n_inputs)
        if k not in given and len(share.share()):
            listed.append(share.describe())
    covered = len({s.shard.index for s in shards if len(s.share())})
    rest = min(count, n_inputs) - covered - len(listed)
    return listed + ([f"{rest} more shares"] if rest > 0 else [])


# ----------------------------------------------------------------------------- writing
def _write(
    shards: Sequence[ShardFile],
    out: Path,
    virtual: bool,
    overwrite: bool,
    command: str,
    stop_requested: StopRequested,
) -> int:
    """Build the merged file under a temporary name and publish it as ``out``; returns raw bytes copied.

    Two shard files are open at a time, the first (whose tree the merged file copies) and the one
    being copied: a job may have more shards than a process may open files (often 1024).
    """
    with AtomicOutput(out, overwrite) as output:
        try:
            with ExitStack() as stack:
                first = stack.enter_context(h5py.File(shards[0].path, "r"))
                f = stack.enter_context(h5py.File(output.path, "w", locking=False))  # AtomicOutput locks it
                _root_attrs(f, first, shards, command)
                if virtual:
                    set_attrs(f, virtual=1)
                copied = _Merger(f, first, shards, out, virtual, stop_requested).run()
                set_attrs(f, complete=1)
        except OSError as exc:
            raise FmapError(f"{out}: cannot write merged file: {exc.strerror or first_line(exc)}") from None
        except (KeyError, ValueError) as exc:  # a shard lacks or shapes a node unlike the first
            raise FmapFileError(f"{out}: shards differ in layout: {first_line(exc)}") from None
        output.publish()
    return copied


def _root_attrs(f: h5py.File, first: h5py.File, shards: Sequence[ShardFile], command: str) -> None:
    """The first shard's root attributes, less those of one run; :data:`JOINED` ones come later."""
    _check_documented("", first)
    _copy_attrs(first, f, RUN_ATTRS | frozenset(JOINED))
    set_attrs(
        f,
        complete=0,
        **written_now(),
        command=command,
        n_images=sum(s.n_images for s in shards),
        merged_from=[str(s.path) for s in shards],
    )


def _check_documented(name: str, obj: h5py.HLObject) -> None:
    """Merge copies the shards' tree: only what the schema documents may pass into the merged file.

    Raises:
        FmapFileError: a node or attribute the schema does not document.
    """
    try:
        schema.node_for(f"/{name}")
        for key in obj.attrs:
            if key not in DIMENSION_ATTRS:
                schema.attr_for(f"/{name}", key)
    except schema.SchemaError as exc:
        raise FmapFileError(f"{obj.file.filename}: not a file fmap wrote: {exc}") from None


def _copy_attrs(src: h5py.HLObject, dst: h5py.HLObject, skip: frozenset[str] = frozenset()) -> None:
    """Every attribute with its stored type, except the dimension-scale ones and ``skip``."""
    for key in src.attrs:
        if key not in DIMENSION_ATTRS and key not in skip:
            dst.attrs.create(key, src.attrs[key], dtype=src.attrs.get_id(key).dtype)


@dataclass
class _Merger:
    """Builds the merged file: every node from the first shard's tree, then each shard's rows,
    statistics and failures, one shard file open at a time besides the first."""

    f: h5py.File
    first: h5py.File
    shards: Sequence[ShardFile]
    out: Path
    virtual: bool
    stop_requested: StopRequested
    copied: int = 0  # raw chunk bytes
    _targets: dict[str, h5py.Dataset] = field(default_factory=dict)  # each dataset along N
    _layouts: dict[str, h5py.VirtualLayout] = field(default_factory=dict)  # the same, with --virtual
    _per_image: dict[tuple[str, str], int] = field(default_factory=dict)  # (stats, role) -> values per channel
    _pools: dict[tuple[str, str], ChannelStats] = field(default_factory=dict)  # pooled over the shards so far
    _failures_found: list[tuple[ShardFile, dict[str, np.ndarray]]] = field(default_factory=list)
    _runs: dict[str, dict[str, None]] = field(default_factory=lambda: {key: {} for key in JOINED})

    @property
    def total(self) -> int:
        return sum(s.n_images for s in self.shards)

    def run(self) -> int:
        nodes: list[tuple[str, Any]] = []
        self.first.visititems(lambda name, obj: nodes.append((name, obj)))
        nodes = [(n, obj) for n, obj in nodes if n != FAILURES and not n.startswith(f"{FAILURES}/")]
        for name, obj in nodes:
            _check_documented(name, obj)
            check(self.stop_requested)
            self._create(name, obj)
        along = [(n, obj) for n, obj in nodes if _along_n(n, obj)]
        start = 0
        for shard in self.shards:
            with self._open(shard) as src:
                for name, first in along:
                    check(self.stop_requested)
                    self._rows(shard, src[name], name, first, start)
                self._gather(shard, src)
            start += shard.n_images
        for name, layout in self._layouts.items():
            self._virtual(name, layout)
        for (stats, role), pooled in self._pools.items():
            for key, values in pooled.summary().items():
                if f"{stats}/{role}_{key}" in self.f:
                    self.f[f"{stats}/{role}_{key}"][...] = values
        self._failures()
        joined = {key: join_distinct(values) for key, values in self._runs.items()}
        if joined["compressor"] == JOINED["compressor"]:  # no shard records one (written before the attribute)
            del joined["compressor"]
        set_attrs(self.f, **joined)
        _reattach_scales(self.f, [(n, obj) for n, obj in nodes if isinstance(obj, h5py.Dataset)])
        return self.copied

    def _create(self, name: str, obj: Any) -> None:
        """The node ``name`` laid out as in the first shard; rows along N and pooled statistics
        are filled in later, and a virtual dataset is created once every shard is in its layout."""
        if isinstance(obj, h5py.Group):
            _copy_attrs(obj, self.f.require_group(name))
            return
        if name == "N":
            self._like(obj, name, self.total)[...] = np.arange(self.total, dtype=np.int64)
        elif _along_n(name, obj):
            if self.virtual:
                self._layouts[name] = h5py.VirtualLayout(shape=(self.total, *obj.shape[1:]), dtype=obj.dtype)
                return
            self._targets[name] = self._like(obj, name, self.total)
        elif _channel_stat(name):
            self._like(obj, name, obj.shape[0])
            stats, key = name.rsplit("/", 1)
            group = self.first[stats].parent  # min, max, mean and std of a role are pooled together
            per_image = int(np.prod(group.attrs["output_shape"], dtype=np.int64)) // channel_count(group)
            self._per_image[(stats, key.rsplit("_", 1)[0])] = per_image
        else:  # dimension scales C, H, W and anything else fixed: as in the first shard
            self._like(obj, name, obj.shape[0] if obj.shape else 0)[...] = obj[...]
        _copy_attrs(obj, self.f[name])

    def _open(self, shard: ShardFile) -> AbstractContextManager[h5py.File]:
        return nullcontext(self.first) if shard is self.shards[0] else h5py.File(shard.path, "r")

    def _like(self, src: h5py.Dataset, name: str, rows: int) -> h5py.Dataset:
        """A dataset laid out exactly as ``src`` (type, chunks, filters, fill value) with ``rows`` rows."""
        if not src.shape:
            return self.f.create_dataset(name, data=src[()], dtype=src.dtype)
        unlimited = tuple(h5py.h5s.UNLIMITED if n is None else n for n in src.maxshape)
        space = h5py.h5s.create_simple((rows, *src.shape[1:]), unlimited)
        plist = src.id.get_create_plist()
        h5py.h5d.create(self.f.id, name.encode(), src.id.get_type(), space, dcpl=plist)
        return self.f[name]

    def _rows(self, shard: ShardFile, ds: h5py.Dataset, name: str, first: h5py.Dataset, start: int) -> None:
        """One shard's rows of dataset ``name`` along N, at row ``start`` onwards of the merged one."""
        if self.virtual:
            source = os.path.relpath(shard.path.resolve(), self.out.resolve().parent)
            self._layouts[name][start : start + shard.n_images] = h5py.VirtualSource(source, name, shape=ds.shape)
            return
        expected = (shard.n_images, *first.shape[1:])
        if ds.shape != expected:
            raise FmapFileError(f"{shard.path}: damaged shard: {name} has shape {ds.shape}, expected {expected}")
        dst = self._targets[name]
        if ds.chunks is not None and ds.chunks[0] == 1:
            self._copy_chunks(shard, ds, dst, start)
        else:
            rows = max(1, BLOCK_BYTES // max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
            for i in range(0, shard.n_images, rows):
                stop = min(i + rows, shard.n_images)
                dst[start + i : start + stop] = ds[i:stop]

    def _copy_chunks(self, shard: ShardFile, src: h5py.Dataset, dst: h5py.Dataset, start: int) -> None:
        """Copy every chunk's stored bytes (one image per chunk) to row ``start`` onwards of ``dst``."""
        layout = (src.chunks, src.compression, src.compression_opts, src.shuffle, src.dtype)
        if layout != (dst.chunks, dst.compression, dst.compression_opts, dst.shuffle, dst.dtype):
            raise UsageError(f"{shard.path}: {src.name} is stored differently (chunks or codec) from the first shard")
        self.copied += copy_rows(src, dst, src.shape[0], start)

    def _virtual(self, name: str, layout: h5py.VirtualLayout) -> None:
        kind = layout.dtype.kind
        fill = -1 if kind in "iu" else np.nan if kind == "f" else None  # what a missing shard's rows read as
        self.f.create_virtual_dataset(name, layout, fillvalue=fill)
        _copy_attrs(self.first[name], self.f[name])

    def _gather(self, shard: ShardFile, src: h5py.File) -> None:
        """What the merged file takes from every shard besides rows: its per-channel statistics
        (pooled as they come), its /failures and its :data:`JOINED` root attributes."""
        for (stats, role), per_image in self._per_image.items():
            summary = {k: src[f"{stats}/{role}_{k}"][...] for k in SUMMARY if f"{stats}/{role}_{k}" in src}
            pooled = self._pools.get((stats, role))
            self._pools[(stats, role)] = pool_channel_stats(pooled, summary, shard.n_images * per_image)
        for key, absent in JOINED.items():
            self._runs[key][_text(src.attrs[key]) if key in src.attrs else absent] = None
        if FAILURES in src:
            group = src[FAILURES]
            columns = self._failures_found[0][1] if self._failures_found else group
            values = {c: group[c].asstr()[...] if group[c].dtype.kind == "O" else group[c][...] for c in columns}
            self._failures_found.append((shard, values))

    def _failures(self) -> None:
        """Every shard's /failures, in input order, laid out as in the first shard that has some."""
        if not self._failures_found:
            return
        parts = [values for _, values in self._failures_found]
        index = np.concatenate([part["index"] for part in parts])
        order = np.argsort(index, kind="stable")
        with self._open(self._failures_found[0][0]) as src:
            group = src[FAILURES]
            out = self.f.create_group(FAILURES)
            _copy_attrs(group, out)
            for column in group:
                dst = self._like(group[column], f"{FAILURES}/{column}", len(index))
                dst[...] = np.concatenate([part[column] for part in parts])[order]
                _copy_attrs(group[column], dst)


def _along_n(name: str, obj: h5py.HLObject) -> bool:
    """A dataset with a row per image (its first axis unlimited), other than the scale N itself."""
    return isinstance(obj, h5py.Dataset) and name != "N" and bool(obj.maxshape) and obj.maxshape[0] is None


def _channel_stat(name: str) -> bool:
    """``layers/<L>/stats/<role>_<min|max|mean|std|negatives>``: per-channel statistics over every image."""
    parts = name.split("/")
    return (
        len(parts) == 4
        and parts[0] == schema.LAYERS
        and parts[2] == schema.STATS
        and parts[3].rsplit("_", 1)[-1] in SUMMARY
    )


def _reattach_scales(f: h5py.File, datasets: Sequence[tuple[str, h5py.Dataset]]) -> None:
    """Make the same datasets dimension scales as in the shard, and attach and label them alike."""
    for name, src in datasets:
        if src.is_scale:
            f[name].make_scale(_text(src.attrs.get("NAME", name.rsplit("/", 1)[-1])))
    for name, src in datasets:
        dst = f[name]
        for axis, dim in enumerate(src.dims):
            if dim.label:
                dst.dims[axis].label = dim.label
            for scale in dim.values():
                dst.dims[axis].attach_scale(f[scale.name])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- statistics
def pool_channel_stats(pooled: ChannelStats | None, summary: dict[str, np.ndarray], count: int) -> ChannelStats:
    """Per-channel statistics ``pooled`` so far (None before the first shard) combined with one
    shard's stored ``summary`` of ``count`` values per channel (the pairwise merge the writer uses)."""
    part = ChannelStats.restore(summary, count)
    if pooled is None:
        return part
    pooled.merge(part)
    return pooled
