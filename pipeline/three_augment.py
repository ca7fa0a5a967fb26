"""DeiT III's 3-Augment and colour jitter on whole uint8 batches (GPU or CPU), as the released code does them.

[Thesis] sec. 6.2.2: "For each image, we select only one of these data-augmentations with a uniform
probability over 3 different ones" (grayscale, solarization, Gaussian blur), "in addition ... we include
the common color-jitter and horizontal flip" (Table 6.1: ColorJitter 0.3). The parameters the thesis does
not give come from the released code, facebookresearch/deit ``augment.py`` (``new_data_aug_generator``):

* ``transforms.RandomChoice([gray_scale(p=1.0), Solarization(p=1.0), GaussianBlur(p=1.0)])``:
  torchvision's ``Grayscale(3)`` (PIL's ``convert('L')``, copied to 3 channels), ``ImageOps.solarize``
  (threshold 128) and ``img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))``;
* then ``transforms.ColorJitter(cj, cj, cj)``: brightness, contrast and saturation factors uniform in
  ``[1 - cj, 1 + cj]``, applied in a random order (torchvision draws ``randperm(4)``; hue is off), with
  PIL's ``ImageEnhance`` Brightness / Contrast / Color.

Horizontal flip and the crop run earlier (`pipeline.views`, the DALI graph); normalisation after.

Every op is bit-exact against PIL / torchvision on the same draws: grayscale, solarization and the
enhancers reuse `pipeline.randaugment`'s PIL-exact kernels, and the blur is Pillow's own algorithm
(``BoxBlur.c``: ``GaussianBlur(r)`` is 3 passes per axis of an "extended" box blur whose fractional
radius comes from ``r``, in 8.24 fixed point, clamped at the edges), not a true Gaussian. The draws are
made on the host from the step's seeded generator, so a resumed run repeats them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.layout import is_channels_last
from pipeline.randaugment import _brightness, _color, _contrast, _luma, _solarize
from pipeline.transfer import to_device

__all__ = ["BLUR_RADIUS", "ThreeAugment", "ThreeAugmentParams", "GRAYSCALE", "SOLARIZE", "BLUR", "box_blur_weights"]

GRAYSCALE, SOLARIZE, BLUR = 0, 1, 2  # the RandomChoice list's order
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2  # torchvision ColorJitter's fn_idx order (hue, 3, is off)
BLUR_RADIUS = (0.1, 2.0)  # [DeiT-code] augment.py GaussianBlur(radius_min=0.1, radius_max=2.)
SOLARIZE_THRESHOLD = 128  # ImageOps.solarize's default, as augment.py's Solarization calls it
BLUR_PASSES = 3  # Pillow's ImagingGaussianBlur: 3 box blurs per axis


@dataclass(frozen=True)
class ThreeAugmentParams:
    """Every random choice for n images (host arrays)."""

    choice: np.ndarray | None  # int64 [n]: GRAYSCALE / SOLARIZE / BLUR; None: 3-Augment off
    radius: np.ndarray | None  # float64 [n]: the blur radius (used where choice == BLUR)
    jitter_order: np.ndarray | None  # int64 [n, 3]: a permutation of BRIGHTNESS, CONTRAST, SATURATION
    jitter_factor: np.ndarray | None  # float64 [n, 3]: the factor of each, indexed by that constant

    @property
    def n(self) -> int:
        for array in (self.choice, self.jitter_order):
            if array is not None:
                return len(array)
        return 0


def box_blur_weights(radius: np.ndarray, passes: int = BLUR_PASSES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's per-pass box blur of ``GaussianBlur(radius)``: (integer radius, ww, fw) per image.

    ``_gaussian_blur_radius`` turns the radius into a fractional box radius R in C floats (float32, its
    sqrt and floor in double); ``ImagingHorizontalBoxBlur`` then weighs the 2 int(R) + 1 taps around a
    pixel by ``ww = (UINT32)(2^24 / (2 R + 1))`` (a float32 division) and the next tap on each side by
    ``fw = (2^24 - (2 int(R) + 1) ww) / 2``."""
    f = np.float32
    r = np.asarray(radius, dtype=np.float64).astype(f)  # the C function parses the radius as a float
    sigma2 = r * r / f(passes)
    box = np.sqrt(12.0 * sigma2.astype(np.float64) + 1.0).astype(f)  # L = sqrt(12.0 * sigma2 + 1.0)
    whole = np.floor((box.astype(np.float64) - 1.0) / 2.0).astype(f)  # l = floor((L - 1.0) / 2.0)
    frac = (f(2) * whole + f(1)) * (whole * (whole + f(1)) - f(3) * sigma2)
    frac = frac / (f(6) * (sigma2 - (whole + f(1)) * (whole + f(1))))
    float_radius = (whole + frac).astype(f)
    taps = float_radius.astype(np.int64)  # (int)floatRadius
    ww = (f(1 << 24) / (float_radius * f(2) + f(1))).astype(np.float32).astype(np.int64)
    fw = ((1 << 24) - (taps * 2 + 1) * ww) // 2
    return taps, ww, fw


