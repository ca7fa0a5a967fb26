"""The MLflow server stops in the middle of a run: logging never blocks, a warning is logged, and the
metrics logged during the outage arrive when the server returns (or at the end of the run)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from infra.tracking import start_tracking_server, stop_tracking_server
from trainer.tracking import Tracker, TrackingSpec


def _logged(tracker: Tracker, first: int, last: int) -> None:
    start = time.monotonic()
    for step in range(first, last):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step)
    assert time.monotonic() - start < 0.5, "logging must return at once, server or not"


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_server_outages_mid_run_lose_no_metric(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two outages: after the first the server returns while training goes on (held metrics are sent on
    the next retry); after the second it returns just before the end (``close`` sends them)."""
    from mlflow import MlflowClient

    caplog.set_level(logging.WARNING, logger="trainer.tracking")
    server = start_tracking_server(tmp_path / "mlflow")
    try:
        tracker = Tracker(TrackingSpec(tracking_uri=server.tracking_uri, experiment="outage", run_name="r",
                                       params={"lr": "0.1"}), request_timeout=5, max_retries=0,
                          retry_s=0.5, retry_max_s=1.0)
        _logged(tracker, 0, 10)
        client = MlflowClient(server.tracking_uri)
        _wait(lambda: tracker.run_id is not None and len(client.get_metric_history(tracker.run_id, "loss")) == 10)
        run_id = tracker.run_id

        stop_tracking_server(server)  # outage 1, mid-run
        _logged(tracker, 10, 20)
        _wait(lambda: tracker.outages == 1)
        assert any("holding metrics" in r.getMessage() for r in caplog.records)
        _logged(tracker, 20, 30)
        server = start_tracking_server(tmp_path / "mlflow", port=server.port)  # same store, same address
        _wait(lambda: len(client.get_metric_history(run_id, "loss")) == 30)
        # the tracker says so once the send has returned, which may be after the server stored them
        _wait(lambda: any("is back after" in r.getMessage() for r in caplog.records), timeout=10)

        stop_tracking_server(server)  # outage 2, until the end of training
        tracker._next_try = time.monotonic() + 3600  # no retry before close: close must send them itself
        _logged(tracker, 30, 40)
        server = start_tracking_server(tmp_path / "mlflow", port=server.port)
        assert tracker.close(timeout=60) is True
        history = client.get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(40))
        assert all(abs(m.value - 1.0 / (m.step + 1)) < 1e-9 for m in history)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"}
        assert tracker.dropped == 0 and tracker.outages == 1  # the second went unnoticed until close
    finally:
        stop_tracking_server(server)


def test_held_metrics_are_bounded(tmp_path: Path) -> None:
    """A server that never answers: the tracker keeps at most ``max_held`` values and counts the rest."""
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tracker = Tracker(TrackingSpec(tracking_uri=f"http://127.0.0.1:{port}", experiment="e", run_name="r"),
                      max_retries=0, retry_s=0.2, retry_max_s=0.2, max_held=50)
    _logged(tracker, 0, 100)  # 200 values
    assert tracker.close(timeout=60) is False
    assert tracker.failed and tracker.run_id is None
    assert tracker.dropped == 150 and len(tracker._held) == 50
