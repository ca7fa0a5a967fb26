"""DeiT's training losses: base (true-label) term, soft / hard distillation term, joint-classifier fusion.

References used throughout (cited by short name in comments):

* [DeiT] Touvron et al., "Training data-efficient image transformers & distillation through attention",
  ICML 2021, sec. 4 (eq. 2 soft distillation, eq. 3 hard-label distillation, label smoothing note,
  distillation token, joint classifiers) and sec. 6 (tau=3.0, lambda=0.1).
* [DeiT-code] facebookresearch/deit ``losses.py`` ``DistillationLoss`` (the reference implementation) and
  ``engine.py`` (``targets.gt(0.0)`` before ``BCEWithLogitsLoss`` when ``--bce-loss`` is set, DeiT III).
* [timm] timm 1.0.31: ``timm/task/token_distillation.py`` ``TokenDistillationTask.forward``,
  ``timm/loss/cross_entropy.py`` ``SoftTargetCrossEntropy`` / ``LabelSmoothingCrossEntropy``,
  ``timm/loss/binary_cross_entropy.py`` ``BinaryCrossEntropy``, ``timm/data/mixup.py`` ``mixup_target``,
  ``timm/models/deit.py`` ``VisionTransformerDistilled.forward_head``.
* [CaiT] Touvron et al., "Going deeper with Image Transformers", ICCV 2021 (hard distillation, one head).

What the trainer passes in:

* ``student_out``: one logits tensor ``[B, C]`` (CaiT, plain ViT/DeiT, or a distilled DeiT that is not in
  distilled-training mode, for which timm returns the mean of its two heads' logits), or the tuple
  ``(cls_logits, dist_logits)`` that timm's ``VisionTransformerDistilled`` returns in training mode after
  ``set_distilled_training(True)``.
* ``targets``: either dense ``[B, C]`` soft targets that are already Mixup/CutMix-mixed and
  label-smoothed on the batch (timm ``Mixup(label_smoothing=...)``), used as given; or integer labels
  ``[B]``, which are one-hot encoded here with ``cfg.label_smoothing``.
* ``teacher_logits``: ``[B, C]`` teacher logits for the same (mixed) images the student saw ([DeiT] feeds
  the mixed batch to the teacher), or ``None`` for ``kind="none"``. They never receive a gradient.

All loss math runs in fp32 with autocast disabled: under bf16 autocast the logits arrive in bf16, and a
log-softmax / KL over 1000 classes in bf16 (8 mantissa bits) loses most of the signal of small
probabilities. The inputs are cast with ``.float()``; gradients flow back through the cast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DistillLossConfig",
    "LossTerms",
    "DistillationLoss",
    "distillation_loss",
    "soft_distillation_term",
    "hard_distillation_term",
    "smooth_one_hot",
    "fuse_heads",
    "topk_accuracy",
]

DistillKind = Literal["none", "soft", "hard"]
SoftNormalization = Literal["batch", "batch_classes"]
BaseLoss = Literal["ce", "bce"]
TwoHeadBase = Literal["mean_logits", "mean_loss", "cls"]
StudentOut = Tensor | tuple[Tensor, Tensor]


@dataclass(frozen=True)
class DistillLossConfig:
    """How the training loss is built; one immutable value so it can be logged with the run.

    Attributes:
        kind: ``"none"`` (true labels only), ``"soft"`` ([DeiT] eq. 2) or ``"hard"`` ([DeiT] eq. 3).
        tau: soft-distillation temperature; [DeiT] sec. 6 uses 3.0 (or 1.0).
        alpha: the lambda of eq. 2, weight of the KL term (the CE term gets ``1 - alpha``); [DeiT] sec. 6
            uses 0.1. Only used by ``kind="soft"``.
        hard_weights: ``(w_base, w_distill)`` of eq. 3, ``(1/2, 1/2)`` in [DeiT] ([DeiT-code] uses
            ``alpha=0.5`` with ``(1 - alpha, alpha)``, the same numbers). Only used by ``kind="hard"``.
        soft_normalization: how the summed KL is averaged. ``"batch"`` divides by B (the KL of eq. 2 is a
            per-image divergence, averaged over the batch; PyTorch's ``reduction="batchmean"``, which is
            what [timm] ``TokenDistillationTask`` does). ``"batch_classes"`` divides by B*C, what
            [DeiT-code] does (``... reduction='sum' ...) * T*T / outputs_kd.numel()``): it equals
            ``"batch"`` divided by C, i.e. an effective lambda of ``alpha / C`` (1e-4 for ImageNet-1k).
            Default ``"batch"``: it is the paper's formula, timm's, and the normalization under which
            the tau^2 factor (Hinton et al. 2015) keeps the KL gradient on the scale of the CE gradient,
            so lambda=0.1 means what it says. Choose ``"batch_classes"`` to reproduce the reference
            repository's numbers exactly.
        label_smoothing: epsilon applied to *integer* labels only ([DeiT]: 0.1 "in all experiments that
            use true labels"); dense targets are assumed smoothed upstream by Mixup. Never applied to
            the teacher's hard labels ([DeiT]: "we do not smooth pseudo-labels provided by the teacher").
            Set 0.0 for DeiT III's BCE recipe, which does not smooth.
        base: ``"ce"`` (soft-target cross-entropy, [DeiT]) or ``"bce"`` (binary cross-entropy on the
            mixed targets, DeiT III; see :func:`_bce_base`).
        bce_target_threshold: with ``base="bce"``, binarize dense targets to ``target > threshold``
            before the BCE. DeiT III ([DeiT-code] ``engine.py``) uses 0.0, i.e. every class present in the
            mix is a positive; that only makes sense with ``label_smoothing=0`` in Mixup (with smoothing
            every entry is > 0). ``None`` keeps the targets soft (timm ``BinaryCrossEntropy`` default).
        two_head_base: how the base term treats a ``(cls, dist)`` tuple when ``kind="none"`` (no teacher).
            ``"mean_logits"`` (default): CE of the mean of the two heads' logits, exactly what timm trains
            when distilled training is off (``forward_head`` returns ``(x + x_dist) / 2``), so passing
            the tuple or timm's averaged tensor gives the same loss. ``"mean_loss"``: mean of the two
            heads' CE. ``"cls"``: class head only, what [DeiT-code] does (its ``'none'`` path computes
            the base criterion on ``outputs[0]`` and returns; the distillation head gets no gradient).
    """

    kind: DistillKind = "none"
    tau: float = 3.0
    alpha: float = 0.1
    hard_weights: tuple[float, float] = (0.5, 0.5)
    soft_normalization: SoftNormalization = "batch"
    label_smoothing: float = 0.1
    base: BaseLoss = "ce"
    bce_target_threshold: float | None = None
    two_head_base: TwoHeadBase = "mean_logits"

    def __post_init__(self) -> None:
        if self.kind not in ("none", "soft", "hard"):
            raise ValueError(f"kind must be 'none', 'soft' or 'hard', not {self.kind!r}")
        if self.soft_normalization not in ("batch", "batch_classes"):
            raise ValueError(f"soft_normalization must be 'batch' or 'batch_classes', not {self.soft_normalization!r}")
        if self.base not in ("ce", "bce"):
            raise ValueError(f"base must be 'ce' or 'bce', not {self.base!r}")
        if self.two_head_base not in ("mean_logits", "mean_loss", "cls"):
            raise ValueError(f"two_head_base must be 'mean_logits', 'mean_loss' or 'cls', not {self.two_head_base!r}")
        if not (self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"tau must be a positive finite number, not {self.tau}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha (lambda) must be in [0, 1], not {self.alpha}")
        if len(self.hard_weights) != 2 or any(w < 0 for w in self.hard_weights):
            raise ValueError(f"hard_weights must be two non-negative numbers, not {self.hard_weights}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")

    @property
    def weights(self) -> tuple[float, float]:
        """``(w_base, w_distill)`` such that ``total = w_base * base + w_distill * distill``."""
        if self.kind == "soft":
            return 1.0 - self.alpha, self.alpha
        if self.kind == "hard":
            return float(self.hard_weights[0]), float(self.hard_weights[1])
        return 1.0, 0.0


@dataclass(frozen=True)
class LossTerms:
    """The training loss and its two unweighted parts, for logging.

    ``total = w_base * base + w_distill * distill`` with ``cfg.weights``. ``distill`` already contains
    the tau^2 factor of eq. 2 for soft distillation (as [DeiT-code] and [timm] log it); it is a zero
    scalar for ``kind="none"``. All three are fp32 scalars; only ``total`` is meant for ``backward()``.
    """

    total: Tensor
    base: Tensor
    distill: Tensor

    def detached(self) -> dict[str, float]:
        """Python floats for a metrics logger (one device sync per call)."""
        values = torch.stack([self.total.detach(), self.base.detach(), self.distill.detach()]).tolist()
        return {"loss": values[0], "loss_base": values[1], "loss_distill": values[2]}


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Integer labels ``[B]`` -> fp32 targets ``[B, C]`` with label smoothing ``smoothing``.

    Convention of timm (``mixup_target``, ``LabelSmoothingCrossEntropy``, ``BinaryCrossEntropy``) and
    ``F.cross_entropy(label_smoothing=...)``, which is what DeiT trained with: the target is
    ``(1 - eps) * one_hot + eps / C``, i.e. ``eps / C`` on every class and ``1 - eps + eps / C`` on the
    true one. (The paper's wording, "the remaining eps is shared across the remaining classes", would be
    ``eps / (C - 1)`` off-target; we follow the code that produced the paper's numbers.)
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
        raise ValueError(f"expected integer labels of shape [B], got {labels.dtype} {tuple(labels.shape)}")
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    target = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), on)


def _as_dense_targets(targets: Tensor, logits: Tensor, smoothing: float) -> Tensor:
    """Dense fp32 ``[B, C]`` targets from either integer labels (smoothed here) or mixed soft targets."""
    batch, num_classes = logits.shape
    if targets.dtype.is_floating_point:
        if targets.shape != (batch, num_classes):
            raise ValueError(f"soft targets must be [B, C] = {(batch, num_classes)}, got {tuple(targets.shape)}")
        # Already mixed and smoothed by Mixup on the batch: used as given (timm SoftTargetCrossEntropy).
        return targets.float()
    if targets.shape != (batch,):
        raise ValueError(f"integer labels must be [B] = {(batch,)}, got {tuple(targets.shape)}")
    return smooth_one_hot(targets, num_classes, smoothing)


def _soft_target_ce(logits: Tensor, target: Tensor) -> Tensor:
    """mean_b sum_c -y_bc log softmax(z_b)_c, timm ``SoftTargetCrossEntropy`` (fp32 inputs)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def _bce_base(logits: Tensor, target: Tensor, threshold: float | None) -> Tensor:
    """Binary cross-entropy on dense targets, mean over all B*C entries (DeiT III / timm BCE).

    DeiT III ([DeiT-code] ``main.py``/``engine.py``): ``BCEWithLogitsLoss()`` (mean reduction over
    elements) on the Mixup/CutMix targets, binarized with ``targets.gt(0.0)``. timm's
    ``BinaryCrossEntropy``: integer labels are one-hot encoded with ``off = eps / C``,
    ``on = 1 - eps + eps / C`` (our :func:`smooth_one_hot`), dense targets are used as given, then an
    optional ``target_threshold`` binarizes them. Both are reproduced here.
    """
    if threshold is not None:
        target = target.gt(threshold).to(target.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="mean")


