"""``/metrics`` and ``/healthz`` of an ingest worker: the server alone and ``palaute ingest``."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.ingest.http import PROMETHEUS_CONTENT_TYPE, MetricsServer
from fleet.ingest.metrics import Metrics
from fleet.services import registry
from fleet.services.clock import now_ms
from tests.fleet.test_ingest_worker import AckListener, publish
from tests.services.common import free_port, wait_until
from tests.services.ingest import PALAUTE
from tests.services.mosquitto import MosquittoBroker


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET on 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    finally:
        connection.close()


def test_metrics_and_health_over_http() -> None:
    metrics = Metrics()
    metrics.describe("palaute_ingest_votes_stored_total", "Votes newly stored")
    metrics.describe("palaute_ingest_queue_depth", "Messages waiting", "gauge")
    metrics.inc("palaute_ingest_refused_total", 2, reason='odd"reason')
    metrics.set("palaute_ingest_queue_depth", 7)
    health = [(True, "ok")]
    server = MetricsServer(metrics, port=0, health=lambda: health[0])
    server.start()
    try:
        status, content_type, body = get(server.port, "/metrics")
        assert (status, content_type) == (200, PROMETHEUS_CONTENT_TYPE)
        lines = body.splitlines()
        # Described counters show 0 before their first increment; label values are escaped.
        assert "palaute_ingest_votes_stored_total 0" in lines
        assert "# TYPE palaute_ingest_queue_depth gauge" in lines
        assert "palaute_ingest_queue_depth 7" in lines
        assert 'palaute_ingest_refused_total{reason="odd\\"reason"} 2' in lines
        assert get(server.port, "/healthz")[::2] == (200, "ok\n")
        health[0] = (False, "not connected and subscribed to the broker")
        assert get(server.port, "/healthz")[::2] == (
            503, "not connected and subscribed to the broker\n")
        assert get(server.port, "/nothing")[0] == 404
    finally:
        server.stop()


@pytest.mark.mosquitto
def test_palaute_ingest_serves_metrics_on_its_port(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'palaute.db'}"
    upgrade(db_url)
    device = "pt-0000000000a1"
    with make_sessionmaker(make_engine(db_url)).begin() as session:
        registry.register_device(session, device_id=device)
    port = free_port()
    env = dict(os.environ, PALAUTE_DB_URL=db_url, PALAUTE_ENVIRONMENT="test",
               PALAUTE_MQTT_URL=mosquitto.url_for(mosquitto.admin_user,
                                                  mosquitto.admin_password))
    log_path = tmp_path / "ingest.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(PALAUTE), "ingest", "--worker-id", "http-ingest", "--metrics-port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    listener = AckListener(mosquitto)
    try:
        def healthy() -> bool:
            try:
                return get(port, "/healthz")[0] == 200
            except OSError:
                return False
        # A separate process: polling its health endpoint is the only signal there is.
        wait_until(healthy, 30, f"palaute ingest to report healthy\n{log_path.read_text()}")
        publish(mosquitto, f"fb/v1/d/{device}/votes",
                json.dumps({"votes": [[1, now_ms(), 2, 0, 0]], "after": 0}).encode())
        assert listener.next()[1]["seq"] == 1
        body = get(port, "/metrics")[2].splitlines()
        assert "palaute_ingest_votes_stored_total 1" in body
        assert 'palaute_ingest_received_total{leaf="votes"} 1' in body
        assert "palaute_ingest_connected 1" in body
    finally:
        listener.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log_path.read_text()
