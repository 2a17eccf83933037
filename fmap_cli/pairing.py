"""The pairing rule: which tensor is a layer's z and which its a, decided from the events of one
forward pass (module calls and operations, fed by ``capture.py``).

Layer names are module paths as PyTorch prints them (``layer1.0.conv1``); the k-th call of a module
used several times is ``path#k`` (k >= 2); a functional call inside module ``m`` is ``m:relu``
(``:relu`` at the top level).

Pairing rule (also in the README and in every file's ``pairing_rule`` and ``path_to_activation``):

* linear layer (conv, linear) or any other leaf module: z = its output; a = the output of the first
  nonlinearity reached by following z through shape-preserving ops (batch norm, residual add,
  dropout, identity, ...), which are listed in ``path_to_activation``;
* nonlinearity: z = its input, a = its output;
* container: a = its output and z = the input of its final nonlinearity, if it ends in one;
* no nonlinearity reached: z only.

Captured tensors are held by reference and copied just before an in-place op (``ReLU(inplace=True)``,
``+=``, ``out=``) would write into their memory, so what is stored is what the layer computed. A
write fmap does not see (an in-place op inside TorchScript or a C++ extension) is caught by the
held tensor's version counter when the maps are handed on, and refused.
The recorder also follows each tensor's receptive field through every op (``fields.py``) and where
each layer's input came from (the newest layer upstream, through plain ops such as reshapes).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from . import fields
from .axes import detect
from .errors import ModelError
from .store.axes import Axes, Tokens

# Nonlinearities by op name (in-place variants end in "_", aten names end in ".default").
NONLINEAR_OPS = {
    "relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "hardswish", "hardsigmoid",
    "mish", "sigmoid", "tanh", "prelu", "softplus", "hardtanh",
}  # fmt: skip
NONLINEAR_MODULES = {
    "ReLU": "relu", "ReLU6": "relu6", "LeakyReLU": "leaky_relu", "ELU": "elu", "CELU": "celu", "SELU": "selu",
    "GELU": "gelu", "SiLU": "silu", "Hardswish": "hardswish", "Hardsigmoid": "hardsigmoid", "Mish": "mish",
    "Sigmoid": "sigmoid", "Tanh": "tanh", "PReLU": "prelu", "Softplus": "softplus", "Hardtanh": "hardtanh",
}  # fmt: skip
LINEAR_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "conv_transpose1d", "conv_transpose2d"}
LINEAR_MODULES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")
# Ops and leaf modules that z flows through on its way to the nonlinearity (shape unchanged).
PASS_OPS = {
    "batch_norm", "native_batch_norm_legit_no_training", "instance_norm", "group_norm", "layer_norm",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
    "add", "sub", "mul", "div", "contiguous", "clone",
}  # fmt: skip
PASS_MODULES = (
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d", "LocalResponseNorm", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "AlphaDropout", "Identity",
)  # fmt: skip
# Ops that write into their first argument under another name (x[i] = y), or give its memory to code whose
# writes no version counter sees (numpy, DLPack): held maps on it are copied first, as before an in-place op.
WRITERS = {"setitem", "numpy", "array", "dlpack"}
_DUNDER = {"iadd": "add_", "radd": "add", "isub": "sub_", "rsub": "sub", "imul": "mul_", "rmul": "mul",
           "truediv": "div", "itruediv": "div_", "iand": "bitwise_and_", "ior": "bitwise_or_",
           "ixor": "bitwise_xor_", "ilshift": "bitwise_left_shift_", "irshift": "bitwise_right_shift_"}  # fmt: skip


def op_name(func: Any) -> tuple[str, bool]:
    """Normalised name of a torch function or aten op, and whether it works in place."""
    name = getattr(func, "__name__", str(func)).split(".")[0]
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        name = _DUNDER.get(name, name)
    name = name.lstrip("_")
    inplace = name.endswith("_")
    return (name[:-1] if inplace else name), inplace


def module_kind(type_name: str, known: bool, has_children: bool) -> str:
    """'nonlinearity', 'linear', 'pass' (shape-preserving leaf), 'leaf' or 'container'.

    A module fmap does not know (not from torch.nn) is looked into like a container, so a user's
    module calling ``F.conv2d`` and ``F.relu`` still gives the right pairs.
    """
    if type_name in NONLINEAR_MODULES:
        return "nonlinearity"
    if type_name in LINEAR_MODULES:
        return "linear"
    if has_children or not known:
        return "container"
    return "pass" if type_name in PASS_MODULES else "leaf"


@dataclass
class LayerInfo:
    """What one forward pass tells about a layer (shapes without the batch dimension)."""

    name: str
    kind: str  # linear, nonlinearity, container, pass, leaf, or "function" kinds: linear/nonlinearity
    type: str  # module class (Conv2d) or function (relu)
    module: str  # module path ('' for the top level)
    hyperparameters: dict[str, Any]
    output_shape: tuple[int, ...] = ()
    nonlinearity: str = "none"  # the f with a = f(z), or "none"
    nonlinearity_params: dict[str, Any] = field(default_factory=dict)
    path_to_activation: list[str] = field(default_factory=list)
    receptive_field: tuple[int, int] = (-1, -1)  # input pixels; -1: unknown
    stride: tuple[int, int] = (-1, -1)
    start: tuple[float, float] = (float("nan"), float("nan"))
    field_note: str = ""  # why the receptive field is unknown (-1), in words
    axes: Axes = ()  # names of the output's axes, N first ("N,H,W,C"...): see axes.py
    tokens: Tokens | None = None  # what the token axis T holds (token maps only)
    folded: int = 0  # rows of the output per image when other data is folded into the batch axis, else 0
    input_tags: list[tuple[str, str]] = field(default_factory=list)  # (layer, role) of the input tensor

    @property
    def a_is_f_of_z(self) -> bool:
        """True when nothing lies between z and a, so a == f(z) can be re-checked from the file."""
        return self.nonlinearity != "none" and len(self.path_to_activation) <= 1


@dataclass
class LayerMaps:
    """One batch of one layer's maps, detached, on the model's device: the forward pass's own tensors
    unless an in-place op was about to change them (``capture.unshared`` copies those the model keeps)."""

    z: torch.Tensor | None = None  # (N, C, H, W) or (N, F)
    a: torch.Tensor | None = None


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised once every wanted map is captured: the rest of the network is not needed."""


