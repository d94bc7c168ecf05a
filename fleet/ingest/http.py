"""A tiny HTTP endpoint for an ingest worker: ``/metrics`` (Prometheus) and ``/healthz``.

``palaute ingest --metrics-port N`` starts it.  The standard library's
``ThreadingHTTPServer`` in a daemon thread is all it takes: a scrape every few seconds is no
load, and the worker gains no web-framework dependency.  Handlers only read thread-safe state
(:class:`fleet.ingest.metrics.Metrics` and a health callback), so they never slow ingest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fleet.ingest.metrics import Metrics

log = logging.getLogger("palaute.ingest.http")

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (healthy, detail): detail says what is wrong, or "ok".
HealthCheck = Callable[[], tuple[bool, str]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung scraper never blocks shutdown
    metrics: Metrics
    health: HealthCheck


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "palaute-ingest"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.server.metrics.render(), PROMETHEUS_CONTENT_TYPE)
        elif path == "/healthz":
            healthy, detail = self.server.health()
            self._reply(200 if healthy else 503, detail + "\n")
        else:
            self._reply(404, "not found: try /metrics or /healthz\n")

    def _reply(self, status: int, body: str,
               content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # Scrapes every few seconds would flood the worker's log at INFO.
        log.debug("%s " + format, self.address_string(), *args)


class MetricsServer:
    """Serve ``metrics`` and ``health`` over HTTP on ``host:port`` in a background thread.

    ``port=0`` binds a free port (tests); :attr:`port` tells which one after construction.
    """

    def __init__(self, metrics: Metrics, *, host: str = "127.0.0.1", port: int = 0,
                 health: HealthCheck | None = None) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.metrics = metrics
        self._server.health = health or (lambda: (True, "ok"))
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the server."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start answering requests."""
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="ingest-metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics at %s/metrics, health at %s/healthz", self.url, self.url)

    def stop(self) -> None:
        """Stop the server and release the port."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()
