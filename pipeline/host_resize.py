"""The resizes of a CPU graph: torch's antialiased resize as a DALI graph node.

DALI's CPU ``fn.resize`` (bicubic, antialiased) is the slowest part of the CPU graph: a scratch timing
on one core, over 240 ImageNet-like JPEGs cut to random resized crops of 224, saw ~1.6 ms per view for
it against ~0.9 ms for decoding the crop, ~1.0 ms for PIL's resize and ~0.22 ms for torch's uint8
antialiased bicubic (``F.interpolate(antialias=True)``, vectorised on the CPU). Torch's filter is PIL's
(bicubic a = -0.5, widened by the scale when it shrinks), so the view stays timm's crop-then-resize.

For the eval transform (shorter side to 256, centre crop 224) the same timing saw ~2.9 ms per image
for DALI against ~0.45 ms for torch.

`host_cut` (the train views, the teacher cache's whole images) and `host_centre` (eval) put that resize
where ``fn.resize`` stood, as a batch ``fn.python_function`` whose images run on a pool of the graph's
thread count (torch releases the GIL while it resamples), inside DALI's prefetching executor, so they
overlap the step as before. A graph on a GPU keeps ``fn.resize``: its images live in GPU memory and
DALI's GPU resize is fast. `usable` says where torch resizes.
"""

from __future__ import annotations

import abc
from concurrent.futures import ThreadPoolExecutor

import numpy as np

MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}  # torch's antialiased modes among the recipes' names


def usable(device_id: int | None, interpolation: str) -> bool:
    """The cut runs through torch on a CPU graph for an interpolation torch antialiases (bicubic,
    bilinear); elsewhere DALI's ``fn.resize`` does it."""
    return device_id is None and interpolation in MODES


class _Pooled(abc.ABC):
    """A batch python_function's callable: ``_one`` per sample on a pool of ``threads``. Holds no
    reference to the pipeline (DALI's rule for such a callable)."""

    def __init__(self, interpolation: str, threads: int):
        self.mode, self.threads = MODES[interpolation], max(1, threads)
        self._pool: ThreadPoolExecutor | None = None

    def _resize(self, image: np.ndarray, height: int, width: int):
        import torch
        import torch.nn.functional as F

        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]  # NCHW view of HWC
        return F.interpolate(pixels, size=(height, width), mode=self.mode, antialias=True)[0].permute(1, 2, 0)

    @abc.abstractmethod
    def _one(self, *sample: np.ndarray) -> np.ndarray:
        """One sample's inputs -> its resized image."""

    def __call__(self, *batches: list[np.ndarray]) -> list[np.ndarray]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="host-resize")
        return list(self._pool.map(self._one, *batches))


class TorchCut(_Pooled):
    """``(image [H,W,3] uint8[, box [4] relative (y0, x0, y1, x1)]) -> [size, size, 3]`` uint8: the box
    (else the whole image) resized. A box's edges are rounded to whole pixels: the boxes the views draw
    are whole pixels already (`pipeline.views`), and the crop is then exactly timm's."""

    def __init__(self, size: int, interpolation: str, threads: int):
        super().__init__(interpolation, threads)
        self.size = size

    def _one(self, image: np.ndarray, box: np.ndarray | None = None) -> np.ndarray:
        if box is not None:
            h, w = image.shape[:2]
            y0, x0, y1, x1 = (int(round(float(t) * s)) for t, s in zip(box, (h, w, h, w), strict=True))
            image = image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
        return self._resize(image, self.size, self.size).contiguous().numpy()


class TorchCentre(_Pooled):
    """``image [H,W,3] uint8 -> [crop, crop, 3]``: torchvision's ``Resize(shorter)`` (the longer side
    ``int(shorter * long / short)``) then ``CenterCrop(crop)`` (offsets ``int(round((side - crop) / 2))``),
    timm's eval transform."""

    def __init__(self, shorter: int, crop: int, interpolation: str, threads: int):
        super().__init__(interpolation, threads)
        self.shorter, self.crop = shorter, crop

    def _one(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if h <= w:
            height, width = self.shorter, int(self.shorter * w / h)
        else:
            height, width = int(self.shorter * h / w), self.shorter
        top, left = int(round((height - self.crop) / 2.0)), int(round((width - self.crop) / 2.0))
        resized = self._resize(image, height, width)
        return resized[top:top + self.crop, left:left + self.crop].contiguous().numpy()


def host_cut(images, size: int, interpolation: str, threads: int, box=None):
    """The DALI node: each image (or its relative ``box``) resized to size x size by `TorchCut`."""
    from nvidia.dali import fn

    inputs = (images,) if box is None else (images, box)
    return fn.python_function(*inputs, function=TorchCut(size, interpolation, threads), batch_processing=True,
                              output_layouts="HWC")


def host_centre(images, shorter: int, crop: int, interpolation: str, threads: int):
    """The DALI node: each image's shorter side resized to ``shorter``, then its centre crop (`TorchCentre`)."""
    from nvidia.dali import fn

    return fn.python_function(images, function=TorchCentre(shorter, crop, interpolation, threads),
                              batch_processing=True, output_layouts="HWC")
