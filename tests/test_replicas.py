"""The graph patterns of the torchvision/timm families, as small hand-written replicas (``tests/zoo.py``),
through ``fmap extract --verify``; every stored z and a is then compared with the test's own
recomputation: plain forward hooks on a deep copy with every ``inplace`` flag off, the same weights,
the same ``/input``. Which call gives each map is written out by hand per layer (issue 9, section 4).

Also MNASNet-style loading (issue 9, section 3): modules whose ``_load_from_state_dict`` reads the
state dict's module versions, and loading code that raises. Receptive fields are not checked here.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zoo
from click.testing import CliRunner, Result
from conftest import REPO, make_photo
from torch import nn

from fmap_cli.cli import cli

Calls = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]
Read = Callable[[Calls], torch.Tensor]


def recorded(model: nn.Module, x: torch.Tensor) -> Calls:
    """(first tensor input, first tensor output) of every module call; the k-th call of a module is 'path#k'."""
    plain = copy.deepcopy(model).eval()
    for module in plain.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    calls: Calls = {}
    counts: dict[str, int] = {}

    def first(value: Any) -> torch.Tensor | None:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, list | tuple):
            return next((t for t in map(first, value) if t is not None), None)
        return None

    def hook(path: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            counts[path] = counts.get(path, 0) + 1
            name = path if counts[path] == 1 else f"{path}#{counts[path]}"
            calls[name] = (first(args), first(output))

        return record

    handles = [m.register_forward_hook(hook(p)) for p, m in plain.named_modules() if p]
    with torch.no_grad():
        plain(x)
    for handle in handles:
        handle.remove()
    return calls


def out(name: str) -> Read:
    def read(calls: Calls) -> torch.Tensor:
        t = calls[name][1]
        assert t is not None, name
        return t

    return read


def inp(name: str) -> Read:
    def read(calls: Calls) -> torch.Tensor:
        t = calls[name][0]
        assert t is not None, name
        return t

    return read


def relu(read: Read) -> Read:
    return lambda calls: F.relu(read(calls))


def sigmoid(read: Read) -> Read:
    return lambda calls: torch.sigmoid(read(calls))


def conv_f(conv: str, f: str) -> tuple[Read, Read]:
    """A conv whose a is the output of the nonlinearity module ``f`` (after batch norm or directly)."""
    return out(conv), out(f)


def z_only(name: str) -> tuple[Read, None]:
    return out(name), None


# layer -> (z, a); None: no activation is stored
Expect = dict[str, tuple[Read, Read | None]]

INCEPTION: Expect = {  # branches concatenated; BasicConv2d ends in a functional in-place ReLU
    "stem.conv": (out("stem.conv"), relu(out("stem.bn"))),
    "mixed.branch5x5_2.conv": (out("mixed.branch5x5_2.conv"), relu(out("mixed.branch5x5_2.bn"))),
    "mixed.branch_pool.conv": (out("mixed.branch_pool.conv"), relu(out("mixed.branch_pool.bn"))),
    "mixed.branch_pool:relu": (out("mixed.branch_pool.bn"), relu(out("mixed.branch_pool.bn"))),
    "mixed.branch1x1": (out("mixed.branch1x1.bn"), out("mixed.branch1x1")),
    "mixed": z_only("mixed"),  # the concatenation
}
DENSE = "features.denseblock1."
DENSENET: Expect = {  # each layer sees the concatenation of all earlier features
    "features.conv0": conv_f("features.conv0", "features.relu0"),
    f"{DENSE}denselayer2.conv1": conv_f(f"{DENSE}denselayer2.conv1", f"{DENSE}denselayer2.relu2"),
    f"{DENSE}denselayer3.relu1": (inp(f"{DENSE}denselayer3.relu1"), out(f"{DENSE}denselayer3.relu1")),
    f"{DENSE}denselayer3.conv2": z_only(f"{DENSE}denselayer3.conv2"),  # into the concatenation: no f
    "features.denseblock1": z_only("features.denseblock1"),
    ":relu": (out("features.norm5"), relu(out("features.norm5"))),  # torchvision's final F.relu
}
SQUEEZENET: Expect = {  # fire modules: squeeze, two expands concatenated
    "features.0": conv_f("features.0", "features.1"),
    "features.3.squeeze": conv_f("features.3.squeeze", "features.3.squeeze_activation"),
    "features.4.expand3x3": conv_f("features.4.expand3x3", "features.4.expand3x3_activation"),
    "features.3": z_only("features.3"),
    "classifier.1": conv_f("classifier.1", "classifier.2"),
    "classifier": (inp("classifier.2"), out("classifier")),
}
SE_NET: Expect = {  # squeeze-and-excitation: torchvision's (scale * x) and timm's (x * gate.sigmoid())
    "mbv3.expand.0": conv_f("mbv3.expand.0", "mbv3.expand.2"),
    "mbv3.depthwise.0": conv_f("mbv3.depthwise.0", "mbv3.depthwise.2"),
    "mbv3.se.fc1": conv_f("mbv3.se.fc1", "mbv3.se.activation"),
    "mbv3.se.fc2": conv_f("mbv3.se.fc2", "mbv3.se.scale_activation"),
    "mbv3.se": z_only("mbv3.se"),
    "mbv3.project.0": z_only("mbv3.project.0"),
    "effnet.se.conv_reduce": conv_f("effnet.se.conv_reduce", "effnet.se.act1"),
    "effnet.se.conv_expand": (out("effnet.se.conv_expand"), sigmoid(out("effnet.se.conv_expand"))),
    "effnet.se:sigmoid": (out("effnet.se.conv_expand"), sigmoid(out("effnet.se.conv_expand"))),
    "effnet": z_only("effnet"),
}
MOBILENET_V2: Expect = {  # depthwise and pointwise convs, ReLU6 in place, linear bottleneck, residual
    "features.0.0": conv_f("features.0.0", "features.0.2"),
    "features.1.conv.0.0": conv_f("features.1.conv.0.0", "features.1.conv.0.2"),
    "features.1.conv.1.0": conv_f("features.1.conv.1.0", "features.1.conv.1.2"),
    "features.1.conv.2": z_only("features.1.conv.2"),
    "features.1": z_only("features.1"),
    "features.2.conv.1": (inp("features.2.conv.1.2"), out("features.2.conv.1")),
}
SHUFFLENET: Expect = {  # channel split, one branch convolved, concatenation, channel shuffle (5-D view)
    "conv1.0": conv_f("conv1.0", "conv1.2"),
    "stage2.0.branch2.0": conv_f("stage2.0.branch2.0", "stage2.0.branch2.2"),
    "stage2.0.branch2.3": z_only("stage2.0.branch2.3"),
    "stage2.1.branch2.5": conv_f("stage2.1.branch2.5", "stage2.1.branch2.7"),
    "stage2.1.branch2": (inp("stage2.1.branch2.7"), out("stage2.1.branch2")),
    "stage2.0": z_only("stage2.0"),
}
CONVNEXT: Expect = {  # depthwise 7x7, permutes, LayerNorm, channels-last MLP with GELU, layer scale, +=
    "stem.0": z_only("stem.0"),
    "stages.0.block.0": z_only("stages.0.block.0"),
    "stages.0.block.3": conv_f("stages.0.block.3", "stages.0.block.4"),
    "stages.1.block.5": z_only("stages.1.block.5"),
    "stages.0": z_only("stages.0"),
}
TRANSFORMER: Expect = {  # patch embedding, Swin window block (roll, partition), ViT encoder block (MHA)
    "conv_proj": z_only("conv_proj"),
    "swin.mlp.0": conv_f("swin.mlp.0", "swin.mlp.1"),
    "swin.mlp.2": z_only("swin.mlp.2"),
    "swin": z_only("swin"),
    "encoder.0.self_attention": z_only("encoder.0.self_attention"),
    "encoder.0.mlp.0": conv_f("encoder.0.mlp.0", "encoder.0.mlp.1"),
    "encoder.0": z_only("encoder.0"),
}

REPLICAS = {
    "inception": (INCEPTION, 32),
    "densenet": (DENSENET, 32),
    "squeezenet": (SQUEEZENET, 32),
    "se_net": (SE_NET, 32),
    "mobilenet_v2": (MOBILENET_V2, 32),
    "shufflenet": (SHUFFLENET, 32),
    "convnext": (CONVNEXT, 32),
    "transformer": (TRANSFORMER, 16),
}


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def images(directory: Path, n: int, size: int) -> list[Path]:
    paths = []
    for i in range(n):
        paths.append(directory / f"img{i}.png")
        make_photo(size, size, seed=i).save(paths[-1])
    return paths


def close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 rounding, relative to the map's largest magnitude."""
    assert got.shape == tuple(want.shape), what
    scale = max(1.0, float(want.abs().max()))
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("factory", sorted(REPLICAS))
def test_replica_maps_equal_an_independent_recomputation(
    factory: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expect, size = REPLICAS[factory]
    monkeypatch.chdir(REPO)
    out_file = tmp_path / "out.h5"
    result = invoke(
        "extract", *images(tmp_path, 2, size), "--model", f"tests/zoo.py:{factory}", "--size", size,
        "--layers", ",".join(expect), "--device", "cpu", "--save-input", "--verify", "-o", out_file,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "verified a == f(z)" in result.stderr
    with h5py.File(out_file, "r") as f:
        assert sorted(f["layers"]) == sorted(expect)
        calls = recorded(getattr(zoo, factory)(), torch.from_numpy(f["input"][()]))
        for name, (z, a) in expect.items():
            group = f["layers"][name]
            close(group["preactivation"][()], z(calls), f"{factory} {name} z")
            if a is None:
                assert "activation" not in group, f"{factory} {name} has an activation"
            else:
                close(group["activation"][()], a(calls), f"{factory} {name} a")


# ---------------------------------------------------------------------------- MNASNet-style loading


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def extract_versioned(tmp_path: Path, weights: Path, factory: str = "versioned") -> tuple[Result, Path]:
    out_file = tmp_path / "out.h5"
    image = images(tmp_path, 1, 12)[0]
    result = invoke(
        "extract", image, "--model", f"tests/zoo.py:{factory}", "--weights", weights, "--size", 12,
        "--device", "cpu", "--save-input", "-o", out_file,
    )  # fmt: skip
    return result, out_file


def assert_loaded(out_file: Path, model: nn.Module) -> None:
    """The file's maps are ``model``'s (the weights that were saved), not the factory's own."""
    with h5py.File(out_file, "r") as f:
        x = torch.from_numpy(f["input"][()])
        with torch.no_grad():
            z = model.conv(x)
        close(f["layers/conv/preactivation"][()], z, "conv z")
        close(f["layers/conv/activation"][()], F.relu(z), "conv a")


@pytest.fixture
def saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    monkeypatch.chdir(REPO)
    return zoo.versioned(seed=3)  # not the factory's seed 0: loading must change the weights


def test_a_state_dict_keeps_its_module_versions(saved: nn.Module, tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(saved.state_dict(), weights)
    result, out_file = extract_versioned(tmp_path, weights)
    assert result.exit_code == 0, result.output
    assert_loaded(out_file, saved)


def test_a_checkpoint_with_a_data_parallel_prefix_keeps_them(saved: nn.Module, tmp_path: Path) -> None:
    state = nn.DataParallel(saved).state_dict()  # keys and module versions under "module."
    assert all(key.startswith("module.") for key in state)
    assert "module" in state._metadata  # type: ignore[attr-defined]
    weights = tmp_path / "w.pth"
    torch.save({"state_dict": state, "epoch": 3}, weights)
    result, out_file = extract_versioned(tmp_path, weights)
    assert result.exit_code == 0, result.output
    assert_loaded(out_file, saved)


def test_files_without_versions_load_as_the_modules_are_now(saved: nn.Module, tmp_path: Path) -> None:
    weights = tmp_path / "w.npz"
    np.savez(weights, **{key: value.numpy() for key, value in saved.state_dict().items()})
    result, out_file = extract_versioned(tmp_path, weights)
    assert result.exit_code == 0, result.output
    assert_loaded(out_file, saved)


def test_loading_code_that_rejects_the_file_is_one_line(saved: nn.Module, tmp_path: Path) -> None:
    state = saved.state_dict()
    state._metadata = OrderedDict((key, {"version": 7}) for key in state._metadata)  # type: ignore[attr-defined]
    weights = tmp_path / "w.pt"
    torch.save(state, weights)
    result, out_file = extract_versioned(tmp_path, weights)
    assert one_line_error(result) == (
        f"Error: {weights}: the model's own loading code fails on these weights: "
        "ValueError: version should be set to 1 or 2 instead of 7"
    )
    assert not out_file.exists()


def test_loading_code_that_raises_is_one_line(saved: nn.Module, tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    torch.save(saved.state_dict(), weights)
    result, out_file = extract_versioned(tmp_path, weights, "broken_loading")
    assert one_line_error(result) == (
        f"Error: {weights}: the model's own loading code fails on these weights: "
        "RuntimeError: this module refuses every state dict"
    )
    assert not out_file.exists()
