"""Test helpers: a moto S3 server in its own process, and a fault-injecting proxy.

Both listen on 127.0.0.1 only. boto3 reaches them over HTTP through
``AWS_ENDPOINT_URL``, exactly as it would reach S3.

:class:`FaultProxy` forwards requests to the moto server, except that it responds to a
set number of requests with a fault instead: 503 SlowDown, 403 AccessDenied, a
dropped connection, or a body cut short of its Content-Length. moto cannot throttle
or fail by itself, so this is how tests exercise the retry paths end to end.
"""

from __future__ import annotations

import ctypes
import http.client
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

FAULT_KINDS = ("slowdown", "access_denied", "drop", "short")
ALL_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _exit_with_parent() -> None:
    """Ask Linux to stop this child when the test process dies without calling stop()."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class MotoServer:
    """A moto S3 server run as ``python -m moto.server`` on 127.0.0.1.

    Args:
        log_path: File that receives the server's output, or None to discard it.
    """

    def __init__(self, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until it responds to HTTP requests."""
        self._log = open(self.log_path, "wb") if self.log_path else open(os.devnull, "wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_exit_with_parent if sys.platform == "linux" else None,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                status = self._process.returncode
                raise RuntimeError(f"moto server exited with status {status}. See {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"moto server on port {self.port} did not respond within {timeout_s:.0f} s")

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        if self._process is None:
            raise RuntimeError("the moto server is not started. Call start() first")
        return self._process.pid

    def reset(self) -> None:
        """Delete all buckets and objects."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def stop(self) -> None:
        """Stop the server process that :meth:`start` started."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._log is not None:
            self._log.close()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that injects S3 faults before forwarding to ``upstream``.

    Args:
        upstream: Base URL of the real server, such as ``http://127.0.0.1:5000``.

    Attributes:
        url: The proxy's base URL, to use as ``AWS_ENDPOINT_URL``.
        requests: Number of requests received.
        faults: Number of faults sent, per kind.
    """

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.requests = 0
        self.faults = {kind: 0 for kind in FAULT_KINDS}
        self._lock = threading.Lock()
        self._plan: list[tuple[str, int, frozenset[str]]] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._make_handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, kind: str, count: int, methods: tuple[str, ...] = ALL_METHODS) -> None:
        """Respond with a fault of ``kind`` to the next ``count`` requests with one of ``methods``."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}: expected one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._plan.append((kind, count, frozenset(methods)))

    def _take_fault(self, method: str) -> str | None:
        with self._lock:
            self.requests += 1
            for position, (kind, count, methods) in enumerate(self._plan):
                if method in methods and count > 0:
                    self._plan[position] = (kind, count - 1, methods)
                    self.faults[kind] += 1
                    return kind
            return None

    def _make_handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _relay(self) -> None:
                body = self._read_body()
                fault = proxy._take_fault(self.command)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault in ("slowdown", "access_denied"):
                    self._send_error(fault)
                    return
                status, headers, payload = self._forward(body)
                # A HEAD response has no body but keeps the object's Content-Length.
                dropped = {"transfer-encoding", "connection"}
                if self.command != "HEAD":
                    dropped.add("content-length")
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in dropped:
                        self.send_header(name, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if fault == "short" and payload:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        if size == 0:
                            break
                        chunks.append(chunk)
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send_error(self, fault: str) -> None:
                if fault == "slowdown":
                    status, code, message = 503, "SlowDown", "Please reduce your request rate."
                else:
                    status, code, message = 403, "AccessDenied", "Access Denied"
                payload = _ERROR_BODY.format(code=code, message=message).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                    headers["Content-Length"] = str(len(body))
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    return response.status, response.getheaders(), response.read()
                finally:
                    connection.close()

        return Handler
