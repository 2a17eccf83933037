"""Pipeline benchmark (`make bench`): `fmap extract` against its own stages, measured in one run.

For generated JPEGs it times each stage alone -- decoding + preprocessing, the bare forward pass,
fmap's write stage (its chunk writer at default storage: a gzip:1 with ISA-L, z raw) -- then a raw
uncompressed h5py write of the same bytes and the whole `fmap extract` (with ISA-L, and with its
zlib fallback), and reports fmap / raw write and fmap / slowest stage (1.0 = perfect overlap), as
medians of paired repetitions. For the
ResNet-18 shape it also times the write stage alone per codec, zlib and ISA-L side by side (MB/s of
map bytes, stored ratio, time / uncompressed), which is what the storage defaults rest on. Last,
the peak RSS of `fmap extract` on few and on many images, in fresh processes: streaming means the
two match.

    python scripts/bench_pipeline.py [--images 256] [--reps 3] [--rss 200,2000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from fmap_cli.capture import capture, discover
from fmap_cli.extract import Continuation, ExtractOptions, Inputs, ModelChoice, extract, preprocessing_for
from fmap_cli.images import load_batch
from fmap_cli.models import load_model
from fmap_cli.store import chunks
from fmap_cli.store.chunks import COMPRESSORS, chunk_shape, write_rows
from fmap_cli.store.layout import Codec
from fmap_cli.store.writer import Storage

BATCH = 16


def make_jpegs(directory: Path, count: int, size: tuple[int, int] = (480, 640)) -> list[str]:
    """``count`` smooth random colour photos-like JPEGs (quality 90), made once per directory."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = directory / f"img{i:05d}.jpg"
        if not path.exists():
            small = rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            image.save(path, quality=90)
        paths.append(str(path))
    return paths


def rate(count: int, fn: Callable[[], object]) -> float:
    """Images per second of ``fn`` handling ``count`` images."""
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


@contextmanager
def compressor(name: str) -> Iterator[None]:
    """Compress gzip chunks with "isal" (fmap's default where isal imports) or "zlib" (its fallback)."""
    saved = chunks.deflater
    if name == "zlib":
        chunks.deflater = chunks.zlib_deflater
    elif chunks.deflater(1).library.split()[0] != "isal":
        raise SystemExit("isal is not installed: pip install isal")
    try:
        yield
    finally:
        chunks.deflater = saved


Maps = dict[str, tuple[np.ndarray, np.ndarray | None]]  # layer -> (z, a) of one batch


def write_maps(path: Path, host: Maps, n: int, z_codec: Codec | None, a_codec: Codec | None) -> int:
    """Write ``n`` images of ``host`` maps (the batch repeated) as fmap writes them: chunks of
    ``chunk_shape``, gzip chunks compressed in a pool by ``chunks.write_rows``; None skips a role.
    Returns the bytes stored."""
    with h5py.File(path, "w") as f, ThreadPoolExecutor(COMPRESSORS) as pool:
        written = []
        for name, pair in host.items():
            for role, values, codec in (("z", pair[0], z_codec), ("a", pair[1], a_codec)):
                if values is None or codec is None:
                    continue
                ds = f.create_dataset(
                    f"{name}/{role}", shape=(n, *values.shape[1:]), dtype=np.float32,
                    chunks=chunk_shape(values.shape[1:], 4), compression=codec[0],
                    compression_opts=codec[1] if codec[0] == "gzip" else None,
                )  # fmt: skip
                for start in range(0, n, BATCH):
                    stop = min(n, start + BATCH)
                    write_rows(ds, start, values[: stop - start], pool)
                written.append(ds)
        f.flush()
        return sum(ds.id.get_storage_size() for ds in written)


