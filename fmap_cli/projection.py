"""What excites a feature map, in pixels (``fmap project``): one activation of a channel projected back
to the input by Zeiler & Fergus's deconvnet, guided backpropagation or the plain gradient.

All three methods are autograd with the nonlinearities' backward rules replaced, never a
per-architecture reimplementation. The forward pass is capture's own (``capture.capture``: the
pairing rule names layer L's map and the pass stops right after it), run inside
:class:`_BackwardRules`, a ``TorchFunctionMode`` below capture's own that sees every op the model
calls (module, functional and in-place forms of a nonlinearity alike, as capture sees them) and

* runs it with autograd on (capture runs the model under ``torch.no_grad``);
* gives every nonlinearity the method's backward rule (``store.schema.PROJECTION_METHODS``):
  deconvnet: :class:`_Rectified` (relu of the signal, the forward input ignored); guided: the
  ordinary backward of f after a hook rectifies the signal; gradient: nothing changed;
* keeps the last results, so the map capture holds (a detached view) is found with its graph.

Max pooling, batch norm, residual adds and every other op pass back their ordinary gradient (max
pooling: to its forward switches). The backward pass starts from L's map with every entry zeroed
but the unit's own, which keeps its value. Each unit is one row of the batch, so the units of a
batch never mix (the model runs in eval mode, where rows are independent): a batch of units costs
one forward and one backward pass.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .analysis import layer_stats, top_images
from .capture import LayerInfo, capture
from .errors import FmapError, ModelError, UsageError, first_line
from .extract import full_float32  # TF32 off, as for the maps the file holds
from .geometry import Geometry
from .layers import describe_layers
from .models import LoadedModel, load_model, resolve_device
from .pairing import NONLINEAR_OPS, op_name
from .receptive import input_tensor
from .render import image_index
from .stopping import StopRequested, check
from .store import schema
from .store.atomic import check_target
from .store.axes import channels_first_order, layer_axes
from .store.projection import Projections, write_projections
from .store.reader import check_channel, layer_group, printable, reading

METHODS = tuple(schema.PROJECTION_METHODS)  # deconvnet (the default), guided, gradient
DEFAULT_TOP = 9  # Zeiler & Fergus's Fig. 2 shows the top 9 activations of each feature map
RECENT = 64  # op results kept while the forward runs, to find the graph of the map capture holds
# The recomputed maximum of each image's channel must match the file's write-time statistics.
RTOL, SCALE_TOL = 2e-3, 1e-4  # relative to the value, and to the channel's largest maximum
WHOLE = -1  # /unit/row and /unit/col of a whole-map projection
UNKNOWN_GEOMETRY = Geometry((-1, -1), (-1, -1), (float("nan"), float("nan")))  # as the maps file stores it


@dataclass(frozen=True)
class Unit:
    """Where a projection starts: a unit of L's map on one image of the source file."""

    image: int  # index into the source file
    row: int = WHOLE  # WHOLE (-1) for every unit of the channel at once
    col: int = WHOLE

    @property
    def whole(self) -> bool:
        return self.row == WHOLE


@dataclass(frozen=True)
class UnitChoice:
    """Which units: the top K images at their maxima (default), or one image (--image, --unit)."""

    top: int | None = None  # None: DEFAULT_TOP, unless ``image`` is given
    image: str | None = None  # index or stored path
    unit: tuple[int, int] | None = None  # (row, col) on ``image``; None: its maximum
    whole_map: bool = False  # every unit of the channel on each image


@dataclass(frozen=True)
class ProjectOptions:
    """Everything ``fmap project`` can be asked to do."""

    file: Path
    layer: str
    channel: int
    out: Path
    units: UnitChoice = field(default_factory=UnitChoice)
    method: str = "deconvnet"
    model: str | None = None  # None: the model recorded in ``file`` (spec files, built-ins, .pt2)
    weights: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    batch_size: int = 16  # units per forward + backward pass
    overwrite: bool = False
    command: str = ""


