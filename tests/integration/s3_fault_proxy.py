"""A small fault-injecting HTTP proxy for S3 tests: 127.0.0.1 in front of the moto server.

Point a client's S3 endpoint at :attr:`S3FaultProxy.endpoint_url` and every request is forwarded
to the real server, except those the :class:`FaultPlan` picks, which get a fault instead:

* ``slowdown``: 503 with the S3 ``SlowDown`` XML error (throttling),
* ``internal``: 500 with the S3 ``InternalError`` XML error,
* ``reset``: the connection is closed with a TCP RST before any response byte,
* ``denied`` (per key, permanent): 403 ``AccessDenied``.

Transient faults are bounded (``budget``) so a client with retries always gets through; denied
keys fail every time. Optional ``delay_s`` slows matching requests down, so tests can act "in
the middle" of a job without depending on how fast the machine is. Everything is counted
(``stats``) so a test can assert that faults were really injected, not merely configured.

Why a proxy rather than moto's own fault injection: it exercises the real clients' retry code
(botocore for s3fs, the AWS C++ SDK for pyarrow) against real HTTP failures, connection resets
included, which an in-process mock cannot produce.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

TRANSIENT_FAULTS: tuple[str, ...] = ("slowdown", "internal", "reset")

_XML_ERROR = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message>"
    "<Resource>{resource}</Resource><RequestId>fault-proxy-{n}</RequestId></Error>"
)
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}
#: Hop-by-hop headers are the proxy's own business (RFC 9110 section 7.6.1).
_HOP_HEADERS = frozenset(
    ("connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade")
)
_MAX_CHUNKS = 1_000_000  # bound on the chunked-body loop: a broken client cannot spin us forever


@dataclass
class FaultPlan:
    """Which requests get which fault.

    ``faults`` is cycled through: every ``every``-th matching request (1 = each one) gets the
    next fault, until ``budget`` faults were injected; then requests pass through. ``match``
    selects requests by ``(method, key)`` where key is ``bucket/object`` (URL-decoded).
    ``denied_keys`` always get 403 AccessDenied (permanent, outside the budget).
    """

    faults: tuple[str, ...] = TRANSIENT_FAULTS
    budget: int = 0
    every: int = 2
    match: Callable[[str, str], bool] = lambda method, key: True
    denied_keys: frozenset[str] = frozenset()
    delay_s: float = 0.0  # added before forwarding each matching request
    delay_match: Callable[[str, str], bool] = lambda method, key: False

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(TRANSIENT_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; use {TRANSIENT_FAULTS}")
        if self.budget < 0 or self.every < 1 or self.delay_s < 0:
            raise ValueError("budget >= 0, every >= 1 and delay_s >= 0 are required")
        if self.budget and not self.faults:
            raise ValueError("a fault budget needs at least one fault kind")


@dataclass
class ProxyStats:
    """What the proxy did: requests seen and faults injected, by kind."""

    requests: int = 0
    matched: int = 0
    injected: Counter[str] = field(default_factory=Counter)

    @property
    def transient(self) -> int:
        return sum(n for kind, n in self.injected.items() if kind in TRANSIENT_FAULTS)


class S3FaultProxy:
    """A threaded proxy on 127.0.0.1 (ephemeral port) in front of ``upstream_url``.

    Use as a context manager (or ``start``/``stop``); ``stop`` shuts the server down and waits
    for its thread, so no listener outlives the test.
    """

    def __init__(self, upstream_url: str, plan: FaultPlan | None = None) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream_url!r}")
        self.upstream = (parts.hostname, parts.port)
        self.plan = plan or FaultPlan()
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_plan(self, plan: FaultPlan) -> None:
        """Swap the plan (e.g. switch faults on after the test's setup uploads went through)."""
        with self._lock:
            self.plan = plan

    def start(self) -> S3FaultProxy:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- decisions --------------------------------------------------------------------------

    def _decide(self, method: str, key: str) -> tuple[str | None, float]:
        """(fault to inject or None, delay) for one request; counts under the lock."""
        with self._lock:
            plan = self.plan
            self.stats.requests += 1
            delay = plan.delay_s if plan.delay_match(method, key) else 0.0
            if key in plan.denied_keys:
                self.stats.injected["denied"] += 1
                return "denied", delay
            if not plan.match(method, key):
                return None, delay
            self.stats.matched += 1
            injected = self.stats.transient
            if injected >= plan.budget or self.stats.matched % plan.every:
                return None, delay
            fault = plan.faults[injected % len(plan.faults)]
            self.stats.injected[fault] += 1
            return fault, delay

    # ---- HTTP -------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                """Silent: one line per request would drown test output."""

            def _read_body(self) -> bytes | None:
                """The whole request body, or None when the client went away mid-body.

                A real S3 (and moto itself) stores nothing for an incomplete body; forwarding
                the bytes that did arrive with a shortened Content-Length would create a
                truncated object that no production path can produce.
                """
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    for _ in range(_MAX_CHUNKS):
                        line = self.rfile.readline()
                        if not line.endswith(b"\n"):
                            return None
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while (line := self.rfile.readline()) not in (b"\r\n", b"\n"):
                                if not line:
                                    return None
                            return b"".join(chunks)
                        chunk = self.rfile.read(size)
                        if len(chunk) < size:
                            return None
                        chunks.append(chunk)
                        self.rfile.readline()
                    raise ValueError("chunked body too long")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                return body if len(body) == length else None

            def _reset(self) -> None:
                """Abort with RST: SO_LINGER 0 then close, the way a dropped connection looks."""
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            def _error(self, fault: str, key: str) -> None:
                status, code, message = _ERRORS[fault]
                n = proxy.stats.requests
                body = b""
                if self.command != "HEAD":
                    body = _XML_ERROR.format(
                        code=code, message=message, resource="/" + key, n=n
                    ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("x-amz-request-id", f"fault-proxy-{n}")
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS
                    }
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    self.send_response(response.status, response.reason)
                    for k, v in response.getheaders():
                        if k.lower() not in _HOP_HEADERS and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        length = response.getheader("Content-Length")
                        self.send_header("Content-Length", length or "0")
                    else:
                        self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD" and payload:
                        self.wfile.write(payload)
                finally:
                    conn.close()

            def _handle(self) -> None:
                key = unquote(urlsplit(self.path).path.lstrip("/"))
                body = self._read_body()
                if body is None:  # the client died mid-request: nothing reaches the server
                    self.close_connection = True
                    return
                fault, delay = proxy._decide(self.command, key)
                if delay:
                    time.sleep(delay)
                if fault == "reset":
                    self._reset()
                elif fault is not None:
                    self._error(fault, key)
                else:
                    self._forward(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815

        return Handler


@contextmanager
def fault_proxy(upstream_url: str, plan: FaultPlan | None = None) -> Iterator[S3FaultProxy]:
    """``with fault_proxy(url, plan) as proxy:`` a started proxy, always stopped afterwards."""
    proxy = S3FaultProxy(upstream_url, plan)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
