"""Health telemetry: points in InfluxDB (VictoriaMetrics as the stand-in), bounded when down."""

from __future__ import annotations

import json

import pytest

from fleet.config import Settings
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.ingest.worker import IngestWorker
from fleet.services import registry
from fleet.services.clock import now_ms
from fleet.services.telemetry import InfluxTelemetry, health_point
from tests.fleet.test_ingest_worker import AckListener, publish, votes
from tests.services.common import free_port
from tests.services.mosquitto import MosquittoBroker
from tests.services.victoria import VictoriaMetrics

DEV = "pt-0000000000a1"
SAMPLE = {"ts_ms": None, "uptime_s": 120, "heap_free": 51234, "rssi": -67, "battery_mv": None,
          "queue": 3, "fw": "0.1.0", "content_version": 2, "reset_cause": "watchdog",
          "reconnects": 1, "dropped": 0, "resends": 2, "corrupt": 0, "note": "ignored",
          "bogus": True}


def test_health_point_keeps_numbers_as_fields_and_strings_as_tags() -> None:
    point = health_point(DEV, SAMPLE, {"site": "4", "customer": "", "board": "sim"}, 1_000)
    assert point is not None
    line = point.to_line_protocol()
    assert line.startswith(f"health,board=sim,device={DEV},fw=0.1.0,reset_cause=watchdog,site=4 ")
    assert "heap_free=51234i" in line and "queue=3i" in line and "rssi=-67i" in line
    assert "battery_mv" not in line and "bogus" not in line and "note" not in line
    assert line.endswith(" 1000")
    assert health_point(DEV, {"fw": "x", "bogus": True}, {}, 1) is None


@pytest.mark.victoria
def test_samples_land_in_the_influxdb_compatible_store(victoria: VictoriaMetrics) -> None:
    telemetry = InfluxTelemetry(victoria.url, "token", "palaute", "palaute",
                                flush_interval_s=0.05)
    now = now_ms()
    telemetry.write(DEV, SAMPLE, {"site": "4", "customer": "9", "board": "sim"}, now)
    telemetry.write("pt-0000000000a2", {**SAMPLE, "heap_free": 40000}, {"site": "5"}, now)
    assert telemetry.flush(10)
    telemetry.close()
    assert telemetry.stats.written == 2 and telemetry.stats.dropped == {}
    rows = victoria.query('health_heap_free{device=~"pt-0000000000a[12]"}', expect=2)
    values = {r["metric"]["device"]: float(r["value"][1]) for r in rows}
    assert values == {DEV: 51234.0, "pt-0000000000a2": 40000.0}
    labels = next(r["metric"] for r in rows if r["metric"]["device"] == DEV)
    assert (labels["site"], labels["customer"], labels["board"], labels["fw"]) == (
        "4", "9", "sim", "0.1.0")


def test_influxdb_down_never_blocks_and_losses_are_counted() -> None:
    # Nothing listens on this port: every send fails, the buffer stays within its bound.
    telemetry = InfluxTelemetry(f"http://127.0.0.1:{free_port()}", "t", "o", "b",
                                max_buffer=5, flush_interval_s=0.01)
    telemetry.retry_initial_s = telemetry.retry_max_s = 0.01
    for index in range(12):
        telemetry.write(DEV, {**SAMPLE, "queue": index}, {}, now_ms())
    assert telemetry.buffered <= 5
    assert telemetry.stats.dropped["buffer_full"] >= 7
    assert not telemetry.flush(0.3)  # cannot drain while the server is away
    telemetry.close(timeout=0.3)
    lost = sum(telemetry.stats.dropped.values())
    assert telemetry.stats.written == 0 and lost == 12
    assert telemetry.stats.failed_batches >= 1


@pytest.mark.mosquitto
@pytest.mark.victoria
def test_worker_writes_health_with_registry_tags(
        mosquitto: MosquittoBroker, victoria: VictoriaMetrics, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    from fleet.db.migrate import upgrade

    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Telemetry Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Gate 12")
        registry.register_device(session, device_id=DEV, board="esp32-devkitc")
        registry.assign_device(session, device_id=DEV, site_id=site.id, at_ms=0)
        site_id, customer_id = site.id, customer.id
    telemetry = InfluxTelemetry(victoria.url, "t", "palaute", "palaute", flush_interval_s=0.05)
    settings = Settings(db_url=url, environment="test", mqtt_url=mosquitto.url_for(
        mosquitto.admin_user, mosquitto.admin_password))
    worker = IngestWorker(settings, sessions, client_id="telemetry-ingest", telemetry=telemetry)
    worker.start()
    listener = AckListener(mosquitto)
    try:
        assert worker.wait_ready(15)
        publish(mosquitto, f"fb/v1/d/{DEV}/health", json.dumps(SAMPLE).encode())
        publish(mosquitto, "fb/v1/d/pt-00000000ffff/health", json.dumps(SAMPLE).encode())
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([1, now_ms(), 1, 0, 0]))
        listener.next()  # the vote after the health samples: both were processed by now
        assert telemetry.flush(10)
    finally:
        listener.close()
        worker.stop()
    rows = victoria.query(f'health_queue{{device="{DEV}"}}', expect=1)
    assert len(rows) == 1 and float(rows[0]["value"][1]) == 3.0
    labels = rows[0]["metric"]
    assert (labels["site"], labels["customer"], labels["board"]) == (
        str(site_id), str(customer_id), "esp32-devkitc")
    assert victoria.query('health_queue{device="pt-00000000ffff"}') == []
    assert worker.metrics.get("palaute_ingest_refused_total", reason="unknown_device") == 1
