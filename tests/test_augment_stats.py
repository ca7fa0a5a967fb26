"""Our host-drawn augmentation parameters follow timm's reference transforms' distributions.

Not pixel equality (the draws come from different generators) but the same algorithm: compared by
quantiles of many draws against timm's own functions, seeded, with sampling tolerances.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.mixup import Mixup, mixup_target
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation

from pipeline.batch_aug import MixParams, draw_erase_boxes, draw_mix, mix, normalize, random_erase
from pipeline.config import AugmentConfig, MixConfig
from pipeline.views import draw_views, random_resized_boxes

QUANTILES = np.linspace(0.05, 0.95, 19)


def _close(ours: np.ndarray, theirs: np.ndarray, tol: float) -> None:
    diff = np.abs(np.quantile(ours, QUANTILES) - np.quantile(theirs, QUANTILES))
    assert diff.max() <= tol, f"quantiles differ by {diff.max():.4f} > {tol}"


@pytest.mark.parametrize(("width", "height"), [(500, 375), (300, 300), (1200, 200)])
def test_random_resized_crop_matches_timm(width: int, height: int) -> None:
    n = 20_000
    random.seed(0)
    image = Image.new("RGB", (width, height))
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    theirs = np.array([RandomResizedCropAndInterpolation.get_params(image, scale, ratio) for _ in range(n)])
    ours = random_resized_boxes(np.random.default_rng(0), np.full(n, width), np.full(n, height), scale, ratio)
    for column, tol in ((2, 0.02), (3, 0.02)):
        _close(ours[:, column] / [height, width][column - 2], theirs[:, column] / [height, width][column - 2], tol)
    area = lambda b: b[:, 2] * b[:, 3] / (width * height)  # noqa: E731
    _close(area(ours), area(theirs), 0.02)
    # positions: uniform over the room left by the crop
    _close(ours[:, 0] / np.maximum(height - ours[:, 2], 1), theirs[:, 0] / np.maximum(height - theirs[:, 2], 1), 0.03)
    fallback = lambda b: np.mean((b[:, 0] == (height - b[:, 2]) // 2) & (b[:, 1] == (width - b[:, 3]) // 2))  # noqa: E731
    assert abs(fallback(ours) - fallback(theirs)) < 0.02


def test_views_are_relative_boxes_with_half_flipped() -> None:
    cfg = AugmentConfig()
    views = draw_views(np.random.default_rng(1), np.full(4000, 500), np.full(4000, 375), 3, cfg)
    assert views.boxes.shape == (4000, 3, 4) and views.flips.shape == (4000, 3)
    y0, x0, y1, x1 = np.moveaxis(views.boxes, -1, 0)
    assert (y1 > y0).all() and (x1 > x0).all() and views.boxes.min() >= 0 and views.boxes.max() <= 1
    assert abs(views.flips.mean() - 0.5) < 0.02
    assert not np.allclose(views.boxes[:, 0], views.boxes[:, 1]), "views of an image are drawn independently"


def test_simple_random_crop_is_a_square_of_the_shorter_side() -> None:
    cfg = AugmentConfig(crop="simple", image_size=224)
    views = draw_views(np.random.default_rng(2), np.array([500, 300]), np.array([375, 450]), 1, cfg)
    y0, x0, y1, x1 = views.boxes[:, 0].T
    assert np.allclose((y1 - y0) * [375, 450], [375, 300])
    # torchvision resizes 500 x 375 to 298 x 224 (int()), so the long axis's scale is 500 / 298, not 375 / 224
    assert np.allclose((x1 - x0) * [500, 300], [224 * 500 / 298, 300])


def test_random_erasing_matches_timm() -> None:
    n, size = 4000, 64
    random.seed(0)
    torch.manual_seed(0)
    timm_erase = RandomErasing(probability=0.25, mode="pixel", device="cpu")
    batch = torch.full((n, 3, size, size), 7.0)
    theirs = (timm_erase(batch.clone()) != 7.0).any(dim=1)  # erased pixel masks
    boxes = draw_erase_boxes(np.random.default_rng(0), n, size, size, 0.25)
    ours = (random_erase(batch.clone(), boxes) != 7.0).any(dim=1)
    for masks in (ours, theirs):
        assert masks.shape == (n, size, size)
    erased = lambda m: m.flatten(1).any(1).float().mean().item()  # noqa: E731
    assert abs(erased(ours) - erased(theirs)) < 0.03 and abs(erased(ours) - 0.25) < 0.03
    frac = lambda m: m.flatten(1).float().mean(1)[m.flatten(1).any(1)].numpy()  # noqa: E731
    _close(frac(ours), frac(theirs), 0.03)


def mix_formula(x: torch.Tensor, params: MixParams) -> torch.Tensor:
    """timm's Mixup formulas, plainly: lam x + (1 - lam) x[::-1], or the box of x[::-1] pasted into x."""
    if params.cutmix_box is None:
        return x * params.lam + x.flip(0) * (1 - params.lam)
    y0, y1, x0, x1 = params.cutmix_box
    expected = x.clone()
    expected[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
    return expected


def test_mixup_cutmix_draws_match_timm_and_mixing_matches_timm_formula() -> None:
    cfg = MixConfig()
    rng = np.random.default_rng(0)
    ours = [draw_mix(rng, cfg, 64, 64) for _ in range(4000)]
    np.random.seed(0)
    timm_mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                     num_classes=10)
    theirs_cutmix, theirs_lam = [], []
    for _ in range(4000):
        lam, use_cutmix = timm_mix._params_per_batch()
        theirs_cutmix.append(use_cutmix)
        theirs_lam.append(lam)
    assert abs(np.mean([p.cutmix_box is not None for p in ours]) - np.mean(theirs_cutmix)) < 0.04
    _close(np.array([p.lam for p in ours if p.cutmix_box is None]),
           np.array([lam for lam, c in zip(theirs_lam, theirs_cutmix, strict=True) if not c]), 0.05)
    # given the same parameters, the mixed batch and targets equal timm's formulas
    x = torch.randn(6, 3, 64, 64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    for params in ours[:20]:
        got, targets = mix(x, labels, params, 10, 0.1)
        if params.cutmix_box is not None:
            y0, y1, x0, x1 = params.cutmix_box
            assert abs(params.lam - (1 - (y1 - y0) * (x1 - x0) / (64 * 64))) < 1e-9, "lambda corrected to the box area"
        assert torch.allclose(got, mix_formula(x, params))
        assert torch.allclose(targets, mixup_target(labels, 10, params.lam, 0.1))
        assert torch.allclose(targets.sum(1), torch.ones(6))


def test_normalize_uses_imagenet_mean_and_std() -> None:
    views = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    cfg = AugmentConfig()
    expected = (views.float() / 255 - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    assert torch.allclose(normalize(views, cfg), expected, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fast_batch_steps_equal_the_formulas_bit_for_bit(layout: str) -> None:
    """normalize, random erasing and Mixup/CutMix take faster paths (row-wise broadcasts, in-place work, a
    few images per pass and one slice per erased box on a CPU): each must equal the plain formula exactly,
    in either layout (6 images: a pass of 4 and one of 2)."""
    cfg = AugmentConfig()
    nhwc = torch.randint(0, 256, (6, 40, 48, 3), dtype=torch.uint8)
    views = nhwc.permute(0, 3, 1, 2) if layout == "channels_last" else nhwc.permute(0, 3, 1, 2).contiguous()
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0)
    x = normalize(views, cfg)
    assert torch.equal(x, (views.float() - mean) * inv_std)
    assert x.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")

    boxes = draw_erase_boxes(np.random.default_rng(1), 6, 40, 48, 0.7)
    assert (boxes[:, 2] > 0).sum() >= 2
    torch.manual_seed(5)
    sliced = random_erase(x.clone(memory_format=torch.preserve_format), boxes, per_box=True)
    torch.manual_seed(5)
    masked = random_erase(x.clone(memory_format=torch.preserve_format), boxes, per_box=False)
    assert torch.equal(sliced, masked) and not torch.equal(sliced, x)

    labels = torch.arange(6)
    for params in (MixParams(0.3, None), MixParams(0.6, (3, 20, 5, 31))):
        pure, targets = mix(x, labels, params, 10, 0.1)
        inplace, _ = mix(x.clone(memory_format=torch.preserve_format), labels, params, 10, 0.1, inplace=True)
        expected = mix_formula(x, params)
        assert torch.equal(pure, expected) and torch.equal(inplace, expected)
        assert inplace.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    odd = x[:5].clone(memory_format=torch.preserve_format)  # in place on a CPU: pair by pair
    expected = mix_formula(odd, MixParams(0.3, None))
    mixed, _ = mix(odd, labels[:5], MixParams(0.3, None), 10, 0.1, inplace=True)
    assert torch.equal(mixed, expected), "an odd batch's middle image mixes with itself"


def test_simple_random_crop_positions_are_torchvisions_over_the_padded_image() -> None:
    """DeiT III: Resize(224) then RandomCrop(224, padding=4): 9 x 9 equally likely positions on a square
    image, reaching 4 resized pixels outside it; on a 500 x 375 image the longer side leaves more room."""
    import torchvision.transforms as T

    n = 18_000
    cfg = AugmentConfig(crop="simple", image_size=224)
    views = draw_views(np.random.default_rng(3), np.full(n, 300), np.full(n, 300), 1, cfg)
    y0, x0, y1, x1 = views.boxes[:, 0].T
    tops, lefts = np.round(y0 * 224).astype(int), np.round(x0 * 224).astype(int)
    assert np.allclose(y0 * 224, tops, atol=1e-3) and np.allclose(y1 - y0, 1.0)
    torch.manual_seed(0)
    padded = Image.new("RGB", (232, 232))
    theirs = np.array([T.RandomCrop.get_params(padded, (224, 224)) for _ in range(n)]) - 4
    for ours, ref in ((tops, theirs[:, 0]), (lefts, theirs[:, 1])):
        assert set(ours) == set(ref) == set(range(-4, 5))
        counts = np.bincount(ours + 4, minlength=9) / n
        assert np.abs(counts - 1 / 9).max() < 0.012
    wide = draw_views(np.random.default_rng(4), np.full(n, 500), np.full(n, 375), 1, cfg).boxes[:, 0]
    lefts = np.round(wide[:, 1] * 298).astype(int)  # resized 298 x 224: int(224 * 500 / 375)
    assert np.allclose(wide[:, 1] * 298, lefts, atol=1e-3)
    assert lefts.min() == -4 and lefts.max() == 298 + 4 - 224
    # at either end of the long axis 4 pixels are reflected, as torchvision pads them
    from pipeline.views import _outside

    before, after = _outside(torch.from_numpy(wide[:, 1]).double(), torch.from_numpy(wide[:, 3]).double(), 224)
    assert set(before[lefts == -4].tolist()) == {4} and set(after[lefts == 78].tolist()) == {4}


@pytest.mark.parametrize("flip", [0, 1])
def test_simple_crop_through_dali_equals_torchvisions_reflect_padded_crop(flip: int) -> None:
    """The DALI graph + `reflect_outside` give DeiT III's released transform pixel for pixel where the
    resize is the identity (shorter side already 224; PNG, so decoding is lossless too)."""
    import io

    import torchvision.transforms.functional as TF

    from pipeline.dali_graph import train_graph
    from pipeline.synthetic import photo_like
    from pipeline.views import reflect_outside

    size, pad = 48, 4
    cfg = AugmentConfig(crop="simple", image_size=size, crop_pad=pad)
    picture = photo_like(np.random.default_rng(5), 61, size)  # W x H = 61 x 48: resized is itself
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    positions = [(-4, -4), (4, 61 + 4 - size), (0, 7), (-2, 3)]  # (top, left) in resized = source pixels
    boxes = np.array([[t / size, left / 61, (t + size) / size, (left + size) / 61] for t, left in positions],
                     np.float32)
    flips = np.full(len(positions), flip, np.int32)

    def source():
        return [np.frombuffer(encoded.getvalue(), np.uint8)], [boxes], [flips]

    pipe = train_graph(source, 1, len(positions), cfg, device_id=None, num_threads=1)
    pipe.build()
    (views,) = pipe.run()
    got = reflect_outside(torch.from_numpy(np.array(views.as_tensor())[0]), torch.from_numpy(boxes),
                          torch.from_numpy(flips))
    padded = TF.pad(picture, pad, padding_mode="reflect")  # what RandomCrop(padding=4, 'reflect') crops from
    for view, (top, left) in zip(got.numpy(), positions, strict=True):
        expected = TF.crop(padded, top + pad, left + pad, size, size)
        if flip:
            expected = TF.hflip(expected)
        assert np.array_equal(view, np.asarray(expected)), (top, left)


@pytest.mark.dali
@pytest.mark.parametrize(("repeats", "decode_crop", "torch_resize"),
                         [(1, True, False), (1, False, False), (3, True, False), (1, True, True), (1, False, True),
                          (3, True, True)])
def test_random_resized_crops_through_dali_are_timms_crop_then_resize(repeats: int, decode_crop: bool,
                                                                      torch_resize: bool) -> None:
    """Each view is timm's ``resized_crop`` (PIL: crop the box, then resize it bicubic, antialiased) of the
    same box, to a few levels. Through DALI's ``fn.resize`` (the GPU's graph): one view per image is
    decoded alone (ROI decoding) and resized whole, so its edges stop where PIL's do; k views are cut from
    one decode (their taps read past the box), and so is one view with ``decode_crop=False``. Through
    torch (the CPU's cut, `pipeline.host_resize`) every view is its box alone, resized."""
    import io

    from pipeline.dali_graph import train_graph
    from pipeline.synthetic import jpeg_bytes

    size = 64
    rng = np.random.default_rng(11)
    encoded = [jpeg_bytes(rng, int(w), int(h), mode=mode)
               for (w, h), mode in zip([(160, 120), (97, 211), (300, 64), (128, 128), (150, 100), (90, 140)],
                                       ["RGB", "RGB", "RGB", "RGB", "L", "CMYK"], strict=True)]
    pictures = [Image.open(io.BytesIO(e)).convert("RGB") for e in encoded]
    cfg = AugmentConfig(image_size=size)
    views = draw_views(np.random.default_rng(3), np.array([p.width for p in pictures]),
                       np.array([p.height for p in pictures]), repeats, cfg)
    views.boxes[0, 0] = [0, 0, 1, 1]  # the whole image (the fallback's kind of box)

    def source():
        return ([np.frombuffer(e, np.uint8) for e in encoded], list(views.boxes.copy()),
                [np.zeros(repeats, np.int32) for _ in encoded])

    pipe = train_graph(source, len(encoded), repeats, cfg, device_id=None, num_threads=2, decode_crop=decode_crop,
                       torch_resize=torch_resize)
    pipe.build()
    (out,) = pipe.run()
    got = np.array(out.as_tensor()).astype(np.int16)  # [n, k, S, S, 3]
    worst = []
    for i, picture in enumerate(pictures):
        for v in range(repeats):
            y0, x0, y1, x1 = views.boxes[i, v]
            box = tuple(round(float(t)) for t in (x0 * picture.width, y0 * picture.height, x1 * picture.width,
                                                  y1 * picture.height))
            expected = np.asarray(picture.crop(box).resize((size, size), Image.Resampling.BICUBIC), np.int16)
            diff = np.abs(got[i, v] - expected)
            worst.append((diff.mean(), diff.max()))
    means, maxima = np.array(worst).T
    assert means.max() < 0.4, means  # mostly the two JPEG decoders' own rounding
    # decoded alone, a crop differs from PIL's only by rounding; cut from the whole image, its edge pixels
    # also see the pixels just outside the box. torch's cut is the box's alone in every case: 1 level here
    # (on ImageNet-like images with saturated colours up to 4, in the few pixels where the cubic's
    # overshoot past 0 or 255 meets PIL's clipping of its first pass)
    if torch_resize or (repeats == 1 and decode_crop):
        assert maxima.max() <= 2, maxima
    else:
        assert 2 < maxima.max() <= 20, maxima


@pytest.mark.dali
@pytest.mark.parametrize("torch_resize", [True, False])
def test_the_teacher_caches_whole_image_is_pils_resize(torch_resize: bool) -> None:
    """`whole_image_graph` (a teacher cache's input without replayed views): the whole image resized to the
    teacher's resolution as PIL resizes it, through torch on a CPU and through DALI (the GPU's graph)."""
    import io

    from pipeline.dali_graph import whole_image_graph
    from pipeline.synthetic import jpeg_bytes

    size = 48
    rng = np.random.default_rng(12)
    encoded = [jpeg_bytes(rng, w, h) for w, h in [(160, 120), (97, 211), (40, 30), (300, 64)]]
    pipe = whole_image_graph(lambda: [np.frombuffer(e, np.uint8) for e in encoded], len(encoded), size, None,
                             num_threads=2, torch_resize=torch_resize)
    pipe.build()
    (out,) = pipe.run()
    got = np.array(out.as_tensor()).astype(np.int16)
    for image, e in zip(got, encoded, strict=True):
        picture = Image.open(io.BytesIO(e)).convert("RGB")
        expected = np.asarray(picture.resize((size, size), Image.Resampling.BICUBIC), np.int16)
        diff = np.abs(image - expected)
        assert diff.mean() < 0.4, diff.mean()
        assert diff.max() <= 2, diff.max()
