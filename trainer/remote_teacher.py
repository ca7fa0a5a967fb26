"""The online teacher in a pool of Ray actors (``distill.source=remote``), fed one step ahead.

When the student's GPU is the bottleneck, the teacher's forward pass (RegNetY-16GF costs DeiT-S more than
half its step rate, issue 4) can run on other GPUs or nodes. Each training worker sends its augmented,
mixed batch to one of ``distill.remote_actors`` teacher actors (worker r uses actor r mod n; the actors
are named per run, so the workers of a run, and a restarted worker group, share them) and gets the
logits back. The labels are the online teacher's: the same weights, the same mixed views, the same
autocast (the batch travels in bf16 when the step runs under bf16 autocast, where the teacher's first
layer casts it to bf16 anyway; in fp32 otherwise).

To keep the transfer and the teacher off the critical path the worker loop uses `lookahead`: batch i+1 is
augmented and handed to a sender thread before step i runs, so the copy to host memory, its send and the
actors' work all overlap the student's step. This changes no
number: every random draw of the batch stage comes from the step's own generator (`pipeline.views`),
not from torch's global one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.batch_aug import AugmentedBatch, BatchAugment, MixParams
from pipeline.loader import Batch
from pipeline.transfer import to_device

log = logging.getLogger(__name__)

__all__ = ["TeacherActor", "RemoteTeacher", "Prepared", "lookahead", "actor_name"]


class TeacherActor:
    """One teacher on one device (a GPU when the actor has one), eval mode, no gradients."""

    def __init__(self, teacher: dict[str, Any], channels_last: bool, bf16: bool,
                 compile_backend: str | None = None) -> None:
        from teacher_cache.teacher import Fp32Head, ready_for_inference
        from trainer.checkpoint import load_pretrained
        from trainer.config import ModelConfig

        logging.basicConfig(level=logging.INFO)
        config = ModelConfig(**teacher)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        model = config.build()
        self.sha256 = load_pretrained(model, config.pretrained_path)["sha256"] if config.pretrained_path else ""
        self.model = Fp32Head(ready_for_inference(model, self.device, channels_last))
        if compile_backend:  # distill.compile_teacher
            self.model = torch.compile(self.model, backend=compile_backend)
        self.bf16 = bf16 and self.device.type == "cuda"

    def identity(self) -> dict[str, str]:
        return {"sha256": self.sha256, "device": str(self.device)}

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x)
        return out.float().cpu()


def actor_name(run_name: str, index: int) -> str:
    return f"distillery-teacher-{run_name}-{index}"


class RemoteTeacher:
    """`trainer.worker.TeacherFn` over a teacher actor: ``submit`` a batch ahead, ``__call__`` collects it."""

    def __init__(self, actor: Any, transport: torch.dtype, placement: str = "") -> None:
        self.actor, self.transport, self.placement = actor, transport, placement
        self._pending: dict[int, Future] = {}  # step -> the ObjectRef of its logits, once sent
        # one thread sends, in submission order: the training thread never waits for a send
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillery-teacher-send")
        self._copy_streams: dict[torch.device, Any] = {}  # a GPU's side stream for the copies to host memory

    @classmethod
    def connect(cls, config: Any, run_name: str, rank: int, use_gpu: bool) -> RemoteTeacher:
        """The run's actor for this rank, created by whichever worker asks first."""
        import dataclasses

        import ray

        d = config.distill
        index = rank % d.remote_actors
        options = {"num_gpus": 1} if use_gpu else {"num_cpus": 0}  # CPU runs: no core taken from the workers
        actor_cls = ray.remote(**options)(TeacherActor)
        bf16 = config.runtime.bf16 and use_gpu
        actor = actor_cls.options(name=actor_name(run_name, index), get_if_exists=True).remote(
            dataclasses.asdict(d.teacher), config.runtime.channels_last, bf16,
            config.runtime.compile_backend if d.compile_teacher else None)
        need = (f"{d.remote_actors} teacher actors need {d.remote_actors} GPUs besides the "
                f"{config.scaling.num_workers} the workers take") if use_gpu else "the teacher actor"
        return cls(actor, torch.bfloat16 if bf16 else torch.float32, need)

    def identity(self, timeout: float = 600.0) -> dict[str, str]:
        """The actor's weights digest and device, once it runs; a clear error if it cannot be placed."""
        import ray

        try:
            return ray.get(self.actor.identity.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"distill.source=remote: the teacher actor did not start within {timeout:.0f} s; "
                               f"{self.placement}: add GPUs to the cluster or lower distill.remote_actors "
                               "(or use distill.source=online / cache)") from None

    def _send(self, x: torch.Tensor) -> Future:
        """Start ``x`` on its way; returns at once with a future of the logits' ObjectRef.

        On a GPU the copy to host memory (bf16, ~300 MB at DeiT's 1020 views) runs on a side stream into
        pinned memory, ordered after the work that made the batch and beside the student's step, which is
        queued next; the sender thread waits for that copy alone, then for Ray's serialisation of the batch
        into the object store. The training thread waits for neither. Off a GPU the thread sends ``x``
        itself: nothing writes to an augmented batch once it is made."""
        x = x.detach()
        if x.device.type != "cuda":
            return self._sender.submit(self._put, x.to(self.transport), None)
        side = self._copy_streams.get(x.device)
        if side is None:
            side = self._copy_streams[x.device] = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))  # after the kernels that made the batch
        with torch.cuda.stream(side):
            staged = x.to(self.transport)
            # the batch's own strides where dense (channels_last): a plain memcpy, the actor's layout as it is
            host = torch.empty_like(staged, device="cpu", pin_memory=True)
            host.copy_(staged, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        x.record_stream(side)  # made on the step's stream, read on this one: not reused before the copy ends
        return self._sender.submit(self._put, host, copied)

    def _put(self, host: torch.Tensor, copied: Any) -> Any:
        """On the sender thread: the batch, once in host memory, to the actor."""
        if copied is not None:
            copied.synchronize()  # this copy only, not the step queued after it
        return self.actor.logits.remote(host)

    def close(self) -> None:
        """Stop the sender thread (a send still queued is dropped: its step will not run)."""
        self._sender.shutdown(wait=False, cancel_futures=True)

    def submit(self, x: torch.Tensor, step: int) -> None:
        """Send step ``step``'s augmented batch to the actor; returns at once, without waiting for the send."""
        self._pending[step] = self._send(x)

    def __call__(self, x: torch.Tensor, batch: Batch | None, mix: MixParams | None) -> torch.Tensor:
        import ray

        sent = self._pending.pop(batch.step, None) if batch is not None else None
        if sent is None:  # not sent ahead (a first step, a caller without look-ahead): send it now
            sent = self._send(x)
        return to_device(ray.get(sent.result()), x.device)  # pinned: no wait for the step queued before it


@dataclass
class Prepared:
    """A loader batch whose batch augmentation already ran (and whose teacher logits are on their way)."""

    batch: Batch
    aug: AugmentedBatch

    @property
    def keys(self) -> list[str]:
        return self.batch.keys

    @property
    def step(self) -> int:
        return self.batch.step


def lookahead(batches: Iterator[Batch], augment: BatchAugment, teacher: RemoteTeacher) -> Iterator[Prepared]:
    """Augment each batch and send it to the teacher one step before it is handed out."""
    ahead: Prepared | None = None
    for batch in batches:
        aug = augment.apply(batch.views, batch.labels, batch.rng)
        teacher.submit(aug.x, batch.step)
        if ahead is not None:
            yield ahead
        ahead = Prepared(batch, aug)
    if ahead is not None:
        yield ahead
