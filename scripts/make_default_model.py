"""Build fmap's default built-in model "edges": a hand-designed 2-layer CNN.

The weights are designed, not trained, and fully deterministic:

* conv1 (16 x 3 x 7 x 7, stride 2) holds oriented luminance edge detectors,
  bright-line detectors, centre-surround spot detectors and colour-opponent blobs.
  Filters are designed in raw RGB space (pixel values in [0, 1]) and then folded
  into the ImageNet-normalised input space the model actually receives.
* conv2 (16 x 16 x 3 x 3) combines the pooled conv1 maps into orientation energy,
  corners, cross-hatching, texture, smoothness, spots and colour/texture units.

Usage::

    python scripts/make_default_model.py              # write edges.npz, edges.toml
    python scripts/make_default_model.py --check      # + sparsity on sample_images/
    python scripts/make_default_model.py --calibrate  # + percentile bias hints

The .npz is written with fixed zip timestamps, so re-runs give byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_DIR = REPO_ROOT / "fmap_cli" / "builtin"
SAMPLE_DIR = REPO_ROOT / "sample_images"

INPUT_SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601 luminance weights (sum to 1)

K1 = 7  # conv1 kernel size
K2 = 3  # conv2 kernel size
MODEL_DESCRIPTION = (
    "Hand-designed 2-layer CNN: conv1 = oriented edge and colour-opponent filters, conv2 = combinations of them."
)
CONV1_DESCRIPTION = (
    "Oriented luminance edges (4 orientations x 2 polarities), bright lines, "
    "centre-surround spots, colour-opponent blobs."
)
CONV2_DESCRIPTION = (
    "Combinations of pooled conv1 maps: orientation energy, corners, cross-hatch, texture, smoothness, spots, colour."
)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: byte-identical .npz on every run

FloatArray = np.ndarray


@dataclass(frozen=True)
class Filter:
    """One designed output channel: weights (in, k, k), bias and description."""

    weight: FloatArray
    bias: float
    description: str


# --------------------------------------------------------------------------- conv1
# Offsets of the 7x7 taps; y grows downwards as in image coordinates.  PyTorch's
# conv2d is a cross-correlation, so tap (dy, dx) multiplies pixel (y + dy, x + dx).
_R = K1 // 2
DY, DX = np.mgrid[-_R : _R + 1, -_R : _R + 1].astype(np.float64)

# conv1 channel indices (used by the conv2 design).
V_DL, V_LD, H_DL, H_LD, D1_DL, D1_LD, D2_DL, D2_LD = range(8)
HBAR, VBAR, ON, OFF, RG, GR, BY, YB = range(8, 16)
EDGE_CHANNELS = list(range(8))

# conv1 thresholds (raw-space contrast units: the preferred stimulus at contrast c
# gives a response of c, so a threshold of 0.05 means "needs about 5% contrast").
T_EDGE = 0.045
T_BAR = 0.025
T_SPOT = 0.04
T_RG = 0.20
T_GR = 0.06
T_BY = 0.12
T_YB = 0.25


def _unit_gain(spatial: FloatArray) -> FloatArray:
    """Scale a kernel so its positive taps sum to 1 (best unit-contrast input -> 1)."""
    return spatial / spatial[spatial > 0].sum()


def _luminance(spatial: FloatArray) -> FloatArray:
    """Spread a 2-D raw-space kernel over RGB with luminance weights -> (3, k, k)."""
    return LUMA[:, None, None] * spatial[None]


def _rotated(gy: float, gx: float) -> tuple[FloatArray, FloatArray]:
    """Coordinates (u, v): u along unit vector (gy, gx), v along the perpendicular."""
    norm = float(np.hypot(gy, gx))
    gy, gx = gy / norm, gx / norm
    u = DY * gy + DX * gx
    v = -DY * gx + DX * gy
    return u, v


def edge_kernel(gy: float, gx: float, sigma_u: float = 1.1, sigma_v: float = 1.8) -> FloatArray:
    """Odd Gaussian-derivative edge filter; positive if light lies along (gy, gx)."""
    u, v = _rotated(gy, gx)
    k = u * np.exp(-(u**2) / (2 * sigma_u**2) - v**2 / (2 * sigma_v**2))
    k -= k.mean()  # exactly zero-sum (it already is up to rounding)
    return _luminance(_unit_gain(k))


def bar_kernel(gy: float, gx: float, sigma_u: float = 0.9, sigma_v: float = 2.0) -> FloatArray:
    """Even (Mexican-hat across, Gaussian along) detector of a bright thin line.

    (gy, gx) is the direction *across* the line.
    """
    u, v = _rotated(gy, gx)
    across = (1 - u**2 / sigma_u**2) * np.exp(-(u**2) / (2 * sigma_u**2))
    k = across * np.exp(-(v**2) / (2 * sigma_v**2))
    k -= k.mean()
    return _luminance(_unit_gain(k))


def spot_kernel(sign: float, sigma_c: float = 1.0, sigma_s: float = 2.5) -> FloatArray:
    """Difference-of-Gaussians centre-surround: sign=+1 bright spot, -1 dark spot."""
    r2 = DY**2 + DX**2
    centre = np.exp(-r2 / (2 * sigma_c**2))
    surround = np.exp(-r2 / (2 * sigma_s**2))
    k = centre / centre.sum() - surround / surround.sum()
    return _luminance(_unit_gain(sign * k))


def colour_kernel(channels: Iterable[float], sigma: float = 1.5) -> FloatArray:
    """Colour-opponent blob: Gaussian in space, zero-sum over R, G, B (ignores grey)."""
    chan = np.asarray(list(channels), dtype=np.float64)
    if abs(chan.sum()) > 1e-12:
        raise ValueError("colour-opponent channel weights must sum to zero")
    g = np.exp(-(DY**2 + DX**2) / (2 * sigma**2))
    g /= g.sum()  # a uniform patch with opponent signal d gives d
    return chan[:, None, None] * g[None]


def conv1_filters() -> list[Filter]:
    """Design the 16 conv1 filters in raw RGB [0, 1] space."""
    s = np.sqrt(0.5)
    red_green = (1.0, -1.0, 0.0)
    blue_yellow = (-0.5, -0.5, 1.0)
    return [
        Filter(edge_kernel(0, 1), -T_EDGE, "vertical edge, dark left / light right"),
        Filter(edge_kernel(0, -1), -T_EDGE, "vertical edge, light left / dark right"),
        Filter(edge_kernel(1, 0), -T_EDGE, "horizontal edge, dark above / light below"),
        Filter(edge_kernel(-1, 0), -T_EDGE, "horizontal edge, light above / dark below"),
        Filter(
            edge_kernel(s, s),
            -T_EDGE,
            "diagonal '/' edge, dark upper-left / light lower-right",
        ),
        Filter(
            edge_kernel(-s, -s),
            -T_EDGE,
            "diagonal '/' edge, light upper-left / dark lower-right",
        ),
        Filter(
            edge_kernel(-s, s),
            -T_EDGE,
            "diagonal '\\' edge, dark lower-left / light upper-right",
        ),
        Filter(
            edge_kernel(s, -s),
            -T_EDGE,
            "diagonal '\\' edge, light lower-left / dark upper-right",
        ),
        Filter(bar_kernel(1, 0), -T_BAR, "thin bright horizontal line or bar"),
        Filter(bar_kernel(0, 1), -T_BAR, "thin bright vertical line or bar"),
        Filter(spot_kernel(+1), -T_SPOT, "bright spot on a darker surround (on-centre)"),
        Filter(spot_kernel(-1), -T_SPOT, "dark spot on a brighter surround (off-centre)"),
        Filter(
            colour_kernel(red_green),
            -T_RG,
            "red / magenta rather than green (colour only)",
        ),
        Filter(
            colour_kernel(np.negative(red_green)),
            -T_GR,
            "green / cyan rather than red (colour only)",
        ),
        Filter(colour_kernel(blue_yellow), -T_BY, "blue rather than yellow (colour only)"),
        Filter(
            colour_kernel(np.negative(blue_yellow)),
            -T_YB,
            "yellow / orange rather than blue (colour only)",
        ),
    ]


def fold_normalisation(weight: FloatArray, bias: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Fold mean/std normalisation into raw-space conv weights (out, 3, k, k).

    With x_raw = x_norm * std + mean: w_norm = w_raw * std and
    b_norm = b_raw + sum(w_raw * mean).
    """
    w_norm = weight * STD[None, :, None, None]
    b_norm = bias + (weight.sum(axis=(2, 3)) * MEAN[None, :]).sum(axis=1)
    return w_norm, b_norm


