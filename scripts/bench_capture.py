"""Capture cost on op-heavy networks (`make bench`): capture forward / bare forward, in one process.

For each model and setting, every repetition times back to back: the bare forward pass
(``torch.inference_mode``), capture as `fmap extract` runs it on every batch after the first
(its replay of the first batch's plan, ``fmap_cli/replay.py``), capture's full pairing (what a
batch of a new shape costs, and what every batch cost before the replay), plain forward hooks
that only keep every conv/linear and nonlinearity module's output alive (the floor: what holding
such maps costs, mostly fresh memory pages), and TorchLens saving every conv2d output when it is
installed. The report gives the bare time and the median of the
per-repetition ratios, so a noisy machine moves both sides together; a sample repeats a fast
model's forward pass until it lasts 0.2 s. "capture / bare, CPU" is the same ratio in the
process's CPU seconds (all threads): what other jobs on the machine change least, at one thread. The layers are `fmap
extract`'s default: every conv/linear layer paired with a nonlinearity, z and a.

The four torchvision models of issue 10 (ResNet-50, EfficientNet-B0, MobileNetV3-Large,
DenseNet-121; random weights, nothing downloaded) need torchvision:

    .venv-zoo/bin/python scripts/bench_capture.py [--reps 5] [--threads 1,0] [--only resnet50,...]

Without it (`make bench` runs `.venv`) they are skipped, with the reason printed, and the
hand-built replicas of tests/zoo.py (ResNet-18 shape at full width, and the op-heavy DenseNet,
MobileNetV2, SE-Net and ShuffleNet patterns at test width) are measured alone.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from bench import load_zoo, timed
from torch import nn

from fmap_cli.capture import capture, discover
from fmap_cli.pairing import NONLINEAR_MODULES

TORCHVISION = ("resnet50", "efficientnet_b0", "mobilenet_v3_large", "densenet121")
# issue 10's targets for capture / bare: (batch 16 at 224 px, batch 1 at 64 px)
TARGETS = {"resnet50": (1.15, 2.0), "efficientnet_b0": (1.3, 2.0), "mobilenet_v3_large": (1.3, 2.0),
           "densenet121": (1.3, 2.0)}  # fmt: skip
SETTINGS = ((1, 64), (16, 224))  # (batch, pixels)
# modules whose outputs "hooks holding" keeps: every conv/linear and nonlinearity module, what capture holds
HELD = (nn.Conv2d, nn.Linear, *(getattr(nn, name) for name in NONLINEAR_MODULES))
MIN_SAMPLE_S = 0.2  # each timed sample repeats a variant until the bare forward pass would take this long


@dataclass
class Row:
    model: str
    layers: int
    bare_ms: float
    ratios: dict[str, float]  # "variant / bare" -> median of the paired ratios


def models() -> tuple[dict[str, Callable[[], nn.Module]], list[str]]:
    """The models to measure (name -> factory) and a line per model skipped, with the reason."""
    found: dict[str, Callable[[], nn.Module]] = {}
    skipped = []
    try:
        tv = importlib.import_module("torchvision.models")
        for name in TORCHVISION:
            found[name] = lambda name=name: getattr(tv, name)(weights=None)
    except Exception as exc:  # any import failure means the same: measure the replicas only
        reason = f"torchvision does not import here ({type(exc).__name__}: {exc})"
        skipped = [
            f"{name}: skipped, {reason}; run .venv-zoo/bin/python scripts/bench_capture.py" for name in TORCHVISION
        ]
    zoo = load_zoo()
    found["replica resnet18 (full width)"] = lambda: zoo.resnet18(width=64, num_classes=1000)
    for name in ("densenet", "mobilenet_v2", "se_net", "shufflenet"):
        found[f"replica {name}"] = getattr(zoo, name)
    return found, skipped


def torchlens_run(model: nn.Module, x: torch.Tensor) -> Callable[[], object] | None:
    try:
        import torchlens
    except ImportError:
        return None
    return lambda: torchlens.trace(model, x, save=torchlens.func("conv2d"))


def measure(name: str, model: nn.Module, x: torch.Tensor, reps: int) -> Row:
    """Paired repetitions of the bare forward pass and each capture variant on ``x``."""
    layers = discover(model, x[:1])
    names = [n for n, info in layers.items() if info.kind == "linear" and info.nonlinearity != "none"]  # the default

    def bare() -> None:
        with torch.inference_mode():
            model(x)

    def full() -> None:  # a fresh capture's first batch takes the full pairing
        with capture(model, layers, names) as run:
            run(x)

    hooked = copy.deepcopy(model)  # the floor: keeping such maps alive, nothing else (hooks on a copy)
    kept: list[torch.Tensor] = []
    for module in hooked.modules():
        if isinstance(module, HELD):
            module.register_forward_hook(lambda m, i, out: kept.append(out))

    def hooks() -> None:
        with torch.inference_mode():
            hooked(x)
        kept.clear()

    with capture(model, layers, names) as replay:
        runners: dict[str, Callable[[], object]] = {
            "bare": bare, "capture": lambda: replay(x), "full pairing": full, "hooks holding": hooks
        }  # fmt: skip
        lens = torchlens_run(model, x)
        if lens is not None:
            runners["torchlens"] = lens
        for fn in runners.values():  # warm-up: allocator, oneDNN kernels, and capture's plan
            fn()
        loops = max(1, math.ceil(MIN_SAMPLE_S / timed(bare)))  # a sample of a 1 ms forward pass is mostly noise
        times: dict[str, list[float]] = {label: [] for label in runners}
        cpu: dict[str, list[float]] = {label: [] for label in ("bare", "capture")}
        for _ in range(reps):
            for label, fn in runners.items():
                start = time.process_time()
                times[label].append(timed(lambda fn=fn: [fn() for _ in range(loops)]) / loops)
                if label in cpu:
                    cpu[label].append(time.process_time() - start)
    ratios = {
        f"{label} / bare": statistics.median(t / b for t, b in zip(samples, times["bare"], strict=True))
        for label, samples in times.items()
        if label != "bare"
    }
    ratios["capture / bare, CPU"] = statistics.median(c / b for c, b in zip(cpu["capture"], cpu["bare"], strict=True))
    return Row(name, len(names), 1e3 * statistics.median(times["bare"]), ratios)


def report(title: str, rows: list[Row], target_index: int) -> None:
    print(f"\n{title}")
    variants = list(dict.fromkeys(v for row in rows for v in row.ratios))
    header = f"  {'model':<32} {'layers':>6} {'bare ms':>9}" + "".join(f" {v:>22}" for v in variants)
    print(header + f" {'target':>8}")
    for row in rows:
        target = TARGETS.get(row.model)
        mark = ""
        if target is not None:
            limit = target[target_index]
            mark = f"{'<=' if row.ratios['capture / bare'] <= limit else '> '} {limit:g}"
        cells = "".join(f" {row.ratios[v]:>22.2f}" if v in row.ratios else f" {'-':>22}" for v in variants)
        print(f"  {row.model:<32} {row.layers:>6} {row.bare_ms:>9.1f}{cells} {mark:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", default="1,0", help="torch threads per run, comma-separated; 0: torch's default")
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    found, skipped = models()
    if args.only:
        found = {k: v for k, v in found.items() if k in args.only.split(",")}
    print(f"machine: {platform.machine()}, torch {torch.__version__}, default {default_threads} threads")
    for line in skipped:
        print(line)
    if importlib.util.find_spec("torchlens") is None:
        print("(torchlens not installed: its reference timing is skipped; pip install torchlens to add it)")
    built = {name: make().eval() for name, make in found.items()}
    for threads in (int(t) or default_threads for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for index, (batch, size) in enumerate(SETTINGS):
            torch.manual_seed(0)
            x = torch.randn(batch, 3, size, size)
            rows = []
            for name, model in built.items():
                start = time.perf_counter()
                rows.append(measure(name, model, x, args.reps))
                print(f"  ({name}: {time.perf_counter() - start:.0f} s)", flush=True)
            report(f"batch {batch} at {size}x{size} px, {threads} thread(s), {args.reps} repetitions", rows, 1 - index)
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
