"""The extraction pipeline: paths -> decoded images -> tensors -> forward with capture -> HDF5.

This is the only module that knows every stage; each stage lives in its own module.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .capture import LayerMaps, capture, unshared
from .errors import (
    ImageError,
    ModelError,
    StoppedError,
    UsageError,
    first_line,
)
from .images import Failure, ImageBatch, Preprocessing, check_image, load_batch
from .inputs import Shard
from .layers import describe_layers, layer_records, select_layers
from .models import LoadedModel, load_model, resolve_device
from .pairing import LayerInfo
from .spec import InputSpec
from .stopping import StopRequested, check, wait
from .store.atomic import check_target, partial_files
from .store.continuation import appended_list_sha256, check_appendable, find_resumable, fingerprint
from .store.layout import Storage, encode_root
from .store.rows import Batch
from .store.writer import BackgroundWriter, MapWriter, Seed
from .verify import Verifier, host_values, verifying

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DECODE_AHEAD = 2  # batches decoded ahead of the model per worker thread (memory: O(batch), not O(images))


@dataclass(frozen=True)
class Inputs:
    """Which images a run reads, and how."""

    images: Sequence[str]  # the whole input list (directories already expanded), in order
    shard: Shard | None = None  # only this share of the list
    skip_bad: bool = False  # record unreadable images in /failures instead of stopping
    batch_size: int = 16
    workers: int = 2  # decoding threads ahead of the model


@dataclass(frozen=True)
class ModelChoice:
    """Which model runs, where, on what input size, and which of its layers are stored."""

    model: str | None = None  # see models.load_model; None = the default built-in model
    weights: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    layers: Sequence[str] | None = None  # names or globs; None = every linear layer paired with a nonlinearity
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    size: tuple[int, int] | None = None  # overrides the model's input size
    no_resize: bool = False
    # Each replaces the model's recipe (see models.load_model) when given.
    resize: int | None = None  # shorter side before the crop (an N x N box for crop modes squash, border)
    interpolation: str | None = None  # one of spec.INTERPOLATIONS
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # "contiguous": the batch is NCHW in C order, so every map equals the model's own forward on
    # /input bit for bit (CPU); "channels_last": faster convolutions on CPU, maps differ by float32 rounding
    memory_format: str = "contiguous"


@dataclass(frozen=True)
class Continuation:
    """How a run treats OUT and the runs before it."""

    overwrite: bool = False  # replace OUT
    resume: bool = False  # continue a killed run's temporary file
    append: bool = False  # add to the finished OUT


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``fmap extract`` can be asked to do."""

    inputs: Inputs
    out: Path
    model: ModelChoice = field(default_factory=ModelChoice)
    storage: Storage = field(default_factory=Storage)
    continuation: Continuation = field(default_factory=Continuation)
    save_input: bool = False  # also store the input tensor as /input
    verify: bool = False  # re-check a == f(z) before finishing
    command: str = ""  # recorded in the file


@dataclass(frozen=True)
class ExtractResult:
    """What a finished extraction wrote."""

    out: Path
    images_written: int  # by this run
    images_total: int  # in the file (more than written after --resume or --append)
    failures: list[Failure]
    layers: list[str]
    device: str
    seconds: float
    values_verified: int

    def to_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "output": str(self.out),
            "images_written": self.images_written,
            "images_in_file": self.images_total,
            "images_failed": [{"index": f.index, "path": f.path, "reason": f.reason} for f in self.failures],
            "layers": self.layers,
            "bytes": self.out.stat().st_size if self.out.exists() else 0,
            "device": self.device,
            "seconds": round(self.seconds, 3),
        }


