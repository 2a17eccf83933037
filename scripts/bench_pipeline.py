"""Pipeline benchmark (`make bench`): `fmap extract` against its own stages, measured in one run.

For generated JPEGs it times each stage alone -- decoding + preprocessing, the bare forward pass,
a raw h5py write of the same bytes with the same chunks and codecs -- and then the whole
`fmap extract`, and reports fmap / slowest stage (1.0 = perfect overlap). It also measures the peak
RSS of `fmap extract` on few and on many images, in fresh processes: streaming means the two match.

    python scripts/bench_pipeline.py [--images 256] [--rss 200,2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from fmap_cli.capture import capture, discover
from fmap_cli.extract import ExtractOptions, extract, preprocessing_for
from fmap_cli.images import load_batch
from fmap_cli.models import load_model
from fmap_cli.store.chunks import chunk_shape
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


def bench(model_name: str, model_arg: str | None, layers: list[str] | None, paths: list[str], workdir: Path) -> None:
    """Stages alone, then the whole extract, for one model."""
    loaded = load_model(model_arg)
    prep = preprocessing_for(loaded.input, None, False)
    infos = discover(loaded.module, torch.zeros(1, 3, *loaded.input.size))
    names = layers or [n for n, i in infos.items() if i.kind == "linear" and i.nonlinearity != "none"]
    n = len(paths)
    items = list(enumerate(paths))

    def decode() -> None:
        from concurrent.futures import ThreadPoolExecutor

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

    def write() -> None:
        with h5py.File(workdir / "raw.h5", "w") as f:
            for name, (z, a) in host.items():
                for role, values, (codec, level) in (("z", z, storage.preactivation), ("a", a, storage.activation)):
                    if values is None:
                        continue
                    ds = f.create_dataset(
                        f"{name}/{role}", shape=(n, *values.shape[1:]), dtype=np.float32,
                        chunks=chunk_shape(values.shape[1:], 4), compression=codec,
                        compression_opts=level if codec == "gzip" else None,
                    )  # fmt: skip
                    for start in range(0, n, BATCH):
                        stop = min(n, start + BATCH)
                        ds[start:stop] = values[: stop - start]
            f.flush()

    def whole() -> None:
        extract(ExtractOptions(images=paths, out=workdir / "fmap.h5", model=model_arg, layers=names,
                               batch_size=BATCH, device="cpu", overwrite=True))  # fmt: skip

    stages = {"decode + preprocess (2 threads)": rate(n, decode), "bare forward": rate(n, forward),
              "raw h5py write (same bytes)": rate(n, write)}  # fmt: skip
    total = rate(n, whole)
    slowest = min(stages.values())
    per_image = sum(v.nbytes for pair in host.values() for v in pair if v is not None) / BATCH / 1e6
    print(f"\n{model_name}: {n} JPEGs 640x480, batch {BATCH}, layers {len(names)}, {per_image:.1f} MB/image written")
    for label, value in stages.items():
        print(f"  {label:<34} {value:>8.1f} img/s")
    print(f"  {'fmap extract (whole pipeline)':<34} {total:>8.1f} img/s")
    print(f"  fmap / slowest stage = {total / slowest:.2f}   (1.0 = stages fully overlapped; target >= 0.9)")


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
    parser.add_argument("--rss", default="200,2000")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fmap-bench")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    photos = args.workdir / "jpegs"
    photos.mkdir(exist_ok=True)
    paths = make_jpegs(photos, args.images)
    print(f"machine: {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    bench("edges (default model), conv1 + conv2", None, ["conv1", "conv2"], paths, args.workdir)
    resnet = f"{Path(__file__).resolve().parent.parent / 'tests' / 'zoo.py'}:resnet18_full"
    bench("ResNet-18-shaped, all 20 convs", resnet, None, paths[: args.resnet_images], args.workdir)
    few, many = (int(v) for v in args.rss.split(","))
    small = [p for i, p in enumerate(paths * (many // len(paths) + 1)) if i < many]
    rss_few, rss_many = peak_rss(small[:few], args.workdir), peak_rss(small, args.workdir)
    print(f"\npeak RSS of fmap extract (edges conv2 at 112 px, batch {BATCH}): {few} images {rss_few / 2**20:.0f} MiB, "
          f"{many} images {rss_many / 2**20:.0f} MiB, ratio {rss_many / rss_few:.2f} (target within 1.10)")  # fmt: skip
    for name in ("raw.h5", "fmap.h5", "rss.h5"):  # the JPEGs stay for the next run
        (args.workdir / name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
