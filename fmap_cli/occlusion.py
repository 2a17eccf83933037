"""Which part of the image a feature map needs (``fmap occlude``): Zeiler & Fergus's occlusion
sensitivity (ECCV 2014, section 4.2 and Fig. 7).

A square of one colour covers each part of the image in turn. At every position the covered copy
runs through the model, and the run records the total activation (the sum of a over the map) of
channels of a layer L and, when the model outputs class scores (N, K), the softmax probability of
a class and the top-1 label. The copies of one image go through the model ``--batch-size`` at a
time, so memory is O(batch). The forward pass is capture's own (``capture.capture``), which stops
right after L when no class scores are needed. Class scores need the whole network: when they are
the z of the last layer to run (a classifier's final linear layer, as a rule; checked on a blank
image), capture holds L's maps and them in one pass; otherwise capture's pass to L is followed by a
plain forward pass.

The stages are extract's: ``extract.plan`` checks the output, loads the model and reads every image
header; images are decoded ahead by the same threads; ``store.occlusion`` writes the file.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .capture import LayerMaps, capture
from .errors import FmapError, ImageError, ModelError, UnknownLayerError, UsageError, first_line
from .extract import (
    MEMORY_FORMATS,
    Continuation,
    ExtractOptions,
    Inputs,
    ModelChoice,
    Plan,
    decoded_batches,  # the decoding threads of extract, ahead of the model
    full_float32,  # TF32 off: the totals are what a float32 forward pass computes
    plan,
)
from .images import Failure, check_image
from .models import LoadedModel
from .stopping import StopRequested, check
from .store import schema
from .store.axes import channel_axis, channels_first_order
from .store.occlusion import OcclusionLayout, OcclusionRow, OcclusionWriter

FILLS = ("grey", "mean", "zero")
DEFAULT_STRIDE = 8
T = TypeVar("T")
STRONGEST, ALL = "strongest", "all"


@dataclass(frozen=True)
class Occluder:
    """The occluding square and where it goes."""

    patch: tuple[int, int] = (32, 32)  # (H, W) in input pixels
    stride: tuple[int, int] | None = None  # between neighbouring positions (H, W); None: DEFAULT_STRIDE or P
    fill: str = "grey"  # grey (0.5), mean (the normalisation mean), zero (black), or "R,G,B" (0-255)

    @property
    def steps(self) -> tuple[int, int]:
        """The stride, or by default DEFAULT_STRIDE (the patch size when the patch is smaller)."""
        if self.stride is not None:
            return self.stride
        return (min(DEFAULT_STRIDE, self.patch[0]), min(DEFAULT_STRIDE, self.patch[1]))


def fill_rgb(fill: str, mean: Sequence[float]) -> tuple[float, float, float]:
    """The occluder's colour as R, G, B in [0, 1] pixel space, before normalisation.

    >>> fill_rgb("grey", (0.485, 0.456, 0.406))
    (0.5, 0.5, 0.5)

    Raises:
        UsageError: not grey, mean, zero or three integers 0-255.
    """
    if fill == "grey":
        return (0.5, 0.5, 0.5)
    if fill == "mean":
        return (float(mean[0]), float(mean[1]), float(mean[2]))
    if fill == "zero":
        return (0.0, 0.0, 0.0)
    parts = fill.split(",")
    if len(parts) == 3 and all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        return (int(parts[0]) / 255, int(parts[1]) / 255, int(parts[2]) / 255)
    raise UsageError(f"--fill: expected grey, mean, zero or R,G,B (each 0-255), got {fill!r}")


def positions(size: int, patch: int, stride: int) -> np.ndarray:
    """Top-left corners along one axis: 0, S, 2S, ... up to size - P, plus size - P itself when the
    steps miss it, so every pixel is covered and the last square is flush with the edge.

    >>> positions(20, 8, 5).tolist()
    [0, 5, 10, 12]

    Raises:
        UsageError: the square is larger than the image.
    """
    if patch > size:
        raise UsageError(f"--patch {patch} is larger than the input ({size} pixels); give a smaller --patch")
    corners = list(range(0, size - patch + 1, stride))
    if corners[-1] != size - patch:
        corners.append(size - patch)
    return np.asarray(corners, dtype=np.int64)


@dataclass(frozen=True)
class OccludeOptions:
    """Everything ``fmap occlude`` can be asked to do."""

    inputs: Inputs
    out: Path
    model: ModelChoice = field(default_factory=ModelChoice)  # its ``layers`` is not used: see ``layer``
    layer: str | None = None  # L: record its channels' totals
    channels: Sequence[int] | str | None = None  # None: the strongest per image; "all"; or these channels
    target: int | None = None  # --class K; None: the unoccluded top-1 class of each image
    classes: bool = True  # record class maps when the model outputs class scores (--no-class: False)
    occluder: Occluder = field(default_factory=Occluder)
    overwrite: bool = False
    save_input: bool = False  # also store the unoccluded input tensor as /input
    command: str = ""  # recorded in the file


@dataclass(frozen=True)
class OccludeResult:
    """What a finished occlusion run wrote."""

    out: Path
    images_written: int
    failures: list[Failure]
    grid: tuple[int, int]  # occluder positions (rows, columns)
    layer: str | None
    classes: int  # K, or 0 without class maps
    device: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "output": str(self.out),
            "images_written": self.images_written,
            "images_failed": [{"index": f.index, "path": f.path, "reason": f.reason} for f in self.failures],
            "positions": self.grid[0] * self.grid[1],
            "grid": list(self.grid),
            "layer": self.layer,
            "classes": self.classes,
            "bytes": self.out.stat().st_size if self.out.exists() else 0,
            "device": self.device,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class _Work:
    """What every image of a run shares, decided before the first image is decoded."""

    planned: Plan
    layer: str | None
    role: str  # the map summed: activation, or preactivation when L has no nonlinearity
    channels: np.ndarray | None  # fixed channels (given or all); None: the strongest per image
    classes: int  # K, or 0 without class maps
    target: int | None
    y: np.ndarray  # (Gy,) top-left rows
    x: np.ndarray  # (Gx,)
    patch: tuple[int, int]  # (H, W) of the occluder
    fill: torch.Tensor  # (3,) the occluder in normalised input space, on the device
    scores_layer: str | None = None  # a layer whose z is the class scores: one capture pass gives both

    @property
    def n_channels(self) -> int:
        return 0 if self.layer is None else 1 if self.channels is None else len(self.channels)


def occlude(
    options: OccludeOptions,
    log: Callable[[str], None] = lambda message: None,
    stop_requested: StopRequested = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> OccludeResult:
    """Occlude every image at every position and write ``options.out``; on error nothing is left there.

    Raises:
        UsageError: options that do not fit together or do not fit the model or the images.
        FmapError: bad model, weights, layer name, images or output path; StoppedError: a signal.
    """
    started = time.perf_counter()
    _check_options(options)
    chosen = [options.layer] if options.layer is not None else ["*"]  # plan needs a layer; "*" selects any
    extract_options = ExtractOptions(
        inputs=options.inputs,
        out=options.out,
        model=replace(options.model, layers=chosen),
        continuation=Continuation(overwrite=options.overwrite),
        save_input=options.save_input,
        command=options.command,
    )
    try:
        planned = plan(extract_options, log)
    except UnknownLayerError as exc:  # plan speaks of extract's --layers
        raise UnknownLayerError(str(exc).replace("--layers:", "--layer:", 1)) from None
    if planned is None:  # an empty shard
        return OccludeResult(options.out, 0, [], (0, 0), options.layer, 0, "", time.perf_counter() - started)
    work = _work(options, planned)
    names = class_names(planned.model, work.classes) if work.classes else None
    layout = OcclusionLayout(
        work.y, work.x, work.n_channels, work.role, work.classes, names[0] if names else None,
        (3, *_input_size(planned)) if options.save_input else None,
    )  # fmt: skip
    _log_plan(options, work, names, log)
    written = _run(options, work, layout, _attrs(options, work, names), stop_requested, progress)
    failures = sorted([*planned.failures, *written[1]], key=lambda f: f.index)
    return OccludeResult(
        out=options.out,
        images_written=written[0],
        failures=failures,
        grid=(len(work.y), len(work.x)),
        layer=options.layer,
        classes=work.classes,
        device=str(planned.device),
        seconds=time.perf_counter() - started,
    )


def _check_options(options: OccludeOptions) -> None:
    if options.layer is None and options.channels is not None:
        raise UsageError("--channel needs --layer (which layer's channels?)")
    if not options.classes and options.target is not None:
        raise UsageError("--class and --no-class cannot be used together")
    if not options.classes and options.layer is None:
        raise UsageError("--no-class needs --layer: there would be nothing to record")
    patch, stride = options.occluder.patch, options.occluder.steps
    for flag, (h, w) in (("--patch", patch), ("--stride", stride)):
        if min(h, w) < 1:
            raise UsageError(f"{flag} must be at least 1 pixel, got {h}x{w}")
    for s, p in zip(stride, patch, strict=True):
        if s > p:
            raise UsageError(f"--stride {s} is larger than --patch {p}: pixels between positions would never be "
                             "covered; give a stride up to the patch size")  # fmt: skip
    fill_rgb(options.occluder.fill, (0.0, 0.0, 0.0))  # a bad --fill fails before the model loads


def _input_size(planned: Plan) -> tuple[int, int]:
    """(H, W) fed to the network: the preprocessing's, or with --no-resize the images' own."""
    return planned.prep.size or check_image(planned.todo[0][1])


def _work(options: OccludeOptions, planned: Plan) -> _Work:
    """Check the layer, channels, class and occluder against the model and the input size."""
    size = _input_size(planned)
    occluder = options.occluder
    y = positions(size[0], occluder.patch[0], occluder.steps[0])
    x = positions(size[1], occluder.patch[1], occluder.steps[1])
    layer, role, channels = None, schema.ACTIVATION, None
    if options.layer is not None:
        if len(planned.names) != 1:
            raise UsageError(
                f"--layer takes one layer; {options.layer!r} matches {len(planned.names)}: {', '.join(planned.names)}"
            )
        layer = planned.names[0]
        info = planned.layers[layer]
        role = schema.ACTIVATION if info.nonlinearity != "none" else schema.PREACTIVATION
        count = int(info.output_shape[channel_axis(info.axes) - 1])  # along the channel axis, wherever it is
        if options.channels == ALL:
            channels = np.arange(count, dtype=np.int64)
        elif options.channels is not None:
            channels = np.asarray(list(options.channels), dtype=np.int64)
            wrong = [int(c) for c in channels if not 0 <= c < count]
            if wrong:
                raise UsageError(f"--channel {wrong[0]} out of range: layer '{layer}' has channels 0..{count - 1}")
    blank = torch.zeros(1, 3, *size, device=planned.device)
    out = _plain_output(planned, blank) if options.classes else None
    classes = int(out.shape[1]) if out is not None and out.dim() == 2 and out.shape[1] >= 2 else 0
    if options.target is not None:
        if not classes:
            raise UsageError(
                f"--class {options.target}: model '{planned.model.name}' does not output class scores (N, K)"
            )
        if not 0 <= options.target < classes:
            raise UsageError(
                f"--class {options.target} out of range: model '{planned.model.name}' outputs {classes} class "
                f"scores (0..{classes - 1})"
            )
    if layer is None and not classes:
        raise UsageError(
            f"model '{planned.model.name}' does not output class scores (N, K); give --layer L to record "
            "the activity of a feature map (see 'fmap layers')"
        )
    prep = planned.prep
    rgb = torch.tensor(fill_rgb(occluder.fill, prep.mean), dtype=torch.float32)
    mean, std = torch.tensor(prep.mean, dtype=torch.float32), torch.tensor(prep.std, dtype=torch.float32)
    fill = ((rgb - mean) / std).to(planned.device)  # (3,) normalised, as the network sees it
    scores = _scores_layer(planned, layer, blank, out) if layer is not None and classes and out is not None else None
    return _Work(planned, layer, role, channels, classes, options.target, y, x, occluder.patch, fill, scores)


def _plain_output(planned: Plan, blank: torch.Tensor) -> torch.Tensor | None:
    """The model's own output for one blank image: a tensor, or None for anything else (a tuple, a dict)."""
    net = planned.model.module.to(planned.device)
    try:
        with torch.inference_mode():
            out = net(blank)
    except Exception as exc:  # the model's own code
        raise ModelError(f"model {planned.model.name}: the forward pass fails ({type(exc).__name__}: "
                         f"{first_line(exc)})") from None  # fmt: skip
    return out if isinstance(out, torch.Tensor) else None


