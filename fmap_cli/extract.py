"""The extraction pipeline: paths -> decoded images -> tensors -> forward with capture -> HDF5.

This is the only module that knows every stage; each stage lives in its own module.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import schema
from .capture import LayerInfo, capture, discover
from .errors import (
    ImageError,
    ModelError,
    SpecError,
    StoppedError,
    UnknownLayerError,
    UsageError,
    did_you_mean,
    first_line,
)
from .images import Preprocessing, check_image, load_batch
from .models import LoadedModel, load_model
from .spec import InputSpec, ModelSpec, geometry
from .verify import verify_pairs
from .writer import LayerRecord, MapWriter


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``fmap extract`` can be asked to do."""

    images: Sequence[str]
    out: Path
    model: str | None = None  # see models.load_model; None = the default built-in model
    weights: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    layers: Sequence[str] | None = None  # names or globs; None = every linear layer paired with a nonlinearity
    batch_size: int = 16
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    save_input: bool = False
    overwrite: bool = False
    size: tuple[int, int] | None = None  # overrides the model's input size
    no_resize: bool = False
    verify: bool = False
    command: str = ""


@dataclass(frozen=True)
class ExtractResult:
    """What a finished extraction wrote."""

    out: Path
    n_images: int
    layers: list[str]
    device: str
    seconds: float
    values_verified: int


def select_layers(layers: dict[str, LayerInfo], requested: Sequence[str] | None, model: LoadedModel) -> list[str]:
    """Names of the layers to store, in forward order.

    ``requested`` holds names or shell-style globs (``layer*.*.conv2``); None selects every
    linear layer (conv, linear) that is paired with a nonlinearity.

    Raises:
        UnknownLayerError: a name or glob matches nothing; lists names and suggests the closest.
    """
    selectable = [name for name in layers if model.selectable is None or name in model.selectable]
    if requested is None:
        chosen = [n for n in selectable if layers[n].kind == "linear" and layers[n].nonlinearity != "none"]
        if not chosen:
            raise UnknownLayerError(
                f"model '{model.name}' has no conv/linear layer followed by a nonlinearity; name layers with --layers"
            )
        return chosen
    wanted: set[str] = set()
    for pattern in requested:
        matches = fnmatch.filter(selectable, pattern) if any(c in pattern for c in "*?[") else [pattern]
        matches = [m for m in matches if m in layers and m in selectable]
        if not matches:
            extra = did_you_mean(pattern, selectable)
            shown = ", ".join(selectable[:30]) + (", ..." if len(selectable) > 30 else "")
            raise UnknownLayerError(
                f"--layers: no layer '{pattern}' in model '{model.name}'; {extra}available: {shown} "
                f"(run 'fmap layers --model {model.source}' for the full list)"
            )
        wanted.update(matches)
    return [name for name in selectable if name in wanted]


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


def provenance(layers: dict[str, LayerInfo], name: str, stored: set[str]) -> tuple[str, str]:
    """(input, input_via): the nearest stored dataset (or 'input') upstream of a layer, and the
    unstored layers between them."""
    via: list[str] = []
    tags = layers[name].input_tags
    while tags:
        for layer, role in reversed(tags):
            if layer == "input":
                return schema.INPUT, " -> ".join(via)
            if layer in stored:
                dataset = schema.ACTIVATION if role == "activation" else schema.PREACTIVATION
                return f"/{schema.LAYERS}/{layer}/{dataset}", " -> ".join(via)
        producer = tags[-1][0]
        via.insert(0, producer)
        tags = layers[producer].input_tags if producer in layers else []
    return "unknown", " -> ".join(via)