def median_rates(n: int, runs: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Images per second of each of ``runs`` in each of ``reps`` rounds (run back to back, so a
    noisy machine slows all of them alike)."""
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(reps):
        for label, fn in runs.items():
            rates[label].append(rate(n, fn))
    return rates


def bench(
    model_name: str,
    model_arg: str | None,
    layers: list[str] | None,
    paths: list[str],
    workdir: Path,
    reps: int,
    z_gzip: bool = False,
    layouts: bool = False,
) -> Maps:
    """Stages alone, then the whole extract (with ISA-L, and with zlib), for one model; returns one
    batch of its maps.

    ``z_gzip``: also time the whole extract with z compressed too (--z-compression gzip:1).
    ``layouts``: also time the bare forward and the whole extract with a channels-last batch
    (--memory-format channels_last), each against its own contiguous counterpart."""
    loaded = load_model(model_arg)
    prep = preprocessing_for(loaded.input, ModelChoice())
    infos = discover(loaded.module, torch.zeros(1, 3, *loaded.input.size))
    names = layers or [n for n, i in infos.items() if i.kind == "linear" and i.nonlinearity != "none"]
    n = len(paths)
    items = list(enumerate(paths))

    def decode() -> None:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: load_batch(items[s : s + BATCH], prep), range(0, n, BATCH)))

    batch = torch.from_numpy(load_batch(items[:BATCH], prep)[0].pixels)

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(0, n, BATCH):
                loaded.module(batch)

    with capture(loaded.module, infos, names) as run:
        maps = run(batch)
    host = {name: (m.z.numpy(), m.a.numpy() if m.a is not None else None) for name, m in maps.items()}
    storage = Storage()

    def whole(storage: Storage = storage, memory_format: str = "contiguous") -> None:
        choice = ModelChoice(model=model_arg, layers=names, device="cpu", memory_format=memory_format)
        extract(ExtractOptions(Inputs(paths, batch_size=BATCH), workdir / "fmap.h5", choice, storage,
                               continuation=Continuation(overwrite=True)))  # fmt: skip

    def forward_channels_last() -> None:
        x = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(0, n, BATCH):
                loaded.module(x)

    stages = {
        "decode + preprocess (2 threads)": decode,
        "bare forward": forward,
        "write stage (fmap's writer, ISA-L)": lambda: write_maps(
            workdir / "stage.h5", host, n, storage.preactivation, storage.activation
        ),
    }
    raw = {"raw h5py write, uncompressed": lambda: write_maps(workdir / "raw.h5", host, n, (None, 0), (None, 0))}

    def whole_zlib() -> None:
        with compressor("zlib"):
            whole()

    runs = {**stages, **raw, "fmap extract (whole pipeline)": whole, "fmap extract with zlib (fallback)": whole_zlib}
    if z_gzip:
        runs["fmap extract --z-compression gzip:1"] = lambda: whole(Storage(preactivation=("gzip", 1)))
    if layouts:
        runs["bare forward, channels-last batch"] = forward_channels_last
        runs["fmap extract --memory-format channels_last"] = lambda: whole(memory_format="channels_last")
    rates = median_rates(n, runs, reps)
    total = rates["fmap extract (whole pipeline)"]
    slowest = [min(rates[label][i] for label in stages) for i in range(reps)]
    raw_rates = rates["raw h5py write, uncompressed"]
    per_image = sum(v.nbytes for pair in host.values() for v in pair if v is not None) / BATCH / 1e6
    print(f"\n{model_name}: {n} JPEGs 640x480, batch {BATCH}, layers {len(names)}, {per_image:.1f} MB/image written, "
          f"default storage, medians of {reps}")  # fmt: skip
    for label, values in rates.items():
        print(f"  {label:<36} {statistics.median(values):>8.1f} img/s")
    by_raw = statistics.median(t / r for t, r in zip(total, raw_rates, strict=True))
    by_slowest = statistics.median(t / s for t, s in zip(total, slowest, strict=True))
    print(f"  fmap / raw uncompressed write = {by_raw:.2f}   (target >= 0.6)")
    print(f"  fmap / slowest stage = {by_slowest:.2f}   (1.0 = stages fully overlapped; target >= 0.9)")
    by_zlib = statistics.median(t / z for t, z in zip(total, rates["fmap extract with zlib (fallback)"], strict=True))
    print(f"  fmap speed with ISA-L / with zlib = {by_zlib:.2f}")
    if z_gzip:
        zipped = rates["fmap extract --z-compression gzip:1"]
        cost = statistics.median(t / z for t, z in zip(total, zipped, strict=True))
        print(f"  fmap time with z gzip:1 / default (z raw) = {cost:.2f}")
    if layouts:  # like with like: each layout against the same layout
        for label, base, fast in (
            ("bare forward", "bare forward", "bare forward, channels-last batch"),
            ("fmap extract", "fmap extract (whole pipeline)", "fmap extract --memory-format channels_last"),
        ):
            speed = statistics.median(c / b for c, b in zip(rates[fast], rates[base], strict=True))
            print(f"  {label}: channels-last / contiguous speed = {speed:.2f}")
    return host


def bench_write_stage(host: Maps, n: int, workdir: Path, reps: int) -> None:
    """The write stage alone, per role and codec, zlib and ISA-L side by side: MB/s of map bytes,
    stored ratio, and time / the uncompressed write of the same role."""
    variants: dict[str, tuple[str, Codec]] = {
        "uncompressed": ("isal", (None, 0)),
        "gzip:1, zlib level 1": ("zlib", ("gzip", 1)),
        "gzip:1, ISA-L level 1": ("isal", ("gzip", 1)),
        "gzip:4, ISA-L level 2": ("isal", ("gzip", 4)),
        "gzip:7, ISA-L level 3": ("isal", ("gzip", 7)),
    }
    path = workdir / "stage.h5"
    for role in ("z", "a"):
        stored: dict[str, int] = {}

        def one(label: str, role: str = role, stored: dict[str, int] = stored) -> Callable[[], object]:
            library, codec = variants[label]

            def run() -> None:
                with compressor(library):
                    z_codec, a_codec = (codec, None) if role == "z" else (None, codec)
                    stored[label] = write_maps(path, host, n, z_codec, a_codec)

            return run

        rates = median_rates(n, {label: one(label) for label in variants}, reps)
        index = 0 if role == "z" else 1
        raw_bytes = n * sum(pair[index][0].nbytes for pair in host.values() if pair[index] is not None)
        print(f"\n  write stage, {role} only ({raw_bytes / n / 1e6:.1f} MB/image, {n} images, {COMPRESSORS} threads), "
              f"medians of {reps}:")  # fmt: skip
        print(f"    {'codec':<24} {'MB/s':>7} {'ratio':>7} {'time / uncompressed':>20}")
        base = rates["uncompressed"]
        for label, values in rates.items():
            slower = statistics.median(b / v for v, b in zip(values, base, strict=True))
            print(f"    {label:<24} {raw_bytes / 1e6 * statistics.median(values) / n:>7.0f} "
                  f"{raw_bytes / stored[label]:>7.3f} {slower:>20.2f}")  # fmt: skip
    both: dict[str, tuple[str, Codec | None, Codec]] = {
        "default storage (a gzip:1, z raw), zlib": ("zlib", (None, 0), ("gzip", 1)),
        "default storage (a gzip:1, z raw), ISA-L": ("isal", (None, 0), ("gzip", 1)),
        "z and a gzip:1, ISA-L": ("isal", ("gzip", 1), ("gzip", 1)),
        "z and a uncompressed": ("isal", (None, 0), (None, 0)),
    }

    def write(library: str, z_codec: Codec | None, a_codec: Codec) -> Callable[[], object]:
        def run() -> None:
            with compressor(library):
                write_maps(path, host, n, z_codec, a_codec)

        return run

    rates = median_rates(n, {label: write(*spec) for label, spec in both.items()}, reps)
    per_image = sum(v[0].nbytes for pair in host.values() for v in pair if v is not None) / 1e6
    print(f"\n  write stage, z and a ({per_image:.1f} MB/image), medians of {reps}:")
    for label, values in rates.items():
        speed = statistics.median(values)
        print(f"    {label:<44} {speed:>7.1f} img/s {speed * per_image:>7.0f} MB/s")
    path.unlink(missing_ok=True)


def peak_rss(paths: list[str], workdir: Path) -> int:
    """Peak resident memory (bytes) of one `fmap extract` process over ``paths``."""
    listing = workdir / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    fmap = Path(sys.executable).with_name("fmap")
    command = [str(fmap), "extract", "--files-from", str(listing), "-o", str(workdir / "rss.h5"), "--overwrite",
               "--layers", "conv2", "--size", "112", "-q", "-b", str(BATCH), "--compression", "none"]  # fmt: skip
    # A small launcher forks fmap: a child forked from this (large) process would count our
    # memory as its own peak until it execs.
    launcher = (
        "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "_, status, usage = os.wait4(p.pid, 0); print(status, usage.ru_maxrss)"
    )
    status, peak_kib = subprocess.run([sys.executable, "-c", launcher, *command], capture_output=True,
                                      text=True, check=True).stdout.split()  # fmt: skip
    if status != "0":
        raise SystemExit(f"fmap extract failed: {command}")
    return int(peak_kib) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--resnet-images", type=int, default=48, help="fewer: every conv is ~19 MB per image")
    parser.add_argument("--write-images", type=int, default=32, help="images per codec in the write-stage table")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rss", default="200,2000")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fmap-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    photos = args.workdir / "jpegs"
    photos.mkdir(exist_ok=True)
    paths = make_jpegs(photos, args.images)
    fast, fallback = chunks.deflater(1).describe(), chunks.zlib_deflater(1).describe()
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"gzip:1 chunks by {fast}, fallback {fallback}")  # fmt: skip
    bench("edges (default model), conv1 + conv2", None, ["conv1", "conv2"], paths, args.workdir, args.reps)
    resnet = f"{Path(__file__).resolve().parent.parent / 'tests' / 'zoo.py'}:resnet18_full"
    host = bench("ResNet-18-shaped, all 20 convs", resnet, None, paths[: args.resnet_images], args.workdir, args.reps,
                 z_gzip=True, layouts=True)  # fmt: skip
    bench_write_stage(host, args.write_images, args.workdir, args.reps)
    few, many = (int(v) for v in args.rss.split(","))
    small = [p for i, p in enumerate(paths * (many // len(paths) + 1)) if i < many]
    rss_few, rss_many = peak_rss(small[:few], args.workdir), peak_rss(small, args.workdir)
    print(f"\npeak RSS of fmap extract (edges conv2 at 112 px, batch {BATCH}): {few} images {rss_few / 2**20:.0f} MiB, "
          f"{many} images {rss_many / 2**20:.0f} MiB, ratio {rss_many / rss_few:.2f} (target within 1.10)")  # fmt: skip
    for name in ("raw.h5", "stage.h5", "fmap.h5", "rss.h5"):  # the JPEGs stay for the next run
        (args.workdir / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
