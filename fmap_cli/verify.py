"""``fmap extract --verify``: every stored map checked by an independent route before the file is published.

* Each batch, as it is captured, runs again through a deep copy of the model with every in-place
  flag off, read by plain forward hooks (``recompute.py``); every stored z and a must equal that
  recomputation within :data:`TOLERANCE`, and a == f(input of f) must hold at every nonlinearity
  they pair with (numpy references below).
* Before the file is published, its maps are read back and must be byte for byte the values that
  were checked (SHA-256 per dataset); images an earlier run put in the file (``--resume``,
  ``--append``) are recomputed from the stored ``/input``.

Anything stored that was not checked is a failure, as is any difference.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

from .errors import VerificationError, first_line
from .pairing import LayerInfo, LayerMaps
from .recompute import IN, OUT, Source, plain_copy, recompute, sources
from .store import schema
from .store.layout import Storage

_SQRT_HALF = 1.0 / math.sqrt(2.0)
NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


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

    def softplus(z: np.ndarray) -> np.ndarray:
        beta, threshold = float(params.get("beta", 1.0)), float(params.get("threshold", 20.0))
        scaled = beta * f64(z)
        result: np.ndarray = np.where(scaled > threshold, f64(z), np.logaddexp(0.0, scaled) / beta)
        return result

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
        "celu": (lambda z: np.where(z > 0, f64(z), alpha * np.expm1(f64(z) / alpha)), 1e-6),
        "selu": (lambda z: _SELU_SCALE * np.where(z > 0, f64(z), _SELU_ALPHA * np.expm1(f64(z))), 1e-6),
        "softplus": (softplus, 1e-6),
    }
    return functions.get(name)


def host_values(t: torch.Tensor) -> np.ndarray:
    """A map's values on the host, as numpy holds them: a float type numpy lacks (bfloat16, float8) as float32."""
    t = t.detach().to("cpu")
    return (t.float() if t.is_floating_point() and t.dtype not in NUMPY_FLOATS else t).numpy()


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


# ---------------------------------------------------------------------------- --verify during extraction


@dataclass(frozen=True)
class Tolerance:
    """A stored value s passes when |s - r| <= rtol * |r| + atol * max|R| + floor, r its recomputed value
    and R the recomputed map of the whole batch (so values near zero in a map of large ones are
    judged on the map's scale, as float32 rounding of sums of large terms demands)."""

    rtol: float = 1e-5
    atol: float = 1e-5  # relative to the map's largest magnitude
    floor: float = 0.0  # absolute

    def text(self) -> str:
        floor = f" + {self.floor:.3g}" if self.floor else ""
        return f"rtol {self.rtol:.3g} + {self.atol:.3g} x max|map|{floor}"


ROLES = (schema.PREACTIVATION, schema.ACTIVATION)  # z, a: the maps a layer stores
TOLERANCE = Tolerance()  # float32 maps, during the run: the same model twice on the same batch
# Maps read back from a float16 file (images of an earlier run): plus float16 rounding (at most half
# an ulp, 2**-11 relative; twice that allowed, as a value just under a power of two rounds up to it).
FLOAT16_TOLERANCE = Tolerance(rtol=1e-5 + 2.0**-10, floor=2.0**-24)


class Disagreement(BaseException):
    """A check failed inside the forward pass; :func:`verifying` turns it into a :class:`VerificationError`.

    A BaseException, so the forward pass's error handling (any Exception there is the model's) lets it through.
    """


@dataclass
class Report:
    """What --verify checked."""

    values: int = 0  # stored values compared with the recomputation
    images: int = 0
    layers: list[str] = field(default_factory=list)
    largest: float = 0.0  # largest |stored - recomputed|
    used: float = 0.0  # largest difference as a fraction of its tolerance
    pairs: set[str] = field(default_factory=set)  # nonlinearity calls where a == f(input of f) was checked
    no_reference: set[str] = field(default_factory=set)  # f without a numpy reference (values still compared)
    read_back: Tolerance | None = None  # of maps of earlier runs read back from the file, when not TOLERANCE

    def text(self) -> str:
        """The line ``fmap extract --verify`` prints."""
        tolerance = TOLERANCE.text()
        if self.read_back is not None:
            tolerance += f"; {self.read_back.text()} for maps read back from float16"
        extra = ""
        if self.no_reference:
            extra = f"; f(input) not re-derived for {', '.join(sorted(self.no_reference))} (no reference here)"
        return (
            f"verified a == f(z) at the {len(self.pairs)} nonlinearities and all {self.values} stored values "
            f"({len(self.layers)} layers x {self.images} images) against an independent forward pass "
            f"(tolerance {tolerance}; largest difference {self.largest:.3g}, {self.used:.2g} of the "
            f"tolerance){extra}"
        )


