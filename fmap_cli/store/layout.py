"""The layout of a new fmap file, built from the schema: every group, dataset and attribute is
created through :func:`set_attrs` / :func:`create_dataset`, which refuse anything ``schema.py``
does not document and store each attribute with the type the schema gives. h5py and numpy only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .. import __version__
from . import schema
from .axes import Axes, Tokens, channel_axis, default_axes, joined
from .chunks import chunk_shape, describe_compressors

STR = h5py.string_dtype("utf-8")
ROW_CHUNK_BYTES = 4 << 10  # chunks of the small datasets along N (records, statistics): about 4 KiB

Codec = tuple[str | None, int]  # (h5py filter "gzip" / "lzf" / None, gzip level)


@dataclass(frozen=True)
class Storage:
    """How maps are stored: a codec per role, the dtype, and which roles are kept.

    Defaults from ../shared/HDF5-NOTES.md: sparse a compresses 2-3.5x with gzip level 1 (shuffle
    hurts it); dense z gains under 1.2x for about 20x the write time, so it is stored raw.
    """

    preactivation: Codec = (None, 0)
    activation: Codec = ("gzip", 1)
    dtype: str = "float32"  # or "float16"
    roles: frozenset[str] = frozenset({schema.PREACTIVATION, schema.ACTIVATION})

    def describe(self) -> dict[str, Any]:
        """JSON-able, recorded in the file and compared by --append."""
        return {
            "dtype": self.dtype,
            "roles": sorted(self.roles),
            "preactivation": list(self.preactivation),
            "activation": list(self.activation),
        }

    def stores(self, layer: LayerRecord, role: str) -> bool:
        """Whether ``layer``'s map ``role`` gets a dataset."""
        return role in self.roles and (role == schema.PREACTIVATION or layer.has_activation)


@dataclass(frozen=True)
class LayerRecord:
    """What the file says about one layer besides its maps."""

    name: str
    type: str
    hyperparameters: dict[str, Any]
    input: str  # nearest upstream stored dataset, or "input" (the image tensor)
    input_via: str  # layers applied between that dataset and this layer, "a -> b"; "" if none
    nonlinearity: str  # "none" when the layer has no nonlinearity
    nonlinearity_params: dict[str, Any]  # e.g. {"negative_slope": 0.1}
    path_to_activation: str  # what lies between z and a, e.g. "bn1 -> add(+maxpool) -> relu"
    a_is_f_of_z: bool  # nothing but f lies between z and a
    output_shape: tuple[int, ...]  # per image: (C, H, W) or (C,)
    receptive_field: tuple[int, int]
    receptive_field_stride: tuple[int, int]
    receptive_field_start: tuple[float, float]
    channel_descriptions: tuple[str, ...] = ()
    axes: Axes = ()  # names of the maps' axes, N first (see schema.AXES); () = channels first
    tokens: Tokens | None = None  # what the token axis T holds (token maps only)
    field_note: str = ""  # why the receptive field is unknown, in words

    @property
    def map_axes(self) -> Axes:
        """The maps' axes, N included."""
        return self.axes or default_axes(len(self.output_shape) + 1)

    @property
    def channels(self) -> int:
        """Length of the channel axis (C, or D for tokens)."""
        return self.output_shape[channel_axis(self.map_axes) - 1]

    @property
    def has_activation(self) -> bool:
        return self.nonlinearity != "none"

    @property
    def roles(self) -> list[str]:
        """The maps this layer has: z, and a when a nonlinearity follows."""
        return [schema.PREACTIVATION, schema.ACTIVATION] if self.has_activation else [schema.PREACTIVATION]


def safe_text(value: str) -> str:
    """Text as valid UTF-8: undecodable bytes from file names or argv (surrogate escapes) become
    backslash escapes, so h5py can store them and every reader can show them."""
    return os.fsencode(value).decode("utf-8", "backslashreplace")


def encode(dtype: str, value: Any) -> Any:
    """``value`` as the HDF5 type the schema gives for an attribute (``int8``, ``str (JSON)``, ...)."""
    base = dtype.split(" ")[0].split("[")[0]
    if dtype.startswith("str") and "[" in dtype:
        return np.array([safe_text(str(v)) for v in value], dtype=STR)
    if dtype == "str (JSON)" and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=True)
    if base == "str":
        return safe_text(str(value))
    if "[" in dtype:
        return np.asarray(value, dtype=base)
    return np.dtype(base).type(value)