def preprocessing_for(spec: InputSpec, choice: ModelChoice) -> Preprocessing:
    """The preprocessing for a model's input spec (its recipe), with --size, --no-resize, --resize,
    --interpolation, --mean and --std applied; the file records which of them replaced the recipe."""
    given = {
        "--size": choice.size,
        "--no-resize": choice.no_resize or None,
        "--resize": choice.resize,
        "--interpolation": choice.interpolation,
        "--mean": choice.mean,
        "--std": choice.std,
    }
    if choice.no_resize:
        clash = next((flag for flag in ("--size", "--resize", "--interpolation") if given[flag] is not None), None)
        if clash is not None:
            raise UsageError(f"{clash} and --no-resize cannot be used together")
    resize = spec.resize if choice.size is None else None  # --size replaces the model's resize rule
    mean, std = choice.mean or spec.mean, choice.std or spec.std
    # pixels in [0, 1] become (x - mean) / std in float32: past its range they would be inf, maps NaN
    widest = max((1 + abs(m)) / s for m, s in zip(mean, std, strict=True))
    if widest > FLOAT32_MAX:
        raise UsageError(
            f"--mean/--std: mean {_rgb(mean)} and std {_rgb(std)} would normalise pixels to {widest:.3g}, "
            f"beyond float32 ({FLOAT32_MAX:.3g}); give a larger --std"
        )
    return Preprocessing(
        size=None if choice.no_resize else (choice.size or spec.size),
        mean=mean,
        std=std,
        resize=choice.resize or resize,
        background=spec.background,
        interpolation=choice.interpolation or spec.interpolation,
        crop_mode=spec.crop_mode,
        recipe=spec.recipe,
        overridden=tuple(flag for flag, value in given.items() if value is not None),
    )


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _rgb(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class _Continued:
    """How this run relates to earlier ones: a new file, seeded (--resume, --append) or not."""

    seed: Seed | None = None  # a new file starts with the images already in this one
    overwrite: bool = False  # the new file may replace OUT
    handled: frozenset[int] = frozenset()  # input-list positions the seed already handled
    replaces: Path | None = None  # a killed run's temporary file, removed once seeded
    offset: int = 0  # added to input-list positions: images appended follow the file's earlier inputs
    earlier: list[Failure] = field(default_factory=list)  # failures the resumed run already recorded
    done_before: bool = False  # this --append already added its images: nothing to do


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before any image is decoded or anything is written."""

    options: ExtractOptions
    model: LoadedModel
    device: torch.device
    prep: Preprocessing
    layers: dict[str, LayerInfo]  # every layer found in the model
    names: list[str]  # the stored ones, in forward order
    todo: list[tuple[int, str]]  # (position in the input list, path) still to decode
    failures: list[Failure]  # found from headers, not yet recorded
    attrs: dict[str, Any]  # root attributes of the file
    continued: _Continued
    input_shape: tuple[int, int, int] | None  # (3, H, W) with --save-input
    to_handle: int  # images this run is given (its share), for progress


def plan(options: ExtractOptions, log: Callable[[str], None] = lambda message: None) -> Plan | None:
    """Check everything a run needs (output, model, layers, image headers, earlier runs) without
    decoding an image or writing anything; None when this shard of the input list is empty.

    Raises:
        FmapError: bad model, weights, layer names, images, output path or continuation.
    """
    inputs, choice, continuation = options.inputs, options.model, options.continuation
    _check_modes(options)
    if not continuation.append:
        check_target(options.out, continuation.overwrite or continuation.resume, inputs.images)
    device = resolve_device(choice.device)
    model = load_model(choice.model, choice.weights, choice.model_args)
    prep = preprocessing_for(model.input, choice)
    layers = None
    if prep.size is not None:  # a bad layer name or too small a size fails before any image is read
        layers = describe_layers(model, prep.size, str(device), size_flag=choice.size is not None)
        select_layers(layers, choice.layers, model)
    work = inputs.shard.select(inputs.images) if inputs.shard else list(enumerate(inputs.images))
    if not work:
        _empty_shard(options, log)
        return None
    good, failures, sizes = _check_headers(work, options)
    size = prep.size or sizes[good[0][0]]
    layers = layers or describe_layers(model, size, str(device))
    names = select_layers(layers, choice.layers, model)
    attrs = _root_attrs(options, model, prep, device)
    stored = encode_root({**attrs, "layers": names, "storage": options.storage.describe()})
    ours = fingerprint(stored, options.save_input)
    continued = _continuation(options, ours, work, attrs, log)
    if continued.handled:  # by the run being resumed: neither decoded again nor recorded again
        good = [item for item in good if item[0] not in continued.handled]
        failures = [f for f in failures if f.index not in continued.handled]
    if continued.offset:
        good = [(index + continued.offset, path) for index, path in good]
        failures = [Failure(f.index + continued.offset, f.path, f.reason) for f in failures]
    input_shape = (3, *size) if options.save_input else None
    return Plan(options, model, device, prep, layers, names, good, failures, attrs, continued, input_shape, len(work))


def _empty_shard(options: ExtractOptions, log: Callable[[str], None]) -> None:
    """More array tasks than inputs: this one has nothing to do, which is no error."""
    shard = options.inputs.shard
    assert shard is not None, "only a shard can be empty"
    log(
        f"shard {shard.index}/{shard.count} (from --shard or SLURM_ARRAY_*) of {len(options.inputs.images)} "
        "input(s) is empty: nothing to write; fmap merge does not expect it"
    )
    if options.continuation.overwrite and options.out.is_file():
        options.out.unlink()  # --overwrite: an older file there would be mistaken for this job's shard
        log(f"removed the older {options.out} (--overwrite)")


def _root_attrs(
    options: ExtractOptions, model: LoadedModel, prep: Preprocessing, device: torch.device
) -> dict[str, Any]:
    """The root attributes this run records (see the schema)."""
    images = options.inputs.images
    list_sha256 = input_list_sha256(images)
    attrs: dict[str, Any] = {
        "torch_version": torch.__version__,
        "command": options.command,
        "working_directory": str(Path.cwd()),  # relative image paths are relative to it
        "device": str(device),
        "memory_format": options.model.memory_format,
        "model_name": model.name,
        "model_source": model.source,
        "model_spec": model.description,
        "weights_sha256": model.weights_sha256,
        "preprocessing": prep.describe(),
        "input_list_sha256": list_sha256,
        "n_inputs": len(images),
        "input_lists": [{"sha256": list_sha256, "n_inputs": len(images)}],
    }
    shard = options.inputs.shard
    if shard:
        attrs["shard_index"], attrs["shard_count"] = shard.index, shard.count
    return attrs


def extract(
    options: ExtractOptions,
    log: Callable[[str], None] = lambda message: None,
    stop_requested: StopRequested = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> ExtractResult:
    """Run the whole pipeline and write ``options.out``; on any error nothing is left at OUT.

    Args:
        options: what to extract.
        log: receives messages for the user.
        stop_requested: polled between batches; a signal number stops the run cleanly. Signal
            handlers set it instead of raising, because an exception raised asynchronously can
            be swallowed (inside a weakref callback) or land mid-cleanup.
        progress: called with (images handled, images to handle) after every batch.

    Raises:
        FmapError: bad model, weights, layer names, images or output path.
        StoppedError: ``stop_requested`` returned a signal number.
    """
    started = time.perf_counter()
    planned = plan(options, log)
    if planned is None:
        return ExtractResult(options.out, 0, 0, [], [], "", time.perf_counter() - started, 0)
    if planned.continued.done_before:
        log(f"--append: these {len(options.inputs.images)} inputs were already appended to {options.out}; "
            "nothing to do")  # fmt: skip
        return ExtractResult(options.out, 0, 0, [], [], str(planned.device), time.perf_counter() - started, 0)
    return run(planned, log, stop_requested, progress, started)


def run(
    planned: Plan,
    log: Callable[[str], None] = lambda message: None,
    stop_requested: StopRequested = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    started: float | None = None,
) -> ExtractResult:
    """Carry out a :func:`plan`: decode, forward with capture, write (see :func:`extract`)."""
    started = time.perf_counter() if started is None else started
    options, model, continued = planned.options, planned.model, planned.continued
    stale = [p for p in partial_files(options.out) if p != continued.replaces]
    if stale:
        log(f"note: {len(stale)} temporary file(s) of earlier runs beside {options.out} are left as they are "
            f"({', '.join(p.name for p in stale[:3])}); --resume continues the newest, or delete them")  # fmt: skip
    log(f"model {model.name} ({model.source}) on {planned.device}; layers {', '.join(planned.names)}")
    memory_format = MEMORY_FORMATS[options.model.memory_format]  # of the batch: convolutions follow it
    net = model.module.to(planned.device)
    records = layer_records(model, planned.layers, planned.names)
    writer = MapWriter.create(options.out, records, planned.attrs, options.storage, planned.input_shape,
                              overwrite=continued.overwrite, seed=continued.seed)  # fmt: skip
    failures = list(planned.failures)
    try:
        verified = 0
        with ExitStack() as stack:
            stack.enter_context(full_float32())
            forward = stack.enter_context(capture(net, planned.layers, planned.names))
            stack.enter_context(writer)
            checker: Verifier | None = None
            if options.verify:  # every batch is checked as it is captured (verify.py)
                checker = stack.enter_context(verifying(net, planned.layers, planned.names, options.storage,
                                                        writer.file(), planned.device))  # fmt: skip
                forward = checker.wrap(forward)
            if continued.replaces is not None:  # its images are in the new temporary file now
                continued.replaces.unlink(missing_ok=True)
            with (
                BackgroundWriter(writer, stop_requested=stop_requested) as sink,
                decoded_batches(planned.todo, options.inputs, planned.prep, stop_requested) as batches,
            ):
                sink.add_failures([(f.index, f.path, f.reason) for f in failures])
                for batch, failed in batches:
                    check(stop_requested)
                    if batch is not None:
                        sink.append(_captured(forward, batch, model.name, (planned.device, memory_format),
                                              options.save_input))  # fmt: skip
                    sink.add_failures([(f.index, f.path, f.reason) for f in failed])
                    failures.extend(failed)
                    handled = planned.to_handle - len(planned.todo) + batches.handled  # resumed or failed: handled
                    progress(handled, planned.to_handle)
                    check(stop_requested)
            check(stop_requested)  # a signal that came while the writer thread finished its queue
            if writer.n_images == 0:
                raise ImageError(_nothing_written(failures))
            if checker is not None:
                verified = _verify(checker, writer, options.inputs.batch_size, log)
                check(stop_requested)
    except StoppedError as exc:
        raise StoppedError(exc.signum, _kept(writer, options)) from None
    return ExtractResult(
        out=options.out,
        images_written=writer.n_images - writer.already,
        images_total=writer.n_images,
        failures=sorted([*continued.earlier, *failures], key=lambda f: f.index),  # a resumed job reports them all
        layers=[record.name for record in writer.layers],
        device=str(planned.device),
        seconds=time.perf_counter() - started,
        values_verified=verified,
    )


def _captured(
    forward: Callable[[torch.Tensor], dict[str, LayerMaps]],
    batch: ImageBatch,
    model: str,
    placement: tuple[torch.device, torch.memory_format],
    save_input: bool,
) -> Batch:
    """One decoded batch through the model, as the writer's rows.

    Raises:
        ModelError: a stored layer's output does not have one row per image.
    """
    maps = unshared(_forward(forward, batch, model, placement))  # the writer thread reads them during the next batch
    n = len(batch.paths)
    for name, m in maps.items():
        rows = next(t.shape[0] for t in (m.z, m.a) if t is not None)
        if rows != n:  # e.g. Swin's window attention: windows folded into the batch axis
            raise ModelError(
                f"layer '{name}': its output has {rows} rows for {n} image(s) (the model folds other data, e.g. "
                "attention windows, into the batch axis); fmap stores one map per image: choose another layer"
            )
    return Batch(
        batch.paths,
        batch.original_sizes,
        batch.sha256,
        batch.indices,
        {name: (_host(m.z), _host(m.a)) for name, m in maps.items()},
        batch.pixels if save_input else None,
    )


def _verify(checker: Verifier, writer: MapWriter, batch_size: int, log: Callable[[str], None]) -> int:
    """--verify's last step, before the file is published: the file holds exactly what was checked."""
    report = checker.finish(writer.file(), batch_size)
    log(report.text())
    return report.values


def _kept(writer: MapWriter, options: ExtractOptions) -> str:
    """What an interrupted run leaves, and how to continue it."""
    if writer.appending:
        return f"{options.out} is unchanged; rerun the same command to append"
    if writer.n_images and writer.path.exists():
        return f"{writer.n_images} images kept in {writer.path}; rerun the same command with --resume to continue"
    return "no output written"


def _check_modes(options: ExtractOptions) -> None:
    continuation = options.continuation
    if options.inputs.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if continuation.resume and continuation.append:
        raise UsageError("--resume and --append cannot be used together")
    if continuation.append and (continuation.overwrite or options.inputs.shard):
        raise UsageError("--append cannot be combined with --overwrite or --shard")
    if not options.inputs.images:
        raise UsageError("no images to process (give paths, directories or --files-from)")


def _continuation(
    options: ExtractOptions,
    ours: dict[str, str],
    work: Sequence[tuple[int, str]],
    attrs: dict[str, Any],
    log: Callable[[str], None],
) -> _Continued:
    """What --resume / --append mean for this run (``attrs`` gets the grown input list when appending)."""
    continuation, list_sha256 = options.continuation, attrs["input_list_sha256"]
    overwrite = continuation.overwrite or continuation.resume
    if continuation.append:
        previous = check_appendable(options.out, ours, list_sha256)
        if previous.done_before:
            return _Continued(done_before=True)
        attrs["n_inputs"] = previous.n_inputs + len(options.inputs.images)
        attrs["input_list_sha256"] = appended_list_sha256(previous.list_sha256, list_sha256)
        attrs["input_lists"] = [*previous.input_lists, {"sha256": list_sha256, "n_inputs": len(options.inputs.images)}]
        return _Continued(seed=Seed(options.out, finished=True), overwrite=True, offset=previous.n_inputs)
    if continuation.resume:
        found = find_resumable(options.out, ours, list_sha256, work, log)
        if found is not None:
            seed = Seed(found.path, finished=False)
            return _Continued(seed, overwrite, found.handled, replaces=found.path, earlier=found.failures)
    return _Continued(overwrite=overwrite)


def _nothing_written(failures: Sequence[Failure]) -> str:
    reasons = "; ".join(f"{f.path}: {f.reason}" for f in failures[:3])
    return f"no image could be read ({len(failures)} failed: {reasons})"


def _forward(
    run: Callable[[torch.Tensor], dict[str, LayerMaps]],
    batch: ImageBatch,
    model: str,
    placement: tuple[torch.device, torch.memory_format],
) -> dict[str, LayerMaps]:
    """Capture one batch on (device, memory format), halving it on CUDA out-of-memory."""
    device, memory_format = placement
    x = torch.from_numpy(batch.pixels).to(device, non_blocking=True, memory_format=memory_format)  # (N, 3, H, W)
    try:
        return _run_halving(run, x)
    except ModelError:  # capture refused the maps (they were changed in place): its message names the layer
        raise
    except Exception as exc:  # the model's own code: any error is the model's
        raise ModelError(
            f"model {model}: the forward pass fails on {batch.paths[0]} and the {len(batch.paths) - 1} "
            f"images after it ({type(exc).__name__}: {first_line(exc)})"
        ) from None


def _run_halving(run: Callable[[torch.Tensor], dict[str, LayerMaps]], x: torch.Tensor) -> dict[str, LayerMaps]:
    try:
        return run(x)
    except torch.cuda.OutOfMemoryError:
        if x.shape[0] == 1:
            raise
        torch.cuda.empty_cache()
        half = x.shape[0] // 2
        first, second = _run_halving(run, x[:half]), _run_halving(run, x[half:])
        return {
            name: LayerMaps(_cat(first[name].z, second[name].z), _cat(first[name].a, second[name].a)) for name in first
        }


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _check_headers(
    work: Sequence[tuple[int, str]], options: ExtractOptions
) -> tuple[list[tuple[int, str]], list[Failure], dict[int, tuple[int, int]]]:
    """Read every image header before any compute: (good items, failures, (H, W) by index).

    Raises:
        ImageError: a bad image (without --skip-bad), no good image at all, or unequal sizes
            with --no-resize.
    """
    good: list[tuple[int, str]] = []
    failures: list[Failure] = []
    sizes: dict[int, tuple[int, int]] = {}
    for index, path in work:
        try:
            sizes[index] = check_image(path)
            good.append((index, path))
        except ImageError as exc:
            if not options.inputs.skip_bad:
                raise
            failures.append(Failure(index, path, str(exc).removeprefix(f"{path}: ")))
    if not good:
        raise ImageError(_nothing_written(failures))
    if options.model.no_resize and len(set(sizes.values())) > 1:
        first = good[0]
        odd = next((i, p) for i, p in good if sizes[i] != sizes[first[0]])
        raise ImageError(
            f"{odd[1]}: size {sizes[odd[0]][0]}x{sizes[odd[0]][1]} differs from {first[1]} "
            f"({sizes[first[0]][0]}x{sizes[first[0]][1]}); --no-resize needs images of equal size"
        )
    return good, failures, sizes


class _Batches:
    """Decoded batches, produced by worker threads ahead of the model, in input order."""

    def __init__(
        self,
        items: Sequence[tuple[int, str]],
        inputs: Inputs,
        pool: ThreadPoolExecutor,
        prep: Preprocessing,
        stop_requested: StopRequested,
    ) -> None:
        self.items, self.inputs, self.pool, self.prep = items, inputs, pool, prep
        self.stop_requested = stop_requested
        self.handled = 0  # items whose batch has been handed out
        self._next = 0
        self._pending: deque[tuple[int, Future[tuple[ImageBatch | None, list[Failure]]]]] = deque()

    def _fill(self) -> None:
        depth = DECODE_AHEAD * max(1, self.inputs.workers)
        while len(self._pending) < depth and self._next < len(self.items):
            chunk = self.items[self._next : self._next + self.inputs.batch_size]
            self._pending.append((len(chunk), self.pool.submit(load_batch, chunk, self.prep, self.inputs.skip_bad)))
            self._next += len(chunk)

    def __iter__(self) -> Iterator[tuple[ImageBatch | None, list[Failure]]]:
        while True:
            self._fill()
            if not self._pending:
                return
            count, future = self._pending.popleft()
            result = wait(future.result, self.stop_requested)
            self.handled += count
            yield result


@contextmanager
def decoded_batches(
    items: Sequence[tuple[int, str]], inputs: Inputs, prep: Preprocessing, stop_requested: StopRequested
) -> Iterator[_Batches]:
    pool = ThreadPoolExecutor(max_workers=max(1, inputs.workers), thread_name_prefix="fmap-decode")
    finished = False
    try:
        yield _Batches(items, inputs, pool, prep, stop_requested)
        finished = True
    finally:
        # after an error or a signal, a decode that hangs (a stalled network file system) is not waited for
        pool.shutdown(wait=finished, cancel_futures=True)


def input_list_sha256(paths: Sequence[str]) -> str:
    """Fingerprint of an input list (one path a line, as given), shared by every shard of a job."""
    return hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()


@contextmanager
def full_float32() -> Iterator[None]:
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
    return None if t is None else host_values(t)