class Verifier:
    """Checks every captured map against an independent recomputation (``recompute.py``), batch by batch.

    Args:
        model: the model being captured (deep-copied here, in-place flags off).
        layers: every layer of the model, as described by ``capture.discover``.
        names: the stored layers.
        storage: how maps are stored (which roles, which dtype).
        first_row: images already in the file (seeded by --resume or --append).
        device: where the model runs.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, LayerInfo],
        names: Sequence[str],
        storage: Storage,
        first_row: int,
        device: torch.device,
    ) -> None:
        self.plain = plain_copy(model)
        self.layers, self.names, self.storage, self.device = layers, list(names), storage, device
        self.sources = {name: sources(name, layers[name]) for name in self.names}
        wanted: dict[str, set[str]] = {}
        for source in self.sources.values():
            for where in (source.z, source.a):
                if where is not None:
                    wanted.setdefault(where.call, set()).add(where.role)
            if source.f is not None:
                wanted.setdefault(source.f, set()).update((IN, OUT))
        self.wanted = wanted
        self.first_row = self.row = first_row
        self.digests: dict[tuple[str, str], Any] = {}
        self.report = Report(layers=self.names)

    def wrap(
        self, forward: Callable[[torch.Tensor], dict[str, LayerMaps]]
    ) -> Callable[[torch.Tensor], dict[str, LayerMaps]]:
        """``forward`` (capture's), checking every batch it captures."""

        def checked(x: torch.Tensor) -> dict[str, LayerMaps]:
            maps = forward(x)
            self.check(x, {name: (m.z, m.a) for name, m in maps.items()}, digest=True)
            self.row += x.shape[0]
            return maps

        return checked

    def check(
        self,
        x: torch.Tensor,
        maps: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
        digest: bool = False,
        tolerance: Tolerance = TOLERANCE,
    ) -> None:
        """Compare one batch's maps (z, a) with the recomputation on ``x``.

        Raises:
            Disagreement: a map differs, or one was not recomputed.
        """
        recomputed = recompute(self.plain, x, self.wanted)
        checked = []
        for name in self.names:
            source = self.sources[name]
            for role, stored, where in zip(ROLES, maps[name], (source.z, source.a), strict=True):
                if stored is None:
                    continue
                want = None if where is None else recomputed.get(where.call, {}).get(where.role)
                if want is None:
                    raise Disagreement(_unchecked(name, role, where))
                self._compare(name, role, stored, want, tolerance)
                if role in self.storage.roles:
                    checked.append((name, role, stored))
        self._pairs(recomputed)
        # counted only now: CUDA running out of memory above makes extract retry the batch in halves
        for name, role, stored in checked:
            self.report.values += stored.numel()
            if digest:
                self._digest(name, role, stored)
        self.report.images += x.shape[0]

    def _compare(self, name: str, role: str, stored: torch.Tensor, want: torch.Tensor, tolerance: Tolerance) -> None:
        got = stored.detach().to(want.device, torch.float32)
        want = want.float()
        if got.shape != want.shape:
            raise Disagreement(
                f"layer '{name}': stored {role} has shape {tuple(got.shape[1:])} per image, "
                f"the independent forward pass gives {tuple(want.shape[1:])}"
            )
        if want.numel() == 0:
            return
        magnitude = want.abs()
        scale = float(torch.where(torch.isfinite(magnitude), magnitude, 0).max())
        limit = tolerance.rtol * magnitude + (tolerance.atol * scale + tolerance.floor)
        diff = (got - want).abs()
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        ratio = torch.nan_to_num(torch.where(same, 0.0, diff / limit), nan=math.inf)
        worst = int(torch.argmax(ratio))
        used = float(ratio.flatten()[worst])
        if not used <= 1.0:
            row, *position = np.unravel_index(worst, tuple(got.shape))
            raise Disagreement(
                f"layer '{name}': stored {role} differs from the independent forward pass by "
                f"{float(diff.flatten()[worst]):.3g} at image {self.row + int(row)}, position "
                f"{tuple(int(p) for p in position)} (tolerance: {tolerance.text()})"
            )
        self.report.used = max(self.report.used, used)
        self.report.largest = max(self.report.largest, float(torch.where(same, 0.0, diff).max()))

    def _pairs(self, recomputed: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """a == f(input of f) at every nonlinearity call a stored layer is paired through."""
        for call in sorted({s.f for s in self.sources.values() if s.f is not None}):
            held = recomputed.get(call, {})
            if IN not in held or OUT not in held:
                raise Disagreement(f"nonlinearity '{call}': the independent forward pass made no such call")
            info = self.layers.get(call)
            f_name, params = (info.nonlinearity, info.nonlinearity_params) if info else ("none", {})
            reference = nonlinearity(f_name, params)
            if reference is None:
                self.report.no_reference.add(f_name)
                continue
            f_ref, tol = reference
            z, a = held[IN].float().cpu().numpy(), held[OUT].float().cpu().numpy()
            want = f_ref(z)
            if want.shape != a.shape:
                raise Disagreement(f"nonlinearity '{call}': output shape {a.shape[1:]} is not its input's")
            with np.errstate(invalid="ignore"):
                excess = np.abs(want - a) - tol * (1.0 + np.abs(want))
            excess[(want == a) | (np.isnan(want) & np.isnan(a))] = 0.0
            excess = np.nan_to_num(excess, nan=np.inf)
            worst = int(np.argmax(excess))
            if excess.size and not excess.flat[worst] <= 0.0:
                row, *position = np.unravel_index(worst, a.shape)
                raise Disagreement(
                    f"nonlinearity '{call}': its output differs from {f_name}(its input) by "
                    f"{float(abs(want.flat[worst] - a.flat[worst])):.3g} at image {self.row + int(row)}, position "
                    f"{tuple(int(p) for p in position)} (tolerance {tol:.3g} x (1 + |{f_name}(z)|))"
                )
            self.report.pairs.add(call)

    def _digest(self, name: str, role: str, stored: torch.Tensor) -> None:
        """Hash the values as the writer stores them (host copy, storage dtype, C order)."""
        values = host_values(stored).astype(np.float16 if self.storage.dtype == "float16" else np.float32, copy=False)
        self.digests.setdefault((name, role), hashlib.sha256()).update(np.ascontiguousarray(values).data)

    def finish(self, f: h5py.File, batch_size: int) -> Report:
        """Check the file before it is published: images of earlier runs recomputed from /input, this
        run's images byte for byte the values checked while capturing.

        Raises:
            VerificationError: anything stored that differs or was not checked.
        """
        n = int(f.attrs["n_images"])
        try:
            self._earlier_rows(f, batch_size)
        except Disagreement as exc:
            raise VerificationError(str(exc)) from None
        for name, group in f[schema.LAYERS].items():
            for role in ROLES:
                if role not in group or n == self.first_row:
                    continue
                digest = self.digests.get((name, role))
                if digest is None:
                    raise VerificationError(f"layer '{name}': its stored {role} was not checked")
                if _file_digest(group[role], self.first_row, n) != digest.hexdigest():
                    raise VerificationError(
                        f"layer '{name}': the {role} written to the file differs from the values verified "
                        "during the forward pass"
                    )
        if self.report.values == 0:
            raise VerificationError("--verify checked no stored value")
        return self.report

    def _earlier_rows(self, f: h5py.File, batch_size: int) -> None:
        """Images an earlier run put in the file: recomputed from /input, compared with the file's maps."""
        tolerance = FLOAT16_TOLERANCE if self.storage.dtype == "float16" else TOLERANCE
        if self.first_row and tolerance is not TOLERANCE:
            self.report.read_back = tolerance
        self.row = 0
        for start in range(0, self.first_row, batch_size):
            stop = min(start + batch_size, self.first_row)
            x = torch.from_numpy(f[schema.INPUT][start:stop]).to(self.device)
            group = f[schema.LAYERS]
            stored = {
                name: tuple(
                    torch.from_numpy(group[name][role][start:stop].astype(np.float32)) if role in group[name] else None
                    for role in ROLES
                )
                for name in self.names
            }
            self.check(x, stored, tolerance=tolerance)  # type: ignore[arg-type]
            self.row = stop


def _unchecked(name: str, role: str, where: Source | None) -> str:
    if where is None:
        return f"layer '{name}': its stored {role} was not checked (no call it is recomputed from)"
    return (
        f"layer '{name}': its stored {role} was not checked: the independent forward pass made no call "
        f"'{where.call}' to read it from"
    )


def _file_digest(ds: h5py.Dataset, start: int, stop: int) -> str:
    digest = hashlib.sha256()
    per_row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, (64 << 20) // per_row)  # about 64 MiB at a time
    for first in range(start, stop, step):
        digest.update(np.ascontiguousarray(ds[first : min(first + step, stop)]).data)
    return digest.hexdigest()


@contextmanager
def verifying(
    model: nn.Module,
    layers: Mapping[str, LayerInfo],
    names: Sequence[str],
    storage: Storage,
    f: h5py.File,
    device: torch.device,
) -> Iterator[Verifier]:
    """A :class:`Verifier` for a run writing ``f``; a :class:`Disagreement` inside becomes a VerificationError.

    Raises:
        VerificationError: the file holds images of an earlier run and no /input to recompute them
            from, or the model cannot be copied.
    """
    first_row = int(f.attrs["n_images"])
    if first_row and schema.INPUT not in f:
        raise VerificationError(
            f"--verify: the {first_row} images an earlier run put in the file cannot be re-checked: "
            "it has no /input (that run did not use --save-input)"
        )
    try:
        verifier = Verifier(model, layers, names, storage, first_row, device)
    except Exception as exc:  # deepcopy runs the model's own __deepcopy__/__reduce__
        raise VerificationError(
            f"--verify: cannot copy the model for the independent forward pass: {type(exc).__name__}: {first_line(exc)}"
        ) from None
    try:
        yield verifier
    except Disagreement as exc:
        raise VerificationError(str(exc)) from None
