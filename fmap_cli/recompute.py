"""The independent route ``--verify`` checks stored maps against: a second forward pass of a deep
copy of the model, with every module's ``inplace`` flag off, read by plain forward hooks.

It shares nothing with capture's pairing rule but the naming of calls (module paths, ``path#k`` for
the k-th call, ``scope:op`` for a functional call in a container): no lineage, no copy-on-write.
Each wanted call's input and output are cloned the moment they exist, so no later in-place op
(``x.relu_()``, ``out += identity``) can change them. Which call gives a layer's z and a is read
from the layer's description (``path_to_activation``), checked by a == f(input of f).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .pairing import LINEAR_OPS, NONLINEAR_MODULES, NONLINEAR_OPS, LayerInfo, first_tensor, module_kind, op_name

IN, OUT = "input", "output"


@dataclass(frozen=True)
class Source:
    """Where one stored map comes from in the recomputation: ``role`` (input or output) of call ``call``."""

    call: str
    role: str


@dataclass(frozen=True)
class Sources:
    """Where a layer's z and a come from, and the nonlinearity call f whose input and output pair them."""

    z: Source
    a: Source | None
    f: str | None  # the nonlinearity's call name


def sources(name: str, info: LayerInfo) -> Sources:
    """The calls a layer's maps are read from, by the pairing rule as the layer's description states it."""
    paired = info.nonlinearity != "none" and bool(info.path_to_activation)
    if info.kind == "nonlinearity":
        return Sources(Source(name, IN), Source(name, OUT), name)
    if info.kind == "container":
        if not paired:
            return Sources(Source(name, OUT), None, None)
        final = info.path_to_activation[0]  # the nonlinearity it ends in
        return Sources(Source(final, IN), Source(name, OUT), final)
    if not paired:
        return Sources(Source(name, OUT), None, None)
    f = info.path_to_activation[-1]
    return Sources(Source(name, OUT), Source(f, OUT), f)


