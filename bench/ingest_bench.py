"""Ingest benchmarks: broker rate, ``palaute ingest`` throughput, latency and memory.

    .venv/bin/python -m bench.ingest_bench [--quick]

Starts a real Mosquitto (a fresh one per run, so no persistent session of an earlier run
takes a share of the messages) and a throw-away PostgreSQL cluster from ``tests/services``,
generates the vote messages once, and measures in one run:

1. **raw broker rate**: the generated messages published by ``mosquitto_pub -q 1 -M 1000 -l``
   (one process per device topic, all in parallel) and received by ``mosquitto_sub -q 1``,
   which only counts: the ceiling any consumer on this machine can reach;
2. **ingest throughput**: the same messages consumed by one ``palaute ingest`` process that
   commits to PostgreSQL or SQLite and publishes acks; the clock stops when every device's
   ack for its last seq has arrived (acks are counted by a subscriber on
   ``fb/v1/d/+/ack``).  Two shapes: 1 vote per message and 50 votes per message;
3. **latency** press -> committed, at about 10 %, 50 % and 80 % of the 1-vote rate measured
   in 2 (the rate of draining a burst) on PostgreSQL: each vote carries its creation time
   in ``ts_ms``, lines are fed to ``mosquitto_pub`` at a paced rate, and a vote counts as
   committed when an ack covering its seq arrives;
4. **memory**: the ingest process's resident set while 10,000 devices send.

Every device is registered (bulk insert) before the runs.  Prints a table and writes
``bench/results/ingest.json``.  Not part of pytest: the numbers depend on the machine.

``--compare N`` measures only the 1-vote shape on PostgreSQL, N rounds of: the raw rate, then
each way of running the worker (``VARIANTS``: one or two processes on the shared
subscription, MQTT 3.1.1), back to back, and writes ``bench/results/ingest-compare.json``.
With ``--baseline COMMIT`` each round also runs the worker of that commit (its ``fleet/``
exported with ``git archive`` and put first on ``PYTHONPATH``), one and two processes: a
before/after comparison in the same rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, insert, select

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Assignment, Customer, Device, DeviceState, Site
from fleet.db.models import Vote as VoteRow
from tests.services.common import require_binary, wait_until
from tests.services.ingest import IngestProcess
from tests.services.mosquitto import INSTALL_HINT, MosquittoBroker
from tests.services.postgres import PostgresServer, postgres_bin_dirs

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
FLEET_SIZE = 10_000  # devices in the registry; the memory run uses all of them
PUBLISHERS = 50  # devices (= mosquitto_pub processes) in the throughput runs
RATIO_GOAL = 0.5
PG_VOTES_GOAL = 50_000


def device_id(index: int) -> str:
    """The id of bench device ``index``."""
    return f"pt-be{index:010x}"


class BenchBroker(MosquittoBroker):
    """The test broker with limits for bulk traffic.

    Unbounded queues: ``mosquitto_pub -M 1000`` outruns every consumer, and the default
    bound would drop messages instead of measuring.  1000 messages in flight to a 3.1.1
    subscriber (``mosquitto_sub``; MQTT 5 clients such as the ingest worker state their own
    Receive Maximum), matching the publishers' ``-M 1000``.
    """

    def _write_config(self) -> None:
        super()._write_config()
        with open(self.config_file, "a") as config:
            config.write("max_queued_messages 0\nmax_inflight_messages 1000\n")


@dataclass
class Shape:
    """A generated workload: per device, the lines ``mosquitto_pub -l`` publishes."""

    name: str
    votes_per_message: int
    files: dict[str, Path]
    messages: int
    votes: int
    last_seq: int


def generate(workdir: Path, name: str, *, devices: int, messages_per_device: int,
             votes_per_message: int) -> Shape:
    """Write one file of messages per device, each message with ``after`` like a terminal."""
    files: dict[str, Path] = {}
    ts = int(time.time() * 1000)
    for index in range(devices):
        path = workdir / f"{name}-{index}.txt"
        lines = []
        for m in range(messages_per_device):
            first = m * votes_per_message + 1
            votes = [[seq, ts, 1 + seq % 4, 0, 1]
                     for seq in range(first, first + votes_per_message)]
            lines.append(json.dumps({"votes": votes, "after": first - 1},
                                    separators=(",", ":")))
        path.write_text("\n".join(lines) + "\n")
        files[device_id(index)] = path
    messages = devices * messages_per_device
    return Shape(name, votes_per_message, files, messages, messages * votes_per_message,
                 messages_per_device * votes_per_message)


class AckCounter:
    """Subscriber on ``fb/v1/d/+/ack``: counts acks, notes when each device is fully acked."""

    def __init__(self, broker: MosquittoBroker, expected_last: dict[str, int]) -> None:
        self.expected = expected_last
        self.count = 0
        self.done = threading.Event()
        self.arrivals: list[tuple[str, int, int]] = []  # device, seq, arrival ms
        self._complete: set[str] = set()
        self._ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-acks",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.admin_user, broker.admin_password)
        self.client.on_connect = lambda c, *_: c.subscribe("fb/v1/d/+/ack", 1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("ack counter could not subscribe")

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        arrival = int(time.time() * 1000)
        device = message.topic.split("/")[3]
        seq = int(json.loads(message.payload)["seq"])
        self.count += 1
        self.arrivals.append((device, seq, arrival))
        if seq >= self.expected.get(device, 1 << 62) and device not in self._complete:
            self._complete.add(device)
            if len(self._complete) == len(self.expected):
                self.done.set()

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class Bench:
    """The services shared by every run, and helpers to run one measurement."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.postgres = PostgresServer(workdir / "postgres")
        self.mosquitto_pub = require_binary("mosquitto_pub", INSTALL_HINT)
        self.mosquitto_sub = require_binary("mosquitto_sub", INSTALL_HINT)
        self._runs = 0

    @contextmanager
    def broker(self) -> Iterator[MosquittoBroker]:
        """A fresh broker for one run."""
        self._runs += 1
        broker = BenchBroker(self.workdir / f"mosquitto-{self._runs}")
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()

    def database(self, kind: str) -> str:
        """A migrated database (``postgres`` or ``sqlite``) with the whole fleet registered."""
        self._runs += 1
        if kind == "postgres":
            url = self.postgres.create_database(f"bench{self._runs}")
        else:
            url = f"sqlite:///{self.workdir / f'bench{self._runs}.db'}"
        upgrade(url)
        with make_sessionmaker(make_engine(url)).begin() as session:
            customer = Customer(name="Bench Oy", created_ms=0)
            session.add(customer)
            session.flush()
            site = Site(customer_id=customer.id, name="Bench", created_ms=0)
            session.add(site)
            session.flush()
            session.execute(insert(Device), [
                {"id": device_id(i), "board": "bench", "state": DeviceState.assigned,
                 "notes": "", "created_ms": 0, "acked_seq": 0, "online": False}
                for i in range(FLEET_SIZE)])
            session.execute(insert(Assignment), [
                {"device_id": device_id(i), "site_id": site.id, "start_ms": 0}
                for i in range(FLEET_SIZE)])
        return url

    def common_args(self, broker: MosquittoBroker) -> list[str]:
        """Host, port and admin credentials for the mosquitto clients."""
        return ["-h", broker.host, "-p", str(broker.port), "-u", broker.admin_user,
                "-P", broker.admin_password]

    def publishers(self, broker: MosquittoBroker, shape: Shape) -> list[subprocess.Popen[bytes]]:
        """One ``mosquitto_pub -l`` per device topic, each reading its file."""
        processes = []
        for device, path in shape.files.items():
            with open(path, "rb") as lines:
                processes.append(subprocess.Popen(
                    [self.mosquitto_pub, *self.common_args(broker), "-q", "1", "-M", "1000",
                     "-l", "-t", f"fb/v1/d/{device}/votes"], stdin=lines))
        return processes

    def start_ingest(self, broker: MosquittoBroker, db_url: str, worker_id: str,
                     extra_env: dict[str, str] | None = None) -> IngestProcess:
        """``palaute ingest`` subscribed and ready (seen in the broker's log)."""
        worker = IngestProcess(db_url=db_url, workdir=self.workdir, worker_id=worker_id,
                               mqtt_url=broker.url_for(broker.admin_user,
                                                       broker.admin_password),
                               extra_env=extra_env)
        worker.start_subscribed(broker, timeout=60)
        return worker


