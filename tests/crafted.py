"""fmap files made by hand with h5py (following schema.py), for answers known in advance; and the
write-time ``stats`` group computed from whole maps with plain numpy, as an independent reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from fmap_cli.images import Preprocessing
from fmap_cli.store.chunks import chunk_shape

STR = h5py.string_dtype("utf-8")


def craft(
    path: Path,
    layers: dict[str, tuple[np.ndarray, np.ndarray | None]],
    *,
    image_paths: list[str] | None = None,
    pixels: np.ndarray | None = None,  # (N, 3, H, W) in [0, 1]: stored as /input (mean 0, std 1)
    geometry: tuple[tuple[int, int], tuple[int, int], tuple[float, float]] = ((1, 1), (1, 1), (0.0, 0.0)),
    stats: bool = True,
) -> Path:
    """A complete fmap file holding ``layers`` (name -> (z, a or None), each (N, C, H, W))."""
    n = next(iter(layers.values()))[0].shape[0]
    image_paths = image_paths or [f"img{i}.png" for i in range(n)]
    size = pixels.shape[2:] if pixels is not None else (32, 32)
    prep = Preprocessing(size=(int(size[0]), int(size[1])), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with h5py.File(path, "w") as f:
        f.attrs.update(
            fmap_schema_version=np.int64(1), complete=np.int8(1), n_images=np.int64(n), model_name="crafted",
            model_source="tests", fmap_version="0", created="now", device="cpu",
            preprocessing=json.dumps(prep.describe()), layers=np.array(list(layers), dtype=STR),
        )  # fmt: skip
        f["N"] = np.arange(n)
        images = f.create_group("images")
        images["path"] = np.array(image_paths, dtype=STR)
        images["sha256"] = np.array(["0" * 64] * n, dtype=STR)
        images["original_size"] = np.tile(np.asarray(size, dtype=np.int64), (n, 1))
        if pixels is not None:
            f["input"] = pixels.astype(np.float32)
        for name, (z, a) in layers.items():
            group = f.create_group(f"layers/{name}")
            group.attrs.update(
                type="conv2d", input="input", input_via="", nonlinearity="relu" if a is not None else "none",
                output_shape=np.asarray(z.shape[1:], dtype=np.int64),
                receptive_field=np.asarray(geometry[0], dtype=np.int64),
                receptive_field_stride=np.asarray(geometry[1], dtype=np.int64),
                receptive_field_start=np.asarray(geometry[2], dtype=np.float64),
            )  # fmt: skip
            for role, values in (("preactivation", z), ("activation", a)):
                if values is not None:
                    chunks = chunk_shape(values.shape[1:], 4)
                    group.create_dataset(role, data=values.astype(np.float32), chunks=chunks)
            if stats:
                write_reference_stats(group)
    return path


def write_reference_stats(group: h5py.Group) -> None:
    """(Re)write ``group``'s stats group from its whole maps, with plain numpy."""
    if "stats" in group:
        del group["stats"]
    z = group["preactivation"][...]
    a = group["activation"][...] if "activation" in group else None
    role = "activation" if a is not None else "preactivation"
    per_image = (a if a is not None else z).reshape(z.shape[0], z.shape[1], -1)  # (N, C, H*W)
    stats = group.create_group("stats")
    stats.attrs["role"] = role
    stats["image_max"] = per_image.max(axis=2).astype(np.float32)
    stats["image_mean"] = per_image.mean(axis=2, dtype=np.float64).astype(np.float32)
    stats["image_zero_fraction"] = (per_image == 0).mean(axis=2).astype(np.float32)
    stats["image_argmax"] = np.stack(np.unravel_index(per_image.argmax(axis=2), z.shape[2:]), axis=-1).astype(np.int64)
    for name, values in (("preactivation", z), ("activation", a)):
        if values is None:
            continue
        per_channel = values.transpose(1, 0, 2, 3).reshape(values.shape[1], -1).astype(np.float64)
        negatives = lambda values, axis: np.mean(values < 0, axis=axis)  # noqa: E731 - same shape as the others
        for key, fn in (("min", np.min), ("max", np.max), ("mean", np.mean), ("std", np.std), ("negatives", negatives)):
            stats[f"{name}_{key}"] = fn(per_channel, axis=1)


def without_stats(path: Path, out: Path) -> Path:
    """A copy of ``path`` with every layer's stats group removed (as in files from before them)."""
    shutil.copy(path, out)
    with h5py.File(out, "r+") as f:
        for group in f["layers"].values():
            if "stats" in group:
                del group["stats"]
    return out


def with_reference_stats(path: Path, out: Path) -> Path:
    """A copy of ``path`` whose stats groups are :func:`write_reference_stats`'s."""
    shutil.copy(path, out)
    with h5py.File(out, "r+") as f:
        for group in f["layers"].values():
            write_reference_stats(group)
    return out
