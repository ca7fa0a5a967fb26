"""Compact logit maps and pooling them over a view's crop box.

A map [C, h, w] is stored per location as its top-k logits (float16 values, int16 classes) plus a
*floor*: the mean of the other C - k logits. Decoding gives, per location, the top-k logits exactly and
the floor for every other class; for hard distillation (argmax) that is lossless in practice, and for
soft distillation it keeps the mass of the tail.

A view with relative box (y0, x0, y1, x1) is scored as the overlap-weighted mean of the map's cells (the
map covers the whole image resized to R x R, so cell (i, j) covers [i/h, (i+1)/h] x [j/w, (j+1)/w]). A
horizontal flip changes nothing: the teacher is trained with flips, so its output on a mirrored crop is
taken to be its output on the crop. A Mixup/CutMix of views a and b is scored lam * a + (1 - lam) * b.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class EncodedMaps:
    """n images' maps: indices int16 [n, cells, k], values float16 [n, cells, k], floor float16 [n, cells];
    cells: the h*w locations of a map, or a replay cache's views (then h = w = 1)."""

    indices: np.ndarray
    values: np.ndarray
    floor: np.ndarray
    height: int
    width: int

    @property
    def bytes_per_image(self) -> int:
        return (self.indices[0].nbytes + self.values[0].nbytes + self.floor[0].nbytes) if len(self.indices) else 0


def encode(maps: torch.Tensor, k: int) -> EncodedMaps:
    """[n, C, h, w] float logit maps -> top-k per location + floor."""
    return copy_to_host(encode_on_device(maps, k))()


def encode_on_device(maps: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """:func:`encode` without the copy to host: (indices int16, values fp16, floor fp16, h, w) on the maps'
    device, so that a build can queue the next batch before it waits for this one (:func:`copy_to_host`)."""
    n, classes, height, width = maps.shape
    if classes > 32767:
        raise ValueError(f"{classes} classes do not fit int16 class indices")
    flat = maps.float().permute(0, 2, 3, 1).reshape(n, height * width, classes)
    values, indices = flat.topk(min(k, classes), dim=-1)
    rest = classes - values.shape[-1]
    floor = (flat.sum(-1) - values.sum(-1)) / rest if rest else values[..., -1]
    return indices.to(torch.int16), values.half(), floor.half(), height, width


def copy_to_host(encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]) -> Callable[[], EncodedMaps]:
    """Start the copy of :func:`encode_on_device`'s tensors to the host; the returned function waits for
    it and gives the maps. On a GPU: non-blocking copies into pinned memory and an event, so the host
    waits for this batch only, not for work queued after it (a blocking ``.cpu()`` would wait for all)."""
    *tensors, height, width = encoded
    if tensors[0].device.type != "cuda":
        return lambda: EncodedMaps(*(t.numpy() for t in tensors), height, width)
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for target, source in zip(host, tensors, strict=True):
        target.copy_(source, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensors[0].device))  # the stream the copies were queued on

    def wait() -> EncodedMaps:
        done.synchronize()
        return EncodedMaps(*(t.numpy() for t in host), height, width)

    return wait


def box_weights(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Relative boxes [B, 4] (y0, x0, y1, x1) -> overlap weights of the map's cells [B, h*w], summing to 1."""
    def overlap(lo: torch.Tensor, hi: torch.Tensor, cells: int) -> torch.Tensor:
        edges = torch.arange(cells + 1, device=boxes.device, dtype=torch.float32) / cells
        return (torch.minimum(hi[:, None], edges[None, 1:]) - torch.maximum(lo[:, None], edges[None, :-1])).clamp(min=0)

    wy = overlap(boxes[:, 0], boxes[:, 2], height)
    wx = overlap(boxes[:, 1], boxes[:, 3], width)
    weights = (wy[:, :, None] * wx[:, None, :]).reshape(len(boxes), height * width)
    return weights / weights.sum(1, keepdim=True).clamp(min=1e-12)


def pooled_logits(indices: torch.Tensor, values: torch.Tensor, floor: torch.Tensor, weights: torch.Tensor,
                  classes: int) -> torch.Tensor:
    """Decode and pool: indices [B, L, k] int, values [B, L, k], floor [B, L], weights [B, L] -> [B, C]."""
    values, floor = values.float(), floor.float()
    base = (weights * floor).sum(1, keepdim=True).expand(-1, classes).contiguous()
    delta = weights[:, :, None] * (values - floor[:, :, None])
    return base.scatter_add_(1, indices.long().reshape(len(indices), -1), delta.reshape(len(indices), -1))


def mixed(logits: torch.Tensor, lam: float) -> torch.Tensor:
    """Scores of the views mixed as the batch was: view i with view N-1-i (timm's batch mode)."""
    if lam == 1.0:
        return logits
    return logits * lam + logits.flip(0) * (1.0 - lam)
