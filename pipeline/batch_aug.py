"""Batch-level augmentation on the torch batch of views (GPU in training, CPU in tests).

Order and semantics are timm's train transform, as DeiT uses it: RandAugment on uint8 views ->
normalise with the ImageNet mean/std -> random erasing (pixel mode) -> Mixup/CutMix of the batch with
label-smoothed targets. DeiT III's 3-Augment and colour jitter (`pipeline.three_augment`, as the released
``augment.py``) run first on the uint8 views when the recipe asks for them; colour jitter applies
whenever ``augment.color_jitter > 0``, also beside RandAugment (the paper's reading; timm's
``create_transform`` drops colour jitter when RandAugment is on). Every random choice is drawn on the
host from the step's seeded generator (`pipeline.views.step_rng`), so a resumed run repeats it; the
tensor work is batched, with no per-image Python loop (on a CPU, erasing writes one slice per box).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import AugmentConfig, MixConfig
from pipeline.layout import image_major, is_channels_last
from pipeline.transfer import to_device

# timm's RandomErasing defaults (timm/data/random_erasing.py), which DeiT uses
ERASE_MIN_AREA, ERASE_MAX_AREA, ERASE_MIN_ASPECT, ERASE_ATTEMPTS = 0.02, 1 / 3, 0.3, 10

# images per pass of the float work on a CPU: a batch of views is larger than the cache, a few are not
CPU_IMAGES_PER_PASS = 4


@dataclass(frozen=True)
class MixParams:
    lam: float
    cutmix_box: tuple[int, int, int, int] | None  # (y0, y1, x0, x1) when CutMix was chosen


def normalize(views: torch.Tensor, cfg: AugmentConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N,3,H,W] -> (x/255 - mean) / std, keeping the memory format (channels_last stays).

    Computed as ``(x - 255 mean) * (1 / (255 std))`` in float32, in place on one fresh buffer. On NHWC
    memory (channels_last, as DALI hands views over) the per-channel constants are laid out as one image
    row ``[W * 3]`` so that the broadcast runs along long contiguous rows: broadcasting a size-3 innermost
    dim is ~4x slower on a CPU."""
    mean = to_device(cfg.mean, views.device, torch.float32) * 255.0
    inv_std = 1.0 / (to_device(cfg.std, views.device, torch.float32) * 255.0)
    n, c, h, w = views.shape
    # on a CPU a few images at a time, which stay in cache for the three passes; on a GPU the whole batch
    step = CPU_IMAGES_PER_PASS if views.device.type == "cpu" else max(n, 1)
    if is_channels_last(views):
        src = views.permute(0, 2, 3, 1)  # NHWC
        out = torch.empty(src.shape, dtype=torch.float32, device=views.device)
        mean_row, inv_std_row = mean.repeat(w), inv_std.repeat(w)
        for first in range(0, n, step):
            part = out[first:first + step]
            part.copy_(src[first:first + step])
            part.view(-1, w * c).sub_(mean_row).mul_(inv_std_row)
        out = out.permute(0, 3, 1, 2)
    else:
        out = torch.empty((n, c, h, w), dtype=torch.float32, device=views.device)
        for first in range(0, n, step):
            part = out[first:first + step]
            part.copy_(views[first:first + step])
            part.sub_(mean.view(1, c, 1, 1)).mul_(inv_std.view(1, c, 1, 1))
    return out if dtype == torch.float32 else out.to(dtype)


def draw_erase_boxes(rng: np.random.Generator, n: int, height: int, width: int, prob: float) -> np.ndarray:
    """timm's RandomErasing._erase per image: with ``prob``, up to 10 attempts at an area in
    [0.02, 1/3] and a log-uniform aspect in [0.3, 1/0.3]; int64 [n, 4] (top, left, h, w), h = 0: none."""
    area = height * width
    target = rng.uniform(ERASE_MIN_AREA, ERASE_MAX_AREA, size=(n, ERASE_ATTEMPTS)) * area
    log_ratio = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    aspect = np.exp(rng.uniform(*log_ratio, size=(n, ERASE_ATTEMPTS)))
    h = np.round(np.sqrt(target * aspect)).astype(np.int64)
    w = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w < width) & (h < height)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    apply = (rng.random(n) < prob) & ok[rows, first]
    h, w = h[rows, first] * apply, w[rows, first] * apply
    top = np.floor(rng.random(n) * (height - h + 1)).astype(np.int64)  # random.randint(0, H - h)
    left = np.floor(rng.random(n) * (width - w + 1)).astype(np.int64)
    return np.stack([top, left, h, w], axis=1)