def soft_distillation_term(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tau: float,
    normalization: SoftNormalization = "batch",
) -> Tensor:
    """tau^2 * KL(p_t || p_s) with p = softmax(logits / tau), averaged per ``normalization``.

    Direction: eq. 2 writes ``KL(psi(Z_s/tau), psi(Z_t/tau))`` as a list of arguments; what DeiT computes
    ([DeiT-code], and [timm] identically) is ``F.kl_div(log_softmax(s/T), log_softmax(t/T),
    log_target=True)``, and ``F.kl_div(input, target)`` is ``sum target * (log target - input)``, i.e.
    ``KL(teacher || student) = sum_c p_t,c (log p_t,c - log p_s,c)``: the teacher's distribution is the
    reference, as in Hinton et al. (the usual cross-entropy to the teacher, minus the teacher's
    entropy, which is constant for the student). We compute exactly that. Working with log-probabilities
    on both sides (``log_target=True``) avoids ``0 * log 0`` when a teacher probability underflows.

    The tau^2 factor (Hinton et al. 2015) compensates the 1/tau^2 scaling of the soft-target gradients.
    """
    _check_pair(student_logits, teacher_logits)
    if normalization not in ("batch", "batch_classes"):
        raise ValueError(f"normalization must be 'batch' or 'batch_classes', not {normalization!r}")
    with _fp32_region(student_logits):
        s = student_logits.float()
        t = teacher_logits.detach().float()  # the teacher is a fixed target: no gradient, ever
        log_p_s = F.log_softmax(s / tau, dim=-1)
        log_p_t = F.log_softmax(t / tau, dim=-1)
        kl_sum = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        # "batch": sum / B == reduction="batchmean" ([DeiT] eq. 2, [timm]); "batch_classes": sum / (B*C),
        # the reference code's ``/ outputs_kd.numel()``. Same sum, so their ratio is C.
        denom = s.shape[0] if normalization == "batch" else s.numel()
        return kl_sum * (tau * tau) / denom


