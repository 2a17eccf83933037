"""Receptive fields of tensors, followed through every operation of a forward pass (for ``pairing.py``).

Every tensor that depends on the input image gets a :class:`Field`: the :class:`Geometry` of its
units and which of its dims hold the image's rows and columns, so fields follow the spatial axes
through permutes (channels-last blocks), reshapes that keep them (channel shuffle), splits,
slices and padding. An op on several maps (add, mul, cat, stack, where, ...) gives each unit the
union of what its operands' units see, whatever the operand order and with broadcasting (the
``scale * x`` of squeeze-and-excitation). A tensor whose units cannot be placed in the image
(a token sequence, after a reshape that merged rows and columns) has an unknown field, with the
reason in words; so does the result of any op no rule here follows.

A field also says which dims hold what, for naming the axes of stored maps (``axes.py``): the
rows and columns (kept where the geometry is unknown but the dims survive, e.g. ``torch.roll``),
the token dim of a sequence with its class-token prefix and patch grid where known, and the
channel dim where an op says so (convolution, batch norm: 1; linear, layer norm, attention: last).

Normalisation statistics (layer, group or instance norm) are not counted: they rescale a map
but do not move what its units see. Tensors that do not depend on the input (parameters,
constants) have no field at all: they join an op without widening anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .geometry import Geometry, Pair

MERGED = (
    "a reshape merged the image's rows and columns into one axis (a token sequence), so its units have no place in "
    "the image"
)
ATTENTION = "attention mixes the positions of a token sequence, so its units have no place in the image"
CONSTANT = "the output does not depend on the input image"


@dataclass(frozen=True)
class Field:
    """Where the elements of one tensor look in the input image."""

    geometry: Geometry | None  # None: unknown (``reason`` says why)
    # dims of rows and columns (also when the geometry is unknown); None: flat, every element sees one box
    axes: tuple[int, int] | None = None
    merged: int | None = None  # unknown, but this dim runs over every image position (rows x columns)
    reason: str = ""
    # along ``merged``: (prefix, rows, columns): ``prefix`` tokens not from the image (a class token),
    # then a rows x columns grid of positions, row-major, to the dim's end; None: not known
    tokens: tuple[int, int, int] | None = None
    channel: int | None = None  # the dim holding channels (features), where an op says so; None: not known

    @classmethod
    def unknown(
        cls,
        reason: str,
        merged: int | None = None,
        tokens: tuple[int, int, int] | None = None,
        axes: tuple[int, int] | None = None,
        channel: int | None = None,
    ) -> Field:
        return cls(None, axes, merged, reason, tokens if merged is not None else None, channel)


IMAGE = Field(Geometry(), (2, 3), channel=1)  # the input (N, C, H, W): every pixel sees itself
Lookup = Callable[[Any], Field | None]  # a tensor's field; None: it does not depend on the input
Fields = list[tuple[torch.Tensor, Field | None]]  # the fields of an op's outputs
Found = Fields | None  # a rule's answer; None: it cannot follow this call


@dataclass(frozen=True)
class Op:
    """One call: its normalised name, arguments and returned tensors."""

    name: str
    args: Sequence[Any]
    kwargs: dict[str, Any]
    outputs: list[torch.Tensor]
    lookup: Lookup
    image: Pair  # (H, W) of the input

    def arg(self, index: int, key: str, default: Any = None) -> Any:
        if key in self.kwargs:
            return self.kwargs[key]
        return self.args[index] if len(self.args) > index else default

    def each(self, field: Field | None) -> Fields:
        """Every output gets ``field``."""
        return [(t, field) for t in self.outputs]


def flat(geo: Geometry) -> Geometry:
    """One box for every element: flat features have no neighbours in space (stride 0)."""
    return Geometry(geo.field, (0, 0), geo.start)


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, looking into lists and tuples."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors(item)


def after_op(
    name: str, args: Sequence[Any], kwargs: dict[str, Any], result: Any, lookup: Lookup, image: Pair
) -> Fields:
    """The fields of the tensors an op returned (None: independent of the input); [] when no input
    of the op depends on the image (nothing to record)."""
    outputs = list(tensors(args[0] if name == "setitem" else result))  # x[i] = y changes x
    inputs = (args, {k: v for k, v in kwargs.items() if k != "out"})  # out=: overwritten, not read
    if not outputs:
        return []
    if name in _FILLS:  # an in-place fill: the target no longer depends on the image
        return [(outputs[0], None)]
    if not any(lookup(t) is not None for t in tensors(inputs)):
        return [(t, None) for t in outputs] if "out" in kwargs else []  # out=: overwritten with constants
    if name in _CONSTANT_OPS:
        return [(t, None) for t in outputs]
    op = Op(name, args, kwargs, outputs, lookup, image)
    rule = _RULES.get(name)
    try:
        found = rule(op) if rule is not None else None
    except Exception:  # arguments in a form no rule reads must not stop the forward pass: field unknown
        found = None
    if found is not None:
        return found
    if name in _ATTENTION_OPS:
        return op.each(_attended(op))
    reasons = [f.reason for t in tensors(inputs) if (f := lookup(t)) is not None and f.geometry is None]
    reason = reasons[0] if reasons else f"'{name}' moves values between positions in a way fmap does not follow"
    return op.each(_layout_kept(op, reason))


def _layout_kept(op: Op, reason: str) -> Field:
    """An op no rule follows: its field is unknown, but where the output keeps its map operand's
    rows and columns (or tokens) as they were, those dims still hold them (e.g. ``torch.roll``)."""
    x = _first_map(op)
    field = op.lookup(x)
    out = op.outputs[0]
    if x is None or field is None or out.dim() != x.dim():
        return Field.unknown(reason)

    def kept(*dims: int | None) -> bool:
        return all(d is not None and out.shape[d] == x.shape[d] for d in dims)

    axes = field.axes if field.axes is not None and kept(*field.axes) else None
    merged = field.merged if kept(field.merged) else None
    return Field.unknown(reason, merged, None, axes, field.channel if kept(field.channel) else None)  # tokens may move


def _first_map(op: Op) -> torch.Tensor | None:
    """The op's first tensor argument that depends on the image."""
    return next((t for t in tensors(op.args) if op.lookup(t) is not None), None)


