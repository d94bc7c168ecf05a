"""MicroPython's raw REPL over a serial port, and the file operations the installer needs.

The raw REPL is MicroPython's machine interface on the USB serial console:

- Ctrl-C (twice) stops whatever runs (``main.py``), Ctrl-A enters the raw REPL, which answers
  ``raw REPL; CTRL-B to exit\\r\\n>``;
- the host sends code and Ctrl-D; the board answers ``OK``, runs it, then sends its stdout,
  ``\\x04``, the traceback if it raised (else nothing), ``\\x04`` and the ``>`` prompt;
- Ctrl-D with no code soft-resets (``soft reboot\\r\\n`` and the banner again); Ctrl-B leaves.

Every wait here has a deadline, so a port that answers garbage or nothing ends in one of the
:class:`InstallerError` subclasses with a one-line message, never in a hang.

Paths on the device are absolute (``/lib/terminal/app.mpy``) and are placed under ``root``
(``/`` on a board).  The pty test board runs the unix port in a temporary directory and passes
that directory as ``root``.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import serial

RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n>"
SOFT_REBOOT = b"soft reboot\r\n"
DEFAULT_BAUD = 115200
DEFAULT_TIMEOUT_S = 3.0
"""Bound on each handshake wait (open, interrupt, raw REPL banner, ``OK``)."""
EXEC_TIMEOUT_S = 10.0
"""Default bound on running one piece of code (hashing a file on flash takes well under 1 s)."""
CHUNK_BYTES = 768
"""Raw bytes per file-write round trip: 1 KiB of base64, small enough for the board's RX
buffer and heap, big enough that a 30 KiB bundle takes a few dozen round trips."""
WRITE_BLOCK = 256
"""The host writes code in blocks of this size with a pause between them: plain raw REPL has
no flow control, and the ESP32's USB-UART receive buffer is small."""
UNIQUE_ID_ENV = "PALAUTE_BOARD_UNIQUE_ID"
"""Where the unix-port test board (which has no ``machine``) keeps its unique id, as hex."""
ROOT_ENV = "PALAUTE_BOARD_ROOT"
"""Where a unix-port test board keeps its "flash" (a directory); boards have none: ``/``."""
MANIFEST = "manifest.json"
CONFIG = "/config.json"


class InstallerError(Exception):
    """A problem that stops the installer; the message is one line an installer can act on."""


class NoSuchPort(InstallerError):
    """The serial port does not exist."""


class PortPermission(InstallerError):
    """The port exists but this user may not open it."""


class PortError(InstallerError):
    """The port could not be opened or used for another reason (busy, I/O error)."""


class NoAnswer(InstallerError):
    """Nothing answers on the port."""


class NotMicroPython(InstallerError):
    """Something answers, but not like MicroPython's REPL."""


class ExecTimeout(InstallerError):
    """Code sent to the board did not finish in time."""


class RemoteError(InstallerError):
    """Code run on the board raised; ``traceback`` is the board's traceback text."""

    def __init__(self, traceback: str) -> None:
        self.traceback = traceback
        last = traceback.strip().splitlines()[-1] if traceback.strip() else "unknown error"
        super().__init__(f"the board raised {last}")


class VerifyError(InstallerError):
    """A file on the board (or in the bundle) does not have the SHA-256 it should have."""


class InvalidConfig(InstallerError):
    """The config to write would not pass the terminal's own validation."""


def device_id_from_unique_id(unique_id: bytes) -> str:
    """``pt-`` + 12 lowercase hex digits of the chip's id (the ESP32's 6-byte base MAC).

    Longer ids (other chips) keep their last 6 bytes, the serial-number-like part.
    """
    if len(unique_id) < 6:
        raise InstallerError(f"the board's unique id {unique_id.hex()!r} is shorter than 6 "
                             "bytes; cannot derive a device id")
    return "pt-" + unique_id[-6:].hex()


def _one_line(data: bytes, limit: int = 40) -> str:
    """A short printable sample of what a port sent, for error messages."""
    return repr(data[:limit]) + ("..." if len(data) > limit else "")