def raw_rate(bench: Bench, shape: Shape) -> dict[str, float]:
    """Messages/s through the broker to a counting ``mosquitto_sub`` at QoS 1."""
    with bench.broker() as broker:
        offset = broker.log_file.stat().st_size
        counter = subprocess.Popen(
            [bench.mosquitto_sub, *bench.common_args(broker), "-q", "1", "-i", "bench-raw",
             "-t", "fb/v1/d/+/votes", "-C", str(shape.messages)], stdout=subprocess.DEVNULL)

        def subscribed() -> bool:
            with open(broker.log_file, "rb") as log:
                log.seek(offset)
                return b"bench-raw 1 fb/v1/d/+/votes" in log.read()
        wait_until(subscribed, 30, "mosquitto_sub to subscribe")
        started = time.monotonic()
        for process in bench.publishers(broker, shape):
            process.wait()
        counter.wait(timeout=300)
        seconds = time.monotonic() - started
    return {"messages": shape.messages, "seconds": round(seconds, 3),
            "messages_per_s": round(shape.messages / seconds)}


def rss_kib(pid: int) -> tuple[int, int]:
    """(current, peak) resident set of process ``pid`` in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def count_votes(db_url: str) -> int:
    """Votes stored in ``db_url``."""
    with make_sessionmaker(make_engine(db_url))() as session:
        return int(session.scalar(select(func.count()).select_from(VoteRow)) or 0)


def ingest_rate(bench: Bench, shape: Shape, kind: str, processes: int = 1,
                extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Throughput of ``processes`` ``palaute ingest`` workers (one shared subscription)
    committing to ``kind``, acks included."""
    db_url = bench.database(kind)
    with bench.broker() as broker:
        workers = [bench.start_ingest(broker, db_url, f"bench-{kind}-{shape.name}-{n}",
                                      extra_env) for n in range(processes)]
        worker = workers[0]
        acks = AckCounter(broker, dict.fromkeys(shape.files, shape.last_seq))
        try:
            started = time.monotonic()
            publishers = bench.publishers(broker, shape)
            for process in publishers:
                process.wait()
            published = time.monotonic() - started
            if not acks.done.wait(600):
                raise RuntimeError(f"not every device was acked\n{worker.log_tail()}")
            # With several workers on the shared subscription, one can ack a device's last
            # seq while another still holds earlier messages of it: the clock stops when
            # every vote is committed (one count query when a single worker already did).
            engine = make_engine(db_url)

            def all_committed() -> bool:
                with engine.connect() as connection:  # a fresh snapshot every time
                    return connection.scalar(
                        select(func.count()).select_from(VoteRow)) == shape.votes
            try:
                wait_until(all_committed, 120,
                           f"{shape.votes} votes committed\n{worker.log_tail()}", 0.01)
            finally:
                engine.dispose()
            seconds = time.monotonic() - started
            peak = 0
            for each in workers:
                assert each.process is not None
                # A supervisor's workers are its children: the largest process counts.
                for pid in (each.process.pid, *(each.children() if each.processes > 1 else ())):
                    peak = max(peak, rss_kib(pid)[1])
        finally:
            acks.close()
            for each in workers:
                each.stop()
    stored = count_votes(db_url)
    if stored != shape.votes:
        raise RuntimeError(f"{stored} votes stored, {shape.votes} published")
    return {"db": kind, "votes_per_message": shape.votes_per_message, "processes": processes,
            "processes_per_command": worker.processes,
            "messages": shape.messages, "votes": shape.votes, "acks": acks.count,
            "seconds": round(seconds, 3), "publish_seconds": round(published, 3),
            "messages_per_s": round(shape.messages / seconds),
            "votes_per_s": round(shape.votes / seconds), "peak_rss_mib": round(peak / 1024, 1)}