# --------------------------------------------------------------------------- conv2
def _taps(*positions: tuple[int, int]) -> FloatArray:
    """3x3 mask with 1 at the given (row, col) positions."""
    m = np.zeros((K2, K2))
    for r, c in positions:
        m[r, c] = 1.0
    return m


COL = _taps((0, 1), (1, 1), (2, 1)) / 3  # along a vertical line
ROW = _taps((1, 0), (1, 1), (1, 2)) / 3  # along a horizontal line
SLASH = _taps((2, 0), (1, 1), (0, 2)) / 3  # along '/'
BACKSLASH = _taps((0, 0), (1, 1), (2, 2)) / 3  # along '\'
CENTRE = _taps((1, 1))
ALL = np.ones((K2, K2)) / 9
SURROUND = (np.ones((K2, K2)) - CENTRE) / 8

ORIENTATIONS = {  # name: (the two polarity channels, mask along the edge)
    "vertical": ((V_DL, V_LD), COL),
    "horizontal": ((H_DL, H_LD), ROW),
    "slash": ((D1_DL, D1_LD), SLASH),
    "backslash": ((D2_DL, D2_LD), BACKSLASH),
}
ORTHOGONAL = {
    "vertical": "horizontal",
    "horizontal": "vertical",
    "slash": "backslash",
    "backslash": "slash",
}