def _open_port(port: str, baudrate: int, read_timeout: float, write_timeout: float) -> Any:
    """Open ``port`` with pyserial; map its failures to one-line InstallerErrors."""
    try:
        # serial_for_url accepts plain device paths and pyserial URLs (socket://, rfc2217://).
        return serial.serial_for_url(port, baudrate=baudrate, timeout=read_timeout,
                                     write_timeout=write_timeout)
    except (serial.SerialException, OSError) as exc:
        code = getattr(exc, "errno", None)
        if code == errno.ENOENT:
            raise NoSuchPort(f"no such port {port}: is the board plugged in? "
                             "`palaute flash --list` lists the serial ports") from None
        if code in (errno.EACCES, errno.EPERM):
            raise PortPermission(f"permission denied on {port}: add yourself to the dialout "
                                 "group (`sudo usermod -aG dialout $USER`), then log in "
                                 "again") from None
        if code == errno.EBUSY:
            raise PortError(f"{port} is busy: close other programs using it (screen, "
                            "minicom, an IDE's serial monitor)") from None
        raise PortError(f"cannot open {port}: {exc}") from None


@dataclass
class CopyReport:
    """What :meth:`RawRepl.copy_bundle` did: bundle paths copied and already up to date."""

    copied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class RawRepl:
    """A connection to one board's raw REPL.

    ``RawRepl(port)`` opens the port, stops the running program and enters the raw REPL;
    use it as a context manager (or call :meth:`close`) to leave the raw REPL and close the
    port.  ``timeout`` bounds each handshake step; ``write_pause`` is the pause between
    ``WRITE_BLOCK``-sized writes (see there; 0 for a pty).
    """

    def __init__(self, port: str, *, baudrate: int = DEFAULT_BAUD,
                 timeout: float = DEFAULT_TIMEOUT_S, root: str = "/",
                 write_pause: float = 0.01) -> None:
        self.port = port
        self.timeout = timeout
        self.root = root.rstrip("/")
        self.write_pause = write_pause
        # Read with a short pyserial timeout; the deadlines below bound the whole wait.
        self._serial = _open_port(port, baudrate, 0.05, timeout)
        self._rx = bytearray()
        self._raw = False  # in the raw REPL (False again once the board was reset)
        try:
            self._interrupt()
            self._enter_raw()
        except BaseException:
            self._serial.close()
            raise

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> RawRepl:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Leave the raw REPL (Ctrl-B) and close the port; never raises for a gone board."""
        try:
            if self._raw:
                self._write(b"\x02")
        except InstallerError:
            pass  # the board may be unplugged already; closing must still work
        finally:
            self._serial.close()

    # -- bytes on the wire --------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            for start in range(0, len(data), WRITE_BLOCK):
                self._serial.write(data[start:start + WRITE_BLOCK])
                if self.write_pause and start + WRITE_BLOCK < len(data):
                    time.sleep(self.write_pause)
            self._serial.flush()
        except (serial.SerialException, OSError) as exc:
            # pyserial raises SerialTimeoutException (a SerialException) on write_timeout.
            raise NoAnswer(f"cannot write to {self.port}: {exc}; is the board still "
                           "plugged in?") from None

    def _read_until(self, marker: bytes, timeout: float) -> tuple[bytes, bool]:
        """Read up to and including ``marker``, or until ``timeout``: (data, marker found).

        Bytes after the marker stay in ``self._rx`` for the next read: the board often sends
        ``OK``, the output and both ``\\x04`` in one burst.
        """
        deadline = time.monotonic() + timeout
        searched = 0
        while True:
            found = self._rx.find(marker, searched)
            if found >= 0:
                end = found + len(marker)
                data = bytes(self._rx[:end])
                del self._rx[:end]
                return data, True
            searched = max(0, len(self._rx) - len(marker) + 1)
            if time.monotonic() >= deadline:
                data = bytes(self._rx)
                self._rx.clear()
                return data, False
            self._rx += self._read_some()

    def _read_some(self) -> bytes:
        """What the port has now, or one byte within pyserial's short timeout, or b''."""
        try:
            return bytes(self._serial.read(max(1, min(self._serial.in_waiting, 4096))))
        except (serial.SerialException, OSError) as exc:
            raise NoAnswer(f"cannot read from {self.port}: {exc}; is the board still "
                           "plugged in?") from None

    def _drain(self, quiet: float = 0.1, limit: float = 1.0) -> bytes:
        """Read and return whatever arrives until the port is quiet for ``quiet`` seconds."""
        deadline = time.monotonic() + limit
        data = bytearray(self._rx)
        self._rx.clear()
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet:
            chunk = self._read_some()
            if chunk:
                data += chunk
                last = time.monotonic()
        return bytes(data)

    # -- REPL modes -----------------------------------------------------------------------------
    def _interrupt(self) -> None:
        # Two Ctrl-C: the first may land in a `try/except KeyboardInterrupt` of the program.
        self._write(b"\r\x03")
        time.sleep(0.05)
        self._write(b"\x03")
        # Throw away the program's last output and the friendly prompt.
        self._drain()

    def _enter_raw(self) -> None:
        self._write(b"\r\x01")
        data, ok = self._read_until(RAW_BANNER, self.timeout)
        if not ok:
            self._no_banner(data)
        self._raw = True

    def _no_banner(self, data: bytes) -> NoReturn:
        if not data:
            raise NoAnswer(f"nothing answers on {self.port}: check the USB cable (some are "
                           "charge-only) and the baud rate; if the board is held in its "
                           "bootloader (BOOT button), release it and press RESET; a terminal "
                           "with a locked REPL answers after test mode (hold buttons 1 and "
                           "N for 5 s)")
        raise NotMicroPython(f"{self.port} answers, but not like MicroPython (got "
                             f"{_one_line(data)}): flash MicroPython with `palaute flash` "
                             "first")

    def soft_reset(self) -> None:
        """Soft-reset the board and come back to the raw REPL (fresh interpreter state)."""
        self._write(b"\x04")
        data, ok = self._read_until(SOFT_REBOOT, self.timeout)
        if not ok:
            self._no_banner(data)
        data, ok = self._read_until(RAW_BANNER, self.timeout)
        if not ok:
            self._no_banner(data)

    def hard_reset(self) -> None:
        """Reset the chip (``machine.reset()``): it boots and runs ``/main.py``.

        The port stays open: what the firmware prints on its console is then read with
        :meth:`read_console`.  No raw-REPL command works until a new connection.
        """
        self._write(b"import machine\nmachine.reset()\n\x04")
        data, ok = self._read_until(b"OK", self.timeout)
        if not ok:
            self._no_banner(data)
        self._raw = False

    def read_console(self, timeout: float) -> bytes:
        """The console output that arrives within ``timeout`` seconds (b'' if none).

        Returns as soon as some bytes arrived and the port went quiet briefly, so a caller
        polling in a loop sees lines promptly.
        """
        deadline = time.monotonic() + timeout
        data = bytearray(self._rx)
        self._rx.clear()
        while time.monotonic() < deadline:
            chunk = self._read_some()
            if chunk:
                data += chunk
            elif data:
                break
        return bytes(data)

    def detect_root(self) -> str:
        """Set and return :attr:`root` from the board: ``/`` on a real board, the test
        board's flash directory (``PALAUTE_BOARD_ROOT``) on the unix port."""
        root = self.eval_json(
            "import json, os\n"
            f"print(json.dumps(getattr(os, 'getenv', lambda _n: None)({ROOT_ENV!r}) or '/'))\n")
        if not isinstance(root, str) or not root.startswith("/"):
            raise NotMicroPython(f"unexpected file system root from {self.port}: {root!r}")
        self.root = root.rstrip("/")
        return root

    # -- running code ---------------------------------------------------------------------------
    def exec(self, code: str, timeout: float = EXEC_TIMEOUT_S) -> bytes:
        """Run ``code`` on the board; return what it printed.

        Raises :class:`RemoteError` with the board's traceback if the code raised, and
        :class:`ExecTimeout` if it did not finish within ``timeout`` seconds (the board is
        then interrupted so the connection stays usable).
        """
        if "\x04" in code:
            raise ValueError("code for the raw REPL must not contain Ctrl-D (\\x04)")
        self._write(code.encode() + b"\x04")
        data, ok = self._read_until(b"OK", self.timeout)
        if not ok:
            if data.endswith(b"raw REPL; CTRL-B to exit\r\n"):
                # Too much code for the board's buffer ends this way on real boards.
                raise NotMicroPython(f"{self.port} left the raw REPL while receiving code")
            self._no_banner(data)
        stdout, ok = self._read_until(b"\x04", timeout)
        if ok:
            stderr, ok = self._read_until(b"\x04", timeout)
        if not ok:
            self._write(b"\x03")
            self._drain()
            self._write(b"\r\x01")
            self._read_until(RAW_BANNER, self.timeout)
            raise ExecTimeout(f"the board on {self.port} did not finish within {timeout:g} s")
        # The prompt that follows; its absence is harmless (the next wait would notice).
        self._read_until(b">", self.timeout)
        if stderr[:-1]:
            raise RemoteError(stderr[:-1].decode(errors="replace"))
        return stdout[:-1]

    def eval_json(self, code: str, timeout: float = EXEC_TIMEOUT_S) -> Any:
        """Run ``code`` whose last output line is JSON; return that value parsed."""
        out = self.exec(code, timeout).decode(errors="replace").strip().splitlines()
        try:
            return json.loads(out[-1])
        except (IndexError, ValueError):
            raise NotMicroPython(f"unexpected answer from {self.port}: {out!r}") from None

    # -- files ------------------------------------------------------------------------------
    def device_path(self, path: str) -> str:
        """``path`` (absolute on the device, e.g. ``/config.json``) placed under ``root``."""
        return self.root + "/" + path.lstrip("/")

    def file_exists(self, path: str) -> bool:
        """True if ``path`` exists on the device (file or directory)."""
        return bool(self.eval_json(
            "import os\n"
            f"try:\n os.stat({self.device_path(path)!r})\n print(1)\n"
            "except OSError:\n print(0)\n"))

    def sha256(self, path: str) -> str | None:
        """The SHA-256 (hex) of a file on the device, hashed there; None if it is missing."""
        return self.sha256_many([path])[path]

    def sha256_many(self, paths: list[str]) -> dict[str, str | None]:
        """SHA-256 of several device files in one round trip; None for missing files."""
        full = [self.device_path(p) for p in paths]
        # Read in small blocks: the ESP32's heap cannot hold a whole module at once.
        hashes = self.eval_json(
            "import hashlib, binascii, json\n"
            "def _h(p):\n"
            " try:\n"
            "  f = open(p, 'rb')\n"
            " except OSError:\n"
            "  return None\n"
            " h = hashlib.sha256()\n"
            " while True:\n"
            "  b = f.read(512)\n"
            "  if not b:\n"
            "   break\n"
            "  h.update(b)\n"
            " f.close()\n"
            " return binascii.hexlify(h.digest()).decode()\n"
            f"print(json.dumps([_h(p) for p in {full!r}]))\n",
            timeout=EXEC_TIMEOUT_S + len(paths))
        if not isinstance(hashes, list) or len(hashes) != len(paths):
            raise NotMicroPython(f"unexpected hash list from {self.port}: {hashes!r}")
        return dict(zip(paths, hashes, strict=True))

    def makedirs(self, directory: str) -> None:
        """Create ``directory`` and its parents on the device; existing ones are fine."""
        self.exec(
            "import os\n"
            "_p = ''\n"
            f"for _d in {self.device_path(directory)!r}.split('/'):\n"
            " if _d:\n"
            "  _p += '/' + _d\n"
            "  try:\n   os.mkdir(_p)\n  except OSError:\n   pass\n")

    def put_file(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` on the device, creating its directories.

        The bytes go to ``path + '.tmp'`` in base64 chunks and are renamed over ``path`` only
        when complete, so a cut cable leaves the old file (or none), never half a file.
        """
        target = self.device_path(path)
        parent = "/" + path.strip("/").rpartition("/")[0]
        if parent != "/":
            self.makedirs(parent)
        tmp = target + ".tmp"
        self.exec(f"import binascii\n_f = open({tmp!r}, 'wb')\n")
        try:
            for start in range(0, len(data), CHUNK_BYTES):
                chunk = base64.b64encode(data[start:start + CHUNK_BYTES]).decode()
                self.exec(f"_f.write(binascii.a2b_base64({chunk!r}))\n")
        finally:
            self.exec("_f.close()\n")
        # LittleFS renames over an existing file; FAT refuses, so remove it first there.
        self.exec(
            "import os\n"
            f"try:\n os.rename({tmp!r}, {target!r})\n"
            f"except OSError:\n os.remove({target!r})\n os.rename({tmp!r}, {target!r})\n")

    def read_file(self, path: str) -> bytes:
        """The bytes of a (small) file on the device."""
        out = self.exec(
            "import binascii\n"
            f"with open({self.device_path(path)!r}, 'rb') as _f:\n"
            " while True:\n"
            f"  _b = _f.read({CHUNK_BYTES})\n"
            "  if not _b:\n"
            "   break\n"
            "  print(binascii.b2a_base64(_b).decode().strip())\n")
        return b"".join(base64.b64decode(line) for line in out.split())

    def put_file_verified(self, path: str, data: bytes) -> None:
        """:meth:`put_file`, then check the SHA-256 the device computes of what it stored."""
        self.put_file(path, data)
        expected = hashlib.sha256(data).hexdigest()
        actual = self.sha256(path)
        if actual != expected:
            raise VerifyError(f"{path} on the board has SHA-256 {actual}, expected "
                              f"{expected}: the copy was corrupted; run the installer again")

    def copy_bundle(self, bundle_dir: Path) -> CopyReport:
        """Copy every file of a firmware bundle to the device, verified by SHA-256.

        Files whose hash on the device already matches the manifest are skipped, so running
        it again after an interruption copies only what is missing.  ``manifest.json`` goes
        last: a board holding a manifest holds every file it lists.
        """
        bundle_dir = Path(bundle_dir)
        manifest_path = bundle_dir / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files: dict[str, str] = {path: entry["sha256"]
                                     for path, entry in manifest["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InstallerError(f"{manifest_path} is not a firmware bundle manifest ({exc}); "
                                 "build one with `palaute firmware build`") from None
        for path in files:
            # The manifest decides where files land on the device: only plain relative paths.
            if path.startswith("/") or ".." in path.split("/") or path == MANIFEST:
                raise InstallerError(f"{manifest_path} lists an unsafe path {path!r}; "
                                     "rebuild the bundle with `palaute firmware build`")
        manifest_bytes = manifest_path.read_bytes()
        files[MANIFEST] = hashlib.sha256(manifest_bytes).hexdigest()
        on_device = self.sha256_many(["/" + path for path in files])
        report = CopyReport()
        for path, expected in files.items():
            if on_device["/" + path] == expected:
                report.skipped.append(path)
                continue
            data = (bundle_dir / path).read_bytes()
            if hashlib.sha256(data).hexdigest() != expected:
                raise VerifyError(f"{bundle_dir / path} does not match its manifest entry: "
                                  "rebuild the bundle with `palaute firmware build`")
            self.put_file_verified("/" + path, data)
            report.copied.append(path)
        return report

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Write ``/config.json`` after checking it with the terminal's own validator.

        Written through a temporary file and a rename (see :meth:`put_file`), so a cut never
        leaves half a config; verified by SHA-256 on the device.
        """
        # Imported here: the firmware package is plain Python, but only this needs it.
        from terminal.config import ConfigError, validate

        try:
            validate(json.loads(json.dumps(config)))
        except ConfigError as exc:
            raise InvalidConfig(f"config not written: {exc}") from None
        data = (json.dumps(dict(config), sort_keys=True) + "\n").encode()
        self.put_file_verified(CONFIG, data)

    def read_unique_id(self) -> bytes:
        """The chip's unique id: ``machine.unique_id()`` (the ESP32's base MAC).

        Boards without ``machine`` (the unix-port test board) give it in the environment
        variable ``PALAUTE_BOARD_UNIQUE_ID`` (hex), or in a file ``/unique_id`` (hex).
        """
        text = self.eval_json(
            "import binascii, json\n"
            "try:\n"
            " import machine\n"
            " _u = machine.unique_id()\n"
            # The unix port has no machine module, or one without unique_id().
            "except (ImportError, AttributeError):\n"
            " import os\n"
            f" _u = os.getenv({UNIQUE_ID_ENV!r})\n"
            " if not _u:\n"
            f"  with open({self.device_path('/unique_id')!r}) as _f:\n"
            "   _u = _f.read().strip()\n"
            " _u = binascii.unhexlify(_u)\n"
            "print(json.dumps(binascii.hexlify(_u).decode()))\n")
        try:
            return bytes.fromhex(str(text))
        except ValueError:
            raise NotMicroPython(f"unexpected unique id from {self.port}: {text!r}") from None

    def device_id(self) -> str:
        """The device id the fleet knows this board by: ``pt-`` + 12 hex of its unique id."""
        return device_id_from_unique_id(self.read_unique_id())


@contextmanager
def connect(port: str, **kwargs: Any) -> Iterator[RawRepl]:
    """``with connect("/dev/ttyUSB0") as board:`` — a :class:`RawRepl` closed afterwards."""
    board = RawRepl(port, **kwargs)
    try:
        yield board
    finally:
        board.close()
