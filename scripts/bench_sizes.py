"""File-size benchmark (`make bench`): what an fmap file holds besides its maps, on a wide layer.

One conv layer of 1024 channels (and its ReLU) over generated JPEGs, at input sizes chosen so the
map is 7x7 and 16x16 (the last conv of MobileNetV2 / EfficientNet at 224 px is 7x7 with
1280-1536 channels), for 1 image and for many. For each file it reports the stored bytes of the maps
(z raw, a gzip:1 as by default), of the per-image statistics, and of everything else (per-channel
statistics, image table, attributes, HDF5's own structures), each as a fraction of the file.

Per image and channel fmap keeps 5 values (max, mean, zero fraction, argmax row and column, of a)
against 2 x H x W values of z and a: per-image statistics cost about 5 / (2 x H x W) of the
uncompressed maps by design (5% at 7x7, 1% at 16x16), more of the stored maps where a
compresses. Everything else is fixed per file or per layer and vanishes with many images.

    python scripts/bench_sizes.py [--images 1000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import h5py
from bench_pipeline import make_jpegs  # scripts/ is on sys.path when this file runs

from fmap_cli.extract import Continuation, ExtractOptions, Inputs, ModelChoice, extract
from fmap_cli.store import schema
from fmap_cli.store.writer import Storage

WIDE = """
import torch
from torch import nn


def wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 1024, 3, stride=2, padding=1), nn.ReLU())
"""


def stored(node: h5py.Dataset) -> int:
    return int(node.id.get_storage_size())


def breakdown(path: Path) -> tuple[int, int, int]:
    """Stored bytes of the maps and of the per-image statistics, and the file's size."""
    maps = image_stats = 0
    with h5py.File(path, "r") as f:
        for group in f[schema.LAYERS].values():
            maps += sum(stored(group[role]) for role in (schema.PREACTIVATION, schema.ACTIVATION) if role in group)
            stats = group.get(schema.STATS)
            if stats is not None:
                image_stats += sum(
                    stored(stats[name]) for name in (*schema.IMAGE_STATS, schema.IMAGE_ARGMAX) if name in stats
                )
    return maps, image_stats, path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="the many-image count")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        factory = workdir / "wide.py"
        factory.write_text(WIDE)
        paths = make_jpegs(workdir, args.images, size=(96, 128))
        print("\nFile sizes: conv 3->1024 (stride 2) + ReLU, z raw, a gzip:1 (defaults); fractions of the file")
        print("(file / bound: the file's size over 1.05 x its maps + 64 KiB for its one layer)")
        print(f"{'map':>6} {'images':>7} {'file MB':>9} {'maps':>7} {'per-image stats':>16} {'everything else':>16} "
              f"{'file / bound':>13}")  # fmt: skip
        for side in (7, 16):
            for count in (1, args.images):
                out = workdir / f"wide{side}-{count}.h5"
                choice = ModelChoice(model=f"{factory}:wide", device="cpu", size=(2 * side, 2 * side))
                options = ExtractOptions(Inputs(paths[:count], batch_size=32), out, choice, Storage(),
                                         continuation=Continuation(overwrite=True))  # fmt: skip
                extract(options)
                maps, image_stats, total = breakdown(out)
                rest, bound = total - maps - image_stats, 1.05 * maps + 65536
                print(f"{side:>3}x{side:<2} {count:>7} {total / 1e6:>9.1f} {maps / total:>7.1%} "
                      f"{image_stats / total:>16.2%} {rest / total:>16.2%} {total / bound:>13.2f}")  # fmt: skip
                out.unlink()


if __name__ == "__main__":
    main()