class Conv2Builder:
    """Accumulates one conv2 filter of shape (16, 3, 3)."""

    def __init__(self) -> None:
        """Start from an all-zero filter."""
        self.w = np.zeros((16, K2, K2))

    def add(self, channels: Iterable[int], mask: FloatArray, gain: float = 1.0) -> Conv2Builder:
        """Add ``gain * mask`` to each of ``channels``; returns self for chaining."""
        for ch in channels:
            self.w[ch] += gain * mask
        return self


def _energy(name: str, gain: float = 1.0) -> Conv2Builder:
    """Both polarities of an orientation pooled along the edge, minus the orthogonal."""
    chans, mask = ORIENTATIONS[name]
    ortho = ORIENTATIONS[ORTHOGONAL[name]][0]
    return Conv2Builder().add(chans, mask, gain).add(ortho, CENTRE, -0.5 * gain)


def conv2_filters() -> list[Filter]:
    """Design the 16 conv2 filters over the 16 pooled, rectified conv1 maps."""
    lines = (HBAR, VBAR)
    colours = (RG, GR, BY, YB)
    cross = Conv2Builder().add((V_DL, V_LD, H_DL, H_LD), ALL, 1.0).add((D1_DL, D1_LD, D2_DL, D2_LD), ALL, -0.75)
    diag_cross = Conv2Builder().add((D1_DL, D1_LD, D2_DL, D2_LD), ALL, 1.0).add((V_DL, V_LD, H_DL, H_LD), ALL, -0.75)
    # Top-left corner of a bright shape: its top edge (dark above) runs right from
    # the centre, its left edge (dark left) runs down; edges that continue past the
    # corner are suppressed (end-stopping).
    corner_tl = (
        Conv2Builder()
        .add([H_DL], _taps((1, 1), (1, 2)), 0.5)
        .add([V_DL], _taps((1, 1), (2, 1)), 0.5)
        .add([H_DL], _taps((1, 0)), -0.5)
        .add([V_DL], _taps((0, 1)), -0.5)
    )
    corner_tr = (
        Conv2Builder()
        .add([H_DL], _taps((1, 1), (1, 0)), 0.5)
        .add([V_LD], _taps((1, 1), (2, 1)), 0.5)
        .add([H_DL], _taps((1, 2)), -0.5)
        .add([V_LD], _taps((0, 1)), -0.5)
    )
    texture = Conv2Builder().add(EDGE_CHANNELS, ALL, 1.0)
    smooth = Conv2Builder().add(EDGE_CHANNELS, ALL, -3.0).add(lines, ALL, -3.0)
    thin_lines = Conv2Builder().add([HBAR], ROW, 1.0).add([VBAR], COL, 1.0)
    bright_spot = Conv2Builder().add([ON], CENTRE, 1.0).add([ON], SURROUND, -0.5).add([OFF], ALL, -1.0)
    dark_spot = Conv2Builder().add([OFF], CENTRE, 1.0).add([OFF], SURROUND, -0.5).add([ON], ALL, -1.0)
    saturated = Conv2Builder().add(colours, ALL, 1.0)
    smooth_blue = Conv2Builder().add([BY], ALL, 1.0).add(EDGE_CHANNELS, ALL, -0.5)
    warm_texture = Conv2Builder().add((RG, YB), ALL, 1.0).add(EDGE_CHANNELS, ALL, 0.25).add([BY], ALL, -1.0)

    specs: list[tuple[Conv2Builder, float, str]] = [
        (
            _energy("vertical"),
            -0.04,
            "vertical edge energy (either polarity), orientation-selective",
        ),
        (
            _energy("horizontal"),
            -0.04,
            "horizontal edge energy (either polarity), orientation-selective",
        ),
        (_energy("slash"), -0.03, "diagonal '/' edge energy (either polarity)"),
        (_energy("backslash"), -0.03, "diagonal '\\' edge energy (either polarity)"),
        (cross, -0.04, "grid / cross-hatch of horizontal and vertical edges"),
        (diag_cross, -0.03, "diagonal cross-hatch of '/' and '\\' edges"),
        (corner_tl, -0.05, "top-left corner of a bright shape"),
        (corner_tr, -0.05, "top-right corner of a bright shape"),
        (texture, -0.25, "dense texture: many edges of any orientation"),
        (smooth, 0.02, "smooth area: no edges or lines nearby (sky, walls, blur)"),
        (
            thin_lines,
            -0.04,
            "thin bright lines (horizontal or vertical), e.g. wires, struts",
        ),
        (bright_spot, -0.015, "isolated bright spot (lights, highlights, reflections)"),
        (dark_spot, -0.015, "isolated dark spot (pupils, holes, dark dots)"),
        (saturated, -0.08, "strongly coloured region (any hue)"),
        (smooth_blue, -0.015, "smooth blue area (sky, water)"),
        (
            warm_texture,
            -0.20,
            "warm-coloured (red / orange / yellow) region, strongest where textured",
        ),
    ]
    return [Filter(b.w, bias, desc) for b, bias, desc in specs]


