"""DALI's stock ``rand_augment``, timed on the same uint8 views as `pipeline.randaugment`: a baseline.

Issue 3 asks for timm's ``rand-m9-mstd0.5-inc1`` built from DALI's ``auto_aug`` pieces where the stock
op differs. The stock op *is* those pieces (``auto_aug.rand_augment`` selects among its ``augmentations``
with DALI conditionals), with fewer semantics to honour: a fixed magnitude bin (no ``mstd``), no 0.5
probability per op, no ``inc1`` op set. A variant with timm's semantics adds per-sample magnitude draws
and a coin per op to that graph, so its rate can only be at or below the stock op's. If the stock op is
slower than our batched torch RandAugment on the same device, no ``auto_aug`` build can be faster, and
that is the measurement this function supplies (``pipeline.randaugment.bench`` and ``trainer.bench_gpu``
print it beside ours).

Settings: ``n=2``, ``m=9`` of ``num_magnitude_bins=11`` (magnitude 9 of 10, as timm's ``m9``), DALI's
default op set, views given as a dense NHWC batch already in memory on the device (host numpy on a CPU,
a CUDA tensor on a GPU), so only the augmentation is timed.
"""

from __future__ import annotations

import time
import warnings

import numpy as np


def stock_rand_augment(views_nhwc, device_id: int | None, threads: int, seed: int = 0):
    """A built DALI pipeline whose ``run()`` returns ``(augmented,)``: DALI's
    ``auto_aug.rand_augment(n=2, m=9, num_magnitude_bins=11)`` on ``views_nhwc`` ([N, H, W, 3] uint8:
    numpy for ``device_id=None``, a CUDA torch tensor otherwise), the same views every run."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.auto_aug import rand_augment

    n, height, width, channels = views_nhwc.shape
    if channels != 3:
        raise ValueError(f"views must be NHWC with 3 channels, got shape {tuple(views_nhwc.shape)}")
    on_gpu = device_id is not None
    batch = views_nhwc if on_gpu else np.ascontiguousarray(views_nhwc)

    @pipeline_def(batch_size=n, num_threads=threads, device_id=device_id, enable_conditionals=True, seed=seed,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def graph():
        x = fn.external_source(source=lambda: batch, batch=True, layout="HWC", device="gpu" if on_gpu else "cpu",
                               no_copy=on_gpu)
        return rand_augment.rand_augment(x, n=2, m=9, num_magnitude_bins=11, shape=[height, width])

    with warnings.catch_warnings():  # auto_aug itself still calls fn.experimental.equalize (DALI 2.4)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="nvidia.dali")
        pipe = graph()
        pipe.build()
    return pipe


def stock_rand_augment_rate(views_nhwc, device_id: int | None, threads: int, repeats: int = 3,
                            seed: int = 0) -> float:
    """Images/s of `stock_rand_augment` on ``views_nhwc``, after one warm-up run."""
    pipe = stock_rand_augment(views_nhwc, device_id, threads, seed)
    pipe.run()  # warm-up: first allocations
    started = time.perf_counter()
    for _ in range(repeats):
        pipe.run()  # no stream given: host-synchronous outputs, so the last run's kernels are done at its return
    rate = len(views_nhwc) * repeats / (time.perf_counter() - started)
    del pipe
    return rate
