"""Capture's fast path (``replay.py``): batches after the first of each shape replay its plan, and
must give exactly the maps of the full pairing (a fresh capture's first batch), bit for bit; a
model that takes another path (control flow, or the same ops fed other tensors) is caught and
captured the full way."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import zoo
from helpers import ok, run_extract, write_photos
from torch import nn

from fmap_cli import capture as capture_module
from fmap_cli import extract as pipeline
from fmap_cli.capture import LayerMaps, capture, discover
from fmap_cli.errors import ModelError
from fmap_cli.replay import Planner, Replay
from fmap_cli.store.writer import MapWriter

Maps = dict[str, LayerMaps]


@contextmanager
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """How many full passes (planners) and replays capture starts."""
    counts = {"full": 0, "replay": 0}

    class CountedPlanner(Planner):
        def __init__(self, *args: object, **kwargs: object) -> None:
            counts["full"] += 1
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    class CountedReplay(Replay):
        def __init__(self, *args: object) -> None:
            counts["replay"] += 1
            super().__init__(*args)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(capture_module, "Planner", CountedPlanner)
        patch.setattr(capture_module, "Replay", CountedReplay)
        yield counts


def full_pass(model: nn.Module, layers: dict, names: list[str], x: torch.Tensor) -> Maps:
    """The full pairing's maps: a fresh capture's first batch is always a full pass."""
    with capture(model, layers, names) as run:
        return run(x)


def assert_same(got: Maps, want: Maps) -> None:
    assert list(got) == list(want)
    for name in want:
        for role in ("z", "a"):
            g, w = getattr(got[name], role), getattr(want[name], role)
            assert (g is None) == (w is None), (name, role)
            if w is not None:
                assert g.shape == w.shape and torch.equal(g, w), (name, role)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (zoo.resnet18, 32),  # in-place ReLU reused 2-3 times per block, += identity
    "residual_net": (zoo.residual_net, 16),
    "reused_relu": (zoo.reused_relu, 12),
    "relu_": (lambda: zoo.functional_net("relu_"), 12),  # x.relu_() on a held z
    "leaky_relu": (lambda: zoo.functional_net("leaky_relu"), 12),
    "inception": (zoo.inception, 32),
    "densenet": (zoo.densenet, 32),
    "squeezenet": (zoo.squeezenet, 32),
    "se_net": (zoo.se_net, 32),
    "mobilenet_v2": (zoo.mobilenet_v2, 32),
    "shufflenet": (zoo.shufflenet, 32),
    "convnext": (zoo.convnext, 32),
    "transformer": (zoo.transformer, 16),
}


@pytest.mark.parametrize("factory", sorted(MODELS))
def test_replayed_maps_equal_the_full_pairing_on_every_layer(factory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, size = MODELS[factory]
    model = make().eval()
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, size, size) for _ in range(3)]
    layers = discover(model, batches[0][:1])
    names = list(layers)
    with counted(monkeypatch) as counts, capture(model, layers, names) as run:
        got = [run(x) for x in batches]
    assert counts == {"full": 1, "replay": 2}  # the plan held: no batch fell back
    for x, maps in zip(batches[1:], got[1:], strict=True):
        assert_same(maps, full_pass(model, layers, names, x))


def test_one_early_layer_replays_and_stops_early(monkeypatch: pytest.MonkeyPatch) -> None:
    model = zoo.resnet18().eval()
    ran: list[str] = []
    model.fc.register_forward_hook(lambda *args: ran.append("fc"))
    x = torch.randn(2, 3, 32, 32)
    layers = discover(model, x[:1])
    ran.clear()
    with counted(monkeypatch) as counts, capture(model, layers, ["layer1.0.conv2"]) as run:
        run(x)
        maps = run(x)
    assert counts == {"full": 1, "replay": 1}
    assert ran == []
    assert_same(maps, full_pass(model, layers, ["layer1.0.conv2"], x))


def test_an_exported_program_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 3, 32, 32)
    module = torch.export.export(zoo.resnet18().eval(), (x,)).module()
    object.__setattr__(module, "fmap_exported", True)  # as models.load_exported marks it
    layers = discover(module, x[:1])
    names = ["conv1", "layer1.0", "layer1.0.relu#2", "layer2.0.downsample.0", "fc"]
    y = torch.randn(2, 3, 32, 32)
    with counted(monkeypatch) as counts, capture(module, layers, names) as run:
        run(x)
        maps = run(y)
    assert counts == {"full": 1, "replay": 1}
    assert_same(maps, full_pass(module, layers, names, y))


def test_each_batch_size_gets_its_own_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shape-preserving ops decide the pairing, so a smaller last batch is planned anew."""
    model = zoo.se_net().eval()
    layers = discover(model, torch.zeros(1, 3, 32, 32))
    names = list(layers)
    batches = [torch.randn(n, 3, 32, 32) for n in (4, 4, 1, 4, 1)]
    with counted(monkeypatch) as counts, capture(model, layers, names) as run:
        got = [run(x) for x in batches]
    assert counts == {"full": 2, "replay": 3}
    for x, maps in zip(batches, got, strict=True):
        assert_same(maps, full_pass(model, layers, names, x))


