"""Which layers a run stores, and what the file says about each: selection by name or glob,
the layer list from one forward pass, and the provenance and pairing records the writer stores.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch

from .capture import LayerInfo, discover
from .errors import ModelError, SpecError, UnknownLayerError, UsageError, did_you_mean, first_line
from .models import LoadedModel, resolve_device
from .spec import ModelSpec, geometry
from .store import schema
from .store.layout import LayerRecord


def select_layers(layers: dict[str, LayerInfo], requested: Sequence[str] | None, model: LoadedModel) -> list[str]:
    """Names of the layers to store, in forward order.

    ``requested`` holds names or shell-style globs (``layer*.*.conv2``); None selects every
    linear layer (conv, linear) that is paired with a nonlinearity.

    Raises:
        UnknownLayerError: a name or glob matches nothing; lists names and suggests the closest.
        UsageError: a chosen layer folds other data into the batch axis (it cannot be stored per image).
    """
    selectable = [name for name in layers if model.selectable is None or name in model.selectable]
    if requested is None:  # layers that fold other data into the batch axis cannot be stored: left out
        chosen = [n for n in selectable if layers[n].kind == "linear" and layers[n].nonlinearity != "none"
                  and not layers[n].folded]  # fmt: skip
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
    folded = [name for name in selectable if name in wanted and layers[name].folded]
    if folded:
        more, them = (f" and {len(folded) - 1} more fold", "them") if len(folded) > 1 else (" folds", "it")
        raise UsageError(
            f"--layers: layer '{folded[0]}'{more} other data into the batch axis ({layers[folded[0]].folded} "
            f"rows per image, e.g. the windows of window attention), so fmap cannot store {them} per image; leave "
            f"{them} out of --layers (run 'fmap layers --model {model.source}' to list the layers)"
        )
    return [name for name in selectable if name in wanted]


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
        if len(info.axes) != len(info.output_shape) + 1:
            shape = "x".join(str(n) for n in info.output_shape)
            raise UsageError(
                f"layer '{name}': its maps ({shape} per image) have {len(info.output_shape) + 1} axes; fmap stores "
                "maps of 2 to 4 axes (N, C and up to two more); choose other layers with --layers"
            )
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
                axes=info.axes,
                tokens=info.tokens,
                field_note=info.field_note,
            )
        )
    return records


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
