"""Model spec files (TOML or JSON): parsing, validation and layer geometry, without torch.

A spec describes a sequential network; every error names the file, the layer and the key::

    edges.toml: layer 'conv2': kernel_size must be a positive integer, got -3
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import SpecError, did_you_mean
from .geometry import Geometry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Resampling filters by the names torchvision's InterpolationMode and timm's data configs use; each is
# Pillow's filter of that name (images.py), which is what torchvision's Resize runs on a PIL image.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
# How a picture becomes the crop (timm's crop_mode): resize keeping the aspect ratio then crop the
# centre; resize both sides ignoring it ("squash"); fit the whole picture inside, pad the rest ("border").
CROP_MODES = ("center", "squash", "border")
MAX_RESIZE = 2**31 - 1  # the largest side Pillow (and torchvision's Resize) can be asked for: a C int

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "sigmoid", "tanh", "none")

# Per layer type: required keys and optional keys with their defaults.
_PAIR = "pair"  # a positive int or [h, w]
LAYER_KEYS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "conv2d": (
        {"out_channels": "int", "kernel_size": _PAIR},
        {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": True},
    ),
    "maxpool2d": ({"kernel_size": _PAIR}, {"stride": None, "padding": 0}),
    "avgpool2d": ({"kernel_size": _PAIR}, {"stride": None, "padding": 0}),
    "batchnorm2d": ({}, {"eps": 1e-5}),
    "flatten": ({}, {}),
    "linear": ({"out_features": "int"}, {"bias": True}),
}
COMMON_KEYS = {"name", "type", "activation", "negative_slope", "description", "channel_descriptions"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")

BUILTIN_MODELS = {"edges": "edges.toml"}
DEFAULT_MODEL = "edges"


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a sequential spec, with hyper-parameters normalised (pairs as (h, w))."""

    name: str
    type: str
    params: dict[str, Any]
    activation: str = "none"  # one of ACTIVATIONS
    negative_slope: float = 0.01  # leaky_relu only
    description: str = ""
    channel_descriptions: tuple[str, ...] = ()

    @property
    def has_activation(self) -> bool:
        return self.activation != "none"


@dataclass(frozen=True)
class InputSpec:
    """What the network is fed: size (H, W), normalisation, resize rule and alpha background, and
    where these come from (a spec's [input], a library's recipe for the model, or fmap's default)."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # int: the shorter side before the centre crop (an N x N box for squash/border); (H, W): the box
    # resized to (see images.Preprocessing); None: just cover `size`
    resize: int | tuple[int, int] | None = None
    background: tuple[int, int, int] = (255, 255, 255)  # alpha is composited onto this
    interpolation: str = "bilinear"  # one of INTERPOLATIONS
    crop_mode: str = "center"  # one of CROP_MODES
    recipe: str = "fmap default"  # where the values above come from, recorded in the output file


@dataclass(frozen=True)
class ModelSpec:
    """A parsed, validated model spec."""

    name: str
    source: str  # the spec file's path, or "builtin:<name>"
    weights: Path
    input: InputSpec
    layers: tuple[LayerSpec, ...]
    description: str = ""
    text: str = ""  # the spec file as written

    def layer(self, name: str) -> LayerSpec:
        return next(layer for layer in self.layers if layer.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-able data with defaults filled in, plus the file's own text."""
        return {
            "text": self.text,
            "model": {"name": self.name, "description": self.description, "weights": self.weights.name},
            "input": {
                "size": list(self.input.size),
                "mean": list(self.input.mean),
                "std": list(self.input.std),
                "resize": self.input.resize,
                "interpolation": self.input.interpolation,
                "background": list(self.input.background),
            },
            "layers": [
                {
                    "name": layer.name,
                    "type": layer.type,
                    **{k: list(v) if isinstance(v, tuple) else v for k, v in layer.params.items()},
                    "activation": layer.activation,
                    **({"negative_slope": layer.negative_slope} if layer.activation == "leaky_relu" else {}),
                }
                for layer in self.layers
            ],
        }


@dataclass(frozen=True)
class LayerGeometry:
    """Shapes and receptive field of one layer for a given input size."""

    name: str
    input_shape: tuple[int, ...]  # (C, H, W) or (F,)
    output_shape: tuple[int, ...]
    receptive: Geometry  # where its units look in the input


