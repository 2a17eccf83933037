"""fmap project benchmark (`make bench`): projections per second against the bare forward + backward
pass of the same batch, measured in the same run.

The bare pass is what one would write by hand with plain autograd: the model's whole forward pass with a
forward hook holding the layer's output, then ``torch.autograd.grad`` from it with one unit per image.
``fmap project`` (``projection.project_units``) does the same through capture (the pairing rule, the
forward stopping right after the layer) with the method's backward rules. Each repetition times every
variant back to back; the report gives medians and the median of the per-repetition ratios.

    python scripts/bench_project.py [--reps 5] [--batch 8] [--size 224]
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable

import torch
from bench import paired_times, resnet18_shaped  # scripts/ is on sys.path when this file runs

from fmap_cli.capture import capture, discover
from fmap_cli.models import load_model
from fmap_cli.projection import METHODS, Unit, project_units


def strongest_units(model: torch.nn.Module, layers: dict, layer: str, channel: int, x: torch.Tensor) -> list[Unit]:
    """Each image's unit where ``channel`` of ``layer`` is largest (what ``fmap project --top`` picks)."""
    with capture(model, layers, [layer]) as run:
        maps = run(x)[layer]
    a = maps.a if maps.a is not None else maps.z
    assert a is not None
    plane = a[:, channel].flatten(1)
    width = a.shape[-1]
    return [Unit(n, int(i) // width, int(i) % width) for n, i in enumerate(plane.argmax(dim=1))]


def bare(
    model: torch.nn.Module, layer: str, channel: int, x: torch.Tensor, units: list[Unit]
) -> tuple[Callable[[], object], torch.utils.hooks.RemovableHandle]:
    """The plain autograd pass: whole forward, the layer's output from a hook, one backward."""
    module = dict(model.named_modules())[layer]
    held: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda m, args, out: held.__setitem__("out", out))

    def run() -> object:
        inputs = x.detach().clone().requires_grad_(True)
        model(inputs)
        out = held.pop("out")
        seed = torch.zeros_like(out)
        for unit in units:
            seed[unit.image, channel, unit.row, unit.col] = out.detach()[unit.image, channel, unit.row, unit.col]
        return torch.autograd.grad(out, inputs, seed)

    return run, handle


def bench_layer(name: str, model: torch.nn.Module, layer: str, channel: int, x: torch.Tensor, reps: int) -> None:
    layers = discover(model, x[:1])
    units = strongest_units(model, layers, layer, channel, x)
    plain, handle = bare(model, layer, channel, x, units)
    runners: dict[str, Callable[[], object]] = {"bare forward + backward": plain}
    for method in METHODS:
        runners[f"fmap project --method {method}"] = lambda method=method: project_units(
            model, layers, layer, channel, x, units, method, batch_size=len(units)
        )
    times = paired_times(runners, reps)
    handle.remove()
    n = x.shape[0]
    print(f"\n{name}, {layer} channel {channel}: {n} units (one per image) at {x.shape[2]}x{x.shape[3]}, {reps} reps")
    print(f"  {'variant':<34} {'units/s':>8} {'time / bare':>12}")
    base = times["bare forward + backward"]
    for label, samples in times.items():
        ratio = statistics.median(t / b for t, b in zip(samples, base, strict=True))
        print(f"  {label:<34} {n / statistics.median(samples):>8.1f} {ratio:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    x = torch.randn(args.batch, 3, args.size, args.size)
    edges = load_model().module.eval()
    bench_layer("edges (default model)", edges, "conv2", 5, x, args.reps)
    resnet = resnet18_shaped()
    for layer in ("layer1.0.conv1", "layer4.1.conv2"):
        bench_layer("ResNet-18-shaped (random weights)", resnet, layer, 7, x, args.reps)


if __name__ == "__main__":
    main()
