"""trainer.background: one job off the training thread, and the snapshot it writes."""

from __future__ import annotations

import threading
from collections import OrderedDict

import pytest
import torch

from trainer.background import Background, snapshot


def test_snapshot_copies_every_tensor_and_keeps_the_containers() -> None:
    weight = torch.ones(3, requires_grad=True)
    state = {"model": OrderedDict(w=weight), "optimizer": {"state": {0: {"exp_avg": torch.zeros(3), "step": 4}},
                                                             "param_groups": [{"lr": 0.1, "params": [0]}]},
             "pair": (torch.arange(2), "x")}
    state["model"]._metadata = {"": {"version": 2}}  # as Module.state_dict() leaves it (versions, e.g. BatchNorm's)
    copied = snapshot(state)
    assert isinstance(copied["model"], OrderedDict) and isinstance(copied["pair"], tuple)
    assert copied["model"]._metadata == {"": {"version": 2}}
    with torch.no_grad():
        weight.mul_(5)
    state["optimizer"]["state"][0]["exp_avg"].add_(1)
    state["optimizer"]["param_groups"][0]["lr"] = 0.5
    state["pair"][0].add_(7)
    assert torch.equal(copied["model"]["w"], torch.ones(3)) and not copied["model"]["w"].requires_grad
    assert torch.equal(copied["optimizer"]["state"][0]["exp_avg"], torch.zeros(3))
    assert copied["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
    assert torch.equal(copied["pair"][0], torch.arange(2)) and copied["pair"][1] == "x"


def test_one_job_at_a_time_on_another_thread() -> None:
    writer = Background("test-writer")
    release, ran = threading.Event(), []

    def job(name: str) -> None:
        release.wait(30)
        ran.append((name, threading.current_thread().name))

    writer.submit(lambda: job("first"))
    assert writer.busy and ran == []  # submit returned while the job runs
    release.set()
    writer.submit(lambda: job("second"))  # waits for the first
    assert ran[0] == ("first", "test-writer")
    writer.wait()
    assert [name for name, _ in ran] == ["first", "second"] and not writer.busy


def test_a_failed_job_is_raised_on_the_training_thread_at_the_next_wait() -> None:
    writer = Background("test-writer")

    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    writer.submit(full_disk)
    with pytest.raises(OSError, match="No space left"):
        writer.submit(lambda: None)  # the next checkpoint finds the last one's failure
    writer.wait()  # raised once
