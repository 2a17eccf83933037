"""The fmap HDF5 schema: defined once, as data, for the writer, the readers and the docs.

Everything here is plain data (no h5py, no torch). The writer (``layout.py``) can only create the
nodes and attributes listed here (:func:`node_for` refuses others), the readers use these names,
``fmap schema`` prints :func:`render` (``--json``: :func:`to_json`), and the README's schema
section is that output (tests keep them equal, and check that every node and attribute of files
written by every command is documented here).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2
# Versions the readers handle: version 1 lacks the per-channel 'negatives' statistics and the
# 'storage' and 'input_lists' attributes; readers treat them as absent.
READABLE_VERSIONS = (1, 2)

# Names used by the writer and the readers; change them only with SCHEMA_VERSION.
PREACTIVATION = "preactivation"
ACTIVATION = "activation"
LAYERS = "layers"
IMAGES = "images"
INPUT = "input"
STATS = "stats"
FAILURES = "failures"
DIM_NAMES = ("N", "C", "H", "W")
# Per image and channel statistics (N, C) of a (of z when there is no a), and where the max is.
IMAGE_STATS = ("image_max", "image_mean", "image_zero_fraction")
IMAGE_ARGMAX = "image_argmax"
# Per channel statistics over every image, stored per role as <role>_<name>, (C,).
CHANNEL_STATS = ("min", "max", "mean", "std", "negatives")
# Attributes HDF5's dimension-scale API writes on scales and on the datasets they are attached to.
HDF5_DIMENSION_ATTRS = ("CLASS", "NAME", "REFERENCE_LIST", "DIMENSION_LIST", "DIMENSION_LABELS")

GLOSSARY = (
    "For a layer with input x: the pre-activation z = w * x + b is the layer's linear output, before "
    "its nonlinearity (it has negative values); it is stored as 'preactivation' (symbol z). "
    "The activation a = f(z), e.g. f = relu, is stored as 'activation' (symbol a). "
    "'Feature map' and 'activation map' in the literature mean a ('rectified feature map' when f is "
    "relu). The activation of one layer (after any pooling) is the input of the next; each layer "
    "group's 'input' and 'input_via' attributes say where its input came from."
)

PAIRING_RULE = (
    "How z and a are paired. A conv or linear layer (or any other leaf module): z = its output; a = the "
    "output of the first nonlinearity reached by following z through shape-preserving ops (batch norm, "
    "residual add, dropout, identity), listed in the layer's 'path_to_activation'. A nonlinearity: z = its "
    "input, a = its output. A container (e.g. a ResNet block): a = its output, z = the input of its final "
    "nonlinearity if it ends in one. No nonlinearity reached: z only."
)

ALSO_KNOWN_AS = {
    "relu": "feature map, activation map, rectified feature map",
}
DEFAULT_ALSO_KNOWN_AS = "feature map, activation map"

NO_ACTIVATION_NOTE = (
    "No nonlinearity follows this layer: only its output is stored, as 'preactivation' (z). "
    "There is deliberately no 'activation' dataset (never a copy of z)."
)


def also_known_as(nonlinearity: str) -> str:
    """The names the literature uses for the activation of this nonlinearity."""
    return ALSO_KNOWN_AS.get(nonlinearity, DEFAULT_ALSO_KNOWN_AS)


WEIGHTED_TYPES = ("conv", "linear")  # type names containing these compute w * x + b


def preactivation_description(layer: str, layer_type: str, nonlinearity: str) -> str:
    """One sentence for the ``description`` attribute of a z dataset."""
    weighted = any(word in layer_type.lower() for word in WEIGHTED_TYPES)
    what = "w * x + b" if weighted else "no weights"
    after = f"before its nonlinearity {nonlinearity}" if nonlinearity != "none" else "no nonlinearity follows it"
    return f"z: the output of {layer_type} layer '{layer}' ({what}), {after}; one map per image and channel."


def preactivation_long_name(layer: str, nonlinearity: str) -> str:
    """Short label of a z dataset for plotting tools."""
    if nonlinearity == "none":
        return f"output z of {layer} (no nonlinearity follows)"
    return f"pre-activation z of {layer} (before {nonlinearity})"


def activation_description(layer: str, nonlinearity: str) -> str:
    """One sentence for the ``description`` attribute of an a dataset."""
    return (
        f"a = {nonlinearity}(z): the activation of layer '{layer}', its pre-activation z "
        f"(sibling dataset '{PREACTIVATION}') passed through {nonlinearity}; the 'feature map'."
    )


@dataclass(frozen=True)
class Attr:
    """One HDF5 attribute: its name, stored type and meaning."""

    name: str
    dtype: str
    description: str
    required: bool = True


@dataclass(frozen=True)
class Node:
    """One HDF5 group or dataset; ``{layer}`` in a path stands for each stored layer's name."""

    path: str
    kind: str  # "group" or "dataset"
    description: str
    dtype: str = ""
    shape: str = ""
    attrs: tuple[Attr, ...] = field(default_factory=tuple)
    required: bool = True