@dataclass(frozen=True)
class ProjectResult:
    """What a finished ``fmap project`` wrote."""

    out: Path
    method: str
    layer: str
    channel: int
    units: list[Unit]
    values: list[float]
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "output": str(self.out),
            "method": self.method,
            "layer": self.layer,
            "channel": self.channel,
            "units": [
                {"image": u.image, "row": u.row, "col": u.col, "value": v}
                for u, v in zip(self.units, self.values, strict=True)
            ],
            "device": self.device,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------- the backward rules


class _Rectified(torch.autograd.Function):
    """deconvnet's nonlinearity: the forward op as it is, and relu of the signal going back."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = run(x)
        if out is x:  # an in-place op (x.relu_(), ReLU(inplace=True)) wrote into x
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.clamp(min=0), None


def _rectify(grad: torch.Tensor) -> torch.Tensor:
    """guided backpropagation's hook on a nonlinearity's output: only positive signals reach f's backward."""
    return grad.clamp(min=0)


class _BackwardRules(TorchFunctionMode):
    """The op-level part of a projection (see the module docstring)."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self._recent: deque[torch.Tensor] = deque(maxlen=RECENT)

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        with torch.enable_grad():  # capture runs the model under no_grad
            rule = isinstance(x, torch.Tensor) and x.requires_grad and op_name(func)[0] in NONLINEAR_OPS
            if rule and self.method == "deconvnet":

                def run(t: torch.Tensor) -> Any:
                    return func(t, *args[1:], **kwargs) if args else func(**{**kwargs, "input": t})

                out = _Rectified.apply(x, run)  # type: ignore[no-untyped-call]  # torch leaves apply untyped
            else:
                out = func(*args, **kwargs)
                if rule and self.method == "guided" and isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(_rectify)  # type: ignore[no-untyped-call]  # untyped in torch
        if isinstance(out, torch.Tensor) and out.requires_grad:
            self._recent.append(out)
        return out

    def graph_of(self, held: torch.Tensor) -> torch.Tensor | None:
        """The result of the forward pass whose memory ``held`` (a map capture holds, detached) views."""
        for t in reversed(self._recent):
            if (t.data_ptr(), t.shape, t.stride(), t.storage_offset(), t.dtype, t.device) == (
                held.data_ptr(), held.shape, held.stride(), held.storage_offset(), held.dtype, held.device
            ):  # fmt: skip
                return t
        return None


def project_units(
    model: nn.Module,
    layers: dict[str, LayerInfo],
    layer: str,
    channel: int,
    pixels: torch.Tensor,
    units: Sequence[Unit],
    method: str = "deconvnet",
    batch_size: int = 16,
    stop_requested: StopRequested = lambda: None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Project units of ``layer``'s channel ``channel`` back to the input.

    The model is left as it was: train/eval mode and flags (capture restores them), parameters and
    their ``requires_grad`` and ``.grad`` (the gradient is taken with respect to the input only).

    Args:
        model: the network, on ``pixels``' device.
        layers: its layers, as ``capture.discover`` describes them.
        pixels: (K, 3, H, W), row k the input of ``units[k]``.
        units: positions in the channel's map (``Unit.whole``: the whole map).
        method: ``deconvnet``, ``guided`` or ``gradient``.
        batch_size: units per forward + backward pass.

    Returns:
        The projections (K, 3, H, W) float32, the values projected (K,) (a whole map's maximum) and
        each row's maximum of the channel (K,), all on the CPU.

    Raises:
        ModelError: the map is not produced, not connected to the input, or the backward pass fails.
    """
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    out = np.zeros(tuple(pixels.shape), dtype=np.float32)
    values = np.zeros(len(units), dtype=np.float32)
    maxima = np.zeros(len(units), dtype=np.float32)
    for start in range(0, len(units), batch_size):
        check(stop_requested)
        rows = slice(start, min(start + batch_size, len(units)))
        grad, values[rows], maxima[rows] = _project_batch(
            model, layers, layer, channel, pixels[rows], units[rows], method
        )
        out[rows] = grad
    return out, values, maxima


