"""The real model zoo (issue 9, section 4): one model of every torchvision family and a few timm models
through ``fmap layers`` and ``fmap extract --verify``, with seeded random weights passed by
``--weights`` (nothing is downloaded); every stored z and a read from a module call is then compared
with the test's own recomputation (plain forward hooks on a deep copy with every ``inplace`` flag off,
the same weights, the same ``/input``). Capture's replay of a batch (``fmap_cli/replay.py``) must
give every layer's maps exactly as its full pairing does.

Optional: skipped unless torchvision and timm import (``make test-zoo`` builds a venv where they do;
CI never installs them). Small inputs where a model allows; ViT, Swin and MaxViT run at their native
224 px with one image and the layers of their first blocks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import make_photo
from PIL import Image
from test_replay import assert_same, counted, full_pass
from test_replicas import recorded
from torch import nn

from fmap_cli.capture import capture, discover
from fmap_cli.cli import cli
from fmap_cli.models import parse_model_args

try:
    import timm
    import torchvision.models as tvm
except Exception as exc:  # not installed, or a torchvision whose compiled ops do not load
    pytest.skip(f"torchvision and timm do not import here ({type(exc).__name__}); see make test-zoo",
                allow_module_level=True)  # fmt: skip

# (size, layers): None = the default layers
TORCHVISION: dict[str, tuple[int, str | None]] = {
    "alexnet": (64, None),
    "vgg11": (32, None),
    "resnet18": (64, None),
    "resnext50_32x4d": (64, None),
    "wide_resnet50_2": (64, None),
    "squeezenet1_0": (64, None),
    "densenet121": (64, None),
    "inception_v3": (80, None),
    "googlenet": (64, None),
    "mobilenet_v2": (64, None),
    "mobilenet_v3_small": (64, None),
    "mnasnet0_5": (64, None),
    "shufflenet_v2_x0_5": (64, None),
    "efficientnet_b0": (64, None),
    "efficientnet_v2_s": (64, None),
    "regnet_x_400mf": (64, None),
    "regnet_y_400mf": (64, None),
    "convnext_tiny": (64, None),
    "vit_b_16": (224, "conv_proj,encoder.layers.encoder_layer_0*"),
    "swin_t": (224, "features.0*,features.1.0,features.1.0.norm*,features.1.0.attn,features.1.0.mlp*"),
    "maxvit_t": (224, "stem*,blocks.0.layers.0.layers.MBconv*"),
}
TIMM: dict[str, tuple[int, str | None]] = {
    "resnet18": (64, None),
    "efficientnet_b0": (64, None),
    "tf_efficientnet_b0": (64, None),
    "mobilenetv3_small_050": (64, None),
    "regnetx_002": (64, None),
    "convnext_atto": (64, None),
    "vit_tiny_patch16_224": (224, "patch_embed*,blocks.0*"),
}
# Known fmap bugs, reported rather than worked around; strict, so a fix shows up as a failure here.
KNOWN: dict[str, str] = {}
# Layers no file can hold per image: Swin's window attention runs on (N x windows, positions, C).
FOLDED = {"torchvision:swin_t": ("features.1.0*", "features.1.0.attn:linear", 64)}
MODELS = [
    pytest.param(model, marks=pytest.mark.xfail(reason=KNOWN[model], strict=True)) if model in KNOWN else model
    for model in [f"torchvision:{name}" for name in TORCHVISION] + [f"timm:{name}" for name in TIMM]
]


def build(model: str) -> nn.Module:
    """The model with seeded random weights, batch norms with random statistics (so none is an identity)."""
    library, name = model.split(":")
    torch.manual_seed(0)
    module = tvm.get_model(name, weights=None) if library == "torchvision" else timm.create_model(name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
    return module.eval()


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def setting(model: str) -> tuple[int, str | None]:
    library, name = model.split(":")
    return (TORCHVISION if library == "torchvision" else TIMM)[name]


def independent_check(out: Path, model: nn.Module) -> tuple[int, int]:
    """Compare every map read from a module call with the recomputation; (maps checked, maps stored)."""
    modules = dict(model.named_modules())
    checked = stored = 0
    with h5py.File(out, "r") as f:
        calls = recorded(model, torch.from_numpy(f["input"][()]))
        for name in f.attrs["layers"]:
            group = f["layers"][name]
            path = [p for p in str(group.attrs["path_to_activation"]).split(" -> ") if p]
            container = name in modules and any(True for _ in modules[name].children())
            nonlinearity = path == [name]
            want = {
                "preactivation": (path[0], 0) if container and path else (name, 0) if nonlinearity else (name, 1),
                "activation": (name, 1) if container or nonlinearity else (path[-1], 1) if path else None,
            }
            for role, source in want.items():
                if role not in group:
                    continue
                stored += 1
                if source is None or source[0] not in calls:  # a functional call: checked by --verify only
                    continue
                reference = calls[source[0]][source[1]]
                assert reference is not None, (name, role)
                got = group[role][()]
                assert got.shape == tuple(reference.shape), (name, role)
                scale = max(1.0, float(reference.abs().max()))
                np.testing.assert_allclose(got, reference.numpy(), rtol=0, atol=1e-5 * scale, err_msg=f"{name} {role}")
                checked += 1
    return checked, stored


@pytest.mark.parametrize("model", MODELS)
def test_zoo_model(model: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    size, layers = setting(model)
    weights = tmp_path / "weights.pt"
    reference = build(model)
    torch.save(reference.state_dict(), weights)
    chosen = ("--layers", layers) if layers else ()
    listed = invoke("layers", "--model", model, "--weights", weights, "--size", size, *chosen)
    assert listed.exit_code == 0, listed.output
    image = tmp_path / "img.png"
    make_photo(size, size).save(image)
    out = tmp_path / "out.h5"
    result = invoke(
        "extract", image, "--model", model, "--weights", weights, "--size", size, *chosen,
        "--batch-size", 1, "--device", "cpu", "--save-input", "--verify", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    verified = next(line for line in result.stderr.splitlines() if line.startswith("verified "))
    with h5py.File(out, "r") as f:
        names = list(f.attrs["layers"])
    assert names and all(name in listed.stdout for name in names)
    checked, stored = independent_check(out, reference)
    labelled = check_axes(out, reference)
    seconds = time.perf_counter() - started
    print(f"\nZOO {model}: {len(names)} layers, {checked}/{stored} maps recomputed by hooks, {seconds:.1f} s")
    print(f"ZOO {model}: {verified}")
    print(f"ZOO {model}: axes {labelled}")
    assert checked > 0


@pytest.mark.parametrize("model", MODELS)
def test_zoo_replay_equals_the_full_pairing(model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer of every zoo model: the second batch replays the first one's plan (no fallback),
    and its maps equal the full pairing's on that batch bit for bit (``fmap_cli/replay.py``)."""
    size, _ = setting(model)
    net = build(model)
    torch.manual_seed(0)
    first, second = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    layers = discover(net, first[:1])
    names = list(layers)
    with counted(monkeypatch) as counts, capture(net, layers, names) as run:
        run(first)
        replayed = run(second)
    assert counts == {"full": 1, "replay": 1}
    assert_same(replayed, full_pass(net, layers, names, second))