class Routed(nn.Module):
    """The same ops in the same order for every input, but which ReLU each conv's output reaches
    depends on the input's values: only the dataflow tells the two paths apart."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left = nn.Conv2d(3, 4, 3, padding=1)
        self.right = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.left(x), self.right(x)
        first, second = (left, right) if x.mean() > 0 else (right, left)
        return self.relu1(first) + self.relu2(2 * second)


class Swapped(Routed):
    """The same ops on the same tensors for every input, but which conv runs first depends on the
    input's values: only the weights the ops use tell the two paths apart."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (self.left, self.right) if x.mean() > 0 else (self.right, self.left)
        return self.relu1(first(x)) + self.relu2(2 * second(x))


@pytest.mark.parametrize("factory", [zoo.branchy, Routed, Swapped])
def test_another_path_falls_back_to_the_full_pairing(factory: Callable[[], nn.Module],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model = factory().eval()
    bright, dark = torch.rand(2, 3, 10, 10) + 0.1, -torch.rand(2, 3, 10, 10) - 0.1
    layers = discover(model, bright[:1])
    names = [n for n, info in layers.items() if info.kind in ("linear", "nonlinearity")]
    with counted(monkeypatch) as counts, capture(model, layers, names) as run:
        got = {"bright": run(bright), "dark": run(dark), "bright again": run(bright)}
    # bright: planned; dark: off the plan, full pass and a new plan; bright again: off that one too
    assert counts == {"full": 3, "replay": 2}
    assert_same(got["dark"], full_pass(model, layers, names, dark))
    assert_same(got["bright again"], got["bright"])
    if factory in (Routed, Swapped):  # the pairing really differs between the two paths
        assert torch.equal(got["bright"]["left"].a, got["bright"]["relu1"].a)
        assert torch.equal(got["dark"]["left"].a, got["dark"]["relu2"].a)


class TwoActivations(nn.Module):
    """The same ops on the same tensors, but the ReLU module that runs (or ``F.relu`` itself)
    depends on the input's values: only the module calls tell the paths apart."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.functional = functional
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act_a = nn.ReLU()
        self.act_b = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        if x.mean() > 0:
            return self.act_a(z)
        return torch.nn.functional.relu(z) if self.functional else self.act_b(z)


@pytest.mark.parametrize("functional", [False, True])
def test_another_module_running_the_same_op_is_another_path(functional: bool) -> None:
    """The full pairing says act_a did not run on the dark input; so must the replay."""
    model = TwoActivations(functional).eval()
    bright, dark = torch.rand(2, 3, 10, 10) + 0.1, -torch.rand(2, 3, 10, 10) - 0.1
    layers = discover(model, bright[:1])
    with capture(model, layers, ["conv", "act_a"]) as run:
        run(bright)
        run(bright)
        with pytest.raises(ModelError, match="layer 'act_a' produced no "):
            run(dark)


def test_a_model_that_keeps_changing_path_stops_being_planned(monkeypatch: pytest.MonkeyPatch) -> None:
    model = zoo.branchy().eval()
    bright, dark = torch.rand(1, 3, 10, 10) + 0.1, -torch.rand(1, 3, 10, 10) - 0.1
    layers = discover(model, bright)
    with counted(monkeypatch) as counts, capture(model, layers, ["conv1", "relu2"]) as run:
        for x in [bright, dark] * 5:
            assert_same(run(x), full_pass(model, layers, ["conv1", "relu2"], x))
    assert counts["replay"] == capture_module.MAX_DIVERGED


STATEFUL_MODELS = """
import torch
from torch import nn


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)