def _project_batch(
    model: nn.Module, layers: dict[str, LayerInfo], layer: str, channel: int, pixels: torch.Tensor,
    units: Sequence[Unit], method: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    x = pixels.detach().clone().requires_grad_(True)
    rules = _BackwardRules(method)
    with torch.enable_grad(), rules, capture(model, layers, [layer]) as run:
        maps = run(x)
    held = maps[layer].a if maps[layer].a is not None else maps[layer].z
    assert held is not None, "capture checks that every wanted map was produced"
    a = rules.graph_of(held)
    del rules
    if a is None or not a.requires_grad:
        raise ModelError(
            f"layer '{layer}': its map is not connected to the input by autograd (made by an op that "
            "PyTorch's function dispatch does not see, e.g. a custom C++ extension), so it cannot be projected"
        )
    order = channels_first_order(layers[layer].axes)  # (B, C, ...) views, whatever the maps' layout
    chosen = a.detach().permute(order)[:, channel]  # (B, H, W), (B, T) or (B,) for flat maps
    seed = torch.zeros_like(a)
    seeds = seed.permute(order)  # a view: writing it writes seed
    values, maxima = [], []
    for k, unit in enumerate(units):
        plane = chosen[k]
        maxima.append(float(plane.max()))
        if unit.whole:
            seeds[k, channel] = plane
            values.append(float(plane.max()))
        else:
            where = (unit.row, unit.col)[: plane.dim()]  # a token or position of a 1-D map: (index, 0)
            seeds[(k, channel, *where)] = plane[where]
            values.append(float(plane[where]))
    try:
        (grad,) = torch.autograd.grad(a, x, seed, allow_unused=True)
    except RuntimeError as exc:  # e.g. an in-place op changed a value the ordinary backward needs
        raise ModelError(f"layer '{layer}': the backward pass fails: {first_line(exc)}") from None
    projected = np.zeros(tuple(x.shape), dtype=np.float32) if grad is None else grad.detach().cpu().numpy()
    return projected, np.asarray(values, dtype=np.float32), np.asarray(maxima, dtype=np.float32)


# ---------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class _Source:
    """What the source file gives a projection: the layer, the units and their images."""

    attrs: dict[str, str]  # root attributes read as text (model_source, weights_sha256, ...)
    geometry: Geometry
    units: list[Unit]
    paths: list[str]  # per unit, as stored
    pixels: np.ndarray  # (K, 3, H, W) float32, each unit's image as fed to the network
    stored_max: np.ndarray  # (K,) the file's maximum of the channel on each unit's image
    scale: float  # the channel's largest maximum over the file


SOURCE_ATTRS = ("model_source", "model_spec", "weights_sha256", "preprocessing", "input_list_sha256",
                "working_directory")  # fmt: skip


def project(
    options: ProjectOptions,
    log: Callable[[str], None] = lambda message: None,
    stop_requested: StopRequested = lambda: None,
) -> ProjectResult:
    """Project the chosen units of ``options.file`` and write ``options.out``.

    Raises:
        UsageError: options that do not fit together or do not fit the file; an existing output.
        UnknownLayerError: the layer is not stored in the file.
        FmapFileError: the source is not a complete maps file.
        ModelError: the model cannot be loaded, its weights are not the file's, or it computes
            other maps than the file holds.
        FmapError: an image is missing or changed since extraction (and the file has no /input).
    """
    started = time.perf_counter()
    _check_options(options)
    check_target(options.out, options.overwrite, [options.file])
    source = _read_source(options)
    model = _load_model(options, source.attrs)
    device = resolve_device(options.device)
    height, width = source.pixels.shape[-2:]
    layers = describe_layers(model, (height, width), str(device))
    if options.layer not in layers:
        raise ModelError(f"model {model.name}: no layer '{options.layer}' (the file's model had one)")
    log(f"model {model.name} ({model.source}) on {device}: {options.method} projections of "
        f"{options.layer} channel {options.channel}, {len(source.units)} unit(s)")  # fmt: skip
    net = model.module.to(device)
    with full_float32():
        projected, values, maxima = project_units(
            net, layers, options.layer, options.channel, torch.from_numpy(source.pixels).to(device),
            source.units, options.method, options.batch_size, stop_requested,
        )  # fmt: skip
    _check_recomputed(options, source, maxima)
    if options.method != "gradient" and (values <= 0).any():
        log(f"note: {int((values <= 0).sum())} unit(s) have an activation <= 0, which {options.method} "
            "rectifies away: their projections are zero")  # fmt: skip
    check(stop_requested)
    projections = Projections(
        method=options.method,
        layer=options.layer,
        channel=options.channel,
        units="whole map" if options.units.whole_map else "unit",
        geometry=source.geometry,
        image=np.array([u.image for u in source.units], dtype=np.int64),
        path=source.paths,
        row=np.array([u.row for u in source.units], dtype=np.int64),
        col=np.array([u.col for u in source.units], dtype=np.int64),
        value=values,
        projection=projected,
        input=source.pixels,
    )
    write_projections(options.out, projections, _root_attrs(options, model, device, source), options.overwrite)
    return ProjectResult(options.out, options.method, options.layer, options.channel, source.units,
                         [float(v) for v in values], str(device), time.perf_counter() - started)  # fmt: skip


def _check_options(options: ProjectOptions) -> None:
    choice = options.units
    if options.method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {options.method!r}")
    if choice.top is not None and choice.image is not None:
        raise UsageError("--top K and --image choose the units differently; give one of them")
    if choice.unit is not None and choice.image is None:
        raise UsageError("--unit ROW,COL needs --image (the unit of which image?)")
    if choice.unit is not None and choice.whole_map:
        raise UsageError("--unit and --whole-map choose the units differently; give one of them")


def _read_source(options: ProjectOptions) -> _Source:
    choice, c = options.units, options.channel
    with reading(options.file) as f:
        group = layer_group(f, options.layer)
        check_channel(group, c)
        try:
            geometry = Geometry.of(group)
        except FmapError:  # an op whose geometry capture could not trace: pictures show whole images
            geometry = UNKNOWN_GEOMETRY
        stored = [0, *(int(n) for n in group.attrs["output_shape"])]  # N first, as the axes count
        shape = tuple(stored[i] for i in channels_first_order(layer_axes(group))[1:])  # (C, H, W), (C, T) or (C,)
        stats = layer_stats(group)
        image_max, argmax = stats.image_max[:, c], stats.image_argmax[:, c]
        if choice.image is not None:
            n = image_index(f, choice.image)
            row, col = choice.unit if choice.unit is not None else (int(argmax[n][0]), int(argmax[n][1]))
            _check_unit(options.layer, shape, row, col, choice.unit is not None)
            units = [Unit(n, row, col)]
        else:
            order = top_images(image_max, choice.top or DEFAULT_TOP)
            units = [Unit(int(n), *(int(v) for v in argmax[n])) for n in order]
        if choice.whole_map:
            units = [Unit(u.image) for u in units]
        paths = f[schema.IMAGES]["path"].asstr()
        return _Source(
            attrs={name: _text(f.attrs.get(name, "")) for name in SOURCE_ATTRS},
            geometry=geometry,
            units=units,
            paths=[str(paths[u.image]) for u in units],
            pixels=np.stack([input_tensor(f, u.image) for u in units]).astype(np.float32),
            stored_max=np.array([image_max[u.image] for u in units], dtype=np.float32),
            scale=float(np.nanmax(np.abs(image_max), initial=0.0)),
        )


def _check_unit(layer: str, shape: tuple[int, ...], row: int, col: int, given: bool) -> None:
    if len(shape) < 2:
        if given:
            raise UsageError(f"--unit: layer '{printable(layer)}' has flat maps (no rows and columns)")
        return
    if len(shape) == 2:  # a sequence (tokens T, or L): its units are (index, 0), as image_argmax stores them
        if not (0 <= row < shape[1] and col == 0):
            raise UsageError(
                f"--unit {row},{col} out of range: layer '{printable(layer)}' maps are sequences of {shape[1]} "
                f"positions (give INDEX,0 with INDEX 0..{shape[1] - 1})"
            )
        return
    if not (0 <= row < shape[1] and 0 <= col < shape[2]):
        raise UsageError(
            f"--unit {row},{col} out of range: layer '{printable(layer)}' maps are {shape[1]}x{shape[2]} "
            f"(rows 0..{shape[1] - 1}, columns 0..{shape[2] - 1})"
        )


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _located(path: str, working_directory: str) -> str:
    """``path`` as recorded, or relative to where the recording run worked when it is not found here."""
    if path and not Path(path).is_absolute() and not Path(path).exists() and working_directory:
        beside = Path(working_directory) / path
        if beside.exists():
            return str(beside)
    return path


def _load_model(options: ProjectOptions, attrs: dict[str, str]) -> LoadedModel:
    """The model that made the file: the recorded spec, built-in or .pt2, or --model (needed for Python
    factories and libraries: fmap runs code only when named on the command line).

    Raises:
        UsageError: the file's model is Python code and no --model was given, or --weights or
            --model-arg without --model.
        ModelError: it cannot be loaded, or its weights' SHA-256 is not the file's.
    """
    recorded, where = attrs["model_source"], attrs["working_directory"]
    try:
        spec = json.loads(attrs["model_spec"] or "{}")
    except json.JSONDecodeError:
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    if options.model is None:
        if options.weights is not None or options.model_args:
            raise UsageError("--weights and --model-arg go with --model")
        if recorded.startswith("builtin:"):
            name = recorded.removeprefix("builtin:")
        elif recorded.lower().endswith((".toml", ".json", ".pt2")):
            name = _located(recorded, where)
        else:
            raise UsageError(
                f"{printable(str(options.file))} was made with --model {printable(recorded)}, which is Python code: "
                "fmap runs it only when you name it; pass --model (with --weights/--model-arg as at extraction)"
            )
        loaded = load_model(name)
    else:
        same = options.model == recorded  # defaults from the file for the model that made it
        args = options.model_args or (spec.get("model_args") or {} if same else {})
        weights = options.weights
        if weights is None and same and isinstance(spec.get("weights"), str):
            weights = spec["weights"] if spec["weights"] == "pretrained" else _located(spec["weights"], where)
        loaded = load_model(options.model, weights, args)
    if loaded.weights_sha256 != attrs["weights_sha256"]:
        raise ModelError(
            f"model {printable(loaded.source)}: weights SHA-256 {loaded.weights_sha256} is not the "
            f"{printable(attrs['weights_sha256'])} of {printable(str(options.file))}'s model; give the model "
            "and weights that made the file"
        )
    return loaded


def _check_recomputed(options: ProjectOptions, source: _Source, maxima: np.ndarray) -> None:
    """Each image's recomputed maximum of the channel must be the file's: else the model runs other
    code than the one that made the file (its arguments, its preprocessing)."""
    for unit, path, got, stored in zip(source.units, source.paths, maxima, source.stored_max, strict=True):
        if not np.isfinite(stored):
            continue
        tolerance = RTOL * max(abs(float(got)), abs(float(stored))) + SCALE_TOL * source.scale + 1e-7
        if abs(float(got) - float(stored)) > tolerance:
            raise ModelError(
                f"layer '{printable(options.layer)}' channel {options.channel} on image {unit.image} "
                f"({printable(path)}): the model computes a maximum of {float(got):.6g} where "
                f"{printable(str(options.file))} holds {float(stored):.6g}; the model, its arguments or the "
                "preprocessing are not those that made the file"
            )


def _root_attrs(options: ProjectOptions, model: LoadedModel, device: torch.device, source: _Source) -> dict[str, Any]:
    """The root attributes of the projection file (see ``schema.PROJECTION_SCHEMA``)."""
    return {
        "command": options.command,
        "working_directory": str(Path.cwd()),
        "torch_version": torch.__version__,
        "device": str(device),
        "memory_format": "contiguous",
        "model_name": model.name,
        "model_source": model.source,
        "model_spec": model.description,
        "weights_sha256": model.weights_sha256,
        "preprocessing": source.attrs["preprocessing"],
        "source_file": str(options.file),
        "source_input_list_sha256": source.attrs["input_list_sha256"],
    }
