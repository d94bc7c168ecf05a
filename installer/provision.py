"""``palaute provision``: give boards their identity, credential, firmware and config.

One board, step by step, each step one line with its duration:

1. open the port and enter the raw REPL (:mod:`installer.raw_repl`);
2. read the chip's unique id: the device id;
3. provision it with the fleet (:mod:`installer.fleet_client`): a new device, or one already
   provisioned whose identity is kept and whose MQTT credential is rotated;
4. copy the firmware bundle, every file verified by SHA-256 on the device, unchanged files
   skipped;
5. write ``config.json`` (the fleet's keys + device id, board, buttons, Wi-Fi), validated by
   the terminal's own rules and verified on the device;
6. reset the chip;
7. wait until the fleet sees the device online, reading its console meanwhile: safe mode or a
   crash fails the run with the firmware's reason (:mod:`installer.console`).

``--ports P1,P2`` (items may be globs such as ``/dev/ttyUSB*``) runs boards in parallel, one
thread each, every line prefixed with its port, then prints a summary table.  Exit status 0
only when every board came online.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from installer.console import ConsoleReader
from installer.fleet_client import FleetClient, Presence
from installer.raw_repl import DEFAULT_TIMEOUT_S, InstallerError, RawRepl

DEFAULT_ONLINE_TIMEOUT_S = 90.0
"""How long to wait for the device to come online after the reset (Wi-Fi, DNS, broker)."""
POLL_S = 1.0
"""Interval between presence requests; the console is read in between, so this is no idle
wait: a safe-mode line ends the wait as soon as it arrives."""


@dataclass
class Options:
    """Everything one provisioning run needs, shared by every board of a parallel run."""

    fleet: FleetClient
    bundle: Path
    board: str
    buttons: int
    site_id: int | None = None
    wifi: dict[str, str] | None = None
    online_timeout: float = DEFAULT_ONLINE_TIMEOUT_S
    repl_lock: bool = False
    handshake_timeout: float = DEFAULT_TIMEOUT_S
    write_pause: float = 0.01


@dataclass
class Result:
    """How one board's run ended."""

    port: str
    device_id: str = "-"
    ok: bool = False
    message: str = ""
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)


class Printer:
    """Writes whole lines from many threads without interleaving them."""

    def __init__(self, out: TextIO, err: TextIO, prefix_ports: bool) -> None:
        self.out = out
        self.err = err
        self.prefix_ports = prefix_ports
        self._lock = threading.Lock()

    def line(self, port: str, text: str, *, error: bool = False) -> None:
        """Print ``text`` for ``port`` (prefixed with the port in parallel runs); errors go
        to ``err``."""
        with self._lock:
            print(f"{port}: {text}" if self.prefix_ports else text,
                  file=self.err if error else self.out, flush=True)


class _Step:
    """The outcome text of a running step (set by the step's body)."""

    def __init__(self) -> None:
        self.outcome = "ok"


@contextmanager
def _step(printer: Printer, result: Result, name: str) -> Iterator[_Step]:
    """Time one step and print ``name: outcome (N.N s)``; on error print it failed."""
    step = _Step()
    start = time.monotonic()
    try:
        yield step
    except InstallerError:
        printer.line(result.port, f"{name}: FAILED ({time.monotonic() - start:.1f} s)")
        raise
    text = f"{name}: {step.outcome} ({time.monotonic() - start:.1f} s)"
    result.steps.append(text)
    printer.line(result.port, text)


def device_config(fleet_config: dict[str, Any], device_id: str, options: Options) -> dict[str, Any]:
    """config.json: the fleet's keys merged with what only the installer knows."""
    config = dict(fleet_config)  # any key the fleet adds later is carried over
    config.update({"device_id": device_id, "board": options.board,
                   "buttons": options.buttons})
    if options.wifi is not None:
        config["wifi"] = dict(options.wifi)
    if options.repl_lock:
        config["repl_lock"] = True
    return config


def _seen_since(now: Presence, before: Presence | None) -> bool:
    """Online, and heard from after the reset (not a session left over from before it)."""
    if not now.online:
        return False
    if before is None or not before.online:
        return True
    return now.last_seen_ms != before.last_seen_ms


