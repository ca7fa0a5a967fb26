"""Host data to the device without waiting for the device.

On a GPU, ``torch.as_tensor(array, device="cuda")``, ``torch.tensor(..., device="cuda")`` and
``cpu_tensor.to("cuda")`` copy through torch's ``memcpy_and_sync``: the host waits until the stream has
run everything queued before it (the whole last step). A per-step copy of that kind stops the host from
running ahead, so the step's launch time is added to the GPU's. :func:`to_device` copies from pinned
memory with ``non_blocking=True`` (torch's pinned allocator keeps the buffer until the copy is done).
On a CPU it is ``torch.as_tensor``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["to_device"]


def to_device(data: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``data`` (a numpy array, a CPU tensor, numbers) as a tensor on ``device``, without a host wait."""
    device = torch.device(device)
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    if host.device.type != "cpu":
        return host.to(device, non_blocking=True)
    return host.pin_memory().to(device, non_blocking=True)
