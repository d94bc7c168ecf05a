"""``palaute rollout run`` as a real process: it ticks on its own, publishes ``desired`` to the
real broker, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.rollouts import service
from fleet.rollouts.packages import StoredPackages
from fleet.rollouts.service import RolloutPlan
from tests.fleet.rollout_helpers import (
    Watcher,
    desired_of,
    device_ids,
    make_fleet,
    sessions_for,
    store_content,
)
from tests.services.common import wait_until
from tests.services.mosquitto import MosquittoBroker

pytestmark = pytest.mark.mosquitto
PALAUTE = Path(sys.executable).parent / "palaute"


def test_the_engine_process_delivers_and_stops_on_sigterm(
        mosquitto: MosquittoBroker, db_url: str, tmp_path: Path) -> None:
    ids = device_ids(3, prefix="0000ee")
    sessions = sessions_for(db_url)
    with sessions.begin() as session:
        site_id = make_fleet(session, ids)
        store_content(session, 7)
        rollout_id = service.create_rollout(session, plan=RolloutPlan(
            content_version=7, target_kind="site", target_ref=str(site_id)),
            packages=StoredPackages()).id
    watcher = Watcher(mosquitto)
    env = dict(os.environ, PALAUTE_DB_URL=db_url, PALAUTE_ENVIRONMENT="test",
               PALAUTE_MQTT_URL=mosquitto.url_for(mosquitto.admin_user,
                                                  mosquitto.admin_password),
               PALAUTE_ROLLOUT_TICK_S="0.2")
    log = tmp_path / "engine.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(PALAUTE), "rollout", "run", "--client-id", "t-engine"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        got = sorted(desired_of(m) for m in watcher.take(3, timeout=30))
        assert [d for d, _ in got] == ids
        assert all(doc is not None and doc["version"] == 7 for _, doc in got)
        # desired goes out before the engine commits: the database follows a moment later.
        def delivered() -> bool:
            with sessions() as session:
                return service.rollout_counts(session, rollout_id).total == {"delivered": 3}
        wait_until(delivered, 15, "the wave to be committed")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        watcher.close()
    assert code == 0, log.read_text()