# Where each module type puts its channels, as PyTorch documents it: the test's own knowledge.
CHANNELS_FIRST = (nn.Conv2d, nn.BatchNorm2d)
CHANNELS_LAST = (nn.Linear, nn.LayerNorm)


def check_axes(out: Path, model: nn.Module) -> dict[str, int]:
    """Each stored conv, batch norm, linear and layer norm has its channels where PyTorch puts them
    (dim 1, or the last), and the file's per-channel statistics are numpy's over that dim; returns
    how many layers of each label were checked."""
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    with h5py.File(out, "r") as f:
        for name in f.attrs["layers"]:
            group = f["layers"][name]
            z = group["preactivation"]
            axes = str(z.attrs["axes"]).split(",")
            assert len(axes) == z.ndim and axes[0] == "N", (name, axes)
            module = modules.get(name)
            if not isinstance(module, CHANNELS_FIRST + CHANNELS_LAST) or z.ndim < 3:
                continue
            channel = 1 if isinstance(module, CHANNELS_FIRST) else z.ndim - 1
            assert axes[channel] in ("C", "D"), (name, axes)
            values = z[()].astype(np.float64)
            over = tuple(d for d in range(z.ndim) if d != channel)
            np.testing.assert_allclose(group["stats/preactivation_mean"][()], values.mean(axis=over), rtol=1e-5,
                                       atol=1e-5 * max(1.0, float(np.abs(values).max())), err_msg=name)  # fmt: skip
            np.testing.assert_array_equal(group["stats/preactivation_max"][()], values.max(axis=over), err_msg=name)
            counts[",".join(axes)] = counts.get(",".join(axes), 0) + 1
    return counts