# --------------------------------------------------------------------------- weights
def build_weights() -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """Return the float32 weight dict and the conv1 / conv2 channel descriptions."""
    f1 = conv1_filters()
    f2 = conv2_filters()
    w1 = np.stack([f.weight for f in f1])
    b1 = np.array([f.bias for f in f1])
    w1, b1 = fold_normalisation(w1, b1)
    w2 = np.stack([f.weight for f in f2])
    b2 = np.array([f.bias for f in f2])
    weights = {
        "conv1.weight": w1.astype(np.float32),
        "conv1.bias": b1.astype(np.float32),
        "conv2.weight": w2.astype(np.float32),
        "conv2.bias": b2.astype(np.float32),
    }
    return weights, [f.description for f in f1], [f.description for f in f2]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed .npz (readable by np.load) with fixed zip timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _toml_str(s: str) -> str:
    """Quote a string as a TOML basic string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_list(items: Iterable[str], indent: str = "    ") -> str:
    """Format strings as a multi-line TOML array."""
    body = "".join(f"{indent}{_toml_str(s)},\n" for s in items)
    return "[\n" + body + "]"


def _floats(values: np.ndarray) -> str:
    """Format floats as a one-line TOML array."""
    return "[" + ", ".join(repr(float(v)) for v in values) + "]"


def render_toml(desc1: list[str], desc2: list[str]) -> str:
    """Render edges.toml, the model spec the fmap package parses."""
    return f"""\
