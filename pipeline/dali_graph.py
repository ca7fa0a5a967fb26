"""The DALI graphs: decode each image once, then cut its k views; the eval resize + centre crop.

One graph for both worlds: ``device_id`` an int runs it on that GPU (nvJPEG through ``device="mixed"``,
resizes on the GPU); ``device_id=None`` runs the identical graph with DALI's CPU operators, which is what
CI tests. Inputs arrive through ``fn.external_source`` from the stream (encoded bytes) and from
`pipeline.views` (per-view crop boxes and flips), so the graph holds no randomness of its own; the labels
never enter it (the loaders hand them on from the host).

Train output per image: ``views`` uint8 [k, S, S, 3]; the batch-level steps that follow
(RandAugment, normalisation, random erasing, Mixup/CutMix) run on the torch batch (`pipeline.batch_aug`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.config import AugmentConfig
from pipeline.host_resize import host_centre, host_cut, usable

_INTERP = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "nearest": "INTERP_NN",
           "lanczos": "INTERP_LANCZOS3"}


def _interp(name: str):
    from nvidia.dali import types

    try:
        return getattr(types.DALIInterpType, _INTERP[name])
    except KeyError:
        raise ValueError(f"augment.interpolation={name!r}: use one of {sorted(_INTERP)}") from None


def device_id_of(device) -> int | None:
    """DALI's ``device_id`` for a torch device (or its name): the GPU's index, None for the CPU. A bare
    ``"cuda"`` is torch's current GPU, where the loaders' outputs are allocated, not GPU 0."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def _decoder_device(device_id: int | None) -> str:
    return "cpu" if device_id is None else "mixed"


def crop_resize(images, box, size: int, interp):
    """The view's cut: the relative ``box`` (y0, x0, y1, x1) of each image resized to size x size,
    antialiased (PIL's resize filters its input when it shrinks, and timm's crops go through PIL)."""
    from nvidia.dali import fn

    return fn.resize(images, roi_start=box[0:2], roi_end=box[2:4], roi_relative=True, size=[size, size],
                     interp_type=interp, antialias=True)


def train_graph(source: Callable[[], tuple], batch_size: int, repeats: int, cfg: AugmentConfig,
                device_id: int | None, num_threads: int = 2, prefetch: int = 2, seed: int = 0,
                decode_crop: bool = True, torch_resize: bool = True):
    """A DALI pipeline: (encoded, boxes [k,4], flips [k]) per image -> views [k,S,S,3]. Labels stay on the
    host beside the graph: a CPU output of a graph on a GPU may come back pinned and ordered on torch's
    stream, and reading it would make the host wait for the step queued there (see `run_graph`).

    One random resized crop per image (``repeats=1``) is decoded alone (ROI decoding: libjpeg-turbo skips
    the rows below it and the columns beside it, the hardware decoder its region) and resized whole, as
    timm crops then resizes. Its boxes are whole pixels (`views.random_resized_boxes`), so the decoded
    region is exactly the crop. With k views the image is decoded once and each view resized from its
    box in it, so the filter's taps at a crop's edge read the pixels just outside it (PIL's stop at the
    edge): a difference of ~0.01 levels on average, up to ~10 in a few edge pixels. ``decode_crop=False``
    decodes the whole image for one view too (the benchmarks' baseline).

    On a CPU (``device_id=None``) the random resized crops are resized by torch (`pipeline.host_resize`,
    several times faster than DALI's CPU resize), and each crop, one view's or k views', is then exactly
    the box resized, as timm's; ``torch_resize=False`` keeps DALI's ``fn.resize`` there, which is the GPU's
    graph node for node (what the tests check on a CPU)."""
    from nvidia.dali import fn, pipeline_def, types

    size = cfg.image_size
    interp = _interp(cfg.interpolation)
    by_torch = torch_resize and cfg.crop == "rrc" and usable(device_id, cfg.interpolation)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, seed=seed, exec_dynamic=True)
    def graph():
        encoded, boxes, flips = fn.external_source(
            source=source, num_outputs=3, batch=True, dtype=[types.UINT8, types.FLOAT, types.INT32], no_copy=False)
        if decode_crop and repeats == 1 and cfg.crop == "rrc":  # one view inside the image: its crop alone
            crop = fn.decoders.image_slice(encoded, device=_decoder_device(device_id), output_type=types.RGB,
                                           rel_start=boxes[0][0:2], rel_end=boxes[0][2:4], axis_names="HW")
            resized = (host_cut(crop, size, cfg.interpolation, num_threads) if by_torch else
                       fn.resize(crop, size=[size, size], interp_type=interp, antialias=True))
            views = [fn.flip(resized, horizontal=flips[0])]
        else:
            images = fn.decoders.image(encoded, device=_decoder_device(device_id), output_type=types.RGB)
            views = []
            for v in range(repeats):  # decoded once, cut k times
                resized = (host_cut(images, size, cfg.interpolation, num_threads, box=boxes[v]) if by_torch else
                           crop_resize(images, boxes[v], size, interp))
                views.append(fn.flip(resized, horizontal=flips[v]))
        stacked = fn.stack(*views) if repeats > 1 else fn.expand_dims(views[0], axes=[0])
        return stacked

    return graph()


