"""fmap benchmark (`make bench`): capture cost against a bare forward pass measured in the same run.

Ratios, not absolute times, are the result: each repetition times the bare forward pass and every
capture variant back to back, and the report gives the median of the per-repetition ratios, so a
noisy machine (see ../shared/PERF-NOTES.md) moves both sides together.

    python scripts/bench.py [--reps 7] [--batch 8] [--size 224] [--inspect-gb 1.5] [--inspect-dir /tmp]

The last part writes a synthetic fmap file of --inspect-gb GB and times `fmap inspect` on it with
write-time statistics and without them (a scan); the target is well under a second on 5 GB:
`--inspect-gb 5` runs that size (it needs 5 GB of free disk).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
import torch

from fmap_cli.capture import capture, discover
from fmap_cli.models import load_model
from fmap_cli.store.chunks import chunk_shape
from fmap_cli.store.stats import ChannelStats, image_stats
from fmap_cli.summary import read_summary

REPO = Path(__file__).resolve().parent.parent


def load_zoo() -> ModuleType:
    """tests/zoo.py: hand-built replicas of torchvision/timm model patterns."""
    spec = importlib.util.spec_from_file_location("zoo", REPO / "tests" / "zoo.py")
    assert spec is not None and spec.loader is not None
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    return zoo


def resnet18_shaped() -> torch.nn.Module:
    """torchvision's ResNet-18 layout (11.7 M parameters), random weights, from the test zoo."""
    return load_zoo().resnet18(width=64, num_classes=1000).eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_times(runners: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds of each runner, ``reps`` times, after one warm-up call each (allocator, oneDNN kernel
    selection); the runners take turns, so sample i of each saw the same machine state."""
    for fn in runners.values():
        fn()
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(reps):
        for label, fn in runners.items():
            times[label].append(timed(fn))
    return times


def bench_model(
    name: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    variants: dict[str, list[str]],
    reps: int,
    others: dict[str, Callable[[], object]] | None = None,
) -> None:
    """Time the bare forward pass, each capture variant and ``others`` (other tools doing the same
    capture); print medians and paired ratios."""
    layers = discover(model, x[:1])

    def bare() -> None:
        with torch.inference_mode():
            model(x)

    runners: dict[str, Callable[[], object]] = {"bare forward": bare}
    contexts = []
    for label, names in variants.items():
        ctx = capture(model, layers, names)
        run = ctx.__enter__()
        contexts.append(ctx)
        runners[label] = lambda run=run: run(x)
    runners.update(others or {})
    times = paired_times(runners, reps)
    for ctx in contexts:
        ctx.__exit__(None, None, None)
    n = x.shape[0]
    print(f"\n{name}: batch {n} at {x.shape[2]}x{x.shape[3]}, {reps} repetitions")
    print(f"  {'variant':<36} {'img/s':>8} {'time / bare':>12}")
    for label, samples in times.items():
        ratio = statistics.median(t / b for t, b in zip(samples, times["bare forward"], strict=True))
        print(f"  {label:<36} {n / statistics.median(samples):>8.1f} {ratio:>12.2f}")


def write_synthetic(path: Path, gigabytes: float, stats: bool = True) -> int:
    """An fmap file of about ``gigabytes`` GB, fast: one 64x56x56 layer, z and a uncompressed, with the
    write-time statistics (fmap's own accumulators) when ``stats``. Returns its number of images."""
    shape, batch = (64, 56, 56), 64
    n = max(batch, int(gigabytes * 1e9 / (2 * 4 * np.prod(shape))) // batch * batch)
    rng = np.random.default_rng(0)
    block = rng.normal(size=(batch, *shape)).astype(np.float32)  # reused with a shift per batch
    with h5py.File(path, "w") as f:
        f.attrs.update(fmap_schema_version=1, complete=np.int8(1), n_images=n, model_name="synthetic",
                       preprocessing=json.dumps({"input_size": [224, 224], "steps": []}), layers=["conv"])  # fmt: skip
        f["N"] = np.arange(n)
        f["images/path"] = [f"img{i:07d}.jpg" for i in range(n)]
        f["images/original_size"] = np.full((n, 2), 224)
        group = f.create_group("layers/conv")
        group.attrs.update(type="conv2d", nonlinearity="relu", output_shape=shape)
        maps = {r: group.create_dataset(r, (n, *shape), np.float32, chunks=chunk_shape(shape, 4))
                for r in ("preactivation", "activation")}  # fmt: skip
        running = {r: ChannelStats.empty(shape[0]) for r in maps}
        per_image: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, batch):
            z = block + np.float32(start % 7 - 3) * 0.1
            a = np.maximum(z, 0)
            maps["preactivation"][start : start + batch] = z
            maps["activation"][start : start + batch] = a
            if stats:
                running["preactivation"].update(z)
                running["activation"].update(a)
                for key, values in image_stats(a).items():
                    per_image.setdefault(key, []).append(values)
        if stats:
            out = group.create_group("stats")
            out.attrs["role"] = "activation"
            for key, parts in per_image.items():
                out[key] = np.concatenate(parts)
            for role, acc in running.items():
                for key, values in acc.summary().items():
                    out[f"{role}_{key}"] = values
    return n


def bench_inspect(gigabytes: float, directory: Path, reps: int) -> None:
    """`fmap inspect` on a large synthetic file with write-time statistics, and on the same maps
    without them (the chunked scan of older files)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bench_inspect.h5"
    t = time.perf_counter()
    n = write_synthetic(path, gigabytes)
    size = path.stat().st_size
    print(f"\nfmap inspect: synthetic file {size / 1e9:.2f} GB ({n} images x 64x56x56, z and a), written in "
          f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    with_stats = statistics.median(timed(lambda: read_summary(path)) for _ in range(reps))
    fmap = Path(sys.executable).parent / "fmap"
    cli = statistics.median(
        timed(lambda: subprocess.run([str(fmap), "inspect", str(path)], capture_output=True, check=True))
        for _ in range(reps)
    )
    with h5py.File(path, "r+") as f:
        del f["layers/conv/stats"]
    scan = timed(lambda: read_summary(path))  # the file was just written: mostly from the page cache
    path.unlink()
    print(f"  {'read_summary with stats':<36} {with_stats:>8.3f} s")
    print(f"  {'`fmap inspect` process with stats':<36} {cli:>8.3f} s  (Python start-up and imports included)")
    print(f"  {'read_summary without stats (scan)':<36} {scan:>8.3f} s  ({scan / with_stats:.0f}x slower)")


def torchlens_reference(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """TorchLens saving every conv2d output, when it is installed: the tool a user would otherwise
    pick (it is not a dependency; ``pip install torchlens`` to include it)."""
    try:
        import torchlens
    except ImportError:
        print("(torchlens not installed: its reference timing is skipped)")
        return {}
    return {"torchlens trace, every conv2d saved": lambda: torchlens.trace(model, x, save=torchlens.func("conv2d"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--inspect-gb", type=float, default=1.5, help="size of the inspect benchmark file; 0 skips")
    parser.add_argument("--inspect-dir", type=Path, default=Path("/tmp"), help="where that file is written")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    x = torch.randn(args.batch, 3, args.size, args.size)

    edges = load_model().module
    bench_model("edges (default model)", edges, x, {"capture conv1 + conv2 (z and a)": ["conv1", "conv2"]}, args.reps)

    resnet = resnet18_shaped()
    convs = [n for n, m in resnet.named_modules() if isinstance(m, torch.nn.Conv2d)]
    bench_model(
        "ResNet-18-shaped (random weights)",
        resnet,
        x,
        {
            "capture conv1 only (stops early)": ["conv1"],
            "capture layer4.1.conv2 only": ["layer4.1.conv2"],
            f"capture all {len(convs)} convs (z and a)": convs,
        },
        args.reps,
        torchlens_reference(resnet, x),
    )
    if args.inspect_gb > 0:
        bench_inspect(args.inspect_gb, args.inspect_dir, args.reps)
    bench_merge()


def bench_merge(images: int = 160, shards: int = 4, reps: int = 3) -> None:
    """fmap merge (raw chunk copy) against re-compressing the same maps with h5py (read + write).

    Shards of the default model at 224x224 (about 2 MB of maps per image); MB/s counts the maps'
    uncompressed bytes. Both read the shards from the page cache.
    """
    import tempfile

    import h5py
    import numpy as np
    from PIL import Image

    from fmap_cli.extract import ExtractOptions, Inputs, ModelChoice, extract
    from fmap_cli.inputs import Shard
    from fmap_cli.store.merge import merge_shards

    def map_names(f: h5py.File) -> list[str]:
        names: list[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) and o.ndim == 4 else None)
        return names

    def recompress(sources: list[Path], out: Path) -> None:
        """What a merge without raw chunks does: decompress, and compress again, every map."""
        files = [h5py.File(p, "r") for p in sources]
        with h5py.File(out, "w") as f:
            for name in map_names(files[0]):
                first = files[0][name]
                total = sum(g[name].shape[0] for g in files)
                dst = f.create_dataset(
                    name, (total, *first.shape[1:]), first.dtype, chunks=first.chunks, compression=first.compression,
                    compression_opts=first.compression_opts, shuffle=first.shuffle,
                )  # fmt: skip
                start = 0
                for g in files:
                    for i in range(0, g[name].shape[0], 16):
                        block = g[name][i : i + 16]
                        dst[start + i : start + i + len(block)] = block
                    start += g[name].shape[0]
        for g in files:
            g.close()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(images):
            base = Image.fromarray(rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8))
            base.resize((256, 256), Image.Resampling.BICUBIC).save(root / f"{i:04d}.jpg", quality=90)
            paths.append(str(root / f"{i:04d}.jpg"))
        parts = [root / f"shard_{k}.h5" for k in range(shards)]
        for k, part in enumerate(parts):
            extract(ExtractOptions(Inputs(paths, shard=Shard(k, shards)), part, ModelChoice(device="cpu")))
        raw = stored = 0
        for part in parts:
            with h5py.File(part, "r") as f:
                raw += sum(f[n].size * f[n].dtype.itemsize for n in map_names(f))
                stored += sum(f[n].id.get_storage_size() for n in map_names(f))
        methods = {"raw chunk copy (fmap merge)": merge_shards, "h5py read + write (recompress)": recompress}
        times: dict[str, list[float]] = {label: [] for label in methods}
        for _ in range(reps):  # alternate, so both see the same machine state
            for label, method in methods.items():
                out = root / "merged.h5"
                times[label].append(timed(lambda method=method, out=out: method(parts, out)))
                out.unlink()
    mb = raw / 1e6
    print(f"\nfmap merge: {shards} shards of {images} images, {mb:.0f} MB of maps ({stored / 1e6:.0f} MB stored)")
    print(f"  {'method':<36} {'s':>7} {'MB/s':>8}")
    for label, samples in times.items():
        seconds = statistics.median(samples)
        print(f"  {label:<36} {seconds:>7.2f} {mb / seconds:>8.0f}")
    copy, again = times.values()
    ratio = statistics.median(r / c for c, r in zip(copy, again, strict=True))
    print(f"  raw chunk copy / recompress speed: {ratio:.1f}x")


if __name__ == "__main__":
    main()