def _scores_layer(planned: Plan, layer: str, blank: torch.Tensor, out: torch.Tensor) -> str | None:
    """The last layer to run when its z is the model's output (a classifier's final linear layer, as a
    rule): capturing it with L gives L's maps and the class scores in one pass. None otherwise (the
    output is computed after it): then each batch takes capture's pass to L and a plain forward pass."""
    last = next(reversed(planned.layers))
    net = planned.model.module.to(planned.device)
    try:
        with capture(net, planned.layers, list(dict.fromkeys([layer, last]))) as grab:
            z = grab(blank)[last].z
    except Exception:  # e.g. a last "layer" capture cannot hold alone: the two passes always work
        return None
    return last if z is not None and z.shape == out.shape and torch.equal(z, out) else None


def class_names(model: LoadedModel, count: int) -> tuple[list[str], str] | None:
    """The names of the ``count`` classes, and where they came from, when the model has them: the
    categories of a torchvision model's pretrained weights, timm's ImageNet label info for a
    pretrained timm model. None otherwise (own weights: their classes are the user's)."""
    library, _, name = str(model.description.get("source", "")).partition(":")
    if model.description.get("weights") != "pretrained" or library not in ("torchvision", "timm"):
        return None
    try:
        if library == "torchvision":
            weights = importlib.import_module("torchvision.models").get_model_weights(name).DEFAULT
            names, source = list(weights.meta["categories"]), f"torchvision weights {weights}: meta['categories']"
        else:
            data = importlib.import_module("timm.data")
            subset = data.infer_imagenet_subset(model.module)
            if subset is None:
                return None
            names = list(data.ImageNetInfo(subset).label_descriptions())
            source = f"timm ImageNetInfo('{subset}').label_descriptions()"
    except Exception:  # names are optional: a library without them, or another version's API
        return None
    if len(names) != count or not all(isinstance(n, str) for n in names):
        return None
    return names, source


