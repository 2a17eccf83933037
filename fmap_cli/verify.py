"""Re-check stored pairs: every activation must equal f(preactivation), recomputed in numpy.

Used by ``fmap extract --verify`` on the finished file before it is renamed into place.
Imports only h5py and numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .errors import VerificationError
from .store import schema

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), in float64: numpy has no erf.
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    result: np.ndarray = sign * (1.0 - poly * np.exp(-x * x))
    return result


def _param(params: dict[str, Any], key: str, default: float) -> float:
    """A nonlinearity parameter, given by keyword or as the first positional number."""
    if key in params:
        return float(params[key])
    positional = params.get("args") or []
    return float(positional[0]) if positional else default


def nonlinearity(name: str, params: dict[str, Any]) -> tuple[Callable[[np.ndarray], np.ndarray], float] | None:
    """The numpy reference for ``name`` with its parameters, and the tolerance to compare with.

    relu, relu6 and leaky_relu are exact in float32 (tolerance 0); the others differ from torch's
    kernels by rounding. None when fmap has no reference for ``name``.
    """
    slope = _param(params, "negative_slope", 0.01)
    alpha = _param(params, "alpha", 1.0)
    lo, hi = float(params.get("min_val", -1.0)), float(params.get("max_val", 1.0))

    def f64(z: np.ndarray) -> np.ndarray:
        return z.astype(np.float64)

    def sigmoid(z: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # exp overflows to inf for z < -709: sigmoid is then 0, as it should be
            result: np.ndarray = 1.0 / (1.0 + np.exp(-f64(z)))
        return result

    def gelu(z: np.ndarray) -> np.ndarray:
        if params.get("approximate") == "tanh":
            return 0.5 * f64(z) * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (f64(z) + 0.044715 * f64(z) ** 3)))
        return 0.5 * f64(z) * (1.0 + _erf(f64(z) * _SQRT_HALF))

    functions: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
        "relu": (lambda z: np.maximum(z, np.float32(0)), 0.0),
        "relu6": (lambda z: np.clip(z, np.float32(0), np.float32(6)), 0.0),
        "hardtanh": (lambda z: np.clip(z, np.float32(lo), np.float32(hi)), 0.0),
        "leaky_relu": (lambda z: np.where(z >= 0, z, z * np.float32(slope)), 0.0),
        "elu": (lambda z: np.where(z > 0, f64(z), alpha * np.expm1(f64(z))), 1e-6),
        "sigmoid": (sigmoid, 1e-6),
        "tanh": (lambda z: np.tanh(f64(z)), 1e-6),
        "silu": (lambda z: f64(z) * sigmoid(z), 1e-5),
        "hardswish": (lambda z: f64(z) * np.clip(f64(z) + 3.0, 0.0, 6.0) / 6.0, 1e-5),
        "hardsigmoid": (lambda z: np.clip(f64(z) / 6.0 + 0.5, 0.0, 1.0), 1e-6),
        "mish": (lambda z: f64(z) * np.tanh(np.logaddexp(0.0, f64(z))), 1e-5),
        "gelu": (gelu, 1e-5),
    }
    return functions.get(name)


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify_pairs`` checked and what it could not."""

    values: int
    layers: list[str]
    skipped: dict[str, str]  # layer -> why it could not be re-checked from z alone


def verify_pairs(f: h5py.File) -> VerifyReport:
    """Check a == f(z) for every layer whose a is f applied directly to z, chunk by chunk.

    Layers with ops between z and a (batch norm, residual add) cannot be recomputed from z and
    are reported as skipped, with the reason.

    Raises:
        VerificationError: the first layer where a pair does not hold, with the worst difference.
    """
    checked, layers, skipped = 0, [], {}
    for name, group in f[schema.LAYERS].items():
        if schema.ACTIVATION not in group:
            continue
        f_name = str(group.attrs["nonlinearity"])
        if not int(group.attrs.get("a_is_f_of_z", 1)):
            skipped[name] = f"ops between z and a: {group.attrs.get('path_to_activation', '?')}"
            continue
        reference = nonlinearity(f_name, json.loads(group.attrs.get("nonlinearity_params", "{}")))
        if reference is None:
            skipped[name] = f"no reference implementation of {f_name}"
            continue
        f_ref, tol = reference
        z_ds, a_ds = group[schema.PREACTIVATION], group[schema.ACTIVATION]
        for sel in z_ds.iter_chunks():
            z, a = z_ds[sel], a_ds[sel]
            worst = float(np.max(np.abs(f_ref(z) - a), initial=0.0))
            if not worst <= tol:  # NaN fails too
                raise VerificationError(
                    f"layer '{name}': stored activation differs from {f_name}(preactivation) "
                    f"by {worst:.3g} at chunk {sel}"
                )
            checked += z.size
        layers.append(name)
    return VerifyReport(checked, layers, skipped)
