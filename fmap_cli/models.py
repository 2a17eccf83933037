"""Turn ``--model`` (and ``--weights``) into a ready ``nn.Module``: spec files, Python factories,
torchvision/timm names and ``torch.export`` programs.

Weights never run code: ``.pt`` files load with ``torch.load(..., weights_only=True)``, and ``.pt2``
archives are checked before torch reads them (``exported.py``). The only code fmap runs is a
factory the user names explicitly (``file.py:factory``, ``package.module:factory``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError, SpecError, UsageError, did_you_mean, first_line
from .exported import load_program
from .spec import (
    BUILTIN_MODELS,
    CROP_MODES,
    INTERPOLATIONS,
    InputSpec,
    LayerSpec,
    ModelSpec,
    geometry,
    load_spec,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor, LayerSpec], torch.Tensor]] = {
    "relu": lambda x, layer: F.relu(x),
    "leaky_relu": lambda x, layer: F.leaky_relu(x, layer.negative_slope),
    "gelu": lambda x, layer: F.gelu(x),
    "sigmoid": lambda x, layer: torch.sigmoid(x),
    "tanh": lambda x, layer: torch.tanh(x),
}


class SpecNet(nn.Module):
    """A sequential network built from a spec.

    Each spec layer is a child module named as in the spec (so its parameters are
    ``<layer>.weight``, matching the weights file); its nonlinearity is a functional call after
    it, so z is the module's output and a the output of that call (``capture.py`` pairs them).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.layers = list(spec.layers)
        for layer, geo in zip(spec.layers, geometry(spec), strict=True):
            if hasattr(self, layer.name):
                raise SpecError(
                    f"{spec.source}: layer '{layer.name}': name is taken by torch.nn.Module; rename the layer"
                )
            self.add_module(layer.name, _build_op(layer, geo.input_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = getattr(self, layer.name)(x)
            if layer.has_activation:
                x = ACTIVATIONS[layer.activation](x, layer)
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
    """A ready network in eval mode, what it expects as input, and its fingerprint."""

    module: nn.Module
    name: str
    source: str  # what --model said, or builtin:<name>
    input: InputSpec
    weights_sha256: str
    description: dict[str, Any]  # recorded in the file as model_spec
    spec: ModelSpec | None = None  # for spec files: only their layer names are selectable

    @property
    def selectable(self) -> list[str] | None:
        """Layer names users may select, or None when every discovered layer may be."""
        return None if self.spec is None else [layer.name for layer in self.spec.layers]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file (.npz, .pt/.pth state dict, .safetensors) into tensors keyed as in a state dict.

    Raises:
        ModelError: the file is missing, unreadable, or holds something other than tensors.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {key: torch.from_numpy(np.array(data[key])) for key in data.files}
        if suffix in (".pt", ".pth"):
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in CHECKPOINT_KEYS:  # training checkpoints nest the state dict
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
                    break
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ModelError(f"{path}: expected a state dict (a mapping of names to tensors)")
            tensors = {str(k): v.detach() for k, v in state.items()}
            return _strip_prefix(_state_dict(tensors, getattr(state, "_metadata", None)))
        if suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ModelError(
                    f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)"
                ) from None
            return _strip_prefix(dict(load_file(str(path))))
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"{path}: cannot read weights: {first_line(exc)}") from None
    except Exception as exc:  # torch's weights_only unpickler raises pickle.UnpicklingError and others
        if type(exc).__name__ == "UnpicklingError":
            raise ModelError(
                f"{path}: holds Python objects, not just tensors; fmap only loads plain state dicts "
                "(torch.load weights_only=True) and never runs code from a weights file"
            ) from None
        raise
    raise ModelError(f"{path}: unsupported weights format '{suffix}'; use .npz, .pt, .pth or .safetensors")


CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")


