"""A fault-injecting HTTP reverse proxy in front of the S3-protocol server, for reliability tests.

Every request to the proxy (bound to 127.0.0.1 on a free port) is forwarded to the upstream endpoint
(moto), unless a `Fault` picks it: by a substring of the path (the object key), by method, and by how
many matching requests it has seen (``skip`` let through, then ``times`` faulted; ``times=None``: every
one after that). A fault answers like a real object store under stress: ``503 SlowDown`` (throttling),
``500 InternalError``, or ``drop``: the upstream's status and headers, then ``after_bytes`` of the body
and a closed connection (a connection dropped mid-shard). Every request is recorded (`Request`) so tests
can assert on what the client asked for, e.g. the ``Range`` of a retried read.

Threads, not processes: `FaultProxy.start()` serves from a background thread, `stop()` closes the
listening socket and every open keep-alive connection and joins the thread.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import sys
import threading
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Headers that belong to one connection, not to the message (RFC 9110 section 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}
KINDS = (*ERRORS, "drop")


@dataclass
class Fault:
    """Which requests fail, and how. ``match`` is a substring of the request path (bucket/key)."""

    match: str
    kind: str  # "slowdown" (503 SlowDown), "internal" (500 InternalError), "drop" (close mid-body)
    times: int | None = 1  # requests faulted after the skipped ones; None: all of them (a persistent failure)
    skip: int = 0  # matching requests let through first
    after_bytes: int = 0  # "drop": body bytes sent before the connection is closed
    methods: tuple[str, ...] = ("GET",)
    seen: int = 0  # matching requests so far

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Fault.kind={self.kind!r}: use one of {KINDS}")

    def picks(self, method: str, path: str) -> bool:
        """Count a request that matches and say whether it gets this fault."""
        if method not in self.methods or self.match not in path:
            return False
        index, self.seen = self.seen, self.seen + 1
        return index >= self.skip and (self.times is None or index < self.skip + self.times)


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw it, and what it did with it."""

    method: str
    path: str  # without the query string
    query: str
    range: str | None  # the Range header, e.g. "bytes=0-4095"
    fault: str | None  # the fault kind applied, None when forwarded untouched
    status: int

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """``Range: bytes=a-b`` as the half-open ``(a, b + 1)``."""
        found = re.fullmatch(r"bytes=(\d+)-(\d+)", self.range or "")
        return (int(found[1]), int(found[2]) + 1) if found else None


class FaultProxy:
    """The proxy: `start()`, point the client at `url`, set `faults`, read `log`, `stop()`."""

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:  # wake handler threads blocked on an idle keep-alive connection
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()

    def requests(self, match: str = "", method: str | None = None) -> list[Request]:
        """Recorded requests whose path contains ``match`` (and of ``method``), in arrival order."""
        with self._lock:
            return [r for r in self.log if match in r.path and (method is None or r.method == method)]

    def _pick(self, method: str, path: str) -> Fault | None:
        with self._lock:
            picked = [f for f in self.faults if f.picks(method, path)]  # every matching fault counts the request
        return picked[0] if picked else None

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no news here
            super().handle_error(request, client_address)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as s3fs/aiohttp expect
        timeout = 30  # an idle keep-alive connection is closed after this

        def setup(self) -> None:
            super().setup()
            with proxy._lock:
                proxy._connections.add(self.connection)

        def finish(self) -> None:
            with proxy._lock:
                proxy._connections.discard(self.connection)
            with contextlib.suppress(OSError):
                super().finish()

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass  # the proxy's own log is `proxy.log`

        def do_GET(self) -> None:
            self._handle()

        do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        def _handle(self) -> None:
            path, _, query = self.path.partition("?")
            body = self._body()
            fault = proxy._pick(self.command, path)
            if fault is not None and fault.kind in ERRORS:
                status = self._error(*ERRORS[fault.kind], path)
            else:
                status = self._forward(body, fault)
            proxy._record(Request(self.command, path, query, self.headers.get("Range"),
                                  fault.kind if fault else None, status))

        def _body(self) -> bytes:
            if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline().strip():  # trailers, up to the blank line
                pass
            return b"".join(parts)

        def _error(self, status: int, code: str, message: str, path: str) -> int:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<Resource>{path}</Resource><RequestId>fault-proxy</RequestId></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return status

        def _forward(self, body: bytes, fault: Fault | None) -> int:
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP and not (name.lower() == "content-length"
                                                               and self.command != "HEAD"):
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return response.status
                if fault is not None:  # "drop": part of the body, then the connection goes away
                    self.wfile.write(payload[:fault.after_bytes])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return response.status
                self.wfile.write(payload)
                return response.status
            finally:
                upstream.close()

    return Handler