# Generated by scripts/make_default_model.py -- do not edit by hand.
[model]
name = "edges"
description = {_toml_str(MODEL_DESCRIPTION)}
# keys "<layer>.weight" (float32, (out, in, k, k)), "<layer>.bias" (float32, (out,))
weights = "edges.npz"

[input]
size = [{INPUT_SIZE}, {INPUT_SIZE}]
mean = {_floats(MEAN)}
std = {_floats(STD)}

[[layers]]
name = "conv1"
type = "conv2d"
description = {_toml_str(CONV1_DESCRIPTION)}
out_channels = 16
kernel_size = {K1}
stride = 2
padding = {K1 // 2}
activation = "relu"
channel_descriptions = {_toml_list(desc1)}

[[layers]]
name = "pool1"
type = "maxpool2d"
kernel_size = 2
stride = 2

[[layers]]
name = "conv2"
type = "conv2d"
description = {_toml_str(CONV2_DESCRIPTION)}
out_channels = 16
kernel_size = {K2}
stride = 1
padding = {K2 // 2}
activation = "relu"
channel_descriptions = {_toml_list(desc2)}
"""


# --------------------------------------------------------------------------- check
def load_image(path: Path) -> np.ndarray:
    """Preprocess like fmap: upright RGB, short side 224, centre crop, normalise.

    Returns a float64 array of shape (3, 224, 224).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    scale = INPUT_SIZE / min(rgb.size)
    size = (
        max(INPUT_SIZE, round(rgb.width * scale)),
        max(INPUT_SIZE, round(rgb.height * scale)),
    )
    rgb = rgb.resize(size, Image.BILINEAR)
    left, top = (rgb.width - INPUT_SIZE) // 2, (rgb.height - INPUT_SIZE) // 2
    rgb = rgb.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
    x = np.asarray(rgb, dtype=np.float64) / 255.0
    x = (x - MEAN) / STD
    return x.transpose(2, 0, 1)


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Cross-correlate one (C, H, W) image like torch.nn.functional.conv2d."""
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding)))
    k = w.shape[-1]
    win = sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("chwij,ocij->ohw", win, w, optimize=True) + b[:, None, None]


def maxpool2d(x: np.ndarray, k: int = 2) -> np.ndarray:
    """Non-overlapping k x k max pooling (stride k) of (C, H, W)."""
    c, h, w = x.shape
    return x[:, : h - h % k, : w - w % k].reshape(c, h // k, k, w // k, k).max(axis=(2, 4))


def forward(x: np.ndarray, weights: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run the model; return (conv1 pre-act, conv1, conv2 pre-act, conv2) maps."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    z1 = conv2d(x, w["conv1.weight"], w["conv1.bias"], stride=2, padding=K1 // 2)
    a1 = np.maximum(z1, 0)
    z2 = conv2d(maxpool2d(a1), w["conv2.weight"], w["conv2.bias"], stride=1, padding=K2 // 2)
    return z1, a1, z2, np.maximum(z2, 0)


def sample_paths(sample_dir: Path) -> list[Path]:
    """List the sample photographs, sorted by name."""
    return sorted(p for p in sample_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def _table(
    title: str,
    names: list[str],
    rows: dict[str, np.ndarray],
    fmt: Callable[[float], str],
) -> None:
    """Print a channel x image table."""
    cols = list(rows)
    print(f"\n{title}")
    print(f"{'ch':>3} " + " ".join(f"{c[:10]:>10}" for c in cols) + "  description")
    for i, name in enumerate(names):
        print(f"{i:>3} " + " ".join(f"{fmt(rows[c][i]):>10}" for c in cols) + f"  {name}")


def _percent(v: float) -> str:
    """Format a fraction as a percentage."""
    return f"{100 * v:.1f}%"


def check(sample_dir: Path, weights: dict[str, np.ndarray], desc1: list[str], desc2: list[str]) -> bool:
    """Print per-channel fraction of zeros for conv1 and conv2 on each sample image.

    Returns False if any channel is dead (zero everywhere on every sample image).
    """
    zeros1: dict[str, np.ndarray] = {}
    zeros2: dict[str, np.ndarray] = {}
    acts1, acts2 = [], []
    for path in sample_paths(sample_dir):
        _, a1, _, a2 = forward(load_image(path), weights)
        zeros1[path.stem] = (a1 == 0).mean(axis=(1, 2))
        zeros2[path.stem] = (a2 == 0).mean(axis=(1, 2))
        acts1.append(a1)
        acts2.append(a2)
    zeros1["ALL"] = np.mean([zeros1[k] for k in list(zeros1)], axis=0)
    zeros2["ALL"] = np.mean([zeros2[k] for k in list(zeros2)], axis=0)
    _table("conv1: fraction of zeros after ReLU", desc1, zeros1, _percent)
    _table("conv2: fraction of zeros after ReLU", desc2, zeros2, _percent)
    dead1 = [i for i in range(16) if all((a[i] == 0).all() for a in acts1)]
    dead2 = [i for i in range(16) if all((a[i] == 0).all() for a in acts2)]
    print(
        f"\ndead conv1 channels: {dead1 or 'none'};",
        f"dead conv2 channels: {dead2 or 'none'}",
    )
    return not dead1 and not dead2


def calibrate(sample_dir: Path, weights: dict[str, np.ndarray], quantile: float = 0.8) -> None:
    """Print per-channel pre-activation quantiles (bias shifts giving that sparsity)."""
    z1s, z2s = [], []
    for path in sample_paths(sample_dir):
        z1, _, z2, _ = forward(load_image(path), weights)
        z1s.append(z1.reshape(16, -1))
        z2s.append(z2.reshape(16, -1))
    for name, zs in (("conv1", z1s), ("conv2", z2s)):
        z = np.concatenate(zs, axis=1)
        q = np.quantile(z, quantile, axis=1)
        print(
            f"{name}: pre-activation {quantile:.0%} quantile per channel",
            "(add -q to the bias for that fraction of zeros):",
        )
        print("  " + " ".join(f"{v:+.3f}" for v in q))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUILTIN_DIR, help="where to write edges.npz/.toml")
    parser.add_argument("--samples", type=Path, default=SAMPLE_DIR, help="sample image dir for --check")
    parser.add_argument("--check", action="store_true", help="print per-channel sparsity on the samples")
    parser.add_argument("--calibrate", action="store_true", help="print bias hints from the samples")
    args = parser.parse_args(argv)

    weights, desc1, desc2 = build_weights()
    args.out.mkdir(parents=True, exist_ok=True)
    write_npz(args.out / "edges.npz", weights)
    (args.out / "edges.toml").write_text(render_toml(desc1, desc2), encoding="utf-8")
    print(f"wrote {args.out / 'edges.npz'} and {args.out / 'edges.toml'}")
    ok = True
    if args.calibrate:
        calibrate(args.samples, weights)
    if args.check:
        ok = check(args.samples, weights, desc1, desc2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
