"""The ``fmap`` command line: parse, validate, call the library, report.

Nothing here imports torch at module level: ``fmap --help`` and ``fmap inspect`` stay fast.
Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import FmapError, StoppedError, UnknownLayerError, UsageError
from .spec import DEFAULT_MODEL, INTERPOLATIONS, MAX_RESIZE


@contextmanager
def _errors() -> Iterator[None]:
    """Turn library exceptions into one-line click errors: usage mistakes exit 2, the rest 1."""
    try:
        yield
    except (UsageError, UnknownLayerError) as exc:
        raise click.UsageError(str(exc)) from None
    except StoppedError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(128 + exc.signum)
    except FmapError as exc:
        raise click.ClickException(str(exc)) from None


class SizeType(click.ParamType):  # type: ignore[type-arg]  # click >= 8.2 makes ParamType generic; 8.1 does not
    """``N`` or ``H,W``: the input size fed to the network."""

    name = "N|H,W"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (1, 2) or min(numbers) < 1:
            self.fail(f"expected a positive integer N or H,W (e.g. 224 or 224,320), got {value!r}", param, ctx)
        return (numbers[0], numbers[-1])


RGB = tuple[float, float, float]


class RGBType(click.ParamType):  # type: ignore[type-arg]  # as SizeType
    """``R,G,B``: three finite numbers, one per channel (greater than 0 with ``positive``)."""

    name = "R,G,B"

    def __init__(self, positive: bool, example: str) -> None:
        self.positive = positive
        self.example = example

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> RGB:
        if isinstance(value, tuple):
            return value
        try:
            numbers = [float(part) for part in str(value).split(",")]
        except ValueError:
            numbers = []
        ok = len(numbers) == 3 and all(math.isfinite(n) and (n > 0 or not self.positive) for n in numbers)
        if not ok:
            kind = "three numbers R,G,B greater than 0" if self.positive else "three numbers R,G,B"
            self.fail(f"expected {kind} (e.g. {self.example}), got {value!r}", param, ctx)
        return (numbers[0], numbers[1], numbers[2])


def _split_layers(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[str] | None:
    """Every -l/--layers given (repeatable, each comma-separated), in order, each name once."""
    if not values:
        return None
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("give at least one layer name, e.g. --layers conv1,conv2")
    return list(dict.fromkeys(names))


def model_options(default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """--model, --weights and --model-arg, shared by the commands that load a model; ``default`` says
    which model a command uses without --model."""
    options = [
        click.option(
            "-m",
            "--model",
            metavar="MODEL",
            help="Built-in name (see 'fmap models'), a .toml/.json spec, a .pt2 torch.export program, "
            f"package.module:factory, file.py:factory, torchvision:NAME or timm:NAME. Default: {default}.",
        ),
        click.option(
            "-w",
            "--weights",
            metavar="PATH|pretrained",
            help="State dict (.pt/.pth/.npz/.safetensors) for a factory, torchvision or timm model; "
            "'pretrained' for the library's own weights.",
        ),
        click.option(
            "--model-arg",
            "model_args",
            multiple=True,
            metavar="KEY=VALUE",
            help="Keyword argument for the model factory (repeatable; VALUE parsed as JSON when it can be).",
        ),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="fmap")
def cli() -> None:
    """Extract the feature maps of a CNN, z (pre-activation) and a (activation), into HDF5.

    \b
      fmap extract photo.jpg --layers conv1,conv2 -o maps.h5
      fmap inspect maps.h5
    """


class CodecType(click.ParamType):  # type: ignore[type-arg]  # as SizeType
    """``none``, ``lzf``, ``gzip`` or ``gzip:LEVEL``."""

    name = "none|lzf|gzip[:N]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str | None, int]:
        if isinstance(value, tuple):
            return value
        codec, _, level = str(value).partition(":")
        if codec in ("none", "lzf") and not level:
            return (None if codec == "none" else codec, 0)
        if codec == "gzip" and (not level or (level.isdigit() and 0 <= int(level) <= 9)):
            return ("gzip", int(level) if level else 1)
        self.fail(f"expected none, lzf, gzip or gzip:0-9, got {value!r}", param, ctx)


def _options(*decorators: Callable[[Any], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Several click options as one decorator, in the order given."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


# What the commands that run a model over images share (extract today; occlusion and projection next).
input_options = _options(
    click.argument("images", nargs=-1, type=click.Path(path_type=str)),
    click.option("-r", "--recursive", is_flag=True, help="Look for images in subdirectories of directories given."),
    click.option("--files-from", metavar="FILE", help="Read image paths from FILE, one a line ('-' = stdin)."),
    click.option("-0", "--null", "nul", is_flag=True, help="Paths in --files-from are NUL-separated (find -print0)."),
    click.option("--skip-bad", is_flag=True, help="Record unreadable images in the file and go on (exit code 1)."),
    click.option(
        "--shard",
        metavar="K/N",
        help="Process the K-th (from 0) of N shares of the input list (default: from SLURM_ARRAY_*).",
    ),
    click.option(
        "-b", "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per forward pass."
    ),
    click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Image-decoding threads."),
)
device_option = click.option(
    "--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]", help="Where the model runs."
)
run_options = _options(
    device_option,
    click.option(
        "--size",
        type=SizeType(),
        help="Input size N or H,W fed to the network (overrides the model's; the picture is resized to just "
        "cover it unless --resize).",
    ),
    click.option("--no-resize", is_flag=True, help="Feed images at their own size (all must be equal)."),
    click.option(
        "--resize",
        type=click.IntRange(min=1, max=MAX_RESIZE),
        metavar="N",
        help="Shorter side before the centre crop (an N x N box for timm's squash/border crop modes); "
        "overrides the model's recipe.",
    ),
    click.option(
        "--interpolation",
        type=click.Choice(INTERPOLATIONS),
        help="Resampling filter of the resize (Pillow's, as torchvision's Resize on PIL images); "
        "overrides the model's recipe.",
    ),
    click.option(
        "--mean", type=RGBType(False, "0.485,0.456,0.406"), help="Normalisation mean per channel (pixels in [0, 1])."
    ),
    click.option("--std", type=RGBType(True, "0.229,0.224,0.225"), help="Normalisation std per channel."),
    click.option(
        "--memory-format",
        type=click.Choice(["contiguous", "channels_last"]),
        default="contiguous",
        show_default=True,
        help="Batch layout: contiguous gives maps bit-identical to the model's own forward on the input; "
        "channels_last is faster on CPU (float32 rounding differs).",
    ),
)
output_options = _options(
    click.option(
        "-o",
        "--output",
        "out",
        type=click.Path(dir_okay=False, path_type=Path),
        default=Path("fmap.h5"),
        show_default=True,
        help="Output HDF5 file.",
    ),
    click.option("--overwrite", is_flag=True, help="Replace OUT if it exists."),
    click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout instead of the output path."),
    click.option("-q", "--quiet", is_flag=True, help="No progress or messages on stderr (errors still)."),
)


def _inputs(
    images: tuple[str, ...], recursive: bool, files_from: str | None, nul: bool, shard: str | None, skip_bad: bool,
    batch_size: int, workers: int,
) -> Any:  # fmt: skip
    """The input options as an ``extract.Inputs`` (imported here: it loads torch)."""
    from .extract import Inputs
    from .inputs import expand, parse_shard, read_path_list, shard_from_env

    paths = expand(images, recursive) + (read_path_list(files_from, nul) if files_from else [])
    chosen = parse_shard(shard) if shard else shard_from_env(os.environ)
    return Inputs(paths, shard=chosen, skip_bad=skip_bad, batch_size=batch_size, workers=workers)


@cli.command()
@input_options
@model_options(DEFAULT_MODEL)
@run_options
@click.option(
    "-l",
    "--layers",
    multiple=True,
    callback=_split_layers,
    metavar="L1,L2",
    help="Layer names or globs to store, repeatable (default: conv/linear layers followed by a nonlinearity; see "
    "'fmap layers').",
)
@output_options
@click.option("--save-input", is_flag=True, help="Also store the exact input tensor as /input.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Storage type of the maps (float16 halves the bytes; values over 65504 are refused).",
)
@click.option(
    "--compression",
    type=CodecType(),
    metavar=CodecType.name,  # as --channel's: not upper-cased
    default="gzip:1",
    show_default=True,
    help="Codec for a (sparse after ReLU: gzip:1 saves about 1.9-3.5x, compressed with ISA-L).",
)
@click.option(
    "--z-compression",
    type=CodecType(),
    metavar=CodecType.name,  # as --channel's: not upper-cased
    default="none",
    show_default=True,
    help="Codec for z (dense: gzip saves about 8% for 1.3-1.6x the write time).",
)
@click.option(
    "--store", "roles", default="z,a", show_default=True, metavar="z,a", help="Which maps to store: z, a or both."
)
@click.option("--resume", is_flag=True, help="Continue a killed run from its temporary file beside OUT.")
@click.option("--append", is_flag=True, help="Add the images to the existing, finished OUT.")
@click.option(
    "--verify", is_flag=True, help="Check every stored map against an independent forward pass before finishing."
)
def extract(
    images: tuple[str, ...], recursive: bool, files_from: str | None, nul: bool, skip_bad: bool, shard: str | None,
    batch_size: int, workers: int, model: str | None, weights: str | None, model_args: tuple[str, ...], device: str,
    size: tuple[int, int] | None, no_resize: bool, resize: int | None, interpolation: str | None, mean: RGB | None,
    std: RGB | None, memory_format: str, layers: list[str] | None, out: Path,
    overwrite: bool,
    as_json: bool, quiet: bool, save_input: bool, dtype: str, compression: tuple[str | None, int],
    z_compression: tuple[str | None, int], roles: str, resume: bool, append: bool, verify: bool,
) -> None:  # fmt: skip
    """Run images through the model and store z and a of each layer in one HDF5 file.

    IMAGES are files or directories (their images, by extension; deeper with --recursive).
    Prints the output path on stdout (or, with --json, a summary); progress goes to stderr.
    The file appears at OUT only when complete; on error nothing is left there.

    \b
    Exit codes: 0 done; 1 finished but some images failed (--skip-bad), or
    failed (bad image, model or file: one line on stderr); 2 usage error.

    \b
      fmap extract cat.jpg dog.png --layers conv1,conv2 -o maps.h5
      fmap inspect "$(fmap extract cat.jpg -o maps.h5 --overwrite)"
      find photos -name '*.jpg' -print0 | fmap extract --files-from - -0 --skip-bad -o maps.h5
    """
    report = _Reporter(quiet)
    with _errors(), _signals_recorded() as received:
        from . import extract as pipeline  # torch loads here, not for --help
        from .models import parse_model_args
        from .store.layout import Storage

        options = pipeline.ExtractOptions(
            inputs=_inputs(images, recursive, files_from, nul, shard, skip_bad, batch_size, workers),
            out=out,
            model=pipeline.ModelChoice(
                model=model,
                weights=weights,
                model_args=parse_model_args(model_args),
                layers=layers,
                device=device,
                size=size,
                no_resize=no_resize,
                resize=resize,
                interpolation=interpolation,
                mean=mean,
                std=std,
                memory_format=memory_format,
            ),
            storage=Storage(preactivation=z_compression, activation=compression, dtype=dtype, roles=_roles(roles)),
            continuation=pipeline.Continuation(overwrite=overwrite, resume=resume, append=append),
            save_input=save_input,
            verify=verify,
            command=shlex.join(sys.argv),
        )
        result = pipeline.extract(
            options,
            log=report.log,
            stop_requested=lambda: received[0] if received else None,
            progress=report.progress,
        )
    if result.layers:  # an empty shard writes nothing and prints no path
        report.done(result.images_written, len(result.failures), len(result.layers), result.seconds)
    if as_json or result.layers:
        click.echo(json.dumps(result.to_dict()) if as_json else str(result.out))
    if result.failures:
        sys.exit(1)


def _roles(text: str) -> frozenset[str]:
    names = {"z": "preactivation", "a": "activation", "preactivation": "preactivation", "activation": "activation"}
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    if not chosen or any(part not in names for part in chosen):
        raise click.BadParameter(f"expected z, a or z,a, got {text!r}", param_hint="--store")
    return frozenset(names[part] for part in chosen)


class UnitType(click.ParamType):  # type: ignore[type-arg]  # as SizeType
    """``ROW,COL``: a unit of a layer's map."""

    name = "ROW,COL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            self.fail(f"expected ROW,COL: two integers >= 0 (e.g. 12,30), got {value!r}", param, ctx)
        return (int(parts[0]), int(parts[1]))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-l", "--layer", required=True, metavar="L", help="The layer whose activation is projected.")