def hard_distillation_term(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """CE(student, argmax_c teacher) averaged over the batch ([DeiT] eq. 3, second term).

    The teacher's decision ``y_t = argmax_c Z_t(c)`` is used as a plain one-hot label: no label smoothing
    ([DeiT] sec. 4: "we do not smooth pseudo-labels provided by the teacher"), as in [DeiT-code] and
    [timm] (``F.cross_entropy(outputs_kd, teacher.argmax(dim=1))``).
    """
    _check_pair(student_logits, teacher_logits)
    with _fp32_region(student_logits):
        teacher_labels = teacher_logits.detach().float().argmax(dim=-1)
        return F.cross_entropy(student_logits.float(), teacher_labels, label_smoothing=0.0)


def _fp32_region(like: Tensor) -> torch.autocast:
    """A region with autocast off on ``like``'s device type, so fp32 inputs stay fp32 inside it."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher logits must both be [B, C], got "
            f"{tuple(student_logits.shape)} / {tuple(teacher_logits.shape)}"
        )


def _split_heads(student_out: StudentOut | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """``(cls_logits, dist_logits or None)`` from a tensor or timm's ``(x, x_dist)`` training tuple."""
    if isinstance(student_out, Tensor):
        return student_out, None
    if isinstance(student_out, (tuple, list)) and len(student_out) == 2:
        cls_logits, dist_logits = student_out
        if cls_logits.shape != dist_logits.shape:
            raise ValueError(
                f"the two heads' logits differ in shape: {tuple(cls_logits.shape)} / {tuple(dist_logits.shape)}"
            )
        return cls_logits, dist_logits
    raise TypeError(
        f"student_out must be a tensor or a (cls_logits, dist_logits) pair, got {type(student_out).__name__}"
    )


def distillation_loss(
    student_out: StudentOut,
    targets: Tensor,
    teacher_logits: Tensor | None,
    cfg: DistillLossConfig,
) -> LossTerms:
    """DeiT's training objective, with the term routing of the distillation token.

    * ``kind="none"``: base term only. One head: base(logits, y). Two heads: see ``cfg.two_head_base``
      (default: base of the mean of the two heads' logits, what timm trains without distillation).
    * ``kind="soft"`` ([DeiT] eq. 2): ``(1 - lambda) * base(z_cls, y) + lambda * tau^2 * KL(p_t || p_dist)``.
    * ``kind="hard"`` ([DeiT] eq. 3): ``1/2 * base(z_cls, y) + 1/2 * CE(z_dist, argmax z_t)``.

    Routing: with DeiT's distillation token (tuple output) the class head takes the true-label term and
    the distillation head the teacher term ([DeiT] sec. 4 "Distillation token", [DeiT-code], [timm]);
    with a single head the same logits take both terms. That is the CaiT case: [CaiT] sec. 4 adopts "the
    simple hard distillation" of [DeiT] and describes no distillation token, and timm's ``Cait`` has one
    classifier only.

    ``base`` is the soft-target CE (timm ``SoftTargetCrossEntropy``) or, with ``cfg.base="bce"``, the
    DeiT III binary cross-entropy; integer labels are smoothed with ``cfg.label_smoothing`` first.
    The teacher term is the same for both bases ([DeiT-code] keeps KL / CE-to-argmax with BCE).
    """
    cls_logits, dist_logits = _split_heads(student_out)
    if cls_logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got {tuple(cls_logits.shape)}")
    if cfg.kind == "none":
        if teacher_logits is not None:
            raise ValueError("kind='none' takes no teacher_logits (was a teacher run by mistake?)")
    else:
        if teacher_logits is None:
            raise ValueError(f"kind={cfg.kind!r} needs teacher_logits")
        if teacher_logits.shape != cls_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} != student logits {tuple(cls_logits.shape)}"
            )

    # fp32 math regardless of the caller's autocast region (see the module docstring).
    with _fp32_region(cls_logits):
        z_cls = cls_logits.float()
        z_dist = dist_logits.float() if dist_logits is not None else None
        target = _as_dense_targets(targets, z_cls, cfg.label_smoothing)

        def base_of(z: Tensor) -> Tensor:
            if cfg.base == "bce":
                return _bce_base(z, target, cfg.bce_target_threshold)
            return _soft_target_ce(z, target)

        if cfg.kind == "none":
            if z_dist is None or cfg.two_head_base == "cls":
                base = base_of(z_cls)
            elif cfg.two_head_base == "mean_logits":
                base = base_of((z_cls + z_dist) / 2)
            else:  # "mean_loss"
                base = (base_of(z_cls) + base_of(z_dist)) / 2
            distill = z_cls.new_zeros(())
        else:
            assert teacher_logits is not None
            base = base_of(z_cls)
            z_kd = z_dist if z_dist is not None else z_cls  # single head (CaiT): same head takes both terms
            if cfg.kind == "soft":
                distill = soft_distillation_term(z_kd, teacher_logits, cfg.tau, cfg.soft_normalization)
            else:
                distill = hard_distillation_term(z_kd, teacher_logits)

        w_base, w_distill = cfg.weights
        total = w_base * base + w_distill * distill if cfg.kind != "none" else base
    return LossTerms(total=total, base=base, distill=distill)


class DistillationLoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`distillation_loss` holding its config (no parameters, no teacher).

    The teacher is run by the trainer (or read from the teacher cache) on the same mixed batch; this
    module only combines logits, so it is cheap to construct and has nothing to checkpoint.
    """

    def __init__(self, cfg: DistillLossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, student_out: StudentOut, targets: Tensor, teacher_logits: Tensor | None = None) -> LossTerms:
        return distillation_loss(student_out, targets, teacher_logits, self.cfg)

    def extra_repr(self) -> str:
        return repr(self.cfg)


@torch.no_grad()
def fuse_heads(cls_logits: Tensor, dist_logits: Tensor) -> Tensor:
    """Joint classifier of [DeiT] sec. 4: ``softmax(z_cls) + softmax(z_dist)`` (fp32, ``[B, C]``).

    "We add the softmax output by the two classifiers to make the prediction" (late fusion). The sum lies
    in [0, 2]; its argmax / top-k is the prediction (divide by 2 for probabilities). Note timm's
    ``VisionTransformerDistilled`` in eval mode averages *logits* instead, which can rank classes
    differently; use this function to report the paper's "class+distil." number.
    """
    if cls_logits.shape != dist_logits.shape:
        raise ValueError(f"heads differ in shape: {tuple(cls_logits.shape)} / {tuple(dist_logits.shape)}")
    with _fp32_region(cls_logits):
        return F.softmax(cls_logits.float(), dim=-1) + F.softmax(dist_logits.float(), dim=-1)


@torch.no_grad()
def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Top-k accuracy in percent for each k, e.g. ``{1: 75.0, 5: 100.0}``.

    A sample counts as correct at k if its label is among the k highest scores. ``k`` larger than the
    number of classes is clamped to it (as timm ``accuracy`` does), so top-5 on a 3-class set is 100%.
    Works on logits, probabilities or :func:`fuse_heads` output alike (only the ranking matters).
    Ties between scores are broken by ``torch.topk``'s order.
    """
    if labels.dtype.is_floating_point or labels.dim() != 1 or logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            "expected logits [B, C] and integer labels [B], got "
            f"{tuple(logits.shape)} / {labels.dtype} {tuple(labels.shape)}"
        )
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    batch, num_classes = logits.shape
    if batch == 0:
        return {k: 0.0 for k in ks}
    maxk = min(max(ks), num_classes)
    top = logits.float().topk(maxk, dim=-1).indices  # [B, maxk], best first
    hit = top.eq(labels.view(-1, 1).to(top.device))  # at most one True per row
    return {k: hit[:, : min(k, num_classes)].any(dim=-1).float().mean().item() * 100.0 for k in ks}
