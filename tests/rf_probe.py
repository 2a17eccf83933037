"""Receptive fields measured without fmap's geometry code, for tests/test_receptive_fields.py and
tests/test_zoo_fields.py: which input pixels a unit depends on, found from the network itself.

* :func:`gradient_box`: the gradient of one unit with respect to the input (weights positive, see
  :func:`positive_weights`, so nothing cancels); its nonzero pixels' bounding box is the unit's
  field, clipped to the image.
* :func:`nan_boxes`: every unit of every stored map at once: a batch of probe images, each with
  one row (or column) of NaN; a unit that reads that row turns NaN (NaN survives max pooling,
  saturating nonlinearities and zero weights, where a gradient does not). The maps come from
  fmap's capture, so what is checked is exactly what a file stores.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fmap_cli.capture import LayerInfo, capture
from fmap_cli.geometry import Geometry

Box = tuple[int, int, int, int]  # (top, left, bottom, right), inclusive, in input pixels


def positive_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter uniform in [0.5, 1] and batch-norm statistics neutral: outputs increase with
    every input pixel they read, so gradients never cancel."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return model.eval()


def gradient_box(unit: torch.Tensor, x: torch.Tensor) -> Box | None:
    """Bounding box of the input pixels where the gradient of ``unit`` (a scalar computed from
    ``x``, (1, C, H, W)) is nonzero, None for none (a unit of padding); the graph is kept."""
    (grad,) = torch.autograd.grad(unit, x, retain_graph=True, allow_unused=True)
    rows, cols = np.nonzero(grad[0].abs().sum(0).numpy()) if grad is not None else ((), ())
    if not len(rows):
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


def check_box(geo: Geometry, row: int, col: int, measured: Box | None, size: tuple[int, int]) -> str:
    """'' when ``measured`` agrees with unit (row, col) of ``geo``, else what differs: a stored box
    wholly inside the image must be exact; one reaching past the border must hold ``measured``
    (see :func:`disagreements`), which may be None (a unit of padding reads no pixel)."""
    box = stored_box(geo, row, col, size)
    whole = box == (0, 0, size[0] - 1, size[1] - 1)  # global pooling and flat features: the image, by convention
    if measured is None:
        return f"unit ({row}, {col}) reads nothing, stored {box}" if box == _unclipped(geo, row, col) else ""
    if box == _unclipped(geo, row, col) and not whole:
        return "" if measured == box else f"unit ({row}, {col}): measured {measured}, stored {box}"
    inside = box[0] <= measured[0] and box[1] <= measured[1] and measured[2] <= box[2] and measured[3] <= box[3]
    return "" if inside else f"unit ({row}, {col}): measured {measured} outside stored {box}"


def stored_box(geo: Geometry, row: int, col: int, size: tuple[int, int]) -> Box:
    """The box ``geo`` gives unit (row, col), clipped to an image of ``size`` (inclusive)."""
    left, top, right, bottom = geo.box(row, col)
    return max(top, 0), max(left, 0), min(bottom, size[0]) - 1, min(right, size[1]) - 1


def nan_boxes(
    model: nn.Module, layers: dict[str, LayerInfo], names: list[str], size: tuple[int, int], batch: int = 16
) -> dict[str, np.ndarray]:
    """Per stored map, the measured field box of every unit: (h, w, 4) int arrays of (top, left,
    bottom, right), inclusive; a flat (N, F) map gives (1, 1, 4); -1 where a unit reads nothing.

    Maps whose spatial axes cannot be found ((N, T, D) tokens) are left out. 4-D maps are also
    measured as channels-last (N, H, W, C), under ``NAME|channels-last``.
    """
    h, w = size
    probes = [("row", r) for r in range(h)] + [("col", c) for c in range(w)]
    seen: dict[str, list[np.ndarray]] = {}  # name -> per probe, (h', w') bool: unit reads the NaN line
    with capture(model, layers, names) as run:
        for first in range(0, len(probes), batch):
            chunk = probes[first : first + batch]
            x = torch.zeros(len(chunk), 3, h, w)
            for i, (axis, k) in enumerate(chunk):
                if axis == "row":
                    x[i, :, k, :] = float("nan")
                else:
                    x[i, :, :, k] = float("nan")
            for name, maps in run(x).items():
                t = _layer_output(layers[name], maps.z, maps.a)
                nan = torch.isnan(t).numpy()
                if nan.ndim == 4:  # (B, C, H, W): a unit is a position over all channels
                    mask = nan.any(axis=1)
                    seen.setdefault(f"{name}|channels-last", []).append(nan.any(axis=3))  # (B, H, W, C)
                elif nan.ndim == 2:  # (B, F): one unit that sees it all
                    mask = nan.any(axis=1)[:, None, None]
                else:
                    continue
                seen.setdefault(name, []).append(mask)
    boxes = {}
    for name, masks in seen.items():
        reads = np.concatenate(masks)  # (H + W, h', w')
        rows, cols = reads[:h], reads[h:]
        boxes[name] = np.stack([*_extent(rows), *_extent(cols)], axis=-1)[..., [0, 2, 1, 3]]
    return boxes


def _extent(reads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last probe index reading each unit ((P, h, w) -> two (h, w)); -1 when none."""
    hit = reads.any(axis=0)
    first = np.where(hit, reads.argmax(axis=0), -1)
    last = np.where(hit, reads.shape[0] - 1 - reads[::-1].argmax(axis=0), -1)
    return first, last


def _layer_output(info: LayerInfo, z: torch.Tensor | None, a: torch.Tensor | None) -> torch.Tensor:
    """The map the layer's own output is: a for nonlinearities and containers that end in one, else z."""
    if info.kind in ("nonlinearity", "container") and a is not None:
        return a
    assert z is not None
    return z


def disagreements(info: LayerInfo, measured: np.ndarray, size: tuple[int, int]) -> int:
    """Units whose measured box is not inside their stored box (clipped to the image), or, for a
    stored box wholly inside the image, differs from it; every unit when the field is unknown.

    Near the border a stored box may be wider than what is read: padding counts as part of the
    field, and where a strided window drops the image's last row, padding can stand for pixels
    that no real unit reads. So only boxes inside the image must match exactly.
    """
    units = measured.shape[0] * measured.shape[1]
    if info.receptive_field[0] < 0:
        return units
    geo = Geometry(info.receptive_field, info.stride, info.start)
    bad = 0
    for i in range(measured.shape[0]):
        for j in range(measured.shape[1]):
            top, left, bottom, right = (int(v) for v in measured[i, j])
            box = None if top < 0 else (top, left, bottom, right)
            bad += check_box(geo, i, j, box, size) != ""
    return bad


def _unclipped(geo: Geometry, row: int, col: int) -> Box:
    left, top, right, bottom = geo.box(row, col)
    return top, left, bottom - 1, right - 1