def _attrs(options: OccludeOptions, work: _Work, names: tuple[list[str], str] | None) -> dict[str, Any]:
    """Root attributes: extract's (model, preprocessing, input list) and the occluder's."""
    occluder = options.occluder
    attrs: dict[str, Any] = {
        **work.planned.attrs,
        "patch": occluder.patch,
        "stride": occluder.steps,
        "fill": fill_rgb(occluder.fill, work.planned.prep.mean),
        "fill_name": occluder.fill,
    }
    if work.layer is not None:
        attrs["layer"] = work.layer
        attrs["channel_choice"] = STRONGEST if work.channels is None else ALL if options.channels == ALL else "given"
    if work.classes:
        attrs["n_classes"] = work.classes
        attrs["class_choice"] = "top1" if work.target is None else "given"
        if names is not None:
            attrs["class_names_source"] = names[1]
    return attrs


def _log_plan(
    options: OccludeOptions, work: _Work, names: tuple[list[str], str] | None, log: Callable[[str], None]
) -> None:
    planned, occluder = work.planned, options.occluder
    model = planned.model
    what = []
    if work.layer is not None:
        chosen = "the strongest per image" if work.channels is None else f"{len(work.channels)}"
        what.append(f"layer {work.layer} ({work.role}, channels: {chosen})")
    if work.classes:
        what.append(f"{work.classes} classes" + (" (names from the model)" if names else ""))
    passes = ""
    if work.layer is not None and not work.classes:
        passes = f"; forward passes stop after {work.layer}"
    elif work.layer is not None and work.scores_layer is not None:
        passes = f"; one pass per batch (the class scores are {work.scores_layer}'s z)"
    elif work.layer is not None:
        passes = f"; two passes per batch (to {work.layer}, then the whole network for the class scores)"
    log(
        f"model {model.name} ({model.source}) on {planned.device}; {len(work.y)}x{len(work.x)} occluder positions "
        f"({occluder.patch[0]}x{occluder.patch[1]}, stride {occluder.steps[0]}x{occluder.steps[1]}, "
        f"fill {occluder.fill}); {', '.join(what)}{passes}"
    )