def random_erase(x: torch.Tensor, boxes: np.ndarray, per_box: bool | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill each box with per-pixel standard-normal noise (timm's 'pixel' mode), in place; returns ``x``.

    The noise is drawn in one call, only for the erased pixels (their count is known on the host, so no
    device sync), and laid out box after box in image order, each box as [C, h, w]. On a GPU one masked
    scatter writes every box at once; on a CPU each box is written as a slice (a mask over the whole
    batch costs more than the ~25% of images erased). Both give the same tensor; ``per_box`` picks one.
    ``generator`` (on x's device) draws the noise; None: torch's global generator."""
    erased = int((boxes[:, 2] * boxes[:, 3]).sum()) * x.shape[1]
    if erased == 0:
        return x
    noise = torch.randn(erased, device=x.device, dtype=x.dtype, generator=generator)
    n, c, height, width = x.shape
    if x.device.type == "cpu" if per_box is None else per_box:
        offset = 0
        for i in np.flatnonzero(boxes[:, 2] * boxes[:, 3]):
            top, left, h, w = (int(v) for v in boxes[i])
            x[i, :, top:top + h, left:left + w] = noise[offset:offset + c * h * w].view(c, h, w)
            offset += c * h * w
        return x
    b = to_device(boxes, x.device)
    ys = torch.arange(height, device=x.device).view(1, height, 1)
    xs = torch.arange(width, device=x.device).view(1, 1, width)
    top, left, h, w = (b[:, i].view(n, 1, 1) for i in range(4))
    inside = ((ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)).unsqueeze(1).expand_as(x)
    return x.masked_scatter_(inside, noise)


def draw_mix(rng: np.random.Generator, cfg: MixConfig, height: int, width: int) -> MixParams:
    """timm's Mixup._params_per_batch and cutmix_bbox_and_lam (correct_lam=True), from ``rng``."""
    if not cfg.enabled or rng.random() >= cfg.prob:
        return MixParams(1.0, None)
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha <= 0 or rng.random() < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if not use_cutmix:
        return MixParams(lam, None)
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = np.clip([cy - cut_h // 2, cy + (cut_h + 1) // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + (cut_w + 1) // 2], 0, width)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return MixParams(float(lam), (int(y0), int(y1), int(x0), int(x1)))


def mix(x: torch.Tensor, labels: torch.Tensor, params: MixParams, num_classes: int,
        smoothing: float, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix image i with image N-1-i (timm's batch mode) and build the smoothed, mixed targets.

    Mixup is ``lam x + (1 - lam) x[::-1]``; CutMix pastes the box of image N-1-i into image i. With
    ``inplace`` the result is written into ``x`` (CutMix then copies only the box, not the batch)."""
    from timm.data.mixup import mixup_target

    if params.cutmix_box is not None:
        y0, y1, x0, x1 = params.cutmix_box
        if not inplace:
            x = x.clone(memory_format=torch.preserve_format)
        x[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].flip(0)  # flip copies the boxes before the write
    elif params.lam != 1.0:
        rows = _image_rows(x)
        in_place = inplace and (x.is_contiguous() or is_channels_last(x))  # rows is a view of x's memory
        if in_place and x.device.type == "cpu":
            _mixup_pairs_(rows, params.lam)
        else:
            reversed_rows = rows.index_select(0, torch.arange(len(rows) - 1, -1, -1, device=x.device))
            other = reversed_rows.mul_(1.0 - params.lam)
            if in_place:
                rows.mul_(params.lam).add_(other)  # the same float32 products and sum as the formula
            else:
                x = _from_image_rows(other.add_(rows * params.lam), x)
    return x, mixup_target(labels, num_classes, params.lam, smoothing)


def _mixup_pairs_(rows: torch.Tensor, lam: float) -> None:
    """Mixup in place, one pair of rows (i, N-1-i) at a time: the same float32 products and sum as the
    batch formula, but the pair's two images stay in a CPU's cache across the four passes that a whole
    batch, larger than the cache, streams from memory (~1.8x faster there; on a GPU the batch's 4 kernels
    are the fast way)."""
    n = len(rows)
    for i in range((n + 1) // 2):
        a, b = rows[i], rows[n - 1 - i]
        from_b, from_a = b * (1.0 - lam), a * (1.0 - lam)
        a.mul_(lam).add_(from_b)
        if i != n - 1 - i:  # an odd batch's middle image mixes with itself
            b.mul_(lam).add_(from_a)


def _image_rows(x: torch.Tensor) -> torch.Tensor:
    """A [N, C*H*W] view of x's memory (NCHW or NHWC order), so that whole images move as rows."""
    return image_major(x).reshape(len(x), -1)


def _from_image_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    n, c, h, w = like.shape
    if is_channels_last(like):
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)
    return rows.view(n, c, h, w)


def _noise_generator(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded from the step's generator: the erasing noise of a step is
    fixed by (seed, rank, step) alone, whatever ran before it (a teacher's look-ahead augments the next
    batch before this step's backward pass) and however a resumed run restores torch's global RNG."""
    return torch.Generator(device=device).manual_seed(int(rng.integers(0, 2**63 - 1)))


@dataclass
class AugmentedBatch:
    x: torch.Tensor  # normalised, augmented, mixed views [N,3,S,S], channels_last
    targets: torch.Tensor  # smoothed, mixed soft targets [N, C]
    mix: MixParams  # how the batch was mixed (a teacher cache mixes its scores the same way)


class BatchAugment:
    """The whole batch-level stage: uint8 views + labels -> normalised float views + soft targets."""

    def __init__(self, cfg: AugmentConfig, mix_cfg: MixConfig, num_classes: int,
                 dtype: torch.dtype = torch.float32):
        self.cfg, self.mix_cfg, self.num_classes, self.dtype = cfg, mix_cfg, num_classes, dtype
        self.rand_augment = None
        self.three_augment = None
        if cfg.three_augment or cfg.color_jitter > 0:
            from pipeline.three_augment import ThreeAugment

            self.three_augment = ThreeAugment(enabled=cfg.three_augment, color_jitter=cfg.color_jitter)
        if cfg.auto_augment:
            from pipeline.randaugment import RandAugment

            fill = tuple(min(255, round(255 * m)) for m in cfg.mean)  # timm's img_mean fill colour
            self.rand_augment = RandAugment(cfg.auto_augment, fill=fill, interpolation=cfg.interpolation)

    def __call__(self, views: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.apply(views, labels, rng)
        return out.x, out.targets

    def apply(self, views: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> AugmentedBatch:
        n, _, height, width = views.shape
        if self.three_augment is not None:
            views = self.three_augment.apply(views, self.three_augment.draw(rng, n))
        if self.rand_augment is not None:
            views = self.rand_augment.apply(views, self.rand_augment.draw(rng, n))
        x = normalize(views, self.cfg, torch.float32)  # a fresh tensor: the steps below work in place
        if self.cfg.reprob > 0:
            boxes = draw_erase_boxes(rng, n, height, width, self.cfg.reprob)
            x = random_erase(x, boxes, generator=_noise_generator(rng, x.device))
        params = draw_mix(rng, self.mix_cfg, height, width)
        if self.mix_cfg.enabled:
            if n % 2:
                raise ValueError(f"Mixup/CutMix pairs images i and N-1-i: the per-rank batch ({n} views) "
                                 f"must be even; change data.batch_size")
            x, targets = mix(x, labels, params, self.num_classes, self.mix_cfg.label_smoothing, inplace=True)
        else:
            from timm.data.mixup import mixup_target

            targets = mixup_target(labels, self.num_classes, 1.0, self.mix_cfg.label_smoothing)
        return AugmentedBatch(x.to(self.dtype).contiguous(memory_format=torch.channels_last), targets, params)