def encode_root(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Root attributes as they are stored (for comparing a run with a file)."""
    return {name: encode(schema.attr_for("/", name).dtype, value) for name, value in attrs.items()}


def join_distinct(values: Iterable[str]) -> str:
    """One attribute for values that several writers of a file recorded (merge, --append, --resume):
    each distinct value once, in order, joined with ', '; values joined before are split again."""
    return ", ".join(dict.fromkeys(part for value in values for part in value.split(", ")))


def set_attrs(obj: h5py.HLObject, **values: Any) -> None:
    """Set attributes of ``obj``, each documented by the schema and stored as its type.

    Raises:
        schema.SchemaError: an attribute the schema does not document for this node.
    """
    kind = values.get("fmap_file_kind") or file_kind(obj.file)
    for name, value in values.items():
        obj.attrs[name] = encode(schema.attr_for(obj.name, name, kind).dtype, value)


def file_kind(f: h5py.File) -> str:
    """What a file holds (``schema.KINDS``); files of schema version 1 are all maps."""
    kind = f.attrs.get("fmap_file_kind", schema.MAPS)
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def create_dataset(parent: h5py.Group, name: str, keep: list[Any] | None = None, **options: Any) -> h5py.Dataset:
    """``parent.create_dataset(name, **options)`` for a dataset the schema documents; appended to
    ``keep`` when given (see :func:`create_layout`)."""
    schema.node_for(f"{parent.name.rstrip('/')}/{name}", file_kind(parent.file))
    ds = parent.create_dataset(name, **options)
    if keep is not None:
        keep.append(ds)
    return ds


def create_group(parent: h5py.Group, name: str, keep: list[Any] | None = None) -> h5py.Group:
    """``parent.create_group(name)`` for a group the schema documents; appended to ``keep`` when given."""
    schema.node_for(f"{parent.name.rstrip('/')}/{name}", file_kind(parent.file))
    group = parent.create_group(name)
    if keep is not None:
        keep.append(group)
    return group


def growing(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any, keep: list[Any]) -> h5py.Dataset:
    """A dataset along N (resizable, on the N scale) with rows of ``shape``.

    Chunks hold as many rows as fit in ROW_CHUNK_BYTES (at least one): HDF5 allocates a whole
    chunk on the first write, so a chunk of many rows of a wide layer would make a one-image file
    megabytes bigger than its maps.
    """
    itemsize = 16 if h5py.check_string_dtype(np.dtype(dtype)) else np.dtype(dtype).itemsize  # a string: a heap ref
    row_bytes = itemsize * int(np.prod(shape, dtype=np.int64))
    rows = max(1, min(1024, ROW_CHUNK_BYTES // max(1, row_bytes)))
    ds = create_dataset(
        group, name, keep, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=(rows, *shape)
    )
    ds.dims[0].attach_scale(group.file["N"])
    ds.dims[0].label = "N"
    return ds


def written_now() -> dict[str, str]:
    """``fmap_version`` and ``created`` (UTC, ISO 8601): which fmap wrote a file, and when."""
    return {"fmap_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def start_file(f: h5py.File, kind: str, **attrs: Any) -> None:
    """The root attributes every fmap file starts with: its schema version and kind, ``complete`` = 0
    (1 once finished), :func:`written_now`; then ``attrs``."""
    set_attrs(f, fmap_schema_version=schema.SCHEMA_VERSION, fmap_file_kind=kind, complete=0, **written_now(), **attrs)


def create_images(f: h5py.File, keep: list[Any]) -> None:
    """The N dimension scale and the /images table (path, sha256, original_size, index), empty and
    growing, of a file with a row per image."""
    n_scale = create_dataset(f, "N", keep, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(ROW_CHUNK_BYTES // 8,))
    n_scale.make_scale("N")
    images = create_group(f, schema.IMAGES, keep)
    for name, dtype, shape in (("path", STR, ()), ("sha256", STR, ()), ("original_size", np.int64, (2,)),
                               ("index", np.int64, ())):  # fmt: skip
        growing(images, name, shape, dtype, keep)


def create_layout(
    f: h5py.File,
    layers: Sequence[LayerRecord],
    attrs: Mapping[str, Any],
    input_shape: tuple[int, int, int] | None,
    storage: Storage,
) -> list[Any]:
    """Create every node of an empty fmap file (no images yet; ``complete`` = 0).

    Returns every group and dataset created, for the caller to keep open until it closes the
    file: HDF5 writes when an object is closed, and a write that fails there (disk full) is one
    h5py can only print, never raise.

    Args:
        f: a new, empty file open for writing.
        layers: the stored layers, in forward order.
        attrs: root attributes from the caller (model, versions, preprocessing, input list, ...).
        input_shape: (3, H, W) to store the input tensor as /input, else None.
        storage: dtype, codecs and roles.
    """
    codecs = {schema.PREACTIVATION: storage.preactivation, schema.ACTIVATION: storage.activation}
    start_file(
        f,
        schema.MAPS,
        n_images=0,
        layers=[layer.name for layer in layers],
        glossary=schema.GLOSSARY,
        pairing_rule=schema.PAIRING_RULE,
        storage=storage.describe(),
        compressor=describe_compressors({r: c for r, c in codecs.items() if r in storage.roles}),
    )
    set_attrs(f, **attrs)
    keep: list[Any] = []
    create_images(f, keep)
    if input_shape is not None:
        _create_scales(f, input_shape, schema.DIM_NAMES, keep)
        pixels = _create_map(f, schema.INPUT, input_shape, schema.DIM_NAMES, (None, 0), np.dtype(np.float32), keep)
        set_attrs(pixels, axes=joined(schema.DIM_NAMES))
    group = create_group(f, schema.LAYERS, keep)
    for layer in layers:
        _create_layer(group, layer, storage, keep)
    return keep


def _create_layer(parent: h5py.Group, layer: LayerRecord, storage: Storage, keep: list[Any]) -> None:
    group = create_group(parent, layer.name, keep)
    set_attrs(
        group,
        type=layer.type,
        hyperparameters=layer.hyperparameters,
        input=layer.input,
        input_via=layer.input_via,
        nonlinearity=layer.nonlinearity,
        has_activation=storage.stores(layer, schema.ACTIVATION),
        nonlinearity_params=layer.nonlinearity_params,
        path_to_activation=layer.path_to_activation,
        a_is_f_of_z=layer.a_is_f_of_z,
        output_shape=layer.output_shape,
        receptive_field=layer.receptive_field,
        receptive_field_stride=layer.receptive_field_stride,
        receptive_field_start=layer.receptive_field_start,
    )
    if not layer.has_activation:
        set_attrs(group, note=schema.NO_ACTIVATION_NOTE)
    if layer.channel_descriptions:
        set_attrs(group, channel_descriptions=layer.channel_descriptions)
    if layer.field_note:
        set_attrs(group, receptive_field_note=layer.field_note)
    if layer.tokens is not None:
        set_attrs(group, tokens=layer.tokens.describe())
        if layer.tokens.prefix is not None and layer.tokens.grid is not None:
            set_attrs(group, token_prefix=layer.tokens.prefix, token_grid=layer.tokens.grid)
    axes = layer.map_axes
    _create_scales(group, layer.output_shape, axes, keep)
    dtype = np.dtype(storage.dtype)
    if storage.stores(layer, schema.PREACTIVATION):
        z = _create_map(group, schema.PREACTIVATION, layer.output_shape, axes, storage.preactivation, dtype, keep)
        set_attrs(
            z,
            axes=joined(axes),
            role=schema.PREACTIVATION,
            symbol="z",
            long_name=schema.preactivation_long_name(layer.name, layer.nonlinearity),
            description=schema.preactivation_description(layer.name, layer.type, layer.nonlinearity),
        )
    if storage.stores(layer, schema.ACTIVATION):
        a = _create_map(group, schema.ACTIVATION, layer.output_shape, axes, storage.activation, dtype, keep)
        set_attrs(
            a,
            axes=joined(axes),
            role=schema.ACTIVATION,
            symbol="a",
            nonlinearity=layer.nonlinearity,
            also_known_as=schema.also_known_as(layer.nonlinearity),
            long_name=f"activation a = {layer.nonlinearity}(z) of {layer.name}",
            description=schema.activation_description(layer.name, layer.nonlinearity),
        )
    stats = create_group(group, schema.STATS, keep)
    set_attrs(stats, role=schema.ACTIVATION if layer.has_activation else schema.PREACTIVATION)
    channels = layer.channels
    for name in schema.IMAGE_STATS:
        growing(stats, name, (channels,), np.float32, keep)
    growing(stats, schema.IMAGE_ARGMAX, (channels, 2), np.int32, keep)


def _create_map(
    group: h5py.Group,
    name: str,
    shape: tuple[int, ...],
    axes: Sequence[str],
    codec: Codec,
    dtype: np.dtype[Any],
    keep: list[Any],
) -> h5py.Dataset:
    """A map dataset along N with rows of ``shape``, its dims labelled ``axes`` and attached to the
    scales :func:`_create_scales` made."""
    options: dict[str, Any] = {}
    if codec[0] is not None:
        options["compression"] = codec[0]
        if codec[0] == "gzip":
            options["compression_opts"] = codec[1]
    ds = create_dataset(
        group,
        name,
        keep,
        shape=(0, *shape),
        maxshape=(None, *shape),
        dtype=dtype,
        chunks=chunk_shape(shape, dtype.itemsize),
        fillvalue=np.nan,
        **options,
    )
    ds.dims[0].attach_scale(group.file["N"])
    for axis, dim in enumerate(axes):
        ds.dims[axis].label = dim
        if axis > 0:
            ds.dims[axis].attach_scale(group[dim])
    return ds


def _create_scales(group: h5py.Group, shape: tuple[int, ...], axes: Sequence[str], keep: list[Any]) -> None:
    """Index datasets in ``group``, one per axis after N (named as ``axes`` names them), made dimension scales."""
    for dim, length in zip(axes[1:], shape, strict=True):
        create_dataset(group, dim, keep, data=np.arange(length, dtype=np.int64)).make_scale(dim)