def _run(
    options: OccludeOptions,
    work: _Work,
    layout: OcclusionLayout,
    attrs: dict[str, Any],
    stop_requested: StopRequested,
    progress: Callable[[int, int], None],
) -> tuple[int, list[Failure]]:
    """Decode, occlude and write every image; (images written, failures found while decoding)."""
    planned = work.planned
    net = planned.model.module.to(planned.device)
    failed: list[Failure] = []
    handled = len(planned.failures)  # header failures are handled already
    with ExitStack() as stack:
        stack.enter_context(full_float32())
        wanted = [name for name in (work.layer, work.scores_layer) if name is not None]
        grab = stack.enter_context(capture(net, planned.layers, list(dict.fromkeys(wanted)))) if wanted else None
        forward = _Forward(net, grab, work, options.inputs.batch_size, MEMORY_FORMATS[options.model.memory_format])
        writer = stack.enter_context(OcclusionWriter.create(options.out, layout, attrs, options.overwrite))
        writer.add_failures([(f.index, f.path, f.reason) for f in planned.failures])
        batches = stack.enter_context(decoded_batches(planned.todo, options.inputs, planned.prep, stop_requested))
        for batch, bad in batches:
            check(stop_requested)
            for i in range(0 if batch is None else len(batch.paths)):
                assert batch is not None
                row = forward.image(batch.pixels[i], batch.paths[i], stop_requested)
                writer.append(
                    replace(
                        row,
                        original_size=(int(batch.original_sizes[i][0]), int(batch.original_sizes[i][1])),
                        sha256=batch.sha256[i],
                        index=batch.indices[i],
                        pixels=batch.pixels[i] if options.save_input else None,
                    )
                )
                handled += 1
                progress(handled, planned.to_handle)
            writer.add_failures([(f.index, f.path, f.reason) for f in bad])
            failed.extend(bad)
            handled += len(bad)
            progress(handled, planned.to_handle)
        check(stop_requested)
        if writer.n_images == 0:
            reasons = "; ".join(f"{f.path}: {f.reason}" for f in [*planned.failures, *failed][:3])
            raise ImageError(f"no image could be read ({len(planned.failures) + len(failed)} failed: {reasons})")
        written = writer.n_images
    return written, failed


