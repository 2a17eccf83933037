"""HDF5 chunks of map datasets: their shape, and writing or copying them as stored bytes.

h5py and numpy only.
"""

from __future__ import annotations

import itertools
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
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


COMPRESSORS = os.cpu_count() or 2  # threads compressing gzip chunks (zlib lets go of the GIL)


def write_rows(ds: h5py.Dataset, start: int, values: np.ndarray, pool: ThreadPoolExecutor) -> None:
    """Write ``values`` into rows ``start``.. of ``ds`` (already resized).

    A gzip dataset without shuffle, chunked one row at a time, gets its chunks compressed by
    ``pool`` with zlib, which releases the GIL, and written as stored bytes: HDF5's own filter
    compresses on one core while holding the GIL, which stalls the model thread. Any HDF5 reader
    sees ordinary deflate chunks (../shared/HDF5-NOTES.md section 7).
    """
    chunks = ds.chunks
    if ds.compression != "gzip" or ds.shuffle or chunks is None or chunks[0] != 1:
        ds[start : start + len(values)] = values
        return
    level = int(ds.compression_opts)
    values = np.ascontiguousarray(values, dtype=ds.dtype)
    grid = list(itertools.product(*(range(0, n, c) for n, c in zip(ds.shape[1:], chunks[1:], strict=True))))

    def compress(job: tuple[int, tuple[int, ...]]) -> tuple[tuple[int, ...], bytes]:
        row, corner = job
        where: tuple[Any, ...] = (row, *(slice(o, o + c) for o, c in zip(corner, chunks[1:], strict=True)))
        block = values[where]
        if block.shape != chunks[1:]:  # an edge chunk is stored full size
            padded = np.zeros(chunks[1:], dtype=values.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        return (start + row, *corner), zlib.compress(np.ascontiguousarray(block).tobytes(), level)

    jobs = [(row, corner) for row in range(len(values)) for corner in grid]
    for offset, data in pool.map(compress, jobs):
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
