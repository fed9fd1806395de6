"""``/metrics`` and ``/healthz`` on one small HTTP server, shared by all four programs.

The bind address is always the caller's choice (the programs default to 127.0.0.1); binding to
all addresses is allowed only when asked for explicitly, and is logged.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

HealthCheck = Callable[[], bool]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    serving: Serving


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, generate_latest(self.server.serving.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            failing = self.server.serving.failing_checks()
            if failing:
                self._reply(503, ("unhealthy: " + ", ".join(failing) + "\n").encode(), "text/plain")
            else:
                self._reply(200, b"ok\n", "text/plain")
        else:
            self._reply(404, b"not found\n", "text/plain")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class Serving:
    """The metrics/health server; ``port=0`` picks a free port (see ``.port`` after ``start``)."""

    def __init__(self, address: str, port: int, registry: CollectorRegistry | None = None) -> None:
        self.address = address
        self.registry = registry if registry is not None else REGISTRY
        self._requested_port = port
        self._checks: dict[str, HealthCheck] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def add_health_check(self, name: str, check: HealthCheck) -> None:
        """``check()`` returning False (or raising) makes /healthz answer 503 naming ``name``."""
        with self._lock:
            self._checks[name] = check

    def failing_checks(self) -> list[str]:
        with self._lock:
            checks = list(self._checks.items())
        failing = []
        for name, check in checks:
            try:
                ok = bool(check())
            except Exception:
                log.exception("health check %s raised", name)
                ok = False
            if not ok:
                failing.append(name)
        return failing

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("already serving")
        if _is_wildcard(self.address):
            log.warning("metrics/health server binding to all addresses (%r) as configured", self.address)
        server_cls = _Server6 if ":" in self.address else _Server
        server = server_cls((self.address, self._requested_port), _Handler)
        server.serving = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="serving", daemon=True
        )
        self._thread.start()
        log.info("serving /metrics and /healthz on %s", self.url)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


def _is_wildcard(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return address == ""
