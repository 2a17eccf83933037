"""Shared fixtures: a tiny spec model with random weights, and small synthetic images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"
SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")


@pytest.fixture(autouse=True)
def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run on a cluster node must not pick up that node's SLURM array task as a shard."""
    for name in SLURM:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """The tiny models gain nothing from intra-op threads, and on a busy machine they make each
    convolution many times slower (threads spin waiting for each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_SPEC = """\
[model]
name = "tiny"
weights = "tiny.npz"

[input]
size = [20, 24]
mean = [0.5, 0.4, 0.3]
std = [0.25, 0.2, 0.3]

[[layers]]
name = "conv1"
type = "conv2d"
out_channels = 4
kernel_size = 3
stride = 1
padding = 1
activation = "relu"

[[layers]]
name = "pool1"
type = "maxpool2d"
kernel_size = 2

[[layers]]
name = "conv2"
type = "conv2d"
out_channels = 5
kernel_size = 3
stride = 2
padding = 0
activation = "relu"
"""


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for TINY_SPEC; biases spread around zero so z has both signs."""
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32),
        "conv1.bias": rng.normal(0, 0.1, (4,)).astype(np.float32),
        "conv2.weight": rng.normal(0, 0.3, (5, 4, 3, 3)).astype(np.float32),
        "conv2.bias": rng.normal(-0.1, 0.1, (5,)).astype(np.float32),
    }


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """Path of a tiny spec (conv1 -> relu -> maxpool -> conv2 -> relu) with random weights."""
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC)
    np.savez(tmp_path / "tiny.npz", **tiny_weights())
    return spec


def make_photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB picture with some structure (gradients plus blobs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        channels.append(0.5 + 0.3 * np.sin(6 * a * xx + 5 * b * yy + c) + 0.1 * rng.normal(size=(height, width)))
    pixels = np.clip(np.stack(channels, axis=-1) * 255, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Three small images of different sizes and formats."""
    paths = []
    for i, (h, w, ext) in enumerate([(30, 40, "png"), (48, 36, "jpg"), (25, 25, "png")]):
        path = tmp_path / f"img{i}.{ext}"
        make_photo(h, w, seed=i).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def good(tmp_path: Path) -> list[Path]:
    """Three small PNG images of the same size."""
    paths = []
    for i in range(3):
        path = tmp_path / f"good{i}.png"
        make_photo(30, 40, seed=i).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    """An empty directory for a run's output (tests check that nothing else is left in it)."""
    path = tmp_path / "out"
    path.mkdir()
    return path


MODEL_KEYS = {
    "model",
    "weights",
    "model_args",
    "layers",
    "device",
    "size",
    "no_resize",
    "memory_format",
    "resize",
    "interpolation",
    "mean",
    "std",
}
INPUT_KEYS = {"shard", "skip_bad", "batch_size", "workers"}
CONTINUATION_KEYS = {"overwrite", "resume", "append"}


def extract_options(images: Sequence[str | Path], out: Path, **flat: Any) -> Any:
    """``extract.ExtractOptions`` from flat keywords named like the CLI's flags (tests read better so)."""
    from fmap_cli.extract import Continuation, ExtractOptions, Inputs, ModelChoice

    def take(keys: set[str]) -> dict[str, Any]:
        return {key: flat.pop(key) for key in list(flat) if key in keys}

    inputs = Inputs([str(p) for p in images], **take(INPUT_KEYS))
    return ExtractOptions(
        inputs, out, ModelChoice(**take(MODEL_KEYS)), continuation=Continuation(**take(CONTINUATION_KEYS)), **flat
    )


@pytest.fixture
def all_layers_file(tiny_model: Path, images: list[Path], tmp_path: Path) -> Path:
    """``images`` extracted with every layer of the tiny model (conv1, pool1 without a nonlinearity, conv2)."""
    from fmap_cli.extract import extract

    out = tmp_path / "maps.h5"
    extract(extract_options(images, out, model=str(tiny_model), layers=["conv1", "pool1", "conv2"], device="cpu"))
    return out
