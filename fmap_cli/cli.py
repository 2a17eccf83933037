"""The ``fmap`` command line: parse, validate, call the library, report.

Nothing here imports torch at module level: ``fmap --help`` and ``fmap inspect`` stay fast.
Exit codes: 0 success, 1 failure (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from . import __version__
from .errors import FmapError, StoppedError, UnknownLayerError, UsageError


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


class SizeType(click.ParamType):
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


def _split_layers(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("give at least one layer name, e.g. --layers conv1,conv2")
    return list(dict.fromkeys(names))


def model_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--model, --weights and --model-arg, shared by the commands that load a model."""
    options = [
        click.option(
            "-m",
            "--model",
            metavar="MODEL",
            help="Built-in name (see 'fmap models'), a .toml/.json spec, a .pt2 torch.export program, "
            "package.module:factory, file.py:factory, torchvision:NAME or timm:NAME. Default: edges.",
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
    for option in reversed(options):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="fmap")
def cli() -> None:
    """Extract the feature maps of a CNN, z (pre-activation) and a (activation), into HDF5.

    \b
      fmap extract photo.jpg --layers conv1,conv2 -o maps.h5
      fmap inspect maps.h5
    """


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=str))
@model_options
@click.option(
    "-l",
    "--layers",
    callback=_split_layers,
    metavar="L1,L2",
    help="Layers to store (default: every layer with a nonlinearity).",
)
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("fmap.h5"),
    show_default=True,
    help="Output HDF5 file.",
)
@click.option(
    "-b", "--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per forward pass."
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto (cuda when available).")
@click.option("--size", type=SizeType(), help="Input size N or H,W fed to the network (overrides the model's).")
@click.option("--no-resize", is_flag=True, help="Feed images at their own size (all must be equal).")
@click.option("--save-input", is_flag=True, help="Also store the exact input tensor as /input.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--verify", is_flag=True, help="Re-check a == f(z) for every stored value before finishing.")
def extract(images: tuple[str, ...], out: Path, **options: Any) -> None:
    """Run IMAGES through the model and store z and a of each layer in one HDF5 file.

    Prints the output path on stdout; progress goes to stderr. Nothing is left at OUT on error.
    Exit codes: 0 done, 1 failed (bad image, model or file), 2 usage error.

    \b
      fmap extract cat.jpg dog.png --layers conv1,conv2 -o maps.h5
      fmap inspect "$(fmap extract cat.jpg -o maps.h5 --overwrite)"
    """
    with _errors(), _signals_recorded() as received:
        from . import extract as pipeline  # torch loads here, not for --help
        from .models import parse_model_args

        model_args = parse_model_args(options.pop("model_args"))
        result = pipeline.extract(
            pipeline.ExtractOptions(
                images=list(images), out=out, model_args=model_args, command=shlex.join(sys.argv), **options
            ),
            log=lambda message: click.echo(message, err=True),
            stop_requested=lambda: received[0] if received else None,
        )
    images = f"{result.n_images} image" + ("s" if result.n_images != 1 else "")
    click.echo(f"wrote {images} x {len(result.layers)} layers in {result.seconds:.1f} s", err=True)
    click.echo(str(result.out))


@contextmanager
def _signals_recorded() -> Iterator[list[int]]:
    """Record SIGTERM/SIGINT instead of raising, so extraction stops between batches and cleans up.

    A second signal gets the previous handler (Ctrl-C twice stops at once).
    """
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

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
def inspect(file: Path, as_json: bool) -> None:
    """Summarise an fmap HDF5 file: model, images, and per layer z/a statistics.

    \b
      fmap inspect maps.h5
      fmap inspect maps.h5 --json | jq '.layers[].dead_channels'
    """
    from .summary import format_summary, read_summary

    with _errors():
        summary = read_summary(file)
    click.echo(json.dumps(summary.to_dict(), indent=2, allow_nan=False) if as_json else format_summary(summary))


@cli.command()
@model_options
@click.option("--size", type=SizeType(), help="Input size N or H,W for the shapes (default: the model's).")
@click.option("-l", "--layers", "patterns", callback=_split_layers, metavar="L1,L2", help="Only these names or globs.")
def layers(
    model: str | None, weights: str | None, model_args: tuple[str, ...], size: tuple[int, int] | None,
    patterns: list[str] | None,
) -> None:  # fmt: skip
    """List the layers --layers accepts: type, output shape, the nonlinearity each pairs with
    (and what lies between z and a), receptive field and stride in input pixels.

    \b
      fmap layers
      fmap layers --model my_model.toml --size 128
      fmap layers --model torchvision:resnet18 --layers 'layer1.*'
    """
    with _errors():
        from . import extract as pipeline  # runs one blank image through the model
        from .models import load_model, parse_model_args

        loaded = load_model(model, weights, parse_model_args(model_args))
        found = pipeline.describe_layers(loaded, size, size_flag=size is not None)
        keep = pipeline.select_layers(found, patterns, loaded) if patterns else loaded.selectable or list(found)
        found = {name: found[name] for name in keep}
    rows = [("layer", "type", "output", "rf", "stride", "f", "z -> a")]
    for name, info in found.items():
        rows.append(
            (
                name,
                info.type,
                "x".join(str(n) for n in info.output_shape),
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
    from .spec import BUILTIN_MODELS, DEFAULT_MODEL, load_spec

    with _errors():
        for name in BUILTIN_MODELS:
            spec = load_spec(name)
            default = " (default)" if name == DEFAULT_MODEL else ""
            layer_names = ", ".join(layer.name for layer in spec.layers)
            click.echo(f"{name}{default}: {spec.description}\n    layers: {layer_names}")


@cli.command(name="schema")
def schema_command() -> None:
    """Print the HDF5 schema that fmap files follow (datasets, attributes, meanings)."""
    from .schema import render

    click.echo(render(), nl=False)