def _state_dict(tensors: dict[str, torch.Tensor], metadata: Any = None) -> dict[str, torch.Tensor]:
    """A state dict as ``nn.Module.state_dict`` makes one: an OrderedDict whose ``_metadata`` maps each
    module path to its ``{"version": ...}``, which modules such as torchvision's MNASNet read in their
    ``_load_from_state_dict``. ``metadata`` that is not a mapping of such entries is left out."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict(tensors)
    if isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, dict) for k, v in metadata.items()):
        state._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]  # as PyTorch sets it
    return state


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix DataParallel/DDP put on every key (and on the metadata's module paths)."""
    if not state or not all(key.startswith("module.") for key in state):
        return state
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        metadata = {"" if k == "module" else k.removeprefix("module."): v for k, v in metadata.items()}
    return _state_dict({key.removeprefix("module."): value for key, value in state.items()}, metadata)


def _listed(keys: list[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_weights(path: Path, expected: dict[str, tuple[int, ...]], weights: dict[str, torch.Tensor]) -> None:
    """Check keys and shapes against what the model needs; the error names the keys and shapes."""
    missing = [key for key in expected if key not in weights]
    extra = [key for key in weights if key not in expected and not key.endswith(".num_batches_tracked")]
    if missing:
        raise ModelError(f"{path}: missing weights {_listed(missing)} (the file has {_listed(list(weights))})")
    if extra:
        raise ModelError(f"{path}: unexpected weights {_listed(extra)}")
    for key, shape in expected.items():
        found = tuple(weights[key].shape)
        if found != shape:
            raise ModelError(f"{path}: {key} has shape {found}, expected {shape}")
        if weights[key].is_floating_point() and not bool(torch.isfinite(weights[key]).all()):
            raise ModelError(f"{path}: {key} contains NaN or infinite values")


def load_weights_into(module: nn.Module, path: Path) -> str:
    """Load a state dict file into ``module`` after checking every key and shape; return its SHA-256.

    Loads as PyTorch does, with the file's module versions (``_metadata``); a file without them
    (.npz, .safetensors) is read as the layout of the modules as they are now, which its keys and
    shapes have just been checked against.

    Raises:
        ModelError: the file cannot be read, does not fit the model, or the model's own loading
            code (``_load_from_state_dict``) fails on it.
    """
    weights = read_weights(path)
    state = module.state_dict()
    expected = {key: tuple(t.shape) for key, t in state.items() if not key.endswith(".num_batches_tracked")}
    check_weights(path, expected, weights)
    metadata = getattr(weights, "_metadata", None) or getattr(state, "_metadata", None)
    loading = _state_dict({k: v.to(state[k].dtype) for k, v in weights.items() if k in state}, metadata)
    try:
        module.load_state_dict(loading, strict=False)
    except Exception as exc:  # the model's own loading code: any error is the file's misfit
        raise ModelError(
            f"{path}: the model's own loading code fails on these weights: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state_sha256(module: nn.Module) -> str:
    """A fingerprint of a module's parameters and buffers (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_spec_model(spec: ModelSpec) -> LoadedModel:
    """Build the network for a spec, load and check its weights, and put it in eval mode."""
    module = SpecNet(spec)
    digest = load_weights_into(module, spec.weights)
    module.eval()
    return LoadedModel(module, spec.name, spec.source, spec.input, digest, spec.to_dict(), spec)


def parse_model_args(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings -> kwargs; values are JSON when they parse (numbers, true, lists), else text."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg: expected key=value with a Python name as key, got {pair!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def load_model(
    model: str | None = None, weights: str | None = None, model_args: dict[str, Any] | None = None
) -> LoadedModel:
    """Load any model fmap understands, ready in eval mode.

    ``model`` is a built-in name, a ``.toml``/``.json`` spec, a ``.pt2`` torch.export program,
    ``package.module:factory`` or ``path/to/file.py:factory`` (a callable returning an
    ``nn.Module``, called with ``model_args``), or ``torchvision:NAME`` / ``timm:NAME``.
    ``weights`` is a state dict file, or ``pretrained`` for a library's own weights.

    Raises:
        ModelError: the model or its weights cannot be loaded; the message says which and why.
    """
    model_args = model_args or {}
    if model is None or model in BUILTIN_MODELS or model.lower().endswith((".toml", ".json")):
        if weights is not None or model_args:
            given = " and ".join(flag for flag, value in (("--weights", weights), ("--model-arg", model_args)) if value)
            raise UsageError(f"{given}: not for built-in or .toml/.json spec models, whose spec names their weights")
        return load_spec_model(load_spec(model))
    if model.lower().endswith(".pt2"):
        if weights is not None or model_args:
            raise UsageError("--weights and --model-arg do not apply to .pt2 programs (they hold their weights)")
        return load_exported(Path(model))
    library, sep, name = model.partition(":")
    if not sep or not name:
        names = ", ".join(BUILTIN_MODELS)
        raise UsageError(
            f"--model: cannot understand {model!r}; {did_you_mean(model, BUILTIN_MODELS)}give a built-in name "
            f"({names}), a .toml/.json spec, a .pt2 program, package.module:factory, file.py:factory, "
            "torchvision:NAME or timm:NAME"
        )
    if library in ("torchvision", "timm"):
        module, input_spec = _library_model(library, name, weights, model_args)
    else:
        module = _factory_model(library, name, model_args)
        input_spec = InputSpec()
    if weights is not None and weights != "pretrained":
        digest = load_weights_into(module, Path(weights))
    else:
        digest = state_sha256(module)
    module.eval()
    description = {"source": model, "class": type(module).__qualname__, "model_args": model_args,
                   "weights": weights, "architecture": repr(module)}  # fmt: skip
    return LoadedModel(module, name, model, input_spec, digest, description)


def _factory_model(location: str, factory: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call ``factory`` from a module path or a Python file (explicitly named: that runs its code)."""
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise ModelError(f"{path}: no such Python file")
        spec = importlib.util.spec_from_file_location(f"fmap_user_model_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ModelError(f"{path}: cannot load as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(spec.name, module)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ModelError(f"{path}: running the file failed: {type(exc).__name__}: {first_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as exc:
            raise ModelError(f"--model {location}:{factory}: cannot import {location}: {first_line(exc)}") from None
    make = getattr(module, factory, None)
    if not callable(make):
        raise ModelError(f"--model {location}:{factory}: {location} has no callable '{factory}'")
    try:
        built = make(**kwargs)
    except Exception as exc:
        raise ModelError(
            f"--model {location}:{factory}: calling it failed: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if not isinstance(built, nn.Module):
        raise ModelError(f"--model {location}:{factory}: returned {type(built).__name__}, not a torch.nn.Module")
    scripted = next((path for path, m in built.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:  # its calls take no hooks, and the ops inside it are hidden from fmap
        what = f"its module '{scripted}' is" if scripted else "the model is"
        raise ModelError(
            f"--model {location}:{factory}: {what} TorchScript (torch.jit.script or trace), whose calls and "
            "ops fmap cannot see to capture maps; return the plain nn.Module, without torch.jit"
        )
    return built


def _library_model(library: str, name: str, weights: str | None, kwargs: dict[str, Any]) -> tuple[nn.Module, InputSpec]:
    """A torchvision or timm model (optional extras), with the preprocessing recipe of its weights.

    ``weights`` is --weights: ``pretrained`` loads the library's own (torchvision's DEFAULT), whose
    recipe is used; with random weights or a file, the recipe is still that of the library's own.
    """
    pretrained = weights == "pretrained"
    try:
        lib = importlib.import_module("torchvision.models" if library == "torchvision" else "timm")
    except ImportError:
        raise ModelError(f"--model {library}:{name}: {library} is not installed (pip install {library})") from None
    try:
        if library == "torchvision":
            module = lib.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)
        else:
            module = lib.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # unknown name, no cached weights offline, bad kwargs
        raise ModelError(f"--model {library}:{name}: {type(exc).__name__}: {first_line(exc)}") from None
    # the recipe is the library's own weights'; say so when they are not the weights used (which file
    # they are is the file's weights_sha256: a resumed run may name the same weights by another path)
    used = "loaded" if pretrained else f"not loaded: the weights are {'from --weights' if weights else 'random'}"
    if library == "torchvision":
        return module, _torchvision_recipe(lib, name, used)
    return module, _timm_recipe(module, name, used)


def _torchvision_recipe(lib: Any, name: str, used: str) -> InputSpec:
    """The recipe of torchvision's DEFAULT weights for ``name`` (what --weights pretrained loads):
    the attributes of their ``transforms()``, an ``ImageClassification`` preset (read, never run)."""
    weights = lib.get_model_weights(name).DEFAULT
    preset = weights.transforms()  # an nn.Module holding the recipe; built, not called
    label = f"{type(weights).__name__}.{weights.name}"
    if type(preset).__name__ != "ImageClassification":
        kind = type(preset).__name__  # detection, segmentation, video: not a resize-and-crop recipe
        return InputSpec(resize=256, recipe=f"fmap default for torchvision models (the recipe of {label} is {kind})")
    crop, resize = preset.crop_size[0], preset.resize_size[0]
    interpolation = _known(f"torchvision:{name}", str(preset.interpolation.value))
    return InputSpec(
        size=(crop, crop),
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        resize=resize,
        interpolation=interpolation,
        recipe=f"torchvision {label}, the model's DEFAULT weights ({used})",
    )


def _known(model: str, interpolation: str, crop_mode: str = "center") -> str:
    """``interpolation``, when fmap can apply it and ``crop_mode``."""
    if interpolation not in INTERPOLATIONS or crop_mode not in CROP_MODES:
        raise ModelError(
            f"--model {model}: its recipe resizes with {interpolation!r} in crop mode {crop_mode!r}; fmap applies "
            f"interpolations {', '.join(INTERPOLATIONS)} in crop modes {', '.join(CROP_MODES)}"
        )
    return interpolation


def _timm_recipe(module: nn.Module, name: str, used: str) -> InputSpec:
    """The recipe of timm's data config for the model (``resolve_model_data_config``: its
    ``pretrained_cfg`` with timm's defaults), as timm's eval transforms apply it."""
    config = importlib.import_module("timm.data").resolve_model_data_config(module)
    height, width = (int(side) for side in config["input_size"][-2:])
    crop_pct = float(config["crop_pct"])
    # timm: scale_size = floor(size / crop_pct) per side; a square one is torchvision's Resize(int) in "center" mode
    box = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    mode = config["crop_mode"]
    resize: int | tuple[int, int] = box[0] if mode == "center" and box[0] == box[1] else box
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    tag = ".".join(part for part in (cfg.get("architecture"), cfg.get("tag")) if part) or name
    return InputSpec(
        size=(height, width),
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        resize=resize,
        interpolation=_known(f"timm:{name}", config["interpolation"], mode),
        crop_mode=mode,
        recipe=f"timm data config of {tag}, crop_pct {crop_pct} ({used})",
    )


def load_exported(path: Path) -> LoadedModel:
    """A ``torch.export`` program saved with ``torch.export.save``; layer names come from its module stack.

    The archive is checked first (``exported.py``): nothing in it is unpickled or run as code.

    Raises:
        ModelError: the file is missing or unsafe, or the program cannot be loaded or turned into
            a module; the message names the file.
    """
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    program, data = load_program(path)
    try:
        module = program.module()
        example = next((n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"
                        and n.name not in program.graph_signature.inputs_to_parameters
                        and n.name not in program.graph_signature.inputs_to_buffers), None)  # fmt: skip
        graph = str(program.graph)
    except Exception as exc:  # torch's unlifting and the graph are the file's: any failure is its fault
        raise ModelError(
            f"{path}: the torch.export program cannot be made into a module: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    # Read by capture.is_exported; nn.Module.__setattr__ is typed for tensors and modules only.
    object.__setattr__(module, "fmap_exported", True)
    size = (224, 224)
    if isinstance(example, torch.Tensor) and example.dim() == 4:  # the program's example input
        size = (int(example.shape[-2]), int(example.shape[-1]))
    description = {"source": str(path), "class": "torch.export.ExportedProgram", "graph": graph}
    digest = hashlib.sha256(data).hexdigest()
    return LoadedModel(module, path.stem, str(path), InputSpec(size=size), digest, description)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available (torch {torch.__version__}); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: unsupported device '{name}'; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
