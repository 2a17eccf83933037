"""Receptive-field geometry (``fmap_cli/geometry.py``) against independent computations: the set of
input positions a unit depends on, followed back through every window by brute force, and the
gradient of one unit with respect to the input of a real torch network."""

from __future__ import annotations

import random
import subprocess
import sys
import types
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from conftest import REPO
from torch import nn

from fmap_cli.capture import discover
from fmap_cli.errors import FmapError
from fmap_cli.geometry import Geometry
from fmap_cli.models import load_spec_model
from fmap_cli.spec import geometry, load_spec

Window = tuple[int, int, int, int]  # kernel, stride, padding, dilation along one axis


def depends_on(chain: Sequence[Window], unit: int) -> set[int]:
    """Input positions (padding included, so possibly < 0) that ``unit`` of the last layer reads,
    found by following every tap of every window back to the input."""
    positions = {unit}
    for kernel, stride, padding, dilation in reversed(chain):
        positions = {i * stride - padding + t * dilation for i in positions for t in range(kernel)}
    return positions


def random_chain(rng: random.Random) -> list[Window]:
    chain = []
    for _ in range(rng.randint(1, 6)):
        kernel = rng.randint(1, 7)
        chain.append((kernel, rng.randint(1, 3), rng.randint(0, kernel // 2 + 1), rng.randint(1, 3)))
    return chain


@pytest.mark.parametrize("seed", range(40))
def test_recurrence_matches_the_positions_each_unit_depends_on(seed: int) -> None:
    rng = random.Random(seed)
    rows, cols = random_chain(rng), random_chain(rng)
    rows += [(1, 1, 0, 1)] * (len(cols) - len(rows))  # both axes need as many windows: pad with identities
    cols += [(1, 1, 0, 1)] * (len(rows) - len(cols))
    geo = Geometry()
    for (kh, sh, ph, dh), (kw, sw, pw, dw) in zip(rows, cols, strict=True):
        geo = geo.after_window((kh, kw), (sh, sw), (ph, pw), (dh, dw))
    for unit in (0, 1, 5):
        r, c = depends_on(rows, unit), depends_on(cols, unit)
        assert geo.field == (max(r) - min(r) + 1, max(c) - min(c) + 1)
        assert geo.centre(unit, unit) == ((min(r) + max(r)) / 2, (min(c) + max(c)) / 2)
        assert geo.box(unit, unit) == (min(c), min(r), max(c) + 1, max(r) + 1)
    assert geo.stride == (
        min(depends_on(rows, 1)) - min(depends_on(rows, 0)),
        min(depends_on(cols, 1)) - min(depends_on(cols, 0)),
    )


def test_union_whole_and_identity() -> None:
    a = Geometry((5, 3), (2, 2), (1.0, 0.5))
    b = Geometry((3, 9), (2, 2), (4.0, 0.5))
    assert Geometry.union([(a, (4, 4)), (b, (4, 4))], (4, 4)) == Geometry((7, 9), (2, 2), (2.0, 0.5))  # exact union
    assert Geometry.union([(b, (4, 4)), (a, (4, 4))], (4, 4)) == Geometry((7, 9), (2, 2), (2.0, 0.5))  # any order
    assert Geometry.union([(a, (4, 4))], (4, 4)) == a
    scale = Geometry.whole((8, 8), stride=(8, 8))  # a (1, 1) map broadcast over a (4, 4) one
    assert Geometry.union([(scale, (1, 1)), (a, (4, 4))], (4, 4)) == Geometry((14, 14), (2, 2), (0.5, 0.5))
    assert Geometry.whole((20, 24)) == Geometry((20, 24), (0, 0), (9.5, 11.5))
    assert Geometry.whole((20, 24), stride=(20, 24)).stride == (20, 24)
    assert Geometry() == Geometry((1, 1), (1, 1), (0.0, 0.0))
    assert Geometry().box(3, 4) == (4, 3, 5, 4)  # the input pixel itself


class Branches(nn.Module):
    """Windows of every kind fmap follows, with a residual add whose branches see different fields."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(1, 1, 3, padding="same", dilation=2)
        self.conv3 = nn.Conv2d(1, 1, (1, 3), stride=(1, 2), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.conv1(x))
        return self.conv3(torch.relu(self.conv2(y) + y))


def test_recorded_geometry_is_where_the_gradient_of_a_unit_lands() -> None:
    """Ones everywhere (weights, bias-free input): a unit's gradient is positive on exactly the
    in-image pixels of its field, so for a unit far from the border its bounding box is the field."""
    model = Branches()
    for p in model.parameters():
        nn.init.ones_(p)
    size = (96, 120)
    layers = discover(model, torch.zeros(1, 1, *size))
    probes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "conv1": model.conv1,
        "pool": lambda x: model.pool(model.conv1(x)),
        "conv2": lambda x: model.conv2(model.pool(model.conv1(x))),
        "conv3": model,  # after the residual add: the wider of its two branches
    }
    for name, probe in probes.items():
        info = layers[name]
        geo = Geometry(info.receptive_field, info.stride, info.start)
        x = torch.ones(1, 1, *size, requires_grad=True)
        y = probe(x)
        row, col = y.shape[-2] // 2, y.shape[-1] // 2  # a unit in the middle
        y[0, 0, row, col].backward()
        assert x.grad is not None
        rows, cols = np.nonzero(x.grad[0, 0].numpy())
        left, top, right, bottom = geo.box(row, col)
        assert top >= 0 and left >= 0 and bottom <= size[0] and right <= size[1], name  # fully inside
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (left, top, right, bottom), name


def test_spec_geometry_and_the_recorded_one_agree() -> None:
    """Spec files compute geometry without torch; the forward pass records it: the same numbers."""
    spec = load_spec("edges")
    layers = discover(load_spec_model(spec).module, torch.zeros(1, 3, 64, 80))
    for layer in geometry(spec, (64, 80)):
        info = layers[layer.name]
        assert layer.receptive == Geometry(info.receptive_field, info.stride, info.start), layer.name
    assert [g.receptive.field for g in geometry(spec, (64, 80))] == [(7, 7), (9, 9), (17, 17)]


def test_stored_geometry_is_read_back() -> None:
    group = types.SimpleNamespace(
        name="/layers/conv2",
        attrs={
            "receptive_field": np.array([17, 17]),
            "receptive_field_stride": np.array([4, 4]),
            "receptive_field_start": np.array([1.5, 2.5]),
        },
    )
    assert Geometry.of(group) == Geometry((17, 17), (4, 4), (1.5, 2.5))
    group.attrs["receptive_field_start"] = np.array([np.nan, np.nan])  # what an untraced op gets
    with pytest.raises(FmapError) as caught:
        Geometry.of(group)
    assert str(caught.value) == "layer 'conv2': receptive field unknown in this file, so its units cannot be placed"


def test_geometry_imports_neither_torch_nor_h5py_nor_numpy() -> None:
    code = "import sys, fmap_cli.geometry; print(sorted({'torch', 'h5py', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout == "[]\n"
