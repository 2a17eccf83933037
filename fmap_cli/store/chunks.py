"""HDF5 chunks of map datasets: their shape, and writing or copying them as stored bytes.

gzip chunks are compressed here, not by HDF5's filter, with ISA-L (the ``isal`` package) when it
can be imported, else with the standard library's zlib. Both write the zlib stream HDF5's deflate
filter reads, so every reader (h5py, h5dump, xarray, netCDF) reads the chunks with no plugin. The
level a dataset records in its filter parameters (``gzip:N``) is the one the user asked for; to a
reader it is information only (inflating needs no level). ``gzip:N`` maps to ISA-L's levels 0-3 as
:data:`ISAL_LEVELS` says; the root attribute ``compressor`` says which library wrote the chunks.

h5py, numpy and isal only.
"""

from __future__ import annotations

import itertools
import os
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

CHUNK_BYTES = 1 << 20  # one image x a block of channels, at most 1 MiB (../shared/HDF5-NOTES.md)


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk of one image x a block of channels, at most CHUNK_BYTES.

    Channels are halved first; a single channel larger than the limit is split into row blocks.
    """
    block = list(shape)  # one image's (C, H, W) or (C,)
    axis = 0
    while axis < len(block) and block[axis] > 1 and int(np.prod(block)) * itemsize > CHUNK_BYTES:
        block[axis] = (block[axis] + 1) // 2
        if block[axis] == 1:
            axis += 1
    return (1, *block)


COMPRESSORS = os.cpu_count() or 2  # threads compressing gzip chunks (zlib and ISA-L let go of the GIL)

# gzip:N -> ISA-L level. zlib's levels 1-3 are its fast matcher, 4-6 its lazy one, 7-9 its
# thorough one; ISA-L's 1, 2, 3 are the matching steps up. On ResNet maps (scripts/bench_pipeline.py)
# ISA-L 1 compresses a as well as zlib 1 (ratio 1.89 vs 1.85) and z alike (1.08) 7-30x faster;
# 2 and 3 gain nothing more on them. gzip:0 means "stored, not compressed" to zlib and HDF5, and
# ISA-L has no such level (its level 0, the fastest, made dense z 24% bigger), so gzip:0 stays
# zlib's level 0 (None here).
ISAL_LEVELS: tuple[int | None, ...] = (None, 1, 1, 1, 2, 2, 2, 3, 3, 3)


@dataclass(frozen=True)
class Deflate:
    """A compressor of zlib streams (what HDF5's gzip filter stores) for one ``gzip:N`` level."""

    library: str  # "isal 1.9.1", "zlib 1.2.13"
    level: int  # the level as that library counts
    compress: Callable[[Any], bytes]  # C-contiguous buffer -> zlib stream; lets go of the GIL

    def describe(self) -> str:
        """What the ``compressor`` attribute says, e.g. ``isal 1.9.1 level 1``."""
        return f"{self.library} level {self.level}"


def zlib_deflater(gzip_level: int) -> Deflate:
    """The standard library's zlib at ``gzip_level`` (the fallback; benchmarks compare with it)."""
    return Deflate(f"zlib {zlib.ZLIB_RUNTIME_VERSION}", gzip_level, lambda data: zlib.compress(data, gzip_level))


def find_deflaters() -> Callable[[int], Deflate]:
    """``gzip:N`` -> :class:`Deflate`: ISA-L where ``isal`` imports, else zlib for every level."""
    try:
        import isal
        from isal import isal_zlib
    except ImportError:  # no isal wheel for this platform: zlib writes the same format, slower
        return zlib_deflater
    library = f"isal {isal.__version__}"

    def isal_deflater(gzip_level: int) -> Deflate:
        level = ISAL_LEVELS[gzip_level]
        if level is None:
            return zlib_deflater(gzip_level)
        return Deflate(library, level, lambda data: isal_zlib.compress(data, level))

    return isal_deflater


deflater = find_deflaters()  # tests replace it to write with the zlib fallback


def describe_compressors(codecs: Mapping[str, tuple[str | None, int]]) -> str:
    """The ``compressor`` attribute for maps stored with ``codecs`` (role -> (filter, gzip level)):
    ``isal 1.9.1 level 1`` when every gzip role uses one, ``preactivation: ...; activation: ...``
    when they differ, ``none`` without gzip."""
    used = {role: deflater(level).describe() for role, (codec, level) in codecs.items() if codec == "gzip"}
    if len(set(used.values())) == 1:
        return next(iter(used.values()))
    return "; ".join(f"{role}: {text}" for role, text in used.items()) or "none"


UNRECORDED = "unrecorded (zlib)"  # the compressor of a file written before the attribute


def write_rows(ds: h5py.Dataset, start: int, values: np.ndarray, pool: ThreadPoolExecutor) -> None:
    """Write ``values`` into rows ``start``.. of ``ds`` (already resized).

    A gzip dataset without shuffle, chunked one row at a time, gets its chunks compressed by
    ``pool`` with :data:`deflater` (ISA-L or zlib, both let go of the GIL) and written as stored
    bytes: HDF5's own filter compresses with zlib on one core while holding the GIL, which stalls
    the model thread. Any HDF5 reader sees ordinary deflate chunks (../shared/HDF5-NOTES.md
    section 7).
    """
    chunks = ds.chunks
    if ds.compression != "gzip" or ds.shuffle or chunks is None or chunks[0] != 1:
        ds[start : start + len(values)] = values
        return
    compress = deflater(int(ds.compression_opts)).compress
    values = np.ascontiguousarray(values, dtype=ds.dtype)
    grid = list(itertools.product(*(range(0, n, c) for n, c in zip(ds.shape[1:], chunks[1:], strict=True))))

    def compress_chunk(job: tuple[int, tuple[int, ...]]) -> tuple[tuple[int, ...], bytes]:
        row, corner = job
        where: tuple[Any, ...] = (row, *(slice(o, o + c) for o, c in zip(corner, chunks[1:], strict=True)))
        block = values[where]
        if block.shape != chunks[1:]:  # an edge chunk is stored full size
            padded = np.zeros(chunks[1:], dtype=values.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        return (start + row, *corner), compress(np.ascontiguousarray(block))  # a view when it is one already

    jobs = [(row, corner) for row in range(len(values)) for corner in grid]
    for offset, data in pool.map(compress_chunk, jobs):
        ds.id.write_direct_chunk(offset, data)


def copy_rows(src: h5py.Dataset, dst: h5py.Dataset, count: int, start: int = 0) -> int:
    """Copy the first ``count`` rows of ``src`` to rows ``start``.. of ``dst``; return bytes copied.

    Datasets stored alike with one row per chunk (the maps) are copied as stored chunk bytes, with
    no decompression; others are read and written in blocks of about 16 MiB.
    """
    same = (src.chunks, src.compression, src.compression_opts, src.shuffle, src.dtype) == (
        dst.chunks, dst.compression, dst.compression_opts, dst.shuffle, dst.dtype,
    )  # fmt: skip
    if same and src.chunks is not None and src.chunks[0] == 1 and len(src.shape) > 1:
        grid = [range(0, n, c) for n, c in zip(src.shape[1:], src.chunks[1:], strict=True)]
        read, write, copied = src.id.read_direct_chunk, dst.id.write_direct_chunk, 0
        for row in range(count):
            for offset in itertools.product(*grid):
                mask, data = read((row, *offset))
                write((start + row, *offset), data, mask)
                copied += len(data)
        return copied
    row_bytes = max(1, src.dtype.itemsize * int(np.prod(src.shape[1:], dtype=np.int64)))
    block = max(1, (16 << 20) // row_bytes)
    for first in range(0, count, block):
        stop = min(count, first + block)
        dst[start + first : start + stop] = src[first:stop]
    return int(count * row_bytes)