MAP_DIMS = "(N, C, H, W)"
MAP_DTYPE = "float32|float16"  # --dtype

SCHEMA: tuple[Node, ...] = (
    Node(
        "/",
        "group",
        "The file. Written under a temporary name and renamed onto its final name only when complete.",
        attrs=(
            Attr("fmap_schema_version", "int64", f"Version of this schema ({SCHEMA_VERSION})."),
            Attr("complete", "int8", "1 once every dataset is written; set last, just before the rename."),
            Attr("fmap_version", "str", "Version of fmap that wrote the file."),
            Attr("torch_version", "str", "Version of PyTorch that ran the forward pass."),
            Attr("created", "str", "Creation time, UTC, ISO 8601."),
            Attr("command", "str", "The command line that made the file."),
            Attr("working_directory", "str", "Where it ran: relative image paths are relative to it."),
            Attr("n_images", "int64", "Number of images N stacked along the first axis of every map."),
            Attr("device", "str", "Device the forward pass ran on (cpu, cuda:0, ...)."),
            Attr(
                "memory_format",
                "str",
                "Memory layout of the batch fed to the model: 'contiguous' (NCHW in C order, as torch.stack of "
                "ToTensor outputs gives: every map equals the model's own forward on /input at the same batch "
                "size) or 'channels_last' (--memory-format channels_last: faster, maps differ by float32 rounding).",
            ),
            Attr("model_name", "str", "Name of the model."),
            Attr("model_source", "str", "Where the model came from: a spec file's path, or builtin:<name>."),
            Attr(
                "model_spec",
                "str (JSON)",
                "The model as JSON: for spec files the parsed spec with defaults and the file's own text "
                "('text'); for PyTorch models the source, factory arguments and architecture (repr).",
            ),
            Attr(
                "weights_sha256",
                "str",
                "SHA-256 of the weights file's bytes, or of the parameters (names, shapes, bytes) without a file.",
            ),
            Attr("preprocessing", "str (JSON)", "Every preprocessing step applied, with its parameters."),
            Attr("layers", "str[]", "Names of the stored layers, in forward order."),
            Attr("glossary", "str", "Human-readable definitions of z, a and 'feature map'."),
            Attr("pairing_rule", "str", "How each layer's z and a were chosen (the rule, in words)."),
            Attr(
                "storage",
                "str (JSON)",
                "How maps are stored: dtype, roles kept, codec per role ([filter, gzip level]); --append "
                "and merge require it to match.",
            ),
            Attr(
                "compressor",
                "str",
                "The library that compressed the gzip map chunks and its own level, e.g. 'isal 1.9.1 level 1' "
                "(ISA-L; gzip:1-3 -> its level 1, 4-6 -> 2, 7-9 -> 3) or 'zlib 1.2.13 level 1' (where isal is "
                "missing; gzip:0 is always zlib's level 0, stored); 'role: ...; role: ...' when z and a differ; "
                "'none' without gzip. Either way the chunks are standard zlib streams, read by any HDF5 deflate "
                "filter; the level in the filter's parameters is the gzip:N asked for, information only. Chunks "
                "copied as stored (--resume, --append, merge) keep the bytes their own writer made. Absent in "
                "files written before it was added (their chunks are zlib's).",
                required=False,
            ),
            Attr("input_list_sha256", "str", "SHA-256 of the whole input list (before sharding), one path a line."),
            Attr("n_inputs", "int64", "Length of that whole input list."),
            Attr(
                "input_lists",
                "str (JSON)",
                "Every input list that added images, in order: the first run's and each --append's, as "
                '[{"sha256": ..., "n_inputs": ...}]; an --append of a list already here adds nothing.',
            ),
            Attr("shard_index", "int64", "K of --shard K/N (0-based); absent when not sharded.", False),
            Attr("shard_count", "int64", "N of --shard K/N; absent when not sharded.", False),
            Attr("merged_from", "str[]", "The shard files `fmap merge` combined (merged files only).", False),
            Attr(
                "virtual",
                "int8",
                "1 for `fmap merge --virtual`: maps are HDF5 virtual datasets over the shards.",
                False,
            ),
        ),
    ),
    Node("/N", "dataset", "Image index 0..N-1: dimension scale N of /input and every map.", "int64", "(N,)"),
    *(
        Node(
            f"/{dim}",
            "dataset",
            f"Dimension scale {dim} of /input; only with /input.",
            "int64",
            f"({dim},)",
            required=False,
        )
        for dim in DIM_NAMES[1:]
    ),
    Node("/images", "group", "One entry per image, in the order given on the command line."),
    Node("/images/path", "dataset", "Image paths as given (UTF-8; undecodable bytes escaped).", "str", "(N,)"),
    Node(
        "/images/original_size",
        "dataset",
        "Image size before preprocessing, as (H, W), after EXIF orientation.",
        "int64",
        "(N, 2)",
    ),
    Node("/images/sha256", "dataset", "SHA-256 of each image file's bytes.", "str", "(N,)"),
    Node(
        "/images/index",
        "dataset",
        "Position of each image in the whole input list (0-based), so shards and merges keep input order.",
        "int64",
        "(N,)",
    ),
    Node(f"/{FAILURES}", "group", "Images skipped with --skip-bad, one entry each, in input order.", required=False),
    Node(f"/{FAILURES}/index", "dataset", "Position of the image in the input list.", "int64", "(F,)", required=False),
    Node(f"/{FAILURES}/path", "dataset", "The image's path as given.", "str", "(F,)", required=False),
    Node(f"/{FAILURES}/reason", "dataset", "Why it could not be used (one line).", "str", "(F,)", required=False),
    Node(
        f"/{INPUT}",
        "dataset",
        "The exact tensor fed to the network (after preprocessing); only with --save-input.",
        "float32",
        "(N, 3, H, W)",
        required=False,
    ),
    Node(f"/{LAYERS}", "group", "One group per stored layer, named as in the model."),
    Node(
        f"/{LAYERS}/{{layer}}",
        "group",
        "One layer: what it is, where its input came from, how z and a were paired, its receptive field.",
        attrs=(
            Attr("type", "str", "Layer type (conv2d, maxpool2d, linear, ...)."),
            Attr("hyperparameters", "str (JSON)", "The layer's hyper-parameters (kernel_size, stride, ...)."),
            Attr(
                "input",
                "str",
                "Where this layer's input came from: the nearest stored dataset upstream (e.g. "
                "/layers/conv1/activation), or 'input' for the image tensor (stored as /input with --save-input).",
            ),
            Attr(
                "input_via",
                "str",
                "Layers applied between 'input' and this layer, e.g. 'pool1'; empty when fed directly.",
            ),
            Attr("nonlinearity", "str", "The nonlinearity f with a = f(z), or 'none'."),
            Attr("has_activation", "int8", "1 if an activation dataset is stored, else 0."),
            Attr("nonlinearity_params", "str (JSON)", 'Parameters of f, e.g. {"negative_slope": 0.1}.'),
            Attr(
                "path_to_activation",
                "str",
                "The ops from z to a in order, e.g. 'layer1.0.bn2 -> add(+maxpool) -> layer1.0.relu#2'; "
                "'add(+X)' means the output of X joins there (a residual add). Empty without a.",
            ),
            Attr("a_is_f_of_z", "int8", "1 when nothing but f lies between z and a, so a == f(z) can be re-checked."),
            Attr("note", "str", "Why there is no activation dataset (only when has_activation = 0).", False),
            Attr("output_shape", "int64[]", "Shape of one image's map: (C, H, W), or (C,) for linear layers."),
            Attr("receptive_field", "int64[2]", "Receptive field of one unit, in input pixels (H, W)."),
            Attr("receptive_field_stride", "int64[2]", "Input pixels between neighbouring units (H, W)."),
            Attr(
                "receptive_field_start",
                "float64[2]",
                "Input-pixel coordinates (row, col) of the centre of unit (0, 0)'s receptive field.",
            ),
            Attr("channel_descriptions", "str[]", "What each channel responds to (built-in models).", False),
        ),
    ),
    *(
        Node(
            f"/{LAYERS}/{{layer}}/{dim}",
            "dataset",
            f"Dimension scale {dim} of the layer's maps: 0..{dim}-1"
            + ("." if dim == "C" else " (absent for flat (N, C) maps)."),
            "int64",
            f"({dim},)",
            required=dim == "C",
        )
        for dim in DIM_NAMES[1:]
    ),
    Node(
        f"/{LAYERS}/{{layer}}/{PREACTIVATION}",
        "dataset",
        "z: the layer's linear output before its nonlinearity. Uncompressed by default. Absent with "
        "--store a. Dimension scales N, C, H, W attached (DIMENSION_LIST, DIMENSION_LABELS).",
        MAP_DTYPE,
        MAP_DIMS,
        attrs=(
            Attr("role", "str", f"'{PREACTIVATION}'."),
            Attr("symbol", "str", "'z'."),
            Attr("long_name", "str", "Short label for plotting tools (xarray, netCDF)."),
            Attr("description", "str", "One sentence saying what this dataset is."),
        ),
        required=False,
    ),
    Node(
        f"/{LAYERS}/{{layer}}/{ACTIVATION}",
        "dataset",
        "a = f(z): the feature map. gzip level 1 (no shuffle) by default. Absent when the layer has "
        "no nonlinearity, or with --store z. Dimension scales N, C, H, W attached.",
        MAP_DTYPE,
        MAP_DIMS,
        attrs=(
            Attr("role", "str", f"'{ACTIVATION}'."),
            Attr("symbol", "str", "'a'."),
            Attr("nonlinearity", "str", "f, e.g. 'relu'."),
            Attr("also_known_as", "str", "Other names: 'feature map, activation map, ...'."),
            Attr("long_name", "str", "Short label for plotting tools (xarray, netCDF)."),
            Attr("description", "str", "One sentence saying what this dataset is and how it relates to z."),
        ),
        required=False,
    ),
    Node(
        f"/{LAYERS}/{{layer}}/{STATS}",
        "group",
        "Statistics computed while writing, so readers need not scan the maps (files of schema version 1 "
        "may lack them: readers then scan the maps).",
        attrs=(Attr("role", "str", "Which map the per-image statistics describe ('activation' or 'preactivation')."),),
    ),
    *(
        Node(
            f"/{LAYERS}/{{layer}}/{STATS}/{name}",
            "dataset",
            f"Per image and channel: the {words} of the map named by the group's 'role' (a, else z).",
            "float32",
            "(N, C)",
        )
        for name, words in zip(IMAGE_STATS, ("maximum", "mean", "fraction of zeros"), strict=True)
    ),
    Node(
        f"/{LAYERS}/{{layer}}/{STATS}/{IMAGE_ARGMAX}",
        "dataset",
        "Per image and channel: (row, col) of image_max in the map (the first, row-major).",
        "int64",
        "(N, C, 2)",
    ),
    *(
        Node(
            f"/{LAYERS}/{{layer}}/{STATS}/{role}_{name}",
            "dataset",
            f"Per channel, over every value of every image: {words} of {symbol}"
            + ("" if role == PREACTIVATION else " (absent without a nonlinearity)")
            + ("" if name != "negatives" else "; absent in schema version 1")
            + ".",
            "float64",
            "(C,)",
            required=role == PREACTIVATION and name != "negatives",
        )
        for role, symbol in ((PREACTIVATION, "z"), (ACTIVATION, "a"))
        for name, words in zip(
            CHANNEL_STATS,
            ("the minimum", "the maximum", "the mean", "the standard deviation (population)", "the fraction below 0"),
            strict=True,
        )
    ),
)