def wait_online(repl: RawRepl, options: Options, device_id: str, host: str,
                before: Presence | None, show: Callable[[str], None]) -> Presence:
    """Poll presence until online; read the console between polls and fail on safe mode."""
    console = ConsoleReader()
    console_open = True
    deadline = time.monotonic() + options.online_timeout
    while True:
        if console_open:
            try:
                data = repl.read_console(POLL_S)
            except InstallerError:
                # A chip with native USB (ESP32-S3 on its USB port) drops off the bus when it
                # resets; the fleet's presence still tells when it is online.
                console_open = False
                show("  console: the port went away with the reset; waiting on the fleet only")
                data = b""
        else:
            time.sleep(POLL_S)  # the interval between presence requests
            data = b""
        lines = console.feed(data)
        for index, line in enumerate(lines):
            if line.kind == "safe_mode":
                raise InstallerError(f"device {device_id} is in safe mode: {line.text}")
            if line.kind == "fatal":
                # The traceback follows on further lines; its last line names the error.
                rest = lines[index + 1:]
                if console_open:
                    rest += console.feed(repl.read_console(POLL_S))
                reason = rest[-1].text if rest else line.text
                raise InstallerError(f"device {device_id} crashed at boot: {reason}; "
                                     "re-run the provisioning, and report it if it persists")
            if line.kind in ("info", "running"):
                show(f"  console: {line.text}")
        presence = options.fleet.presence(device_id)
        if _seen_since(presence, before):
            return presence
        if time.monotonic() >= deadline:
            last = f"; its console said last: {console.lines[-1]!r}" if console.lines else ""
            if not console_open:
                last += "; its console could not be read: its display shows any setup problem"
            raise InstallerError(
                f"device {device_id} did not come online within {options.online_timeout:g} s: "
                f"check that the broker at {host} is running and reachable from the "
                f"device's network, and that `palaute ingest` runs{last}")


def provision_board(port: str, options: Options, printer: Printer) -> Result:
    """Provision the board on ``port``; never raises for installer errors (see Result)."""
    result = Result(port=port)
    start = time.monotonic()

    def show(text: str) -> None:
        printer.line(port, text)

    try:
        with _step(printer, result, "open port, raw REPL"):
            repl = RawRepl(port, timeout=options.handshake_timeout,
                           write_pause=options.write_pause)
        try:
            with _step(printer, result, "device id") as step:
                repl.detect_root()
                result.device_id = repl.device_id()
                step.outcome = result.device_id
            with _step(printer, result, "fleet") as step:
                provisioned = options.fleet.provision(result.device_id, options.board,
                                                      options.site_id)
                step.outcome = (
                    "new device" if provisioned.created else
                    "already provisioned: identity kept, credential rotated"
                    if provisioned.rotated else "registered before: credential created")
                before = None if provisioned.created else options.fleet.presence(
                    result.device_id)
                if not provisioned.config.get("content_key"):
                    # Not fatal (votes work), but the terminal would refuse every content
                    # update (no_key) until someone provisions it again on site.
                    step.outcome += ("; warning: the fleet has no content-signing key "
                                     "(PALAUTE_CONTENT_KEY_FILE), so this terminal will "
                                     "refuse content updates until provisioned again")
            with _step(printer, result, "copy bundle") as step:
                report = repl.copy_bundle(options.bundle)
                step.outcome = (f"{len(report.copied)} copied, {len(report.skipped)} "
                                "unchanged, all verified by SHA-256")
            config = device_config(provisioned.config, result.device_id, options)
            with _step(printer, result, "write config.json") as step:
                repl.write_config(config)
                step.outcome = "verified by SHA-256"
            with _step(printer, result, "reset"):
                repl.hard_reset()
            mqtt = config["mqtt"]
            with _step(printer, result, "wait online") as step:
                presence = wait_online(repl, options, result.device_id,
                                       f"{mqtt.get('host')}:{mqtt.get('port', 1883)}", before,
                                       show)
                step.outcome = f"online (firmware {presence.fw_version or '?'})"
        finally:
            repl.close()
        result.ok = True
        result.message = "online"
    except InstallerError as exc:
        result.message = str(exc)
        if printer.prefix_ports:  # a single board's error is the command's own error line
            printer.line(port, f"error: {exc}", error=True)
    result.seconds = time.monotonic() - start
    return result


def provision_many(ports: Sequence[str], options: Options, out: TextIO,
                   err: TextIO) -> list[Result]:
    """Provision ``ports`` in parallel (one thread each); results in ``ports`` order."""
    printer = Printer(out, err, prefix_ports=len(ports) > 1)
    if len(ports) == 1:
        return [provision_board(ports[0], options, printer)]
    with ThreadPoolExecutor(max_workers=len(ports)) as pool:
        return list(pool.map(lambda port: provision_board(port, options, printer), ports))


def summary_table(results: Sequence[Result]) -> str:
    """The end-of-run table: port, device id, result, seconds."""
    rows = [("PORT", "DEVICE", "RESULT", "SECONDS")]
    rows += [(r.port, r.device_id, "ok" if r.ok else "FAILED", f"{r.seconds:.1f}")
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)),
                        row[3].rjust(7)]).rstrip() for row in rows]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} boards online"
                 + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


# -- inputs -----------------------------------------------------------------------------------
def expand_ports(spec: str) -> list[str]:
    """``/dev/ttyUSB0,/dev/ttyUSB*``: comma-separated ports or globs, without duplicates."""
    ports: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise InstallerError(f"no serial port matches {item}: is the board plugged in?")
        ports += [port for port in matches if port not in ports]
    if not ports:
        raise InstallerError("--ports lists no port")
    return ports


