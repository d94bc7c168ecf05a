"""Resilience under the real MicroPython: network cuts, broker restarts and power cuts.

Terminals run the firmware as ``micropython`` processes on simulated boards
(``simulator/harness.py``), talk to a real Mosquitto with per-device ACLs, and ``palaute
ingest`` (a subprocess) stores their votes in PostgreSQL.  Both tests compare what visitors
were told -- a ``vote`` event means the vote is in flash and the thank-you is on screen --
with what the database holds at the end: nothing lost, nothing stored twice, nothing
invented, every button as pressed.

Waiting is always on events the terminals report (``vote``, ``net``, ``link``, ``acked``,
``ready``, ``health``) with a timeout, never on sleeps.  (One short random delay picks the
instant of some kills; it waits for nothing.)  The schedules are seeded, so a failure can be
replayed; the interleaving with the processes' own timing still varies.
"""

from __future__ import annotations

import random
import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Vote
from fleet.services import registry
from simulator.harness import Harness, TerminalProcess
from tests.services.ingest import IngestProcess
from tests.services.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.micropython, pytest.mark.postgres,
              pytest.mark.slow]

# How long one event may take to show up.  Generous: CI machines have two slow cores shared
# by five MicroPython processes, Mosquitto, PostgreSQL and the ingest worker.
EVENT_TIMEOUT = 15.0
# Draining after the last network cut waits for every terminal's reconnect, and the Link's
# backoff (1 s doubling to 300 s, reset only after 60 s of stable session) cannot be
# shortened from config: after four losses the last wait is up to 8 s, after six 32 s.
DRAIN_TIMEOUT = 90.0


def terminal_config(device_id: str, broker: MosquittoBroker, password: str) -> dict[str, Any]:
    """A terminal that sends everything it stores: no abuse filtering, fast re-sends."""
    return {
        "device_id": device_id, "board": "sim", "buttons": 4,
        "mqtt": {"host": broker.host, "port": broker.port, "user": device_id,
                 "password": password},
        # An ack lost with a dropped link is only made up for by the re-send timeout.
        "ack_timeout_s": 1, "keepalive_s": 10, "health_interval_s": 3600,
        # Every press counts, so that stored flags are predictable (0).
        "min_gap_ms": 0, "burst_count": 0,
    }



@pytest.fixture
def pg_url(postgres_url: str) -> str:
    """A fresh, migrated PostgreSQL database (one is enough for these heavy tests)."""
    upgrade(postgres_url)
    return postgres_url


@pytest.fixture
def ingest(mosquitto: MosquittoBroker, pg_url: str, tmp_path: Path) -> Iterator[IngestProcess]:
    """``palaute ingest`` as a subprocess; terminals re-send until it has subscribed."""
    worker = IngestProcess(
        db_url=pg_url, workdir=tmp_path, worker_id="resilience-ingest",
        mqtt_url=mosquitto.url_for(mosquitto.admin_user, mosquitto.admin_password))
    worker.start()
    yield worker
    worker.stop()


def add_terminals(device_ids: list[str], db_url: str, broker: MosquittoBroker,
                  harness: Harness) -> list[TerminalProcess]:
    """Register, assign and give broker credentials to each device; create (not start) it."""
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Resilience Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Lobby")
        for device_id in device_ids:
            registry.register_device(session, device_id=device_id, board="sim")
            registry.assign_device(session, device_id=device_id, site_id=site.id, at_ms=0)
    terminals = []
    for device_id in device_ids:
        password = secrets.token_urlsafe(16)
        broker.add_user(device_id, password)  # the ACL confines it to fb/v1/d/<id>/#
        terminals.append(harness.add(device_id, terminal_config(device_id, broker, password)))
    return terminals


def stored_votes(db_url: str) -> dict[tuple[str, int], tuple[int, int]]:
    """Every vote in the database: (device, seq) -> (button, flags)."""
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions() as session:
        rows = session.execute(select(Vote.device_id, Vote.seq, Vote.button, Vote.flags)).all()
    return {(r.device_id, r.seq): (r.button, r.flags) for r in rows}


def wait_acked(terminal: TerminalProcess, seq: int, timeout: float) -> None:
    """Wait until an ``acked`` event covers ``seq``, including one consumed from the queue
    earlier by another wait.

    ``history`` is appended before the event is queued, so an event missing from
    ``history`` now is still ahead in the queue: checking both cannot miss one.
    """
    if any(e["ev"] == "acked" and int(e["data"]) >= seq for e in list(terminal.history)):
        return
    terminal.wait_acked(seq, timeout=timeout)


