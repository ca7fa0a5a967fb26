"""Per-view crop boxes and flips, drawn on the host from the manifest's image sizes.

Drawing them here rather than inside DALI has three uses: the algorithm is exactly torchvision's and
timm's ``RandomResizedCrop.get_params`` (10 attempts at a random area and log-uniform aspect ratio, then
a centre-crop fallback), every view knows its crop box and flip (what a crop-aware teacher cache needs),
and the draw is seeded by (seed, rank, step), so a resumed run draws the same views.

A replay cache (`teacher-cache build --views R`) fixes R views per image instead: view v of manifest row
r is a function of (seed, r, v) alone (`replayed_views`), so the cache's build and every training run
cut the same R crops, and a run only draws which of them each step uses.

Boxes are relative to the source image: ``(y0, x0, y1, x1)``, the order DALI's ``fn.resize`` takes for
``roi_start`` / ``roi_end`` on HWC images; in [0, 1] except for DeiT III's simple crop, whose padding
reaches a few pixels outside (`reflect_outside` mirrors them in after DALI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import AugmentConfig
from pipeline.transfer import to_device

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
                        size: int, pad: int = 0) -> np.ndarray:
    """DeiT III's simple random crop (``Resize(size)``, ``RandomCrop(size, padding=pad,
    padding_mode='reflect')``): the shorter side resized to ``size``, the longer to ``int(size * long /
    short)``, ``pad`` pixels added around, a size x size crop at a uniform integer position. Returns pixel
    boxes ``(top, left, h, w)`` in source pixels, float64 [n, 4], on torchvision's grid: each axis scaled
    by source / resized pixels (the long axis's ``int()`` makes its scale a little larger than the short
    one's). A box reaches up to ``pad`` resized pixels outside the image, which `reflect_outside` fills
    after the resize."""
    widths = widths.astype(np.float64)
    heights = heights.astype(np.float64)
    short = np.minimum(widths, heights)
    resized_h = np.floor(heights * size / short + 1e-9)  # torchvision: int(size * long / short)
    resized_w = np.floor(widths * size / short + 1e-9)
    top = np.floor(rng.random(len(widths)) * (resized_h + 2 * pad - size + 1)) - pad
    left = np.floor(rng.random(len(widths)) * (resized_w + 2 * pad - size + 1)) - pad
    sy, sx = heights / resized_h, widths / resized_w  # source pixels per resized pixel
    return np.stack([top * sy, left * sx, size * sy, size * sx], axis=1)


def _outside(lo: torch.Tensor, hi: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Output pixels of a view before and after the image along one axis, from its relative box edges."""
    per_pixel = (hi - lo) / size
    before = torch.round(torch.clamp(-lo, min=0) / per_pixel).long()
    after = torch.round(torch.clamp(hi - 1, min=0) / per_pixel).long()
    return before, after


def _reflect_index(before: torch.Tensor, after: torch.Tensor, size: int) -> torch.Tensor:
    """[n, size] source index per output index: inside kept, outside mirrored about the edge pixel."""
    i = torch.arange(size, device=before.device)[None, :]
    first, last = before[:, None], (size - 1 - after)[:, None]
    return torch.where(i < first, 2 * first - i, torch.where(i > last, 2 * last - i, i))


def reflect_outside(views: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Fill the pixels of each view that lie outside its image by reflection (``padding_mode='reflect'``:
    ``c b | a b c``, the edge pixel not repeated). DALI's resize clamps there (``a a | a b c``).

    ``views`` uint8 [n, S, S, C] (the views as DALI hands them over, after the flip; any device),
    ``boxes`` [n, 4] relative (y0, x0, y1, x1) that may reach outside [0, 1], ``flips`` [n], both on the
    host: the decision is taken there, so a GPU batch costs no device sync. Returns a new tensor, or
    ``views`` itself when no view reaches outside."""
    size = views.shape[1]
    boxes = boxes.cpu().to(torch.float64)
    top, bottom = _outside(boxes[:, 0], boxes[:, 2], size)
    left, right = _outside(boxes[:, 1], boxes[:, 3], size)
    if not bool((top + bottom + left + right).any()):
        return views
    flipped = flips.cpu().bool()
    left, right = torch.where(flipped, right, left), torch.where(flipped, left, right)  # mirrored columns
    rows = to_device(_reflect_index(top, bottom, size), views.device)
    cols = to_device(_reflect_index(left, right, size), views.device)
    n = torch.arange(len(views), device=views.device)[:, None, None]
    return views[n, rows[:, :, None], cols[:, None, :]]


class KeyedUniforms:
    """The part of numpy's Generator that the view draws use (``uniform``, ``random``), answered by a
    counter-based hash of (seed, key, call, column) instead of a stream: element i of every call depends
    only on ``keys[i]``, so a view drawn alone or among any others is the same view. splitmix64's
    finaliser over 64-bit words; 53-bit uniforms in [0, 1)."""

    def __init__(self, seed: int, keys: np.ndarray):
        self.keys = np.asarray(keys, dtype=np.uint64)
        self.seed = np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        self.calls = 0

    @staticmethod
    def _mix(x: np.ndarray) -> np.ndarray:
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def random(self, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        shape = (len(self.keys),) if size is None else np.atleast_1d(size)
        if int(shape[0]) != len(self.keys):
            raise ValueError(f"KeyedUniforms draws one row per key ({len(self.keys)}), asked for {tuple(shape)}")
        columns = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        golden = np.uint64(0x9E3779B97F4A7C15)
        with np.errstate(over="ignore"):
            word = self._mix(self._mix(self.keys * golden + self.seed) + np.uint64(self.calls) * golden)
            word = self._mix(word[:, None] + np.arange(columns, dtype=np.uint64)[None, :] * golden)
        self.calls += 1
        return ((word >> np.uint64(11)).astype(np.float64) / float(1 << 53)).reshape(tuple(int(d) for d in shape))

    def uniform(self, low: float = 0.0, high: float = 1.0, size: int | tuple[int, ...] | None = None) -> np.ndarray:
        return low + (high - low) * self.random(size)


def replayed_views(seed: int, rows: np.ndarray, view_ids: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                   cfg: AugmentConfig) -> Views:
    """View ``view_ids[i]`` of manifest row ``rows[i]`` (an image ``widths[i]`` x ``heights[i]``), the same
    whatever else is drawn with it: [m, 1] boxes and flips, drawn as `draw_views` draws (same algorithm,
    same distribution), from `KeyedUniforms` keyed by (row, view)."""
    rows, view_ids = np.asarray(rows, dtype=np.int64), np.asarray(view_ids, dtype=np.int64)
    if len(rows) and (view_ids.min() < 0 or view_ids.max() >= 1 << 20 or rows.min() < 0 or rows.max() >= 1 << 43):
        raise ValueError(f"view ids must lie in [0, 2**20) and rows in [0, 2**43), got views "
                         f"{view_ids.min()}..{view_ids.max()}, rows {rows.min()}..{rows.max()}")
    keys = (rows.astype(np.uint64) << np.uint64(20)) | view_ids.astype(np.uint64)
    return draw_views(KeyedUniforms(seed, keys), np.asarray(widths), np.asarray(heights), 1, cfg)


def replayed_image_views(seed: int, rows: np.ndarray, view_ids: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                         cfg: AugmentConfig) -> Views:
    """Views ``view_ids[i, j]`` of image i (manifest row ``rows[i]``, ``widths[i]`` x ``heights[i]``):
    [n, k] boxes and flips, each the `replayed_views` view of its (row, view id)."""
    n, k = np.shape(view_ids)
    views = replayed_views(seed, np.repeat(rows, k), np.reshape(view_ids, -1), np.repeat(widths, k),
                           np.repeat(heights, k), cfg)
    return Views(views.boxes.reshape(n, k, 4), views.flips.reshape(n, k))


def draw_views(rng: np.random.Generator | KeyedUniforms, widths: np.ndarray, heights: np.ndarray, repeats: int,
               cfg: AugmentConfig) -> Views:
    """``repeats`` independent views of each image: boxes and flips."""
    n = len(widths)
    w = np.repeat(widths, repeats)
    h = np.repeat(heights, repeats)
    if cfg.crop == "rrc":
        pixel = random_resized_boxes(rng, w, h, cfg.scale, cfg.ratio).astype(np.float64)
    else:
        pixel = simple_random_boxes(rng, w, h, cfg.image_size, cfg.crop_pad)
    top, left, ch, cw = pixel.T
    rel = np.stack([top / h, left / w, (top + ch) / h, (left + cw) / w], axis=1)
    if cfg.crop == "rrc":  # inside the image by construction: clip float error only
        rel = np.clip(rel, 0.0, 1.0)
    flips = (rng.random(n * repeats) < cfg.hflip).astype(np.int32)
    return Views(rel.astype(np.float32).reshape(n, repeats, 4), flips.reshape(n, repeats))