def bundle_board(bundle: Path) -> tuple[str, int]:
    """The board a bundle was built for and how many buttons its pin map wires."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
        pins = json.loads((bundle / "board.json").read_text(encoding="utf-8"))
        return str(manifest["board"]), len(pins["buttons"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstallerError(f"{bundle} is not a firmware bundle ({exc}); build one with "
                             "`palaute firmware build`") from None


# -- the command ----------------------------------------------------------------------------
def cmd_provision(args: argparse.Namespace) -> int:
    """``palaute provision``: 0 when every board came online, 2 otherwise."""
    from fleet.config import get_settings
    from fleet.firmware_bundle import DEFAULT_BOARD, BundleError, build_bundle

    out: TextIO = sys.stdout
    built: Path | None = None
    try:
        if (args.wifi_ssid is None) != (args.wifi_password is None):
            raise InstallerError("give --wifi-ssid and --wifi-password together")
        settings = get_settings()
        fleet = FleetClient(args.fleet or settings.fleet_url,
                            args.token or settings.installer_token)
        ports = [args.port] if args.port else expand_ports(args.ports)
        if args.bundle:
            bundle = Path(args.bundle)
        else:
            built = Path(tempfile.mkdtemp(prefix="palaute-bundle-"))
            bundle = built / "bundle"
            start = time.monotonic()
            try:
                build_bundle(bundle, board=args.board or DEFAULT_BOARD)
            except BundleError as exc:
                raise InstallerError(str(exc)) from None
            print(f"build bundle: ok ({time.monotonic() - start:.1f} s)", file=out)
        board, wired = bundle_board(bundle)
        if args.board and args.board != board:
            raise InstallerError(f"the bundle in {bundle} is for {board}, not {args.board}: "
                                 "build one for the board with `palaute firmware build`")
        buttons = args.buttons if args.buttons is not None else min(wired, 5)
        if not 2 <= buttons <= min(wired, 5):
            raise InstallerError(f"--buttons must be 2..{min(wired, 5)} for {board}")
        if not args.timeout > 0:
            raise InstallerError("--timeout must be a positive number of seconds")
        wifi = (None if args.wifi_ssid is None else
                {"ssid": args.wifi_ssid, "password": args.wifi_password})
        options = Options(fleet=fleet, bundle=bundle, board=board, buttons=buttons,
                          site_id=args.site, wifi=wifi, online_timeout=args.timeout,
                          repl_lock=args.lock_repl)
        results = provision_many(ports, options, out, sys.stderr)
    except InstallerError as exc:
        print(f"palaute provision: {exc}", file=sys.stderr)
        return 2
    finally:
        if built is not None:
            shutil.rmtree(built, ignore_errors=True)
    if len(results) > 1:
        print(summary_table(results), file=out)
    elif not results[0].ok:
        print(f"palaute provision: {results[0].message}", file=sys.stderr)
    return 0 if all(r.ok for r in results) else 2


def add_provision_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``provision`` to the ``palaute`` sub-commands."""
    parser = subparsers.add_parser(
        "provision", help="provision terminals over serial (identity, credential, firmware)",
        description="Register each board with the fleet, copy the firmware bundle and its "
                    "config.json (verified by SHA-256), reset it and wait until the fleet "
                    "sees it online.  Safe to run again on a provisioned board: the identity "
                    "is kept and the credential rotated.  See docs/installer.md.")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="one board's serial port (/dev/ttyUSB0)")
    where.add_argument("--ports", metavar="P1,P2,...",
                       help="boards in parallel: ports or globs (/dev/ttyUSB*), comma-separated")
    parser.add_argument("--site", type=int, default=None, metavar="SITE_ID",
                        help="assign the devices to this site")
    parser.add_argument("--board", default=None, metavar="NAME",
                        help="board file in hardware/boards (default: the bundle's, or "
                             "esp32-devkitc)")
    parser.add_argument("--buttons", type=int, default=None, metavar="N",
                        help="buttons the terminal uses (default: all the board wires, max 5)")
    parser.add_argument("--wifi-ssid", default=None, metavar="SSID")
    parser.add_argument("--wifi-password", default=None, metavar="PASSWORD")
    parser.add_argument("--bundle", default=None, metavar="DIR",
                        help="a bundle from `palaute firmware build` (default: build one)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_ONLINE_TIMEOUT_S,
                        metavar="S", help="seconds to wait for the device to come online "
                                          f"(default: {DEFAULT_ONLINE_TIMEOUT_S:g})")
    parser.add_argument("--lock-repl", action="store_true",
                        help="the terminal ignores Ctrl-C on its USB console while it runs; "
                             "test mode (hold buttons 1 and N for 5 s) unlocks it")
    parser.add_argument("--fleet", default=None, metavar="URL",
                        help="fleet API URL (default: PALAUTE_FLEET_URL)")
    parser.add_argument("--token", default=None,
                        help="installer token (default: PALAUTE_INSTALLER_TOKEN; prefer the "
                             "variable: command lines are visible to other users)")
    parser.set_defaults(func=cmd_provision)
    return parser