@pytest.mark.parametrize("model", sorted(FOLDED))
def test_layers_folded_into_the_batch_axis_are_refused_in_one_line(model: str, tmp_path: Path) -> None:
    pattern, first, rows = FOLDED[model]
    size = setting(model)[0]
    make_photo(size, size).save(tmp_path / "img.png")
    result = invoke("extract", tmp_path / "img.png", "--model", model, "--size", size, "--layers", pattern,
                    "--device", "cpu", "-o", tmp_path / "out.h5")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith(
        f"Error: --layers: layer '{first}' and 1 more fold other data into the batch axis ({rows} rows per image"
    ), result.stderr


# The model's own preprocessing (issue 10, section 1): fmap's /input for a model given without --size is
# what the library's own eval transforms make of the same picture. Random weights (nothing downloaded):
# the recipe is that of the model's DEFAULT weights / timm data config, read from metadata.
# (model, first layer, --model-arg or None)
RECIPES: list[tuple[str, str, str | None]] = [
    ("torchvision:resnet50", "conv1", None),  # IMAGENET1K_V2: resize 232, crop 224
    ("torchvision:efficientnet_b0", "features.0.0", None),  # bicubic
    ("torchvision:inception_v3", "Conv2d_1a_3x3.conv", None),  # resize 342, crop 299
    ("torchvision:vit_b_16", "conv_proj", None),
    ("timm:vit_tiny_patch16_224", "patch_embed.proj", None),  # mean = std = 0.5, bicubic, crop_pct 0.9
    ("timm:tf_efficientnetv2_b3", "conv_stem", None),  # crop_mode squash, 240 px, crop_pct 0.9
    ("timm:resnet18", "conv1", 'pretrained_cfg_overlay={"crop_mode": "border", "crop_pct": 0.9}'),
]
# (H, W): landscape, portrait (both shrunk), and one smaller than every crop (enlarged)
PICTURES = [(300, 451), (517, 333), (120, 90)]


def library_transform(model: str, module: nn.Module) -> Any:
    """The library's own eval transform for the model's recipe (its DEFAULT weights / data config)."""
    library, name = model.split(":")
    if library == "torchvision":
        return tvm.get_model_weights(name).DEFAULT.transforms()
    return timm.data.create_transform(**timm.data.resolve_model_data_config(module))


@pytest.mark.parametrize(("model", "layer", "model_arg"), RECIPES)
def test_input_is_the_library_transform(model: str, layer: str, model_arg: str | None, tmp_path: Path) -> None:
    paths = []
    for index, (height, width) in enumerate(PICTURES):
        paths.append(tmp_path / f"img{index}.png")
        make_photo(height, width, seed=index).save(paths[-1])
    out = tmp_path / "out.h5"
    extra = ("--model-arg", model_arg) if model_arg else ()
    result = invoke(
        "extract", *paths, "--model", model, *extra, "--layers", layer, "--device", "cpu", "--save-input", "-o", out
    )
    assert result.exit_code == 0, result.output
    library, name = model.split(":")
    kwargs = parse_model_args([model_arg] if model_arg else [])
    module = tvm.get_model(name) if library == "torchvision" else timm.create_model(name, **kwargs)
    transform = library_transform(model, module)
    with h5py.File(out, "r") as f:
        record = json.loads(f.attrs["preprocessing"])
        fed = f["input"][()]
    std = record["steps"][-1]["std"]
    bound = (1 / 255) / min(std)
    for path, got in zip(paths, fed, strict=True):
        with Image.open(path) as picture:
            expected = transform(picture.convert("RGB")).numpy()
        assert got.shape == expected.shape, (path, record)
        worst = float(np.abs(got - expected).max())
        print(f"\nRECIPE {model} {path.name}: max |fmap - library| = {worst:.3g} (bound {bound:.3g})")
        assert worst <= bound, (path, record)
    resize = next(step for step in record["steps"] if step["step"] == "resize")
    print(f"RECIPE {model}: {record['recipe']['source']}; {resize}")
    assert "not loaded: the weights are random" in record["recipe"]["source"]
