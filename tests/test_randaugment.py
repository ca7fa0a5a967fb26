"""pipeline.randaugment against timm's own RandAugment: spec parsing, every op against timm's op function
(same level arguments, fill and resample), the geometry conventions, batched == per image, and the
random draws against statistics of timm's draws."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as aa

from pipeline.randaugment import (
    IMAGENET_FILL,
    INCREASING_OPS,
    OPS,
    RandAugment,
    RandAugmentParams,
    RandAugmentSpec,
    bench,
    parse_spec,
)

GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED = GEOMETRIC + ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
PIL_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}
H, W = 61, 67  # not square, so that a swapped width/height shows


def photo(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    """Photo-like HWC uint8: smooth gradients, sensor noise, a few hard-edged patches and a disk, and
    some clipped (0 / 255) pixels."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(30, 225, 3)
    slope = rng.uniform(-2.5, 2.5, (3, 2))
    img = np.stack([base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)], axis=-1)
    for _ in range(3):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0:y0 + rng.integers(4, 20), x0:x0 + rng.integers(4, 20)] = rng.uniform(0, 255, 3)
    cy, cx, r = rng.uniform(10, h - 10), rng.uniform(10, w - 10), rng.uniform(4, 9)
    img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 9, img.shape)
    return np.clip(img, -20, 275).astype(np.int64).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors here are small; with two intra-op threads on a busy 2-core box torch's spinning
    workers made this file 5-7x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """NHWC uint8: four photos, a flat image and a two-level image (histogram edge cases)."""
    rng = np.random.default_rng(1234)
    flat = np.full((H, W, 3), (90, 150, 200), dtype=np.uint8)
    two = np.where(np.arange(W)[None, :, None] < W // 3, 40, 210).repeat(H, 0).repeat(3, 2).astype(np.uint8)
    return np.stack([photo(rng) for _ in range(4)] + [flat, two])


def to_batch(nhwc: np.ndarray) -> torch.Tensor:
    """A channels_last [N, 3, H, W] view of NHWC memory, as DALI hands batches over."""
    return torch.from_numpy(np.ascontiguousarray(nhwc)).permute(0, 3, 1, 2)


def to_nhwc(batch: torch.Tensor) -> np.ndarray:
    return batch.permute(0, 2, 3, 1).contiguous().numpy()


def one_op_params(n: int, op: int, magnitude: float, negate: bool) -> RandAugmentParams:
    return RandAugmentParams(op=np.full((n, 1), op), applied=np.ones((n, 1), dtype=bool),
                             magnitude=np.full((n, 1), float(magnitude)), negate=np.full((n, 1), negate))


def timm_op(name: str, magnitude: float, negate: bool, interpolation: str = "bicubic",
            fill: tuple[int, int, int] = IMAGENET_FILL, monkeypatch: pytest.MonkeyPatch | None = None):
    """timm's AugmentOp with prob 1 and no magnitude noise, its _randomly_negate pinned to ``negate``."""
    assert monkeypatch is not None
    monkeypatch.setattr(aa, "_randomly_negate", (lambda v: -v) if negate else (lambda v: v))
    hparams = dict(img_mean=fill, interpolation=PIL_RESAMPLE[interpolation], translate_pct=0.45)
    return aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)


def run_timm(op, nhwc: np.ndarray) -> np.ndarray | None:
    """timm's op on each image; None where a recent Pillow refuses posterize(bits=0)."""
    try:
        return np.stack([np.asarray(op(Image.fromarray(img))) for img in nhwc])
    except ValueError as error:
        assert "bits" in str(error)
        return None


