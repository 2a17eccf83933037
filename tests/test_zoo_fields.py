"""Receptive fields of real torchvision and timm models (issue 9, section 2): the published values,
and every unit of every layer of nine models against the input pixels that actually reach it
(``rf_probe.nan_boxes``: rows and columns of NaN sent through the model and read back from what
fmap captures).

Optional: skipped unless torchvision and timm import (run with ``.venv-zoo/bin/python -m pytest
tests/test_zoo_fields.py``; see ``make test-zoo``). Random weights: fields do not depend on them.
"""

from __future__ import annotations

import pytest
import torch
from rf_probe import disagreements, nan_boxes
from torch import nn

from fmap_cli import fields
from fmap_cli.capture import discover
from fmap_cli.layers import provenance

try:
    import timm
    import torchvision.models as tvm
except Exception as exc:  # not installed, or a torchvision whose compiled ops do not load
    pytest.skip(f"torchvision and timm do not import here ({type(exc).__name__}); see make test-zoo",
                allow_module_level=True)  # fmt: skip


def build(model: str) -> nn.Module:
    library, name = model.split(":")
    torch.manual_seed(0)
    module = tvm.get_model(name, weights=None) if library == "torchvision" else timm.create_model(name)
    return module.eval()


@pytest.mark.parametrize(
    ("model", "size", "layer", "field"),
    [
        # "Computing Receptive Fields of Convolutional Neural Networks", Araujo, Norris, Sim (Distill 2019)
        ("torchvision:alexnet", 224, "features.12", 195),
        ("torchvision:vgg16", 224, "features.30", 212),
        ("torchvision:resnet50", 224, "layer4", 427),
        ("torchvision:inception_v3", 299, "Mixed_7c", 1311),
    ],
)
def test_published_receptive_fields(model: str, size: int, layer: str, field: int) -> None:
    info = discover(build(model), torch.zeros(1, 3, size, size))[layer]
    assert (info.receptive_field, info.stride) == ((field, field), (32, 32))


@pytest.mark.parametrize(
    ("model", "size"),
    [
        ("torchvision:inception_v3", 80),
        ("torchvision:densenet121", 64),
        ("torchvision:googlenet", 64),
        ("torchvision:squeezenet1_0", 64),
        ("torchvision:efficientnet_b0", 64),
        ("torchvision:mobilenet_v3_small", 64),
        ("torchvision:regnet_y_400mf", 64),
        ("torchvision:convnext_tiny", 64),
        ("torchvision:shufflenet_v2_x1_0", 64),
        ("timm:tf_efficientnet_b0", 64),  # 'same' padding by F.pad
    ],
)
def test_every_unit_sees_what_reaches_it(model: str, size: int) -> None:
    """No layer's field unknown; each unit's stored box (clipped to the image) holds every pixel that
    reaches it, exactly so where the box lies inside the image (``rf_probe.disagreements``)."""
    module = build(model)
    layers = discover(module, torch.zeros(1, 3, size, size))
    names = list(layers)
    boxes = nan_boxes(module, layers, names, (size, size))
    wrong = {}
    for name in names:
        info = layers[name]
        assert info.receptive_field[0] > 0, f"{name}: {info.field_note}"
        if name not in boxes:
            continue  # neither (N, C, H, W) nor (N, F)
        bad = disagreements(info, boxes[name], (size, size))
        if bad and f"{name}|channels-last" in boxes:  # ConvNeXt's LayerNorm and Linear layers: (N, H, W, C)
            bad = min(bad, disagreements(info, boxes[f"{name}|channels-last"], (size, size)))
        if bad:
            wrong[name] = (bad, info.receptive_field, info.stride, info.start)
    assert not wrong
    assert len(boxes) > 0.9 * len(names)


@pytest.mark.parametrize("model", ["torchvision:vit_b_16", "timm:vit_tiny_patch16_224", "torchvision:swin_t"])
def test_tokens_are_unknown_in_words_and_inputs_are_found(model: str) -> None:
    layers = discover(build(model), torch.zeros(1, 3, 224, 224))
    patches = next(info for info in layers.values() if info.type == "Conv2d")
    size = (4, 4) if "swin" in model else (16, 16)
    assert patches.receptive_field == patches.stride == size
    unknown = [info for info in layers.values() if info.receptive_field[0] < 0]
    assert len(unknown) > 0.9 * len(layers)
    assert {info.field_note for info in unknown} <= {fields.MERGED, fields.ATTENTION}
    assert all(provenance(layers, name, set())[0] == "input" for name in layers)  # never 'unknown'


@pytest.mark.parametrize("model", ["timm:efficientnet_b0", "timm:tf_efficientnet_b0"])
def test_batch_norm_act_is_no_join(model: str) -> None:
    """timm's BatchNormAct2d calls F.batch_norm with its parameters: no '(+tensor)' in the path."""
    layers = discover(build(model), torch.zeros(1, 3, 64, 64))
    paths = [step for info in layers.values() for step in info.path_to_activation]
    assert "batch_norm" in paths
    assert not [step for step in paths if "(+" in step and not step.startswith("add(+")]
