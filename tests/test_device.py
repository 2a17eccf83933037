"""Devices: CUDA end to end where a GPU exists (skipped elsewhere), and the out-of-memory fallback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from conftest import extract_options

from fmap_cli import extract as pipeline

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run(images: list[Path], out: Path, model: Path, **options: Any) -> Path:
    pipeline.extract(extract_options([str(p) for p in images], out=out, model=str(model), **options))
    return out


def maps(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{layer}/{role}": f[f"layers/{layer}/{role}"][...] for layer in f["layers"] for role in
                ("preactivation", "activation") if role in f[f"layers/{layer}"]}  # fmt: skip


@needs_cuda
def test_cuda_gives_the_cpu_maps(tmp_path: Path, tiny_model: Path, images: list[Path]) -> None:
    cpu = run(images, tmp_path / "cpu.h5", tiny_model, device="cpu")
    gpu = run(images, tmp_path / "gpu.h5", tiny_model, device="cuda", verify=True)
    with h5py.File(gpu, "r") as f:
        assert str(f.attrs["device"]).startswith("cuda")
    reference = maps(cpu)
    for key, values in maps(gpu).items():  # TF32 is off during extraction: full float32 on the GPU
        np.testing.assert_allclose(values, reference[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_out_of_memory_halves_the_batch(
    tmp_path: Path, tiny_model: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that does not fit is split in halves (recursively) and the maps are the same."""
    real_capture = pipeline.capture
    sizes: list[int] = []

    @contextmanager
    def tight_capture(*args: Any, **kwargs: Any) -> Iterator[Callable[[torch.Tensor], Any]]:
        with real_capture(*args, **kwargs) as real_run:

            def run_batch(x: torch.Tensor) -> Any:
                sizes.append(x.shape[0])
                if x.shape[0] > 1:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
                return real_run(x)

            yield run_batch

    reference = maps(run(images, tmp_path / "ref.h5", tiny_model, device="cpu", batch_size=4))
    monkeypatch.setattr(pipeline, "capture", tight_capture)
    halved = maps(run(images, tmp_path / "halved.h5", tiny_model, device="cpu", batch_size=4))
    assert sizes[:4] == [3, 1, 2, 1]  # 3 images: 3 -> 1 + 2 -> 1 + 1
    for key, values in halved.items():
        np.testing.assert_allclose(values, reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
