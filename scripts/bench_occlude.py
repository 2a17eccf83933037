"""fmap occlude benchmark (`make bench`): occluder positions per second against the bare forward pass of
the same batches, and what the early stop at --layer saves, measured in the same run.

On one image, every variant covers the same occluder positions with the same batches:
- bare forward: the model's own forward pass on the occluded copies, batch by batch, the copies built
  beforehand (what one would write by hand, minus building the copies);
- ``fmap occlude`` end to end (``occlusion.occlude``: model loading, the check forward passes, decoding,
  building the copies and writing the file included): the class maps only; a layer L with --no-class
  (capture's pass, which stops after L); a layer L with the class maps (capture to L, then the whole
  network).
Each repetition times every variant back to back; the report gives the median positions per second
and the median of the per-repetition ratios of time per position against the bare forward pass.

    python scripts/bench_occlude.py [--reps 3] [--batch 32] [--size 224] [--patch 32] [--stride 16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from bench import REPO, paired_times  # scripts/ is on sys.path when this file runs

from fmap_cli.extract import Inputs, ModelChoice, preprocessing_for
from fmap_cli.images import load_batch
from fmap_cli.models import load_model
from fmap_cli.occlusion import OccludeOptions, Occluder, fill_rgb, occlude, positions

MODEL = f"{REPO / 'tests' / 'zoo.py'}:resnet18_full"  # torchvision's ResNet-18 layout, 1000 classes, random weights
IMAGE = str(REPO / "sample_images" / "cat.jpg")


def occluded_batches(x0: torch.Tensor, patch: int, stride: int, fill: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The copies of ``x0`` (1, 3, H, W) with the square at every position, in batches."""
    y = positions(x0.shape[2], patch, stride)
    x = positions(x0.shape[3], patch, stride)
    copies = []
    for top in y:
        for left in x:
            copy = x0[0].clone()
            copy[:, top : top + patch, left : left + patch] = fill[:, None, None]
            copies.append(copy)
    return [torch.stack(copies[i : i + batch]) for i in range(0, len(copies), batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="occluded copies per forward pass")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(MODEL)
    net = model.module.eval()
    prep = preprocessing_for(model.input, ModelChoice(size=(args.size, args.size)))
    batch, _ = load_batch([(0, IMAGE)], prep)
    assert batch is not None
    x0 = torch.from_numpy(batch.pixels)  # (1, 3, H, W), normalised
    fill = (torch.tensor(fill_rgb("grey", prep.mean)) - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    batches = occluded_batches(x0, args.patch, args.stride, fill.float(), args.batch)
    count = sum(len(b) for b in batches)

    def bare() -> None:
        with torch.inference_mode():
            for b in batches:
                net(b)

    work = Path(tempfile.mkdtemp(prefix="fmap-bench-occlude-"))

    def fmap(name: str, layer: str | None, classes: bool, patch: int = args.patch) -> Callable[[], object]:
        options = OccludeOptions(
            Inputs([IMAGE], batch_size=args.batch),
            work / f"{name}.h5",
            ModelChoice(MODEL, device="cpu", size=(args.size, args.size)),
            layer=layer,
            classes=classes,
            occluder=Occluder((patch, patch), (min(args.stride, patch),) * 2),
            overwrite=True,
        )
        return lambda: occlude(options)

    runners: dict[str, Callable[[], object]] = {"bare forward (whole network)": bare}
    runners["fmap occlude: class maps"] = fmap("classes", None, True)
    for layer in ("layer1.0.conv1", "layer4.1.conv2"):
        runners[f"fmap occlude --layer {layer} --no-class"] = fmap(layer, layer, False)
        runners[f"fmap occlude --layer {layer} + class maps"] = fmap(f"{layer}+classes", layer, True)
    fixed = "fmap occlude: class maps, one position"  # the cost of a run besides the positions
    runners[fixed] = fmap("fixed", None, True, patch=args.size)
    times = paired_times(runners, args.reps)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"\nResNet-18-shaped (random weights), {IMAGE.rsplit('/', 1)[-1]} at {args.size}x{args.size}: {count} "
        f"occluder positions ({args.patch}x{args.patch}, stride {args.stride}), batches of {args.batch}, "
        f"{args.reps} reps"
    )
    print(f"  {'variant':<50} {'positions/s':>12} {'time / bare':>12}")
    base = times["bare forward (whole network)"]
    for label, samples in times.items():
        if label == fixed:
            continue
        ratio = statistics.median(t / b for t, b in zip(samples, base, strict=True))
        print(f"  {label:<50} {count / statistics.median(samples):>12.1f} {ratio:>12.2f}")
    print(f"  a run's fixed cost (model loading, the check passes, decoding, the file; one position): "
          f"{statistics.median(times[fixed]):.2f} s, bare forward of all {count} positions "
          f"{statistics.median(base):.2f} s")  # fmt: skip
    for layer in ("layer1.0.conv1", "layer4.1.conv2"):
        stop, whole = (
            times[f"fmap occlude --layer {layer} --no-class"],
            times[f"fmap occlude --layer {layer} + class maps"],
        )
        saving = statistics.median(s / w for s, w in zip(stop, whole, strict=True))
        print(f"  early stop at {layer}: {saving:.2f} of the time with the class maps (the whole network)")


if __name__ == "__main__":
    main()
