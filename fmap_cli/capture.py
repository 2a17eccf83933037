"""Capture z and a of any PyTorch model during a forward pass: the sources of the events the
pairing rule (``pairing.py``) works on, and the two entry points, :func:`discover` and :func:`capture`.

Layers are found while the model runs, so any eager ``nn.Module`` works, data-dependent control
flow included (nothing is traced ahead of time). Module hooks give the module path of every call;
a ``TorchFunctionMode`` sees every operation (``F.relu``, ``torch.relu``, ``x.relu_()``,
``out += identity``); a ``torch.export`` program is interpreted node by node and feeds the same
events, with module paths from its ``nn_module_stack`` metadata. Hooks are removed and every
module's train/eval mode restored afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import ModelError
from .pairing import (
    NONLINEAR_MODULES,
    LayerInfo,
    LayerMaps,
    Recorder,
    StopForward,
    _storage,
    first_tensor,
    module_kind,
)
from .replay import Diverged, Plan, Planner, Replay

__all__ = ["LayerInfo", "LayerMaps", "capture", "discover", "is_exported", "unshared"]

MAX_DIVERGED = 3  # a model whose path changes this often gets no more plans: each miss costs a partial pass


def _module_params(module: nn.Module) -> dict[str, Any]:
    """Plain attributes of a module (negative_slope, eps, ...), for the file and for --verify."""
    skip = {"training", "inplace"}
    return {
        k: v
        for k, v in vars(module).items()
        if not k.startswith("_") and k not in skip and isinstance(v, int | float | str | bool)
    }


def _eager_kind(module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        return "linear"
    type_name = type(module).__name__
    if isinstance(module, tuple(getattr(nn, n) for n in NONLINEAR_MODULES)):
        type_name = next(n for n in NONLINEAR_MODULES if isinstance(module, getattr(nn, n)))
    known = type(module).__module__.startswith("torch.nn")
    return module_kind(type_name, known, any(True for _ in module.children()))


class _OpEvents(TorchFunctionMode):
    def __init__(self, recorder: Recorder | Replay) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        return self.recorder.op(func, args, kwargs, lambda: func(*args, **kwargs))


@contextmanager
def _eager_events(model: nn.Module, recorder: Recorder) -> Iterator[None]:
    """Feed ``recorder`` with module and op events of ``model``; hooks are removed on exit."""
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue
        kind = _eager_kind(module)
        type_name = type(module).__name__
        hyper = {"module": type_name, "extra_repr": module.extra_repr(), "params": _module_params(module)}

        def pre(mod: nn.Module, args: Any, kwargs: Any, path: str = path, kind: str = kind, t: str = type_name,
                hyper: dict[str, Any] = hyper) -> None:  # fmt: skip
            recorder.enter(path, t, kind, first_tensor((args, kwargs)), hyper)

        def post(mod: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            recorder.exit(output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with _OpEvents(recorder):
            yield
    finally:
        for handle in handles:
            handle.remove()


class _ExportedEvents(torch.fx.Interpreter):
    """Runs a ``torch.export`` program node by node, feeding the same events as an eager model."""

    def __init__(self, module: torch.fx.GraphModule, recorder: Recorder | Replay) -> None:
        super().__init__(module)
        self.recorder = recorder
        self.stack: list[tuple[str, str, str]] = []  # (key, path, type) of the open module calls
        self.last: Any = None
        stacks = [list(_stack(n)) for n in module.graph.nodes if n.op == "call_function"]
        self.containers = {entry[1] for s in stacks for entry in s[:-1]}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "output":
            self._sync([], None)
        if n.op == "call_module" and n.target == "_guards_fn":
            return None  # export's input-shape guards: fmap runs other batch sizes than the example
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self._sync(list(_stack(n)), first_tensor((args, kwargs)))
        target: Any = n.target  # a call_function node's target is the callable
        self.last = self.recorder.op(target, args, kwargs, lambda: target(*args, **kwargs))
        return self.last

    def _sync(self, stack: list[tuple[str, str, str]], x: torch.Tensor | None) -> None:
        common = 0
        while common < min(len(stack), len(self.stack)) and stack[common][0] == self.stack[common][0]:
            common += 1
        while len(self.stack) > common:
            self.stack.pop()
            self.recorder.exit(self.last)
        for key, path, type_str in stack[common:]:
            type_name = type_str.rsplit(".", 1)[-1]
            known = type_str.startswith("torch.nn.")
            kind = module_kind(type_name, known, path in self.containers)
            self.recorder.enter(path, type_name, kind, x, {"module": type_name})
            self.stack.append((key, path, type_str))


def _stack(n: torch.fx.Node) -> Iterator[tuple[str, str, str]]:
    for key, (path, type_str) in (n.meta.get("nn_module_stack") or {}).items():
        if path:  # the root module is not a layer
            yield key, path, type_str if isinstance(type_str, str) else f"{type_str.__module__}.{type_str.__name__}"


def is_exported(model: nn.Module) -> bool:
    """True for the module of a loaded ``torch.export`` program (see ``models.load_exported``)."""
    return bool(getattr(model, "fmap_exported", False))


def _forward(model: nn.Module, x: torch.Tensor, recorder: Recorder | Replay) -> None:
    x = x.clone()  # the model may write into its input: the caller's (/input, --verify's) stays as it was given
    try:
        # no_grad, not inference_mode: tensors keep their version counters, which catch a write into a
        # held map by an op fmap does not see (pairing.handed_on)
        with torch.no_grad():
            recorder.start(x)
            if isinstance(model, torch.fx.GraphModule) and is_exported(model):
                _ExportedEvents(model, recorder).run(x)
            elif isinstance(recorder, Replay):  # ops only: module hooks alone cost 0.2-0.5x the forward pass
                with _OpEvents(recorder):
                    model(x)
            else:
                with _eager_events(model, recorder):
                    model(x)
    except StopForward:
        pass


@contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    if is_exported(model):  # an exported program is fixed at export time (it refuses .eval())
        yield
        return
    flags = [(module, module.training) for module in model.modules()]  # may differ (frozen parts)
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def unshared(maps: dict[str, LayerMaps]) -> dict[str, LayerMaps]:
    """``maps`` (a batch :func:`capture` returned), with each map whose memory anything else still
    holds copied: the model may keep it (a buffer, a cache) and write into it at its next call, while
    the maps of this batch are still to be written (capture holds maps by reference, not copied)."""
    memory = {id(t): (t, _storage(t)) for m in maps.values() for t in (m.z, m.a) if t is not None}
    tensors = [t for t, where in memory.values() if where is not None]  # None: no plain storage to ask about
    held = Counter(where for _, where in memory.values())  # memory -> the map tensors on it
    # a storage's users: its tensors (views included) and the storage object made to ask. Older CPU
    # builds of torch do not expose the count (pytorch#131881): there every map is copied.
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    copies = {
        id(t): t.clone()
        for t in tensors
        if use_count is None or use_count(t.untyped_storage()._cdata) - 1 > held[memory[id(t)][1]]
    }
    return {name: LayerMaps(copies.get(id(m.z), m.z), copies.get(id(m.a), m.a)) for name, m in maps.items()}


def discover(model: nn.Module, x: torch.Tensor) -> dict[str, LayerInfo]:
    """Run ``x`` through ``model`` once and describe every layer, in the order they ran.

    >>> layers = discover(resnet, torch.zeros(1, 3, 224, 224))
    >>> layers["layer1.0.conv2"].path_to_activation
    ['layer1.0.bn2', 'add(+maxpool)', 'layer1.0.relu#2']
    """
    recorder = Recorder(None, image_size=(x.shape[-2], x.shape[-1]))
    with _eval(model):
        _forward(model, x, recorder)
    return recorder.layers


@contextmanager
def capture(
    model: nn.Module, layers: dict[str, LayerInfo], names: Sequence[str]
) -> Iterator[Callable[[torch.Tensor], dict[str, LayerMaps]]]:
    """Yield ``run(x) -> {name: LayerMaps}`` for the layers ``names`` (described by :func:`discover`).

    The forward pass stops as soon as every wanted map exists, so an early layer costs only the
    layers up to it. The first batch of each input shape runs the full pairing; later ones replay
    what it decided (``replay.py``), with the same maps, and fall back to the full pairing when
    the model takes another path through its code.

    Raises (from ``run``):
        ModelError: a wanted map was not produced: the model took another path through its code
            than for the image :func:`discover` saw; or a map was changed in place by an op fmap
            does not see (``pairing.handed_on``).
    """
    expected = {name: {"z"} | ({"a"} if layers[name].nonlinearity != "none" else set()) for name in names}
    plans: dict[tuple[Any, ...], Plan | None] = {}
    diverged = 0  # batches that left their plan: past MAX_DIVERGED, every batch takes the full path

    def full(x: torch.Tensor, key: tuple[Any, ...]) -> dict[str, LayerMaps]:
        size = (x.shape[-2], x.shape[-1])
        recorder = Planner(expected, size) if diverged < MAX_DIVERGED else Recorder(expected, size)
        _forward(model, x, recorder)
        maps = recorder.maps
        for name, roles in expected.items():
            got = maps.get(name)
            for role in sorted(roles):
                if got is None or getattr(got, role) is None:
                    raise ModelError(
                        f"layer '{name}' produced no {role} for this batch: the model took another path through "
                        "its code (data-dependent control flow) than for the blank image used to list its layers"
                    )
        plans[key] = recorder.plan() if isinstance(recorder, Planner) else None
        return maps

    def run(x: torch.Tensor) -> dict[str, LayerMaps]:
        nonlocal diverged
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)  # shapes decide pairing (shape-preserving ops)
        plan = plans.get(key)
        if plan is not None:
            replay = Replay(plan)
            try:
                _forward(model, x, replay)
                return replay.maps
            except Diverged:
                diverged += 1
        return full(x, key)

    with _eval(model):
        yield run