def percentile(values: list[int], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))])


def paced(bench: Bench, rate: float, seconds: float, kind: str, devices: int
          ) -> dict[str, Any]:
    """Latency press -> ack at ``rate`` messages/s (1 vote each) for ``seconds``."""
    db_url = bench.database(kind)
    with bench.broker() as broker:
        worker = bench.start_ingest(broker, db_url, f"bench-paced-{round(rate)}")
        total = int(rate * seconds)
        per_device = total // devices
        names = [device_id(i) for i in range(devices)]
        acks = AckCounter(broker, dict.fromkeys(names, per_device))
        pipes: list[subprocess.Popen[bytes]] = [subprocess.Popen(
            [bench.mosquitto_pub, *bench.common_args(broker), "-q", "1", "-M", "1000", "-l",
             "-t", f"fb/v1/d/{name}/votes"], stdin=subprocess.PIPE) for name in names]
        pressed: dict[tuple[str, int], int] = {}
        try:
            started = time.monotonic()
            sent = 0
            # Lines go out in ticks of 5 ms, one write per pipe and tick (the generator shares
            # the two cores with everything it measures); each line is stamped when made.
            while sent < per_device * devices:
                due = min(per_device * devices, int((time.monotonic() - started) * rate) + 1)
                chunks: dict[int, list[bytes]] = {}
                while sent < due:
                    index, seq = sent % devices, sent // devices + 1
                    ts = int(time.time() * 1000)
                    pressed[(names[index], seq)] = ts
                    chunks.setdefault(index, []).append(
                        b'{"votes":[[%d,%d,1,0,1]],"after":%d}\n' % (seq, ts, seq - 1))
                    sent += 1
                for index, lines in chunks.items():
                    stdin = pipes[index].stdin
                    assert stdin is not None
                    stdin.write(b"".join(lines))
                    stdin.flush()
                time.sleep(0.005)  # pacing of a load generator, not synchronisation
            achieved = sent / (time.monotonic() - started)
            for pipe in pipes:
                _close(pipe.stdin)
            if not acks.done.wait(120):
                raise RuntimeError(f"paced run: not every device was acked\n{worker.log_tail()}")
        finally:
            for pipe in pipes:
                _close(pipe.stdin)
                pipe.wait()
            acks.close()
            worker.stop()
    latencies = committed_latencies(pressed, acks.arrivals)
    return {"target_messages_per_s": round(rate), "achieved_messages_per_s": round(achieved),
            "votes": len(latencies), "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99), "max_ms": max(latencies),
            "mean_ms": round(statistics.fmean(latencies), 1)}


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None and not stream.closed:
        stream.close()


