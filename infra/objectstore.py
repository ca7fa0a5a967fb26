"""A local S3-protocol object store: moto's server mode, bound to 127.0.0.1.

Why: the pipeline reads and writes ``s3://`` URLs through fsspec/s3fs. Running a real HTTP
server (rather than moto's in-process mocks) exercises exactly the code path used against a
real bucket: endpoint URL, credentials from the environment, multipart uploads, listings.
Moto keeps its data in memory, so everything is lost when the server stops.

The credentials are moto's fixed *test* keys (``testing``/``testing``); they are not secrets.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.procs import (
    LOOPBACK,
    ServiceRecord,
    ensure_port_free,
    find_free_port,
    start_detached,
    stop_pid,
    wait_for_http,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "s3"
DEFAULT_PORT = 9000
DEFAULT_BUCKETS: tuple[str, ...] = ("distillery",)
# moto's conventional fixed test credentials: not secrets, accepted by any moto server.
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass(frozen=True)
class ObjectStore:
    """A running moto S3 server: where it answers and which process to stop."""

    endpoint_url: str
    pid: int
    port: int
    log_path: str

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3, s3fs and the AWS CLI at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``fsspec.filesystem("s3", **opts)`` / ``storage_options=``."""
        return {
            "key": TEST_ACCESS_KEY,
            "secret": TEST_SECRET_KEY,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": REGION},
        }

    def boto3_client(self) -> Any:
        """A boto3 S3 client bound to this server (imports boto3 lazily)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            region_name=REGION,
        )

    def to_record(self) -> ServiceRecord:
        """The state-file entry for this server."""
        return ServiceRecord.for_process(SERVICE_NAME, self.pid, self.port, self.endpoint_url, self.log_path)

    @classmethod
    def from_record(cls, record: ServiceRecord) -> ObjectStore:
        """Rebuild from a state-file entry."""
        return cls(record.url, record.pid, record.port, record.log_path)


def moto_server_argv(port: int) -> list[str]:
    """Command line for moto's standalone server on loopback (same interpreter as ours)."""
    return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]


def start_object_store(
    state_dir: str | os.PathLike[str],
    port: int | None = None,
    buckets: tuple[str, ...] | list[str] = DEFAULT_BUCKETS,
    timeout: float = 60.0,
) -> ObjectStore:
    """Start moto's S3 server, wait until it answers, and create ``buckets``.

    ``port=None`` picks a free port; an explicit port that is taken raises
    :class:`infra.procs.PortInUseError` naming ``--s3-port``. If readiness or bucket
    creation fails, the process is stopped before the error propagates.
    """
    if port is None:
        port = find_free_port()
    else:
        ensure_port_free(port, "S3 server", "--s3-port")
    # Keep moto quiet about telemetry-ish things and make sure no real AWS creds leak in.
    env = {
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
    proc, log_path = start_detached(SERVICE_NAME, moto_server_argv(port), state_dir, env=env)
    store = ObjectStore(f"http://{LOOPBACK}:{port}", proc.pid, port, str(Path(log_path)))
    try:
        wait_for_http(
            f"{store.endpoint_url}/moto-api/",
            service="S3 server (moto)",
            pid=proc.pid,
            log_path=log_path,
            timeout=timeout,
        )
        client = store.boto3_client()
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
            log.info("created bucket s3://%s", bucket)
    except BaseException:
        stop_object_store(store)
        raise
    return store


def stop_object_store(store: ObjectStore, timeout: float = 10.0) -> None:
    """Stop the server's process group and confirm the pid is gone."""
    stop_pid(store.pid, name="S3 server (moto)", timeout=timeout)
