"""fmap benchmark (`make bench`): capture cost against a bare forward pass measured in the same run.

Ratios, not absolute times, are the result: each repetition times the bare forward pass and every
capture variant back to back, and the report gives the median of the per-repetition ratios, so a
noisy machine (see ../shared/PERF-NOTES.md) moves both sides together.

    python scripts/bench.py [--reps 7] [--batch 8] [--size 224]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fmap_cli.capture import capture, discover
from fmap_cli.models import load_model

REPO = Path(__file__).resolve().parent.parent


def resnet18_shaped() -> torch.nn.Module:
    """torchvision's ResNet-18 layout (11.7 M parameters), random weights, from the test zoo."""
    spec = importlib.util.spec_from_file_location("zoo", REPO / "tests" / "zoo.py")
    assert spec is not None and spec.loader is not None
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    return zoo.resnet18(width=64, num_classes=1000).eval()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_model(name: str, model: torch.nn.Module, x: torch.Tensor, variants: dict[str, list[str]], reps: int) -> None:
    """Time the bare forward pass and each capture variant; print medians and paired ratios."""
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
    for fn in runners.values():  # warm-up: allocator, oneDNN kernel selection
        fn()
    times: dict[str, list[float]] = {label: [] for label in runners}
    for _ in range(reps):
        for label, fn in runners.items():
            times[label].append(timed(fn))
    for ctx in contexts:
        ctx.__exit__(None, None, None)
    n = x.shape[0]
    print(f"\n{name}: batch {n} at {x.shape[2]}x{x.shape[3]}, {reps} repetitions")
    print(f"  {'variant':<36} {'img/s':>8} {'time / bare':>12}")
    for label, samples in times.items():
        ratio = statistics.median(t / b for t, b in zip(samples, times["bare forward"], strict=True))
        print(f"  {label:<36} {n / statistics.median(samples):>8.1f} {ratio:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
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
    )


if __name__ == "__main__":
    main()