def abs_err(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(ours.astype(np.int64) - ref.astype(np.int64))


# --------------------------------------------------------------------------------------------------------
# spec


def test_parse_deit_spec():
    assert parse_spec("rand-m9-mstd0.5-inc1") == RandAugmentSpec(
        magnitude=9, num_layers=2, magnitude_std=0.5, increasing=True, prob=0.5, magnitude_max=10.0)
    assert parse_spec("rand-m9-mstd0.5-inc1").op_names == INCREASING_OPS
    assert parse_spec("rand") == RandAugmentSpec()  # timm's defaults: m10, n2, no noise, inc0, p0.5
    assert parse_spec("rand").op_names == OPS


@pytest.mark.parametrize("spec", [
    "rand-m9-mstd0.5-inc1", "rand-m9-n3-mstd0.5-inc1", "rand-m7-p0.3", "rand-inc1-m9-mmax20-mstd1",
    "rand-m9-mstd101", "rand-n1-p1.0-inc0", "rand-m9-mmax0", "rand",
])
def test_parse_matches_timm(spec: str):
    ours = parse_spec(spec)
    ra = aa.rand_augment_transform(spec, dict(aa._HPARAMS_DEFAULT))
    assert ours.num_layers == ra.num_layers
    assert ours.op_names == tuple(op.name for op in ra.ops)
    op = ra.ops[0]
    assert (ours.magnitude, ours.prob, ours.magnitude_std) == (op.magnitude, op.prob, op.magnitude_std)
    assert ours.magnitude_max == (op.magnitude_max or 10)


@pytest.mark.parametrize("spec, part", [
    ("rand-m9-foo1", "foo1"), ("rand-m9-x", "x"), ("rand-m9-tweights", "tweights"), ("rand-m9--inc1", "''"),
    ("rand-m9.5", "m9.5"), ("rand-m9-m8", "m8"), ("rand-m9-pnan", "pnan"), ("randaug-m9", "randaug"),
    ("", "''"),
])
def test_parse_rejects(spec: str, part: str):
    with pytest.raises(ValueError, match=part.replace(".", r"\.")):
        parse_spec(spec)


def test_constructor_rejects():
    with pytest.raises(ValueError, match="interpolation"):
        RandAugment(interpolation="random")
    with pytest.raises(ValueError, match="geometry"):
        RandAugment(geometry="kornia")
    with pytest.raises(ValueError, match="fill"):
        RandAugment(fill=(1, 2))


# --------------------------------------------------------------------------------------------------------
# each op against timm's op function

MAGNITUDES = (0.0, 2.5, 5.0, 8.3, 9.0, 9.6, 10.0)


@pytest.mark.parametrize("name", INCREASING_OPS)
def test_op_matches_timm(name: str, images: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    """Every op with DeiT's settings (bicubic, ImageNet-mean fill) and the PIL sampler: bit-exact against
    timm + Pillow (the default grid_sample sampler: test_geometric_grid_sample_close_to_timm)."""
    aug = RandAugment(geometry="pil")
    batch = to_batch(images)
    index = INCREASING_OPS.index(name)
    worst = 0.0
    for magnitude in MAGNITUDES:
        for negate in (False, True) if name in SIGNED else (False,):
            ours = to_nhwc(aug.apply(batch, one_op_params(len(images), index, magnitude, negate)))
            ref = run_timm(timm_op(name, magnitude, negate, monkeypatch=monkeypatch), images)
            if ref is None:  # PosterizeIncreasing at magnitude 10 keeps 0 bits: black (older Pillow)
                assert name == "PosterizeIncreasing" and magnitude >= 10
                ref = np.zeros_like(images)
            err = abs_err(ours, ref)
            worst = max(worst, err.mean())
            assert err.max() == 0, (name, magnitude, negate, err.mean(), err.max())
    assert worst == 0.0


@pytest.mark.parametrize("name", ["Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"])
def test_non_increasing_op_matches_timm(name: str, images: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    """The 'inc0' op set (timm's default) differs only in these level functions."""
    aug = RandAugment("rand-m9-inc0")
    batch = to_batch(images)
    for magnitude in (2.5, 5.0, 9.0, 10.0):
        ours = to_nhwc(aug.apply(batch, one_op_params(len(images), OPS.index(name), magnitude, False)))
        ref = run_timm(timm_op(name, magnitude, False, monkeypatch=monkeypatch), images)
        assert abs_err(ours, ref).max() == 0, (name, magnitude)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_other_resampling_matches_timm(name: str, interpolation: str, images: np.ndarray,
                                                 monkeypatch: pytest.MonkeyPatch):
    aug = RandAugment(interpolation=interpolation, fill=(7, 200, 33), geometry="pil")
    batch = to_batch(images)
    for magnitude in (0.0, 4.0, 9.0, 10.0):
        for negate in (False, True):
            ours = to_nhwc(aug.apply(batch, one_op_params(len(images), INCREASING_OPS.index(name), magnitude, negate)))
            ref = run_timm(timm_op(name, magnitude, negate, interpolation, (7, 200, 33), monkeypatch), images)
            assert abs_err(ours, ref).max() == 0, (name, interpolation, magnitude, negate)


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_grid_sample_close_to_timm(name: str, images: np.ndarray, monkeypatch: pytest.MonkeyPatch):
    """The default geometry='grid_sample' (torch's a = -0.75 bicubic): close to PIL, not exact."""
    aug = RandAugment()
    assert aug.geometry == "grid_sample"
    batch = to_batch(images)
    for magnitude in (4.0, 9.0, 10.0):
        for negate in (False, True):
            ours = to_nhwc(aug.apply(batch, one_op_params(len(images), INCREASING_OPS.index(name), magnitude, negate)))
            ref = run_timm(timm_op(name, magnitude, negate, monkeypatch=monkeypatch), images)
            err = abs_err(ours, ref)
            assert err.mean() <= 1.0, (name, magnitude, negate, err.mean())
            assert np.quantile(err, 0.99) <= 8, (name, magnitude, negate)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("name", ["ShearX", "ShearY", "TranslateXRel", "TranslateYRel"])
def test_one_axis_pass_equals_grid_sample(name: str, interpolation: str, layout: str, images: np.ndarray):
    """geometry='grid_sample' runs the one-axis maps as a 1-D pass of 4 taps with per-row weights: the
    result is F.grid_sample's with the full 2-D map (here `_warp_grid_sample`) but for its float32 grid's
    rounding (a level of 1 on a few pixels in 10^4), and the fill lands on the same pixels."""
    from pipeline import randaugment as ra

    aug = RandAugment(interpolation=interpolation, fill=(7, 200, 33))
    batch = to_batch(np.concatenate([images, images[:, ::-1]]))  # the flipped half: other edges, other rows
    if layout == "nchw":
        batch = batch.contiguous()
    fill = torch.tensor(aug.fill, dtype=torch.uint8)
    rng = np.random.default_rng(9)
    n = len(batch)
    params = RandAugmentParams(op=np.full((n, 1), INCREASING_OPS.index(name)), applied=np.ones((n, 1), dtype=bool),
                               magnitude=rng.uniform(0, 10, (n, 1)), negate=rng.random((n, 1)) < 0.5)
    ours = aug.apply(batch, params)
    mats = torch.from_numpy(aug.level_args(params, H, W)[:, 0])
    ref = ra._warp_grid_sample(batch, mats, fill, interpolation)
    err = abs_err(to_nhwc(ours), to_nhwc(ref))
    assert err.max() <= 1 and (err > 0).mean() < 1e-3, (err.max(), (err > 0).mean())
    marked = (to_nhwc(ref) == np.array(aug.fill, dtype=np.uint8)).all(-1)  # fill, or content of that colour
    assert (to_nhwc(ours)[marked] == np.array(aug.fill, dtype=np.uint8)).all()
    assert marked.mean() > 0.05  # the maps shift enough content out for the mask to matter


def marker_image(y: int, x: int) -> np.ndarray:
    img = np.full((H, W, 3), 20, dtype=np.uint8)
    img[y - 1:y + 2, x - 1:x + 2] = 255
    return img


def centroid(img: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(img[..., 0] > 128)
    assert len(ys) > 0
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("geometry", ["grid_sample", "pil"])
@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometry_marker_lands_where_pil_puts_it(name: str, geometry: str, monkeypatch: pytest.MonkeyPatch):
    """A bright 3x3 marker off centre: its centroid after the op is where PIL puts it and where the
    inverse-mapping convention (pixel centres, source = A @ (x + 0.5, y + 0.5) + t) says."""
    aug = RandAugment(geometry=geometry, fill=(20, 20, 20))
    src = marker_image(26, 38)  # off centre, and still inside after the largest shift tested
    for magnitude in (5.0, 8.0):
        for negate in (False, True):
            params = one_op_params(1, INCREASING_OPS.index(name), magnitude, negate)
            ours = to_nhwc(aug.apply(to_batch(src[None]), params))[0]
            ref = np.asarray(timm_op(name, magnitude, negate, monkeypatch=monkeypatch)(Image.fromarray(src)))
            assert np.abs(centroid(ours) - centroid(ref)).max() <= 0.5, (name, magnitude, negate)
            # the forward map: invert the PIL matrix (source from destination) at the marker centre
            a, b, c, d, e, f = aug.level_args(params, H, W)[0, 0]
            dest = np.linalg.solve(np.array([[a, b], [d, e]]), np.array([38.5 - c, 26.5 - f])) - 0.5
            assert np.abs(centroid(ref) - dest).max() <= 0.5, (name, magnitude, negate)


def test_translate_moves_by_pct_of_size():
    """TranslateXRel at magnitude 10: PIL samples source x + 0.45 * W, so content moves left by that."""
    aug = RandAugment(fill=(20, 20, 20))
    src = marker_image(30, 50)
    shifted = to_nhwc(aug.apply(to_batch(src[None]), one_op_params(1, INCREASING_OPS.index("TranslateXRel"), 10.0,
                                                                     False)))[0]
    assert np.allclose(centroid(shifted), [50 - 0.45 * W, 30], atol=0.5)


# --------------------------------------------------------------------------------------------------------
# the whole policy: layers composed as timm composes them, batched == per image


def timm_reference(nhwc: np.ndarray, params: RandAugmentParams, names: tuple[str, ...],
                   monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """timm's ops applied image by image, layer by layer, with the draws in ``params``."""
    out = []
    for i, img in enumerate(nhwc):
        pil = Image.fromarray(img)
        for layer in range(params.num_layers):
            if params.applied[i, layer]:
                op = timm_op(names[params.op[i, layer]], params.magnitude[i, layer], params.negate[i, layer],
                             monkeypatch=monkeypatch)
                result = run_timm(op, np.asarray(pil)[None])
                pil = Image.fromarray(np.zeros_like(img) if result is None else result[0])
        out.append(np.asarray(pil))
    return np.stack(out)


def test_policy_matches_timm_image_by_image(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(7)
    nhwc = np.stack([photo(rng) for _ in range(24)])
    aug = RandAugment("rand-m9-n3-mstd0.5-p0.8-inc1", geometry="pil")
    params = aug.draw(np.random.default_rng(8), len(nhwc))
    ours = to_nhwc(aug.apply(to_batch(nhwc), params))
    assert abs_err(ours, timm_reference(nhwc, params, aug.op_names, monkeypatch)).max() == 0


@pytest.mark.parametrize("geometry", ["grid_sample", "pil"])
def test_batched_equals_single(geometry: str):
    rng = np.random.default_rng(3)
    nhwc = np.stack([photo(rng) for _ in range(20)])
    aug = RandAugment("rand-m9-n4-mstd0.5-p0.9-inc1", geometry=geometry)
    params = aug.draw(np.random.default_rng(4), len(nhwc))
    batched = aug.apply(to_batch(nhwc), params)
    for i in range(len(nhwc)):
        single = aug.apply(to_batch(nhwc[i:i + 1]), params.select([i]))
        assert torch.equal(batched[i:i + 1], single), i


def test_deterministic_for_a_seed(images: np.ndarray):
    aug = RandAugment()
    batch = to_batch(images)
    first = aug(batch, np.random.default_rng(11))
    again = aug(batch, np.random.default_rng(11))
    assert torch.equal(first, again)
    a, b = aug.draw(np.random.default_rng(11), 64), aug.draw(np.random.default_rng(11), 64)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("op", "applied", "magnitude", "negate"))
    c = aug.draw(np.random.default_rng(12), 64)
    assert not np.array_equal(a.op, c.op)


@pytest.mark.parametrize("geometry", ["grid_sample", "pil"])
def test_layout_dtype_shape_preserved(images: np.ndarray, geometry: str):
    aug = RandAugment("rand-m9-n3-mstd0.5-p1.0-inc1", geometry=geometry)
    params = aug.draw(np.random.default_rng(5), len(images))
    channels_last = to_batch(images)
    before = channels_last.clone()
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    out_cl = aug.apply(channels_last, params)
    out_nchw = aug.apply(channels_last.contiguous(), params)
    assert torch.equal(channels_last, before)  # input untouched
    assert torch.equal(out_cl, out_nchw)
    assert out_cl.dtype == torch.uint8 and out_cl.shape == channels_last.shape
    assert out_cl.device == channels_last.device
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert out_nchw.is_contiguous()
    # a crop of NHWC memory: neither layout is dense
    crop = channels_last[:, :, 2:-3, 1:-4]
    assert not crop.is_contiguous() and not crop.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(aug.apply(crop, params), aug.apply(crop.contiguous(), params))


def test_nothing_applied_and_empty_batch(images: np.ndarray):
    aug = RandAugment()
    batch = to_batch(images)
    params = aug.draw(np.random.default_rng(0), len(images))
    none = RandAugmentParams(params.op, np.zeros_like(params.applied), params.magnitude, params.negate)
    assert torch.equal(aug.apply(batch, none), batch)
    empty = batch[:0]
    assert aug(empty, np.random.default_rng(0)).shape == empty.shape


def test_apply_rejects_bad_input(images: np.ndarray):
    aug = RandAugment()
    batch = to_batch(images)
    params = aug.draw(np.random.default_rng(0), len(images))
    with pytest.raises(ValueError, match="uint8"):
        aug.apply(batch.float(), params)
    with pytest.raises(ValueError, match="uint8"):
        aug.apply(batch[:, :1], params)
    with pytest.raises(ValueError, match="params are for"):
        aug.apply(batch[:2], params)


# --------------------------------------------------------------------------------------------------------
# the random draws against timm's


def timm_draws(n: int, seed: int) -> dict[str, np.ndarray]:
    """Run timm's RandAugment('rand-m9-mstd0.5-inc1') on n images with the ops' functions replaced by
    recorders: which op each layer chose, whether it ran, its magnitude (after noise and clipping) and
    the sign of its argument."""
    ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(aa._HPARAMS_DEFAULT))
    chosen: list[str] = []
    ran: list[bool] = []
    magnitudes: list[float] = []
    negative: list[bool] = []

    class Recorder:
        def __init__(self, op: aa.AugmentOp) -> None:
            self.op = op
            level_fn = op.level_fn

            def level(magnitude, hparams):
                magnitudes.append(magnitude)
                args = level_fn(magnitude, hparams)
                if op.name in SIGNED:
                    negative.append(args[0] < (1.0 if op.name.endswith("Increasing") else 0.0))
                return args

            def aug_fn(img, *args, **kwargs):
                ran[-1] = True
                return img

            if level_fn is not None:
                op.level_fn = level
            op.aug_fn = aug_fn

        def __call__(self, img):
            chosen.append(self.op.name)
            ran.append(False)
            return self.op(img)

    ra.ops = [Recorder(op) for op in ra.ops]
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        img = Image.new("RGB", (2, 2))
        for _ in range(n):
            ra(img)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return dict(op=np.array([INCREASING_OPS.index(c) for c in chosen]).reshape(n, 2),
                applied=np.array(ran).reshape(n, 2), magnitude=np.array(magnitudes), negative=np.array(negative))


def test_draws_match_timm_distributions():
    n_timm, n_ours = 8000, 20000
    theirs = timm_draws(n_timm, seed=0)
    aug = RandAugment()
    params = aug.draw(np.random.default_rng(0), n_ours)
    ours_mag = params.magnitude[params.applied & ~np.isin(params.op, [0, 1, 2])]  # ops with a level function
    signed = np.isin(params.op, [INCREASING_OPS.index(s) for s in SIGNED]) & params.applied
    ours_neg = params.negate[signed]

    def close(a: float, b: float, sigma: float) -> bool:  # within 5 standard errors
        return abs(a - b) <= 5 * sigma

    # op choice: uniform over the 15 ops, both layers independently (with replacement)
    for op, label in ((params.op, "ours"), (theirs["op"], "timm")):
        counts = np.bincount(op.ravel(), minlength=15)
        expected = op.size / 15
        chi2 = ((counts - expected) ** 2 / expected).sum()
        assert chi2 < 45, (label, counts)  # chi2 with 14 dof: P(> 45) ~ 4e-5
        same = (op[:, 0] == op[:, 1]).mean()
        assert close(same, 1 / 15, math.sqrt((1 / 15) * (14 / 15) / len(op))), (label, same)
    # applied with probability 0.5
    p_ours, p_timm = params.applied.mean(), theirs["applied"].mean()
    assert close(p_ours, 0.5, math.sqrt(0.25 / params.applied.size))
    assert close(p_timm, 0.5, math.sqrt(0.25 / theirs["applied"].size))
    # magnitude: gauss(9, 0.5) clipped to [0, 10]
    m_timm = theirs["magnitude"]
    assert ours_mag.min() >= 0 and ours_mag.max() <= 10 and m_timm.max() <= 10
    se = 0.5 * math.sqrt(1 / len(ours_mag) + 1 / len(m_timm))
    assert close(ours_mag.mean(), m_timm.mean(), se), (ours_mag.mean(), m_timm.mean())
    assert abs(ours_mag.mean() - 9.0) < 0.02 and abs(ours_mag.std() - 0.5) < 0.03
    assert abs(ours_mag.std() - m_timm.std()) < 0.03, (ours_mag.std(), m_timm.std())
    clip_ours, clip_timm = (ours_mag == 10).mean(), (m_timm == 10).mean()  # P(gauss >= 10) = 2.3%
    assert close(clip_ours, clip_timm, math.sqrt(0.023 * (1 / len(ours_mag) + 1 / len(m_timm)))), (clip_ours, clip_timm)
    # sign: 50/50 for the signed ops
    assert close(ours_neg.mean(), 0.5, math.sqrt(0.25 / len(ours_neg)))
    assert close(theirs["negative"].mean(), 0.5, math.sqrt(0.25 / len(theirs["negative"])))


def test_level_args_distribution_matches_timm(monkeypatch: pytest.MonkeyPatch):
    """Level arguments from the drawn magnitudes, e.g. rotation angles, against timm's level function."""
    aug = RandAugment()
    params = aug.draw(np.random.default_rng(1), 3000)
    rotate = params.op == INCREASING_OPS.index("Rotate")
    matrices = aug.level_args(params, 100, 100)[rotate]
    degrees = -np.degrees(np.arctan2(matrices[:, 1], matrices[:, 0]))  # PIL: (cos a, sin a, ...) with a = -angle
    expected = np.where(params.negate[rotate], -1, 1) * params.magnitude[rotate] / 10 * 30
    assert np.allclose(degrees, expected, atol=1e-9)
    for mag, neg in zip(params.magnitude[rotate][:20], params.negate[rotate][:20], strict=True):
        monkeypatch.setattr(aa, "_randomly_negate", (lambda v: -v) if neg else (lambda v: v))
        (angle,) = aa._rotate_level_to_arg(mag, {})
        assert angle == (-1 if neg else 1) * mag / 10 * 30


def test_bench_runs(capsys: pytest.CaptureFixture[str]):
    line = bench(n=4, size=32, repeats=1)
    assert "img/s" in line and "timm" in line and "DALI stock rand_augment" in line
    assert line in capsys.readouterr().out


def test_bench_ops_times_every_op_and_the_policy(capsys: pytest.CaptureFixture[str]):
    from pipeline.randaugment import bench_ops

    threads = torch.get_num_threads()
    table = bench_ops(n=2, size=32, repeats=1)
    assert torch.get_num_threads() == threads  # its one thread is given back
    rows = {line[:28].strip(): line[28:].split() for line in table.splitlines()[2:]}
    assert list(rows) == [*INCREASING_OPS, "mean of the ops", "policy rand-m9-mstd0.5-inc1"]
    for name, cells in rows.items():
        ours, theirs, ratio = (float(c.replace(",", "")) for c in cells)
        assert ours > 0 and theirs > 0, name  # whole microseconds: the ratio of the unrounded times
        assert (theirs - 0.5) / (ours + 0.5) - 0.01 <= ratio <= (theirs + 0.5) / (ours - 0.5) + 0.01, name
    assert table in capsys.readouterr().out


def test_chunking_never_changes_the_result(images: np.ndarray):
    """Images per kernel call (``chunk_pixels``) is a speed knob only."""
    batch = to_batch(np.concatenate([images] * 4))
    params = RandAugment().draw(np.random.default_rng(5), batch.shape[0])
    outs = [RandAugment(chunk_pixels=c).apply(batch, params) for c in (None, 1, H * W * 3, 1 << 30)]
    assert all(torch.equal(outs[0], out) for out in outs[1:])


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided crop"])
def test_cpu_lookups_equal_the_gpu_kernels(images: np.ndarray, layout: str):
    """The LUT ops' two implementations give the same tensors: numpy per plane (what a CPU runs) and one
    index / scatter kernel over the batch (what a GPU runs, here run on the CPU's tensors)."""
    from pipeline import randaugment as ra

    batch = to_batch(images)
    if layout == "nchw":
        batch = batch.contiguous()
    elif layout == "strided crop":
        batch = batch[:, :, 2:-3, 1:-4]
    assert torch.equal(ra._histograms_per_plane(batch), ra._histograms_by_scatter(batch))
    assert int(ra._histograms_per_plane(batch).sum()) == batch.numel()
    lut = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (batch.shape[0], 3, 256)))
    ours = ra._lut_per_plane(batch, lut)
    assert torch.equal(ours, ra._lut_by_index(batch, lut))
    assert ours.shape == batch.shape and ours.dtype == torch.uint8
    plane = batch[4, 1].numpy()  # the flat image: one value per channel
    assert (ours[4, 1].numpy() == lut[4, 1].numpy()[plane]).all()


def test_dali_stock_baseline_augments_the_views_it_times():
    """The DALI baseline of the bench really runs RandAugment (n=2, m=9) on the given views: same shape,
    and most views changed, differently on two runs."""
    from pipeline.dali_randaugment import stock_rand_augment, stock_rand_augment_rate
    from pipeline.synthetic import photo_like

    rng = np.random.default_rng(0)
    views = np.stack([np.asarray(photo_like(rng, 48, 48)) for _ in range(16)])
    pipe = stock_rand_augment(views, device_id=None, threads=1, seed=3)
    first, second = (np.stack([np.asarray(t) for t in pipe.run()[0]]) for _ in range(2))
    assert first.shape == views.shape and first.dtype == np.uint8
    changed = [not np.array_equal(a, v) for a, v in zip(first, views, strict=True)]
    assert sum(changed) >= 12
    assert not np.array_equal(first, second)
    assert stock_rand_augment_rate(views, device_id=None, threads=1, repeats=1) > 0


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided crop"])
def test_cpu_forms_equal_the_gpu_forms(layout: str):
    """The CPU's faster forms of three steps give what the GPU's forms give (here run on the CPU's tensors):
    the truncating cast (numpy's vs torch's), the select (bitwise vs ``torch.where``) and PIL's luma (a
    matrix product vs elementwise; both equal the integer formula, extremes included); each keeps the
    input's memory layout."""
    from pipeline import randaugment as ra

    rng = np.random.default_rng(11)
    nhwc = rng.integers(0, 256, (5, H, W, 3), dtype=np.uint8)
    nhwc[0] = 255  # the largest luma sum: 255 * 65536 + 0x8000, still below 2^24
    nhwc[1] = 0
    batch = to_batch(nhwc)
    if layout == "nchw":
        batch = batch.contiguous()
    elif layout == "strided crop":
        batch = batch[:, :, 2:-3, 1:-4]
    values = (batch.to(torch.float32) * 1.37 - 40).clamp_(0, 255)  # fractions everywhere, in batch's layout
    cast = ra._to_uint8(values)
    assert torch.equal(cast, values.to(torch.uint8)) and cast.stride() == values.to(torch.uint8).stride()
    mask = torch.from_numpy(rng.random((5, 1) + tuple(batch.shape[2:])) < 0.4)
    fill = torch.tensor([7, 200, 33], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.equal(ra._select(mask, batch, fill), torch.where(mask, batch, fill))
    rgb = batch.permute(0, 2, 3, 1).to(torch.int64)
    exact = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    for matmul in (True, False):
        luma = ra._luma(batch, matmul=matmul)
        assert luma.shape == (5, 1) + tuple(batch.shape[2:]) and torch.equal(luma[:, 0].to(torch.int64), exact)
    assert int(exact[0].max()) == 255 and int(exact[1].max()) == 0
