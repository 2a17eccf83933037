"""Capture's fast path: the first batch of a shape runs the full pairing (``pairing.Recorder``) and
leaves a :class:`Plan`; later batches of that shape replay it with almost no Python work per op.

The pairing, the receptive fields and the layer naming are the same for every batch that takes the
same path through the model's code, but the recorder redoes them for every op of every batch: on
networks of many small ops (EfficientNet, MobileNet, DenseNet) that cost 3-8x the forward pass.
What the full pass decides is written down as ops: which op's output (or the model's input) each
captured map is, and which ops write into a tensor (in place, ``out=``). A replay runs the model
under a bare ``TorchFunctionMode`` (no module hooks), holds those tensors, copies the held ones on
the memory such an op is about to write into (as the full pass: which those are can depend on the
data, ``x.to(dtype)`` is ``x`` or a copy) and stops at the op after the last one the full pass ran,
so its maps are the full pass's, bit for bit.

A replay checks, op by op, that the model takes the same path: the same function, each tensor
argument the output of the same earlier op or the same parameter (so the same module's weights),
the same ``out=`` and ``inplace=`` (whether it writes into a held map), and held maps of the same
shapes; where a map is held, also the module whose call ran the op (read from the Python stack:
module calls are not hooked), so a model choosing by its data between two ReLU modules, or a module
and ``F.relu``, is caught; and where a map is a module's output, that the module's call has returned
when the replay stops (a module changing its output after the planned ops by its data is caught).
Anything else than the plan raises :class:`Diverged`, and capture runs that batch the full way instead.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import nn

from . import fields
from .pairing import LayerMaps, Recorder, StopForward, _Box, _storage, handed_on

__all__ = ["Diverged", "Plan", "Planner", "Replay"]

INPUT = -1  # "made by step -1": the model's input
WRITES = -2  # in a step's sources: the op was called with inplace=True


class Diverged(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The model left the path its plan was made on."""


@dataclass(frozen=True)
class Plan:
    """What a full pass on one input shape decided, as ops (step k = the k-th op of the forward pass)."""

    funcs: list[Any]  # the function of each step the full pass ran (it stopped once every map was held)
    sources: list[tuple[int, ...]]  # per step: where each tensor argument comes from (see ``signature``)
    holds: list[tuple[tuple[int, int], ...]]  # per step: (box, index among the op's output tensors) to hold
    callers: dict[int, Any]  # per step with holds: the module whose call ran the op (``innermost_module``)
    returned_by: dict[int, Any]  # box -> the module whose call returned it (a module's output, held at its end)
    writes: frozenset[int]  # steps whose op writes into a tensor (in place, out=): held maps on it are copied first
    input_holds: tuple[int, ...]  # boxes holding the model's input
    shapes: list[tuple[int, ...]]  # per box: the shape of the tensor it holds
    roles: dict[str, dict[str, int]]  # layer -> role ("z", "a") -> box

    @property
    def last(self) -> int:
        """The last step of the full pass (INPUT: it ran no op); a replay stops at the next op."""
        return len(self.funcs) - 1


_CALL = nn.Module._call_impl.__code__


def innermost_module() -> nn.Module | None:
    """The module whose call is running the caller (the innermost ``nn.Module.__call__`` on the stack)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CALL:
            module: nn.Module = frame.f_locals["self"]
            return module
        frame = frame.f_back  # type: ignore[assignment]  # None ends the loop
    return None


def call_frame(module: nn.Module) -> FrameType | None:
    """The frame of the innermost running call of ``module``; None when it is not running."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CALL and frame.f_locals["self"] is module:
            return frame
        frame = frame.f_back  # type: ignore[assignment]  # None ends the loop
    return None


def running(frames: Sequence[FrameType]) -> bool:
    """Whether any of ``frames`` is still on the stack: its call has not returned."""
    ids = {id(f) for f in frames}
    frame = sys._getframe(1)
    while frame is not None:
        if id(frame) in ids:
            return True
        frame = frame.f_back  # type: ignore[assignment]  # None ends the loop
    return False


Made = dict[int, tuple["weakref.ref[torch.Tensor]", int, int]]  # id -> (tensor, step, index among its outputs)
_TENSOR = torch.Tensor  # bound once: sources() runs for every op of a replay
_SEQUENCE = (list, tuple)


def remember(made: Made, result: Any, step: int) -> None:
    """Note the tensors an op returned (also in a tuple or list) as made by ``step``."""
    if isinstance(result, _TENSOR):
        made[id(result)] = (weakref.ref(result), step, 0)
    elif isinstance(result, _SEQUENCE):
        for index, t in enumerate(fields.tensors(result)):
            made[id(t)] = (weakref.ref(t), step, index)