class _Forward:
    """The forward passes of one run: the unoccluded image, then its occluded copies in batches."""

    def __init__(
        self,
        net: torch.nn.Module,
        grab: Callable[[torch.Tensor], dict[str, LayerMaps]] | None,
        work: _Work,
        batch_size: int,
        memory_format: torch.memory_format,
    ) -> None:
        self.net, self.grab, self.work = net, grab, work
        self.batch_size = batch_size
        self.memory_format = memory_format
        ys, xs = np.meshgrid(work.y, work.x, indexing="ij")
        self.corners = np.stack([ys.ravel(), xs.ravel()], axis=1)  # (P, 2), row-major over (y, x)

    def image(self, pixels: np.ndarray, path: str, stop_requested: StopRequested) -> OcclusionRow:
        """Every occluder position on one image (``pixels``: (3, H, W), normalised)."""
        work = self.work
        x0 = torch.from_numpy(pixels).to(work.planned.device)[None]  # (1, 3, H, W)
        unoccluded = "without the occluder"
        grid, count = (len(work.y), len(work.x)), len(self.corners)
        row = OcclusionRow(path, (0, 0), "", -1)
        channels = np.zeros(0, dtype=np.int64)
        activity = np.empty((0, count), dtype=np.float64)
        totals, probabilities = self._pass(x0, path, unoccluded)  # (1, C), (1, K)
        if totals is not None:
            baseline = totals[0]  # (C,)
            # the channels asked for, or this image's strongest (the first on ties)
            channels = work.channels if work.channels is not None else np.asarray([np.argmax(baseline)])
            activity = np.empty((len(channels), count), dtype=np.float64)
            row = replace(row, channel=channels, baseline=baseline[channels].astype(np.float32))
        chance = np.empty(count, dtype=np.float64)
        label = np.empty(count, dtype=np.int64)
        target = -1
        if probabilities is not None:
            top = int(np.argmax(probabilities[0]))
            target = top if work.target is None else work.target
            row = replace(row, target=target, target_probability=float(probabilities[0, target]), top_class=top)
        for start in range(0, count, self.batch_size):
            check(stop_requested)
            corners = self.corners[start : start + self.batch_size]
            x = self._occluded(x0, corners)  # (b, 3, H, W)
            where = f"with the occluder at y={corners[0][0]}, x={corners[0][1]} and the {len(corners) - 1} after it"
            stop = start + len(corners)
            totals, p = self._pass(x, path, where)  # (b, C), (b, K)
            if totals is not None:
                activity[:, start:stop] = totals[:, channels].T
            if p is not None:
                chance[start:stop] = p[:, target]
                label[start:stop] = p.argmax(axis=1)
        if work.layer is not None:
            row = replace(row, activity=activity.reshape(len(channels), *grid).astype(np.float32))
        if work.classes:
            row = replace(row, probability=chance.reshape(grid).astype(np.float32), label=label.reshape(grid))
        return row

    def _occluded(self, x0: torch.Tensor, corners: np.ndarray) -> torch.Tensor:
        """Copies of ``x0`` (1, 3, H, W), each with the square at one of ``corners`` (b, 2)."""
        ph, pw = self.work.patch
        device = x0.device
        rows = torch.arange(x0.shape[2], device=device)
        cols = torch.arange(x0.shape[3], device=device)
        top = torch.as_tensor(corners[:, 0], device=device)[:, None]  # (b, 1)
        left = torch.as_tensor(corners[:, 1], device=device)[:, None]
        inside = ((rows >= top) & (rows < top + ph))[:, :, None] & ((cols >= left) & (cols < left + pw))[:, None, :]
        x = torch.where(inside[:, None], self.work.fill.view(1, 3, 1, 1), x0)  # (b, 3, H, W)
        return x.contiguous(memory_format=self.memory_format)

    def _pass(self, x: torch.Tensor, path: str, where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """For each copy in ``x``: the totals of L's channels (b, C) and the class probabilities (b, K),
        float64, each None when not recorded. One capture pass when the scores are a layer's z (or
        without class maps); else capture's pass to L, then the plain forward pass for the scores."""
        work, grab = self.work, self.grab
        maps = _guarded(lambda: grab(x), work, path, where) if grab is not None else {}
        totals = None
        if work.layer is not None:
            found = maps[work.layer]
            values = found.a if work.role == schema.ACTIVATION else found.z
            assert values is not None, "capture checks that the wanted maps exist"
            axes = work.planned.layers[work.layer].axes
            values = values.double().permute(channels_first_order(axes))  # (b, C, ...) whatever the layout
            totals = (values.flatten(2).sum(dim=2) if values.dim() > 2 else values).cpu().numpy()  # (b, C)
        if not work.classes:
            return totals, None
        if work.scores_layer is not None:
            scores = maps[work.scores_layer].z
            assert scores is not None, "capture checks that the wanted maps exist"
        else:
            scores = _guarded(lambda: self._plain(x), work, path, where)
        return totals, torch.softmax(scores.double(), dim=1).cpu().numpy()

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = self.net(x)
        return out


def _guarded(run: Callable[[], T], work: _Work, path: str, where: str) -> T:
    """``run()``, its failures as one-line errors naming the image and the occluder position."""
    try:
        return run()
    except torch.cuda.OutOfMemoryError:
        raise FmapError(
            f"{work.planned.device}: out of memory on {path} {where}; give a smaller --batch-size"
        ) from None
    except FmapError:
        raise
    except Exception as exc:  # the model's own code: any error is the model's
        raise ModelError(
            f"model {work.planned.model.name}: the forward pass fails on {path} {where} "
            f"({type(exc).__name__}: {first_line(exc)})"
        ) from None
