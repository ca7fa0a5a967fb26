"""Per-view crop boxes and flips, drawn on the host from the manifest's image sizes.

Drawing them here rather than inside DALI has three uses: the algorithm is exactly torchvision's and
timm's ``RandomResizedCrop.get_params`` (10 attempts at a random area and log-uniform aspect ratio, then
a centre-crop fallback), every view knows its crop box and flip (what a crop-aware teacher cache needs),
and the draw is seeded by (seed, rank, step), so a resumed run draws the same views.

Boxes are relative to the source image: ``(y0, x0, y1, x1)`` in [0, 1], the order DALI's ``fn.resize``
takes for ``roi_start`` / ``roi_end`` on HWC images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.config import AugmentConfig

ATTEMPTS = 10


@dataclass(frozen=True)
class Views:
    boxes: np.ndarray  # float32 [n, k, 4]: (y0, x0, y1, x1), relative
    flips: np.ndarray  # int32 [n, k]: 1 = mirrored horizontally


def step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, rank, step, 0x7E5])))


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """A second stream for the same step, for the batch-level augmentation (independent of the views)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, rank, step, 0xBA7])))


def random_resized_boxes(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray,
                         scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params for each (width, height); returns pixel boxes
    ``(top, left, h, w)`` as int64 [n, 4]."""
    n = len(widths)
    widths = widths.astype(np.float64)
    heights = heights.astype(np.float64)
    area = widths * heights
    target = area[:, None] * rng.uniform(scale[0], scale[1], size=(n, ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, ATTEMPTS)))
    w = np.round(np.sqrt(target * aspect))  # Python's round() and numpy's both round half to even
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= widths[:, None]) & (h <= heights[:, None])
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(n), first]
    cw = w[np.arange(n), first]
    ch = h[np.arange(n), first]
    # positions: uniform integers in [0, H - h] and [0, W - w], as torch.randint(0, H - h + 1)
    top = np.floor(rng.random(n) * (heights - ch + 1))
    left = np.floor(rng.random(n) * (widths - cw + 1))
    # fallback: centre crop clamped to the ratio range
    in_ratio = widths / heights
    fw = np.where(in_ratio < ratio[0], widths, np.where(in_ratio > ratio[1], np.round(heights * ratio[1]), widths))
    fh = np.where(in_ratio < ratio[0], np.round(widths / ratio[0]), heights)
    ftop = np.floor((heights - fh) / 2)
    fleft = np.floor((widths - fw) / 2)
    boxes = np.stack([np.where(found, top, ftop), np.where(found, left, fleft),
                      np.where(found, ch, fh), np.where(found, cw, fw)], axis=1)
    return boxes.astype(np.int64)


def simple_random_boxes(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray,
                        size: int) -> np.ndarray:
    """DeiT III's simple random crop: resize the shorter side to ``size``, take a random size x size
    crop. (The reference also pads 4 px by reflection before cropping; we do not.)"""
    widths = widths.astype(np.float64)
    heights = heights.astype(np.float64)
    side = np.minimum(widths, heights)
    step = side / size  # source pixels per output pixel
    top = np.floor(rng.random(len(widths)) * (heights / step - size + 1)) * step
    left = np.floor(rng.random(len(widths)) * (widths / step - size + 1)) * step
    return np.stack([top, left, side, side], axis=1)


def draw_views(rng: np.random.Generator, widths: np.ndarray, heights: np.ndarray, repeats: int,
               cfg: AugmentConfig) -> Views:
    """``repeats`` independent views of each image: boxes and flips."""
    n = len(widths)
    w = np.repeat(widths, repeats)
    h = np.repeat(heights, repeats)
    if cfg.crop == "rrc":
        pixel = random_resized_boxes(rng, w, h, cfg.scale, cfg.ratio).astype(np.float64)
    else:
        pixel = simple_random_boxes(rng, w, h, cfg.image_size)
    top, left, ch, cw = pixel.T
    rel = np.stack([top / h, left / w, (top + ch) / h, (left + cw) / w], axis=1)
    flips = (rng.random(n * repeats) < cfg.hflip).astype(np.int32)
    return Views(np.clip(rel, 0.0, 1.0).astype(np.float32).reshape(n, repeats, 4), flips.reshape(n, repeats))