def committed_latencies(pressed: dict[tuple[str, int], int],
                        arrivals: list[tuple[str, int, int]]) -> list[int]:
    """Per vote: arrival of the first ack covering it minus its ``ts_ms``."""
    acked: dict[str, int] = {}
    latencies: list[int] = []
    for device, seq, arrival in sorted(arrivals, key=lambda a: a[2]):
        previous = acked.get(device, 0)
        for covered in range(previous + 1, seq + 1):
            ts = pressed.get((device, covered))
            if ts is not None:
                latencies.append(arrival - ts)
        acked[device] = max(previous, seq)
    return latencies


def memory(bench: Bench, kind: str, messages_per_device: int) -> dict[str, Any]:
    """Ingest RSS while all ``FLEET_SIZE`` devices send (paho publisher: one topic each)."""
    db_url = bench.database(kind)
    with bench.broker() as broker:
        worker = bench.start_ingest(broker, db_url, "bench-memory")
        assert worker.process is not None
        pid = worker.process.pid
        idle, _ = rss_kib(pid)
        names = [device_id(i) for i in range(FLEET_SIZE)]
        acks = AckCounter(broker, dict.fromkeys(names, messages_per_device))
        publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet",
                                protocol=mqtt.MQTTv311)
        publisher.username_pw_set(broker.admin_user, broker.admin_password)
        publisher.max_inflight_messages_set(1000)
        publisher.connect(broker.host, broker.port)
        publisher.loop_start()
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                samples.append(rss_kib(pid)[0])
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            started = time.monotonic()
            ts = int(time.time() * 1000)
            for m in range(1, messages_per_device + 1):
                for name in names:
                    publisher.publish(f"fb/v1/d/{name}/votes",
                                      b'{"votes":[[%d,%d,2,0,1]],"after":%d}' % (m, ts, m - 1),
                                      qos=1)
            if not acks.done.wait(300):
                raise RuntimeError(f"memory run: not every device was acked\n"
                                   f"{worker.log_tail()}")
            seconds = time.monotonic() - started
            current, peak = rss_kib(pid)
        finally:
            stop.set()
            sampler.join()
            publisher.disconnect()
            publisher.loop_stop()
            acks.close()
            worker.stop()
    return {"db": kind, "devices": FLEET_SIZE, "messages": FLEET_SIZE * messages_per_device,
            "seconds": round(seconds, 2), "idle_rss_mib": round(idle / 1024, 1),
            "rss_after_mib": round(current / 1024, 1),
            "peak_rss_mib": round(max([peak, *samples]) / 1024, 1)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(command: list[str]) -> str:
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    mosquitto = require_binary("mosquitto", INSTALL_HINT, ("/usr/sbin",))
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "mosquitto": version([mosquitto, "-h"]),
            "postgres": next((version([str(Path(d) / "postgres"), "-V"])
                              for d in postgres_bin_dirs()), "?")}