def _attended(op: Op) -> Field:
    """Attention's output: unknown, but still a token sequence along the query's token dim (each
    output token is its query token's, so the tokens keep their order)."""
    query = op.args[0] if op.args and isinstance(op.args[0], torch.Tensor) else None
    field = op.lookup(query)
    out = op.outputs[0]
    last = out.dim() - 1  # features, for every token
    if query is None or field is None or field.merged is None or out.dim() != query.dim():
        return Field.unknown(ATTENTION, channel=last)
    if out.shape[field.merged] != query.shape[field.merged]:
        return Field.unknown(ATTENTION, channel=last)
    return Field.unknown(ATTENTION, field.merged, field.tokens, channel=last)


# ------------------------------------------------------------------------------------------ rules
Rule = Callable[[Op], Found]
_RULES: dict[str, Rule] = {}


def _rule(*names: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for n in names:
            _RULES[n] = fn
        return fn

    return register


def _dim(value: Any, ndim: int) -> int:
    return int(value) % ndim if ndim else 0


def _pair(value: Any, default: int) -> Pair:
    if value is None or (isinstance(value, list | tuple) and len(value) == 0):
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    values = [int(v) for v in value]
    return (values[-2], values[-1]) if len(values) >= 2 else (values[0], values[0])


def _spatial(field: Field, dim: int) -> bool:
    """Whether ``dim`` holds image positions (a row or column axis, or merged positions)."""
    return (field.axes is not None and dim in field.axes) or field.merged == dim


def _source(op: Op, index: int = 0) -> tuple[torch.Tensor, Field]:
    """The op's map argument and its field (TypeError when it has none: the rule does not apply)."""
    x = op.args[index] if len(op.args) > index else None
    field = op.lookup(x)
    if not isinstance(x, torch.Tensor) or field is None:
        raise TypeError
    return x, field


@_rule("conv2d", "convolution", "max_pool2d", "avg_pool2d", "max_pool2d_with_indices")
def _window(op: Op) -> Found:
    """Convolution or pooling over the last two dims of a (N, C, H, W) map."""
    x, field = _source(op)
    if field.geometry is None and x.dim() == 4:  # its output's last two dims are still a grid's rows and columns
        return op.each(Field.unknown(field.reason, axes=(2, 3), channel=1))
    if field.geometry is None or field.axes != (2, 3) or x.dim() != 4:
        return None
    if any(op.lookup(t) is not None for t in tensors(op.args[1:])):
        return None  # weights computed from the image (dynamic convolution)
    if op.name in ("conv2d", "convolution"):  # (input, weight, bias, stride, padding, dilation, [transposed])
        weight = op.arg(1, "weight")
        if op.arg(6, "transposed", False) is True or not isinstance(weight, torch.Tensor):
            return None
        kernel = _pair(tuple(weight.shape[2:]), 1)
        stride, dilation = _pair(op.arg(3, "stride"), 1), _pair(op.arg(5, "dilation"), 1)
        padding_arg = op.arg(4, "padding", 0)
        if padding_arg == "same":
            padding = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)
        else:
            padding = (0, 0) if padding_arg == "valid" else _pair(padding_arg, 0)
    else:  # (input, kernel_size, stride, padding, [dilation])
        kernel = _pair(op.arg(1, "kernel_size"), 1)
        stride = _pair(op.arg(2, "stride"), 0)
        stride = kernel if stride == (0, 0) else stride
        padding = _pair(op.arg(3, "padding"), 0)
        dilation = (1, 1) if op.name == "avg_pool2d" else _pair(op.arg(4, "dilation"), 1)
    return op.each(Field(field.geometry.after_window(kernel, stride, padding, dilation), (2, 3), channel=1))


