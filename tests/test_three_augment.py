"""DeiT III's 3-Augment and colour jitter (`pipeline.three_augment`): each op bit-exact against PIL /
torchvision on the same draws, the draws distributed as the released code draws them, and the batch
stage runs it for the recipes that ask for it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from pipeline.synthetic import photo_like
from pipeline.three_augment import (
    BLUR,
    BLUR_RADIUS,
    GRAYSCALE,
    SOLARIZE,
    ThreeAugment,
    ThreeAugmentParams,
    box_blur_weights,
)

H, W = 37, 53


def photos(n: int, h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(photo_like(rng, w, h)) for _ in range(n)])


def to_batch(nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(nhwc).permute(0, 3, 1, 2)  # channels_last view, as DALI hands views over


def to_nhwc(batch: torch.Tensor) -> np.ndarray:
    return batch.permute(0, 2, 3, 1).contiguous().numpy()


def only(kind: int, n: int, radius: float = 1.0) -> ThreeAugmentParams:
    return ThreeAugmentParams(np.full(n, kind), np.full(n, radius), None, None)


def pil_reference(img: np.ndarray, choice: int | None, radius: float, order, factor) -> np.ndarray:
    """augment.py's secondary transforms on one PIL image with the given draws."""
    pil = Image.fromarray(img)
    if choice == GRAYSCALE:
        pil = T.Grayscale(3)(pil)
    elif choice == SOLARIZE:
        pil = ImageOps.solarize(pil)
    elif choice == BLUR:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=float(radius)))
    if order is not None:
        fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)  # ColorJitter's fn_idx order
        for op in order:
            pil = fns[op](pil, float(factor[op]))
    return np.asarray(pil)


@pytest.mark.parametrize("size", [(H, W), (5, 4), (2, 3), (1, 1), (1, 9)])
def test_blur_is_pillows_gaussian_blur_bit_for_bit(size: tuple[int, int]) -> None:
    radii = np.array([0.1, 0.25, 0.5, 0.8, 1.0, 1.2, 1.37, 1.6, 1.9, 2.0,
                      *np.random.default_rng(1).uniform(0.1, 2.0, 6)])
    nhwc = photos(len(radii), *size)
    ours = to_nhwc(ThreeAugment().apply(to_batch(nhwc), ThreeAugmentParams(np.full(len(radii), BLUR), radii,
                                                                             None, None)))
    for i, radius in enumerate(radii):
        ref = np.asarray(Image.fromarray(nhwc[i]).filter(ImageFilter.GaussianBlur(radius=float(radius))))
        assert np.array_equal(ours[i], ref), (size, radius, np.abs(ours[i].astype(int) - ref).max())


def test_box_blur_weights_cover_the_unit_weight() -> None:
    taps, ww, fw = box_blur_weights(np.linspace(*BLUR_RADIUS, 50))
    total = (2 * taps + 1) * ww + 2 * fw
    assert ((total <= 1 << 24) & (total > (1 << 24) - 2 * taps - 4)).all()  # 8.24 fixed point, rounding down
    assert (taps >= 0).all() and (taps <= 1).all()  # radius <= 2: at most 3 + 2 taps per pass


@pytest.mark.parametrize("kind", [GRAYSCALE, SOLARIZE])
def test_grayscale_and_solarize_are_torchvisions_and_pils(kind: int) -> None:
    nhwc = photos(4)
    ours = to_nhwc(ThreeAugment().apply(to_batch(nhwc), only(kind, 4)))
    for i in range(4):
        assert np.array_equal(ours[i], pil_reference(nhwc[i], kind, 0.0, None, None))


def test_colour_jitter_is_torchvisions_in_every_order() -> None:
    orders = np.array(list(itertools.permutations(range(3))))
    nhwc = photos(len(orders))
    factor = np.random.default_rng(2).uniform(0.7, 1.3, size=(len(orders), 3))
    params = ThreeAugmentParams(None, None, orders, factor)
    ours = to_nhwc(ThreeAugment(enabled=False, color_jitter=0.3).apply(to_batch(nhwc), params))
    for i in range(len(orders)):
        assert np.array_equal(ours[i], pil_reference(nhwc[i], None, 0.0, orders[i], factor[i])), orders[i]


def test_whole_transform_equals_the_released_one_image_by_image() -> None:
    aug = ThreeAugment(color_jitter=0.3)
    nhwc = photos(24, seed=3)
    batch = to_batch(nhwc)
    before = batch.clone()
    params = aug.draw(np.random.default_rng(4), 24)
    out = aug.apply(batch, params)
    assert torch.equal(batch, before), "the input batch is not modified"
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"
    ours = to_nhwc(out)
    for i in range(24):
        ref = pil_reference(nhwc[i], params.choice[i], params.radius[i], params.jitter_order[i],
                            params.jitter_factor[i])
        assert np.array_equal(ours[i], ref), i


def test_draws_are_distributed_as_the_released_code_draws_them() -> None:
    n = 30000
    params = ThreeAugment(color_jitter=0.3).draw(np.random.default_rng(0), n)
    assert np.allclose(np.bincount(params.choice, minlength=3) / n, 1 / 3, atol=0.015)  # RandomChoice
    assert params.radius.min() >= 0.1 and params.radius.max() <= 2.0
    assert abs(params.radius.mean() - 1.05) < 0.02 and abs(params.radius.std() - 1.9 / 12 ** 0.5) < 0.02
    assert (np.sort(params.jitter_order, axis=1) == [0, 1, 2]).all()  # permutations
    orders = np.unique(params.jitter_order, axis=0, return_counts=True)[1]
    assert len(orders) == 6 and np.allclose(orders / n, 1 / 6, atol=0.012)
    assert params.jitter_factor.min() >= 0.7 and params.jitter_factor.max() <= 1.3
    assert np.allclose(params.jitter_factor.mean(axis=0), 1.0, atol=0.01)
    off = ThreeAugment(enabled=True, color_jitter=0.0).draw(np.random.default_rng(0), 5)
    assert off.jitter_order is None and off.choice is not None
    with pytest.raises(ValueError, match="color_jitter"):
        ThreeAugment(color_jitter=1.5)


def test_batch_stage_runs_three_augment_for_deit3_and_not_for_deit() -> None:
    from pipeline.batch_aug import BatchAugment
    from trainer.recipes import get as get_recipe

    deit3, deit = get_recipe("deit3_s").data, get_recipe("deit_s").data
    assert deit3.augment.three_augment and deit3.augment.color_jitter == 0.3
    on = BatchAugment(deit3.augment, deit3.mix, num_classes=10)
    off = BatchAugment(deit.augment, deit.mix, num_classes=10)
    assert on.three_augment is not None and on.rand_augment is None
    assert off.three_augment is None and off.rand_augment is not None
    nhwc = photos(6)
    views = to_batch(nhwc)
    labels = torch.arange(6)
    rng = lambda: np.random.default_rng(9)  # noqa: E731
    x = on.apply(views, labels, rng()).x
    expected_views = ThreeAugment(color_jitter=0.3)(views, rng())  # drawn first from the step's generator
    from pipeline.batch_aug import normalize
    from tests.test_augment_stats import mix_formula

    plain = mix_formula(normalize(expected_views, deit3.augment), on.apply(views, labels, rng()).mix)
    assert torch.equal(x, plain.contiguous(memory_format=torch.channels_last))