@dataclass
class _Checker:
    """Validates raw spec values, raising SpecError that names file, layer and key."""

    file: str
    where: str = ""
    seen: set[str] = field(default_factory=set)

    def fail(self, message: str) -> SpecError:
        prefix = f"{self.file}: {self.where}: " if self.where else f"{self.file}: "
        return SpecError(prefix + message)

    def positive_int(self, key: str, value: Any, allow_zero: bool = False) -> int:
        low = 0 if allow_zero else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "a non-negative" if allow_zero else "a positive"
            raise self.fail(f"{key} must be {kind} integer, got {value!r}")
        return value

    def pair(self, key: str, value: Any, allow_zero: bool = False) -> tuple[int, int]:
        if isinstance(value, list | tuple):
            if len(value) != 2:
                raise self.fail(f"{key} must be an integer or a list of two, got {value!r}")
            return (self.positive_int(key, value[0], allow_zero), self.positive_int(key, value[1], allow_zero))
        n = self.positive_int(key, value, allow_zero)
        return (n, n)

    def floats(self, key: str, value: Any, count: int, positive: bool = False) -> tuple[float, ...]:
        ok = isinstance(value, list) and len(value) == count
        if not ok or not all(_finite(v) for v in value) or (positive and min(value) <= 0):
            kind = "positive numbers" if positive else "finite numbers"
            raise self.fail(f"{key} must be a list of {count} {kind}, got {value!r}")
        return tuple(float(v) for v in value)

    def choice(self, key: str, value: Any, choices: Collection[str]) -> str:
        if value not in choices:
            hint = did_you_mean(str(value), choices)
            extra = f" ({hint.strip()})" if hint else ""
            raise self.fail(f"{key} must be one of {', '.join(choices)}, got {value!r}{extra}")
        return str(value)

    def unknown_keys(self, table: dict[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                hint = did_you_mean(key, sorted(allowed))
                extra = f" ({hint.strip()})" if hint else f"; allowed: {', '.join(sorted(allowed))}"
                raise self.fail(f"unknown key '{key}'{extra}")


def _finite(value: Any) -> bool:
    """A number (not a bool) that a float holds: JSON's integers have no bound, nan and inf none."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer over float's range
        return False


def builtin_spec_path(name: str) -> Path:
    """Path of a built-in model's spec file inside the package."""
    return Path(str(resources.files("fmap_cli.builtin").joinpath(BUILTIN_MODELS[name])))


def load_spec(model: str | Path | None = None) -> ModelSpec:
    """Load a model spec: a built-in name (default ``edges``) or a ``.toml``/``.json`` file.

    Raises:
        SpecError: the file is missing or invalid; the message names the file, layer and key.
    """
    model = DEFAULT_MODEL if model is None else model
    if isinstance(model, str) and model in BUILTIN_MODELS:
        path, source = builtin_spec_path(model), f"builtin:{model}"
    else:
        path = Path(model)
        source = str(path)
        if path.suffix.lower() not in (".toml", ".json"):
            names = ", ".join(BUILTIN_MODELS)
            raise SpecError(f"{path}: not a model spec; give a .toml or .json file or a built-in model ({names})")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read model spec: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: model spec is not UTF-8 text") from None
    try:
        raw = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: cannot parse model spec: {exc}") from None
    return dataclasses.replace(parse_spec(raw, path, source), text=text)


def parse_spec(raw: Any, path: Path, source: str | None = None) -> ModelSpec:
    """Validate the data of a spec file (already parsed from TOML/JSON) into a ModelSpec."""
    check = _Checker(str(path))
    if not isinstance(raw, dict):
        raise check.fail("top level must be a table/object")
    check.unknown_keys(raw, {"model", "input", "layers"})
    model = raw.get("model")
    if not isinstance(model, dict):
        raise check.fail("missing [model] table with 'name' and 'weights'")
    check.where = "[model]"
    check.unknown_keys(model, {"name", "weights", "description"})
    for key in ("name", "weights"):
        if not isinstance(model.get(key), str) or not model[key]:
            raise check.fail(f"'{key}' must be a non-empty string")
    check.where = "[input]"
    # the spec's path is the file's model_source: the same spec elsewhere is the same preprocessing
    input_spec = dataclasses.replace(_parse_input(raw.get("input", {}), check), recipe="the model spec's [input]")
    layers = raw.get("layers")
    check.where = ""
    if not isinstance(layers, list) or not layers:
        raise check.fail("missing [[layers]]: a spec needs at least one layer")
    parsed: list[LayerSpec] = []
    for index, table in enumerate(layers):
        check.where = f"layers[{index}]"
        parsed.append(_parse_layer(table, check, {layer.name for layer in parsed}))
    spec = ModelSpec(
        name=model["name"],
        source=source or str(path),
        weights=(path.parent / model["weights"]),
        input=input_spec,
        layers=tuple(parsed),
        description=str(model.get("description", "")),
    )
    geometry(spec, file=str(path))  # raises if shapes do not chain
    return spec


def _parse_input(table: Any, check: _Checker) -> InputSpec:
    if not isinstance(table, dict):
        raise check.fail("must be a table")
    check.unknown_keys(table, {"size", "mean", "std", "resize", "interpolation", "background"})
    default = InputSpec()
    size = check.pair("size", table.get("size", list(default.size)))
    mean = check.floats("mean", table.get("mean", list(default.mean)), 3)
    std = check.floats("std", table.get("std", list(default.std)), 3, positive=True)
    resize = table.get("resize")
    if resize is not None:
        resize = check.positive_int("resize", resize)
        if resize > MAX_RESIZE:
            raise check.fail(f"resize must be at most {MAX_RESIZE}, got {resize}")
    background = table.get("background", list(default.background))
    if not (
        isinstance(background, list)
        and len(background) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in background)
    ):
        raise check.fail(f"background must be a list of three integers 0-255, got {background!r}")
    interpolation = check.choice("interpolation", table.get("interpolation", default.interpolation), INTERPOLATIONS)
    return InputSpec(size, mean, std, resize, tuple(background), interpolation)  # type: ignore[arg-type]


def _parse_layer(table: Any, check: _Checker, taken: set[str]) -> LayerSpec:
    if not isinstance(table, dict):
        raise check.fail("must be a table")
    name = table.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise check.fail(f"name must be letters, digits, '_' or '-' (not starting with a digit), got {name!r}")
    if name in taken:
        raise check.fail(f"duplicate layer name '{name}'")
    check.where = f"layer '{name}'"
    layer_type = check.choice("type", table.get("type"), LAYER_KEYS)
    required, optional = LAYER_KEYS[layer_type]
    check.unknown_keys(table, COMMON_KEYS | set(required) | set(optional))
    params: dict[str, Any] = {}
    for key, kind in required.items():
        if key not in table:
            raise check.fail(f"missing required key '{key}'")
        value = table[key]
        params[key] = check.pair(key, value) if kind == _PAIR else check.positive_int(key, value)
    for key, default in optional.items():
        value = table.get(key, default)
        if key == "stride" and value is None:
            value = params["kernel_size"]  # pooling: stride defaults to the window, like PyTorch
        if key in ("stride", "dilation"):
            value = check.pair(key, value)
        elif key == "padding":
            value = check.pair(key, value, allow_zero=True)
        elif key == "groups":
            value = check.positive_int(key, value)
        elif key == "bias" and not isinstance(value, bool):
            raise check.fail(f"bias must be true or false, got {value!r}")
        elif key == "eps" and (not isinstance(value, int | float) or isinstance(value, bool) or value <= 0):
            raise check.fail(f"eps must be a positive number, got {value!r}")
        params[key] = value
    activation = check.choice("activation", table.get("activation", "none"), ACTIVATIONS)
    slope = table.get("negative_slope", 0.01)
    if not _finite(slope):
        raise check.fail(f"negative_slope must be a finite number, got {slope!r}")
    descriptions = table.get("channel_descriptions", [])
    if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions):
        raise check.fail("channel_descriptions must be a list of strings")
    return LayerSpec(
        name=name,
        type=layer_type,
        params=params,
        activation=activation,
        negative_slope=float(slope),
        description=str(table.get("description", "")),
        channel_descriptions=tuple(descriptions),
    )