class Cached(Conv):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()
        self.register_buffer("cache", torch.zeros(2, 4, 8, 8))

    def forward(self, x):
        self.cache[: len(x)].copy_(self.conv(x))  # a persistent buffer, written at every call
        return self.relu(self.cache[: len(x)])


class Shifted(Conv):
    def forward(self, x):
        x.sub_(0.25)  # its own normalisation, in place: the batch fmap gave it
        return self.conv(x).relu()
"""


def test_maps_in_memory_the_model_keeps_are_written_as_captured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """relu's z is a view of the model's buffer: the writer thread must not read it after the next
    batch wrote into it (here the writer waits until the next batch is captured)."""
    factory = tmp_path / "stateful.py"
    factory.write_text(STATEFUL_MODELS)
    images = write_photos(tmp_path / "images", 5)
    real_append, real_captured = MapWriter.append, pipeline._captured
    done = {"captured": 0, "written": 0}
    changed = threading.Condition()

    def late_append(self: MapWriter, batch: Any) -> None:
        with changed:  # the 3 batches: each is written once the next one went through the model
            changed.wait_for(lambda: done["captured"] >= min(done["written"] + 2, 3), timeout=10)
            done["written"] += 1
        real_append(self, batch)

    def counted_captured(*args: Any) -> Any:
        result = real_captured(*args)
        with changed:
            done["captured"] += 1
            changed.notify_all()
        return result

    monkeypatch.setattr(MapWriter, "append", late_append)
    monkeypatch.setattr(pipeline, "_captured", counted_captured)
    out = tmp_path / "out.h5"
    ok(run_extract(images, Path(f"{factory}:Cached"), out, "-b", "2", "--size", "8", "--save-input", "-l", "relu"))
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with h5py.File(out, "r") as f, torch.no_grad():
        z = conv(torch.from_numpy(f["input"][:])).numpy()
        assert np.allclose(f["layers/relu/preactivation"][:], z, rtol=1e-5, atol=1e-5)
        assert np.allclose(f["layers/relu/activation"][:], np.maximum(z, 0), rtol=1e-5, atol=1e-5)


def test_a_model_writing_into_its_input_leaves_the_stored_input_and_verify_alone(tmp_path: Path) -> None:
    factory = tmp_path / "stateful.py"
    factory.write_text(STATEFUL_MODELS)
    images = write_photos(tmp_path / "images", 5)
    out = tmp_path / "out.h5"
    ok(run_extract(images, Path(f"{factory}:Shifted"), out, "-b", "2", "--size", "8", "--save-input", "--verify"))
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with h5py.File(out, "r") as f:
        pixels = torch.from_numpy(f["input"][:])
        z = f["layers/conv/preactivation"][:]
    with torch.no_grad():  # /input is what fmap gave the model, before the model shifted it
        assert np.allclose(z, conv(pixels - 0.25).numpy(), rtol=1e-5, atol=1e-5)


class InplaceWhenBright(nn.Module):
    """The same function on the same tensor for every input, but whether it writes into its input
    (``inplace=``, or ``out=``) depends on the input's values."""

    def __init__(self, keyword: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.keyword = keyword
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        bright = bool(x.mean() > 0)
        if self.keyword == "inplace":
            return torch.nn.functional.relu(z, inplace=bright)
        return torch.relu(torch.mul(z, 2, out=z if bright else None))


@pytest.mark.parametrize("keyword", ["inplace", "out"])
def test_an_op_writing_into_a_held_map_only_on_some_batches_is_another_path(keyword: str) -> None:
    model = InplaceWhenBright(keyword).eval()
    dark, bright = -torch.rand(2, 3, 8, 8) - 0.1, torch.rand(2, 3, 8, 8) + 0.1
    layers = discover(model, dark[:1])
    with capture(model, layers, ["conv"]) as run:
        run(dark)  # planned: nothing writes into conv's output
        maps = run(bright)
    z = torch.nn.functional.conv2d(bright, model.conv.weight, model.conv.bias, padding=1)
    assert maps["conv"].z is not None and torch.equal(maps["conv"].z, z)


class ScaledWhenBright(nn.Conv2d):
    """A conv whose output, its z, is changed after the conv op by its data (and by nothing after it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = super().forward(x)
        return z * 2 if x.mean() > 0 else z


class Tailed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = ScaledWhenBright(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def test_a_module_changing_its_output_after_the_planned_op_is_another_path() -> None:
    model = Tailed().eval()
    dark, bright = -torch.rand(2, 3, 8, 8) - 0.1, torch.rand(2, 3, 8, 8) + 0.1
    layers = discover(model, dark[:1])
    with capture(model, layers, ["conv"]) as run:
        run(dark)  # planned: the module returns the conv op's output
        maps = run(bright)
    z = torch.nn.functional.conv2d(bright, model.conv.weight, model.conv.bias, padding=1)
    assert maps["conv"].z is not None and torch.equal(maps["conv"].z, 2 * z)


class AliasedWhenBright(zoo.ConvHead):
    """The same ops on the same tensors for every input, but whether the in-place ReLU writes into
    conv's output depends on the input's values: ``z.to(dtype)`` is ``z`` itself or a copy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        y = z.to(torch.float32 if x.mean() > 0 else torch.float64)
        return self.head(y.relu_().float())


def test_an_in_place_op_writing_into_a_held_map_only_on_some_batches_copies_it() -> None:
    model = AliasedWhenBright().eval()
    dark, bright = -torch.rand(2, 3, 8, 8) - 0.1, torch.rand(2, 3, 8, 8) + 0.1
    layers = discover(model, dark[:1])
    with capture(model, layers, ["conv", "head"]) as run:
        run(dark)  # planned: the ReLU writes into a float64 copy
        maps = run(bright)
    z = torch.nn.functional.conv2d(bright, model.conv.weight, model.conv.bias, padding=1)
    assert maps["conv"].z is not None and torch.equal(maps["conv"].z, z)


def test_unshared_copies_every_map_where_torch_cannot_count_a_storage_s_users(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU builds of older torch do not expose ``_storage_Use_Count``: no map may then be handed on
    by reference, whether or not the model keeps its memory."""
    buffer = torch.arange(12.0).reshape(1, 3, 2, 2)
    own = torch.ones(1, 3, 2, 2)
    maps = {"kept": LayerMaps(z=buffer[:, :2], a=None), "own": LayerMaps(z=own, a=own)}
    counted = capture_module.unshared(maps)
    assert counted["kept"].z.data_ptr() != buffer.data_ptr()  # the model keeps `buffer`: copied
    assert counted["own"].z is own and counted["own"].a is own  # nothing else holds it: not copied
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    copied = capture_module.unshared(maps)
    for name, m in maps.items():
        for before, after in ((m.z, copied[name].z), (m.a, copied[name].a)):
            if before is not None:
                assert after.data_ptr() != before.data_ptr() and torch.equal(after, before)
