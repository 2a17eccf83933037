"""The extraction pipeline: paths -> decoded images -> tensors -> forward with capture -> HDF5.

This is the only module that knows every stage; each stage lives in its own module.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import schema
from .capture import Tap, capture
from .errors import StoppedError, UnknownLayerError, UsageError
from .images import Preprocessing, check_image, load_batch
from .models import load_model
from .spec import LayerGeometry, LayerSpec, ModelSpec, geometry, load_spec
from .verify import verify_pairs
from .writer import LayerRecord, MapWriter


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``fmap extract`` can be asked to do."""

    images: Sequence[str]
    out: Path
    model: str | None = None  # built-in name or spec path; None = the default model
    layers: Sequence[str] | None = None  # None = every layer with a nonlinearity
    batch_size: int = 16
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    save_input: bool = False
    overwrite: bool = False
    size: tuple[int, int] | None = None  # overrides the spec's input size
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


def select_layers(spec: ModelSpec, names: Sequence[str] | None) -> list[LayerSpec]:
    """The requested layers in forward order; None selects every layer with a nonlinearity.

    Raises:
        UnknownLayerError: a name is not in the model; lists the names and suggests the closest.
    """
    available = [layer.name for layer in spec.layers]
    if names is None:
        chosen = [layer for layer in spec.layers if layer.has_activation]
        if not chosen:
            raise UnknownLayerError(f"model '{spec.name}' has no layer with a nonlinearity; name layers with --layers")
        return chosen
    for name in names:
        if name not in available:
            hint = difflib.get_close_matches(name, available, n=1)
            extra = f"did you mean '{hint[0]}'? " if hint else ""
            raise UnknownLayerError(
                f"--layers: no layer '{name}' in model '{spec.name}'; {extra}available: {', '.join(available)}"
            )
    wanted = set(names)
    return [layer for layer in spec.layers if layer.name in wanted]


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
    return device


def layer_records(spec: ModelSpec, geo: Sequence[LayerGeometry], chosen: Sequence[LayerSpec]) -> list[LayerRecord]:
    """The per-layer metadata the file records, for the chosen layers.

    A layer's ``input`` is the nearest stored dataset upstream (or the image tensor) and
    ``input_via`` the unstored layers in between, so the provenance never names a missing dataset.
    """
    stored = {layer.name for layer in chosen}
    records = []
    source, via = schema.INPUT, []
    for layer, g in zip(spec.layers, geo, strict=True):
        if layer.name in stored:
            hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in layer.params.items()}
            if layer.activation == "leaky_relu":
                hyper["negative_slope"] = layer.negative_slope
            records.append(
                LayerRecord(
                    name=layer.name,
                    type=layer.type,
                    hyperparameters=hyper,
                    input=source,
                    input_via=" -> ".join(via),
                    nonlinearity=layer.activation,
                    output_shape=g.output_shape,
                    receptive_field=g.receptive_field,
                    receptive_field_stride=g.stride,
                    receptive_field_start=g.start,
                    channel_descriptions=layer.channel_descriptions,
                )
            )
            role = schema.ACTIVATION if layer.has_activation else schema.PREACTIVATION
            source, via = f"/{schema.LAYERS}/{layer.name}/{role}", []
        else:
            via.append(layer.name)
    return records


def preprocessing_for(spec: ModelSpec, size: tuple[int, int] | None, no_resize: bool) -> Preprocessing:
    """The preprocessing for ``spec``, with --size / --no-resize applied."""
    if no_resize and size is not None:
        raise UsageError("--size and --no-resize cannot be used together")
    crop = None if no_resize else (size or spec.input.size)
    resize = spec.input.resize if size is None else None  # --size replaces the spec's resize rule
    return Preprocessing(crop, spec.input.mean, spec.input.std, resize, spec.input.background)


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
        FmapError: bad model spec, weights, layer names, images or output path.
        StoppedError: ``stop_requested`` returned a signal number.
    """
    started = time.perf_counter()
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if options.out.exists() and not options.overwrite:
        raise UsageError(f"{options.out}: already exists; pass --overwrite to replace it")
    spec = load_spec(options.model)
    chosen = select_layers(spec, options.layers)
    device = resolve_device(options.device)
    prep = preprocessing_for(spec, options.size, options.no_resize)
    if prep.size is not None:
        geometry(spec, prep.size)  # fail on a too-small --size before touching any image
    for path in options.images:  # header-only check: fail before any compute
        check_image(path)
    loaded = load_model(spec)
    net = loaded.module.to(device)
    taps = [
        Tap(layer.name, layer.name, f"activations.{layer.name}" if layer.has_activation else None) for layer in chosen
    ]
    attrs = {
        "torch_version": torch.__version__,
        "command": options.command,
        "device": str(device),
        "model_name": spec.name,
        "model_source": spec.source,
        "model_spec": json.dumps(spec.to_dict(), ensure_ascii=True),
        "weights_sha256": loaded.weights_sha256,
        "preprocessing": json.dumps(prep.describe(), ensure_ascii=True),
    }
    log(f"model {spec.name} ({spec.source}) on {device}; layers {', '.join(t.layer for t in taps)}")
    writer: MapWriter | None = None
    verified = 0
    with ExitStack() as stack:
        stack.enter_context(_full_float32())
        run = stack.enter_context(capture(net, taps, clone=False))  # SpecNet has no in-place ops
        for start in range(0, len(options.images), options.batch_size):
            _check(stop_requested)
            batch = load_batch(options.images[start : start + options.batch_size], prep)
            if writer is None:
                size = (batch.pixels.shape[2], batch.pixels.shape[3])
                geo = geometry(spec, size)
                writer = MapWriter(
                    out=options.out,
                    layers=layer_records(spec, geo, chosen),
                    attrs=attrs,
                    input_shape=(3, *size) if options.save_input else None,
                    overwrite=options.overwrite,
                )
                stack.enter_context(writer)
            elif batch.pixels.shape[1:] != (3, *size):
                raise UsageError(
                    f"{batch.paths[0]}: size differs from {options.images[0]}; --no-resize needs images of equal size"
                )
            x = torch.from_numpy(batch.pixels).to(device)  # (N, 3, H, W)
            maps = run(x)
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
            verified = verify_pairs(writer.file())
            log(f"verified a == f(z) on {verified} values")
            _check(stop_requested)
    return ExtractResult(
        out=options.out,
        n_images=len(options.images),
        layers=[t.layer for t in taps],
        device=str(device),
        seconds=time.perf_counter() - started,
        values_verified=verified,
    )


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


def _host(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()