def maker(made: Made, t: torch.Tensor) -> tuple[int, int] | None:
    """The step that made ``t`` and its index among that op's outputs; None when no op of this forward pass did."""
    item = made.get(id(t))
    return (item[1], item[2]) if item is not None and item[0]() is t else None


def sources(args: Sequence[Any], made: Made) -> tuple[int, ...]:
    """Where each tensor argument of an op (also in a list of tensors, as ``cat``'s) comes from: the
    step whose output it is (INPUT for the model's input), or minus its ``id`` for a tensor no op of
    this forward pass made (a parameter or buffer: which module's weights the op uses)."""
    found = []
    for arg in args:
        if isinstance(arg, _TENSOR):
            item = made.get(id(arg))
            found.append(item[1] if item is not None and item[0]() is arg else -id(arg))
        elif isinstance(arg, _SEQUENCE) and arg and isinstance(arg[0], _TENSOR):
            found.extend(made_by[0] if (made_by := maker(made, t)) else -id(t) for t in arg)
    return tuple(found)


def signature(args: Sequence[Any], kwargs: dict[str, Any], made: Made) -> tuple[int, ...]:
    """The :func:`sources` of an op's arguments, its keywords' (``out=``) included, and WRITES when it
    is told to work in place: whether it writes into a held map can differ between batches."""
    found = sources(args, made)
    if kwargs:  # most ops get none
        found += sources(list(kwargs.values()), made) + ((WRITES,) if kwargs.get("inplace") is True else ())
    return found


class Planner(Recorder):
    """A full :class:`~fmap_cli.pairing.Recorder` that also writes down what it did, as a :class:`Plan`."""

    def __init__(self, expected: dict[str, set[str]], image_size: tuple[int, int] = (0, 0)) -> None:
        super().__init__(expected, image_size)
        self._funcs: list[Any] = []
        self._sources: list[tuple[int, ...]] = []
        self._callers: list[Any] = []
        self._made: Made = {}
        self._origins: dict[_Box, tuple[int, int] | None] = {}
        self._writes: set[int] = set()  # steps whose op writes into a tensor argument
        self._returned: dict[_Box, nn.Module] = {}  # boxes held as a module call's output -> that module
        self._step = INPUT

    def start(self, x: torch.Tensor) -> None:
        super().start(x)
        remember(self._made, x, INPUT)

    def op(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], run: Callable[[], Any]) -> Any:
        if self._busy:  # the recorder's own copies are no step of the model
            return run()
        step = self._step = len(self._funcs)
        self._funcs.append(func)
        self._sources.append(signature(args, kwargs, self._made))
        self._callers.append(innermost_module())

        def ran() -> Any:
            result = run()
            remember(self._made, result, step)
            return result

        return super().op(func, args, kwargs, ran)

    def exit(self, output: Any) -> None:
        held = len(self._boxes)
        try:
            super().exit(output)  # raises StopForward once every map is held
        finally:
            module = innermost_module()  # this runs in the module's hook, inside its call
            if module is not None:
                self._returned.update(dict.fromkeys(self._boxes[held:], module))

    def _hold(self, t: torch.Tensor) -> _Box:
        box = super()._hold(t)
        self._origins[box] = maker(self._made, t)
        return box

    def _protect(self, target: Any) -> None:
        if isinstance(target, torch.Tensor):
            self._writes.add(self._step)
        super()._protect(target)

    def plan(self) -> Plan | None:
        """The plan of this pass, or None when a captured map is no op's output (nothing to replay)."""
        boxes = list(dict.fromkeys(box for roles in self._wanted_boxes.values() for box in roles.values()))
        origins = [self._origins.get(box) for box in boxes]
        known = [origin for origin in origins if origin is not None]
        if len(known) < len(boxes):
            return None
        last = len(self._funcs) - 1  # every op of the pass: what a module does after making its output too
        holds: list[list[tuple[int, int]]] = [[] for _ in range(last + 1)]
        for i, (step, index) in enumerate(known):
            if step != INPUT:
                holds[step].append((i, index))
        number = {box: i for i, box in enumerate(boxes)}
        return Plan(
            funcs=self._funcs[: last + 1],
            sources=self._sources[: last + 1],
            holds=[tuple(h) for h in holds],
            callers={step: self._callers[step] for step, h in enumerate(holds) if h},
            returned_by={number[box]: module for box, module in self._returned.items() if box in number},
            writes=frozenset(self._writes),
            input_holds=tuple(i for i, (step, _) in enumerate(known) if step == INPUT),
            shapes=[tuple(box.t.shape) for box in boxes],
            roles={name: {role: number[b] for role, b in roles.items()} for name, roles in self._wanted_boxes.items()},
        )


