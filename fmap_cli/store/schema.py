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

SCHEMA_VERSION = 3
# Versions the readers handle: version 1 lacks the per-channel 'negatives' statistics and the
# 'storage' and 'input_lists' attributes; readers treat them as absent. Versions 1 and 2 lack the
# maps' 'axes' labels (their maps are all read as channels first, N, C, H, W) and the token and
# receptive-field notes.
READABLE_VERSIONS = (1, 2, 3)

# Names used by the writer and the readers; change them only with SCHEMA_VERSION.
PREACTIVATION = "preactivation"
ACTIVATION = "activation"
LAYERS = "layers"
IMAGES = "images"
INPUT = "input"
STATS = "stats"
FAILURES = "failures"
DIM_NAMES = ("N", "C", "H", "W")  # /input's axes, and the axes of maps in files of schema versions 1 and 2
# What each axis name of a map's 'axes' attribute means.
AXES = {
    "N": "images",
    "C": "channels",
    "H": "rows of the image grid",
    "W": "columns of the image grid",
    "L": "positions along a sequence fmap cannot place in the image (e.g. after a 1-D convolution)",
    "P": "positions fmap cannot place in the image, the first of two such axes (e.g. the windows of window attention)",
    "Q": "positions fmap cannot place in the image, the second of two such axes (e.g. the positions in each window)",
    "T": "tokens: a sequence that runs over image positions (rows and columns merged), see the layer's 'tokens'",
    "D": "features of each token (the channels of a token map)",
}
CHANNEL_AXES = ("C", "D")  # the axis per-channel statistics, dead channels and pictures run over
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


MAP_DIMS = "(N, ...): the axes its 'axes' attribute names, e.g. (N, C, H, W)"
AXES_ATTR = Attr(
    "axes",
    "str",
    "The names of the dataset's axes in order, comma-separated, e.g. 'N,C,H,W' (channels first), 'N,H,W,C' "
    "(channels last, as a linear layer on a permuted map gives), 'N,T,D' (tokens, then features), 'N,C,L' or "
    "'N,C' (flat features). "
    + "; ".join(f"{name}: {words}" for name, words in AXES.items())
    + ". The map is stored exactly as the model computed it (never transposed); per-channel statistics, dead "
    "channels and pictures run over the channel axis (C, or D for tokens). Absent in files of schema versions "
    "1 and 2, whose maps are all N,C,H,W (or N,C, N,C,H).",
)
MAP_DTYPE = "float32|float16"  # --dtype

# Root attributes every kind of fmap file has: the file itself, then the model run that made it,
# then the images it covers.
FILE_ATTRS: tuple[Attr, ...] = (
    Attr("fmap_schema_version", "int64", f"Version of this schema ({SCHEMA_VERSION})."),
    Attr(
        "fmap_file_kind",
        "str",
        "What the file holds: 'maps' (fmap extract, fmap merge); other kinds are listed below with their own "
        "nodes. Absent in schema version 1 files, which are all 'maps'.",
    ),
    Attr("complete", "int8", "1 once every dataset is written; set last, just before the rename."),
    Attr("fmap_version", "str", "Version of fmap that wrote the file."),
    Attr("created", "str", "Creation time, UTC, ISO 8601."),
    Attr("command", "str", "The command line that made the file."),
    Attr("working_directory", "str", "Where it ran: relative image paths are relative to it."),
)
MODEL_ATTRS: tuple[Attr, ...] = (
    Attr(
        "torch_version",
        "str",
        "Version of PyTorch that ran the forward pass; in a merged file, each distinct one of its shards "
        "(in shard order, joined with ', ').",
    ),
    Attr(
        "device",
        "str",
        "Device the forward pass ran on (cpu, cuda:0, ...); in a merged file, each distinct one of its shards "
        "(in shard order, joined with ', ').",
    ),
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
)
IMAGES_ATTRS: tuple[Attr, ...] = (
    Attr("n_images", "int64", "Number of images N stacked along the first axis of every map."),
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
)

# Nodes every kind of fmap file has: the image records along N, failures, and the input tensor.
IMAGE_NODES: tuple[Node, ...] = (
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
        attrs=(Attr("axes", "str", "'N,C,H,W' (absent in files of schema versions 1 and 2)."),),
        required=False,
    ),
)

SCHEMA: tuple[Node, ...] = (
    Node(
        "/",
        "group",
        "The file. Written under a temporary name and renamed onto its final name only when complete.",
        attrs=(
            *FILE_ATTRS,
            *MODEL_ATTRS,
            *IMAGES_ATTRS,
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
                "copied as stored (--resume, --append, merge) keep the bytes their own writer made: a file whose "
                "chunks different libraries made holds each distinct value (in the order the files were "
                "written, joined with ', '; 'unrecorded (zlib)' for a file written before the attribute). "
                "Absent in files written before "
                "it was added (their chunks are zlib's).",
                required=False,
            ),
            Attr("merged_from", "str[]", "The shard files `fmap merge` combined (merged files only).", False),
            Attr(
                "virtual",
                "int8",
                "1 for `fmap merge --virtual`: maps are HDF5 virtual datasets over the shards. HDF5 holds every "
                "shard open while reading across them and reads those past the open-file limit (ulimit -n) as "
                "fill values (NaN) without an error; fmap raises its own soft limit to fit them.",
                False,
            ),
        ),
    ),
    *IMAGE_NODES,
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
            Attr(
                "output_shape",
                "int64[]",
                "Shape of one image's map, in the order of the maps' 'axes' less N: (C, H, W), (H, W, C), (T, D), "
                "(C,) for flat features, ...",
            ),
            Attr(
                "tokens",
                "str",
                "What the token axis T holds, in words, e.g. '1 token not from the image grid (e.g. a class token), "
                "then 14x14 = 196 patch tokens, row-major'; or that fmap could not tell. Only for token maps.",
                False,
            ),
            Attr(
                "token_prefix",
                "int64",
                "Number of tokens before the patch tokens along T (e.g. 1 for a class token); only where known.",
                False,
            ),
            Attr(
                "token_grid",
                "int64[2]",
                "(rows, columns) of the patch tokens that follow the prefix along T, row-major, up to T's end: "
                "token prefix + r * columns + c is the patch at row r, column c; only where known.",
                False,
            ),
            Attr(
                "receptive_field",
                "int64[2]",
                "Receptive field of one unit, in input pixels (H, W): the extent of input it depends on, padding "
                "included, so near the border part of it lies outside the image. Where maps join (a residual add, "
                "a concatenation, a squeeze-and-excitation scale * x) it holds every joined field; flat features "
                "(after flatten or global pooling) see the whole image. (-1, -1): unknown, because the units have "
                "no place in the image (a token sequence: rows and columns merged by a reshape, or mixed by "
                "attention) or an op moved them in a way fmap does not follow; render --overlay and --top refuse "
                "such a layer.",
            ),
            Attr(
                "receptive_field_stride",
                "int64[2]",
                "Input pixels between neighbouring units (H, W); (0, 0) for flat features; (-1, -1) when unknown.",
            ),
            Attr(
                "receptive_field_start",
                "float64[2]",
                "Input-pixel coordinates (row, col) of the centre of unit (0, 0)'s receptive field; NaN when unknown.",
            ),
            Attr(
                "receptive_field_note",
                "str",
                "Why the receptive field is unknown, in words (e.g. attention mixes the positions of a token "
                "sequence); only when it is unknown (-1, -1).",
                False,
            ),
            Attr("channel_descriptions", "str[]", "What each channel responds to (built-in models).", False),
        ),
    ),
    *(
        Node(
            f"/{LAYERS}/{{layer}}/{dim}",
            "dataset",
            f"Dimension scale {dim} ({words}) of the layer's maps: 0..{dim}-1; one for each axis the maps have "
            "(schema versions 1 and 2: C, H, W, as many as the maps have).",
            "int64",
            f"({dim},)",
            required=False,
        )
        for dim, words in AXES.items()
        if dim != "N"
    ),
    Node(
        f"/{LAYERS}/{{layer}}/{PREACTIVATION}",
        "dataset",
        "z: the layer's linear output before its nonlinearity. Uncompressed by default. Absent with "
        "--store a. Dimension scales attached, one per axis, labelled as 'axes' names them (DIMENSION_LIST, "
        "DIMENSION_LABELS).",
        MAP_DTYPE,
        MAP_DIMS,
        attrs=(
            AXES_ATTR,
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
        "no nonlinearity, or with --store z. Dimension scales attached, one per axis (see 'axes'); z and a "
        "have the same axes.",
        MAP_DTYPE,
        MAP_DIMS,
        attrs=(
            AXES_ATTR,
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
            f"Per image and channel: the {words} of the map named by the group's 'role' (a, else z); C is the "
            "maps' channel axis (C, or D for tokens), whatever its place among their axes.",
            "float32",
            "(N, C)",
        )
        for name, words in zip(IMAGE_STATS, ("maximum", "mean", "fraction of zeros"), strict=True)
    ),
    Node(
        f"/{LAYERS}/{{layer}}/{STATS}/{IMAGE_ARGMAX}",
        "dataset",
        "Per image and channel: (row, col) of image_max in the channel's map (the first, row-major): along H and W "
        "whatever their order among the axes; for maps with one axis besides the channels (T, L), (index, 0); for "
        "flat maps (0, 0). int64 in schema version 1.",
        "int32",
        "(N, C, 2)",
    ),
    *(
        Node(
            f"/{LAYERS}/{{layer}}/{STATS}/{role}_{name}",
            "dataset",
            f"Per channel, over every value of every image: {words} of {symbol}"
            + ("" if role == PREACTIVATION else " (absent without a nonlinearity)")
            + ("" if name != "negatives" else "; absent in schema version 1")
            + " (float64 in schema version 1; pooled in float64 by merge and --append).",
            "float32",
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


# ---------------------------------------------------------------------------- projection files (fmap project)

PROJECTION = "projection"
# How each --method passes the signal back, in words (stored as /projection@rule).
PROJECTION_METHODS = {
    "deconvnet": (
        "Zeiler & Fergus 2014: at every nonlinearity f the signal g passes back as relu(g), whatever the "
        "forward input and without f's derivative (for ReLU: only the backward sign mask); max pooling sends it "
        "to the positions of the forward maxima (its switches), a convolution back through its transposed "
        "filters; batch norm, residual adds and every other op pass back their ordinary gradient. Nonlinearities "
        "other than ReLU (leaky ReLU, GELU, SiLU, sigmoid, tanh, ...) are treated alike: relu(g)."
    ),
    "guided": (
        "Springenberg et al. 2015 (guided backpropagation): at every nonlinearity f the signal g passes back as "
        "f'(x) relu(g): for ReLU only where both the forward input x and the backward signal g are positive (both "
        "sign masks); nonlinearities other than ReLU (leaky ReLU, GELU, SiLU, sigmoid, tanh, ...) apply their own "
        "derivative f'(x) to relu(g). Every other op passes back its ordinary gradient."
    ),
    "gradient": (
        "Simonyan et al. 2014: the plain gradient of the unit's activation with respect to the input, times the "
        "activation's value; every op, nonlinearities included, passes back its ordinary gradient."
    ),
}
PROJECTED_NONLINEARITIES = (
    "The rules apply to every nonlinearity the pairing rule recognises (relu, relu6, leaky_relu, elu, celu, selu, "
    "gelu, silu, hardswish, hardsigmoid, mish, sigmoid, tanh, prelu, softplus, hardtanh), as a module, a function "
    "or an in-place method; any other op passes back its ordinary gradient."
)
UNIT_KINDS = ("unit", "whole map")

PROJECTION_SCHEMA: tuple[Node, ...] = (
    Node(
        "/",
        "group",
        "A projection file (fmap project): single activations of one channel of a maps file, each projected "
        "back to the network's input pixels. Written like every fmap file: complete when it appears.",
        attrs=(
            *FILE_ATTRS,
            *MODEL_ATTRS,
            Attr("source_file", "str", "The fmap file (maps) whose images, preprocessing and model were used."),
            Attr("source_input_list_sha256", "str", "That file's input_list_sha256: which input list it covers."),
            Attr("n_units", "int64", "Number K of projections (one unit, or one whole map, each)."),
        ),
    ),
    Node(
        f"/{PROJECTION}",
        "dataset",
        "The projections: layer L's activation map with every entry zeroed but the unit (which keeps its value), "
        "passed back to the input by the method's rule; in the network's input space (before de-normalisation), "
        "so a projection scales with the activation it shows. gzip level 1.",
        "float32",
        "(K, 3, H, W)",
        attrs=(
            Attr("role", "str", "'projection'."),
            Attr("method", "str", "deconvnet, guided or gradient: see 'rule'."),
            Attr(
                "rule",
                "str",
                "How the method passes the signal back through each op, in words. " + PROJECTED_NONLINEARITIES,
            ),
            Attr("layer", "str", "The layer L whose activation (its z when it has no nonlinearity) was projected."),
            Attr("channel", "int64", "The channel C of L."),
            Attr(
                "units",
                "str",
                "'unit': each projection starts from one unit (/unit/row, /unit/col); 'whole map': from every "
                "activation of channel C on that image (Zeiler's 'feature map as input').",
            ),
            Attr("receptive_field", "int64[2]", "Receptive field of one unit of L, in input pixels (H, W)."),
            Attr("receptive_field_stride", "int64[2]", "Input pixels between neighbouring units of L (H, W)."),
            Attr(
                "receptive_field_start",
                "float64[2]",
                "Input-pixel coordinates (row, col) of the centre of unit (0, 0)'s receptive field.",
            ),
            Attr("description", "str", "One sentence saying what this dataset is."),
        ),
    ),
    Node(
        f"/{INPUT}",
        "dataset",
        "The input tensor of each projection's image, as fed to the network (after preprocessing), for pictures "
        "of the projections beside their images. gzip level 1.",
        "float32",
        "(K, 3, H, W)",
    ),
    Node("/unit", "group", "Where each projection starts, one entry per projection."),
    Node("/unit/image", "dataset", "Index of the image in the source file (its /images order).", "int64", "(K,)"),
    Node("/unit/path", "dataset", "The image's path, as the source file stores it.", "str", "(K,)"),
    Node("/unit/row", "dataset", "Row of the unit in L's map; -1 for a whole map.", "int64", "(K,)"),
    Node("/unit/col", "dataset", "Column of the unit in L's map; -1 for a whole map.", "int64", "(K,)"),
    Node(
        "/unit/value",
        "dataset",
        "The activation projected (recomputed; with a whole map, the map's maximum).",
        "float32",
        "(K,)",
    ),
)


# ---------------------------------------------------------------------------- occlusion files (fmap occlude)

OCCLUSION = "occlusion"
OCCLUSION_METHOD = (
    "Occlusion sensitivity (Zeiler & Fergus, ECCV 2014, section 4.2 and Fig. 7): a square of one colour covers "
    "each part of the image in turn; at every position the network runs on the covered copy and records the "
    "total activation of a feature map (its sum over the map) and, for a classifier, the probability of a class "
    "and the most probable label. Where covering a part lowers the total, the feature map needs that part."
)

OCCLUSION_SCHEMA: tuple[Node, ...] = (
    Node(
        "/",
        "group",
        "An occlusion file (fmap occlude). Written under a temporary name and renamed onto its final name only "
        "when complete.",
        attrs=(
            *FILE_ATTRS,
            *MODEL_ATTRS,
            *IMAGES_ATTRS,
            Attr("layer", "str", "The layer L whose feature maps were summed (--layer); absent without it.", False),
            Attr("patch", "int64[2]", "Occluder size (H, W) in input pixels (--patch)."),
            Attr(
                "stride",
                "int64[2]",
                "Input pixels between neighbouring occluder positions (H, W) (--stride); the last position of a "
                "column or row may be closer, flush with the image's edge.",
            ),
            Attr(
                "fill",
                "float64[3]",
                "The occluder's colour as R, G, B in [0, 1] pixel space, before normalisation: grey = 0.5 (the "
                "paper's grey square), mean = the normalisation mean (zero after normalising), zero = black, or "
                "--fill R,G,B divided by 255. The network sees (fill - mean) / std.",
            ),
            Attr("fill_name", "str", "--fill as given: grey, mean, zero or R,G,B (0-255)."),
            Attr(
                "channel_choice",
                "str",
                "How /occlusion/channel was chosen: 'strongest' (per image, the channel of L with the largest total "
                "activation on the unoccluded image), 'given' (--channel C or C1,C2,...) or 'all'; absent without "
                "--layer.",
                False,
            ),
            Attr(
                "class_choice",
                "str",
                "How /occlusion/class was chosen: 'top1' (per image, the most probable class of the unoccluded "
                "image) or 'given' (--class K); absent without class maps.",
                False,
            ),
            Attr("n_classes", "int64", "K: the number of class scores the model outputs; absent without them.", False),
            Attr(
                "class_names_source",
                "str",
                "Where /occlusion/class_names came from (e.g. a torchvision weights' categories, timm's ImageNet "
                "label info); absent without names.",
                False,
            ),
        ),
    ),
    *IMAGE_NODES,
    Node(
        f"/{OCCLUSION}",
        "group",
        "What each occluder position did to the network. Positions: top-left corners y = 0, S, 2S, ... up to "
        "H - P (likewise x), plus one flush with the edge when H - P is not a multiple of S, so every pixel is "
        "covered; row-major over (y, x).",
        attrs=(Attr("description", "str", "The method, in words."),),
    ),
    *(
        Node(
            f"/{OCCLUSION}/{axis}",
            "dataset",
            f"Top-left {what} of each occluder position, in input pixels: dimension scale {axis} of the maps.",
            "int64",
            f"(G{axis},)",
            attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        )
        for axis, what in (("y", "row"), ("x", "column"))
    ),
    Node(
        f"/{OCCLUSION}/activity",
        "dataset",
        "Total activation of L's channel /occlusion/channel[n, k] (the sum of a over the map; of z when L has no "
        "nonlinearity) with the occluder at (y, x): Zeiler's Fig. 7(b); compare with /occlusion/baseline. Only "
        "with --layer. Dimension scales N, y, x attached.",
        "float32",
        "(N, n_channels, Gy, Gx)",
        attrs=(
            Attr("role", "str", "The map summed: 'activation' (a) or 'preactivation' (z, when L has none)."),
            Attr("description", "str", "One sentence saying what this dataset is."),
        ),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/channel",
        "dataset",
        "The channels of L in /occlusion/activity, per image (see the root's channel_choice). Only with --layer.",
        "int64",
        "(N, n_channels)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/baseline",
        "dataset",
        "Total activation of each of those channels on the unoccluded image. Only with --layer.",
        "float32",
        "(N, n_channels)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/probability",
        "dataset",
        "Softmax probability of /occlusion/class with the occluder at (y, x): Zeiler's Fig. 7(d). Only when the "
        "model outputs class scores (N, K). Dimension scales N, y, x attached.",
        "float32",
        "(N, Gy, Gx)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/label",
        "dataset",
        "The most probable class (0..K-1) with the occluder at (y, x): Zeiler's Fig. 7(e). Only with class scores. "
        "Dimension scales N, y, x attached.",
        "int64",
        "(N, Gy, Gx)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/class",
        "dataset",
        "The class whose probability /occlusion/probability holds, per image (see the root's class_choice).",
        "int64",
        "(N,)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/class_probability",
        "dataset",
        "Probability of /occlusion/class on the unoccluded image.",
        "float32",
        "(N,)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/top_class",
        "dataset",
        "The most probable class of the unoccluded image.",
        "int64",
        "(N,)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
    Node(
        f"/{OCCLUSION}/class_names",
        "dataset",
        "Name of each class 0..K-1, from the model where it has them (see the root's class_names_source).",
        "str",
        "(K,)",
        attrs=(Attr("description", "str", "One sentence saying what this dataset is."),),
        required=False,
    ),
)


# Every kind of fmap file and its nodes; the root attribute fmap_file_kind says which a file is.
MAPS = "maps"
KINDS: dict[str, tuple[Node, ...]] = {MAPS: SCHEMA, PROJECTION: PROJECTION_SCHEMA, OCCLUSION: OCCLUSION_SCHEMA}


class SchemaError(Exception):
    """fmap tried to write a node or attribute the schema does not document (a bug, never the user's)."""


def _pattern(path: str) -> re.Pattern[str]:
    return re.compile(re.escape(path).replace(re.escape("{layer}"), "[^/]+"))


_PATTERNS = {kind: tuple((_pattern(node.path), node) for node in nodes) for kind, nodes in KINDS.items()}


def node_for(path: str, kind: str = MAPS) -> Node:
    """The schema entry of a concrete HDF5 path in a file of ``kind`` (``{layer}`` matches any name).

    Raises:
        SchemaError: the path is not documented.
    """
    for pattern, node in _PATTERNS[kind]:
        if pattern.fullmatch(path):
            return node
    raise SchemaError(f"{path} is not in the fmap schema" + ("" if kind == MAPS else f" of {kind} files"))


def attr_for(path: str, name: str, kind: str = MAPS) -> Attr:
    """The schema entry of attribute ``name`` of the node at ``path`` in a file of ``kind``.

    Raises:
        SchemaError: the node or the attribute is not documented.
    """
    for attr in node_for(path, kind).attrs:
        if attr.name == name:
            return attr
    raise SchemaError(
        f"attribute {name!r} of {path} is not in the fmap schema" + ("" if kind == MAPS else f" of {kind} files")
    )


def to_json() -> dict[str, Any]:
    """The schema for other tools (what ``fmap schema --json`` prints)."""
    return {
        "fmap_schema_version": SCHEMA_VERSION,
        "readable_versions": list(READABLE_VERSIONS),
        "glossary": GLOSSARY,
        "pairing_rule": PAIRING_RULE,
        "hdf5_dimension_attributes": list(HDF5_DIMENSION_ATTRS),
        "kinds": {
            kind: [
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
                for node in nodes
            ]
            for kind, nodes in KINDS.items()
        },
    }


def render() -> str:
    """The schema as plain-text documentation (what ``fmap schema`` prints)."""
    lines = [f"fmap HDF5 schema, version {SCHEMA_VERSION}", "", *textwrap.wrap(GLOSSARY, 100), ""]
    lines += [*textwrap.wrap(PAIRING_RULE, 100), ""]
    dims = ", ".join(HDF5_DIMENSION_ATTRS)
    lines += [*textwrap.wrap(f"Dimension scales are HDF5's own: they carry the attributes {dims}.", 100), ""]
    for file_kind, nodes in KINDS.items():
        if file_kind != MAPS:
            lines += [f"--- {file_kind} files (fmap_file_kind = '{file_kind}') ---", ""]
        lines += _render_nodes(nodes)
    return "\n".join(lines).rstrip() + "\n"


def _render_nodes(nodes: tuple[Node, ...]) -> list[str]:
    lines = []
    for node in nodes:
        kind = node.kind if not node.dtype else f"{node.dtype} {node.shape}"
        optional = "" if node.required else ", optional"
        lines.append(f"{node.path}  [{kind}{optional}]")
        lines.append(f"    {node.description}")
        for attr in node.attrs:
            optional = "" if attr.required else ", optional"
            lines.append(f"    @{attr.name} ({attr.dtype}{optional}): {attr.description}")
        lines.append("")
    return lines
