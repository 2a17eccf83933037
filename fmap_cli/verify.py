"""Re-check stored pairs: every activation must equal f(preactivation), recomputed in numpy.

Used by ``fmap extract --verify`` on the finished file before it is renamed into place.
Imports only h5py and numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import h5py
import numpy as np

from . import schema
from .errors import VerificationError

_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), in float64: numpy has no erf.
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def nonlinearity(name: str, negative_slope: float = 0.01) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """The numpy reference for ``name`` and the absolute tolerance to compare torch's result with.

    relu and leaky_relu are exact in float32 (tolerance 0); the others differ from torch's
    kernels by rounding.
    """
    functions: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
        "relu": (lambda z: np.maximum(z, np.float32(0)), 0.0),
        "leaky_relu": (lambda z: np.where(z >= 0, z, z * np.float32(negative_slope)), 0.0),
        "sigmoid": (lambda z: 1.0 / (1.0 + np.exp(-z.astype(np.float64))), 1e-6),
        "tanh": (lambda z: np.tanh(z.astype(np.float64)), 1e-6),
        "gelu": (lambda z: 0.5 * z * (1.0 + _erf(z.astype(np.float64) * _SQRT_HALF)), 1e-5),
    }
    if name not in functions:
        raise VerificationError(f"cannot verify nonlinearity '{name}': no reference implementation")
    return functions[name]


def verify_pairs(f: h5py.File) -> int:
    """Check a == f(z) for every layer with an activation, chunk by chunk; return values checked.

    Raises:
        VerificationError: the first layer where a pair does not hold, with the worst difference.
    """
    checked = 0
    for name, group in f[schema.LAYERS].items():
        if schema.ACTIVATION not in group:
            continue
        params = json.loads(group.attrs["hyperparameters"])
        f_ref, tol = nonlinearity(str(group.attrs["nonlinearity"]), params.get("negative_slope", 0.01))
        z_ds, a_ds = group[schema.PREACTIVATION], group[schema.ACTIVATION]
        for sel in z_ds.iter_chunks():
            z, a = z_ds[sel], a_ds[sel]
            worst = float(np.max(np.abs(f_ref(z) - a), initial=0.0))
            if not worst <= tol:  # NaN fails too
                raise VerificationError(
                    f"layer '{name}': stored activation differs from "
                    f"{group.attrs['nonlinearity']}(preactivation) by {worst:.3g} at chunk {sel}"
                )
            checked += z.size
    return checked
