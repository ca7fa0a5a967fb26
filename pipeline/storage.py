"""Storage behind fsspec URLs: one place that opens file systems, joins paths and commits writes atomically.

Every stage reads and writes through `Location` (a URL plus its storage options), so the same code runs on a
local folder, ``file://``, ``s3://`` (s3fs) or ``gs://`` (gcsfs). Storage options can hold credentials:
they are never logged, and `Location.__repr__` hides them.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec

# Keys of storage options (and substrings of environment variables) whose values are secrets.
SECRET_MARKERS = ("key", "secret", "token", "password", "credential", "session")


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options that is safe to log: secret-looking values are replaced by '***'."""
    if not options:
        return {}
    out: dict[str, Any] = {}
    for name, value in options.items():
        if isinstance(value, dict):
            out[name] = redact(value)
        elif any(marker in name.lower() for marker in SECRET_MARKERS):
            out[name] = "***"
        else:
            out[name] = value
    return out


def _default_options(protocol: str) -> dict[str, Any]:
    """Options taken from the environment when the caller gives none (S3 endpoint for local/MinIO/moto)."""
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"endpoint_url": endpoint}
    return {}


# fsspec protocols whose package is an optional extra of distillery (pyproject.toml)
_EXTRAS = {"gs": "gcs", "gcs": "gcs"}


class MissingFilesystem(ValueError):
    """A URL whose fsspec file system needs a package that is not installed; says which to install."""

    def __init__(self, url: str, protocol: str, reason: str) -> None:
        extra = _EXTRAS.get(protocol)
        fix = f"pip install 'distillery[{extra}]'" if extra else "install the package fsspec names"
        super().__init__(f"{url}: {protocol}:// storage is not installed ({reason}); {fix}")


@dataclass(frozen=True)
class Location:
    """A folder on some file system: ``url`` plus the fsspec ``storage_options`` needed to reach it."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.url.lower().startswith("pipe:"):  # webdataset's shell-command URLs: never run a command
            raise ValueError(f"{self.url.split(' ', 1)[0]}... is a shell command (pipe:), not a storage URL: give a "
                             "folder, file://, s3:// or gs:// URL; distillery reads storage through fsspec only")

    def __repr__(self) -> str:  # never print credentials
        return f"Location({self.url!r}, storage_options={redact(self.storage_options)!r})"

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0] if "://" in self.url else "file"

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    def fs_and_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        options = {**_default_options(self.protocol), **self.storage_options}
        try:
            fs, path = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as exc:  # fsspec knows the protocol, its package is not installed
            raise MissingFilesystem(self.url, self.protocol, str(exc)) from None
        return fs, path.rstrip("/") or "/"

    def child(self, *names: str) -> Location:
        """The location of a file or folder inside this one."""
        base = self.url.rstrip("/")
        return Location(posixpath.join(base, *names), self.storage_options)

    def filesystem(self) -> fsspec.AbstractFileSystem:
        return self.fs_and_path()[0]

    def path(self) -> str:
        return self.fs_and_path()[1]


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse ``--storage-options`` (a JSON object); the error names the flag and shows the expected shape."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"--storage-options is not valid JSON ({exc.msg} at char {exc.pos}); "
            'expected an object such as \'{"endpoint_url": "http://127.0.0.1:9000"}\''
        ) from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return value


@contextlib.contextmanager
def atomic_write(fs: fsspec.AbstractFileSystem, path: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that readers see either the old state or the complete new file.

    Local files are written to a hidden temporary name in the same folder, flushed to disk and renamed.
    Object stores (S3, GCS) make an object visible only when its upload completes, so they are written in
    place; on an exception the upload is discarded and nothing appears.
    """
    if _is_local(fs):
        folder = posixpath.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        try:
            with open(tmp, mode) as handle:
                yield handle
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return
    handle = fs.open(path, mode)
    try:
        yield handle
    except BaseException:
        discard = getattr(handle, "discard", None)
        if discard is not None:
            discard()
        else:  # pragma: no cover - file systems without discard
            handle.close()
            with contextlib.suppress(Exception):
                fs.rm(path)
        raise
    handle.close()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole small file atomically."""
    with atomic_write(fs, path) as handle:
        handle.write(data)


def write_json(fs: fsspec.AbstractFileSystem, path: str, value: Any) -> None:
    write_bytes(fs, path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read())


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """``fs.exists`` without a stale listing cache (object stores cache listings per instance)."""
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path)