def health(terminal: TerminalProcess) -> dict[str, Any]:
    """The terminal's health report, asked for over the control channel."""
    terminal.send({"op": "health"})
    data: dict[str, Any] = terminal.wait_for("health", timeout=EVENT_TIMEOUT)["data"]
    return data


def assert_drained(terminal: TerminalProcess) -> None:
    """The terminal's flash log holds nothing unacknowledged and nothing corrupt."""
    report = health(terminal)
    assert report["queue"] == 0, f"{terminal.device_id} still holds votes: {report}"
    assert report.get("corrupt", 0) == 0, f"{terminal.device_id} found corrupt records: {report}"


def assert_no_tracebacks(harness: Harness) -> None:
    """No terminal process printed a traceback (a crashed task, an unhandled error)."""
    for device_id in harness.terminals:
        log = harness.workdir / f"{device_id}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        assert "Traceback" not in text, f"{device_id}:\n{harness.log_tail(device_id, 60)}"


def link_up(terminal: TerminalProcess, upto: int | None = None) -> bool:
    """Whether the last ``link`` event in ``history[:upto]`` says the session is up."""
    links = [e["data"] for e in terminal.history[:upto] if e["ev"] == "link"]
    return bool(links) and links[-1] is True


@contextmanager
def diagnosed(terminal: TerminalProcess, what: str) -> Iterator[None]:
    """Turn a timeout while awaiting ``terminal`` into a failure that says whether the
    terminal still answers commands, and what it reported last."""
    try:
        yield
    except TimeoutError:
        recent = [(e["ev"], e["data"]) for e in terminal.history[-12:]]
        stuck = "" if responsive(terminal) else (
            " -- and the terminal no longer answers commands: its event loop is blocked "
            "(a task runs without ever yielding)")
        pytest.fail(f"{terminal.device_id}: {what}{stuck}; last events: {recent}")


def responsive(terminal: TerminalProcess) -> bool:
    """Whether the terminal still answers a command (its event loop is running)."""
    try:
        terminal.send({"op": "health"})
        terminal.wait_for("health", timeout=3)
    except (OSError, TimeoutError):
        return False
    return True


def await_link(terminal: TerminalProcess, up: bool, since: int, timeout: float,
               why: str) -> None:
    """Wait for a ``link`` event saying ``up`` that arrived after ``history[:since]``.

    Older events may still sit unconsumed in the queue; they are recognised (by identity)
    and skipped.
    """
    old = {id(e) for e in terminal.history[:since]}
    with diagnosed(terminal, f"the MQTT session {why}"):
        terminal.wait_for("link", lambda e: e["data"] is up and id(e) not in old,
                          timeout=timeout)


def press(terminal: TerminalProcess, button: int) -> int:
    """Press ``button`` and return the seq the terminal stored the vote under."""
    terminal.send({"op": "press", "button": button})
    with diagnosed(terminal, "no vote event for a press"):
        return int(terminal.wait_for("vote", timeout=EVENT_TIMEOUT)["data"][0])


def await_session(terminal: TerminalProcess) -> None:
    """Return once the terminal's MQTT session is up: now, or after its reconnect backoff."""
    since = len(terminal.history)
    if not link_up(terminal, since):
        await_link(terminal, True, since, DRAIN_TIMEOUT, "did not come back")


def cut_and_check(terminal: TerminalProcess) -> bool:
    """Cut the terminal's network; if its MQTT session was up, await the link going down.

    A cut that leaves the session up would let the test pass without exercising anything,
    so it fails the test.  The control channel is ordered: the last ``link`` event before
    the ``net`` event tells whether the session was up when the network went.  Returns
    whether a live session was cut.
    """
    terminal.cut_network()
    net = terminal.wait_for("net", lambda e: e["data"] is False, timeout=EVENT_TIMEOUT)
    history = list(terminal.history)
    at = next(i for i in range(len(history) - 1, -1, -1) if history[i] is net)
    if not link_up(terminal, at):
        return False
    # Under MicroPython, asyncio's Stream.close() is a no-op (wait_closed() closes the
    # socket): a simulated cut that only called it would leave the session up.
    await_link(terminal, False, at, 5, "stayed up after cut_network()")
    return True


# -- 1,000 votes, network cuts and broker restarts -------------------------------------------

NET_DEVICES = [f"pt-7e51{i:08x}" for i in range(5)]
NET_VOTES = 1000
# Two cuts per terminal, not more: with two broker restarts that is four lost sessions per
# terminal, and each one doubles the ceiling of the next reconnect delay (see DRAIN_TIMEOUT).
CUTS_PER_TERMINAL = 2
CUT_PRESSES = (5, 80)  # a cut lasts this many further presses (on any terminal)


