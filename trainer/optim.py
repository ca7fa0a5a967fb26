"""Optimizer, learning-rate schedule, gradient clipping and EMA for one training run.

* **Optimizer:** timm's ``create_optimizer_v2`` (AdamW, LAMB or SGD), with timm's no-weight-decay rule
  (``filter_bias_and_bn``): 1-D parameters (norm weights, biases, LayerScale gammas) and the model's
  ``no_weight_decay()`` set (``pos_embed``, ``cls_token``, ``dist_token``) get no weight decay, as in
  DeiT's ``main.py``. AdamW is fused on CUDA (one kernel for all parameters).
* **Peak learning rate:** ``OptimConfig.peak_lr`` of the *effective* global batch, i.e. after the loader
  rounded each rank's batch down to whole groups of repeated views (``pipeline.loader.effective_batch``):
  DeiT's rule "lr / 512 x batchsize" applied to the batch that is really trained on.
* **Schedule:** :func:`lr_at`, a pure function of the step: linear warmup from ``warmup_lr``, then
  cosine to ``min_lr`` (or constant), the same curve as timm's ``CosineLRScheduler`` (``warmup_prefix=
  False``, one cycle; tested against it), sampled every optimizer step (``schedule.per_step``) or, as
  DeiT's code does, once per epoch. Its only state is the step, which the checkpoint holds.
* **EMA:** timm's ``ModelEmaV3`` with a constant decay (DeiT's ``ModelEma``), when ``ema.enabled``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from trainer.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["LRSchedule", "lr_at", "build_optimizer", "build_schedule", "build_ema", "clip_gradients", "unwrap"]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / ``torch.compile`` wrappers (what checkpoints and EMA hold)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def lr_at(t: float, peak: float, total: float, warmup: float, warmup_lr: float, min_lr: float,
          cosine: bool = True) -> float:
    """Learning rate at time ``t`` (steps or epochs, the same unit as ``total`` and ``warmup``).

    ``t < warmup``: ``warmup_lr + t * (peak - warmup_lr) / warmup`` (linear, starts at ``warmup_lr``).
    Then cosine: ``min_lr + (peak - min_lr) * (1 + cos(pi * t / total)) / 2``, counted from 0 like timm's
    ``CosineLRScheduler(warmup_prefix=False)`` that DeiT uses, and ``min_lr`` from ``t >= total`` on.
    ``cosine=False``: ``peak`` after warmup.
    """
    if t < warmup:
        return warmup_lr + t * (peak - warmup_lr) / warmup
    if not cosine:
        return peak
    if t >= total:
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / total))


@dataclass(frozen=True)
class LRSchedule:
    """The run's learning-rate curve; ``at(step)`` is the rate used by the update of optimizer step ``step``."""

    peak: float
    steps_per_epoch: int
    epochs: int
    warmup_epochs: int
    warmup_lr: float
    min_lr: float
    cosine: bool = True
    per_step: bool = True

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def at(self, step: int) -> float:
        if self.per_step:
            spe = self.steps_per_epoch
            return lr_at(step, self.peak, self.epochs * spe, self.warmup_epochs * spe, self.warmup_lr,
                         self.min_lr, self.cosine)
        # DeiT's code: timm's scheduler stepped once per epoch (a staircase of the same curve)
        return lr_at(step // self.steps_per_epoch, self.peak, self.epochs, self.warmup_epochs, self.warmup_lr,
                     self.min_lr, self.cosine)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every parameter group's rate for ``step`` (times a group's ``lr_scale``); return the rate."""
        lr = self.at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, Any]:
        """JSON-able description (the step lives in the checkpoint next to it)."""
        return asdict(self)


def build_schedule(config: TrainConfig, global_batch: int, steps_per_epoch: int) -> LRSchedule:
    """The schedule of ``config`` at the effective ``global_batch`` (views per optimizer step, all ranks)."""
    s = config.schedule
    peak = config.optim.peak_lr(global_batch)
    # validate() checks min_lr against the nominal batch; rounding (126 of 128 views per GPU at x3) can put
    # the effective peak just under it (DeiT's 384 fine-tune: lr = min_lr = 5e-6), and cosine would rise
    min_lr = min(s.min_lr, peak)
    if min_lr < s.min_lr:
        log.info("schedule.min_lr=%g is above the effective peak lr %g (batch %d): the schedule ends at the peak",
                 s.min_lr, peak, global_batch)
    return LRSchedule(peak=peak, steps_per_epoch=steps_per_epoch, epochs=s.epochs, warmup_epochs=s.warmup_epochs,
                      warmup_lr=s.warmup_lr, min_lr=min_lr, cosine=s.cosine, per_step=s.per_step)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, peak_lr: float,
                    device: torch.device | str = "cpu") -> torch.optim.Optimizer:
    """timm optimizer over the bare ``model``'s parameters, weight-decay groups per timm's rule.

    The rate it is created with is ``peak_lr``; :meth:`LRSchedule.apply` sets the rate of each step.
    """
    from timm.optim import create_optimizer_v2

    o = config.optim
    kwargs: dict[str, Any] = {}
    if o.name in ("adamw", "lamb"):
        kwargs.update(betas=tuple(o.betas), eps=o.eps)
    if o.name == "adamw" and torch.device(device).type == "cuda":
        kwargs["fused"] = True  # one CUDA kernel for the whole update
    return create_optimizer_v2(
        unwrap(model),
        opt=o.name,
        lr=peak_lr,
        weight_decay=o.weight_decay,
        momentum=o.momentum,
        filter_bias_and_bn=o.no_weight_decay_1d_and_tokens,
        **kwargs,
    )


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> torch.Tensor | None:
    """Clip the global gradient norm to ``max_norm`` (None: no clipping); returns the norm before clipping."""
    if max_norm is None:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def build_ema(model: torch.nn.Module, config: TrainConfig) -> Any | None:
    """timm ``ModelEmaV3`` of the bare model with a constant decay, or None when ``ema.enabled`` is off."""
    if not config.ema.enabled:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(unwrap(model), decay=config.ema.decay)