def eval_size(cfg: AugmentConfig) -> int:
    """Shorter side before the centre crop: timm's ``floor(image_size / crop_pct)`` (256 for 224/0.875)."""
    return int(math.floor(cfg.image_size / cfg.eval_crop_pct))


def eval_graph(source: Callable[[], tuple], batch_size: int, cfg: AugmentConfig, device_id: int | None,
               num_threads: int = 2, prefetch: int = 2, torch_resize: bool = True):
    """A DALI pipeline: encoded -> image [S,S,3] uint8: resize shorter side, centre crop (labels: as
    `train_graph`'s). On a CPU torch resizes and crops, as torchvision does (`pipeline.host_resize`);
    ``torch_resize=False`` keeps DALI's operators there, the GPU's graph."""
    from nvidia.dali import fn, pipeline_def, types

    size = cfg.image_size
    by_torch = torch_resize and usable(device_id, cfg.eval_interpolation)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def graph():
        encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8)
        images = fn.decoders.image(encoded, device=_decoder_device(device_id), output_type=types.RGB)
        if by_torch:
            return host_centre(images, eval_size(cfg), size, cfg.eval_interpolation, num_threads)
        resized = fn.resize(images, resize_shorter=eval_size(cfg), interp_type=_interp(cfg.eval_interpolation),
                            antialias=True)
        return fn.crop(resized, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5)

    return graph()


def whole_image_graph(source: Callable[[], tuple], batch_size: int, resolution: int, device_id: int | None,
                      num_threads: int = 2, interpolation: str = "bicubic", torch_resize: bool = True):
    """(encoded,) -> the whole image resized to resolution x resolution (uint8 HWC): a teacher-cache input
    (resized by torch on a CPU, as `train_graph`'s views)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, exec_dynamic=True)
    def graph():
        encoded = fn.external_source(source=source, batch=True, dtype=types.UINT8)
        images = fn.decoders.image(encoded, device=_decoder_device(device_id), output_type=types.RGB)
        if torch_resize and usable(device_id, interpolation):
            return host_cut(images, resolution, interpolation, num_threads)
        return fn.resize(images, size=[resolution, resolution], interp_type=_interp(interpolation), antialias=True)

    return graph()


def run_graph(pipe, device_id: int | None) -> tuple:
    """One ``pipe.run()``. A graph on a GPU returns its outputs on torch's current stream: its outputs are
    then stream-ordered, and `to_torch`'s copy (queued on that stream) waits for them on the GPU. Without a
    stream they are host-synchronous, and DALI makes the host wait for a copy out of a host-ordered buffer
    to end, i.e. for everything already queued on torch's stream (the previous training step), which would
    take the host's lead away at every batch and count the step's GPU time as data wait."""
    if device_id is None:
        return pipe.run()
    import torch

    return pipe.run(torch.cuda.current_stream(device_id))


def to_torch(batch, device: str):
    """A DALI TensorList (CPU or GPU) -> a torch tensor on ``device`` that owns its memory (DALI reuses its
    buffers). A CPU TensorList (a graph on the CPU) goes through host memory: DALI's ``feed_ndarray``
    would memcpy it into device memory from the host."""
    import numpy as np
    import torch
    from nvidia.dali.backend import TensorListGPU

    from pipeline.transfer import to_device

    if not isinstance(batch, TensorListGPU):
        out = torch.from_numpy(np.array(batch.as_tensor()))
        return out if device == "cpu" else to_device(out, device)
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    tensor = batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=to_torch_type[tensor.dtype], device=device)
    feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(device=out.device))
    return out
