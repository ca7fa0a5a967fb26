"""RandAugment on whole uint8 batches (GPU or CPU) with exactly timm's semantics.

DeiT trains with timm's ``rand-m9-mstd0.5-inc1`` ("Rand Augment 9/0.5", DeiT Table 9). timm applies it to
one PIL image at a time on the CPU (``timm.data.auto_augment.RandAugment``), which caps a 16-core host at
a few thousand images/s; DALI's stock ``rand_augment`` is fast but has other ops, magnitudes and sampling.
This module reproduces timm's policy on a batch ``[N, 3, H, W]`` of uint8 images with torch ops, so it
runs on the GPU right after DALI's decode/crop, and matches timm image for image:

* **The random draws** (``RandAugment.draw``) follow ``RandAugment.__call__`` / ``AugmentOp.__call__``:
  per image ``num_layers`` ops chosen uniformly *with* replacement (``np.random.choice(ops, n)``), each
  applied with probability ``prob`` (timm skips when ``random() > prob``), magnitude
  ``gauss(m, mstd)`` (``uniform(0, m)`` when ``mstd > 100``) clipped to ``[0, magnitude_max]`` and, for
  the signed ops, negated with probability 1/2 (``_randomly_negate``). They are drawn on the host from a
  ``numpy.random.Generator`` so that a seeded run is reproducible and resumable; the device only runs ops.
* **The level -> argument maps** (``RandAugment.level_args``) are timm's ``*_level_to_arg`` functions,
  evaluated in float64 in the same order, so the arguments are bit-identical to timm's.
* **The ops** reproduce what PIL does for those arguments (PIL's C code, see the comment on each op).
  The LUT and blend ops are bit-exact, including PIL's truncating float32 blend and its SMOOTH rounding.
  On a CPU the batch runs one image per kernel call, in place on one copy of it (no reordering), and a
  few steps take CPU-fast forms of the same arithmetic (numpy's float -> uint8 cast, bitwise selects for
  ``torch.where``, reductions laid out along the image's memory): bit-identical, ~1.35x faster there.
  The affine ops share PIL's geometry (``Image.transform``: inverse mapping of output pixel centres,
  edge-clamped taps, the fill colour where the mapped centre falls outside the image, truncation) and
  come with two samplers:

  - ``geometry="grid_sample"`` (default): ``F.grid_sample``, one fused kernel; torch's bicubic kernel
    has a = -0.75 where PIL's has a = -1, so pixels differ by ~0.1-0.6 of 255 on average, up to ~16 at
    hard edges (bilinear: < 0.01, max 1; nearest: PIL's fixed-point rounding differs on a few rotated
    pixels). ShearX/Y and TranslateX/Y run grid_sample's kernel as a 1-D pass with one set of 4 weights
    per row or column (``_warp_1d_grid_sample``: its 16 taps less the 12 of weight 0), ~3x faster on a CPU.
  - ``geometry="pil"``: PIL's Geometry.c sampler re-implemented with PIL's float64 operations in PIL's
    order; bit-exact for bicubic, bilinear and nearest, but ~150 elementwise kernels (many of them
    float64) per chunk of images instead of ~30, so it is the reference rather than the training path.
    ShearX/Y and TranslateX/Y move pixels along one axis only, where PIL's weight along the other axis
    is exactly 0: they run as one 1-D pass (``_warp_1d``, still bit-exact, 4 taps per pixel, not 16).

Known differences from running timm itself:

* ``PosterizeIncreasing`` at magnitude >= 10 keeps 0 bits: older Pillow returned a black image, which is
  what this module does; recent Pillow (13.0 in this venv) raises ``ValueError("bits must be between or
  equal to 1 and 8")``, i.e. timm's own pipeline crashes on ~0.15% of images with ``m9-mstd0.5`` there.
* Rotation matrices are built with ``np.round(x, 15)`` where PIL uses Python's ``round(x, 15)``; the two
  differ in the last bit for a few percent of angles, which moves source coordinates by ~1e-13 pixels.
* Only timm's two uniform op sets (``inc0`` / ``inc1``) are supported, not the weighted ``t...`` sets,
  and only one interpolation per instance (timm's ``'random'`` picks bilinear/bicubic per op call).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.layout import image_major, is_channels_last
from pipeline.transfer import to_device

__all__ = [
    "IMAGENET_FILL",
    "INCREASING_OPS",
    "OPS",
    "RandAugment",
    "RandAugmentParams",
    "RandAugmentSpec",
    "bench",
    "bench_ops",
    "parse_spec",
]

# timm.data.auto_augment._LEVEL_DENOM: an 'M' magnitude is divided by this to get the op's level in [0, 1].
_LEVEL_DENOM = 10.0

# timm's ``img_mean`` fill for the affine ops: transforms_imagenet_train builds it as
# tuple(min(255, round(255 * x)) for x in mean) from IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406).
IMAGENET_FILL: tuple[int, int, int] = (124, 116, 104)

# timm.data.auto_augment._RAND_INCREASING_TRANSFORMS ('inc1'), in timm's order.
INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
# timm.data.auto_augment._RAND_TRANSFORMS ('inc0', timm's default), in timm's order.
OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

# Kernels: ops that run the same code share a kind (all five affine ops are one warp with a per-image
# matrix), and the batch is sorted by kind so that each kind runs once per layer on a contiguous slice.
_AUTOCONTRAST, _EQUALIZE, _INVERT, _WARP, _POSTERIZE, _SOLARIZE, _SOLARIZE_ADD = range(7)
_COLOR, _CONTRAST, _BRIGHTNESS, _SHARPNESS = range(7, 11)
_WARP_ROWS, _WARP_COLUMNS = 11, 12  # affine maps that move pixels along rows only / columns only
_N_KINDS = 13  # kind _N_KINDS = "not applied in this layer"
_KIND = {
    "AutoContrast": _AUTOCONTRAST, "Equalize": _EQUALIZE, "Invert": _INVERT, "Rotate": _WARP,
    "Posterize": _POSTERIZE, "PosterizeIncreasing": _POSTERIZE, "Solarize": _SOLARIZE,
    "SolarizeIncreasing": _SOLARIZE, "SolarizeAdd": _SOLARIZE_ADD, "Color": _COLOR, "ColorIncreasing": _COLOR,
    "Contrast": _CONTRAST, "ContrastIncreasing": _CONTRAST, "Brightness": _BRIGHTNESS,
    "BrightnessIncreasing": _BRIGHTNESS, "Sharpness": _SHARPNESS, "SharpnessIncreasing": _SHARPNESS,
    "ShearX": _WARP_ROWS, "ShearY": _WARP_COLUMNS, "TranslateXRel": _WARP_ROWS, "TranslateYRel": _WARP_COLUMNS,
}
_N_ARGS = 6  # per (image, layer): an affine matrix for the warp, else the op's scalar argument in slot 0

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_GEOMETRIES = ("grid_sample", "pil")


# --------------------------------------------------------------------------------------------------------
# spec


@dataclass(frozen=True)
class RandAugmentSpec:
    """The numbers in a timm ``rand-...`` string; defaults are timm's (``rand_augment_transform``)."""

    magnitude: int = 10  # 'm': mean magnitude on the 0..10 scale
    num_layers: int = 2  # 'n': ops per image
    magnitude_std: float = 0.0  # 'mstd': gauss noise on the magnitude; inf (from mstd > 100) = uniform(0, m)
    increasing: bool = False  # 'inc': the op set whose severity increases with magnitude
    prob: float = 0.5  # 'p': probability that each chosen op is applied
    magnitude_max: float = _LEVEL_DENOM  # 'mmax': clip for the noisy magnitude

    @property
    def op_names(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS


_SPEC_KEYS = ("m", "n", "mstd", "mmax", "inc", "p")


def parse_spec(spec: str) -> RandAugmentSpec:
    """Parse timm's RandAugment string, e.g. ``'rand-m9-mstd0.5-inc1'`` (DeiT), ``'rand-m9-n3-p0.3-mmax10'``.

    Same keys and conversions as ``timm.data.auto_augment.rand_augment_transform`` (m, n, mmax, inc: int;
    p, mstd: float; mstd > 100 means uniform magnitude; mmax 0 means the default 10), but stricter: timm
    silently skips parts without a digit and asserts on unknown keys, here any unknown, malformed or
    repeated part is a ``ValueError`` naming it. The ``t...`` (weighted transform set) parts are not
    supported.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand', not {parts[0]!r}")
    values: dict[str, float] = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if match is None or match.group(1) not in _SPEC_KEYS:
            raise ValueError(f"unknown part {part!r} in RandAugment spec {spec!r} "
                             f"(known: {', '.join(k + '<number>' for k in _SPEC_KEYS)})")
        key, text = match.groups()
        if key in values:
            raise ValueError(f"part {part!r} repeats {key!r} in RandAugment spec {spec!r}")
        try:
            value = float(text) if key in ("mstd", "p") else int(text)
        except ValueError:
            raise ValueError(f"bad number in part {part!r} of RandAugment spec {spec!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"bad number in part {part!r} of RandAugment spec {spec!r}")
        values[key] = value
    mstd = float(values.get("mstd", 0.0))
    if mstd > 100:
        mstd = math.inf  # timm: "use uniform sampling in 0 to magnitude if mstd is > 100"
    return RandAugmentSpec(
        magnitude=int(values.get("m", _LEVEL_DENOM)),
        num_layers=int(values.get("n", 2)),
        magnitude_std=mstd,
        increasing=bool(values.get("inc", 0)),
        prob=float(values.get("p", 0.5)),
        magnitude_max=float(values.get("mmax", 0) or _LEVEL_DENOM),  # timm: magnitude_max or _LEVEL_DENOM
    )


# --------------------------------------------------------------------------------------------------------
# draws


@dataclass(frozen=True)
class RandAugmentParams:
    """Every random choice for n images and L layers (host arrays, ``[n, L]`` each)."""

    op: np.ndarray  # int64: index into RandAugment.op_names
    applied: np.ndarray  # bool: the op passed its ``prob`` test
    magnitude: np.ndarray  # float64: noisy magnitude, already clipped to [0, magnitude_max]
    negate: np.ndarray  # bool: timm's _randomly_negate outcome (only the signed ops use it)

    def __post_init__(self) -> None:
        shape = np.shape(self.op)
        if len(shape) != 2 or any(np.shape(a) != shape for a in (self.applied, self.magnitude, self.negate)):
            raise ValueError("RandAugmentParams arrays must all have the same [n, layers] shape")

    @property
    def n(self) -> int:
        return int(self.op.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.op.shape[1])

    def select(self, index: np.ndarray | slice | list[int]) -> RandAugmentParams:
        """The params of a subset of the images (rows)."""
        return RandAugmentParams(self.op[index], self.applied[index], self.magnitude[index], self.negate[index])


def _rotate_matrices(degrees: np.ndarray, width: int, height: int) -> np.ndarray:
    """PIL's ``Image.rotate(angle)`` inverse affine matrices (``expand=False``, default centre), vectorized.

    Same float64 operations in the same order as Pillow's Image.rotate, except np.round for round()."""
    angle = -np.radians(np.mod(degrees, 360.0))
    a = np.round(np.cos(angle), 15)
    b = np.round(np.sin(angle), 15)
    d = np.round(-np.sin(angle), 15)
    e = a
    cx, cy = width / 2, height / 2
    c = a * -cx + b * -cy + 0.0 + cx  # matrix[2] = transform(-cx, -cy)[0]; matrix[2] += cx
    f = d * -cx + e * -cy + 0.0 + cy
    return np.stack([a, b, c, d, e, f], axis=-1)


def _op_args(name: str, magnitude: np.ndarray, negate: np.ndarray, width: int, height: int,
             translate_pct: float) -> np.ndarray:
    """timm's level -> argument function of op ``name`` for each magnitude: float64 [m, 6]."""
    args = np.zeros((len(magnitude), _N_ARGS))
    level = magnitude / _LEVEL_DENOM

    def signed(v: np.ndarray) -> np.ndarray:  # _randomly_negate
        return np.where(negate, -v, v)

    def affine(a: object, b: object, c: object, d: object, e: object, f: object) -> np.ndarray:
        return np.stack(np.broadcast_arrays(a, b, c, d, e, f), axis=-1).astype(np.float64)

    if name == "Rotate":  # _rotate_level_to_arg: +-30 degrees at level 1; rotate(): img.rotate(deg)
        args = _rotate_matrices(signed(level * 30.0), width, height)
    elif name == "ShearX":  # _shear_level_to_arg (+-0.3); shear_x: AFFINE (1, f, 0, 0, 1, 0)
        args = affine(1.0, signed(level * 0.3), 0.0, 0.0, 1.0, 0.0)
    elif name == "ShearY":  # shear_y: AFFINE (1, 0, 0, f, 1, 0)
        args = affine(1.0, 0.0, 0.0, signed(level * 0.3), 1.0, 0.0)
    elif name == "TranslateXRel":  # _translate_rel_level_to_arg; translate_x_rel: pixels = pct * width
        args = affine(1.0, 0.0, signed(level * translate_pct) * width, 0.0, 1.0, 0.0)
    elif name == "TranslateYRel":  # translate_y_rel: pixels = pct * height
        args = affine(1.0, 0.0, 0.0, 0.0, 1.0, signed(level * translate_pct) * height)
    elif name in ("Posterize", "PosterizeIncreasing"):
        bits = np.trunc(level * 4)  # _posterize_level_to_arg: int(level * 4) bits kept
        if name == "PosterizeIncreasing":  # _posterize_increasing_level_to_arg: 4 - that
            bits = 4 - bits
        bits = bits.astype(np.int64)
        # posterize(): bits >= 8 -> unchanged; ImageOps.posterize's lut: i & ~(2 ** (8 - bits) - 1), which
        # is 0 for bits <= 0 (older Pillow; recent Pillow raises instead, see the module docstring)
        shift = 8 - np.clip(bits, 0, 8)
        args[:, 0] = np.where(bits >= 8, 255, (255 << shift) & 255)
    elif name == "Solarize":  # _solarize_level_to_arg: threshold min(256, int(level * 256))
        args[:, 0] = np.minimum(256, np.trunc(level * 256))
    elif name == "SolarizeIncreasing":  # _solarize_increasing_level_to_arg: 256 - that
        args[:, 0] = 256 - np.minimum(256, np.trunc(level * 256))
    elif name == "SolarizeAdd":  # _solarize_add_level_to_arg: add min(128, int(level * 110)) below 128
        args[:, 0] = np.minimum(128, np.trunc(level * 110))
    elif name in ("Color", "Contrast", "Brightness", "Sharpness"):  # _enhance_level_to_arg
        args[:, 0] = level * 1.8 + 0.1
    elif name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        args[:, 0] = np.maximum(0.1, 1.0 + signed(level * 0.9))  # _enhance_increasing_level_to_arg
    elif name not in ("AutoContrast", "Equalize", "Invert"):  # no level function
        raise ValueError(f"unknown RandAugment op {name!r}")
    return args


# --------------------------------------------------------------------------------------------------------
# ops: each takes uint8 [k, 3, H, W] (any strides) and float64 args [k, 6] on the same device, and returns
# uint8 [k, 3, H, W] in the input's memory layout (on a CPU a copy between layouts costs as much as an op)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float values in [0, 255] -> uint8 in x's memory layout, truncating (as PIL's casts). On a CPU by
    numpy: torch's float -> uint8 cast is not vectorized there and costs ~5x more."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.numpy().astype(np.uint8, order="K"))
    return x.to(torch.uint8)


def _in_layout_of(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in x's memory layout on a CPU (one copy when they differ): the per-image path of
    `RandAugment.apply` copies each result into the batch, and a copy between layouts there would be
    slower than this one. Elsewhere ``out`` as it is: the batched path's copy into the batch converts."""
    if x.device.type != "cpu" or out.stride() == x.stride() or not is_channels_last(x):
        return out
    return torch.empty_like(x).copy_(out)


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, a, b)`` for uint8 ``a`` / ``b``. On a CPU as ``(a & m) | (b & ~m)`` with m = 0 or
    255: torch's CPU ``where`` costs ~20x more than these bitwise ops."""
    if mask.device.type != "cpu":
        return torch.where(mask, a, b)
    m = mask.to(torch.uint8).neg_()
    return torch.bitwise_and(a, m).bitwise_or_(torch.bitwise_and(b, m.bitwise_not_()))


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Per image and channel lookup table (PIL's ``Image.point`` with a 768-entry list): lut [k, C, 256].

    On a CPU each (image, channel) plane is looked up by numpy in x's own strides: ~3x faster than torch's
    indexing, which first builds an int64 index the size of the batch (the GPU's way: one kernel)."""
    return _lut_per_plane(x, lut) if x.device.type == "cpu" else _lut_by_index(x, lut)


def _lut_per_plane(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    table = lut.to(torch.uint8).cpu().numpy()
    out = torch.empty_like(x)
    src, dst = x.numpy(), out.numpy()
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            dst[i, j] = table[i, j][src[i, j]]
    return out


def _lut_by_index(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    k, c = x.shape[:2]
    base = (torch.arange(k * c, device=x.device) * 256).view(k, c, 1, 1)
    return lut.to(torch.uint8).reshape(-1)[x.long() + base]


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """int64 [k, C, 256]: each (image, channel) plane's histogram. On a CPU numpy's bincount per plane (~7x
    faster than a scatter over an int64 index of the batch); on a GPU one scatter_add_ (CUDA's bincount
    reads its maximum back to the host: a sync)."""
    return _histograms_per_plane(x) if x.device.type == "cpu" else _histograms_by_scatter(x)


def _histograms_per_plane(x: torch.Tensor) -> torch.Tensor:
    k, c = x.shape[:2]
    planes = x.numpy()
    counts = [np.bincount(planes[i, j].ravel(), minlength=256) for i in range(k) for j in range(c)]
    return torch.from_numpy(np.stack(counts).astype(np.int64)).view(k, c, 256)


def _histograms_by_scatter(x: torch.Tensor) -> torch.Tensor:
    k, c = x.shape[:2]
    base = (torch.arange(k * c, device=x.device) * 256).view(k, c, 1, 1)
    index = (x.long() + base).reshape(-1)
    hist = torch.zeros(k * c * 256, dtype=torch.int64, device=x.device)
    return hist.scatter_add_(0, index, torch.ones_like(index)).view(k, c, 256)


def _identity_lut(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(256, device=x.device).expand(x.shape[0], x.shape[1], 256)


def _channel_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (image, channel)'s minimum and maximum, float64 [k, C]. On channels_last memory as rows of
    W * C values (rows first, then the W pixels of the one row left): a reduction whose innermost dim is
    the 3 channels runs ~10x slower."""
    if is_channels_last(x):
        k, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(k, h, w * c)
        lo = rows.amin(dim=1).view(k, w, c).amin(dim=1)
        hi = rows.amax(dim=1).view(k, w, c).amax(dim=1)
    else:
        lo, hi = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))
    return lo.double(), hi.double()


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """timm ``auto_contrast`` -> ``ImageOps.autocontrast(img)`` (cutoff 0): per channel, the darkest value
    maps to 0 and the lightest to 255 with lut[i] = int(i * scale + offset) in float64, as PIL's Python."""
    lo, hi = _channel_extremes(x)
    # a tensor numerator: torch evaluates `scalar / tensor` as scalar * reciprocal(tensor), which is not
    # correctly rounded and moves a few LUT entries by one
    scale = torch.full_like(lo, 255.0) / (hi - lo).clamp(min=1.0)
    offset = -lo * scale
    ix = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (ix * scale[..., None] + offset[..., None]).trunc().clamp(0, 255)
    lut = torch.where((hi > lo)[..., None], lut, ix)  # "if hi <= lo: don't bother"
    return _apply_lut(x, lut)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """timm ``equalize`` -> ``ImageOps.equalize(img)``: per channel histogram (`_histograms`),
    step = (pixels - count of the last non-empty bin) // 255, lut[i] = (step // 2 + sum(h[:i])) // step,
    clipped to 255 by ``Image.point``; identity when fewer than two bins are used or step is 0."""
    k, c, h, w = x.shape
    hist = _histograms(x)
    used = hist > 0
    last = 255 - used.flip(-1).to(torch.int32).argmax(-1)  # highest non-empty bin
    step = (h * w - hist.gather(-1, last[..., None].long())[..., 0]) // 255
    before = hist.cumsum(-1) - hist
    lut = ((step // 2)[..., None] + before) // step.clamp(min=1)[..., None]
    keep = ((used.sum(-1) <= 1) | (step == 0))[..., None]
    lut = torch.where(keep, _identity_lut(x), lut.clamp(max=255))
    return _apply_lut(x, lut)


def _invert(x: torch.Tensor) -> torch.Tensor:
    """timm ``invert`` -> ``ImageOps.invert``: 255 - x."""
    return torch.bitwise_not(x)


def _posterize(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm ``posterize`` -> ``ImageOps.posterize``: x & mask (mask precomputed from the bits)."""
    return torch.bitwise_and(x, args[:, 0].to(torch.uint8).view(-1, 1, 1, 1))


def _solarize(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm ``solarize`` -> ``ImageOps.solarize(img, threshold)``: i if i < threshold else 255 - i."""
    threshold = args[:, 0].to(torch.int16).view(-1, 1, 1, 1)
    inverted = (x.to(torch.int16) >= threshold).to(torch.uint8).neg_()  # 255 where inverted, else 0
    return torch.bitwise_xor(x, inverted)  # 255 - i is i ^ 255


def _solarize_add(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm ``solarize_add(img, add, thresh=128)``: lut min(255, i + add) if i < 128 else i (timm's ``add``
    is 0..110; one outside 0..255 is clamped into it). In uint8: i + min(add, 255 - i) where the top bit is
    clear."""
    add = args[:, 0].to(torch.int16).clamp(0, 255).to(torch.uint8).view(-1, 1, 1, 1)
    below = torch.bitwise_right_shift(x, 7).bitwise_xor_(1)  # 1 where i < 128, else 0
    return torch.minimum(torch.bitwise_not(x), add).mul_(below).add_(x)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.*.enhance(f)`` = ``Image.blend(degenerate, image, f)``; PIL's ImagingBlend computes
    ``(float)in1 + (float)alpha * (in2 - in1)`` in float32, clips to [0, 255] and truncates."""
    factor = args[:, 0].to(torch.float32).view(-1, 1, 1, 1)
    out = degenerate + factor * (x.to(torch.float32) - degenerate)
    return _to_uint8(out.clamp_(0, 255))  # the cast truncates


_LUMA_WEIGHTS = np.array([19595.0, 38470.0, 7471.0], dtype=np.float32)


def _luma(x: torch.Tensor, matmul: bool | None = None) -> torch.Tensor:
    """PIL's RGB -> L conversion (Convert.c rgb2l): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, as float32.
    Computed in float32 (on a CPU as a matrix product over the pixels), which is exact: every product and
    partial sum is an integer below 2^24 (255 * 65536 + 0x8000), so no order of summation rounds, and the
    shift is a division by a power of two and a floor. Returns [k, 1, H, W]. ``matmul`` picks the form
    (default: the matrix product on a CPU, elementwise elsewhere)."""
    pixels = x.permute(0, 2, 3, 1).to(torch.float32)  # [k, H, W, 3]: dense for channels_last memory
    weights = to_device(_LUMA_WEIGHTS, x.device)  # no host wait for a GPU's queued work
    if matmul is None:
        matmul = x.device.type == "cpu"  # there a reduction over an innermost dim of 3 is ~5x slower
    # elementwise off a CPU: a GPU's float32 matrix products may run in TF32, whose 10-bit mantissa rounds
    weighted = torch.matmul(pixels, weights) if matmul else (pixels * weights).sum(-1)
    return weighted.add_(0x8000).mul_(1.0 / 65536).floor_().unsqueeze(1)


def _color(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm ``color`` -> ``ImageEnhance.Color``: blend with ``img.convert('L').convert('RGB')``."""
    return _blend(_luma(x), x, args)


def _contrast(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm ``contrast`` -> ``ImageEnhance.Contrast``: blend with a flat grey image of value
    ``int(mean(L) + 0.5)`` (ImageStat's mean: integer sum / pixel count in float64)."""
    total = _luma(x).sum(dim=(1, 2, 3), dtype=torch.float64).to(torch.int64)  # exact: integers below 2^53
    count = x.shape[2] * x.shape[3]
    # int(total / count + 0.5) in integers: a fraction with denominator 2 * count is never within float64
    # rounding of an integer unless it is one, so this equals Python's float computation
    grey = torch.div(total * 2 + count, 2 * count, rounding_mode="floor").to(torch.float32).view(-1, 1, 1, 1)
    return _blend(grey, x, args)


def _brightness(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm ``brightness`` -> ``ImageEnhance.Brightness``: blend with black (0 + f * (x - 0) is f * x
    exactly)."""
    factor = args[:, 0].to(torch.float32).view(-1, 1, 1, 1)
    return _to_uint8((x.to(torch.float32) * factor).clamp_(0, 255))


def _sharpness(x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
    """timm ``sharpness`` -> ``ImageEnhance.Sharpness``: blend with ``img.filter(ImageFilter.SMOOTH)``.

    SMOOTH is (1 1 1 / 1 5 1 / 1 1 1) / 13; PIL's Filter.c sums in float32 with a +0.5 bias and truncates,
    which equals the integer (2 * S + 13) // 26 (S/13 + 1/2 is never within 1/26 of an integer), and
    copies the one-pixel border unchanged (images smaller than 3x3 are copied whole). S is the 3x3 box sum
    (columns, then rows) plus 4x the centre, in float32, exact for these small integers; the floor division
    is floor((2 * S + 13.5) / 26) in float32: the half keeps every quotient at least 1/52 away from an
    integer, so a division that rounds (on any device) cannot move it across one."""
    h, w = x.shape[2], x.shape[3]
    degenerate = x.to(torch.float32)
    if h >= 3 and w >= 3:
        columns = degenerate[:, :, :-2] + degenerate[:, :, 1:-1]
        columns += degenerate[:, :, 2:]  # [k, 3, H-2, W]
        box = columns[..., :-2] + columns[..., 1:-1]
        box += columns[..., 2:]
        smooth = box.add_(degenerate[:, :, 1:-1, 1:-1], alpha=4).mul_(2).add_(13.5).div_(26).floor_()
        degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, args)


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Geometry.c's BICUBIC macro (cubic convolution with a = -1) in float64, in place where possible:
    p2 = -v1 + v3, p3 = 2 * (v1 - v2) + v3 - v4, p4 = -v1 + v2 - v3 + v4, v2 + d * (p2 + d * (p3 + d * p4)),
    with the same roundings as the C expression (``-a + b`` is ``b - a`` exactly)."""
    p2 = (v3 - v1).double()
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4).double()
    p4 = (v2 - v1).sub_(v3).add_(v4).double()
    return p4.mul_(d).add_(p3).mul_(d).add_(p2).mul_(d).add_(v2)


def _source_coords(mats: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometry.c's affine_transform: the source point of each output pixel centre, float64 [k, H, W]."""
    return _source_coord(mats, h, w, 0), _source_coord(mats, h, w, 1)


def _source_coord(mats: torch.Tensor, h: int, w: int, axis: int) -> torch.Tensor:
    """One coordinate of `_source_coords`: x (``axis`` 0) or y (1), float64 [k, H, W], in PIL's order."""
    m = mats.view(-1, _N_ARGS, 1, 1)[:, 3 * axis:3 * axis + 3]
    xo = torch.arange(w, dtype=torch.float64, device=mats.device).view(1, 1, w) + 0.5
    yo = torch.arange(h, dtype=torch.float64, device=mats.device).view(1, h, 1) + 0.5
    return m[:, 0] * xo + m[:, 1] * yo + m[:, 2]


def _nearest_index(mats: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The source pixel of PIL's nearest affine transform: a 16.16 fixed-point walk (Geometry.c
    affine_fixed) or, without rotation/shear terms, ImagingScaleAffine's float64 walk; int64 [k, H, W]."""
    k = mats.shape[0]
    m = mats.view(k, _N_ARGS, 1, 1)
    scale_only = ((mats[:, 1] == 0) & (mats[:, 3] == 0)).view(k, 1, 1)
    xi = torch.arange(w, dtype=torch.float64, device=mats.device).view(1, 1, w)
    yi = torch.arange(h, dtype=torch.float64, device=mats.device).view(1, h, 1)
    # ImagingScaleAffine: COORD(a2 + a0 * 0.5 + x * a0); COORD(v) = -1 for v < 0 else int(v)
    ssx = m[:, 2] + m[:, 0] * 0.5 + xi * m[:, 0]
    ssy = m[:, 5] + m[:, 4] * 0.5 + yi * m[:, 4]
    sx_scale = torch.where(ssx < 0, -1.0, ssx.trunc()).long().expand(k, h, w)
    sy_scale = torch.where(ssy < 0, -1.0, ssy.trunc()).long().expand(k, h, w)

    def fix(v: torch.Tensor) -> torch.Tensor:  # FIX(v) = FLOOR(v * 65536.0 + 0.5)
        return torch.floor(v * 65536.0 + 0.5).long().view(k, 1, 1)

    a0, a1, a3, a4 = fix(mats[:, 0]), fix(mats[:, 1]), fix(mats[:, 3]), fix(mats[:, 4])
    a2 = fix(mats[:, 2] + mats[:, 0] * 0.5 + mats[:, 1] * 0.5)
    a5 = fix(mats[:, 5] + mats[:, 3] * 0.5 + mats[:, 4] * 0.5)
    xl = torch.arange(w, device=mats.device).view(1, 1, w)
    yl = torch.arange(h, device=mats.device).view(1, h, 1)
    sx_fixed = (a2 + yl * a1 + xl * a0) >> 16  # xin = xx >> 16, xx walking by a0 along x and a1 along y
    sy_fixed = (a5 + yl * a4 + xl * a3) >> 16
    return torch.where(scale_only, sx_scale, sx_fixed), torch.where(scale_only, sy_scale, sy_fixed)


def _warp_pil(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` (Geometry.c), vectorized.

    Every output pixel centre (x + 0.5, y + 0.5) maps to a source point (sx, sy) in pixel-edge
    coordinates. Bicubic/bilinear: outside [0, W) x [0, H) -> fill colour; else sample at (sx - 0.5,
    sy - 0.5) from the 4x4 (2x2) neighbourhood with taps clamped to the edge, in float64 as PIL does, then
    clip and truncate. Nearest: see ``_nearest_index``. Gathers and elementwise ops only.
    """
    k, c, h, w = x.shape
    # planar [k, c, HW], so that per-pixel weights broadcast over the channel dim; int16 for the bicubic
    # row pass, which runs on exact small integers
    src = x.reshape(k, c, h * w)
    if interpolation == "bicubic":
        src = src.to(torch.int16)

    def tap(iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:  # [k, c, HW] at flat (iy, ix)
        return torch.gather(src, 2, (iy * w + ix).view(k, 1, h * w).expand(k, c, h * w))

    if interpolation == "nearest":
        ix, iy = _nearest_index(mats, h, w)
        valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        value = tap(iy.clamp(0, h - 1), ix.clamp(0, w - 1))
    else:
        sx, sy = _source_coords(mats, h, w)
        valid = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
        sx, sy = sx.sub_(0.5), sy.sub_(0.5)
        fx, fy = torch.floor(sx), torch.floor(sy)
        dx = sx.sub_(fx).view(k, 1, h * w)
        dy = sy.sub_(fy).view(k, 1, h * w)
        ix, iy = fx.long(), fy.long()
        if interpolation == "bilinear":  # BILINEAR(v, a, b, d) = a + (b - a) * d
            cols = [(ix + i).clamp_(0, w - 1) for i in range(2)]
            rows = []
            for j in range(2):
                row_y = (iy + j).clamp_(0, h - 1)
                a, b = (tap(row_y, col).double() for col in cols)
                rows.append(b.sub_(a).mul_(dx).add_(a))
            value = rows[1].sub_(rows[0]).mul_(dy).add_(rows[0])
        else:  # bicubic: taps at floor - 1 .. floor + 2
            cols = [(ix + i - 1).clamp_(0, w - 1) for i in range(4)]
            rows = []
            for j in range(4):
                row_y = (iy + j - 1).clamp_(0, h - 1)
                rows.append(_cubic(*(tap(row_y, col) for col in cols), dx))
            value = _cubic(*rows, dy)
        value = value.clamp_(0, 255).to(torch.uint8)  # the cast truncates
    out = torch.where(valid.view(k, 1, h * w), value, fill.view(1, c, 1))
    return out.view(k, c, h, w).to(torch.uint8)


def _warp_1d(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, interpolation: str,
             along_rows: bool) -> torch.Tensor:
    """``_warp_pil`` for the maps that move pixels along one axis only (ShearX / TranslateX: source
    ``sx = (x + .5) + b (y + .5) + c``, ``sy = y + .5``; ShearY / TranslateY likewise for columns),
    bit-exact with 4 taps instead of 16: the other axis' source coordinate is a pixel centre, so PIL's filter
    weight along it is exactly 0 and its pass returns the centre tap unchanged (``v2 + 0 * ...``). What
    is left is one 1-D bicubic (bilinear) pass of 4 (2) taps per pixel, in float64 as in Geometry.c."""
    k, c, h, w = x.shape
    src = x.reshape(k, c, h * w)
    if interpolation == "bicubic":
        src = src.to(torch.int16)  # the cubic's differences run on exact small integers
    sx, sy = _source_coords(mats, h, w)
    s, size = (sx, w) if along_rows else (sy, h)
    valid = (s >= 0) & (s < size)
    s = s.sub_(0.5)
    floor = torch.floor(s)
    d = s.sub_(floor).view(k, 1, h * w)
    i = floor.long()
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)

    def tap(offset: int) -> torch.Tensor:  # [k, c, HW]: the source pixel `offset` along the axis, clamped
        index = (ys * w + (i + offset).clamp_(0, w - 1)) if along_rows else ((i + offset).clamp_(0, h - 1) * w + xs)
        return torch.gather(src, 2, index.view(k, 1, h * w).expand(k, c, h * w))

    if interpolation == "bilinear":  # BILINEAR(v, a, b, d) = a + (b - a) * d
        a = tap(0).double()
        value = tap(1).double().sub_(a).mul_(d).add_(a)
    else:
        value = _cubic(tap(-1), tap(0), tap(1), tap(2), d)
    value = value.clamp_(0, 255).to(torch.uint8)  # the cast truncates
    return torch.where(valid.view(k, 1, h * w), value, fill.view(1, c, 1)).view(k, c, h, w)


def _warp_grid_sample(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, interpolation: str) -> torch.Tensor:
    """The same affine maps with ``F.grid_sample`` (one fused kernel; torch's bicubic has a = -0.75, PIL's
    a = -1). Same pixel-centre convention, edge-clamped taps (padding_mode='border' clamps each tap) and
    fill rule as ``_warp_pil``; truncates like PIL so that the results are not biased half a level up.

    The grid is what ``F.affine_grid(theta, align_corners=False)`` would give for PIL's matrix, but built
    from the float64 source coordinates that also decide the fill mask, so that mask is exactly PIL's."""
    k, c, h, w = x.shape
    sx, sy = _source_coords(mats, h, w)
    valid = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    # align_corners=False: normalized -1 / +1 are the outer pixel edges, i.e. u = 2 * sx / W - 1
    grid = torch.stack([sx * (2.0 / w) - 1.0, sy * (2.0 / h) - 1.0], dim=-1).to(torch.float32)
    value = F.grid_sample(x.to(torch.float32), grid, mode=interpolation, padding_mode="border", align_corners=False)
    # + 1e-3: float32 grid coordinates turn exact integers (e.g. pixel-aligned shifts) into 254.9999
    value = _to_uint8(value.add_(1e-3).clamp_(0, 255))  # the cast truncates, as PIL does
    return _in_layout_of(x, _select(valid[:, None], value, fill.view(1, c, 1, 1)))


# F.grid_sample's bicubic: cubic convolution with a = -0.75 (PIL's affine transform has a = -1)
_TORCH_CUBIC_A = -0.75


def _grid_sample_weights(d: torch.Tensor, interpolation: str) -> list[torch.Tensor]:
    """F.grid_sample's tap weights at fraction ``d`` in [0, 1), in its order and arithmetic
    (get_cubic_upsample_coefficients): bicubic taps floor - 1 .. floor + 2, bilinear floor .. floor + 1."""
    if interpolation == "bilinear":
        return [1 - d, d]
    a = _TORCH_CUBIC_A

    def near(t: torch.Tensor) -> torch.Tensor:  # cubic_convolution1, |t| <= 1
        return ((a + 2) * t - (a + 3)) * t * t + 1

    def far(t: torch.Tensor) -> torch.Tensor:  # cubic_convolution2, 1 < |t| < 2
        return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    return [far(d + 1), near(d), near(1 - d), far(2 - d)]


def _warp_1d_grid_sample(x: torch.Tensor, mats: torch.Tensor, fill: torch.Tensor, interpolation: str,
                         along_rows: bool) -> torch.Tensor:
    """``_warp_grid_sample`` for the maps that move pixels along one axis only, by x + v(y) along rows
    (ShearX / TranslateX: ``sx = (x + .5) + b (y + .5) + c``, ``sy = y + .5``) or by y + v(x) along columns
    (ShearY / TranslateY), bicubic or bilinear, as one 1-D pass: the source point's other coordinate is a
    pixel centre, where grid_sample's weights along it are (0, 1, 0, 0), so 4 of its 16 taps carry the
    result; and timm's matrices have unit scale along the axis, so the fraction of x + v(y) is one per row
    and the weights are one set per row (column). What is left is a gather of each row's (column's) window
    of taps and one multiply-add per tap: ~3x faster than grid_sample on a CPU. The result equals
    grid_sample's but for its float32 grid's rounding (one level on ~1e-4 of the pixels); the fill mask is
    exactly PIL's, as there."""
    k, c, h, w = x.shape
    s = _source_coord(mats, h, w, 0 if along_rows else 1)  # float64 [k, H, W], PIL's source coordinate
    size = w if along_rows else h
    valid = (s >= 0) & (s < size)
    v = (s[:, :, 0] if along_rows else s[:, 0, :]) - 0.5  # [k, H] ([k, W]): the tap position of pixel 0
    floor = torch.floor(v)
    weights = _grid_sample_weights((v - floor).to(torch.float32), interpolation)
    taps, first = len(weights), -1 if len(weights) == 4 else 0
    reach = torch.arange(size + taps - 1, device=x.device)  # each row's (column's) window of source pixels
    if along_rows:
        index = (reach.view(1, 1, -1) + floor.long().unsqueeze(2) + first).clamp_(0, w - 1)  # [k, H, W+3]
        window = torch.gather(x, 3, index.unsqueeze(1).expand(k, c, h, w + taps - 1)).to(torch.float32)
        weights = [wt.view(k, 1, h, 1) for wt in weights]
        tap = [window[..., t:t + w] for t in range(taps)]
    else:
        index = (reach.view(1, -1, 1) + floor.long().unsqueeze(1) + first).clamp_(0, h - 1)  # [k, H+3, W]
        window = torch.gather(x, 2, index.unsqueeze(1).expand(k, c, h + taps - 1, w)).to(torch.float32)
        weights = [wt.view(k, 1, 1, w) for wt in weights]
        tap = [window[:, :, t:t + h] for t in range(taps)]
    value = tap[0] * weights[0]
    for t in range(1, taps):
        value.addcmul_(tap[t], weights[t])
    value = _to_uint8(value.add_(1e-3).clamp_(0, 255))  # as `_warp_grid_sample`; the cast truncates
    # the fill where PIL's is (planar here, so the mask broadcasts over the channel planes), then x's layout
    return _in_layout_of(x, _select(valid.unsqueeze(1), value, fill.view(1, c, 1, 1)))


# --------------------------------------------------------------------------------------------------------
# the transform


def _index_select_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` in x's memory format; always a new tensor. Runs on a 2-D view: the
    4-D CPU kernel is ~10x slower."""
    rows = image_major(x)
    out = rows.reshape(rows.shape[0], -1).index_select(0, index).view(-1, *rows.shape[1:])
    return out.permute(0, 3, 1, 2) if is_channels_last(x) else out


def _chunk_images(device: torch.device, h: int, w: int, budget: int | None = None) -> int:
    """Images per kernel call. The float64 warp makes ~10 temporaries of the input's size: on the CPU
    small chunks stay in cache and in malloc's reuse (fresh large buffers cost page faults), on a GPU
    ~1M pixels per chunk bound the transient memory (~250 MB) while keeping kernels large. ``budget``
    (pixels per chunk) overrides that: `RandAugment(chunk_pixels=...)`, for measuring."""
    if budget is None:
        budget = 1 << 16 if device.type == "cpu" else 1 << 20
    return max(1, budget // (h * w))


class RandAugment:
    """timm's RandAugment for uint8 batches ``[N, 3, H, W]`` on any device (see the module docstring).

    ``fill`` is timm's ``img_mean`` hparam (the affine ops' ``fillcolor``), ``interpolation`` its
    ``interpolation`` hparam (the affine ops' ``resample``; DeiT: bicubic), ``translate_pct`` its
    ``translate_pct`` hparam (TranslateXRel/YRel shift at magnitude 10, as a fraction of the size).
    ``geometry`` picks the affine sampler: ``'grid_sample'`` (fast, default) or ``'pil'`` (bit-exact).
    """

    def __init__(self, spec: str | RandAugmentSpec = "rand-m9-mstd0.5-inc1",
                 fill: tuple[int, int, int] = IMAGENET_FILL, interpolation: str = "bicubic",
                 translate_pct: float = 0.45, geometry: str = "grid_sample", chunk_pixels: int | None = None) -> None:
        self.spec = parse_spec(spec) if isinstance(spec, str) else spec
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, not {interpolation!r}")
        if geometry not in _GEOMETRIES:
            raise ValueError(f"geometry must be one of {_GEOMETRIES}, not {geometry!r}")
        if len(fill) != 3 or not all(0 <= int(v) <= 255 for v in fill):
            raise ValueError(f"fill must be three values in 0..255, not {fill!r}")
        self.fill = tuple(int(v) for v in fill)
        self.interpolation = interpolation
        self.translate_pct = float(translate_pct)
        self.geometry = geometry
        self.chunk_pixels = chunk_pixels  # pixels per kernel call; None: `_chunk_images`'s default per device
        self.op_names: tuple[str, ...] = self.spec.op_names
        self._kinds = np.array([_KIND[name] for name in self.op_names], dtype=np.int64)
        self._fills: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"RandAugment({self.spec}, fill={self.fill}, interpolation={self.interpolation!r}, "
                f"translate_pct={self.translate_pct}, geometry={self.geometry!r})")

    def draw(self, rng: np.random.Generator, n: int) -> RandAugmentParams:
        """All random choices for n images, on the host, in a fixed order (op, applied, magnitude, sign).

        Distributions as timm's RandAugment / AugmentOp: op uniform over the op set with replacement,
        applied iff u <= prob (timm skips when random() > prob; always when prob >= 1), magnitude
        gauss(m, mstd) (uniform(0, m) for mstd inf, m for mstd 0) clipped to [0, magnitude_max], negated
        iff u > 0.5."""
        spec = self.spec
        shape = (int(n), spec.num_layers)
        op = rng.integers(0, len(self.op_names), size=shape, dtype=np.int64)
        u = rng.random(shape)
        applied = np.ones(shape, dtype=bool) if spec.prob >= 1.0 else u <= spec.prob
        if spec.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, spec.magnitude, size=shape)
        elif spec.magnitude_std > 0:
            magnitude = rng.normal(spec.magnitude, spec.magnitude_std, size=shape)
        else:
            magnitude = np.full(shape, float(spec.magnitude))
        magnitude = np.clip(magnitude, 0.0, spec.magnitude_max)
        negate = rng.random(shape) > 0.5
        return RandAugmentParams(op=op, applied=applied, magnitude=magnitude, negate=negate)

    def level_args(self, params: RandAugmentParams, height: int, width: int) -> np.ndarray:
        """timm's op arguments for every (image, layer): float64 [n, L, 6] (affine matrix for the affine
        ops as PIL's ``Image.transform`` takes it, else the scalar argument in slot 0)."""
        args = np.zeros((params.n, params.num_layers, _N_ARGS))
        for index, name in enumerate(self.op_names):
            mask = params.op == index
            if mask.any():
                args[mask] = _op_args(name, params.magnitude[mask], params.negate[mask], width, height,
                                      self.translate_pct)
        return args

    def apply(self, images: torch.Tensor, params: RandAugmentParams) -> torch.Tensor:
        """Apply drawn params to uint8 ``[N, 3, H, W]`` images (any strides, e.g. a channels_last view of
        NHWC memory); returns a new uint8 tensor of the same shape, device and memory format. The number
        of layers is the params' (so hand-made params may differ from the spec).

        Per layer the batch is reordered so that the images running each op kernel are one contiguous
        slice (the order is computed on the host: one host->device copy per call, no device syncs)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        n, _, h, w = images.shape
        if params.n != n:
            raise ValueError(f"params are for {params.n} images, the batch has {n}")
        kinds = np.where(params.applied, self._kinds[params.op], _N_KINDS)
        layers = [layer for layer in range(params.num_layers) if (kinds[:, layer] < _N_KINDS).any()]
        if not layers:
            return images.clone(memory_format=torch.preserve_format)
        args = self.level_args(params, h, w)
        chunk = _chunk_images(images.device, h, w, self.chunk_pixels)
        if chunk == 1:  # one image per kernel call anyway (a CPU's default): no reordering needed
            return self._apply_image_by_image(images, kinds, layers, args)

        # plan[i]: column 0 = gather positions into the previous order, 1..6 = args in the new order;
        # plan[-1, :, 0] = where each original image ended up (gathers only: deterministic on CUDA).
        plan = np.zeros((len(layers) + 1, n, 1 + _N_ARGS))
        position = np.arange(n)  # position[j] = where original image j is now
        counts = []
        for step, layer in enumerate(layers):
            order = np.argsort(kinds[:, layer], kind="stable")  # order[i] = original image at new row i
            plan[step, :, 0] = position[order]
            plan[step, :, 1:] = args[order, layer]
            counts.append(np.bincount(kinds[:, layer], minlength=_N_KINDS + 1))
            position = np.empty(n, dtype=np.int64)
            position[order] = np.arange(n)
        plan[-1, :, 0] = position
        device_plan = to_device(plan, images.device)  # no wait for the work already queued

        x = images
        for step in range(len(layers)):
            # a new tensor, so the writes below never touch the caller's images
            x = _index_select_rows(x, device_plan[step, :, 0].long())
            start = 0
            for kind in range(_N_KINDS):
                end = start + int(counts[step][kind])
                for first in range(start, end, chunk):
                    part = slice(first, min(first + chunk, end))
                    x[part] = self._run(kind, x[part], device_plan[step, part, 1:])
                start = end
        return _index_select_rows(x, device_plan[-1, :, 0].long())  # x (and so this) keeps images' layout

    def _apply_image_by_image(self, images: torch.Tensor, kinds: np.ndarray, layers: list[int],
                              args: np.ndarray) -> torch.Tensor:
        """`apply` one image per kernel call, in place on a copy of the batch: what the sorted plan does with
        chunks of one image, without its two reorderings of the batch (each a copy of it, on a CPU as long
        as a cheap op)."""
        x = images.clone(memory_format=torch.preserve_format)
        device_args = to_device(args, images.device)
        for layer in layers:
            for i in np.flatnonzero(kinds[:, layer] < _N_KINDS):
                part = x[i:i + 1]
                part.copy_(self._run(int(kinds[i, layer]), part, device_args[i:i + 1, layer]))
        return x

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(rng, images.shape[0]))

    def _run(self, kind: int, x: torch.Tensor, args: torch.Tensor) -> torch.Tensor:
        if kind in (_WARP, _WARP_ROWS, _WARP_COLUMNS):
            fill = self._fills.get(x.device)
            if fill is None:
                fill = self._fills[x.device] = torch.tensor(self.fill, dtype=torch.uint8).to(x.device)
            if kind != _WARP and self.interpolation != "nearest":  # the one-axis maps: 4 taps, not 16
                warp_1d = _warp_1d if self.geometry == "pil" else _warp_1d_grid_sample
                return warp_1d(x, args, fill, self.interpolation, along_rows=kind == _WARP_ROWS)
            warp = _warp_pil if self.geometry == "pil" else _warp_grid_sample
            return warp(x, args, fill, self.interpolation)
        if kind == _AUTOCONTRAST:
            return _autocontrast(x)
        if kind == _EQUALIZE:
            return _equalize(x)
        if kind == _INVERT:
            return _invert(x)
        op = {_POSTERIZE: _posterize, _SOLARIZE: _solarize, _SOLARIZE_ADD: _solarize_add, _COLOR: _color,
              _CONTRAST: _contrast, _BRIGHTNESS: _brightness, _SHARPNESS: _sharpness}[kind]
        return op(x, args)


# --------------------------------------------------------------------------------------------------------
# benchmark


@contextlib.contextmanager
def _seeded_globally(seed: int):
    """Python's and numpy's global generators (timm's RandAugment draws from them) seeded for the block,
    then given back their state."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _timm_or_black(transform, picture):
    """timm's transform, or None where a recent Pillow raises (PosterizeIncreasing at magnitude >= 10)."""
    try:
        return transform(picture)
    except ValueError:
        return None


def bench(n: int = 256, size: int = 224, device: str = "cpu", repeats: int = 3, seed: int = 0) -> str:
    """Time this RandAugment on one batch against timm's per-image PIL RandAugment (one process) and DALI's
    stock ``rand_augment`` on the same images; prints and returns one line with images/s for each."""
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    from pipeline.dali_randaugment import stock_rand_augment_rate
    from pipeline.synthetic import photo_like

    rng = np.random.default_rng(seed)
    pictures = [photo_like(rng, size, size) for _ in range(n)]
    nhwc = torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).to(device)
    images = nhwc.permute(0, 3, 1, 2)  # channels_last view of NHWC memory, as DALI hands it over
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    results = []
    for geometry in _GEOMETRIES:
        aug = RandAugment(geometry=geometry)
        aug(images, rng)  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            aug(images, rng)
        sync()
        results.append(n * repeats / (time.perf_counter() - start))

    timm_aug = rand_augment_transform(
        "rand-m9-mstd0.5-inc1",
        dict(translate_const=int(size * 0.45), img_mean=IMAGENET_FILL, interpolation=Image.Resampling.BICUBIC),
    )
    with _seeded_globally(seed):
        start = time.perf_counter()
        crashed = sum(_timm_or_black(timm_aug, picture) is None for picture in pictures)
        timm_rate = n / (time.perf_counter() - start)
    dali_rate = stock_rand_augment_rate(nhwc.cpu().numpy() if dev.type == "cpu" else nhwc,
                                        None if dev.type == "cpu" else (dev.index or 0),
                                        threads=torch.get_num_threads() if dev.type == "cpu" else 4,
                                        repeats=repeats, seed=seed)
    where = f"{device}, {torch.get_num_threads()} threads" if dev.type == "cpu" else device
    line = (f"RandAugment rand-m9-mstd0.5-inc1, {n} x 3 x {size} x {size} uint8: ours ({where}) "
            f"{results[0]:,.0f} img/s (geometry='grid_sample'), {results[1]:,.0f} img/s (geometry='pil'); "
            f"timm per-image PIL, 1 process: {timm_rate:,.0f} img/s; DALI stock rand_augment n=2 m=9 (other "
            f"semantics: the upper bound of a DALI auto_aug build), {where}: {dali_rate:,.0f} img/s"
            + (f" ({crashed} images raised in timm)" if crashed else ""))
    print(line)
    return line


def bench_ops(n: int = 32, size: int = 224, magnitude: float = 9.0, repeats: int = 4, seed: int = 0,
              spec: str = "rand-m9-mstd0.5-inc1") -> str:
    """Each op of ``spec``'s op set alone, at ``magnitude``, on the CPU with one torch thread (as the loader's
    batch stage and a Ray worker run it) against timm's op on the same PIL images, then the whole policy
    against timm's transform: a table of microseconds per image (best of ``repeats``); prints and returns
    it. ``python -c "from pipeline.randaugment import bench_ops; bench_ops()"``."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp, rand_augment_transform

    from pipeline.synthetic import photo_like

    rng = np.random.default_rng(seed)
    pictures = [photo_like(rng, size, size) for _ in range(n)]
    images = torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2)  # channels_last
    hparams = dict(translate_pct=0.45, img_mean=IMAGENET_FILL, interpolation=Image.Resampling.BICUBIC)
    aug = RandAugment(spec)

    def best(run) -> float:  # us per image
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times) / n * 1e6

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lines = [f"RandAugment ops, {n} x 3 x {size} x {size} uint8 (photo-like, channels_last), magnitude "
                 f"{magnitude:g}, 1 torch thread; us per image, best of {repeats}",
                 f"{'op':<28}{'ours':>10}{'timm (PIL)':>12}{'timm / ours':>13}"]
        total = [0.0, 0.0]
        for index, name in enumerate(aug.op_names):
            params = RandAugmentParams(op=np.full((n, 1), index), applied=np.ones((n, 1), dtype=bool),
                                       magnitude=np.full((n, 1), magnitude), negate=rng.random((n, 1)) < 0.5)
            op = AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
            ours = best(lambda params=params: aug.apply(images, params))
            theirs = best(lambda op=op: [op(p) for p in pictures])
            total = [total[0] + ours, total[1] + theirs]
            lines.append(f"{name:<28}{ours:>10,.0f}{theirs:>12,.0f}{theirs / ours:>13.2f}")
        ours, theirs = (t / len(aug.op_names) for t in total)
        lines.append(f"{'mean of the ops':<28}{ours:>10,.0f}{theirs:>12,.0f}{theirs / ours:>13.2f}")
        # the whole policy: ours on 4 drawn parameter sets, timm's transform on 4 passes (seeded as `bench`)
        draws = [aug.draw(np.random.default_rng(seed + i), n) for i in range(4)]
        ours = best(lambda: [aug.apply(images, p) for p in draws]) / len(draws)
        transform = rand_augment_transform(spec, {**hparams, "translate_const": int(size * 0.45)})
        with _seeded_globally(seed):
            theirs = best(lambda: [_timm_or_black(transform, p) for _ in range(4) for p in pictures]) / 4
        lines.append(f"{'policy ' + spec:<28}{ours:>10,.0f}{theirs:>12,.0f}{theirs / ours:>13.2f}")
    finally:
        torch.set_num_threads(threads)
    table = "\n".join(lines)
    print(table)
    return table