def layer_records(model: LoadedModel, layers: dict[str, LayerInfo], names: Sequence[str]) -> list[LayerRecord]:
    """The per-layer metadata the file records, for the chosen layers."""
    stored = set(names)
    visible = set(model.selectable) if model.selectable is not None else set(layers)
    records = []
    for name in names:
        info = layers[name]
        source, via = provenance(layers, name, stored)
        via = " -> ".join(v for v in via.split(" -> ") if v in visible) if via else ""
        if model.spec is not None:
            layer = model.spec.layer(name)
            layer_type = layer.type
            hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in layer.params.items()}
            descriptions = layer.channel_descriptions
        else:
            layer_type, hyper, descriptions = info.type, info.hyperparameters, ()
        records.append(
            LayerRecord(
                name=name,
                type=layer_type,
                hyperparameters=hyper,
                input=source,
                input_via=via,
                nonlinearity=info.nonlinearity,
                nonlinearity_params=info.nonlinearity_params,
                path_to_activation=" -> ".join(info.path_to_activation),
                a_is_f_of_z=info.a_is_f_of_z,
                output_shape=info.output_shape,
                receptive_field=info.receptive_field,
                receptive_field_stride=info.stride,
                receptive_field_start=info.start,
                channel_descriptions=descriptions,
            )
        )
    return records


def preprocessing_for(spec: InputSpec, size: tuple[int, int] | None, no_resize: bool) -> Preprocessing:
    """The preprocessing for a model's input spec, with --size / --no-resize applied."""
    if no_resize and size is not None:
        raise UsageError("--size and --no-resize cannot be used together")
    crop = None if no_resize else (size or spec.size)
    resize = spec.resize if size is None else None  # --size replaces the model's resize rule
    return Preprocessing(crop, spec.mean, spec.std, resize, spec.background)


def describe_layers(
    model: LoadedModel, size: tuple[int, int] | None = None, device: str = "cpu", size_flag: bool = False
) -> dict[str, LayerInfo]:
    """Every layer of a model (see ``LoadedModel.selectable`` for those users may pick), from one
    forward pass of a blank image of ``size``.

    Raises:
        ModelError: the model cannot run on that size (a UsageError naming --size if
            ``size_flag``: the size came from the command line).
    """
    h, w = size or model.input.size
    try:
        if model.spec is not None:
            _check_spec_size(model.spec, (h, w))
        target = resolve_device(device)
        try:
            layers = discover(model.module.to(target), torch.zeros(1, 3, h, w, device=target))
        except Exception as exc:  # the model's own code: any error is the model's
            raise ModelError(
                f"model {model.name}: the forward pass fails on a {h}x{w} image ({first_line(exc)})"
            ) from None
    except ModelError as exc:
        if size_flag:
            raise UsageError(f"--size {h},{w}: {exc}") from None
        raise
    for layer in model.spec.layers if model.spec is not None else ():  # spec models speak the spec's type names
        layers[layer.name].type = layer.type
    return layers


def _check_spec_size(spec: ModelSpec, size: tuple[int, int]) -> None:
    """Every layer fits at ``size``, and linear layers get the number of inputs they were built for."""
    at_size, native = geometry(spec, size), geometry(spec)
    for layer, got, built in zip(spec.layers, at_size, native, strict=True):
        if layer.type == "linear" and got.input_shape != built.input_shape:
            raise SpecError(
                f"{spec.source}: layer '{layer.name}' needs {built.input_shape[0]} inputs (input size "
                f"{spec.input.size[0]}x{spec.input.size[1]}) but gets {got.input_shape[0]} at {size[0]}x{size[1]}"
            )


