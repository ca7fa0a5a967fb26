"""A checkpoint's write and report, off the training thread: one job in flight, its error re-raised.

``trainer.worker.checkpoint`` takes a snapshot of the state on the training thread (:func:`snapshot`:
every tensor copied to host memory, so the steps that follow cannot change what is written) and hands
the rest (serialising, fsync, Ray's copy to the run's storage, waiting for Ray to register it) to a
:class:`Background` job. The next checkpoint, and the end of training, wait for the job first, so at
most one snapshot is held and a failed write stops the run at its next checkpoint with the write's
own error. Collectives (the loader-state gather) stay on the training thread: only Ray's report, which
is a barrier of its own, runs in the job.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Background", "snapshot"]


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` (state dicts: nested dicts, lists, tuples, tensors) with every tensor copied to
    host memory, detached; other leaves are deep-copied."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the mapping's type and attributes (a module state dict's _metadata: versions)
        for key, value in obj.items():
            out[key] = snapshot(value)
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*(snapshot(value) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(value) for value in obj)
    return copy.deepcopy(obj)


class Background:
    """Runs one job at a time on a daemon thread; :meth:`wait` joins it and re-raises what it raised."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], None]) -> None:
        """Wait for the job before (see :meth:`wait`), then start ``job``."""
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name=self.name, daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Join the running job, if any; re-raise its exception; return the seconds spent waiting."""
        started = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return time.perf_counter() - started

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc
