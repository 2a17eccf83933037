"""Build a PyTorch network from a ModelSpec and load its weights (``.npz``, ``.pt``/``.pth``).

Weights never run code: ``.pt`` files load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import SpecError
from .spec import LayerSpec, ModelSpec, expected_parameters, geometry

ACTIVATION_MODULES: dict[str, Callable[[LayerSpec], nn.Module]] = {
    "relu": lambda layer: nn.ReLU(),
    "leaky_relu": lambda layer: nn.LeakyReLU(layer.negative_slope),
    "gelu": lambda layer: nn.GELU(),
    "sigmoid": lambda layer: nn.Sigmoid(),
    "tanh": lambda layer: nn.Tanh(),
}


class SpecNet(nn.Module):
    """A sequential network built from a spec.

    Each spec layer is a child module named as in the spec (so its parameters are
    ``<layer>.weight``, matching the weights file), and its nonlinearity, if any, lives in
    ``activations[<layer>]``: z is the output of the first, a the output of the second.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.order = [layer.name for layer in spec.layers]
        self.activations = nn.ModuleDict()
        for layer, geo in zip(spec.layers, geometry(spec), strict=True):
            self.add_module(layer.name, _build_op(layer, geo.input_shape))
            if layer.has_activation:
                self.activations[layer.name] = ACTIVATION_MODULES[layer.activation](layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.order:
            x = getattr(self, name)(x)
            if name in self.activations:
                x = self.activations[name](x)
        return x


def _build_op(layer: LayerSpec, input_shape: tuple[int, ...]) -> nn.Module:
    p = layer.params
    if layer.type == "conv2d":
        return nn.Conv2d(
            input_shape[0],
            p["out_channels"],
            p["kernel_size"],
            stride=p["stride"],
            padding=p["padding"],
            dilation=p["dilation"],
            groups=p["groups"],
            bias=p["bias"],
        )
    if layer.type == "maxpool2d":
        return nn.MaxPool2d(p["kernel_size"], stride=p["stride"], padding=p["padding"])
    if layer.type == "avgpool2d":
        return nn.AvgPool2d(p["kernel_size"], stride=p["stride"], padding=p["padding"])
    if layer.type == "batchnorm2d":
        return nn.BatchNorm2d(input_shape[0], eps=p["eps"])
    if layer.type == "flatten":
        return nn.Flatten()
    return nn.Linear(input_shape[0], p["out_features"], bias=p["bias"])


@dataclass(frozen=True)
class LoadedModel:
    """A ready network in eval mode with the spec it came from and its weights' fingerprint."""

    spec: ModelSpec
    module: SpecNet
    weights_sha256: str


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """Read a weights file into float32 arrays keyed as in a state dict.

    Raises:
        SpecError: the file is missing, unreadable, or holds something other than tensors.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise SpecError(f"{path}: weights file not found (the spec's [model] weights is relative to the spec)")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: np.asarray(data[key]) for key in data.files}
        if suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise SpecError(f"{path}: expected a state dict (a mapping of names to tensors)")
            return {str(k): v.detach().float().numpy() for k, v in state.items()}
    except SpecError:
        raise
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"{path}: cannot read weights: {reason}") from None
    except Exception as exc:  # torch's weights_only unpickler raises pickle.UnpicklingError and others
        if type(exc).__name__ == "UnpicklingError":
            raise SpecError(
                f"{path}: holds Python objects, not just tensors; fmap only loads plain state dicts "
                "(torch.load weights_only=True) and never runs code from a weights file"
            ) from None
        raise
    raise SpecError(f"{path}: unsupported weights format '{suffix}'; use .npz, .pt or .pth")


def check_weights(spec: ModelSpec, weights: dict[str, np.ndarray]) -> None:
    """Check keys and shapes against the spec; the error names the keys and the shapes."""
    expected = expected_parameters(spec)
    missing = [key for key in expected if key not in weights]
    extra = [key for key in weights if key not in expected and not key.endswith(".num_batches_tracked")]
    if missing:
        raise SpecError(f"{spec.weights}: missing weights {', '.join(missing)}")
    if extra:
        raise SpecError(f"{spec.weights}: unexpected weights {', '.join(extra)} (not in spec {spec.source})")
    for key, shape in expected.items():
        found = tuple(weights[key].shape)
        if found != shape:
            raise SpecError(f"{spec.weights}: {key} has shape {found}, expected {shape}")
        if not np.all(np.isfinite(weights[key])):
            raise SpecError(f"{spec.weights}: {key} contains NaN or infinite values")


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build the network for ``spec``, load and check its weights, and put it in eval mode."""
    weights = read_weights(spec.weights)
    check_weights(spec, weights)
    module = SpecNet(spec)
    expected = expected_parameters(spec)
    state = {key: torch.from_numpy(np.ascontiguousarray(weights[key], dtype=np.float32)) for key in expected}
    module.load_state_dict(state, strict=False)  # keys were checked above; BN's counters are not weights
    module.eval()
    digest = hashlib.sha256(spec.weights.read_bytes()).hexdigest()
    return LoadedModel(spec=spec, module=module, weights_sha256=digest)