@click.option("--channel", required=True, type=click.IntRange(min=0), metavar="C", help="The channel of --layer.")
@click.option(
    "--top", type=click.IntRange(min=1), metavar="K", help="The K images where C fires most, each at its maximum [9]."
)
@click.option("--image", metavar="INDEX|PATH", help="One image instead of --top (at its maximum, or --unit).")
@click.option(
    "--unit",
    type=UnitType(),
    help="With --image: this unit of the map (INDEX,0 in a token sequence) instead of its maximum.",
)
@click.option("--whole-map", is_flag=True, help="Project every activation of C on each image at once.")
@click.option(
    "--method",
    type=click.Choice(["deconvnet", "guided", "gradient"]),
    default="deconvnet",
    show_default=True,
    help="deconvnet (Zeiler & Fergus), guided backpropagation or the plain gradient.",
)
@model_options("the model FILE was extracted with")
@device_option
@click.option(
    "-b", "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Units per backward pass."
)
@output_options
def project(
    file: Path, layer: str, channel: int, top: int | None, image: str | None, unit: tuple[int, int] | None,
    whole_map: bool, method: str, model: str | None, weights: str | None, model_args: tuple[str, ...], device: str,
    batch_size: int, out: Path, overwrite: bool, as_json: bool, quiet: bool,
) -> None:  # fmt: skip
    """Project activations of a channel back to the input pixels: what excites it (Zeiler & Fergus).

    The backward pass starts from --layer's activation map with every entry zeroed but the unit,
    which keeps its value. Images, preprocessing and model come from FILE (a Python factory or
    library model needs --model, as at extraction); the model's weights must be FILE's. Prints
    OUT's path; 'fmap render OUT' draws the projections beside their image patches.

    \b
      fmap project maps.h5 --layer conv2 --channel 5 -o conv2-5.h5
      fmap project maps.h5 --layer conv2 --channel 5 --image cat.jpg --unit 20,31 --method guided -o p.h5
      fmap render conv2-5.h5
    """
    report = _Reporter(quiet)
    with _errors(), _signals_recorded() as received:
        from .models import parse_model_args
        from .projection import ProjectOptions, UnitChoice
        from .projection import project as run

        options = ProjectOptions(
            file=file,
            layer=layer,
            channel=channel,
            out=out,
            units=UnitChoice(top=top, image=image, unit=unit, whole_map=whole_map),
            method=method,
            model=model,
            weights=weights,
            model_args=parse_model_args(model_args),
            device=device,
            batch_size=batch_size,
            overwrite=overwrite,
            command=shlex.join(sys.argv),
        )
        result = run(options, log=report.log, stop_requested=lambda: received[0] if received else None)
    units = f"{len(result.units)} unit" + ("s" if len(result.units) != 1 else "")
    report.log(f"projected {units} of {result.layer} channel {result.channel} in {result.seconds:.1f} s")
    click.echo(json.dumps(result.to_dict()) if as_json else str(result.out))