class SchemaError(Exception):
    """fmap tried to write a node or attribute the schema does not document (a bug, never the user's)."""


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile(re.escape(path).replace(re.escape("{layer}"), "[^/]+"))


_PATTERNS = tuple((_pattern(node.path), node) for node in SCHEMA)


def node_for(path: str) -> Node:
    """The schema entry of a concrete HDF5 path (``{layer}`` matches any layer name).

    Raises:
        SchemaError: the path is not documented.
    """
    for pattern, node in _PATTERNS:
        if pattern.fullmatch(path):
            return node
    raise SchemaError(f"{path} is not in the fmap schema")


def attr_for(path: str, name: str) -> Attr:
    """The schema entry of attribute ``name`` of the node at ``path``.

    Raises:
        SchemaError: the node or the attribute is not documented.
    """
    for attr in node_for(path).attrs:
        if attr.name == name:
            return attr
    raise SchemaError(f"attribute {name!r} of {path} is not in the fmap schema")


def to_json() -> dict[str, Any]:
    """The schema for other tools (what ``fmap schema --json`` prints)."""
    return {
        "fmap_schema_version": SCHEMA_VERSION,
        "readable_versions": list(READABLE_VERSIONS),
        "glossary": GLOSSARY,
        "pairing_rule": PAIRING_RULE,
        "hdf5_dimension_attributes": list(HDF5_DIMENSION_ATTRS),
        "nodes": [
            {
                "path": node.path,
                "kind": node.kind,
                "dtype": node.dtype or None,
                "shape": node.shape or None,
                "required": node.required,
                "description": node.description,
                "attributes": [
                    {"name": a.name, "dtype": a.dtype, "required": a.required, "description": a.description}
                    for a in node.attrs
                ],
            }
            for node in SCHEMA
        ],
    }


def render() -> str:
    """The schema as plain-text documentation (what ``fmap schema`` prints)."""
    lines = [f"fmap HDF5 schema, version {SCHEMA_VERSION}", "", *textwrap.wrap(GLOSSARY, 100), ""]
    lines += [*textwrap.wrap(PAIRING_RULE, 100), ""]
    dims = ", ".join(HDF5_DIMENSION_ATTRS)
    lines += [*textwrap.wrap(f"Dimension scales are HDF5's own: they carry the attributes {dims}.", 100), ""]
    for node in SCHEMA:
        kind = node.kind if not node.dtype else f"{node.dtype} {node.shape}"
        optional = "" if node.required else ", optional"
        lines.append(f"{node.path}  [{kind}{optional}]")
        lines.append(f"    {node.description}")
        for attr in node.attrs:
            optional = "" if attr.required else ", optional"
            lines.append(f"    @{attr.name} ({attr.dtype}{optional}): {attr.description}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