@dataclass
class NetworkPlan:
    """The seeded schedule: which terminal and button each press uses, and what happens to
    the network right after press ``i`` (``actions[i]``)."""

    presses: list[tuple[int, int]]
    actions: dict[int, list[tuple[str, int]]]


def network_plan(seed: int) -> NetworkPlan:
    """Presses on random terminals; two cuts per terminal, each right after a press on it
    (so that its upload is in flight) and restored a random number of presses later, never
    overlapping on one terminal; two broker restarts, one in each half, each at a press
    with no other action."""
    rng = random.Random(seed)
    count = len(NET_DEVICES)
    presses = [(rng.randrange(count), rng.randint(1, 4)) for _ in range(NET_VOTES)]
    actions: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for terminal in range(count):
        own = [i for i, (t, _) in enumerate(presses)
               if t == terminal and 10 <= i < NET_VOTES - CUT_PRESSES[1]]
        spans: list[tuple[int, int]] = []
        while len(spans) < CUTS_PER_TERMINAL:
            start = rng.choice(own)
            end = start + rng.randint(*CUT_PRESSES)
            if all(end < s or start > e for s, e in spans):
                spans.append((start, end))
        for start, end in spans:
            actions[start].append(("cut", terminal))
            actions[end].append(("restore", terminal))
    for low, high in ((150, 450), (550, 850)):
        # Alone at its press, so that exactly the terminals not cut have a session to lose.
        at = rng.choice([i for i in range(low, high) if i not in actions])
        actions[at].append(("restart", -1))
    return NetworkPlan(presses, dict(actions))


def test_no_vote_lost_or_duplicated_across_network_cuts_and_broker_restarts(
        mosquitto: MosquittoBroker, pg_url: str, ingest: IngestProcess,
        harness: Harness) -> None:
    terminals = add_terminals(NET_DEVICES, pg_url, mosquitto, harness)
    for terminal in terminals:
        terminal.start()
    plan = network_plan(seed=20240611)
    pressed: list[tuple[str, int, int]] = []
    cut: set[int] = set()
    drops = Counter[str]()  # live sessions ended by the schedule, by cause
    uncut_at_restarts = 0  # sessions the restarts should end: every terminal not cut
    for i, (index, button) in enumerate(plan.presses):
        actions = plan.actions.get(i, [])
        # A press takes ~0.2 ms, far less than a reconnect: without waiting for the session
        # a cut or restart would mostly hit a terminal that is still reconnecting.  Waiting
        # before the press means the press starts an upload that the cut then interrupts.
        if ("cut", index) in actions:
            await_session(terminals[index])
        if any(action == "restart" for action, _ in actions):
            for n, t in enumerate(terminals):
                if n not in cut:
                    await_session(t)
        terminal = terminals[index]
        pressed.append((terminal.device_id, press(terminal, button), button))
        for action, target in actions:
            if action == "cut":
                drops["cut"] += cut_and_check(terminals[target])
                cut.add(target)
            elif action == "restore":
                terminals[target].restore_network()
                cut.discard(target)
            else:
                marks = [len(t.history) for t in terminals]
                live = [t for t, mark in zip(terminals, marks, strict=True) if link_up(t, mark)]
                # A clean stop: every session drops at once; the ingest worker's persistent
                # session and its queued votes survive in Mosquitto's persistence file.
                mosquitto.restart()
                for t, mark in zip(terminals, marks, strict=True):
                    if t in live:
                        await_link(t, False, mark, 5, "survived a broker restart")
                drops["restart"] += len(live)
                uncut_at_restarts += len(terminals) - len(cut)
    for index in cut:
        terminals[index].restore_network()

    for terminal in terminals:
        seqs = [seq for device, seq, _ in pressed if device == terminal.device_id]
        # No kills here, so every terminal numbers its votes 1, 2, 3, ... without a gap.
        assert seqs == list(range(1, len(seqs) + 1)), terminal.device_id
        with diagnosed(terminal, f"vote {seqs[-1]} was never acknowledged"):
            wait_acked(terminal, seqs[-1], timeout=DRAIN_TIMEOUT)
        assert_drained(terminal)

    stored = stored_votes(pg_url)
    expected = {(device, seq): (button, 0) for device, seq, button in pressed}
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if stored[k] != expected[k])
    assert not missing and not extra and not wrong, (
        f"missing {missing[:10]} ({len(missing)}), extra {extra[:10]} ({len(extra)}), "
        f"wrong button/flags {wrong[:10]}\n{ingest.log_tail()}")
    assert len(stored) == NET_VOTES
    # The schedule did what it claims: every cut and every restart ended live sessions
    # (the terminals not cut at that moment, for a restart).
    print(f"live sessions dropped: {dict(drops)}")
    assert drops["cut"] == CUTS_PER_TERMINAL * len(NET_DEVICES)
    assert drops["restart"] == uncut_at_restarts
    assert_no_tracebacks(harness)