class _Done(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Every wanted tensor is held: the rest of the network is not needed."""


class _Calls:
    """Names calls as fmap does and clones the inputs and outputs that are wanted."""

    def __init__(self, wanted: Mapping[str, set[str]]) -> None:
        self.wanted = wanted
        self.missing = sum(len(roles) for roles in wanted.values())
        self.held: dict[str, dict[str, torch.Tensor]] = {}
        self.busy = False  # our own tensor ops are not the model's calls
        self._counts: dict[str, int] = {}
        self._scopes: list[tuple[str, str, bool]] = [("", "", True)]  # (name, path, container)

    def _name(self, base: str) -> str:
        self._counts[base] = self._counts.get(base, 0) + 1
        return base if self._counts[base] == 1 else f"{base}#{self._counts[base]}"

    def _keep(self, name: str, role: str, value: Any) -> None:
        t = first_tensor(value)
        held = self.held.setdefault(name, {})
        if t is None or role not in self.wanted.get(name, ()) or role in held:
            return
        self.busy = True
        try:
            held[role] = t.detach().clone()
        finally:
            self.busy = False
        self.missing -= 1
        if self.missing == 0:
            raise _Done

    def enter(self, path: str, container: bool, args: Any) -> None:
        name = self._name(path)
        self._scopes.append((name, path, container))
        self._keep(name, IN, args)

    def exit(self, output: Any) -> None:
        name, _, _ = self._scopes.pop()
        self._keep(name, OUT, output)

    def op(self, func: Any, args: Sequence[Any], run: Callable[[], Any]) -> Any:
        if self.busy:
            return run()
        op, _ = op_name(func)
        name = None
        in_container = all(container for _, _, container in self._scopes)
        if in_container and (op in NONLINEAR_OPS or op in LINEAR_OPS) and first_tensor(args) is not None:
            name = self._name(f"{self._scopes[-1][1]}:{op}")
            self._keep(name, IN, args)
        result = run()
        if name is not None:
            self._keep(name, OUT, result)
        return result


def _is_container(module: nn.Module) -> bool:
    """Whether functional calls inside ``module`` are layers of their own (as in ``capture.py``)."""
    if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        return False
    type_name = next((n for n in NONLINEAR_MODULES if isinstance(module, getattr(nn, n))), type(module).__name__)
    known = type(module).__module__.startswith("torch.nn")
    return module_kind(type_name, known, any(True for _ in module.children())) == "container"


class _Ops(TorchFunctionMode):
    def __init__(self, calls: _Calls) -> None:
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        return self.calls.op(func, args, lambda: func(*args, **kwargs))


@contextmanager
def _hooked(model: nn.Module, calls: _Calls) -> Iterator[None]:
    handles = []
    for path, module in model.named_modules():
        if path:
            container = _is_container(module)

            def pre(mod: nn.Module, args: Any, path: str = path, container: bool = container) -> None:
                calls.enter(path, container, args)

            def post(mod: nn.Module, args: Any, output: Any) -> None:
                calls.exit(output)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with _Ops(calls):
            yield
    finally:
        for handle in handles:
            handle.remove()


class _Nodes(torch.fx.Interpreter):
    """A ``torch.export`` program, node by node, with module calls from each node's module stack."""

    def __init__(self, module: torch.fx.GraphModule, calls: _Calls) -> None:
        super().__init__(module)
        self.calls = calls
        self.open: list[str] = []  # stack keys of the open module calls
        self.last: Any = None
        stacks = [self._stack(n) for n in module.graph.nodes if n.op == "call_function"]
        self.containers = {path for stack in stacks for _, path, _ in stack[:-1]}

    @staticmethod
    def _stack(n: torch.fx.Node) -> list[tuple[str, str, str]]:
        found = []
        for key, (path, type_str) in (n.meta.get("nn_module_stack") or {}).items():
            if path:
                name = type_str if isinstance(type_str, str) else f"{type_str.__module__}.{type_str.__name__}"
                found.append((key, path, name))
        return found

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "output":
            self._sync([], None)
        if n.op == "call_module" and n.target == "_guards_fn":
            return None
        if n.op != "call_function":
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self._sync(self._stack(n), args)
        target: Any = n.target
        self.last = self.calls.op(target, args, lambda: target(*args, **kwargs))
        return self.last

    def _sync(self, stack: list[tuple[str, str, str]], args: Any) -> None:
        keys = [key for key, _, _ in stack]
        common = 0
        while common < min(len(keys), len(self.open)) and keys[common] == self.open[common]:
            common += 1
        while len(self.open) > common:
            self.open.pop()
            self.calls.exit(self.last)
        for key, path, type_str in stack[common:]:
            type_name = type_str.rsplit(".", 1)[-1]
            kind = module_kind(type_name, type_str.startswith("torch.nn."), path in self.containers)
            self.calls.enter(path, kind == "container", args)
            self.open.append(key)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every ``inplace`` flag off."""
    with warnings.catch_warnings():  # torch's own deprecation notices from copying a GraphModule
        warnings.simplefilter("ignore", FutureWarning)
        plain = copy.deepcopy(model)
    if getattr(model, "fmap_exported", False):  # an exported program is fixed (it refuses .eval())
        object.__setattr__(plain, "fmap_exported", True)  # a GraphModule's deepcopy keeps only its graph
    else:
        plain.eval()
    for module in plain.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            object.__setattr__(module, "inplace", False)  # a plain attribute (nn.Module types setattr for tensors)
    return plain


def recompute(model: nn.Module, x: torch.Tensor, wanted: Mapping[str, set[str]]) -> dict[str, dict[str, torch.Tensor]]:
    """Run ``x`` through ``model`` (a :func:`plain_copy`) and return ``{call: {role: tensor}}`` for ``wanted``.

    Calls not made are absent.
    """
    calls = _Calls(wanted)
    x = x.clone()  # the model may write into its input: the caller's (its pixels are /input) stays as given
    try:
        with torch.inference_mode():
            if getattr(model, "fmap_exported", False) and isinstance(model, torch.fx.GraphModule):
                _Nodes(model, calls).run(x)
            else:
                with _hooked(model, calls):
                    model(x)
    except _Done:
        pass
    return calls.held
