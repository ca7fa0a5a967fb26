"""No host wait in a step's augmentation and teacher lookup on a GPU, checked without one.

CI has no GPU, so these tests run the per-step code on fake CUDA tensors (torch's FakeTensorMode) and
watch every operator it dispatches: a host -> device copy that is blocking or from pageable memory
(torch's memcpy_and_sync: the host waits for everything queued on the stream, the last step included),
or reading a CUDA value on the host, fails the test with the line that did it."""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import batch_aug
from pipeline.transfer import to_device
from pipeline.views import batch_rng
from trainer import recipes

HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
              "unique_consecutive", "bincount", "histc", "argwhere", "is_nonzero", "equal", "allclose"}


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/tests/" not in frame.filename and ("/pipeline/" in frame.filename or "/teacher_cache/" in frame.filename):
            return f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class HostWaits(TorchDispatchMode):
    """Counts, by the project line that issued it, each dispatched op that would make the host wait."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            target = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
            blocking = not (kwargs.get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2]))
            if src.device.type == "cpu" and target.type == "cuda":
                if blocking or not getattr(src, "_pinned_in_test", False):
                    self.found[f"{'blocking' if blocking else 'pageable'} H2D copy at {_caller()}"] += 1
            elif src.device.type == "cuda" and target.type == "cpu" and blocking:
                self.found[f"D2H copy at {_caller()}"] += 1  # the host waits for the queue and the copy
        elif name in HOST_READS and any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args):
            self.found[f"{name} of a CUDA tensor at {_caller()}"] += 1
        elif name == "_local_scalar_dense" and isinstance(args[0], FakeTensor):
            return True  # a host tensor's value, which fake tensors do not hold: the code only branches on it
        return func(*args, **kwargs)


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeTensorMode:
    def pin(self: torch.Tensor) -> torch.Tensor:  # no pinned allocator without a GPU: mark the tensor
        self._pinned_in_test = True
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(batch_aug, "_noise_generator", lambda rng, device: None)  # no CUDA generator here
    return FakeTensorMode(allow_non_fake_inputs=True)


def _augment_steps(config: Any, fake: FakeTensorMode, views: int = 48, steps: int = 3) -> Counter[str]:
    augment = batch_aug.BatchAugment(config.data.augment, config.data.mix, config.model.num_classes)
    size = 64
    with fake:
        x = torch.empty(views, size, size, 3, dtype=torch.uint8, device="cuda").permute(0, 3, 1, 2)
        labels = torch.empty(views, dtype=torch.int64, device="cuda")
        augment.apply(x, labels, batch_rng(0, 0, 0))  # one-time caches (e.g. RandAugment's fill colour)
        waits = HostWaits()
        with waits:
            for step in range(1, steps + 1):
                augment.apply(x, labels, batch_rng(0, 0, step))
    return waits.found


@pytest.mark.parametrize("recipe", ["deit_b", "deit3_b"])
def test_the_batch_augmentation_never_waits_for_the_gpu(recipe: str, fake_cuda: FakeTensorMode) -> None:
    """DeiT's RandAugment, erasing, Mixup/CutMix and normalisation; DeiT III's 3-Augment and colour jitter."""
    config = recipes.get(recipe)
    config = replace(config, data=replace(config.data, augment=replace(config.data.augment, image_size=64)))
    assert _augment_steps(config, fake_cuda) == Counter()


@pytest.mark.parametrize("replay", [False, True])
def test_the_teacher_caches_lookup_never_waits_for_the_gpu(fake_cuda: FakeTensorMode, replay: bool) -> None:
    """A map cache pooled over crop boxes, and a replay cache looked up by view ids."""
    from collections import OrderedDict
    from types import SimpleNamespace

    from teacher_cache.cache import TeacherCache, _Part

    rows, cells, k = 32, 5 if replay else 49, 10
    cache = TeacherCache.__new__(TeacherCache)  # one part in memory, as after its first read
    cache.height = cache.width = 1 if replay else 7
    cache.views, cache.cells = {"count": cells} if replay else None, cells
    cache.k, cache.classes, cache._budget = k, 1000, 1 << 30
    cache.shards = SimpleNamespace(shards=np.zeros(rows, np.int64), shard_starts=np.zeros(1, np.int64))
    cache._parts = OrderedDict({0: _Part(np.zeros((rows, cells, k), np.int16), np.zeros((rows, cells, k), np.float16),
                                         np.zeros((rows, cells), np.float16))})
    boxes = torch.rand(24, 4)
    with fake_cuda:
        waits = HostWaits()
        with waits:
            logits = cache.logits(np.arange(24) % rows, boxes, "cuda", np.arange(24) % cells if replay else None)
    assert logits.device.type == "cuda" and tuple(logits.shape) == (24, 1000)
    assert waits.found == Counter()


def test_the_simple_crops_reflection_never_waits_for_the_gpu(fake_cuda: FakeTensorMode) -> None:
    """DeiT III's simple crop (the loader, repeats x3): boxes and flips on the host, views on the device."""
    from pipeline.views import reflect_outside

    boxes = torch.tensor([[-0.05, 0.0, 1.0, 1.05], [0.0, 0.0, 1.0, 1.0], [0.1, -0.02, 0.9, 1.0]])
    flips = torch.tensor([True, False, False])
    with fake_cuda:
        views = torch.empty(3, 64, 64, 3, dtype=torch.uint8, device="cuda")
        waits = HostWaits()
        with waits:
            out = reflect_outside(views, boxes, flips)
    assert out.device.type == "cuda" and waits.found == Counter()


def test_the_check_sees_blocking_copies(fake_cuda: FakeTensorMode) -> None:
    """The check itself: what the code did before (torch.as_tensor(array, device=cuda)) and a read back
    to the host are caught; to_device is not."""
    with fake_cuda:
        waits = HostWaits()
        with waits:
            torch.as_tensor(np.arange(4), device="cuda")
            to_device(np.arange(4), "cuda").cpu()
    assert sorted(w.split(" at ")[0] for w in waits.found) == ["D2H copy", "blocking H2D copy"]


def test_to_device_on_the_cpu_is_as_tensor() -> None:
    array = np.arange(6, dtype=np.int16).reshape(2, 3)
    out = to_device(array, "cpu")
    assert out.dtype == torch.int16 and torch.equal(out, torch.as_tensor(array))
    assert to_device([0.5, 2.0], torch.device("cpu"), torch.float32).dtype == torch.float32