# -- SIGKILL while writing -------------------------------------------------------------------

KILL_DEVICES = [f"pt-c111{i:08x}" for i in range(2)]
KILLS = 80


@dataclass
class Life:
    """One process lifetime of a terminal, from ``ready`` to SIGKILL (or the end)."""

    ready_seq: int  # the log's last seq when the process became ready
    first_event: int  # index of its first event in ``TerminalProcess.history``
    sent: list[int] = field(default_factory=list)  # buttons of the presses sent, in order
    votes: list[list[int]] = field(default_factory=list)  # its vote events: [seq, button, flags]


class Tracked:
    """A terminal and its lives, with the checks that can be made as each one ends."""

    def __init__(self, terminal: TerminalProcess) -> None:
        self.terminal = terminal
        self.lives: list[Life] = []

    @property
    def life(self) -> Life:
        return self.lives[-1]

    def start(self) -> None:
        """Start a new life; the previous one ended with a kill (its events are complete)."""
        first = len(self.terminal.history)
        ready = self.terminal.start(timeout=EVENT_TIMEOUT)  # the log reopened: recovery ran
        ready_seq = int(ready["data"])
        if self.lives:
            previous = self.lives[-1]
            told = previous.votes[-1][0] if previous.votes else previous.ready_seq
            # A seq shown to a visitor is never handed out again ...
            assert ready_seq >= told, f"{self.terminal.device_id}: seq floor went back"
            # ... and a boot burns at most the seqs of presses that could have been appended.
            assert ready_seq <= previous.ready_seq + len(previous.sent), (
                f"{self.terminal.device_id}: seq jumped from {previous.ready_seq} to "
                f"{ready_seq} after {len(previous.sent)} presses")
        self.lives.append(Life(ready_seq, first))

    def press(self, button: int) -> int:
        """Send a press without waiting; returns the seq it will get if it is handled.

        Presses are handled in order and take consecutive seqs from ``ready`` on (``end``
        checks this), so the k-th press of a life gets ``ready_seq + k``.
        """
        self.life.sent.append(button)
        self.terminal.send({"op": "press", "button": button})
        return self.life.ready_seq + len(self.life.sent)

    def wait_vote(self, seq: int) -> None:
        """Wait for the ``vote`` event of ``seq`` (earlier ones, unconsumed, are skipped)."""
        self.terminal.wait_for("vote", lambda e: int(e["data"][0]) >= seq,
                               timeout=EVENT_TIMEOUT)

    def end(self) -> None:
        """Collect the life's vote events (complete: the process is dead or was drained)."""
        life = self.life
        events = self.terminal.history[life.first_event:]
        life.votes = [list(e["data"]) for e in events if e["ev"] == "vote"]
        seqs = [v[0] for v in life.votes]
        # Appends in one life take consecutive seqs: nothing burned, nothing reused.
        assert seqs == list(range(life.ready_seq + 1, life.ready_seq + 1 + len(seqs))), (
            f"{self.terminal.device_id}: seqs {seqs[:5]}... after ready {life.ready_seq}")
        # Presses are handled in order, each exactly once.
        assert [v[1] for v in life.votes] == life.sent[:len(life.votes)], (
            f"{self.terminal.device_id}: vote events do not match the presses sent")

    def kill(self) -> None:
        """SIGKILL now; the harness joins the event reader, so the life's events are all in."""
        self.terminal.kill()
        self.end()