class _TensorMap:
    """A dict keyed by tensor identity that does not keep tensors alive."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[torch.Tensor], Any]] = {}

    def get(self, t: Any, default: Any = None) -> Any:
        item = self._items.get(id(t))
        return item[1] if item is not None and item[0]() is t else default

    def set(self, t: torch.Tensor, value: Any) -> None:
        self._items[id(t)] = (weakref.ref(t), value)


class _Box:
    """A captured tensor, held by reference until an in-place op would change it (then copied), and
    its version counter when held: an op fmap does not see (in TorchScript, a C++ extension) that
    writes into it still moves the counter, which :func:`handed_on` reads."""

    __slots__ = ("t", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t
        self.version = _version(t)

    def copy(self) -> None:
        """Hold a private copy from now on: an op fmap sees is about to write into the tensor."""
        self.t = self.t.clone()
        self.version = _version(self.t)

    def changed(self) -> bool:
        """Whether something wrote into the held tensor (or its memory, through a view) since it was held."""
        return self.version is not None and _version(self.t) != self.version


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (views share their base's), or None where it has none (an inference tensor)."""
    try:
        return t._version
    except RuntimeError:
        return None


def handed_on(held: dict[str, dict[str, _Box]]) -> dict[str, LayerMaps]:
    """The maps of the held tensors (layer -> role -> box), refused if any was changed after it was
    computed, by a write fmap did not see coming.

    Raises:
        ModelError: names the first such layer and what to do.
    """
    for name, roles in held.items():
        for role, box in roles.items():
            if box.changed():
                raise ModelError(
                    f"layer '{name}': its map {role} was changed in place by an op fmap cannot see (in TorchScript "
                    "or a C++ extension); switch that op's in-place mode off or choose another layer"
                )
    return {
        name: LayerMaps(roles["z"].t if "z" in roles else None, roles["a"].t if "a" in roles else None)
        for name, roles in held.items()
    }


@dataclass
class _Scope:
    name: str
    path: str
    kind: str
    type: str
    x: torch.Tensor | None  # the module's input
    x_lineage: dict[str, list[str]] = field(default_factory=dict)  # read before the module ran
    x_box: _Box | None = None  # the input, held for a wanted nonlinearity or container
    last_nonlinearity: tuple[str, _Box | None, Any] | None = None  # (name, held input, output)


def first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