@_rule("adaptive_avg_pool2d", "adaptive_max_pool2d")
def _adaptive(op: Op) -> Found:
    """Adaptive pooling: the whole image for global pooling, else a window where the sizes divide."""
    x, field = _source(op)
    if field.geometry is None or field.axes is None:
        return None if field.axes is None else op.each(replace(field, tokens=None))
    out = op.outputs[0]
    sizes = [(x.shape[axis], out.shape[axis]) for axis in field.axes]  # (in, out) along rows, columns
    if sizes[0][1] == 1 and sizes[1][1] == 1:
        geo = Geometry.whole(op.image, stride=op.image)
    elif sizes[0][0] == 1 and sizes[1][0] == 1:  # one unit repeated: every unit sees its box
        geo = Geometry(field.geometry.field, (0, 0), field.geometry.start)
    elif all(n % m == 0 for n, m in sizes):
        step = (sizes[0][0] // sizes[0][1], sizes[1][0] // sizes[1][1])
        geo = field.geometry.after_window(step, step, (0, 0))
    else:
        return None  # windows of varying size: no single stride
    return op.each(Field(geo, field.axes, channel=field.channel))


@_rule(
    "mean", "sum", "amax", "amin", "max", "min", "prod", "std", "var", "std_mean", "var_mean", "norm", "logsumexp",
    "nansum", "nanmean", "median", "nanmedian", "argmax", "argmin", "all", "any", "count_nonzero",
)  # fmt: skip
def _reduction(op: Op) -> Found:
    """A reduction over some dims: over rows and columns, every element sees the whole image."""
    if len(op.args) > 1 and isinstance(op.args[1], torch.Tensor):  # torch.max(a, b): elementwise
        return _pointwise(op)
    x, field = _source(op)
    index = 2 if op.name == "norm" else 1
    dim = op.arg(index, "dim")
    if isinstance(dim, bool) or (dim is not None and not isinstance(dim, int | list | tuple)):
        dim = None
    dims = range(x.dim()) if dim is None else [dim] if isinstance(dim, int) else dim
    reduced = {_dim(d, x.dim()) for d in dims}
    out = op.outputs[0]
    keep = out.dim() == x.dim()
    if field.channel in reduced:
        field = replace(field, channel=None)
    left = [d for d in range(x.dim()) if d not in reduced]
    channel = field.channel if keep or field.channel is None else left.index(field.channel)
    spatial = set(field.axes) if field.axes is not None else set()
    spatial |= {field.merged} if field.merged is not None else set()
    if spatial and spatial <= reduced:  # every position: the whole image
        if keep and field.axes is not None:
            return op.each(Field(Geometry.whole(op.image, stride=op.image), field.axes, channel=channel))
        return op.each(Field(flat(Geometry.whole(op.image)), channel=channel))
    if spatial & reduced:
        return None  # rows only, or columns only
    if keep:
        return op.each(field)
    gone = sorted(d for d in range(x.dim()) if d in reduced)
    order = [d for d in range(x.dim()) if d not in reduced] + gone  # the reduced dims, moved past the end
    return op.each(_moved(field, order))


@_rule(
    # nonlinearities and dropout
    "relu", "relu6", "leaky_relu", "rrelu", "elu", "celu", "selu", "gelu", "silu", "hardswish", "hardsigmoid",
    "mish", "sigmoid", "tanh", "prelu", "softplus", "hardtanh", "threshold", "logsigmoid", "softsign",
    "tanhshrink", "hardshrink", "softshrink", "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
    "alpha_dropout", "feature_alpha_dropout", "native_dropout",
    # arithmetic, comparisons, copies and conversions
    "neg", "negative", "positive", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt",
    "square", "reciprocal", "sign", "sgn", "sin", "cos", "tan", "erf", "erfc", "floor", "ceil", "round", "trunc",
    "frac", "nan_to_num", "clamp", "clamp_min", "clamp_max", "clip", "pow", "rpow", "add", "sub", "rsub", "mul",
    "div", "true_divide", "floor_divide", "remainder", "fmod", "where", "maximum", "minimum", "fmax", "fmin",
    "atan2", "hypot", "lerp", "addcmul", "addcdiv", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or", "bitwise_xor",
    "bitwise_not", "xlogy", "logaddexp", "copysign", "isnan", "isfinite", "contiguous", "clone", "detach",
    "float", "double", "half", "bfloat16", "int", "long", "bool", "alias", "lift_fresh", "lift_fresh_copy",
    "to_copy", "requires_grad", "channel_shuffle", "native_channel_shuffle", "expand", "broadcast_to", "setitem",
)  # fmt: skip
def _pointwise(op: Op) -> Found:
    """Elementwise, with broadcasting: each unit sees what the units it combines see (``x[i] = y``
    combines x and y too)."""
    inputs = (op.args, {k: v for k, v in op.kwargs.items() if k != "out"})
    combined = combine([(t, op.lookup(t)) for t in tensors(inputs)], op.outputs[0])
    return None if combined is None else op.each(combined)


@_rule("to", "type", "type_as", "expand_as", "view_as", "reshape_as", "copy")
def _first_only(op: Op) -> Found:
    """Ops whose values come from one tensor; the other tensor only gives a shape or dtype
    (``x.type_as(y)``), or is overwritten (``dst.copy_(src)``)."""
    index = 1 if op.name == "copy" else 0
    source = op.args[index]
    if op.lookup(source) is None:
        return op.each(None)
    if op.name in ("view_as", "reshape_as"):
        return _reshape(replace(op, args=[source]))
    combined = combine([(source, op.lookup(source))], op.outputs[0])
    return None if combined is None else op.each(combined)


def combine(operands: Sequence[tuple[torch.Tensor, Field | None]], out: torch.Tensor) -> Field | None:
    """The field of ``out``, an elementwise combination of ``operands`` broadcast to its shape
    (None: not one fmap can place). Operands without a field (constants) add nothing."""
    parts: list[tuple[Geometry, Pair]] = []  # (geometry, extent along rows and columns) of each operand
    axes: tuple[int, int] | None = None
    merged: set[int] = set()
    unknown: list[Field] = []
    tokens: set[tuple[int, int, int] | None] = set()
    placed: set[tuple[int, int]] = set()  # rows and columns of unknown operands that keep them
    channels = {f.channel + out.dim() - t.dim() for t, f in operands if f is not None and f.channel is not None}
    channel = channels.pop() if len(channels) == 1 else None
    for t, field in operands:
        if field is None:
            continue
        shift = out.dim() - t.dim()  # broadcasting aligns dims from the right
        if field.geometry is None:
            unknown.append(field)
            merged.add(field.merged + shift if field.merged is not None else -1)
            tokens.add(field.tokens if field.merged is not None and t.shape[field.merged] > 1 else None)
            if field.axes is not None:
                placed.add((field.axes[0] + shift, field.axes[1] + shift))
        elif field.axes is None:  # flat: the same box for every element it reaches
            parts.append((field.geometry, (1, 1)))
        else:
            mapped = (field.axes[0] + shift, field.axes[1] + shift)
            if axes is not None and mapped != axes:
                return None
            axes = mapped
            parts.append((field.geometry, (t.shape[field.axes[0]], t.shape[field.axes[1]])))
    if unknown:  # still a token sequence if every operand is one, along the same dim
        along = merged.pop() if len(merged) == 1 and not parts else -1
        reasons = [f.reason for f in unknown]
        known = tokens.pop() if len(tokens) == 1 else None  # a broadcast single token adds nothing
        reason = ATTENTION if ATTENTION in reasons else reasons[0]
        layout = placed | ({axes} if axes is not None else set())  # operands without a layout do not veto
        if len(layout) == 1 and along < 0:
            return Field.unknown(reason, axes=layout.pop(), channel=channel)
        return Field.unknown(reason, along if along >= 0 else None, known, channel=channel)
    if not parts:
        return None
    if axes is None:  # only flat operands: the union of their boxes
        return Field(flat(Geometry.union(parts, (1, 1))), channel=channel)
    size = (out.shape[axes[0]], out.shape[axes[1]])
    if any(extent[k] not in (1, size[k]) for _, extent in parts for k in (0, 1)):
        return None  # part of the map only (x[:, :, :4] = y)
    return Field(Geometry.union(parts, size), axes, channel=channel)


@_rule(
    "batch_norm", "native_batch_norm", "native_batch_norm_legit_no_training", "native_batch_norm_legit",
    "instance_norm", "group_norm", "native_group_norm", "layer_norm", "native_layer_norm", "local_response_norm",
    "normalize", "rms_norm", "batch_norm_impl_index",
)  # fmt: skip
def _norm(op: Op) -> Found:
    """Normalisation: each unit keeps its field (statistics rescale, they do not move anything)."""
    x, field = _source(op)
    if any(op.lookup(t) is not None for t in tensors((op.args[1:], op.kwargs))):
        return None  # weights computed from the image
    if op.name in ("layer_norm", "native_layer_norm", "rms_norm"):  # over the last dims: channels last
        shape = op.arg(1, "normalized_shape")
        field = replace(field, channel=x.dim() - 1) if isinstance(shape, int) or len(shape) == 1 else field
    elif op.name != "normalize":  # batch, instance, group, local response: channels at dim 1
        field = replace(field, channel=1)
    return [(t, field if t.shape == x.shape else Field.unknown("normalisation statistics")) for t in op.outputs]


@_rule("linear", "addmm", "mm", "matmul", "bmm")
def _linear(op: Op) -> Found:
    """A weight applied along the last dim of a map (a linear layer, also on channels-last maps)."""
    operands = [(t, f) for t in tensors(op.args) if (f := op.lookup(t)) is not None]
    if len(operands) > 1:  # a product of two maps (attention scores)
        if all(f.geometry is not None and f.axes is None for _, f in operands):
            combined = combine(operands, op.outputs[0])
            return None if combined is None else op.each(combined)
        return op.each(Field.unknown(ATTENTION)) if any(_tokens(f) for _, f in operands) else None
    x, field = operands[0]
    if op.args[1 if op.name == "addmm" else 0] is not x:
        return None  # the map is the right operand (W @ x): contracted along another dim
    last = x.dim() - 1
    if field.merged == last:  # positions summed over: every output sees the whole image
        return op.each(Field(flat(Geometry.whole(op.image)), channel=last))
    if _spatial(field, last):
        return None
    return op.each(replace(field, channel=last))  # its outputs are the channels


def _tokens(field: Field) -> bool:
    return field.geometry is None and (field.merged is not None or field.reason in (MERGED, ATTENTION))


@_rule("softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "glu")
def _along(op: Op) -> Found:
    """An op along one dim: positions mix only when that dim holds them."""
    x, field = _source(op)
    if _spatial(field, _dim(op.arg(1, "dim", -1), x.dim())):
        return None
    return op.each(field)


# ------------------------------------------------------------------------------------------ layout
def _moved(field: Field, order: Sequence[int]) -> Field:
    """``field`` after the dims are reordered so that new dim i is old dim order[i]."""
    if field.channel is not None:
        field = replace(field, channel=order.index(field.channel))
    if field.axes is not None:
        return replace(field, axes=(order.index(field.axes[0]), order.index(field.axes[1])))
    if field.merged is not None:
        return replace(field, merged=order.index(field.merged))
    return field


@_rule("permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t")
def _permute(op: Op) -> Found:
    x, field = _source(op)
    n = x.dim()
    order = list(range(n))
    if op.name == "permute":
        dims = op.kwargs.get("dims", op.args[1] if isinstance(op.args[1], list | tuple) else op.args[1:])
        order = [_dim(d, n) for d in dims]
    elif op.name in ("movedim", "moveaxis"):
        source, destination = op.arg(1, "source"), op.arg(2, "destination")
        src = [_dim(d, n) for d in ([source] if isinstance(source, int) else source)]
        dst = [_dim(d, n) for d in ([destination] if isinstance(destination, int) else destination)]
        rest = iter(d for d in range(n) if d not in src)
        placed = dict(zip(dst, src, strict=True))
        order = [placed[i] if i in placed else next(rest) for i in range(n)]
    elif n > 1:
        a, b = (0, 1) if op.name == "t" else (_dim(op.arg(1, "dim0"), n), _dim(op.arg(2, "dim1"), n))
        order[a], order[b] = order[b], order[a]
    return op.each(_moved(field, order))


def follow_reshape(before: Sequence[int], after: Sequence[int], dim: int) -> tuple[str, int]:
    """Where dim ``dim`` of shape ``before`` goes in a (row-major) reshape to ``after``:
    ('kept', j) when it is dim j; ('merged', j) when dim j holds it and other dims; ('dropped', -1)
    for a size-1 dim that is gone; ('split', -1) when it is spread over several dims."""
    outer = math.prod(before[:dim])  # how many times the dim repeats
    inner = math.prod(before[dim + 1 :])  # elements per step along it
    if before[dim] == 1:  # size-1 dims are interchangeable: the same rank among those at this place
        ones = [j for j, size in enumerate(after) if size == 1 and math.prod(after[:j]) == outer]
        rank = sum(1 for d in range(dim) if before[d] == 1 and math.prod(before[:d]) == outer)
        return ("kept", ones[rank]) if rank < len(ones) else ("dropped", -1)
    for j, size in enumerate(after):
        prefix, suffix = math.prod(after[:j]), math.prod(after[j + 1 :])
        if prefix == outer and size == before[dim]:
            return "kept", j
        if prefix <= outer and suffix <= inner and outer % prefix == 0 and inner % suffix == 0 and size > 1:
            return "merged", j
    return "split", -1


@_rule("view", "reshape", "unsafe_view", "reshape_alias", "flatten", "unflatten", "squeeze", "unsqueeze")
def _reshape(op: Op) -> Found:
    """A reshape keeps the spatial dims it leaves whole; merging them loses where units are. The
    channels stay where the reshape keeps their dim whole."""
    x, field = _source(op)
    before, after = tuple(x.shape), tuple(op.outputs[0].shape)
    how, j = follow_reshape(before, after, field.channel) if field.channel is not None else ("split", -1)
    return op.each(replace(_reshaped(field, before, after, op.image), channel=j if how == "kept" else None))


def _reshaped(field: Field, before: tuple[int, ...], after: tuple[int, ...], image: Pair) -> Field:
    if field.geometry is None and field.axes is not None:
        return _merging(field, before, after, field.reason)
    if field.geometry is None:
        how, j = follow_reshape(before, after, field.merged) if field.merged is not None else ("split", -1)
        return Field.unknown(
            field.reason, j if how in ("kept", "merged") else None, field.tokens if how == "kept" else None
        )
    if field.axes is None:  # flat: (N, C) -> (N, C, 1, 1) makes a map of one unit
        if len(after) >= 3 and after[-2:] == (1, 1) and before[-2:] != (1, 1):
            geo = Geometry(field.geometry.field, image, field.geometry.start)
            return Field(geo, (len(after) - 2, len(after) - 1))
        return field
    (how_h, h), (how_w, w) = (follow_reshape(before, after, axis) for axis in field.axes)
    if how_h == how_w == "kept":
        return Field(field.geometry, (h, w))
    if how_h == how_w == "dropped":  # a map of one unit: its box, for every element
        return Field(flat(field.geometry))
    return _merging(field, before, after, MERGED)


def _merging(field: Field, before: tuple[int, ...], after: tuple[int, ...], reason: str) -> Field:
    """A reshape of a map whose rows and columns are ``field.axes``: they stay (geometry unknown), merge
    into one token dim (a row-major grid when rows came just before columns), or are lost."""
    assert field.axes is not None
    (how_h, h), (how_w, w) = (follow_reshape(before, after, axis) for axis in field.axes)
    if how_h == how_w == "kept":
        return Field.unknown(reason, axes=(h, w))
    merged = h if how_h in ("kept", "merged") and how_w in ("kept", "merged") and h == w else None
    rows, cols = before[field.axes[0]], before[field.axes[1]]
    grid = merged is not None and field.axes[1] == field.axes[0] + 1 and after[merged] == rows * cols
    return Field.unknown(reason, merged, (0, rows, cols) if grid else None)


def _shifted(field: Field, dim: int, offset: int, step: int = 1) -> Field:
    """``field`` of a map that starts ``offset`` units into this one along ``dim`` and takes every
    ``step``-th unit (a slice or split; padding is a negative offset)."""
    if field.geometry is None or field.axes is None or dim not in field.axes:
        return field
    k = field.axes.index(dim)
    start, stride = list(field.geometry.start), list(field.geometry.stride)
    start[k] += offset * stride[k]
    stride[k] *= step
    return replace(field, geometry=Geometry(field.geometry.field, (stride[0], stride[1]), (start[0], start[1])))


@_rule("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d")
def _pad(op: Op) -> Found:
    """Padding (pairs from the last dim backwards): units added before the old ones move the start."""
    x, field = _source(op)
    if op.arg(2, "mode", "constant") == "circular":
        return None
    pad = [int(p) for p in op.arg(1, "pad", ())]
    for k in range(len(pad) // 2):
        dim = x.dim() - 1 - k
        if field.merged == dim and (pad[2 * k] or pad[2 * k + 1]):
            return None
        field = _shifted(field, dim, -pad[2 * k])
    return op.each(field)


@_rule("getitem", "slice", "select", "narrow", "index_select")
def _index(op: Op) -> Found:
    """Indexing: a slice along a spatial dim moves the start (and multiplies the stride by its step)."""
    if not isinstance(op.args[0], torch.Tensor):
        return op.each(op.lookup(op.outputs[0]))  # an item of an op's tuple of outputs: already known
    x, field = _source(op)
    if op.name == "getitem":
        index = op.args[1] if isinstance(op.args[1], tuple) else (op.args[1],)
    else:
        dim = _dim(op.arg(1, "dim", 0), x.dim())
        if op.name == "select":
            item: Any = int(op.arg(2, "index"))
        elif op.name == "narrow":
            first = int(op.arg(2, "start"))
            item = slice(first, first + int(op.arg(3, "length")))
        elif op.name == "index_select":
            item = op.arg(2, "index")
        else:
            item = slice(op.arg(2, "start"), op.arg(3, "end"), op.arg(4, "step", 1))
        index = (*([slice(None)] * dim), item)
    if any(op.lookup(i) is not None for i in tensors(list(index))):
        return None  # indices computed from the image
    return _indexed(op, field, x, index)


def _indexed(op: Op, field: Field, x: torch.Tensor, index: tuple[Any, ...]) -> Found:
    if any(i is Ellipsis for i in index):
        at = next(k for k, i in enumerate(index) if i is Ellipsis)
        used = sum(1 for i in index if i is not None and i is not Ellipsis)
        index = (*index[:at], *([slice(None)] * (x.dim() - used)), *index[at + 1 :])
    kept: dict[int, int] = {}  # dim of x -> dim of the output
    points: dict[int, int] = {}  # dim of x -> the one position taken there
    dim = new = 0
    for item in index:
        if item is None:
            new += 1
            continue
        if isinstance(item, bool) or dim >= x.dim():
            return None
        if isinstance(item, int):
            points[dim] = item % x.shape[dim]
        elif isinstance(item, slice):
            first, _, step = item.indices(x.shape[dim])
            field = _shifted(field, dim, first, step)
            kept[dim], new = new, new + 1
        elif isinstance(item, torch.Tensor | list) and torch.as_tensor(item).dim() == 1 and not _spatial(field, dim):
            if torch.as_tensor(item).dtype == torch.bool:
                return None
            kept[dim], new = new, new + 1  # channels picked by a list of indices
        else:
            return None
        dim += 1
    for rest in range(dim, x.dim()):
        kept[rest], new = new, new + 1
    found = _selected(field, x, index, kept, points)
    channel = kept.get(field.channel) if field.channel is not None else None
    return None if found is None else op.each(replace(found, channel=channel))


def _selected(
    field: Field, x: torch.Tensor, index: tuple[Any, ...], kept: dict[int, int], points: dict[int, int]
) -> Field | None:
    if field.geometry is None:
        if field.axes is not None and field.axes[0] in kept and field.axes[1] in kept:
            return Field.unknown(field.reason, axes=(kept[field.axes[0]], kept[field.axes[1]]))
        if field.merged is None or field.merged not in kept:
            return Field.unknown(field.reason)
        return Field.unknown(field.reason, kept[field.merged], _sliced(field, x, index))
    if field.axes is None:
        return field
    h, w = field.axes
    if h in kept and w in kept:
        return Field(field.geometry, (kept[h], kept[w]))
    if h in points and w in points:  # one unit: its box, for every element
        return Field(flat(Geometry(field.geometry.field, (0, 0), field.geometry.centre(points[h], points[w]))))
    return None


def _sliced(field: Field, x: torch.Tensor, index: tuple[Any, ...]) -> tuple[int, int, int] | None:
    """The tokens left by slicing the token dim: known when the slice drops only prefix tokens."""
    dims = [i for i in index if i is not None]
    if field.merged is None or field.tokens is None:
        return None
    item = dims[field.merged] if field.merged < len(dims) else slice(None)
    if not isinstance(item, slice):
        return None
    first, stop, step = item.indices(x.shape[field.merged])
    prefix, rows, cols = field.tokens
    if step != 1 or first > prefix or stop != x.shape[field.merged]:
        return None
    return (prefix - first, rows, cols)


@_rule("split", "split_with_sizes", "unsafe_split", "chunk", "tensor_split", "unbind")
def _split(op: Op) -> Found:
    """Pieces along one dim: along channels each keeps the field, along a spatial dim each its part."""
    x, field = _source(op)
    dim = _dim(op.arg(1, "dim", 0) if op.name == "unbind" else op.arg(2, "dim", 0), x.dim())
    if op.name == "unbind":
        if _spatial(field, dim):
            return None
        field = replace(field, channel=None) if field.channel == dim else field
        return op.each(_moved(field, [d for d in range(x.dim()) if d != dim] + [dim]))
    if field.merged == dim and len(op.outputs) > 1:
        return None
    found: Fields = []
    offset = 0
    for t in op.outputs:
        found.append((t, _shifted(field, dim, offset)))
        offset += t.shape[dim]
    return found


@_rule("cat", "concat", "concatenate", "stack")
def _cat(op: Op) -> Found:
    """Maps side by side: along channels each unit sees the union of what its operands' units see."""
    parts = list(tensors(op.arg(0, "tensors")))
    out = op.outputs[0]
    dim = _dim(op.arg(1, "dim", 0), out.dim())
    fields = [op.lookup(t) for t in parts]
    if op.name == "stack":  # a new dim at ``dim``: every operand's dims from there move up one
        moved = [None if f is None else _moved(f, [*range(dim), out.dim() - 1, *range(dim, out.dim() - 1)])
                 for f in fields]  # fmt: skip
        combined = combine([(out, f) for f in moved], out)
        return None if combined is None else op.each(combined)
    known = [(i, f) for i, f in enumerate(fields) if f is not None]
    if any(f.axes is not None and dim in f.axes for _, f in known):  # side by side in space
        if len(known) > 1:
            return None
        offset = sum(t.shape[dim] for t in parts[: known[0][0]])  # constants before it (padding by cat)
        return op.each(_shifted(known[0][1], dim, -offset))
    if any(f.merged == dim for _, f in known):  # more tokens (a class token): still a token sequence
        field = known[0][1]
        before = sum(t.shape[dim] for t in parts[: known[0][0]])  # constant tokens put first
        last = len(known) == 1 and known[0][0] == len(parts) - 1
        tokens = (field.tokens[0] + before, *field.tokens[1:]) if field.tokens and last else None
        return op.each(Field.unknown(field.reason or MERGED, dim, tokens, channel=field.channel))
    combined = combine([(out, f) for _, f in known], out)
    return None if combined is None else op.each(combined)


_CONSTANT_OPS = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "new_zeros",
    "new_ones", "new_empty", "new_full", "new_tensor",
}  # fmt: skip
_FILLS = {"zero", "fill"}  # x.zero_(), x.fill_(v): the target becomes a constant
_ATTENTION_OPS = {
    "scaled_dot_product_attention", "multi_head_attention_forward", "native_multi_head_attention", "einsum",
    "baddbmm", "scaled_dot_product_flash_attention", "scaled_dot_product_efficient_attention",
    "scaled_dot_product_attention_math",
}  # fmt: skip