class Replay:
    """Runs a :class:`Plan`: fed the same events as a :class:`~fmap_cli.pairing.Recorder` (module
    events are ignored), it holds the planned tensors and raises :class:`Diverged` off the plan."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._step = 0
        self._made: Made = {}
        self._boxes: list[_Box | None] = [None] * len(plan.shapes)
        self._calls: list[FrameType] = []  # the running calls that are to return held maps
        self._on: dict[int | None, list[int]] = {}  # memory -> the boxes holding a tensor on it, not copied yet
        self._diverged = False

    def start(self, x: torch.Tensor) -> None:
        """The model's input tensor."""
        remember(self._made, x, INPUT)
        for i in self.plan.input_holds:
            self._hold(i, x)

    def enter(self, path: str, type_: str, kind: str, x: torch.Tensor | None, hyper: dict[str, Any]) -> None:
        """Module calls are not needed: every planned map is an op's output."""

    def exit(self, output: Any) -> None:
        """See :meth:`enter`."""

    def op(self, func: Any, args: Sequence[Any], kwargs: dict[str, Any], run: Callable[[], Any]) -> Any:
        """Check the op against the plan, make its planned copies, run it, hold its planned outputs."""
        step = self._step
        self._step = step + 1
        plan = self.plan
        if step > plan.last:  # every map is held; stopping at the next op lets the module call around it end
            calls, self._calls = self._calls, []  # a frame keeps its call's tensors alive: let them go
            if running(calls):  # but a module whose output is held runs more ops than planned
                self._diverged = True
                raise Diverged
            raise StopForward
        planned = plan.funcs[step]
        # ``==`` for bound wrappers made anew at each access (``Tensor.shape.__get__``)
        if (planned is not func and planned != func) or signature(args, kwargs, self._made) != plan.sources[step]:
            self._diverged = True  # model code may catch the exception and go on: its maps are not used
            raise Diverged
        if step in plan.writes:  # which held maps it writes into can depend on the data (x.to(dtype) aliases x or not)
            self._protect(kwargs.get("out", args[0] if args else None))
        result = run()
        remember(self._made, result, step)
        holds = plan.holds[step]
        if holds:
            if innermost_module() is not plan.callers[step]:  # another module ran the same op (two ReLUs)
                self._diverged = True
                raise Diverged
            outputs = [result] if isinstance(result, torch.Tensor) else list(fields.tensors(result))
            for i, index in holds:
                self._hold(i, outputs[index])
                module = plan.returned_by.get(i)
                frame = call_frame(module) if module is not None else None
                if frame is not None:  # None: the module returns a tensor made before its call (nn.Identity)
                    self._calls.append(frame)
        return result

    def _hold(self, i: int, t: torch.Tensor) -> None:
        if tuple(t.shape) != self.plan.shapes[i]:
            self._diverged = True
            raise Diverged
        self._boxes[i] = _Box(t.detach())
        self._on.setdefault(_storage(t), []).append(i)

    def _protect(self, target: Any) -> None:
        """As the full pass does: copy each held map on ``target``'s memory before an op writes into it."""
        if not isinstance(target, torch.Tensor):
            return
        storage = _storage(target)
        copied = [i for held in self._on.values() for i in held] if storage is None else self._on.pop(storage, [])
        if storage is None:  # unknown memory: copy every map, to be safe
            self._on.clear()
        for i in copied:
            box = self._boxes[i]
            assert box is not None, "only held boxes are listed"
            box.copy()  # a private copy: nothing writes into it

    @property
    def maps(self) -> dict[str, LayerMaps]:
        """The captured maps, as the full pass returns them.

        Raises:
            Diverged: the forward pass ended before every planned op ran.
            ModelError: a map was changed in place by an op fmap did not see (``pairing.handed_on``).
        """
        self._calls = []  # the forward pass ended (no StopForward): every call has returned
        boxes = [box for box in self._boxes if box is not None]
        if self._diverged or self._step <= self.plan.last or len(boxes) < len(self._boxes):
            raise Diverged
        return handed_on(
            {name: {role: boxes[i] for role, i in roles.items()} for name, roles in self.plan.roles.items()}
        )