class Recorder:
    """Receives the events of one forward pass and turns them into layers and captured maps.

    Event sources call :meth:`enter` / :meth:`exit` around each module call and :meth:`op` for
    each operation, which the recorder runs itself so it can copy an input before an in-place op.
    """

    def __init__(self, expected: dict[str, set[str]] | None, image_size: tuple[int, int] = (0, 0)):
        # expected: the roles ("z", "a") to capture per wanted layer; None: discovery (describe
        # every layer, keep no data). The forward pass stops once every expected role is held.
        self.wanted = set(expected) if expected is not None else None
        self._expected = expected
        self._missing = sum(len(roles) for roles in expected.values()) if expected is not None else -1
        self.image_size = image_size
        self._batch = 0  # images in the input
        self.layers: dict[str, LayerInfo] = {}
        self.events = 0
        self._scopes = [_Scope("", "", "container", "", None)]  # the model itself; not a layer
        self._calls: dict[str, int] = {}
        self._lineage = _TensorMap()  # tensor -> {origin layer: labels between its z and this tensor}
        self._resolved: set[str] = set()
        self._fields = _TensorMap()  # tensor -> its Field; None or absent: independent of the input
        self._tags = _TensorMap()  # tensor -> [(layer, role)]: the layers whose output it is
        self._upstream = _TensorMap()  # op output -> the tags of the tagged tensor it comes from
        self._position: dict[str, int] = {}  # layer -> its place in forward order
        self._inside_leaf = 0  # > 0 inside a leaf module, whose own ops are not layers
        self._busy = False  # True while the recorder itself works inside a module hook
        self._boxes: list[_Box] = []  # every tensor held for a wanted map
        self._wanted_boxes: dict[str, dict[str, _Box]] = {}  # layer -> role -> held tensor

    @property
    def maps(self) -> dict[str, LayerMaps]:
        """The captured maps of the wanted layers.

        Raises:
            ModelError: a map was changed in place by an op fmap did not see (:func:`handed_on`).
        """
        return handed_on(self._wanted_boxes)

    def start(self, x: torch.Tensor) -> None:
        """The model's input tensor."""
        self._batch = x.shape[0]
        self._fields.set(x, fields.IMAGE)
        self._tags.set(x, [("input", "input")])

    # ----------------------------------------------------------------------------- events
    @contextmanager
    def _own_work(self) -> Iterator[None]:
        """The recorder's own tensor ops (copies) are not events of the model."""
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def enter(self, path: str, type_: str, kind: str, x: torch.Tensor | None, hyper: dict[str, Any]) -> None:
        """A module call begins; ``x`` is its first tensor input."""
        with self._own_work():
            self._enter(path, type_, kind, x, hyper)

    def exit(self, output: Any) -> None:
        """The innermost module call returned ``output``."""
        with self._own_work():
            self._exit(output)

    def _enter(self, path: str, type_: str, kind: str, x: torch.Tensor | None, hyper: dict[str, Any]) -> None:
        self._tick()
        name = self._name(path)
        scope = _Scope(name, path, kind, type_, x, self._lineage.get(x, {}))
        self._scopes.append(scope)
        if kind != "container":
            self._inside_leaf += 1
        info = self._new_layer(name, kind, type_, path, hyper, x)
        if kind == "nonlinearity":
            info.nonlinearity = NONLINEAR_MODULES.get(type_, type_.lower())
            info.nonlinearity_params = hyper.get("params", {})
            info.path_to_activation = [name]
            scope.x_box = self._keep_input(name, x)

    def _exit(self, output: Any) -> None:
        scope = self._scopes.pop()
        if scope.kind != "container":
            self._inside_leaf -= 1
        out = first_tensor(output)
        info = self.layers[scope.name]
        if out is not None:
            info.output_shape = tuple(out.shape[1:])
            self._set_geometry(info, out)
            if scope.kind == "nonlinearity":
                self._nonlinearity(info, scope.x_lineage, scope.x_box, out)
            elif scope.kind == "container":
                self._finish_container(info, scope, out)
            else:  # linear, pass or other leaf: its output is z
                if scope.kind == "pass" and scope.x is not None:
                    self._propagate(scope.x_lineage, scope.x, out, scope.name)
                self._start_lineage(info, out)
        self._tick()

    def op(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], run: Callable[[], Any]) -> Any:
        """An operation: run it, record what it means for the layers, and return its result."""
        if self._busy:
            return run()
        name, inplace = op_name(func)
        writes = inplace or kwargs.get("inplace") is True or "out" in kwargs or name in WRITERS
        target = kwargs.get("out", args[0] if args else None) if writes else None
        x = first_tensor(args)
        lineage = self._lineage.get(x, {}) if x is not None else {}
        container_op = not self._inside_leaf and x is not None
        operands = [(a, self._lineage.get(a, {})) for a in args if isinstance(a, torch.Tensor) and a.dim() > 0]
        layer = None
        if container_op and (name in NONLINEAR_OPS or name in LINEAR_OPS):
            layer = self._name(f"{self._scopes[-1].path}:{name}")
            kind = "nonlinearity" if name in NONLINEAR_OPS else "linear"
            params = _scalar_params(args, kwargs)
            info = self._new_layer(layer, kind, name, self._scopes[-1].path, {"params": params}, x)
            if kind == "nonlinearity":
                info.nonlinearity, info.nonlinearity_params, info.path_to_activation = name, params, [layer]
                x_box = self._keep_input(layer, x)
        self._protect(target)  # after holding this op's own input, before it is overwritten
        result = run()
        out = first_tensor(result)
        self._follow(name, args, kwargs, result)
        if container_op and out is not None and x is not None:
            if layer is None:
                if name in PASS_OPS:
                    self._join(name, operands, out)
            else:
                info = self.layers[layer]
                info.output_shape = tuple(out.shape[1:])
                self._set_geometry(info, out)
                if info.kind == "nonlinearity":
                    self._nonlinearity(info, lineage, x_box, out)
                else:
                    self._start_lineage(info, out)
        self._tick()
        return result

    # ----------------------------------------------------------------------------- rules
    def _nonlinearity(self, info: LayerInfo, lineage: dict[str, list[str]], x: _Box | None, out: torch.Tensor) -> None:
        """f ran on x (lineage read before it ran): every layer whose z reaches x gets a = out."""
        for origin, path in lineage.items():
            if origin in self._resolved:
                continue
            self._resolved.add(origin)
            source = self.layers[origin]
            source.nonlinearity, source.nonlinearity_params = info.nonlinearity, info.nonlinearity_params
            source.path_to_activation = [*path, info.name]
            self._store(origin, "a", out)
            self._tag(out, origin, "activation")
        self._store(info.name, "z", x)
        self._store(info.name, "a", out)
        self._tag(out, info.name, "activation")
        for scope in self._scopes:
            if scope.kind == "container":
                scope.last_nonlinearity = (info.name, x, out)

    def _start_lineage(self, info: LayerInfo, z: torch.Tensor) -> None:
        self._tag(z, info.name, "preactivation")
        self._lineage.set(z, {**self._lineage.get(z, {}), info.name: []})
        self._store(info.name, "z", z)

    def _propagate(self, lineage: dict[str, list[str]], x: torch.Tensor, out: torch.Tensor, label: str) -> None:
        """A shape-preserving leaf module (batch norm, dropout) ran on x."""
        if out.shape != x.shape:
            return
        live = self._extended(lineage, label)
        if live:
            earlier = {} if out is x else self._lineage.get(out, {})
            self._lineage.set(out, {**earlier, **live})

    def _join(self, name: str, operands: list[tuple[torch.Tensor, dict[str, list[str]]]], out: torch.Tensor) -> None:
        """An elementwise op: z followed through any operand of the output's shape, e.g. both sides
        of a residual add; ``add(+X)`` names the other map X that joins there."""
        merged: dict[str, list[str]] = {}
        for i, (operand, lineage) in enumerate(operands):
            # only a map joins (a residual); parameters and constants (batch norm's) do not
            others = [o for j, (o, _) in enumerate(operands) if j != i and self._fields.get(o) is not None]
            label = f"{name}(+{self._describe(others[0])})" if others else name
            if operand.shape == out.shape:
                merged.update(self._extended(lineage, label))
        if merged:
            earlier = {} if any(out is o for o, _ in operands) else self._lineage.get(out, {})
            self._lineage.set(out, {**earlier, **merged})

    def _extended(self, lineage: dict[str, list[str]], label: str) -> dict[str, list[str]]:
        return {origin: [*path, label] for origin, path in lineage.items() if origin not in self._resolved}

    def _finish_container(self, info: LayerInfo, scope: _Scope, out: torch.Tensor) -> None:
        last = scope.last_nonlinearity
        if last is not None and last[2] is out:  # ends in a nonlinearity: z is that one's input
            final = self.layers[last[0]]
            info.nonlinearity, info.nonlinearity_params = final.nonlinearity, final.nonlinearity_params
            info.path_to_activation = [last[0]]
            self._store(info.name, "z", last[1])
            self._store(info.name, "a", out)
            self._tag(out, info.name, "activation")
        else:
            self._store(info.name, "z", out)
            self._tag(out, info.name, "preactivation")

    # ----------------------------------------------------------------------------- helpers
    def _wants(self, name: str) -> bool:
        return self.wanted is not None and name in self.wanted

    def _keep_input(self, name: str, x: torch.Tensor | None) -> _Box | None:
        """Hold a nonlinearity's input when this layer or an enclosing container needs it."""
        needed = self._wants(name) or any(s.kind == "container" and self._wants(s.name) for s in self._scopes)
        return self._hold(x) if x is not None and needed else None

    def _hold(self, t: torch.Tensor) -> _Box:
        box = _Box(t.detach())
        self._boxes.append(box)
        return box

    def _protect(self, target: Any) -> None:
        """An in-place op is about to write into ``target``: copy every held tensor sharing its memory.

        Copying only then (instead of every captured map) halves the memory traffic of capture on
        small networks, where that traffic is the cost.
        """
        if not isinstance(target, torch.Tensor) or not self._boxes:
            return
        storage = _storage(target)
        for box in self._boxes:
            if storage is None or _storage(box.t) == storage:  # unknown memory: copy to be safe
                box.copy()

    def _store(self, name: str, role: str, t: torch.Tensor | _Box | None) -> None:
        if t is None or not self._wants(name):
            return
        held = self._wanted_boxes.setdefault(name, {})
        if role not in held and self._expected is not None and role in self._expected[name]:
            self._missing -= 1
        held[role] = t if isinstance(t, _Box) else self._hold(t)

    def _name(self, base: str) -> str:
        count = self._calls.get(base, 0) + 1
        self._calls[base] = count
        return base if count == 1 else f"{base}#{count}"

    def _new_layer(
        self, name: str, kind: str, type_: str, module: str, hyper: dict[str, Any], x: torch.Tensor | None
    ) -> LayerInfo:
        tags = list(self._tags.get(x) or self._upstream.get(x, [])) if x is not None else []
        info = LayerInfo(name, kind, type_, module, hyper, input_tags=tags)
        self.layers[name] = info
        self._position[name] = len(self._position)
        return info

    def _tag(self, t: torch.Tensor, name: str, role: str) -> None:
        self._tags.set(t, [*self._tags.get(t, []), (name, role)])

    def _describe(self, t: torch.Tensor) -> str:
        tags = self._tags.get(t) or self._upstream.get(t, [])
        return tags[-1][0] if tags else "tensor"

    def _set_geometry(self, info: LayerInfo, t: torch.Tensor) -> None:
        field = self._fields.get(t)
        source = self.layers.get(info.input_tags[-1][0]) if info.input_tags else None
        upstream = ((t.shape[0], *source.output_shape), source.axes, source.tokens) if source and source.axes else None
        info.axes, info.tokens = detect(field, tuple(t.shape), info.type, upstream)
        info.folded = t.shape[0] // self._batch if self._batch and t.shape[0] != self._batch else 0
        if field is None or field.geometry is None:
            info.receptive_field, info.stride, info.start = (-1, -1), (-1, -1), (float("nan"), float("nan"))
            info.field_note = field.reason if field is not None else fields.CONSTANT
        else:
            geo = field.geometry
            info.receptive_field, info.stride, info.start, info.field_note = geo.field, geo.stride, geo.start, ""

    def _follow(self, name: str, args: Sequence[Any], kwargs: dict[str, Any], result: Any) -> None:
        """Receptive fields and provenance of an op's outputs (``fields.py``)."""
        found = fields.after_op(name, args, kwargs, result, self._fields.get, self.image_size)
        if not found:
            return
        for t, tracked in found:
            self._fields.set(t, tracked)
        sources = [a for a in fields.tensors(args) if self._tags.get(a) or self._upstream.get(a)]
        for t, _ in found:  # where a layer reading this output got its input: the newest layer upstream
            if sources and not self._tags.get(t):
                same = [a for a in sources if a.shape == t.shape] or sources  # x + f(x): f(x), not the skip
                source = max(same, key=self._newest)
                self._upstream.set(t, self._tags.get(source) or self._upstream.get(source))

    def _newest(self, t: torch.Tensor) -> int:
        """How recent the newest layer whose output ``t`` is (or comes from) is: its position in forward order."""
        return max(self._position.get(name, -1) for name, _ in self._tags.get(t) or self._upstream.get(t))

    def _tick(self) -> None:
        self.events += 1
        if self._missing == 0:
            raise StopForward


def _storage(t: torch.Tensor) -> int | None:
    """Address of a tensor's memory (views share it), or None for tensors without plain storage."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested, some subclasses
        return None


def _scalar_params(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The plain-number arguments of a functional call (e.g. leaky_relu's negative_slope)."""
    params: dict[str, Any] = {k: v for k, v in kwargs.items() if isinstance(v, int | float | str) and k != "inplace"}
    numbers = [a for a in args[1:] if isinstance(a, int | float) and not isinstance(a, bool)]
    if numbers:
        params["args"] = numbers
    return params
