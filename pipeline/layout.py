"""Memory layouts of image batches: NCHW tensors whose memory may be NHWC (``channels_last``, the layout
DALI hands views over in). Batch-level ops move whole images as rows of that memory."""

from __future__ import annotations

import torch

__all__ = ["is_channels_last", "image_major"]


def is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D NCHW view of NHWC memory (not for a contiguous NCHW tensor)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def image_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the image dim first over contiguous memory: the NHWC view of a channels_last tensor,
    else ``x`` contiguous, so that ``.reshape(len(x), -1)`` is one row per image without a copy."""
    return x.permute(0, 2, 3, 1) if is_channels_last(x) else x.contiguous()
