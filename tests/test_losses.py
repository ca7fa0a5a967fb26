"""trainer.losses against the DeiT paper's formulas (recomputed here in numpy float64) and timm's own code.

Every expected value is computed independently of trainer.losses: closed forms, explicit numpy
softmax / log / sum, or timm's classes (SoftTargetCrossEntropy, LabelSmoothingCrossEntropy,
BinaryCrossEntropy, Mixup, TokenDistillationTask driven by a tiny real DeiT and a real linear teacher,
timm.utils.accuracy). CPU only, a few seconds.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.task import TokenDistillationTask
from timm.utils import accuracy as timm_accuracy

from trainer.losses import (
    DistillationLoss,
    DistillLossConfig,
    LossTerms,
    distillation_loss,
    fuse_heads,
    hard_distillation_term,
    smooth_one_hot,
    soft_distillation_term,
    topk_accuracy,
)

# ----------------------------------------------------------------------------------------------------
# Independent float64 references: the formulas of the paper written out, nothing from trainer.losses.
# ----------------------------------------------------------------------------------------------------


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def np_soft_ce(z: np.ndarray, y: np.ndarray) -> float:
    """mean_b sum_c -y_bc log psi(z_b)_c"""
    return float((-(np.asarray(y, np.float64) * np_log_softmax(z)).sum(-1)).mean())


def np_smoothed(labels: list[int], c: int, eps: float) -> np.ndarray:
    """(1 - eps) one_hot + eps / C, the label-smoothing convention of timm/DeiT."""
    y = np.full((len(labels), c), eps / c)
    y[np.arange(len(labels)), labels] += 1.0 - eps
    return y


def np_kl_teacher_student_sum(zs: np.ndarray, zt: np.ndarray, tau: float) -> float:
    """sum_b sum_c p_t (log p_t - log p_s), p = psi(z / tau): KL(teacher || student) summed over the batch."""
    log_ps = np_log_softmax(np.asarray(zs, np.float64) / tau)
    log_pt = np_log_softmax(np.asarray(zt, np.float64) / tau)
    return float((np.exp(log_pt) * (log_pt - log_ps)).sum())


def np_bce_mean(z: np.ndarray, y: np.ndarray) -> float:
    """mean over all entries of -[y log sigma(z) + (1 - y) log(1 - sigma(z))]."""
    z = np.asarray(z, np.float64)
    y = np.asarray(y, np.float64)
    log_sig = -np.logaddexp(0.0, -z)
    log_one_minus = -np.logaddexp(0.0, z)
    return float((-(y * log_sig + (1 - y) * log_one_minus)).mean())


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def close(actual: torch.Tensor | float, expected: float, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    value = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    return math.isclose(value, expected, rel_tol=rel, abs_tol=abs_)


# Tiny fixed example: 2 samples x 3 classes.
Z_CLS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]]
Z_DIST = [[1.0, -0.5, 0.0], [-1.0, 2.0, 0.5]]
Z_TEACHER = [[3.0, 1.0, 0.2], [0.0, 0.5, 1.5]]  # argmax: [0, 2]
LABELS = [0, 1]
Y_MIXED = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]  # what Mixup + smoothing would hand us (rows sum to 1)


# ----------------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------------


def test_closed_forms_uniform_student() -> None:
    """Student logits all zero -> psi(z) uniform: CE = log C; KL(p_t || uniform) = sum p_t log(C p_t)."""
    zs = torch.zeros(2, 3)
    y = torch.tensor([2, 0])
    base = distillation_loss(zs, y, None, DistillLossConfig(kind="none", label_smoothing=0.0)).base
    assert close(base, math.log(3))
    # With smoothing the target still sums to 1, and log psi = -log 3 everywhere: CE is log 3 again.
    assert close(distillation_loss(zs, y, None, DistillLossConfig(kind="none")).base, math.log(3))

    # Teacher logits tau * [0, 0, log 2] -> p_t = [1/4, 1/4, 1/2] at temperature tau.
    tau = 3.0
    zt = torch.tensor([[0.0, 0.0, math.log(2.0)]] * 2) * tau
    kl_one = 0.25 * math.log(0.75) * 2 + 0.5 * math.log(1.5)  # = 0.5 * log(9/8)
    assert math.isclose(kl_one, 0.5 * math.log(9 / 8))
    cfg = DistillLossConfig(kind="soft", tau=tau, alpha=0.1, label_smoothing=0.0)
    terms = distillation_loss(zs, y, zt, cfg)
    assert close(terms.distill, tau**2 * kl_one)  # per-image KL, batch mean, times tau^2
    assert close(terms.total, 0.9 * math.log(3) + 0.1 * tau**2 * kl_one)

    # Student equal to teacher: the KL vanishes, whatever the temperature.
    same = torch.tensor(Z_TEACHER)
    assert close(soft_distillation_term(same, same, tau=3.0), 0.0, abs_=1e-6)


# ----------------------------------------------------------------------------------------------------
# Hand-computed tiny tensors, each kind
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("integer_labels", [True, False])
def test_none_single_head_is_soft_target_ce(integer_labels: bool) -> None:
    targets = torch.tensor(LABELS) if integer_labels else t(Y_MIXED)
    y = np_smoothed(LABELS, 3, 0.1) if integer_labels else np.array(Y_MIXED)
    terms = distillation_loss(t(Z_CLS), targets, None, DistillLossConfig(kind="none"))
    assert close(terms.base, np_soft_ce(Z_CLS, y))
    assert close(terms.total, np_soft_ce(Z_CLS, y))
    assert float(terms.distill) == 0.0


def test_none_two_heads_each_mode() -> None:
    y = np.array(Y_MIXED)
    heads = (t(Z_CLS), t(Z_DIST))
    mean_logits = (np.array(Z_CLS) + np.array(Z_DIST)) / 2
    expected = {
        "mean_logits": np_soft_ce(mean_logits, y),  # timm: forward_head returns (x + x_dist) / 2
        "mean_loss": (np_soft_ce(Z_CLS, y) + np_soft_ce(Z_DIST, y)) / 2,
        "cls": np_soft_ce(Z_CLS, y),  # DeiT reference code: base criterion on outputs[0] only
    }
    for mode, value in expected.items():
        terms = distillation_loss(heads, t(Y_MIXED), None, DistillLossConfig(kind="none", two_head_base=mode))
        assert close(terms.total, value), mode
    assert DistillLossConfig().two_head_base == "mean_logits"
    # The modes really differ on this example (CE is convex in the logits: CE(mean) <= mean CE).
    assert expected["mean_logits"] < expected["mean_loss"]


@pytest.mark.parametrize("normalization", ["batch", "batch_classes"])
def test_soft_two_heads_hand_computed(normalization: str) -> None:
    tau, lam = 3.0, 0.1
    cfg = DistillLossConfig(kind="soft", tau=tau, alpha=lam, soft_normalization=normalization)
    terms = distillation_loss((t(Z_CLS), t(Z_DIST)), torch.tensor(LABELS), t(Z_TEACHER), cfg)
    base = np_soft_ce(Z_CLS, np_smoothed(LABELS, 3, 0.1))  # class head, smoothed true labels
    kl_sum = np_kl_teacher_student_sum(Z_DIST, Z_TEACHER, tau)  # distillation head vs teacher
    denom = 2 if normalization == "batch" else 2 * 3
    distill = tau**2 * kl_sum / denom
    assert close(terms.base, base)
    assert close(terms.distill, distill)
    assert close(terms.total, (1 - lam) * base + lam * distill)


def test_hard_two_heads_hand_computed() -> None:
    cfg = DistillLossConfig(kind="hard")
    terms = distillation_loss((t(Z_CLS), t(Z_DIST)), t(Y_MIXED), t(Z_TEACHER), cfg)
    base = np_soft_ce(Z_CLS, Y_MIXED)
    y_t = np.argmax(np.array(Z_TEACHER), axis=-1)
    assert list(y_t) == [0, 2]
    distill = float(-np_log_softmax(Z_DIST)[np.arange(2), y_t].mean())  # unsmoothed one-hot CE
    assert close(terms.base, base)
    assert close(terms.distill, distill)
    assert close(terms.total, 0.5 * base + 0.5 * distill)


def test_bce_base_hand_computed() -> None:
    # Integer labels: timm BinaryCrossEntropy's one-hot, off = eps/C, on = 1 - eps + eps/C.
    cfg = DistillLossConfig(kind="none", base="bce", label_smoothing=0.1)
    terms = distillation_loss(t(Z_CLS), torch.tensor(LABELS), None, cfg)
    assert close(terms.base, np_bce_mean(Z_CLS, np_smoothed(LABELS, 3, 0.1)))
    # Dense mixed targets, kept soft.
    cfg = DistillLossConfig(kind="none", base="bce")
    assert close(distillation_loss(t(Z_CLS), t(Y_MIXED), None, cfg).base, np_bce_mean(Z_CLS, Y_MIXED))
    # DeiT III: Mixup without smoothing, then targets.gt(0.0): every class in the mix is a positive.
    y_mix = [[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]]
    cfg = DistillLossConfig(kind="none", base="bce", bce_target_threshold=0.0)
    expected = np_bce_mean(Z_CLS, [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert close(distillation_loss(t(Z_CLS), t(y_mix), None, cfg).base, expected)
    # With a teacher the base term switches to BCE and the teacher term is unchanged (hard CE here).
    cfg = DistillLossConfig(kind="hard", base="bce")
    terms = distillation_loss((t(Z_CLS), t(Z_DIST)), t(Y_MIXED), t(Z_TEACHER), cfg)
    assert close(terms.base, np_bce_mean(Z_CLS, Y_MIXED))
    assert close(terms.distill, float(-np_log_softmax(Z_DIST)[[0, 1], [0, 2]].mean()))


# ----------------------------------------------------------------------------------------------------
# Soft term: paper formula on random tensors, both normalizations, KL direction
# ----------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 6),
    classes=st.integers(2, 40),
    tau=st.sampled_from([1.0, 2.0, 3.0, 4.5]),
    scale=st.floats(0.1, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_soft_term_matches_paper_formula(batch: int, classes: int, tau: float, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(batch, classes, generator=g) * scale
    zt = torch.randn(batch, classes, generator=g) * scale
    kl_sum = np_kl_teacher_student_sum(zs.numpy(), zt.numpy(), tau)
    per_batch = soft_distillation_term(zs, zt, tau, "batch")
    per_entry = soft_distillation_term(zs, zt, tau, "batch_classes")
    assert close(per_batch, tau**2 * kl_sum / batch, rel=1e-4, abs_=1e-5)
    # per_entry = per_batch / C exactly, so its absolute tolerance is per_batch's divided by C
    assert close(per_entry, tau**2 * kl_sum / (batch * classes), rel=1e-4, abs_=1e-5 / classes)
    # Same summed KL, two denominators: the ratio is the number of classes.
    if float(per_entry) > 1e-6:
        assert float(per_batch) / float(per_entry) == pytest.approx(classes, rel=1e-5)
    # And through distillation_loss, single head, lambda weighting of eq. 2.
    labels = torch.randint(0, classes, (batch,), generator=g)
    for norm, denom in (("batch", batch), ("batch_classes", batch * classes)):
        cfg = DistillLossConfig(kind="soft", tau=tau, alpha=0.1, soft_normalization=norm)
        terms = distillation_loss(zs, labels, zt, cfg)
        base = np_soft_ce(zs.numpy(), np_smoothed(labels.tolist(), classes, 0.1))
        expected = 0.9 * base + 0.1 * tau**2 * kl_sum / denom
        assert close(terms.total, expected, rel=1e-4, abs_=1e-5)


def test_soft_default_normalization_is_batch_and_ratio_is_c() -> None:
    assert DistillLossConfig().soft_normalization == "batch"
    assert (DistillLossConfig().tau, DistillLossConfig().alpha) == (3.0, 0.1)  # DeiT sec. 6
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(8, 1000, generator=g), torch.randn(8, 1000, generator=g) * 3
    batch = distillation_loss(zs, t(np.full((8, 1000), 1e-3)), zt, DistillLossConfig(kind="soft")).distill
    entries = distillation_loss(
        zs, t(np.full((8, 1000), 1e-3)), zt, DistillLossConfig(kind="soft", soft_normalization="batch_classes")
    ).distill
    assert float(batch) / float(entries) == pytest.approx(1000.0, rel=1e-5)


def test_soft_term_is_kl_teacher_to_student_not_reverse() -> None:
    zs, zt, tau = t([[3.0, 0.0, 0.0]]), t([[0.0, 1.0, 1.0]]), 1.0
    forward = np_kl_teacher_student_sum(zs, zt, tau)  # sum p_t (log p_t - log p_s)
    reverse = np_kl_teacher_student_sum(zt, zs, tau)  # sum p_s (log p_s - log p_t)
    assert abs(forward - reverse) > 0.1
    value = float(soft_distillation_term(zs, zt, tau))
    assert close(value, forward) and not close(value, reverse, rel=1e-2)
    # It is also the DeiT reference code's expression, with its B*C normalization.
    ref = F.kl_div(F.log_softmax(zs / tau, dim=1), F.log_softmax(zt / tau, dim=1), reduction="sum", log_target=True)
    ref = ref * tau * tau / zs.numel()
    assert close(soft_distillation_term(zs, zt, tau, "batch_classes"), float(ref))


def test_soft_term_finite_when_teacher_probabilities_underflow() -> None:
    zs = t([[0.0, 0.0, 0.0]])
    zt = t([[0.0, -1e4, 1e4]])  # p_t = [0, 0, 1] exactly in fp32
    value = soft_distillation_term(zs, zt, tau=1.0)
    assert torch.isfinite(value) and close(value, math.log(3))  # KL(one-hot || uniform) = log C


# ----------------------------------------------------------------------------------------------------
# Hard term and routing
# ----------------------------------------------------------------------------------------------------


def test_hard_term_uses_teacher_argmax_unsmoothed() -> None:
    zd = t(Z_DIST)
    value = hard_distillation_term(zd, t(Z_TEACHER))
    onehot = float(-np_log_softmax(Z_DIST)[[0, 1], [0, 2]].mean())
    smoothed = np_soft_ce(Z_DIST, np_smoothed([0, 2], 3, 0.1))
    assert close(value, onehot)
    assert not close(value, smoothed, rel=1e-3)
    # The config's label smoothing touches only the true-label term.
    for eps in (0.0, 0.1, 0.3):
        cfg = DistillLossConfig(kind="hard", label_smoothing=eps)
        assert close(distillation_loss((t(Z_CLS), zd), torch.tensor(LABELS), t(Z_TEACHER), cfg).distill, onehot)
    # Only the argmax matters: rescaling/shifting the teacher's logits keeps the term.
    assert close(hard_distillation_term(zd, t(Z_TEACHER) * 7 - 2), onehot)
    # A different argmax changes it.
    assert not close(hard_distillation_term(zd, t([[0.0, 5.0, 0.0], [0.0, 0.5, 1.5]])), onehot, rel=1e-3)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_two_head_routing(kind: str) -> None:
    """Class head <- true labels, distillation head <- teacher, checked by values and by gradients."""
    cfg = DistillLossConfig(kind=kind)
    zc = t(Z_CLS).requires_grad_(True)
    zd = t(Z_DIST).requires_grad_(True)
    terms = distillation_loss((zc, zd), t(Y_MIXED), t(Z_TEACHER), cfg)
    # Values: base equals the class head alone, distill equals the distillation head alone.
    assert close(terms.base, np_soft_ce(Z_CLS, Y_MIXED))
    alone = distillation_loss(t(Z_DIST), t(Y_MIXED), t(Z_TEACHER), cfg)
    assert close(terms.distill, float(alone.distill))
    # Gradients: base reaches only the class head, distill only the distillation head.
    g_cls_base, g_dist_base = torch.autograd.grad(terms.base, (zc, zd), retain_graph=True, allow_unused=True)
    g_cls_kd, g_dist_kd = torch.autograd.grad(terms.distill, (zc, zd), allow_unused=True)
    assert g_cls_base is not None and g_cls_base.abs().sum() > 0
    assert g_dist_base is None or g_dist_base.abs().sum() == 0
    assert g_dist_kd is not None and g_dist_kd.abs().sum() > 0
    assert g_cls_kd is None or g_cls_kd.abs().sum() == 0


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_single_head_takes_both_terms(kind: str) -> None:
    """CaiT: one head, both terms on it; identical to passing that head twice as (cls, dist)."""
    cfg = DistillLossConfig(kind=kind)
    single = distillation_loss(t(Z_CLS), torch.tensor(LABELS), t(Z_TEACHER), cfg)
    twice = distillation_loss((t(Z_CLS), t(Z_CLS)), torch.tensor(LABELS), t(Z_TEACHER), cfg)
    for a, b in ((single.total, twice.total), (single.base, twice.base), (single.distill, twice.distill)):
        assert close(a, float(b))
    base = np_soft_ce(Z_CLS, np_smoothed(LABELS, 3, 0.1))
    if kind == "soft":
        distill = 9.0 * np_kl_teacher_student_sum(Z_CLS, Z_TEACHER, 3.0) / 2
        expected = 0.9 * base + 0.1 * distill
    else:
        distill = float(-np_log_softmax(Z_CLS)[[0, 1], [0, 2]].mean())
        expected = 0.5 * base + 0.5 * distill
    assert close(single.distill, distill)
    assert close(single.total, expected)


# ----------------------------------------------------------------------------------------------------
# Gradients, precision
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
def test_gradients_reach_both_heads_never_the_teacher(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    zc = torch.randn(4, 10, generator=g).requires_grad_(True)
    zd = torch.randn(4, 10, generator=g).requires_grad_(True)
    teacher = torch.randn(4, 10, generator=g).requires_grad_(True)  # as if the graph were not detached
    labels = torch.randint(0, 10, (4,), generator=g)
    loss = distillation_loss((zc, zd), labels, None if kind == "none" else teacher, DistillLossConfig(kind=kind))
    loss.total.backward()
    assert zc.grad is not None and zc.grad.abs().sum() > 0
    assert zd.grad is not None and zd.grad.abs().sum() > 0  # kind none: via the mean of the logits
    assert teacher.grad is None


def test_two_head_base_cls_leaves_dist_head_without_gradient() -> None:
    zc = t(Z_CLS).requires_grad_(True)
    zd = t(Z_DIST).requires_grad_(True)
    cfg = DistillLossConfig(kind="none", two_head_base="cls")
    distillation_loss((zc, zd), torch.tensor(LABELS), None, cfg).total.backward()
    assert zc.grad is not None and zd.grad is None


@pytest.mark.parametrize("kind", ["none", "soft", "hard"])
@pytest.mark.parametrize("base", ["ce", "bce"])
def test_bf16_autocast_computes_in_fp32(kind: str, base: str) -> None:
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(16, 50)
    x = torch.randn(4, 16, generator=g)
    teacher = (torch.randn(4, 50, generator=g) * 4).bfloat16()
    targets = torch.softmax(torch.randn(4, 50, generator=g), -1)
    cfg = DistillLossConfig(kind=kind, base=base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zc, zd = lin(x), lin(x * 0.5)
        assert zc.dtype == torch.bfloat16
        terms = distillation_loss((zc, zd), targets, None if kind == "none" else teacher, cfg)
    for value in (terms.total, terms.base, terms.distill):
        assert value.dtype == torch.float32 and torch.isfinite(value)
    # Same numbers as fp32 math on the same (bf16-rounded) logits.
    ref = distillation_loss(
        (zc.detach().float(), zd.detach().float()), targets, None if kind == "none" else teacher.float(), cfg
    )
    assert close(terms.total, float(ref.total), rel=1e-6, abs_=1e-7)
    terms.total.backward()
    assert lin.weight.grad is not None and lin.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# Agreement with timm
# ----------------------------------------------------------------------------------------------------


def test_base_term_matches_timm_soft_target_ce_on_mixup_targets() -> None:
    np.random.seed(0)
    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    images = torch.randn(8, 3, 16, 16)
    labels = torch.randint(0, 10, (8,))
    _, y = mixup(images, labels)
    assert y.shape == (8, 10) and y.dtype.is_floating_point
    logits = torch.randn(8, 10) * 3
    ours = distillation_loss(logits, y, None, DistillLossConfig(kind="none")).base
    assert close(ours, float(SoftTargetCrossEntropy()(logits, y)))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.25])
def test_integer_labels_match_timm_label_smoothing_ce(eps: float) -> None:
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(6, 7, generator=g) * 2, torch.randint(0, 7, (6,), generator=g)
    ours = distillation_loss(logits, labels, None, DistillLossConfig(kind="none", label_smoothing=eps)).base
    assert close(ours, float(LabelSmoothingCrossEntropy(smoothing=eps)(logits, labels)))
    assert close(ours, float(F.cross_entropy(logits, labels, label_smoothing=eps)))
    # And the same targets timm's Mixup builds for an unmixed batch (lam = 1).
    from timm.data.mixup import mixup_target

    assert torch.allclose(smooth_one_hot(labels, 7, eps), mixup_target(labels, 7, lam=1.0, smoothing=eps))


def test_bce_base_matches_timm_binary_cross_entropy() -> None:
    g = torch.Generator().manual_seed(4)
    logits, labels = torch.randn(6, 7, generator=g) * 2, torch.randint(0, 7, (6,), generator=g)
    dense = torch.softmax(torch.randn(6, 7, generator=g), -1)
    dense[:, :3] = 0.0  # some absent classes, as after mixing two labels without smoothing

    def ours(targets: torch.Tensor, **kw) -> float:
        return float(distillation_loss(logits, targets, None, DistillLossConfig(kind="none", base="bce", **kw)).base)

    assert close(ours(labels, label_smoothing=0.1), float(BinaryCrossEntropy(smoothing=0.1)(logits, labels)))
    assert close(ours(dense), float(BinaryCrossEntropy(smoothing=0.1)(logits, dense)))  # dense: used as given
    thresholded = float(BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)(logits, dense))
    assert close(ours(dense, bce_target_threshold=0.0), thresholded)
    # DeiT III's own recipe: torch BCEWithLogitsLoss on targets.gt(0.0).
    deit3 = torch.nn.BCEWithLogitsLoss()(logits, dense.gt(0.0).type(dense.dtype))
    assert close(ours(dense, bce_target_threshold=0.0), float(deit3))


def _tiny_deit(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(5)
    return timm.create_model(
        "deit_tiny_distilled_patch16_224",
        pretrained=False,
        img_size=32,
        embed_dim=24,
        depth=1,
        num_heads=2,
        num_classes=num_classes,
    )


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_matches_timm_token_distillation_task(kind: str) -> None:
    """timm/task/token_distillation.py TokenDistillationTask.forward, driven end to end.

    Student: a real (tiny, random-init) timm distilled DeiT; teacher: a real linear classifier (no
    pretrained_cfg, so timm assumes ImageNet mean/std, the same as DeiT's, and feeds it the student's
    input unchanged). Batch mixed by timm's Mixup with smoothing 0.1; timm's task uses
    SoftTargetCrossEntropy for the class head. Weights: task_loss_weight alone -> timm's complementary
    mode (task w, distill 1 - w), i.e. eq. 2 with lambda = 0.1 and eq. 3 with 1/2, 1/2.
    """
    c = 5
    student = _tiny_deit(c)
    torch.manual_seed(6)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, c))
    with torch.no_grad():
        teacher[1].weight.mul_(20.0)  # spread the teacher's logits so its argmax/probabilities vary
    task_weight = 0.9 if kind == "soft" else 0.5
    task = TokenDistillationTask(
        student_model=student,
        teacher_model=teacher,
        criterion=SoftTargetCrossEntropy(),
        distill_type=kind,
        task_loss_weight=task_weight,
        temperature=3.0,
        verbose=False,
    )
    task.train()
    np.random.seed(1)
    torch.manual_seed(1)
    x, y = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=c)(
        torch.randn(6, 3, 32, 32), torch.randint(0, c, (6,))
    )
    out = task(x, y)

    student_out = student(x)  # training + distilled mode: (cls_logits, dist_logits)
    assert isinstance(student_out, tuple) and len(student_out) == 2
    with torch.no_grad():
        teacher_logits = teacher(x)
    assert len(set(teacher_logits.argmax(-1).tolist())) > 1
    cfg = DistillLossConfig(kind=kind, tau=3.0, alpha=0.1, soft_normalization="batch")
    ours = distillation_loss(student_out, y, teacher_logits, cfg)
    assert close(ours.base, float(out["task_loss"].detach()))
    assert close(ours.distill, float(out["distill_loss"].detach()))
    assert close(ours.total, float(out["loss"].detach()))
    assert ours.distill > 0


def test_none_mean_logits_matches_timm_undistilled_forward() -> None:
    """kind none on the (cls, dist) tuple == base loss of what timm returns with distilled training off."""
    student = _tiny_deit(5)
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    student.train()
    student.set_distilled_training(False)
    averaged = student(x)
    assert isinstance(averaged, torch.Tensor)
    student.set_distilled_training(True)
    pair = student(x)
    cfg = DistillLossConfig(kind="none")
    assert close(
        distillation_loss(pair, labels, None, cfg).total,
        float(distillation_loss(averaged, labels, None, cfg).total.detach()),
    )


# ----------------------------------------------------------------------------------------------------
# Joint classifier, top-k
# ----------------------------------------------------------------------------------------------------


def test_fuse_heads_is_softmax_sum() -> None:
    a, b = t([[3.0, 0.0, 0.0]]), t([[-3.0, 0.5, 0.0]])
    fused = fuse_heads(a, b)
    expected = np_softmax(a.numpy()) + np_softmax(b.numpy())
    assert np.allclose(fused.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert np.allclose(fused.sum(-1).numpy(), 2.0)
    # Late fusion of probabilities is not the mean of logits (timm's eval output): here they disagree.
    assert fused.argmax(-1).item() == 0
    assert ((a + b) / 2).argmax(-1).item() == 1
    # Works from bf16 logits, returns fp32.
    assert fuse_heads(a.bfloat16(), b.bfloat16()).dtype == torch.float32


def test_topk_accuracy_constructed_case() -> None:
    logits = t(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
            [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # label 5: 5th best -> top-5 hit only
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: worst -> miss at 5
            [0.0, 0.9, 0.1, 0.0, 0.0, 0.0],  # label 2: 2nd best -> top-5 hit only
        ]
    )
    labels = torch.tensor([0, 5, 0, 2])
    acc = topk_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc == {1: 25.0, 2: 50.0, 5: 75.0}
    assert [float(v) for v in timm_accuracy(logits, labels, topk=(1, 2, 5))] == [25.0, 50.0, 75.0]
    # k beyond the number of classes is clamped (timm does the same): top-5 of 3 classes is 100%.
    assert topk_accuracy(t(Z_CLS), torch.tensor([2, 0]), ks=(1, 5)) == {1: 0.0, 5: 100.0}
    # Reporting the three classifiers of the paper's Table 3.
    zc, zd = t(Z_CLS), t(Z_DIST)
    labels2 = torch.tensor([0, 1])
    assert topk_accuracy(zc, labels2, ks=(1,)) == {1: 50.0}  # argmax [0, 2]
    assert topk_accuracy(zd, labels2, ks=(1,)) == {1: 100.0}  # argmax [0, 1]
    assert topk_accuracy(fuse_heads(zc, zd), labels2, ks=(1,)) == {1: 100.0}


# ----------------------------------------------------------------------------------------------------
# API details
# ----------------------------------------------------------------------------------------------------


def test_config_validation_and_weights() -> None:
    assert DistillLossConfig(kind="soft", alpha=0.1).weights == (0.9, 0.1)
    assert DistillLossConfig(kind="hard").weights == (0.5, 0.5)
    assert DistillLossConfig(kind="none").weights == (1.0, 0.0)
    for bad in (
        {"kind": "medium"},
        {"soft_normalization": "mean"},
        {"base": "focal"},
        {"tau": 0.0},
        {"alpha": 1.5},
        {"label_smoothing": 1.0},
        {"two_head_base": "dist"},
    ):
        with pytest.raises(ValueError):
            DistillLossConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DistillLossConfig().tau = 1.0  # type: ignore[misc]


def test_argument_errors() -> None:
    zc, labels = t(Z_CLS), torch.tensor(LABELS)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distillation_loss(zc, labels, None, DistillLossConfig(kind="soft"))
    with pytest.raises(ValueError, match="no teacher_logits"):
        distillation_loss(zc, labels, t(Z_TEACHER), DistillLossConfig(kind="none"))
    with pytest.raises(ValueError):
        distillation_loss(zc, labels, torch.zeros(2, 4), DistillLossConfig(kind="hard"))
    with pytest.raises(ValueError):
        distillation_loss(zc, torch.zeros(2, 4), None, DistillLossConfig())  # soft targets of the wrong width
    with pytest.raises(TypeError):
        distillation_loss((zc, zc, zc), labels, None, DistillLossConfig())  # type: ignore[arg-type]


def test_module_wrapper_and_logging() -> None:
    module = DistillationLoss(DistillLossConfig(kind="hard"))
    terms = module((t(Z_CLS), t(Z_DIST)), t(Y_MIXED), t(Z_TEACHER))
    assert isinstance(terms, LossTerms)
    logged = terms.detached()
    assert set(logged) == {"loss", "loss_base", "loss_distill"}
    assert logged["loss"] == pytest.approx(0.5 * logged["loss_base"] + 0.5 * logged["loss_distill"], rel=1e-6)
    assert "hard" in repr(module)