def _box_pass(x: torch.Tensor, taps: int, ww: torch.Tensor, fw: torch.Tensor) -> torch.Tensor:
    """One ImagingLineBoxBlur along the last dim of int64 [k, c, h, w]: (ww * sum of the 2 taps + 1 pixels
    around x + fw * (the next one on each side) + 2^23) >> 24, indices clamped to the line."""
    w = x.shape[-1]
    pad = taps + 1
    left, right = x[..., :1].expand(*x.shape[:-1], pad), x[..., -1:].expand(*x.shape[:-1], pad)
    padded = torch.cat([left, x, right], dim=-1)
    window = padded[..., 1:1 + w].clone()
    for offset in range(2, 2 * taps + 2):
        window += padded[..., offset:offset + w]
    far = padded[..., :w] + padded[..., 2 * pad:2 * pad + w]
    return (window * ww + far * fw + (1 << 23)) >> 24


def _gaussian_blur(x: torch.Tensor, radius: np.ndarray) -> torch.Tensor:
    """``img.filter(ImageFilter.GaussianBlur(radius[i]))`` for each image of uint8 [k, 3, H, W]."""
    taps, ww, fw = box_blur_weights(radius)
    out = torch.empty_like(x)
    for t in np.unique(taps):  # images with the same integer box radius run together
        rows = np.flatnonzero(taps == t)
        index = to_device(rows, x.device)
        y = x.index_select(0, index).to(torch.int64)
        w_w = to_device(ww[rows], x.device).view(-1, 1, 1, 1)
        w_f = to_device(fw[rows], x.device).view(-1, 1, 1, 1)
        for _ in range(BLUR_PASSES):  # along rows, then (Pillow transposes) along columns
            y = _box_pass(y, int(t), w_w, w_f)
        y = y.transpose(2, 3)
        for _ in range(BLUR_PASSES):
            y = _box_pass(y, int(t), w_w, w_f)
        out.index_copy_(0, index, y.transpose(2, 3).to(torch.uint8))
    return out


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision ``Grayscale(3)`` on a PIL image: ``convert('L')``, the same value in all 3 channels."""
    return _luma(x).to(torch.uint8).expand(-1, 3, -1, -1)


def _scalar_args(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """`pipeline.randaugment`'s op arguments: float64 [k, 6], the scalar in slot 0."""
    args = np.zeros((len(values), 6))
    args[:, 0] = values
    return to_device(args, device)


class ThreeAugment:
    """3-Augment (``enabled``) and/or colour jitter of strength ``color_jitter`` (0: off) on uint8
    ``[N, 3, H, W]`` batches; ``draw`` then ``apply``, or call it with a generator."""

    def __init__(self, enabled: bool = True, color_jitter: float = 0.0) -> None:
        if not 0 <= color_jitter < 1:
            raise ValueError(f"augment.color_jitter={color_jitter}: must be in [0, 1) (DeiT III: 0.3; 0 turns it off)")
        self.enabled, self.color_jitter = bool(enabled), float(color_jitter)

    def __repr__(self) -> str:
        return f"ThreeAugment(enabled={self.enabled}, color_jitter={self.color_jitter})"

    def draw(self, rng: np.random.Generator, n: int) -> ThreeAugmentParams:
        """Uniform choice of one of the three, radius uniform in [0.1, 2.0], then (colour jitter) a uniformly
        random order of brightness / contrast / saturation and their factors uniform in [1 - cj, 1 + cj]."""
        choice = radius = order = factor = None
        if self.enabled:
            choice = rng.integers(0, 3, size=n, dtype=np.int64)
            radius = rng.uniform(*BLUR_RADIUS, size=n)
        if self.color_jitter > 0:
            order = np.argsort(rng.random((n, 3)), axis=1)
            factor = rng.uniform(max(0.0, 1 - self.color_jitter), 1 + self.color_jitter, size=(n, 3))
        return ThreeAugmentParams(choice, radius, order, factor)

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(rng, images.shape[0]))

    def apply(self, images: torch.Tensor, params: ThreeAugmentParams) -> torch.Tensor:
        """A new uint8 tensor of the same shape, device and memory format (channels_last stays)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if params.n != images.shape[0]:
            raise ValueError(f"params are for {params.n} images, the batch has {images.shape[0]}")
        x = images.clone(memory_format=torch.contiguous_format)  # NCHW: whole images are rows for index ops
        device = x.device
        if params.choice is not None:
            for kind in (GRAYSCALE, SOLARIZE, BLUR):
                rows = np.flatnonzero(params.choice == kind)
                if not len(rows):
                    continue
                index = to_device(rows, device)
                part = x.index_select(0, index)
                if kind == GRAYSCALE:
                    part = _grayscale(part)
                elif kind == SOLARIZE:
                    part = _solarize(part, _scalar_args(np.full(len(rows), SOLARIZE_THRESHOLD), device))
                else:
                    part = _gaussian_blur(part, params.radius[rows])
                x.index_copy_(0, index, part.contiguous())
        if params.jitter_order is not None:
            enhance = {BRIGHTNESS: _brightness, CONTRAST: _contrast, SATURATION: _color}
            for position in range(3):
                for op, fn in enhance.items():
                    rows = np.flatnonzero(params.jitter_order[:, position] == op)
                    if not len(rows):
                        continue
                    index = to_device(rows, device)
                    args = _scalar_args(params.jitter_factor[rows, op], device)
                    x.index_copy_(0, index, fn(x.index_select(0, index), args))
        return x.contiguous(memory_format=torch.channels_last) if is_channels_last(images) else x
