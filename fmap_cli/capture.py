"""Capture pre-activations z and activations a during a forward pass, with hooks inside a ``with``.

>>> with capture(model, [Tap("conv1", "conv1", "activations.conv1")]) as run:
...     maps = run(x)          # {"conv1": LayerMaps(z=(N, C, H, W), a=(N, C, H, W))}

Hooks are removed and the model's train/eval mode restored on exit. The forward pass stops as
soon as every tap has fired, so asking for an early layer costs only the layers up to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Tap:
    """Where one layer's maps come from: z is ``z_module``'s output, a is ``a_module``'s output."""

    layer: str
    z_module: str
    a_module: str | None  # None: no nonlinearity, z only


@dataclass(frozen=True)
class LayerMaps:
    """One batch of one layer's maps, detached, on the model's device."""

    z: torch.Tensor  # (N, C, H, W) or (N, F)
    a: torch.Tensor | None


class _StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from a hook once every tap has fired: the rest of the network is not needed."""


@contextmanager
def capture(
    model: nn.Module, taps: Sequence[Tap], clone: bool = True
) -> Iterator[Callable[[torch.Tensor], dict[str, LayerMaps]]]:
    """Register hooks for ``taps`` and yield ``run(x) -> {layer: LayerMaps}``.

    Args:
        model: the network; left as it was found (hooks removed, train/eval mode restored).
        taps: the layers to capture.
        clone: copy each captured output. Needed whenever a later op may be in-place
            (``ReLU(inplace=True)``, ``+=``) and would overwrite the stored z; a model known
            to have no in-place ops can skip the copy, which halves the memory traffic of
            small networks.
    """
    modules = dict(model.named_modules())
    wanted: dict[str, list[tuple[str, str]]] = {}  # module path -> [(layer, "z" | "a")]
    for tap in taps:
        wanted.setdefault(tap.z_module, []).append((tap.layer, "z"))
        if tap.a_module is not None:
            wanted.setdefault(tap.a_module, []).append((tap.layer, "a"))
    expected = sum(len(v) for v in wanted.values())
    store: dict[tuple[str, str], torch.Tensor] = {}

    def hook_for(path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            for key in wanted[path]:
                store[key] = output.detach().clone() if clone else output.detach()
            if len(store) == expected:
                raise _StopForward

        return hook

    was_training = model.training
    handles = [modules[path].register_forward_hook(hook_for(path)) for path in wanted]

    def run(x: torch.Tensor) -> dict[str, LayerMaps]:
        store.clear()
        try:
            with torch.inference_mode():
                model(x)
        except _StopForward:
            pass
        return {tap.layer: LayerMaps(store[(tap.layer, "z")], store.get((tap.layer, "a"))) for tap in taps}

    model.eval()
    try:
        yield run
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