def test_votes_survive_sigkill_at_random_moments(
        mosquitto: MosquittoBroker, pg_url: str, ingest: IngestProcess,
        harness: Harness) -> None:
    tracked = [Tracked(t) for t in add_terminals(KILL_DEVICES, pg_url, mosquitto, harness)]
    for t in tracked:
        t.start()
    rng = random.Random(20240612)
    modes: Counter[str] = Counter()
    for _ in range(KILLS):
        victim = rng.choice(tracked)
        # The other terminals keep getting presses, so the broker and the ingest worker are
        # busy with their uploads whenever a kill lands.
        for other in tracked:
            if other is not victim:
                for _ in range(rng.randint(0, 4)):
                    other.press(rng.randint(1, 4))
        mode = rng.choices(["votes", "burst", "event", "ack", "boot"],
                           weights=[2, 5, 2, 2, 1])[0]
        modes[mode] += 1
        if mode == "votes":
            # Between presses: the log is idle, the uploader may be mid-batch.
            for _ in range(rng.randint(1, 25)):
                victim.wait_vote(victim.press(rng.randint(1, 4)))
        elif mode == "burst":
            # While writing: the process handles a queued press in ~50 us, so a random
            # instant within the burst's ~3-15 ms lands the kill in the stream of appends.
            # The delay picks that instant; it waits for nothing.  (Vote events cannot be
            # used: the process reports them in chunks, after appending a whole chunk.)
            burst = rng.randint(50, 300)
            for _ in range(burst):
                victim.press(rng.randint(1, 4))
            time.sleep(rng.uniform(0, burst * 50e-6))
        elif mode == "event":
            # Right after the j-th vote event of a burst reached us (j = 0: right after
            # sending, mostly before the process has read a command).
            seqs = [victim.press(rng.randint(1, 4)) for _ in range(rng.randint(1, 100))]
            j = rng.randint(0, len(seqs))
            if j:
                victim.wait_vote(seqs[j - 1])
        elif mode == "ack":
            # Right after an ack: the log has just written its state file and may be
            # deleting segments; the uploader sends the next batch.
            seqs = [victim.press(rng.randint(1, 4)) for _ in range(rng.randint(1, 25))]
            victim.terminal.wait_acked(seqs[-1], timeout=EVENT_TIMEOUT)
        # "boot": right after ready, while the link connects and the first batch goes out.
        victim.kill()
        victim.start()

    final: dict[str, int] = {}
    for t in tracked:
        # One more vote, waited for: its ack covers everything the log held before it.
        seq = final[t.terminal.device_id] = t.press(rng.randint(1, 4))
        t.wait_vote(seq)
        wait_acked(t.terminal, seq, timeout=DRAIN_TIMEOUT)
        assert_drained(t.terminal)
        t.end()
    assert sum(len(t.lives) for t in tracked) - len(tracked) == KILLS

    stored = stored_votes(pg_url)
    for t in tracked:
        device = t.terminal.device_id
        reported = [v for life in t.lives for v in life.votes]
        repeated = [s for s, n in Counter(v[0] for v in reported).items() if n > 1]
        assert not repeated, f"{device}: vote events reported seqs twice: {repeated[:10]}"
        # Every vote a visitor was thanked for is stored, with its button and flags.
        lost = [v for v in reported if (device, v[0]) not in stored]
        assert not lost, f"{device}: acknowledged votes lost: {lost[:10]}\n{ingest.log_tail()}"
        wrong = [(v, stored[device, v[0]]) for v in reported
                 if stored[device, v[0]] != (v[1], v[2])]
        assert not wrong, f"{device}: stored differently than reported: {wrong[:10]}"
        # Every stored vote comes from a press sent to the life its seq belongs to (seqs of
        # a life follow its ``ready``), with that press's button: nothing invented, nothing
        # attributed to the wrong press -- including votes killed before their event went out.
        bounds = [life.ready_seq for life in t.lives[1:]] + [final[device]]
        for life, upper in zip(t.lives, bounds, strict=True):
            for seq in range(life.ready_seq + 1, upper + 1):
                if (device, seq) in stored:
                    assert stored[device, seq][0] == life.sent[seq - life.ready_seq - 1], (
                        f"{device}: seq {seq} stored with a button that was not pressed")
        seqs = sorted(s for d, s in stored if d == device)
        assert seqs[-1] == final[device] and seqs[0] >= 1
        assert len(seqs) <= sum(len(life.sent) for life in t.lives)
    assert_no_tracebacks(harness)
    # Where the kills landed: with presses still queued in the process (mid-stream), and
    # after an append whose vote event never left the process (between flash and harness).
    ended = [(life, nxt) for t in tracked
             for life, nxt in zip(t.lives, t.lives[1:], strict=False)]
    queued = sum(len(life.sent) > len(life.votes) for life, _ in ended)
    unreported = sum(nxt.ready_seq > life.ready_seq + len(life.votes) for life, nxt in ended)
    print(f"kill modes {dict(modes)}: {queued} kills with presses queued, {unreported} "
          f"with an appended vote unreported; {len(stored)} votes stored")