# Sizes past which a spec is refused before anything is allocated (a typo such as
# out_channels = 1000000000 would otherwise end in a MemoryError or the OOM killer).
MAX_PARAMETERS = 2**31  # in the whole model; large CNNs have about 10**8
MAX_MAP_BYTES = 4 * 2**30  # one layer's map of one image, as float32


def _out_len(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _shown(value: Any) -> str:
    """A spec value as the file would write it: pairs with equal halves as one integer."""
    if isinstance(value, tuple):
        return str(value[0]) if value[0] == value[1] else f"[{value[0]}, {value[1]}]"
    return str(value)


def _setting(layer: LayerSpec, key: str) -> tuple[str, str]:
    """``key = value`` as the spec file says it, and the advice; the layer's type when ``key`` is not
    one of its keys (a batch norm is as wide as its input)."""
    if key in layer.params:
        return f"{key} = {_shown(layer.params[key])}", f"; use a smaller {key}"
    return f"type = {layer.type}", "; use fewer channels before it"


def _parameters(layer: LayerSpec, shape: tuple[int, ...]) -> tuple[int, str]:
    """Parameters (and buffers) of a layer with input ``shape``, and the key that sets their number."""
    p = layer.params
    if layer.type == "conv2d":
        kernel = p["kernel_size"][0] * p["kernel_size"][1]
        count = p["out_channels"] * (shape[0] // p["groups"]) * kernel + (p["out_channels"] if p["bias"] else 0)
        return count, ("kernel_size" if kernel > p["out_channels"] else "out_channels")
    if layer.type == "linear":
        return math.prod(shape) * p["out_features"] + (p["out_features"] if p["bias"] else 0), "out_features"
    if layer.type == "batchnorm2d":
        return 4 * shape[0], "channels"  # weight, bias, running mean and variance
    return 0, "channels"


def _check_sizes(fail: str, layer: LayerSpec, shape: tuple[int, ...], out: tuple[int, ...], total: int) -> int:
    """Refuse a layer that takes the model past MAX_PARAMETERS or whose map of one image passes
    MAX_MAP_BYTES; return the model's parameter count so far."""
    count, key = _parameters(layer, shape)
    total += count
    if total > MAX_PARAMETERS:
        setting, advice = _setting(layer, key)
        raise SpecError(
            f"{fail}: {setting} gives the model {total} parameters, more than fmap's limit of "
            f"{MAX_PARAMETERS} (2**31){advice}"
        )
    if 4 * math.prod(out) > MAX_MAP_BYTES:
        key = {"conv2d": "out_channels", "linear": "out_features"}.get(layer.type, "padding")
        if len(out) == 3 and out[1] * out[2] * shape[0] > shape[1] * shape[2] * out[0]:
            key = "padding"  # the map grew more in space than in channels: only padding does that
        setting, advice = _setting(layer, key)
        raise SpecError(f"{fail}: {setting} {_too_big(out, 'map')}{advice}")
    return total


def _too_big(shape: tuple[int, ...], what: str) -> str:
    tenths = (4 * math.prod(shape) * 10 + 2**29) // 2**30  # in integers: a spec's sizes may pass a float's range
    shown = "x".join(map(str, shape))
    limit = MAX_MAP_BYTES // 2**30
    return f"makes a {shown} {what}, {tenths // 10}.{tenths % 10} GiB per image, more than fmap's limit of {limit} GiB"


def geometry(spec: ModelSpec, size: tuple[int, int] | None = None, file: str | None = None) -> list[LayerGeometry]:
    """Output shape and receptive field of every layer for an input of ``size`` (H, W).

    Raises:
        SpecError: a layer does not fit its input (e.g. kernel larger than the map, or linear
            before flatten), or is absurdly large (see MAX_PARAMETERS, MAX_MAP_BYTES); the message
            names the layer and the key, or the input size.
    """
    size = size or spec.input.size
    where = file or spec.source
    shape: tuple[int, ...] = (3, *size)
    if 4 * math.prod(shape) > MAX_MAP_BYTES:
        raise SpecError(
            f"{where}: [input]: size = [{size[0]}, {size[1]}] {_too_big(shape, 'input')}; use a smaller size"
        )
    receptive = Geometry()
    total = 0
    result = []
    for layer in spec.layers:
        p = layer.params
        fail = f"{where}: layer '{layer.name}'"
        if layer.type in ("conv2d", "maxpool2d", "avgpool2d", "batchnorm2d") and len(shape) != 3:
            raise SpecError(
                f"{fail}: {layer.type} needs a (C, H, W) input but gets {shape}; remove the flatten before it"
            )
        if layer.type == "linear" and len(shape) != 1:
            raise SpecError(f"{fail}: linear needs a flat input but gets {shape}; add a flatten layer before it")
        if layer.type in ("conv2d", "maxpool2d", "avgpool2d"):
            dilation = p.get("dilation", (1, 1))
            if layer.type == "conv2d" and (shape[0] % p["groups"] or p["out_channels"] % p["groups"]):
                raise SpecError(f"{fail}: groups={p['groups']} must divide in_channels={shape[0]} and out_channels")
            out_hw = []
            for axis in (0, 1):
                k, s, pad, d = p["kernel_size"][axis], p["stride"][axis], p["padding"][axis], dilation[axis]
                if layer.type != "conv2d" and pad * 2 > k:
                    raise SpecError(f"{fail}: padding must be at most half of kernel_size")
                n = _out_len(shape[axis + 1], k, s, pad, d)
                if n < 1:
                    raise SpecError(
                        f"{fail}: kernel_size {p['kernel_size']} does not fit its {shape[1]}x{shape[2]} input; "
                        "use a larger --size or a smaller kernel"
                    )
                out_hw.append(n)
            receptive = receptive.after_window(p["kernel_size"], p["stride"], p["padding"], dilation)
            channels = p["out_channels"] if layer.type == "conv2d" else shape[0]
            out: tuple[int, ...] = (channels, *out_hw)
        elif layer.type == "batchnorm2d":
            out = shape
        elif layer.type == "flatten":
            out = (math.prod(shape),)
            receptive = Geometry.whole(size)
        else:  # linear
            out = (p["out_features"],)
        total = _check_sizes(fail, layer, shape, out, total)
        if layer.channel_descriptions and len(layer.channel_descriptions) != out[0]:
            raise SpecError(
                f"{fail}: channel_descriptions has {len(layer.channel_descriptions)} entries for {out[0]} channels"
            )
        result.append(LayerGeometry(layer.name, shape, out, receptive))
        shape = out
    return result