class _Reporter:
    """Messages and a progress line on stderr; the progress line only on a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.live = not quiet and sys.stderr.isatty()
        self.started = time.monotonic()

    def log(self, message: str) -> None:
        if not self.quiet:
            self._clear()
            click.echo(message, err=True)

    def progress(self, done: int, total: int) -> None:
        if not self.live:
            return
        elapsed = time.monotonic() - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        click.echo(f"\r{done}/{total} images  {rate:.1f} img/s  ETA {eta:.0f} s ", err=True, nl=False)

    def done(self, written: int, failed: int, layers: int, seconds: float) -> None:
        images = f"{written} image" + ("s" if written != 1 else "")
        failures = f", {failed} failed (recorded in /failures)" if failed else ""
        self.log(f"wrote {images} x {layers} layers in {seconds:.1f} s{failures}")

    def _clear(self) -> None:
        if self.live:
            click.echo("\r\033[K", err=True, nl=False)


@contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """Record SIGTERM/SIGINT instead of raising, so extraction stops between batches and cleans up.

    A second signal gets the previous handler (Ctrl-C twice stops at once).
    """
    received: list[int] = []
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def record(signum: int, frame: object) -> None:
        received.append(signum)
        signal.signal(signum, previous[signum])

    for sig in previous:
        signal.signal(sig, record)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-l", "--layer", metavar="L", help="Only this layer.")
@click.option("--channel", type=click.IntRange(min=0), metavar="C", help="Only this channel of --layer.")
@click.option("--channels", is_flag=True, help="Per-channel table: z and a min/max/mean/std, zeros, dead.")
@click.option(
    "--top", type=click.IntRange(min=1), default=None, metavar="K", help="The K images exciting each channel most."
)
@click.option("--hist", is_flag=True, help="Text histogram of the activation values per layer (reads the maps).")
def inspect(file: Path, as_json: bool, top: int | None, hist: bool, **details: Any) -> None:
    """Summarise an fmap HDF5 file: model, images, and per layer z/a statistics.

    \b
      fmap inspect maps.h5
      fmap inspect maps.h5 --channels --hist
      fmap inspect maps.h5 --layer conv2 --channel 3 --top 5
      fmap inspect maps.h5 --json | jq '.layers[].dead_channels'
    """
    from .summary import HIST_BINS, Details, format_summary, read_summary

    with _errors():
        summary = read_summary(file, Details(top=top or 0, hist_bins=HIST_BINS if hist else 0, **details))
    click.echo(json.dumps(summary.to_dict(), indent=2, allow_nan=False) if as_json else format_summary(summary))
    if summary.missing_sources:  # the report above is of NaN rows: not a usable result
        raise click.ClickException(f"{file}: source files missing: {', '.join(summary.missing_sources)}")


@cli.command()
@model_options(DEFAULT_MODEL)
@click.option("--size", type=SizeType(), help="Input size N or H,W for the shapes (default: the model's).")
@click.option(
    "-l", "--layers", "patterns", multiple=True, callback=_split_layers, metavar="L1,L2",
    help="Only these names or globs (repeatable).",
)  # fmt: skip
def layers(
    model: str | None, weights: str | None, model_args: tuple[str, ...], size: tuple[int, int] | None,
    patterns: list[str] | None,
) -> None:  # fmt: skip
    """List the layers --layers accepts: type, output shape and its axes (C, H, W; H, W, C; T, D; ...),
    receptive field and stride in input pixels, the nonlinearity each pairs with (and what lies
    between z and a).

    \b
      fmap layers
      fmap layers --model my_model.toml --size 128
      fmap layers --model torchvision:resnet18 --layers 'layer1.*'
    """
    with _errors():
        from .layers import describe_layers, select_layers  # runs one blank image through the model
        from .models import load_model, parse_model_args

        loaded = load_model(model, weights, parse_model_args(model_args))
        found = describe_layers(loaded, size, size_flag=size is not None)
        keep = select_layers(found, patterns, loaded) if patterns else loaded.selectable or list(found)
        found = {name: found[name] for name in keep}
    rows = [("layer", "type", "output", "axes", "rf", "stride", "f", "z -> a")]
    for name, info in found.items():
        rows.append(
            (
                name,
                info.type,
                "x".join(str(n) for n in info.output_shape),
                ",".join(info.axes[1:]),  # per image, as output
                "?" if info.receptive_field[0] < 0 else "x".join(str(n) for n in info.receptive_field),
                "?" if info.stride[0] < 0 else "x".join(str(n) for n in info.stride),
                info.nonlinearity,
                " -> ".join(info.path_to_activation),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo(
            ("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]).rstrip()
        )


@cli.command()
def models() -> None:
    """List the built-in models (use their name with --model)."""
    from .spec import BUILTIN_MODELS, load_spec

    with _errors():
        for name in BUILTIN_MODELS:
            spec = load_spec(name)
            default = " (default)" if name == DEFAULT_MODEL else ""
            layer_names = ", ".join(layer.name for layer in spec.layers)
            click.echo(f"{name}{default}: {spec.description}\n    layers: {layer_names}")


@cli.command(name="schema")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable: every node and attribute with type and shape.")
def schema_command(as_json: bool) -> None:
    """Print the HDF5 schema that fmap files follow (datasets, attributes, meanings)."""
    from .store.schema import render, to_json

    click.echo(json.dumps(to_json(), indent=2) if as_json else render(), nl=as_json)


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-l", "--layer", metavar="L", help="The layer to draw (maps files).")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=lambda ctx, param, value: _png(value),
    help="PNG (default FILE.L[...].png).",
)
@click.option(
    "--image",
    default="0",
    show_default=True,
    metavar="INDEX|PATH|all",
    help="Which image (grid, overlay, occlusion files; 'all': a row per image of an occlusion file, at most 16).",
)
@click.option("--role", type=click.Choice(["activation", "preactivation", "both"]), help="Grid: a, z, or both.")
@click.option("--scale", type=click.Choice(["tile", "layer"]), help="Grid colour scale per tile or for the layer.")
@click.option("--overlay", type=click.IntRange(min=0), metavar="CHANNEL", help="Heat map of CHANNEL on the image.")
@click.option("--top", type=click.IntRange(min=1), metavar="K", help="The K patches where --channel fires most.")
@click.option("--channel", type=click.IntRange(min=0), metavar="C", help="The channel for --top.")
@click.option("--full", is_flag=True, help="Projection files: uncropped projections beside the whole images.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def render(file: Path, out: Path | None, overwrite: bool, **options: Any) -> None:
    """Draw a layer's maps as a PNG: every channel in a grid, a heat map over the input, or top-K patches.

    Grid colours: a from black (zero) up, z blue (negative), white (zero), red (positive); dead
    channels are framed in red. A projection file (fmap project) is drawn as Zeiler & Fergus's
    Fig. 2: each projection above its image patch (--full: whole pictures). Prints the PNG's path.

    \b
      fmap render maps.h5 --layer conv1 --image cat.jpg --role both
      fmap render maps.h5 --layer conv2 --overlay 5 --image 0 -o heat.png
      fmap render maps.h5 --layer conv2 --top 8 --channel 5
      fmap render projections.h5 --full
    """
    from .render import RenderOptions, render_png

    with _errors():
        written = render_png(RenderOptions(file=file, **options), out, overwrite)
    click.echo(str(written))


@cli.command()
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Merged HDF5 file."
)
@click.option("--virtual", is_flag=True, help="Virtual datasets over the shard files instead of a copy (keep them).")
@click.option("--allow-missing", is_flag=True, help="Merge the shards given even if some shares are missing.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No messages on stderr (errors still).")
def merge(
    shards: tuple[Path, ...], out: Path, virtual: bool, allow_missing: bool, overwrite: bool, quiet: bool
) -> None:
    """Merge the files of 'fmap extract --shard K/N' into one file, images in input order.

    Copies the stored chunks as they are (no recompression), or with --virtual writes HDF5
    virtual datasets over the shards (paths relative to OUT's directory). Shards of different
    runs, a shard given twice or a missing share are refused (exit 2). Prints OUT's path.

    \b
      fmap merge shard_*.h5 -o all.h5
      fmap merge shard_*.h5 -o all.h5 --virtual
    """
    from .store.merge import merge_shards

    report = _Reporter(quiet)
    with _errors(), _signals_recorded() as received:
        result = merge_shards(
            shards, out, virtual, overwrite, allow_missing, shlex.join(sys.argv), report.log,
            stop_requested=lambda: received[0] if received else None,
        )  # fmt: skip
    report.log(f"merged {len(result.shards)} shards, {result.n_images} images in {result.seconds:.1f} s")
    click.echo(str(result.out))


class ChannelsType(click.ParamType):  # type: ignore[type-arg]  # as SizeType
    """``C``, ``C1,C2,...`` or ``all``: channels of a layer."""

    name = "C|C1,C2|all"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int] | str:
        if isinstance(value, list):
            return [int(c) for c in value]
        if value == "all":
            return "all"
        parts = [part.strip() for part in str(value).split(",")]
        if not all(part.isdigit() for part in parts):
            self.fail(f"expected a channel C, channels C1,C2,... (integers >= 0) or all, got {value!r}", param, ctx)
        return list(dict.fromkeys(int(part) for part in parts))


@cli.command()
@input_options
@model_options(DEFAULT_MODEL)
@run_options
@click.option("-l", "--layer", metavar="L", help="Record the total activation of L's channels (see 'fmap layers').")
@click.option(
    "--channel",
    "channels",
    type=ChannelsType(),
    metavar=ChannelsType.name,  # click would print the type's name upper-cased: 'ALL', which it refuses
    help="Channels of --layer: C, C1,C2,... or all (default: each image's strongest, unoccluded).",
)
@click.option("--class", "target", type=click.IntRange(min=0), metavar="K", help="Class to map (default: top-1).")
@click.option("--no-class", is_flag=True, help="No class maps, even for a classifier: the pass stops after --layer.")
@click.option("--patch", type=SizeType(), default="32", show_default=True, help="Occluder size in input pixels.")
@click.option("--stride", type=SizeType(), help="Input pixels between positions (default: 8, or P if smaller).")
@click.option(
    "--fill",
    default="grey",
    show_default=True,
    metavar="grey|mean|zero|R,G,B",
    help="Occluder colour: grey (0.5), the normalisation mean, black, or R,G,B in 0-255.",
)
@output_options
@click.option("--save-input", is_flag=True, help="Also store the unoccluded input tensor as /input.")
def occlude(
    images: tuple[str, ...], recursive: bool, files_from: str | None, nul: bool, skip_bad: bool, shard: str | None,
    batch_size: int, workers: int, model: str | None, weights: str | None, model_args: tuple[str, ...], device: str,
    size: tuple[int, int] | None, no_resize: bool, resize: int | None, interpolation: str | None, mean: RGB | None,
    std: RGB | None, memory_format: str, layer: str | None,
    channels: list[int] | str | None, target: int | None, no_class: bool, patch: tuple[int, int],
    stride: tuple[int, int] | None, fill: str, out: Path, overwrite: bool, as_json: bool, quiet: bool, save_input: bool,
) -> None:  # fmt: skip
    """Cover each part of each image with a square and record what the network does (Zeiler & Fergus).

    At every occluder position: the total activation of --layer's channels and, when the model
    outputs class scores (N, K), the probability of a class and the top-1 label. --batch-size
    counts the occluded copies per forward pass. Prints OUT's path; 'fmap render OUT' draws
    Zeiler's Fig. 7, 'fmap inspect OUT' summarises it. Exit codes as for extract.

    \b
      fmap occlude cat.jpg --model torchvision:alexnet --weights pretrained --layer features.10 -o occ.h5
      fmap occlude photos/ --layer conv2 --channel all --patch 16 --stride 4 --no-class -o occ.h5
      fmap render occ.h5 --image all
    """
    report = _Reporter(quiet)
    with _errors(), _signals_recorded() as received:
        from .extract import ModelChoice  # torch loads here, not for --help
        from .models import parse_model_args
        from .occlusion import OccludeOptions, Occluder
        from .occlusion import occlude as run

        choice = ModelChoice(model=model, weights=weights, model_args=parse_model_args(model_args), device=device,
                             size=size, no_resize=no_resize, resize=resize, interpolation=interpolation, mean=mean,
                             std=std, memory_format=memory_format)  # fmt: skip
        options = OccludeOptions(
            inputs=_inputs(images, recursive, files_from, nul, shard, skip_bad, batch_size, workers),
            out=out,
            model=choice,
            layer=layer,
            channels=channels,
            target=target,
            classes=not no_class,
            occluder=Occluder(patch, stride, fill),
            overwrite=overwrite,
            save_input=save_input,
            command=shlex.join(sys.argv),
        )
        result = run(options, report.log, lambda: received[0] if received else None, report.progress)
    if result.images_written:  # an empty shard writes nothing and prints no path
        failed = f", {len(result.failures)} failed (recorded in /failures)" if result.failures else ""
        positions = result.grid[0] * result.grid[1]
        report.log(f"wrote {result.images_written} image(s) x {positions} occluder positions in "
                   f"{result.seconds:.1f} s{failed}")  # fmt: skip
    if as_json or result.images_written:
        click.echo(json.dumps(result.to_dict()) if as_json else str(result.out))
    if result.failures:
        sys.exit(1)


def _png(path: Path | None) -> Path | None:
    if path is not None and path.suffix.lower() != ".png":
        raise click.BadParameter(f"{path}: render writes PNG; give a name ending in .png", param_hint="-o")
    return path