def check_output(out: Path, overwrite: bool, images: Sequence[str]) -> None:
    """Refuse an output that exists (without --overwrite), sits in a missing or read-only
    directory, or is one of the input images."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: already exists; pass --overwrite to replace it")
    if out.is_dir():
        raise UsageError(f"-o {out}: is a directory; give a file name")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"-o {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"-o {out}: directory {parent} is not writable")
    target = out.resolve()
    for image in images:
        if Path(image).resolve() == target:
            raise UsageError(f"-o {out}: is also an input image; choose another output name")


def extract(
    options: ExtractOptions,
    log: Callable[[str], None] = lambda message: None,
    stop_requested: Callable[[], int | None] = lambda: None,
) -> ExtractResult:
    """Run the whole pipeline and write ``options.out``; on any error nothing is left at OUT.

    Args:
        options: what to extract.
        log: receives progress messages.
        stop_requested: polled between batches; a signal number stops the run cleanly. Signal
            handlers set it instead of raising, because an exception raised asynchronously can
            be swallowed (inside a weakref callback) or land mid-cleanup.

    Raises:
        FmapError: bad model, weights, layer names, images or output path.
        StoppedError: ``stop_requested`` returned a signal number.
    """
    started = time.perf_counter()
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    check_output(options.out, options.overwrite, options.images)
    device = resolve_device(options.device)
    model = load_model(options.model, options.weights, options.model_args)
    prep = preprocessing_for(model.input, options.size, options.no_resize)
    layers = None
    if prep.size is not None:  # a bad layer name or too small a size fails before any image is read
        layers = describe_layers(model, prep.size, str(device), size_flag=options.size is not None)
        select_layers(layers, options.layers, model)
    sizes = [check_image(path) for path in options.images]  # headers only: fail before any compute
    if options.no_resize and len(set(sizes)) > 1:
        odd = next(i for i, hw in enumerate(sizes) if hw != sizes[0])
        raise ImageError(
            f"{options.images[odd]}: size {sizes[odd][0]}x{sizes[odd][1]} differs from {options.images[0]} "
            f"({sizes[0][0]}x{sizes[0][1]}); --no-resize needs images of equal size"
        )
    net = model.module.to(device)
    attrs = {
        "torch_version": torch.__version__,
        "command": options.command,
        "device": str(device),
        "model_name": model.name,
        "model_source": model.source,
        "model_spec": json.dumps(model.description, ensure_ascii=True),
        "weights_sha256": model.weights_sha256,
        "preprocessing": json.dumps(prep.describe(), ensure_ascii=True),
        "input_list_sha256": input_list_sha256(options.images),
        "n_inputs": np.int64(len(options.images)),
    }
    writer: MapWriter | None = None
    verified = 0
    size: tuple[int, int] = (0, 0)
    with ExitStack() as stack:
        stack.enter_context(_full_float32())
        for start in range(0, len(options.images), options.batch_size):
            _check(stop_requested)
            batch = load_batch(options.images[start : start + options.batch_size], prep)
            if writer is None:
                size = (batch.pixels.shape[2], batch.pixels.shape[3])
                layers = layers or describe_layers(model, size, str(device))
                names = select_layers(layers, options.layers, model)
                log(f"model {model.name} ({model.source}) on {device}; layers {', '.join(names)}")
                run = stack.enter_context(capture(net, layers, names))
                writer = MapWriter(
                    out=options.out,
                    layers=layer_records(model, layers, names),
                    attrs=attrs,
                    input_shape=(3, *size) if options.save_input else None,
                    overwrite=options.overwrite,
                )
                stack.enter_context(writer)
            try:
                maps = run(torch.from_numpy(batch.pixels).to(device))  # (N, 3, H, W)
            except Exception as exc:  # the model's own code: any error is the model's
                raise ModelError(
                    f"model {model.name}: the forward pass fails on {batch.paths[0]} and the {len(batch.paths) - 1} "
                    f"images after it ({type(exc).__name__}: {first_line(exc)})"
                ) from None
            writer.append(
                batch.paths,
                batch.original_sizes,
                batch.sha256,
                {name: (_host(m.z), None if m.a is None else _host(m.a)) for name, m in maps.items()},
                pixels=batch.pixels if options.save_input else None,
            )
            log(f"{writer.n_images}/{len(options.images)} images")
            _check(stop_requested)
        if options.verify and writer is not None:
            report = verify_pairs(writer.file())
            verified = report.values
            log(f"verified a == f(z) on {report.values} values in {len(report.layers)} layers")
            for layer, why in report.skipped.items():
                log(f"  not re-checked: {layer} ({why})")
            _check(stop_requested)
    return ExtractResult(
        out=options.out,
        n_images=len(options.images),
        layers=[record.name for record in writer.layers] if writer else [],
        device=str(device),
        seconds=time.perf_counter() - started,
        values_verified=verified,
    )


def input_list_sha256(paths: Sequence[str]) -> str:
    """Fingerprint of an input list (one path a line, as given), shared by every shard of a job."""
    return hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


def _check(stop_requested: Callable[[], int | None]) -> None:
    signum = stop_requested()
    if signum is not None:
        raise StoppedError(signum)


@contextmanager
def _full_float32() -> Iterator[None]:
    """Turn TF32 off while extracting (restored after).

    PyTorch lets cuDNN convolutions use TF32 by default, which keeps ~3 significant digits:
    stored maps must be what a float32 forward pass computes.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _host(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu").numpy()