def run(quick: bool) -> dict[str, Any]:
    """Every measurement; returns the results document."""
    scale = 0.25 if quick else 1.0
    workdir = Path(tempfile.mkdtemp(prefix="palaute-ingest-bench-"))
    bench = Bench(workdir)
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "quick": quick}

    def step(what: str, action: Callable[..., Any], *args: Any) -> Any:
        print(f"[{time.monotonic() - started:6.1f}s] {what} ...", flush=True)
        return action(*args)
    try:
        bench.postgres.start()
        shapes = [
            generate(workdir, "v1", devices=PUBLISHERS,
                     messages_per_device=int(2000 * scale), votes_per_message=1),
            generate(workdir, "v50", devices=PUBLISHERS,
                     messages_per_device=int(100 * scale), votes_per_message=50),
        ]
        results["raw"] = {s.name: step(f"raw broker rate, {s.name}", raw_rate, bench, s)
                          for s in shapes}
        results["ingest"] = [step(f"ingest {kind} {s.name}", ingest_rate, bench, s, kind)
                             for s in shapes for kind in ("postgres", "sqlite")]
        # The same command with two worker processes under it (one per core here).
        results["ingest"].append(step("ingest postgres v1, --processes 2", ingest_rate, bench,
                                      shapes[0], "postgres", 1,
                                      {"PALAUTE_INGEST_PROCESSES": "2"}))
        sustained = next(r["messages_per_s"] for r in results["ingest"]
                         if r["db"] == "postgres" and r["votes_per_message"] == 1)
        results["latency"] = [
            {"share": share, **step(f"latency at {int(share * 100)}% of {sustained} msg/s",
                                    paced, bench, share * sustained, 6 * scale + 2,
                                    "postgres", 20)}
            for share in (0.1, 0.5, 0.8)]
        results["memory"] = step("memory, 10,000 devices", memory, bench, "postgres",
                                 2 if quick else 5)
        for row in results["ingest"]:
            raw = results["raw"]["v1" if row["votes_per_message"] == 1 else "v50"]
            row["ratio_to_raw"] = round(row["messages_per_s"] / raw["messages_per_s"], 3)
        results["goals"] = goals(results)
        results["seconds"] = round(time.monotonic() - started, 1)
    finally:
        bench.postgres.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """The two throughput goals, met or not."""
    rows = results["ingest"]
    v1 = {_label(r): r["ratio_to_raw"] for r in rows if r["votes_per_message"] == 1}
    pg50 = next(r for r in rows if r["db"] == "postgres" and r["votes_per_message"] == 50)
    return {
        "ratio_at_1_vote_goal": RATIO_GOAL,
        "ratio_at_1_vote": v1,
        "ratio_met": {label: ratio >= RATIO_GOAL for label, ratio in v1.items()},
        "pg_votes_per_s_at_50_goal": PG_VOTES_GOAL,
        "pg_votes_per_s_at_50": pg50["votes_per_s"],
        "pg_votes_met": pg50["votes_per_s"] >= PG_VOTES_GOAL,
    }


def _label(row: dict[str, Any]) -> str:
    per_command = row.get("processes_per_command", 1)
    return row["db"] + (f", --processes {per_command}" if per_command > 1 else "")


def print_table(results: dict[str, Any]) -> None:
    """The results as a readable table."""
    print(f"\nmachine: {results['machine']['cores']} cores, {results['machine']['cpu']}")
    for name, raw in results["raw"].items():
        print(f"raw broker {name:4s}: {raw['messages_per_s']:>8} msg/s")
    print(f"{'db':24s} {'v/msg':>5s} {'msg/s':>8s} {'votes/s':>8s} {'ratio':>6s} "
          f"{'acks':>7s} {'RSS MiB':>8s}")
    for r in results["ingest"]:
        print(f"{_label(r):24s} {r['votes_per_message']:5d} {r['messages_per_s']:8d} "
              f"{r['votes_per_s']:8d} {r['ratio_to_raw']:6.3f} {r['acks']:7d} "
              f"{r['peak_rss_mib']:8.1f}")
    for lat in results["latency"]:
        print(f"latency at {lat['achieved_messages_per_s']} msg/s "
              f"({int(lat['share'] * 100)}%): p50 {lat['p50_ms']:.0f} ms, "
              f"p99 {lat['p99_ms']:.0f} ms, max {lat['max_ms']} ms")
    mem = results["memory"]
    print(f"memory with {mem['devices']} devices: idle {mem['idle_rss_mib']} MiB, "
          f"peak {mem['peak_rss_mib']} MiB")
    print(f"goals: {json.dumps(results['goals'])}")
    print(f"total {results['seconds']} s")


# The ways of running the worker that ``--compare`` measures side by side at 1 vote/message.
# (commands started, environment); every other setting is the default.
VARIANTS: dict[str, tuple[int, dict[str, str]]] = {
    "1 process, 1 writer": (1, {"PALAUTE_INGEST_WRITERS": "1"}),
    "1 process, 2 writers": (1, {"PALAUTE_INGEST_WRITERS": "2"}),
    "1 process, MQTT 3.1.1": (1, {"PALAUTE_MQTT_PROTOCOL": "3.1.1"}),
    "2 processes": (2, {}),
    "--processes 2": (1, {"PALAUTE_INGEST_PROCESSES": "2"}),
}


def baseline_variants(commit: str, workdir: Path) -> dict[str, tuple[int, dict[str, str]]]:
    """Variants running the ``fleet/`` package of ``commit`` (exported into ``workdir``)."""
    root = Path(__file__).resolve().parent.parent
    target = workdir / f"baseline-{commit}"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", commit, "fleet"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    env = {"PYTHONPATH": str(target)}
    return {f"{commit} 1 process": (1, env), f"{commit} 2 processes": (2, env)}


def compare(repeats: int, quick: bool, variants: list[str],
            baseline: str | None = None) -> dict[str, Any]:
    """``repeats`` rounds of: raw broker rate, then each variant on PostgreSQL, back to back.

    The machine is shared and noisy; the ratio of each variant to the raw rate measured in
    the same round is what compares across rounds.
    """
    scale = 0.25 if quick else 1.0
    workdir = Path(tempfile.mkdtemp(prefix="palaute-ingest-compare-"))
    bench = Bench(workdir)
    rounds: list[dict[str, Any]] = []
    ways = {name: VARIANTS[name] for name in variants}
    if baseline:
        ways = {**baseline_variants(baseline, workdir), **ways}
    try:
        bench.postgres.start()
        shape = generate(workdir, "v1", devices=PUBLISHERS,
                         messages_per_device=int(2000 * scale), votes_per_message=1)
        for number in range(repeats):
            raw = raw_rate(bench, shape)["messages_per_s"]
            row: dict[str, Any] = {"raw_messages_per_s": raw}
            for name, (processes, env) in ways.items():
                print(f"  {name} ...", flush=True)
                rate = ingest_rate(bench, shape, "postgres", processes, env)["messages_per_s"]
                row[name] = {"messages_per_s": rate, "ratio_to_raw": round(rate / raw, 3)}
            print(f"round {number + 1}: {json.dumps(row)}", flush=True)
            rounds.append(row)
    finally:
        bench.postgres.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine(), "messages": shape.messages, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write ``bench/results/ingest.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--quick", action="store_true", help="a quarter of the messages")
    parser.add_argument("--compare", type=int, metavar="ROUNDS", default=0,
                        help="only compare ways of running the worker at 1 vote/message, "
                             "this many rounds (writes bench/results/ingest-compare.json)")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help="with --compare: the variants to run (default: all)")
    parser.add_argument("--baseline", metavar="COMMIT",
                        help="with --compare: also run the worker of this git commit")
    args = parser.parse_args(argv)
    if args.compare:
        compared = compare(args.compare, args.quick, args.variant or list(VARIANTS),
                           args.baseline)
        path = RESULTS.with_name("ingest-compare.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compared, indent=2) + "\n")
        print(f"wrote {path}")
        return 0
    results = run(args.quick)
    print_table(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
